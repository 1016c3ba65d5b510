#!/usr/bin/env bash
# Builds the agent image and pushes it to the Artifact Registry repository
# up.sh created, and extracts the punch-server binary for the VM (built on
# Debian 12, the VM's release) into deploy/gcp/out/. Needs Docker with
# BuildKit. Prints the image name agent.sh uses by default.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=config.sh
. "$here/config.sh"

uri=$(registry)
tag=${TAG:-$(git -C "$root" rev-parse --short HEAD)}
image="$uri/punch-agent:$tag"

g auth configure-docker "${uri%%/*}" >/dev/null
docker build -f "$root/deploy/docker/agent.Dockerfile" -t "$image" "$root"
docker push "$image"
docker build -f "$root/deploy/docker/server.Dockerfile" --target bin \
  -o "$here/out" "$root"

echo "agent image: $image"
echo "server binary: $here/out/punch-server"
