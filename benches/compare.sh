#!/usr/bin/env bash
# Ferry vs Janus on this machine, in one run, with the same load.
#
# For each subscriber count: a fresh Ferry (the release build), loaded by `ferry loadgen` for
# DURATION, stopped; then a fresh Janus (Debian's `janus`, VideoRoom plugin) with the very same
# load, stopped. Everything runs inside a network namespace this script creates (loopback and a
# veth pair with both ends inside: Janus gathers no loopback candidates), so no packet leaves it.
# Both servers are measured the same way, from /proc (`--server-pid`): CPU time per packet received
# by the subscribers, RSS growth per subscriber; loss and latency come from the loadgen's payloads.
#
# Usage:   benches/compare.sh [SUBSCRIBERS ...]        (root; default 10 50 100)
# Env:     DURATION=20s  PUBLISHERS=1  VIDEO_KBPS=2500  OUT=target/compare
#          PUBLISH=1        also copy the plots to docs/img/compare-*.png (PUBLISH=NAME: NAME-*.png)
#          JANUS_EVENT_LOOPS="default 1 2"   Janus's `event_loops` settings to run, each a Janus
#                           of its own after Ferry ("default": Janus's own, a thread per handle;
#                           the default list is just that)
#          LOADGEN_ARGS="..."    more `ferry loadgen` options, for both servers
#          NO_BUILD=1       use target/release/ferry as it is
#          FERRY=PATH       this ferry binary instead (server and loadgen; implies NO_BUILD)
#          REPORT_ONLY=1    no runs: the table and plots again from the reports in OUT
#          KERNEL_FLOOR=0   skip the kernel's floor (by default measured after the servers for
#                           each N, 1 publisher broadcasts only: `benches/udp_floor.rs`, a thread
#                           doing only the relay's system calls, for the same packet rate and fan-out,
#                           paced if LOADGEN_ARGS paces, else frames at once with GSO; its CPU per
#                           copy is what a server with no work of its own would cost, so Janus /
#                           floor bounds the ratio any server could reach against Janus here)
# Output:  OUT/{ferry,janus,janus-loopsL,floor}-N.json (loadgen / udp_floor reports), OUT/*-N.log, OUT/summary.md
#          (a table per Janus setting), OUT/compare*.dat, OUT/compare-{cpu,loss,latency}.png
set -euo pipefail
cd "$(dirname "$0")/.."

