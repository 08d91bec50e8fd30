#!/usr/bin/env bash
# Runs one load scenario against fresh release nodes it starts, samples their RSS and CPU
# from /proc, and stops everything it started (on any exit).
#
#   bench/run.sh SCENARIO [run.sh options] [loadgen options]
#
# Scenarios (loadgen options: `target/release/loadgen SCENARIO --help`):
#   idle            N idle subscribed connections     e.g. --conns 19000
#   fanout          one room, N subscribers            e.g. --subs 2000 --rate 500
#   storm           --mode rate: connections/s         e.g. --mode rate --conns 10000 --sources 127.0.0.2,127.0.0.3
#                   --mode reconnect: reconnect storm  e.g. --mode reconnect --conns 10000
#   compression     chat JSON with/without deflate     e.g. --subs 200 --rate 500
#   cluster         publishers on node 1, subscribers on the others (default --nodes 2;
#                   --nodes 1: all on one node, a same-node control)
#   socketio-idle   `idle` against roomcast, then against Socket.IO 4 (bench/socketio), ratios
#   socketio-fanout `fanout` likewise
#
# run.sh options (everything else goes to loadgen):
#   --nodes N          roomcast nodes to start (default 1; cluster 2); URLs and pids go to loadgen
#   --broker B         memory (default), redis or nats: starts redis-server / nats-server on a
#                      free port and gives it to every node (ROOMCAST_BROKER)
#   --procs K          idle: K loadgen processes, each with --conns connections from its own
#                      source addresses (127.0.K.1, 127.0.K.2); RSS per connection over all
#   --signal S         storm reconnect: kill (SIGKILL, default) or term (SIGTERM: close 4000)
#   --failover         storm reconnect: clients reconnect to a second node (no restart)
#   --sio-deflate      socketio-*: start the Socket.IO server with perMessageDeflate
#
# Environment: ROOMCAST_* variables are passed to the nodes (e.g. ROOMCAST_COMPRESSION=false,
# ROOMCAST_CONFIG=bench/bench.toml); BENCH_ROOMCAST_BIN runs another build of the node.
# Only loopback addresses are used. Every loop here is bounded in count and time.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bench/run.sh idle|fanout|storm|compression|cluster|socketio-idle|socketio-fanout [options]"
scenario="${1:?$usage}"
shift

nodes="" broker=memory procs=1 signal=kill failover=0 sio_deflate=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes N}"; shift 2 ;;
    --broker) broker="${2:?--broker memory|redis|nats}"; shift 2 ;;
    --procs) procs="${2:?--procs K}"; shift 2 ;;
    --signal) signal="${2:?--signal kill|term}"; shift 2 ;;
    --failover) failover=1; shift ;;
    --sio-deflate) sio_deflate=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$signal" in kill) sig=KILL ;; term) sig=TERM ;; *) echo "--signal kill|term, not $signal" >&2; exit 2 ;; esac
case "$scenario" in
  idle|fanout|storm|compression|socketio-idle|socketio-fanout) nodes="${nodes:-1}" ;;
  cluster) nodes="${nodes:-2}" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
arg_value() { # the value after option $1 in args, if any
  local i; for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[$i]}" = "$1" ] && [ $((i + 1)) -lt ${#args[@]} ]; then echo "${args[$((i + 1))]}"; return 0; fi
  done; return 1
}

echo "== building (release)"
cargo build --release -q -p roomcast-gateway -p roomcast-loadgen
bin="${CARGO_TARGET_DIR:-target}/release"
node_bin="${BENCH_ROOMCAST_BIN:-$bin/roomcast}"   # another build of the node, to compare
work=$(mktemp -d)
echo "== $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); logs in $work"

started=()      # every process this script started (killed on exit)
touch "$work/pids"   # processes the sampler watches: "pid name"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${started[@]+"${started[@]}"}"; do kill "$p" 2>/dev/null || true; done
  for p in "${started[@]+"${started[@]}"}"; do wait "$p" 2>/dev/null || true; done
  [ -s "$work/samples" ] && summarize_samples
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- /proc sampling: every second, "time pid name rss_kib cpu_ticks" for each watched pid.
sampler() {
  local end=$((SECONDS + 7200)) pid name rss ticks
  while [ $SECONDS -lt $end ]; do
    while read -r pid name; do
      [ -r "/proc/$pid/stat" ] || continue
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
      ticks=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
      echo "$(date +%s.%N) $pid $name ${rss:-0} ${ticks:-0}" >>"$work/samples"
    done <"$work/pids"
    sleep 1
  done
}
summarize_samples() {
  echo "== /proc samples (every 1 s; CPU averaged over each process's sampled lifetime)"
  awk -v hz="$(getconf CLK_TCK)" '
    { if (!($2 in t0)) { t0[$2] = $1; c0[$2] = $5; name[$2] = $3; order[n++] = $2 }
      t1[$2] = $1; c1[$2] = $5; if ($4 > peak[$2]) peak[$2] = $4 }
    END { for (i = 0; i < n; i++) { p = order[i]; dt = t1[p] - t0[p];
      printf "%-12s pid %-8s peak RSS %8.1f MiB   CPU %6.2f s", name[p], p, peak[p] / 1024, (c1[p] - c0[p]) / hz;
      if (dt > 0) printf " = %.2f cores over %.0f s", (c1[p] - c0[p]) / hz / dt, dt; printf "\n" } }' "$work/samples"
}
sampler & started+=($!)

