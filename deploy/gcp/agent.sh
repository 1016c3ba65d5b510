#!/usr/bin/env bash
# Deploys one punch agent on Cloud Run: agent.sh WORKER_ID
#   AGENT_KIND=service (default): a Cloud Run service (agent-service.yaml),
#     always one instance, CPU always allocated, Direct VPC egress of all
#     traffic through the Cloud NAT up.sh made.
#   AGENT_KIND=worker-pool: a Cloud Run worker pool (preview, gcloud beta);
#     unlike services it takes Direct VPC ingress, so agents behind the same
#     NAT can reach each other on their private (LAN) candidates.
# The agent's key is made here once and kept in Secret Manager: the server
# binds WORKER_ID to it. IMAGE defaults to what image.sh pushed for HEAD;
# FINGERPRINT to what the server VM reports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=config.sh
. "$here/config.sh"

id=${1:-}
# Cloud Run names take lowercase letters, digits and hyphens; ids are a
# subset of what punch allows so that the id names the service.
if ! [[ $id =~ ^[a-z][a-z0-9-]{0,30}[a-z0-9]$ ]]; then
  echo "usage: $0 WORKER_ID   (2-32 of a-z, 0-9, '-', starting with a letter)" >&2
  exit 2
fi
service="punch-agent-$id"
key_secret="punch-agent-key-$id"
sa="$AGENT_SA@$PROJECT.iam.gserviceaccount.com"
image=${IMAGE:-$(registry)/punch-agent:$(git -C "$root" rev-parse --short HEAD)}
fp=${FINGERPRINT:-$(g compute ssh "$VM" --zone "$ZONE" --tunnel-through-iap \
  --command 'sudo -u punch /usr/local/bin/punch-server fingerprint --data-dir /var/lib/punch-server')}
ip=$(server_ip)
server="$ip:$SERVER_PORT"
server_tcp="wss://$ip:$TCP_PORT/ws"

if ! have secrets describe "$key_secret"; then
  # The PKCS#8 PEM Ed25519 key punch-agent itself writes with --key-file.
  openssl genpkey -algorithm ed25519 |
    g secrets create "$key_secret" --data-file=- --labels app=punch
fi
g secrets add-iam-policy-binding "$key_secret" --member "serviceAccount:$sa" \
  --role roles/secretmanager.secretAccessor >/dev/null

if [ "$AGENT_KIND" = worker-pool ]; then
  g beta run worker-pools deploy "$service" --region "$REGION" --image "$image" \
    --instances 1 --service-account "$sa" \
    --network "$NETWORK" --subnet "$AGENT_SUBNET" --vpc-egress all-traffic \
    --labels app=punch-agent --args serve \
    --set-env-vars "PUNCH_SERVER=$server,PUNCH_SERVER_TCP=$server_tcp,PUNCH_SERVER_FINGERPRINT=$fp,PUNCH_ID=$id,PUNCH_KEY_FILE=/secrets/key/agent.key" \
    --set-secrets "PUNCH_TOKEN=$TOKEN_SECRET:latest,/secrets/key/agent.key=$key_secret:latest"
  exit
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -e "s|\${SERVICE}|$service|g" \
  -e "s|\${NETWORK}|$NETWORK|g" \
  -e "s|\${SUBNET}|$AGENT_SUBNET|g" \
  -e "s|\${SERVICE_ACCOUNT}|$sa|g" \
  -e "s|\${IMAGE}|$image|g" \
  -e "s|\${SERVER}|$server|g" \
  -e "s|\${SERVER_TCP}|$server_tcp|g" \
  -e "s|\${FINGERPRINT}|$fp|g" \
  -e "s|\${WORKER_ID}|$id|g" \
  -e "s|\${TOKEN_SECRET}|$TOKEN_SECRET|g" \
  -e "s|\${KEY_SECRET}|$key_secret|g" \
  "$here/agent-service.yaml" >"$tmp/service.yaml"
if grep -n '[$][{]' "$tmp/service.yaml" >&2; then
  echo "agent-service.yaml has a placeholder agent.sh does not fill" >&2
  exit 1
fi
g run services replace "$tmp/service.yaml" --region "$REGION"
echo "deployed $service as worker id $id (server $server)"
