#!/usr/bin/env bash
# Soak: a release Ferry under `ferry loadgen --churn` for a set time (default 30 minutes), sampled
# every 30 s: RSS, open descriptors, tokio tasks and every table's size. Writes the loadgen's JSON
# report (every sample, the RSS slope after warm-up, tables not drained after the churn) to
# target/soak/soak-<duration>.json and prints one line per sample.
#
#   benches/soak.sh            # 30 minutes
#   DURATION=5m benches/soak.sh
#   LOADGEN_ARGS="--churn-rate 50 --churn-media-every 5" benches/soak.sh
# The default churn: 20 cycles a second (a relay cycle every 10th), 8 at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30m}
PORT=${PORT:-18090}
OUT=target/soak
mkdir -p "$OUT"
cargo build --release --quiet
bin=target/release/ferry
# A short resume window, so that vanished members leave (and their entries go) within the run.
"$bin" --http-listen "127.0.0.1:$PORT" --media-listen 127.0.0.1:0 --resume-timeout 2s \
  --empty-room-ttl 10s >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
# shellcheck disable=SC2086
"$bin" loadgen --url "http://127.0.0.1:$PORT" --server-pid "$server" --churn --duration "$DURATION" \
  --churn-sample 30s --churn-settle 60s --churn-rate 20 --json ${LOADGEN_ARGS:-} >"$OUT/soak-$DURATION.json"
python3 - "$OUT/soak-$DURATION.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['cycles']} cycles in {r['seconds']:.0f} s ({r['cycles_per_s']:.1f}/s); "
      f"RSS slope after warm-up: {r['rss_slope_kib_per_min']} KiB/min; not drained: {r['not_drained']}; errors: {r['errors']}")
for s in r["samples"]:
    busy = {k: v for k, v in s.get("tables", {}).items() if v}
    print(f"t={s['t']:7.0f} s  cycles={s['cycles']:7}  rss={s.get('rss_kib')} KiB  fds={s.get('fds')}  tasks={s.get('tasks')}  {busy}")
PY
