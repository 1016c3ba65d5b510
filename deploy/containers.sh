#!/usr/bin/env bash
# deploy/check.sh --containers: the images and the compose stack, really
# run with podman (as root, offline):
#   1. an offline Debian 12 base image (debootstrap minbase from the apt
#      mirror this host uses, slimmed as debian:bookworm-slim is), cached
#      as a tarball in $PUNCH_CACHE_DIR (default /var/cache/punch-ci);
#   2. both images built from deploy/docker/*.Dockerfile with
#      --build-arg BINARIES=prebuilt (the binaries built once, on the host);
#   3. deploy/docker/compose.yaml up (server + two agents on a podman
#      network), checked from outside: both agents register, one connects
#      to the other by id, direct (the server relayed no byte for it) and
#      with --force-relay relayed; the agents' /healthz answer 200; every
#      container runs as uid 10001; every image's HEALTHCHECK passes; a
#      restarted server and a restarted agent keep the ids (keys and
#      bindings.redb on volumes);
#   4. the Cloud Run shape: an agent whose only way to the server is a
#      TLS-terminating nginx front at wss://front/ws, still connecting
#      directly to another agent.
# Needs root, podman, runc, debootstrap, podman-compose, curl, openssl
# and ss. Without
# them it says so and exits 0, or 1 under CI (CI set).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "containers: $*"; }
fail() {
  echo "containers: FAIL: $*" >&2
  exit 1
}
skip() {
  if [ -n "${CI:-}" ]; then fail "$* (required under CI)"; fi
  say "skipped: $*"
  exit 0
}

[ "$(id -u)" = 0 ] || skip "not root (podman's containers here need root)"
for t in podman runc debootstrap podman-compose curl openssl ss; do
  command -v "$t" >/dev/null || skip "$t not installed (apt-get install podman runc debootstrap podman-compose curl)"
done

# crun cannot set limits in this sandbox; runc with explicit ones can.
# In a containers.conf of our own, so every podman run and build (also
# podman-compose's) uses it.
conf=$(mktemp)
cat >"$conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=1000:1000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF=$conf

bin_dir=${PUNCH_BIN_DIR:?PUNCH_BIN_DIR: the directory with punch-server and punch-agent}
cache=${PUNCH_CACHE_DIR:-/var/cache/punch-ci}
base=localhost/debian:bookworm-slim
work=$(mktemp -d)
project=punchci$$
cleanup() {
  (cd deploy/docker && PUNCH_TOKEN=x podman-compose -p "$project" down -v >/dev/null 2>&1) || true
  podman rm -f -t 0 "$project-front" "$project-cloudrun" >/dev/null 2>&1 || true
  rm -rf "$work" "$conf" deploy/docker/prebuilt
}
[ -n "${KEEP:-}" ] || trap cleanup EXIT

