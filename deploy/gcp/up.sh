#!/usr/bin/env bash
# Creates what punch needs on Google Cloud: a VPC with a subnet for the
# server VM and one for Cloud Run agents, a Cloud Router and Cloud NAT for
# the agents (Endpoint-Independent Mapping, fixed ports per instance), a
# static external IP and firewall rule for the server's UDP and TCP port,
# the server VM, the token in Secret Manager, a service account for the
# agents and an Artifact Registry repository. Safe to run again: it skips
# what exists. Next: image.sh, server.sh, agent.sh (deploy/README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=config.sh
. "$here/config.sh"

echo "== APIs"
g services enable compute.googleapis.com run.googleapis.com \
  artifactregistry.googleapis.com secretmanager.googleapis.com iap.googleapis.com

echo "== VPC and subnets"
have compute networks describe "$NETWORK" ||
  g compute networks create "$NETWORK" --subnet-mode custom
have compute networks subnets describe "$SERVER_SUBNET" --region "$REGION" ||
  g compute networks subnets create "$SERVER_SUBNET" --network "$NETWORK" \
    --region "$REGION" --range "$SERVER_RANGE"
have compute networks subnets describe "$AGENT_SUBNET" --region "$REGION" ||
  g compute networks subnets create "$AGENT_SUBNET" --network "$NETWORK" \
    --region "$REGION" --range "$AGENT_RANGE"

echo "== Cloud Router and Cloud NAT (agents' subnet only)"
have compute routers describe "$ROUTER" --region "$REGION" ||
  g compute routers create "$ROUTER" --network "$NETWORK" --region "$REGION"
# Endpoint-Independent Mapping: one public port per agent socket, whatever
# the destination, so the address the server sees is the one peers can
# reach. It excludes dynamic port allocation (Cloud NAT refuses both), hence
# a fixed number of ports per instance.
have compute routers nats describe "$NAT" --router "$ROUTER" --region "$REGION" ||
  g compute routers nats create "$NAT" --router "$ROUTER" --region "$REGION" \
    --nat-custom-subnet-ip-ranges "$AGENT_SUBNET" \
    --auto-allocate-nat-external-ips \
    --enable-endpoint-independent-mapping \
    --no-enable-dynamic-port-allocation \
    --min-ports-per-vm "$NAT_MIN_PORTS" \
    --udp-idle-timeout "${NAT_UDP_IDLE}s"

echo "== Static external IP and firewall"
have compute addresses describe "$ADDRESS" --region "$REGION" ||
  g compute addresses create "$ADDRESS" --region "$REGION"
rules="udp:$SERVER_PORT,tcp:$SERVER_PORT"
[ "$TCP_PORT" = "$SERVER_PORT" ] || rules="$rules,tcp:$TCP_PORT"
have compute firewall-rules describe punch-server-in ||
  g compute firewall-rules create punch-server-in --network "$NETWORK" \
    --direction INGRESS --action ALLOW --rules "$rules" \
    --source-ranges 0.0.0.0/0 --target-tags punch-server
# SSH only through IAP's TCP forwarding (its fixed source range), for
# server.sh; the VM needs no public SSH.
have compute firewall-rules describe punch-iap-ssh ||
  g compute firewall-rules create punch-iap-ssh --network "$NETWORK" \
    --direction INGRESS --action ALLOW --rules tcp:22 \
    --source-ranges 35.235.240.0/20 --target-tags punch-server
# Agent to agent inside the agents' subnet, for LAN candidates. Only Cloud
# Run worker pools take such Direct VPC ingress; services never receive it.
have compute firewall-rules describe punch-agents-lan ||
  g compute firewall-rules create punch-agents-lan --network "$NETWORK" \
    --direction INGRESS --action ALLOW --rules udp \
    --source-ranges "$AGENT_RANGE" --destination-ranges "$AGENT_RANGE"

echo "== Server VM"
# No service account: the server calls no Google API.
have compute instances describe "$VM" --zone "$ZONE" ||
  g compute instances create "$VM" --zone "$ZONE" --machine-type "$MACHINE" \
    --subnet "$SERVER_SUBNET" --address "$(server_ip)" --tags punch-server \
    --image-family debian-12 --image-project debian-cloud \
    --no-service-account --no-scopes \
    --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring

echo "== Token, agents' service account, image repository"
if ! have secrets describe "$TOKEN_SECRET"; then
  # No trailing newline: the server and the agents must read the same bytes.
  printf %s "$(openssl rand -hex 32)" |
    g secrets create "$TOKEN_SECRET" --data-file=- --labels app=punch
fi
sa="$AGENT_SA@$PROJECT.iam.gserviceaccount.com"
have iam service-accounts describe "$sa" ||
  g iam service-accounts create "$AGENT_SA" --display-name "punch agents"
# A new service account takes a few seconds to become visible to IAM.
for try in 1 2 3 4 5 6; do
  g secrets add-iam-policy-binding "$TOKEN_SECRET" --member "serviceAccount:$sa" \
    --role roles/secretmanager.secretAccessor >/dev/null && break
  [ "$try" = 6 ] && exit 1
  sleep 5
done
have artifacts repositories describe "$REPO" --location "$REGION" ||
  g artifacts repositories create "$REPO" --repository-format docker \
    --location "$REGION" --labels app=punch

echo
echo "server address: $(server_ip) (UDP $SERVER_PORT, TCP $TCP_PORT)"
echo "next: $here/image.sh, then $here/server.sh, then $here/agent.sh WORKER_ID"
