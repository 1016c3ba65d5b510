#!/bin/bash
# Time to first byte on a relayed path: 20 one-off `connect --force-relay`
# on loopback (see BENCHMARKS.md).
T=${PUNCH_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
rm -rf ${WORK:-/tmp/punch-bench}/data; mkdir -p ${WORK:-/tmp/punch-bench}/data
$T/punch-server --listen 127.0.0.1:4478 --no-http --data-dir ${WORK:-/tmp/punch-bench}/data > ${WORK:-/tmp/punch-bench}/server.out 2>${WORK:-/tmp/punch-bench}/server.log &
SP=$!
for i in $(seq 50); do grep -q fingerprint= ${WORK:-/tmp/punch-bench}/server.out && break; sleep 0.1; done
FP=$(grep -o 'fingerprint=[^ ]*' ${WORK:-/tmp/punch-bench}/server.out | cut -d= -f2)
export PUNCH_SERVER=127.0.0.1:4478 PUNCH_SERVER_FINGERPRINT=$FP
$T/punch-agent serve --id bench-b --key-file ${WORK:-/tmp/punch-bench}/data/b.key > ${WORK:-/tmp/punch-bench}/b.out 2>${WORK:-/tmp/punch-bench}/b.log &
BP=$!
for i in $(seq 50); do grep -q "serving as" ${WORK:-/tmp/punch-bench}/b.out && break; sleep 0.1; done
for i in $(seq 20); do $T/punch-agent --force-relay --no-nat-check connect bench-b --json; done | python3 -c '
import json,sys
rows=[json.loads(l) for l in sys.stdin]
c=sorted(r["connect_ms"]+r["rtt_ms"] for r in rows); k=sorted(r["connect_ms"] for r in rows)
print("relayed, %d connects: connect median %.2f ms p95 %.2f; first echo byte back median %.2f ms p95 %.2f; paths %s" % (len(rows), k[len(k)//2], k[int(len(k)*0.95)-1], c[len(c)//2], c[int(len(c)*0.95)-1], set(r["path"] for r in rows)))'
kill $BP $SP; wait $BP $SP 2>/dev/null
