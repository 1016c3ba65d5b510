#!/usr/bin/env bash
# Installs punch-server on the VM up.sh created, as the systemd unit in
# deploy/systemd, with the token from Secret Manager, then prints the
# fingerprint agents pin. Run it again to upgrade (the key stays).
# SERVER_BIN: the binary to install (default: deploy/gcp/out/punch-server
# from image.sh). It must run on Debian 12 (glibc 2.36).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=config.sh
. "$here/config.sh"

bin=${SERVER_BIN:-$here/out/punch-server}
[ -x "$bin" ] || { echo "no server binary at $bin: run $here/image.sh or set SERVER_BIN" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077
{
  printf 'PUNCH_TOKEN=%s\n' "$(g secrets versions access latest --secret "$TOKEN_SECRET")"
  printf 'PUNCH_LISTEN=0.0.0.0:%s\n' "$SERVER_PORT"
  printf 'PUNCH_TCP_LISTEN=0.0.0.0:%s\n' "$TCP_PORT"
} >"$tmp/env"
cp "$bin" "$tmp/punch-server"
cp "$here/../systemd/punch-server.service" "$tmp/"

ssh_vm() { g compute ssh "$VM" --zone "$ZONE" --tunnel-through-iap "$@"; }
g compute scp --zone "$ZONE" --tunnel-through-iap \
  "$tmp/punch-server" "$tmp/punch-server.service" "$tmp/env" "$VM:/tmp/"

# Unquoted delimiter on purpose: TCP_PORT expands here, before sending.
ssh_vm --command 'sudo bash -s' <<REMOTE
set -eu
id punch >/dev/null 2>&1 ||
  useradd --system --no-create-home --shell /usr/sbin/nologin punch
install -m 0755 /tmp/punch-server /usr/local/bin/punch-server
install -d -m 0755 /etc/punch-server
install -m 0600 /tmp/env /etc/punch-server/env
install -m 0644 /tmp/punch-server.service /etc/systemd/system/punch-server.service
rm -f /tmp/punch-server /tmp/env /tmp/punch-server.service
# Man pages and bash completion from the binary itself.
/usr/local/bin/punch-server man --out /usr/local/share/man/man1 >/dev/null
install -d /usr/local/share/bash-completion/completions
/usr/local/bin/punch-server completions bash >/usr/local/share/bash-completion/completions/punch-server
if [ "$TCP_PORT" -lt 1024 ]; then
  # A port below 1024 needs this one capability, and only that.
  install -d /etc/systemd/system/punch-server.service.d
  printf '[Service]\nAmbientCapabilities=CAP_NET_BIND_SERVICE\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n' \
    >/etc/systemd/system/punch-server.service.d/low-port.conf
else
  rm -f /etc/systemd/system/punch-server.service.d/low-port.conf
fi
systemctl daemon-reload
systemctl enable punch-server >/dev/null 2>&1
systemctl restart punch-server
sleep 2
systemctl is-active punch-server
REMOTE

fp=$(ssh_vm --command 'sudo -u punch /usr/local/bin/punch-server fingerprint --data-dir /var/lib/punch-server')
echo "server:      $(server_ip):$SERVER_PORT"
echo "fingerprint: $fp"
echo "next: $here/agent.sh WORKER_ID"
