#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (libFuzzer's -max_total_time), one after the other,
# from the committed seeds (fuzz/corpus/<target>/seed-*) plus whatever earlier runs added there.
# A crash, a panic, a failed assertion, an out-of-memory or a hang (one input over 10 s) stops
# the run with a non-zero exit; the input is left in fuzz/artifacts/<target>/.
#   fuzz/run.sh 20            # CI: a short bounded run of each
#   fuzz/run.sh 600 srtp      # one target for 10 minutes
# Needs the nightly toolchain and cargo-fuzz (`cargo +nightly install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
# FUZZ_TARGET_DIR: build there instead of fuzz/target (CI keeps one across its runs).
# FUZZ_BUILD_ARGS: more cargo-fuzz build flags, e.g. "--dev --sanitizer none" (CI: a build in
# half the time, for short runs; the long runs use the default, release with AddressSanitizer).
dir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then dir=(--target-dir "$FUZZ_TARGET_DIR"); fi
read -r -a build_args <<<"${FUZZ_BUILD_ARGS:-}"
dir+=("${build_args[@]}")
cargo +nightly fuzz build "${dir[@]}"
mkdir -p logs
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${secs}s"
  mkdir -p "corpus/$t"
  log="logs/$t.log"
  set +e
  cargo +nightly fuzz run "${dir[@]}" "$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  status=$?
  set -e
  if [ "$status" != 0 ]; then
    echo "fuzz: $t FAILED (exit $status); the end of its log ($log):" >&2
    tail -n 60 "$log" >&2
    exit 1
  fi
  # libFuzzer's last status line (executions, coverage, features, corpus) and its final stats.
  grep -E '^#[0-9]+' "$log" | tail -n 1
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" | tr '\n' ' '
  echo
done
echo "fuzz: ${#targets[@]} targets ran ${secs}s each, nothing found"
