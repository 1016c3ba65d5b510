#!/bin/bash
# `punch-agent get` throughput on loopback, inside a fresh network
# namespace: one large file (FILE_MB, default 2048) and a tree of many
# small files (FILES, default 10000, of SMALL_BYTES, default 4096), beside
# `punch-agent bench` on the same path. Prints one JSON line per figure.
#
# With SENDME=/path/to/sendme, iroh's sendme moves the same file and tree
# in the same namespace (`--relay disabled`; the namespace has only
# loopback, so nothing it tries to reach off the machine can be reached).
set -u
NS=punchbench-files-$$  # not plab-…: `punch-lab clean` removes those
ip netns add $NS
trap 'ip netns pids $NS | xargs -r kill 2>/dev/null; sleep 0.5; ip netns del $NS' EXIT
X="ip netns exec $NS"
$X ip link set lo up
T=${PUNCH_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
W=${WORK:-/tmp/punch-bench}/files; rm -rf $W; mkdir -p $W/share/small $W/one $W/dl
FILE_MB=${FILE_MB:-2048}
FILES=${FILES:-10000}
SMALL_BYTES=${SMALL_BYTES:-4096}
SECS=${SECS:-5}

echo "== making the share: one ${FILE_MB} MB file, ${FILES} files of ${SMALL_BYTES} bytes"
head -c $((FILE_MB * 1000000)) /dev/urandom > $W/one/big.bin
python3 - "$W/share/small" "$FILES" "$SMALL_BYTES" <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}"), "wb") as f:
        f.write(os.urandom(size))
PY

$X $T/punch-server --listen 127.0.0.1:4478 --no-http --data-dir $W/d > $W/server.out 2>$W/server.log &
for i in $(seq 50); do grep -q fingerprint= $W/server.out && break; sleep 0.1; done
FP=$(grep -o 'fingerprint=[^ ]*' $W/server.out | cut -d= -f2)
A="--server 127.0.0.1:4478 --server-fingerprint $FP"
# Two sharers: a share holds at most 10,000 files, the tree alone fills
# one. Their hash trees go to their own data dir, not the user's.
$X env XDG_DATA_HOME=$W/xdg $T/punch-agent $A serve --id sharer --key-file $W/b.key --share $W/share > $W/b.out 2>$W/b.log &
$X env XDG_DATA_HOME=$W/xdg $T/punch-agent $A serve --id sharer-one --key-file $W/c.key --share $W/one > $W/c.out 2>$W/c.log &
for i in $(seq 50); do grep -q "serving as" $W/b.out && grep -q "serving as" $W/c.out && break; sleep 0.1; done

echo "== bench (same path)"
$X $T/punch-agent $A bench sharer --seconds $SECS --json

echo "== get: the large file, hash tree not cached yet (the sharer hashes it first)"
$X $T/punch-agent $A get sharer-one big.bin -o $W/dl/big1 --json | tail -1
echo "== get: the large file again (tree cached)"
$X $T/punch-agent $A get sharer-one big.bin -o $W/dl/big2 --json | tail -1
cmp -s $W/one/big.bin $W/dl/big2 || echo '{"error": "big.bin differs"}'
rm -f $W/dl/big1 $W/dl/big2

echo "== get: the tree of small files (first listing; trees made on demand)"
$X $T/punch-agent $A get sharer small/ -o $W/dl/small1 --json | tail -1
echo "== get: the tree again into a new directory (trees cached)"
$X $T/punch-agent $A get sharer small/ -o $W/dl/small2 --json | tail -1
echo "== get: the tree again into the same directory (every file complete: all skipped)"
$X $T/punch-agent $A get sharer small/ -o $W/dl/small2 --json | tail -1
diff -rq $W/share/small $W/dl/small2 > /dev/null || echo '{"error": "the tree differs"}'

if [ -n "${SENDME:-}" ]; then
  for what in big.bin small; do
    echo "== sendme: $what"
    rm -rf $W/sr; mkdir -p $W/sr
    src=$W/share; [ $what = big.bin ] && src=$W/one
    (cd $src && exec $X $SENDME send --relay disabled --ticket-type addresses --no-progress $what > $W/sendme-send.out 2>$W/sendme-send.log) &
    SPID=$!
    for i in $(seq 600); do grep -q "sendme receive" $W/sendme-send.out 2>/dev/null && break; sleep 0.1; done
    TICKET=$(grep -o 'sendme receive [^ ]*' $W/sendme-send.out | head -1 | cut -d' ' -f3)
    START=$(date +%s.%N)
    (cd $W/sr && $X $SENDME receive --relay disabled --no-progress "$TICKET" > $W/sendme-recv.out 2>&1)
    END=$(date +%s.%N)
    kill -INT $SPID 2>/dev/null; wait $SPID 2>/dev/null
    BYTES=$(du -sb $W/sr/$what | cut -f1)
    python3 -c 'import json,sys; b,s=int(sys.argv[2]),float(sys.argv[3]); print(json.dumps({"sendme": sys.argv[1], "bytes": b, "seconds": round(s, 3), "mb_per_s": round(b / 1e6 / s, 1)}))' "$what" "$BYTES" "$(echo "$END - $START" | bc)"
    diff -rq $src/$what $W/sr/$what > /dev/null || echo '{"error": "sendme copy differs"}'
  done
fi
rm -rf $W/share $W/one $W/dl $W/sr