SUBSCRIBERS=("$@")
[ ${#SUBSCRIBERS[@]} -gt 0 ] || read -r -a SUBSCRIBERS <<<"${SUBSCRIBER_COUNTS:-10 50 100}"
DURATION=${DURATION:-20s}
PUBLISHERS=${PUBLISHERS:-1}
VIDEO_KBPS=${VIDEO_KBPS:-2500}
OUT=${OUT:-target/compare}
read -r -a EXTRA <<<"${LOADGEN_ARGS:-}"
read -r -a LOOPS <<<"${JANUS_EVENT_LOOPS:-default}"
# A Janus setting's name in file names: janus, janus-loops2, ...
janus_name() { if [ "$1" = default ]; then echo janus; else echo "janus-loops$1"; fi; }
# The kernel's floor applies to the broadcast shape: one publisher, N receivers.
floor_mode=
if [ "${KERNEL_FLOOR:-1}" != 0 ] && [ "$PUBLISHERS" = 1 ] && [[ " ${EXTRA[*]} " != *" --shape meeting "* ]]; then
  floor_mode=frames-gso
  [[ " ${EXTRA[*]} " != *" --pacing "* ]] || floor_mode=paced
fi

need=()
command -v janus >/dev/null 2>&1 || need+=(janus)
command -v gnuplot >/dev/null 2>&1 || need+=(gnuplot-nox)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "compare.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q "${need[@]}"
fi
mkdir -p "$OUT"

measure() {
[ "$(id -u)" = 0 ] || { echo "compare.sh: needs root (network namespace)" >&2; exit 1; }
if [ -z "${FERRY:-}" ]; then
  [ -n "${NO_BUILD:-}" ] || cargo build --release --locked
  FERRY=$PWD/target/release/ferry
  ferry_id="ferry $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes')"
else
  ferry_id="ferry $FERRY of $(date -u -r "$FERRY" '+%Y-%m-%d %H:%M')"
fi
echo "$(date -u +%Y-%m-%d), $ferry_id, $(janus --version 2>/dev/null | head -1)" >"$OUT/measured"
floor_bin=
if [ -n "$floor_mode" ]; then
  floor_bin=$(cargo bench --locked --bench udp_floor --no-run --message-format=json 2>/dev/null |
    jq -r 'select(.executable != null and .target.name == "udp_floor") | .executable' | tail -1)
  [ -x "$floor_bin" ] || { echo "compare.sh: benches/udp_floor.rs did not build; no kernel floor" >&2; floor_bin=; }
fi

lib=
for d in "/usr/lib/$(uname -m)-linux-gnu/janus" /usr/lib/janus /usr/local/lib/janus /opt/janus/lib/janus; do
  [ -e "$d/plugins/libjanus_videoroom.so" ] && { lib=$d; break; }
done
[ -n "$lib" ] || { echo "compare.sh: Janus's modules not found" >&2; exit 1; }

NS=ferry-compare-$$
SERVER_IP=10.214.0.1
CLIENT_IP=10.214.0.2
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The namespace: lo, and a veth pair with both ends inside. Janus's ICE uses one end (its packets
# leave through that device and come back on the other with a source address local to the
# namespace, hence accept_local); the loadgen's sockets use the other end's address.
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add fc0 type veth peer name fc1
ip -n "$NS" addr add "$SERVER_IP/24" dev fc0
ip -n "$NS" addr add "$CLIENT_IP/24" dev fc1
ip -n "$NS" link set fc0 up
ip -n "$NS" link set fc1 up
ip netns exec "$NS" sh -c 'echo 1 > /proc/sys/net/ipv4/conf/all/accept_local'

# Janus's configuration: only the VideoRoom plugin and the WebSocket transport (their folders hold
# links to just those), ICE on fc0 only, no STUN.
jd=$tmp/janus
mkdir -p "$jd/plugins" "$jd/transports" "$jd/none"
ln -s "$lib/plugins/libjanus_videoroom.so" "$jd/plugins/"
ln -s "$lib/transports/libjanus_websockets.so" "$jd/transports/"
# janus_config LOOPS: janus.jcfg for that event_loops setting.
janus_config() {
  cat >"$jd/janus.jcfg" <<EOF
general: {
  configs_folder = "$jd"
  plugins_folder = "$jd/plugins"
  transports_folder = "$jd/transports"
  events_folder = "$jd/none"
  loggers_folder = "$jd/none"
  interface = "$SERVER_IP"
  debug_level = 4
  $([ "$1" = default ] || echo "event_loops = $1")
}
media: {
}
nat: {
  ice_enforce_list = "fc0"
  ignore_mdns = true
}
EOF
}
cat >"$jd/janus.transport.websockets.jcfg" <<EOF
general: {
  json = "compact"
  ws = true
  ws_port = 8188
  ws_ip = "$SERVER_IP"
  wss = false
}
admin: {
  admin_ws = false
  admin_wss = false
}
EOF
echo 'general: {
}' >"$jd/janus.plugin.videoroom.jcfg"

# Start a server in the namespace (its log in $2); its PID in $server.
start() {
  local log=$1; shift
  ip netns exec "$NS" "$@" >"$log" 2>&1 &
  server=$!
  pids+=("$server")
}

# Stop the server: SIGTERM, then SIGKILL after 10 s (Janus can hang in its shutdown).
stop() {
  kill "$server" 2>/dev/null || true
  for _ in $(seq 100); do
    case $(ps -o stat= -p "$server" 2>/dev/null) in ''|Z*) break ;; esac
    sleep 0.1
  done
  kill -KILL "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}

wait_listening() {
  for _ in $(seq 100); do
    ip netns exec "$NS" ss -Hltn "sport = :$1" | grep -q . && return 0
    kill -0 "$server" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# loadgen TARGET URL N [NAME]: one run, its report in $OUT/NAME-N.json (NAME: TARGET).
loadgen() {
  local target=$1 url=$2 n=$3 name=${4:-$1}
  echo "compare.sh: $name, $PUBLISHERS -> $n, $DURATION"
  if ! ip netns exec "$NS" "$FERRY" loadgen --target "$target" --url "$url" \
      --local-ip "$CLIENT_IP" --server-pid "$server" --publishers "$PUBLISHERS" \
      --subscribers "$n" --video-kbps "$VIDEO_KBPS" --duration "$DURATION" --json "${EXTRA[@]}" \
      >"$OUT/$name-$n.json" 2>"$OUT/$name-$n.loadgen.log"; then
    echo "compare.sh: loadgen against $name failed:" >&2
    tail -5 "$OUT/$name-$n.loadgen.log" >&2
    echo null >"$OUT/$name-$n.json"
  fi
}

for n in "${SUBSCRIBERS[@]}"; do
  start "$OUT/ferry-$n.log" "$FERRY" --http-listen "$SERVER_IP:8080" \
    --media-listen "$SERVER_IP:3478" --max-room-peers $((n + PUBLISHERS + 10))
  wait_listening 8080 || { echo "compare.sh: Ferry did not start:" >&2; tail "$OUT/ferry-$n.log" >&2; exit 1; }
  loadgen ferry "http://$SERVER_IP:8080" "$n"
  stop
  for loops in "${LOOPS[@]}"; do
    name=$(janus_name "$loops")
    janus_config "$loops"
    start "$OUT/$name-$n.log" janus -C "$jd/janus.jcfg" -F "$jd" --disable-colors
    wait_listening 8188 || { echo "compare.sh: Janus did not start:" >&2; tail "$OUT/$name-$n.log" >&2; exit 1; }
    loadgen janus "ws://$SERVER_IP:8188" "$n" "$name"
    stop
  done
  if [ -n "$floor_bin" ]; then
    echo "compare.sh: the kernel's floor ($floor_mode), 1 -> $n"
    # Video in ~1200-byte packets plus 50 audio packets per second, as the loadgen sends.
    ip netns exec "$NS" env FLOOR_RELAY_IP="$SERVER_IP" FLOOR_RECEIVER_IP="$CLIENT_IP" \
      FLOOR_RECEIVERS="$n" FLOOR_MODES="$floor_mode" FLOOR_PPS=$(((VIDEO_KBPS * 1000 / 8 + 1199) / 1200 + 50)) \
      FLOOR_JSON=1 "$floor_bin" >"$OUT/floor-$n.json" 2>"$OUT/floor-$n.log" || echo null >"$OUT/floor-$n.json"
  fi
done
}
[ -n "${REPORT_ONLY:-}" ] || measure

# The tables (markdown) and the plots' data: one per Janus setting, Ferry's figures in each.
q() { jq -r "$2 // \"?\"" "$OUT/$1.json" 2>/dev/null || echo "?"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "?" || b == "?" || b == 0) print "?"; else printf "%.2f", a / b }'; }
undelivered() { awk -v d="$1" 'BEGIN { if (d == "?") print "?"; else printf "%.2f", 100 - d }'; }
fmt() { awk -v v="$1" -v s="${2:-1}" -v d="${3:-1}" 'BEGIN { if (v == "?") print "?"; else printf "%.*f", d, v / s }'; }
# CPU seconds per second of the measured window (the server's, the loadgen's, everything else's).
per_s() { q "$1" ".seconds as \$t | ($2) as \$x | if \$t and \$x then \$x / \$t else null end"; }
label() { if [ "$1" = default ]; then echo "Janus"; else echo "Janus, event_loops = $1"; fi; }
dat_of() { if [ "$1" = default ]; then echo "$OUT/compare.dat"; else echo "$OUT/compare-loops$1.dat"; fi; }
summary=$OUT/summary.md
{
  echo "Ferry vs Janus, $PUBLISHERS publisher(s) -> N subscribers, ${VIDEO_KBPS} kbit/s video + audio, $DURATION measured per run"
  echo "($(cat "$OUT/measured" 2>/dev/null || echo '?'); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
} >"$summary"
for loops in "${LOOPS[@]}"; do
  jn=$(janus_name "$loops")
  dat=$(dat_of "$loops")
  echo "# subscribers ferry_cpu_us janus_cpu_us ferry_loss janus_loss ferry_p99_ms janus_p99_ms ferry_rss_kB janus_rss_kB ferry_cpu_s janus_cpu_s ferry_other_s janus_other_s ferry_p50_ms janus_p50_ms ferry_undelivered janus_undelivered" >"$dat"
  {
    echo
    echo "Ferry vs $(label "$loops"):"
    echo
    echo "| subscribers | received pkt/s (delivered %) Ferry / Janus | server CPU s/s Ferry / Janus | CPU µs per received packet Ferry / Janus | Janus / Ferry | kernel floor µs per copy (Janus / floor) | loss % Ferry / Janus | latency p99 ms Ferry / Janus | RSS kB per subscriber Ferry / Janus | Janus / Ferry | clients without media Ferry / Janus | loadgen / other CPU s/s, Ferry run; Janus run |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  } >>"$summary"
  for n in "${SUBSCRIBERS[@]}"; do
    f=ferry-$n j=$jn-$n
    fc=$(q "$f" .server_process.cpu_us_per_received_packet); jc=$(q "$j" .server_process.cpu_us_per_received_packet)
    fl=$(q "$f" .loss_percent); jl=$(q "$j" .loss_percent)
    fp=$(q "$f" .latency_us.p99); jp=$(q "$j" .latency_us.p99)
    f5=$(q "$f" .latency_us.p50); j5=$(q "$j" .latency_us.p50)
    fr=$(q "$f" .server_process.rss_bytes_per_subscriber); jr=$(q "$j" .server_process.rss_bytes_per_subscriber)
    fx=$(q "$f" .packets_received_per_s); jx=$(q "$j" .packets_received_per_s)
    fdl=$(q "$f" .delivered_percent); jdl=$(q "$j" .delivered_percent)
    fm=$(q "$f" .clients_without_media); jm=$(q "$j" .clients_without_media)
    kc=$(q "floor-$n" .cpu_us_per_copy)
    fs=$(per_s "$f" .server_process.cpu_seconds); js=$(per_s "$j" .server_process.cpu_seconds)
    fg=$(per_s "$f" .loadgen_cpu_seconds); jg=$(per_s "$j" .loadgen_cpu_seconds)
    fo=$(per_s "$f" .other_cpu_seconds); jo=$(per_s "$j" .other_cpu_seconds)
    echo "$n $fc $jc $fl $jl $(fmt "$fp" 1000 3) $(fmt "$jp" 1000 3) $(fmt "$fr" 1000) $(fmt "$jr" 1000) $fs $js $fo $jo $(fmt "$f5" 1000 3) $(fmt "$j5" 1000 3) $(undelivered "$fdl") $(undelivered "$jdl") $kc" >>"$dat"
    echo "| $n | $(fmt "$fx" 1 0) ($(fmt "$fdl" 1 0)) / $(fmt "$jx" 1 0) ($(fmt "$jdl" 1 0)) | $(fmt "$fs" 1 2) / $(fmt "$js" 1 2) | $(fmt "$fc") / $(fmt "$jc") | **$(ratio "$jc" "$fc")** | $(fmt "$kc" 1 2) ($(ratio "$jc" "$kc")) | $(fmt "$fl" 1 2) / $(fmt "$jl" 1 2) | $(fmt "$fp" 1000) / $(fmt "$jp" 1000) | $(fmt "$fr" 1000 0) / $(fmt "$jr" 1000 0) | $(ratio "$jr" "$fr") | $fm / $jm | $(fmt "$fg" 1 2) / $(fmt "$fo" 1 2); $(fmt "$jg" 1 2) / $(fmt "$jo" 1 2) |" >>"$summary"
  done
done
{
  echo
  echo "Command: ${SUBSCRIBER_COUNTS:+SUBSCRIBER_COUNTS=\"$SUBSCRIBER_COUNTS\" }DURATION=$DURATION PUBLISHERS=$PUBLISHERS VIDEO_KBPS=$VIDEO_KBPS${JANUS_EVENT_LOOPS:+ JANUS_EVENT_LOOPS=\"$JANUS_EVENT_LOOPS\"}${LOADGEN_ARGS:+ LOADGEN_ARGS=\"$LOADGEN_ARGS\"} benches/compare.sh ${SUBSCRIBERS[*]}"
  echo "Latency: publisher -> subscriber through the server, as measured by the loadgen (upper bound of a histogram bucket 1/8 of an octave wide)."
  [ -z "$floor_mode" ] || echo "Kernel floor: benches/udp_floor.rs ($floor_mode), a thread doing only the relay's system calls for the same fan-out (its own CPU time, precise); Janus / floor is the ratio a server with no work of its own would reach."
} >>"$summary"
cat "$summary"

# plot NAME TITLE YLABEL SETTINGS "FERRY-COLUMN JANUS-COLUMN MEASURE" ...: Ferry (purple) and each
# Janus setting (greens, oranges, blues) as curves; a second measure dashed.
plot() {
  local name=$1 title=$2 ylabel=$3 settings=$4 curves=() m=0
  shift 4
  local colours=("#2a9d8f" "#e76f51" "#277da1" "#e9c46a")
  for spec in "$@"; do
    read -r fcol jcol measure <<<"$spec"
    local dash=1
    [ $m -eq 0 ] || dash=2
    curves+=("\"$(dat_of "${LOOPS[0]}")\" using 1:$fcol with linespoints lw 2 pt 7 dt $dash lc rgb \"#7b2cbf\" title \"Ferry$measure\"")
    local k=0
    for loops in "${LOOPS[@]}"; do
      curves+=("\"$(dat_of "$loops")\" using 1:$jcol with linespoints lw 2 pt 5 dt $dash lc rgb \"${colours[k % 4]}\" title \"$(label "$loops")$measure\"")
      k=$((k + 1))
    done
    m=$((m + 1))
  done
  if [ "$name" = cpu ] && [ -n "$floor_mode" ]; then
    curves+=("\"$(dat_of "${LOOPS[0]}")\" using 1:18 with linespoints lw 2 pt 1 dt 3 lc rgb \"#555555\" title \"kernel floor: the system calls alone\"")
  fi
  local IFS=,
  gnuplot <<EOF
set terminal pngcairo size 800,520 font ",11" noenhanced
set output "$OUT/compare-$name.png"
set datafile missing "?"
set title "$title"
set xlabel "subscribers ($PUBLISHERS publisher, ${VIDEO_KBPS} kbit/s video + audio)"
set ylabel "$ylabel"
set xrange [0:*]
set offsets 0, graph 0.05, 0, 0
$settings
set grid
set key below maxcols 2
plot ${curves[*]}
EOF
}
plot cpu "Server CPU per packet received by subscribers (from /proc)" "µs of CPU per packet" \
  "set yrange [0:*]" "2 3"
plot loss "Loss seen by subscribers (solid), and what did not arrive in the window: lost or queued (dashed)" "%" \
  "set yrange [0:1<*]" "4 5" "16 17 , not delivered"
plot latency "Latency publisher -> subscriber, p50 (solid) and p99 (dashed), measured by the loadgen" "ms" \
  "set logscale y 2" "14 15 , p50" "6 7 , p99"
echo "compare.sh: results in $OUT (summary.md, *.json, compare-*.png)"
if [ -n "${PUBLISH:-}" ]; then
  prefix=compare
  [ "$PUBLISH" = 1 ] || prefix=$PUBLISH
  mkdir -p docs/img
  for p in cpu loss latency; do cp "$OUT/compare-$p.png" "docs/img/$prefix-$p.png"; done
  echo "compare.sh: plots copied to docs/img/$prefix-*.png"
fi