# --- free loopback port (bounded tries)
free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  echo "no free port found" >&2; return 1
}
wait_port() { # port seconds
  local i; for i in $(seq 1 $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1
  done; return 1
}

# --- brokers
broker_env=()
case "$broker" in
  memory) ;;
  redis)
    command -v redis-server >/dev/null || { echo "--broker redis: redis-server is not installed" >&2; exit 1; }
    port=$(free_port)
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no >"$work/redis.log" 2>&1 & started+=($!)
    echo "$! redis" >>"$work/pids"
    wait_port "$port" 10 || { echo "redis-server did not start:"; cat "$work/redis.log"; exit 1; }
    broker_env=(ROOMCAST_BROKER="redis://127.0.0.1:$port")
    echo "== redis-server on 127.0.0.1:$port" ;;
  nats)
    command -v nats-server >/dev/null || { echo "--broker nats: nats-server is not installed" >&2; exit 1; }
    port=$(free_port)
    nats-server -a 127.0.0.1 -p "$port" -js -sd "$work/jetstream" >"$work/nats.log" 2>&1 & started+=($!)
    echo "$! nats" >>"$work/pids"
    wait_port "$port" 10 || { echo "nats-server did not start:"; cat "$work/nats.log"; exit 1; }
    broker_env=(ROOMCAST_BROKER="nats://127.0.0.1:$port")
    echo "== nats-server on 127.0.0.1:$port (JetStream)" ;;
  *) echo "--broker memory|redis|nats, not $broker" >&2; exit 2 ;;
esac

# --- roomcast nodes: start_node INDEX [LISTEN]; sets NODE_PID[INDEX], NODE_URL[INDEX], NODE_ADDR[INDEX]
NODE_PID=() NODE_URL=() NODE_ADDR=()
start_node() {
  local k=$1 listen=${2:-127.0.0.1:0} out="$work/node$1.$(date +%s%N).log" pid
  env ROOMCAST_LISTEN="$listen" ROOMCAST_LOG="${ROOMCAST_LOG:-warn}" ROOMCAST_NODE_ID="bench-$k" \
    "${broker_env[@]+"${broker_env[@]}"}" "$node_bin" >"$out" 2>&1 &
  pid=$!
  started+=("$pid")
  for _ in $(seq 1 100); do
    if grep -q "listening on" "$out"; then
      NODE_PID[k]=$pid
      NODE_URL[k]=$(grep -o 'ws://[^ ]*' "$out" | head -1)
      NODE_ADDR[k]=$(echo "${NODE_URL[k]}" | sed 's|ws://||; s|/.*||')
      echo "$pid roomcast-$k" >>"$work/pids"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "node $k did not start (broker: $broker):"; cat "$out"
  if [ "$broker" != memory ]; then
    echo "(the $broker broker may not be implemented in this build yet: see the node's message above)"
  fi
  exit 1
}
stop_pid() { # pid: SIGTERM, wait at most 15 s, then SIGKILL
  local p=$1
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
join_by() { local IFS=,; echo "$*"; }

start_nodes() {
  local k
  for k in $(seq 0 $((nodes - 1))); do start_node "$k"; done
  URLS=$(join_by "${NODE_URL[@]}")
  PIDS=$(join_by "${NODE_PID[@]}")
  echo "== $nodes roomcast node(s): $URLS (pids $PIDS, broker $broker)"
}

# --- Socket.IO server (bench/socketio)
sio_install() {
  command -v node >/dev/null && command -v npm >/dev/null \
    || { echo "socketio-*: node and npm are needed (e.g. apt-get install nodejs npm)" >&2; exit 1; }
  if [ ! -d bench/socketio/node_modules/socket.io ]; then
    echo "== npm ci in bench/socketio"
    (cd bench/socketio && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; }) \
      || { echo "npm could not install bench/socketio's packages" >&2; exit 1; }
  fi
}
SIO_PID="" SIO_URL=""
start_sio() {
  local out="$work/socketio.log" flags=()
  [ "$sio_deflate" = 1 ] && flags+=(--deflate)
  [ "$broker" = redis ] && flags+=(--redis "${broker_env[0]#ROOMCAST_BROKER=}")
  node bench/socketio/server.js "${flags[@]+"${flags[@]}"}" >"$out" 2>&1 &
  SIO_PID=$!
  started+=("$SIO_PID")
  for _ in $(seq 1 100); do
    if grep -q "listening on" "$out"; then
      SIO_URL=$(grep -o 'ws://[^ ]*' "$out" | head -1)
      echo "$SIO_PID socketio" >>"$work/pids"
      echo "== Socket.IO $(node -p 'require("./bench/socketio/node_modules/socket.io/package.json").version') on $SIO_URL (pid $SIO_PID, node $(node --version))"
      return 0
    fi
    kill -0 "$SIO_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "the Socket.IO server did not start:"; cat "$out"; exit 1
}

