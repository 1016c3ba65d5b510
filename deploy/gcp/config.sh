# shellcheck shell=bash
# Settings shared by the deploy/gcp scripts, sourced by each. Every one can
# be overridden from the environment, e.g. REGION=us-central1 ./up.sh.

PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REGION=${REGION:-europe-west1}
ZONE=${ZONE:-$REGION-b}

NETWORK=${NETWORK:-punch}
# The server VM has its own external IP and does not use Cloud NAT.
SERVER_SUBNET=${SERVER_SUBNET:-punch-server}
SERVER_RANGE=${SERVER_RANGE:-10.20.0.0/24}
# Cloud Run instances with Direct VPC egress take their addresses here (it
# reserves them in blocks of 16 and wants room to scale: /26 at the least).
AGENT_SUBNET=${AGENT_SUBNET:-punch-agents}
AGENT_RANGE=${AGENT_RANGE:-10.20.16.0/20}

ROUTER=${ROUTER:-punch-router}
NAT=${NAT:-punch-nat}
# Ports each VM or Cloud Run instance gets from the NAT. With
# Endpoint-Independent Mapping an agent's one UDP socket takes one port for
# every destination; the rest is for the workload's own connections.
# 64512 / NAT_MIN_PORTS instances fit on one NAT IP (63 at 1024); the NAT adds
# IPs by itself (auto-allocation).
NAT_MIN_PORTS=${NAT_MIN_PORTS:-1024}
# Seconds an idle UDP mapping lives (Cloud NAT's default, 30). Agents keep
# alive every 5 s towards the server and every 1 s towards peers.
NAT_UDP_IDLE=${NAT_UDP_IDLE:-30}

ADDRESS=${ADDRESS:-punch-server-ip}
VM=${VM:-punch-server}
MACHINE=${MACHINE:-e2-small}
# UDP port of the server (QUIC signaling, STUN, relay) and its TCP channel
# (TLS + WebSocket for agents whose UDP is blocked). TCP_PORT=443 passes
# firewalls that allow only HTTPS; agent.sh gives agents PUNCH_SERVER_TCP
# to match, agents elsewhere need it too.
SERVER_PORT=${SERVER_PORT:-3478}
TCP_PORT=${TCP_PORT:-$SERVER_PORT}

REPO=${REPO:-punch}
AGENT_SA=${AGENT_SA:-punch-agent}
TOKEN_SECRET=${TOKEN_SECRET:-punch-token}
# Cloud Run service (default) or worker pool (preview; takes Direct VPC
# ingress, so two agents behind the same NAT can use their LAN candidates).
AGENT_KIND=${AGENT_KIND:-service}

if [ -z "$PROJECT" ]; then
  echo "no project: set PROJECT or run 'gcloud config set project ID'" >&2
  exit 2
fi

# Every gcloud call names the project and never prompts.
g() { gcloud --project "$PROJECT" --quiet "$@"; }

# True when the resource exists: have compute networks describe NAME
have() { g "$@" >/dev/null 2>&1; }

server_ip() {
  g compute addresses describe "$ADDRESS" --region "$REGION" --format 'value(address)'
}

# Artifact Registry path of the repository (its registry host comes from
# gcloud, so no host is hard-coded here).
registry() {
  g artifacts repositories describe "$REPO" --location "$REGION" --format 'value(registryUri)'
}