echo "-- base image"
if ! podman image exists "$base"; then
  tarball=$cache/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    # The mirror this host's apt uses (no registry named here).
    mirror=$(grep -h -m1 -oE '^(URIs: |deb )https?://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1 | sed -E 's/^(URIs: |deb )//' || true)
    [ -n "$mirror" ] || fail "no apt mirror found in /etc/apt"
    root=$work/root
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
      fail "debootstrap failed: $(tail -5 "$work/debootstrap.log")"
    # As debian:bookworm-slim is: no docs, man pages or locales from
    # packages, no apt caches left in layers.
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
      "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
    mkdir -p "$cache"
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    say "base image made with debootstrap from $mirror, cached in $tarball"
  else
    say "base image from the cached $tarball"
  fi
  podman import -q "$tarball" "$base" >/dev/null
fi
# The Dockerfiles say debian:bookworm-slim; --pull=never finds this one.
podman tag "$base" docker.io/library/debian:bookworm-slim
size=$(podman image inspect "$base" --format '{{.Size}}')
say "base $base: $((size / 1000000)) MB"

echo "-- images"
for b in server agent; do
  d=deploy/docker/prebuilt/punch-$b
  rm -rf "$d"
  mkdir -p "$d/share/man/man1" "$d/share/bash-completion/completions" \
    "$d/share/zsh/site-functions" "$d/share/fish/vendor_completions.d"
  cp "$bin_dir/punch-$b" "$d/"
  strip "$d/punch-$b"
  "$d/punch-$b" man --out "$d/share/man/man1" >/dev/null
  "$d/punch-$b" completions bash >"$d/share/bash-completion/completions/punch-$b"
  "$d/punch-$b" completions zsh >"$d/share/zsh/site-functions/_punch-$b"
  "$d/punch-$b" completions fish >"$d/share/fish/vendor_completions.d/punch-$b.fish"
  # docker format: OCI images have no HEALTHCHECK.
  podman build --format docker --pull=never --build-arg BINARIES=prebuilt \
    -f "deploy/docker/$b.Dockerfile" -t "punch-$b:dev" . >"$work/build-$b.log" 2>&1 ||
    fail "building deploy/docker/$b.Dockerfile: $(tail -20 "$work/build-$b.log")"
  size=$(podman image inspect "punch-$b:dev" --format '{{.Size}}')
  say "built punch-$b:dev from deploy/docker/$b.Dockerfile: $((size / 1000000)) MB"
done

echo "-- the compose stack (deploy/docker/compose.yaml)"
compose() { (cd deploy/docker && podman-compose -p "$project" "$@"); }
ctr() { echo "${project}_$1_1"; }
api() { curl -sf --max-time 5 -H "Authorization: Bearer $PUNCH_TOKEN" "http://127.0.0.1:8080$1"; }
# compose.yaml publishes the server on this host's 3478 and 127.0.0.1:8080.
if ss -Hltn 'sport = :8080' | grep -q . || ss -Hlun 'sport = :3478' | grep -q . ||
  ss -Hltn 'sport = :3478' | grep -q .; then
  fail "port 3478 or 8080 is in use on this host; compose.yaml publishes the server there"
fi
PUNCH_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export PUNCH_TOKEN
# As compose.yaml's own first steps say.
fp=$(compose run --rm -T --no-deps server fingerprint 2>"$work/run.log" | grep -E '^[0-9a-f]{64}$' | tail -1 || true)
[ -n "$fp" ] || fail "compose run server fingerprint printed no fingerprint: $(tail -5 "$work/run.log")"
export PUNCH_SERVER_FINGERPRINT=$fp
# podman-compose's one-off container joined the network under the alias
# `server` too; a fresh network keeps agents from resolving its old address.
compose down >/dev/null 2>&1
say "the server's fingerprint: $fp"
compose up -d >"$work/up.log" 2>&1 || fail "compose up: $(tail -20 "$work/up.log")"
# One-off commands beside an agent (`exec`) reach the server by its
# address: aardvark-dns here sometimes leaves a new network's names
# unanswered for a while (the agents themselves use the name and retry).
server_ip() {
  podman inspect "$(ctr server)" --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}'
}
beside() {
  local c=$1
  shift
  podman exec -e "PUNCH_SERVER=$(server_ip):3478" "$(ctr "$c")" punch-agent "$@"
}
# `punch-agent wait` returns as soon as the worker is online (bounded).
wait_online() {
  beside "$1" wait "$2" --timeout 60 >/dev/null ||
    fail "$2 did not come online; its log: $(podman logs --tail 20 "$(ctr "$2")" 2>&1)
the server's: $(podman logs --tail 20 "$(ctr server)" 2>&1)"
}
wait_online agent-b agent-a
wait_online agent-a agent-b
online=$(api /api/v1/workers | python3 -c 'import json,sys; print(" ".join(sorted(w["worker_id"] for w in json.load(sys.stdin) if w["state"] == "online")))')
[ "$online" = "agent-a agent-b" ] || fail "online at the server: '$online', not 'agent-a agent-b'"
say "server, agent-a and agent-b up; both agents registered ($online)"

# A connect by id, then what the server saw of its session: a direct
# connect relays nothing; a forced relay relays.
connect() {
  local want=$1
  shift
  local j session path relayed
  j=$(beside agent-a "$@" connect agent-b --json) ||
    fail "connect agent-b $*: $j"
  path=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["path"])' "$j")
  session=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["session"])' "$j")
  relayed=$(api /api/v1/connects | python3 -c 'import json,sys
s = sys.argv[1]
print(sum(c.get("relayed_bytes") or 0 for c in json.load(sys.stdin) if c["session"] == s))' "$session")
  [ "$path" = "$want" ] || fail "connect agent-b $*: path $path, not $want ($j)"
  if [ "$want" = direct ] && [ "$relayed" != 0 ]; then fail "a direct connect, but the server relayed $relayed bytes"; fi
  if [ "$want" = relayed ] && [ "$relayed" = 0 ]; then fail "a relayed connect, but the server relayed nothing"; fi
  say "agent-a -> agent-b${*:+ $*}: $path (the server relayed $relayed bytes for session $session)"
}
connect direct
connect relayed --force-relay

for s in server agent-a agent-b; do
  c=$(ctr "$s")
  uid=$(podman exec "$c" id -u)
  [ "$uid" = 10001 ] || fail "$s runs as uid $uid, not 10001"
  podman healthcheck run "$c" >/dev/null 2>&1 || fail "$s: its image's HEALTHCHECK fails"
