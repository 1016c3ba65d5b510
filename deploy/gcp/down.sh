#!/usr/bin/env bash
# Deletes everything up.sh, server.sh and agent.sh created, agents first.
# Goes on past failures and lists them at the end. The server's key and
# bindings go with the VM's disk; the agents' keys with their secrets.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=config.sh
. "$here/config.sh"

failed=()
del() {
  echo "-- $*"
  g "$@" || failed+=("$*")
}

for s in $(g run services list --region "$REGION" \
  --filter 'metadata.labels.app=punch-agent' --format 'value(metadata.name)'); do
  del run services delete "$s" --region "$REGION"
done
for p in $(g beta run worker-pools list --region "$REGION" \
  --filter 'labels.app=punch-agent' --format 'value(name)' 2>/dev/null); do
  del beta run worker-pools delete "${p##*/}" --region "$REGION"
done
del compute instances delete "$VM" --zone "$ZONE"
del compute firewall-rules delete punch-server-in punch-iap-ssh punch-agents-lan
del compute addresses delete "$ADDRESS" --region "$REGION"
del compute routers nats delete "$NAT" --router "$ROUTER" --region "$REGION"
del compute routers delete "$ROUTER" --region "$REGION"
del compute networks subnets delete "$SERVER_SUBNET" --region "$REGION"
# Cloud Run may hold on to the agents' subnet addresses for an hour or two
# after its services are gone: if this fails, run down.sh again later.
del compute networks subnets delete "$AGENT_SUBNET" --region "$REGION"
del compute networks delete "$NETWORK"
for s in $(g secrets list --filter 'labels.app=punch' --format 'value(name)'); do
  del secrets delete "${s##*/}"
done
del iam service-accounts delete "$AGENT_SA@$PROJECT.iam.gserviceaccount.com"
del artifacts repositories delete "$REPO" --location "$REGION"

if [ ${#failed[@]} -gt 0 ]; then
  printf 'not deleted (gone already, or still in use):\n' >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all deleted"