# Runs loadgen, showing its output and keeping it in $work/$1.out. Usage: lg NAME loadgen-args...
lg() {
  local name=$1; shift
  "$bin/loadgen" "$@" | tee "$work/$name.out"
  return "${PIPESTATUS[0]}"
}
result_of() { grep '^RESULT ' "$work/$1.out" | tail -1 | cut -d' ' -f2-; }

case "$scenario" in
  idle)
    start_nodes
    if [ "$procs" -le 1 ]; then
      lg idle idle --url "$URLS" --node-pid "$PIDS" "${args[@]+"${args[@]}"}"
    else
      # Several load generators, each with its own source addresses; RSS sampled here once
      # every one of them has printed READY.
      declare -a before=()
      for k in "${!NODE_PID[@]}"; do before[k]=$(awk '/^VmRSS:/ {print $2}' "/proc/${NODE_PID[k]}/status"); done
      hold=$(arg_value --hold-secs || echo "")
      extra=(); [ -z "$hold" ] && extra=(--hold-secs 40)
      lgp=()
      for j in $(seq 1 "$procs"); do
        "$bin/loadgen" idle --url "$URLS" --sources "127.0.$j.1,127.0.$j.2" \
          "${extra[@]+"${extra[@]}"}" "${args[@]+"${args[@]}"}" >"$work/idle$j.out" 2>&1 &
        lgp+=($!); started+=($!)
      done
      deadline=$((SECONDS + 600))
      while [ "$(cat "$work"/idle*.out 2>/dev/null | grep -c '^READY')" -lt "$procs" ]; do
        for p in "${lgp[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a loadgen ended early:"; cat "$work"/idle*.out; exit 1; }; done
        [ $SECONDS -lt $deadline ] || { echo "not every loadgen was READY within 600 s"; exit 1; }
        sleep 0.5
      done
      established=$(grep -h '^READY' "$work"/idle*.out | sed 's/.*established=\([0-9]*\).*/\1/' | awk '{s += $1} END {print s + 0}')
      echo "== all $procs load generators READY ($established connections); settling 5 s"
      sleep 5
      delta=0; after=()
      for k in "${!NODE_PID[@]}"; do
        after[k]=$(awk '/^VmRSS:/ {print $2}' "/proc/${NODE_PID[k]}/status")
        delta=$((delta + after[k] - before[k]))
        echo "node $k: $(ls "/proc/${NODE_PID[k]}/fd" | wc -l) fds, RSS ${before[k]} KiB -> ${after[k]} KiB"
      done
      [ "$established" -gt 0 ] || { echo "no connection was established"; exit 1; }
      per=$(awk -v d="$delta" -v n="$established" 'BEGIN {printf "%.1f", d * 1024 / n}')
      per_kib=$(awk -v d="$delta" -v n="$established" 'BEGIN {printf "%.2f", d / n}')
      for p in "${lgp[@]}"; do wait "$p" || true; done
      for j in $(seq 1 "$procs"); do echo "-- loadgen $j"; cat "$work/idle$j.out"; done
      echo "scenario            idle, $nodes nodes, $procs load generators"
      echo "connections         $established"
      echo "RSS per connection  $per bytes ($per_kib KiB) over all nodes"
      echo "RESULT {\"scenario\":\"idle-multi\",\"nodes\":$nodes,\"procs\":$procs,\"connections\":$established,\"node_rss_kib_before\":[$(join_by "${before[@]}")],\"node_rss_kib_after\":[$(join_by "${after[@]}")],\"rss_bytes_per_connection\":$per}"
    fi ;;

  fanout)
    start_nodes
    lg fanout fanout --url "$URLS" --node-pid "$PIDS" "${args[@]+"${args[@]}"}" ;;

  compression)
    start_nodes
    lg compression compression --url "$URLS" --node-pid "$PIDS" "${args[@]+"${args[@]}"}" ;;

  cluster)
    start_nodes
    if [ "$nodes" -ge 2 ]; then
      subs_urls=$(join_by "${NODE_URL[@]:1}")
      [ "$broker" = memory ] && echo "== note: memory brokers share nothing between nodes: no publication will cross (mechanics only)"
    else
      subs_urls=${NODE_URL[0]}
      echo "== note: one node: publishers and subscribers on the same node (a same-node control, not cross-node)"
    fi
    lg cluster cluster --publish-url "${NODE_URL[0]}" --url "$subs_urls" --node-pid "$PIDS" "${args[@]+"${args[@]}"}" ;;

  storm)
    if [ "$(arg_value --mode || echo rate)" != reconnect ]; then
      start_nodes
      lg storm storm --url "$URLS" "${args[@]+"${args[@]}"}"
    else
      [ "$failover" = 1 ] && nodes=2
      start_nodes
      reconnect=()
      [ "$failover" = 1 ] && reconnect=(--reconnect-url "${NODE_URL[1]}")
      "$bin/loadgen" storm --url "${NODE_URL[0]}" "${reconnect[@]+"${reconnect[@]}"}" "${args[@]}" \
        > >(tee "$work/storm.out") 2>&1 &
      lgpid=$!; started+=("$lgpid")
      deadline=$((SECONDS + 600))
      until grep -q '^READY' "$work/storm.out" 2>/dev/null; do
        kill -0 "$lgpid" 2>/dev/null || { wait "$lgpid" || true; echo "loadgen ended before READY"; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "loadgen not READY within 600 s"; exit 1; }
        sleep 0.2
      done
      victim=${NODE_PID[0]}
      echo "== $(date +%T.%N | cut -c1-12) SIG$sig to node 0 (pid $victim)"
      kill -s "$sig" "$victim"
      for _ in $(seq 1 300); do kill -0 "$victim" 2>/dev/null || break; sleep 0.05; done
      wait "$victim" 2>/dev/null || true
      echo "== $(date +%T.%N | cut -c1-12) node 0 exited"
      if [ "$failover" = 0 ]; then
        start_node 0 "${NODE_ADDR[0]}"
        echo "== $(date +%T.%N | cut -c1-12) node 0 restarted on ${NODE_ADDR[0]} (pid ${NODE_PID[0]}; the memory broker starts empty: a new epoch)"
      fi
      wait "$lgpid"
    fi ;;

  socketio-idle|socketio-fanout)
    sio_install
    what=${scenario#socketio-}
    start_nodes
    lg "roomcast-$what" "$what" --url "$URLS" --node-pid "$PIDS" "${args[@]+"${args[@]}"}"
    for p in "${NODE_PID[@]}"; do stop_pid "$p"; done
    sleep 2
    start_sio
    lg "socketio-$what" "$what" --proto socketio --url "$SIO_URL" --node-pid "$SIO_PID" "${args[@]+"${args[@]}"}"
    stop_pid "$SIO_PID"
    echo "== same run, same loadgen options: ${args[*]+"${args[*]}"}"
    node -e '
      const [what, a, b] = [process.argv[1], JSON.parse(process.argv[2]), JSON.parse(process.argv[3])];
      const rows = what === "idle"
        ? [["connections", "connections"], ["RSS bytes per connection", "rss_bytes_per_connection"],
           ["connections/s (setup)", "connections_per_s"], ["failed", "failed"]]
        : [["deliveries/s", "deliveries_per_s"], ["lost", "lost"], ["node CPU cores", "node_cpu_cores"],
           ["latency p50 ms", "latency_ms.p50"], ["latency p99 ms", "latency_ms.p99"]];
      const get = (o, k) => k.split(".").reduce((v, p) => (v == null ? v : v[p]), o);
      const f = (x) => (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(2)) : String(x));
      console.log("| " + what + " | roomcast | Socket.IO | Socket.IO / roomcast |");
      console.log("|---|---|---|---|");
      const ratios = {};
      for (const [label, key] of rows) {
        const [x, y] = [get(a, key), get(b, key)];
        const r = typeof x === "number" && typeof y === "number" && x !== 0 ? y / x : null;
        ratios[key] = r;
        console.log(`| ${label} | ${f(x)} | ${f(y)} | ${r == null ? "-" : r.toFixed(2)} |`);
      }
      console.log("RESULT " + JSON.stringify({ scenario: "socketio-" + what, roomcast: a, socketio: b, ratio_socketio_over_roomcast: ratios }));
    ' "$what" "$(result_of "roomcast-$what")" "$(result_of "socketio-$what")" ;;
esac