done
for s in agent-a agent-b; do
  podman exec "$(ctr "$s")" busybox wget -q -O /dev/null http://127.0.0.1:8080/healthz ||
    fail "$s: GET /healthz did not answer 200"
done
say "every container runs as uid 10001; every HEALTHCHECK passes; both agents' /healthz answer 200"

# Restarts: the server keeps its key (the fingerprint agents pin) and the
# id bindings; an agent keeps its key, so the server gives its id back.
podman restart "$(ctr server)" >/dev/null
fp2=$(podman exec "$(ctr server)" punch-server fingerprint | tail -1)
[ "$fp2" = "$fp" ] || fail "the restarted server has fingerprint $fp2, not $fp"
wait_online agent-b agent-a
wait_online agent-a agent-b
podman restart "$(ctr agent-a)" >/dev/null
wait_online agent-b agent-a
connect direct
say "a restarted server keeps its fingerprint and both ids; a restarted agent-a gets its id back"

echo "-- the Cloud Run shape: an agent reaching the server only through a TLS front"
# A CA and the front's certificate for the name `front`, as a managed
# front would present; the agent checks it with --server-ca and the
# server behind it by its pinned key.
tls=$work/front
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$tls/ca.key" -out "$tls/ca.pem" -subj /CN=punch-ci-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$tls/front.key" -out "$tls/front.csr" -subj /CN=front 2>/dev/null
printf 'subjectAltName=DNS:front\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tls/ext"
openssl x509 -req -in "$tls/front.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
  -days 2 -out "$tls/front.pem" -extfile "$tls/ext" 2>/dev/null
chmod 0644 "$tls"/*
# nginx terminates TLS and hands /ws to the server's HTTP listener, as a
# load balancer or Cloud Run's front does.
cat >"$tls/nginx.conf" <<EOF
worker_processes 1;
events { worker_connections 64; }
http {
  access_log off;
  server {
    listen 443 ssl;
    ssl_certificate /front/front.pem;
    ssl_certificate_key /front/front.key;
    location /ws {
      proxy_pass http://$(server_ip):8080;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_read_timeout 3600s;
    }
  }
}
EOF
cat >"$tls/Dockerfile" <<EOF
FROM $base
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/*
CMD ["nginx", "-g", "daemon off;"]
EOF
podman build --format docker --pull=never -t punch-ci-front:dev "$tls" >"$work/build-front.log" 2>&1 ||
  fail "building the nginx front: $(tail -20 "$work/build-front.log")"
net=${project}_default
podman run -d --name "$project-front" --network "$net" --network-alias front \
  -v "$tls:/front:ro" -v "$tls/nginx.conf:/etc/nginx/nginx.conf:ro" punch-ci-front:dev >/dev/null 2>"$work/front.log" ||
  fail "starting the nginx front: $(cat "$work/front.log")"
# Its only way to the server: wss://front/ws (no UDP to the server).
podman run -d --name "$project-cloudrun" --network "$net" -v "$tls:/front:ro" \
  -e PUNCH_SERVER=wss://front/ws -e PUNCH_SERVER_CA=/front/ca.pem \
  -e "PUNCH_SERVER_FINGERPRINT=$fp" -e "PUNCH_TOKEN=$PUNCH_TOKEN" \
  punch-agent:dev serve --id agent-c >/dev/null 2>"$work/cloudrun.log" ||
  fail "starting agent-c: $(cat "$work/cloudrun.log")"
beside agent-a wait agent-c --timeout 60 >/dev/null ||
  fail "agent-c did not come online through the front; its log: $(podman logs --tail 20 "$project-cloudrun" 2>&1)
nginx's: $(podman logs --tail 20 "$project-front" 2>&1)"
transport=$(api /api/v1/workers | python3 -c 'import json,sys; print([w["transport"] for w in json.load(sys.stdin) if w["worker_id"] == "agent-c"][0])')
[ "$transport" = tcp ] || fail "agent-c registered over $transport, not tcp (through the front)"
# It starts on the relay (no UDP to the server) and punches on: the path
# turns direct under a live connection.
j=$(beside agent-a ping agent-c -c 10 -i 0.3 --json 2>/dev/null) || fail "ping agent-c: $j"
paths=$(python3 -c 'import json,sys; print(" ".join(json.loads(sys.argv[1])["paths"]))' "$j")
[ "${paths##* }" = direct ] || fail "agent-a -> agent-c never went direct: $paths"
say "agent-c registered through nginx at wss://front/ws (transport $transport); agent-a -> agent-c paths: $paths"
say "all container checks passed"
