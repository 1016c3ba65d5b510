#!/bin/bash
# STUN Binding rate: punch-server, coturn and a plain UDP echo, each pinned to
# core 1, the load generator to core 0 (see BENCHMARKS.md).
T=${PUNCH_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
rm -rf ${WORK:-/tmp/punch-bench}/sd; mkdir -p ${WORK:-/tmp/punch-bench}/sd
taskset -c 1 $T/punch-server --listen 127.0.0.1:34800 --no-http --data-dir ${WORK:-/tmp/punch-bench}/sd >/dev/null 2>&1 & P1=$!
taskset -c 1 turnserver --listening-ip 127.0.0.1 --listening-port 34801 --stun-only --no-tls --no-dtls --no-cli -n >/dev/null 2>&1 & P2=$!
taskset -c 1 $T/punch-lab udp-echo --listen 127.0.0.1:34802 >/dev/null 2>&1 & P3=$!
sleep 1
taskset -c 0 $T/punch-lab stun-bench --target 127.0.0.1:34800
taskset -c 0 $T/punch-lab stun-bench --target 127.0.0.1:34801
taskset -c 0 $T/punch-lab stun-bench --target 127.0.0.1:34802 --echo
kill $P1 $P2 $P3
