#!/usr/bin/env bash
# libFuzzer on every function that parses outside bytes (fuzz/fuzz_targets/): Kafka records,
# stored windows read back from Redis, model output, manifests, -X options and durations.
# Each target runs FUZZ_SECONDS (default 60) from the committed seeds (fuzz/corpus/<target>,
# which also keep every input that once failed, as regression cases); what it grows is kept in
# the cache, not in git. Installs cargo-fuzz once (needs the nightly toolchain). A crash fails
# the script and leaves the input under $PREFSTREAM_CACHE/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${PREFSTREAM_CACHE:-$HOME/.cache/prefstream}"
SECONDS_EACH="${FUZZ_SECONDS:-60}"
TARGETS="${FUZZ_TARGETS:-event_classify stored_window model_output manifest kafka_option}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
export PATH="$CACHE/tools/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz into $CACHE/tools (once)" >&2
  cargo install --locked --root "$CACHE/tools" cargo-fuzz >&2
fi
# Its own target dir in the cache: a clean clone reuses the instrumented build.
export CARGO_TARGET_DIR="$CACHE/fuzz-target"
cargo +nightly fuzz build >&2   # optimised, with debug assertions (cargo-fuzz's default)
for t in $TARGETS; do
  corpus="$CACHE/fuzz/corpus/$t"
  mkdir -p "$corpus" "$CACHE/fuzz/artifacts/$t"
  echo "fuzz: $t for ${SECONDS_EACH}s"
  log="$CACHE/fuzz/$t.log"
  if ! cargo +nightly fuzz run "$t" "$corpus" "fuzz/corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -artifact_prefix="$CACHE/fuzz/artifacts/$t/" -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED; the input is in $CACHE/fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$log" | sed "s/^/fuzz: $t /"
done
