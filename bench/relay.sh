#!/bin/bash
# Relayed throughput on loopback, inside a fresh network namespace:
# punch (direct, --force-relay over UDP, and over the TLS/WebSocket
# channel), iroh's relay (UDP between the two
# probes blocked by nftables so only the relay path exists), coturn
# (turnutils_uclient client-to-client through TURN).
set -u
NS=punchbench-relay-$$  # not plab-…: `punch-lab clean` removes those
ip netns add $NS
trap 'ip netns pids $NS | xargs -r kill 2>/dev/null; sleep 0.5; ip netns del $NS' EXIT
X="ip netns exec $NS"
$X ip link set lo up
$X ip addr add 127.0.0.2/8 dev lo 2>/dev/null
$X ip addr add 127.0.0.3/8 dev lo 2>/dev/null
T=${PUNCH_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
I=${IROH_BIN:-/tmp/iroh-target/release}  # ../shared/peers/iroh-probe built with CARGO_TARGET_DIR=/tmp/iroh-target
W=${WORK:-/tmp/punch-bench}/rb; rm -rf $W; mkdir -p $W
SECS=${SECS:-5}

if [ "${SKIP_PUNCH:-0}" = 0 ]; then
echo "== punch"
# The relay's per-session quota (4 GiB by default) would end a 5 s run each
# way at these speeds; iroh's relay has none.
$X $T/punch-server --listen 127.0.0.1:4478 --no-http --data-dir $W/d --relay-session-mib 65536 ${SERVER_ARGS:-} > $W/server.out 2>$W/server.log &
for i in $(seq 50); do grep -q fingerprint= $W/server.out && break; sleep 0.1; done
FP=$(grep -o 'fingerprint=[^ ]*' $W/server.out | cut -d= -f2)
A="--server 127.0.0.1:4478 --server-fingerprint $FP"
$X $T/punch-agent $A serve --id bench-b --key-file $W/b.key > $W/b.out 2>$W/b.log &
for i in $(seq 50); do grep -q "serving as" $W/b.out && break; sleep 0.1; done
$X $T/punch-agent $A bench bench-b --seconds $SECS --json
$X $T/punch-agent $A --force-relay bench bench-b --seconds $SECS --json
echo "== punch relayed over WebSocket (TLS on TCP; both agents TCP-only)"
W_="--server wss://127.0.0.1:4478/ws --server-fingerprint $FP"
$X $T/punch-agent $W_ serve --id bench-t --key-file $W/t.key > $W/t.out 2>$W/t.log &
for i in $(seq 50); do grep -q "serving as" $W/t.out && break; sleep 0.1; done
$X $T/punch-agent $W_ --force-relay bench bench-t --seconds $SECS --json
echo "== punch relayed, UDP agent to a TCP-only agent"
$X $T/punch-agent $A --force-relay bench bench-t --seconds $SECS --json
fi

echo "== iroh relay (UDP between the probes blocked)"
$X nft -f - <<NFT
table inet rb {
  chain out {
    type filter hook output priority 0;
    ip saddr 127.0.0.2 ip daddr 127.0.0.3 meta l4proto udp drop
    ip saddr 127.0.0.3 ip daddr 127.0.0.2 meta l4proto udp drop
  }
}
NFT
$X $I/relay --addr 127.0.0.1:3340 --max-runtime-s 300 > $W/relay.json 2>$W/relay.log &
for i in $(seq 100); do [ -s $W/relay.json ] && break; sleep 0.1; done
URL=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["relay_url"])' $W/relay.json)
$X $I/probe listen --relay $URL --bind 127.0.0.2:0 --max-runtime-s 300 > $W/listen.json 2>$W/listen.log &
for i in $(seq 200); do [ -s $W/listen.json ] && break; sleep 0.1; done
PEER=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["endpoint_id"])' $W/listen.json)
$X timeout 200 $I/probe bench-throughput --relay $URL --peer $PEER --bind 127.0.0.3:0 --direct-timeout-s 2 --bytes ${IROH_BYTES:-1000000000} 2>$W/dial.log | python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); print(json.dumps({"remote_addr": d.get("remote_addr"), "direct": d.get("direct"), "throughput": d.get("throughput")}))'

echo "== coturn (turnutils_uclient -y, 8 clients, 1200-byte messages)"
$X turnserver --listening-ip 127.0.0.1 --listening-port 3479 --relay-ip 127.0.0.1 --no-tls --no-dtls --no-cli \
  --lt-cred-mech --user u:p --realm lab --allow-loopback-peers -n --log-file stdout --pidfile $W/turn.pid --min-port 50000 --max-port 51000 > $W/turn.log 2>&1 &
sleep 3
$X timeout 120 turnutils_uclient -y -u u -w p -p 3479 -m ${TURN_M:-8} -l 1200 -n ${TURN_N:-20000} -z 0 -c 127.0.0.1 > $W/uclient.log 2>&1
grep -E "Total transmit time|tot_send_bytes|tot_recv_bytes|Total lost|send_dt|recv_dt" $W/uclient.log | tail -8
