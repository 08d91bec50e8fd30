#!/usr/bin/env bash
# Runs one load scenario against a fresh release node and stops everything it started.
#
#   bench/run.sh idle   [loadgen idle args]     e.g. --conns 19000
#   bench/run.sh fanout [loadgen fanout args]   e.g. --subs 2000 --rate 500
#
# The node's RSS and CPU are sampled from /proc by the load generator (--node-pid).
# Environment: ROOMCAST_* variables are passed to the node (e.g. ROOMCAST_COMPRESSION=false).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:?usage: bench/run.sh idle|fanout [loadgen args]}"
shift

cargo build --release -q -p roomcast-gateway -p roomcast-loadgen
bin=target/release

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Start a node on a free port; print its address.
start_node() {
  local out; out=$(mktemp)
  ROOMCAST_LISTEN=127.0.0.1:0 ROOMCAST_LOG=${ROOMCAST_LOG:-warn} "$bin/roomcast" >"$out" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 100); do
    if grep -q "listening on" "$out"; then
      NODE_PID=$pid
      NODE_URL=$(grep -o 'ws://[^ ]*' "$out" | head -1)
      return 0
    fi
    sleep 0.1
  done
  echo "node did not start:"; cat "$out"; exit 1
}

start_node
echo "node pid $NODE_PID at $NODE_URL ($(nproc) cores, $(uname -r))"
case "$scenario" in
  idle)   "$bin/loadgen" idle --url "$NODE_URL" --node-pid "$NODE_PID" "$@" ;;
  fanout) "$bin/loadgen" fanout --url "$NODE_URL" --node-pid "$NODE_PID" "$@" ;;
  *) echo "unknown scenario $scenario (idle, fanout)"; exit 2 ;;
esac
