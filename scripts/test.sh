#!/usr/bin/env bash
# The whole test suite (what CI runs): installs what the tests need, then unit, integration and
# end-to-end tests. Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# A target dir outside the clone lets CI reuse an earlier build on the same machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prefstream/target}"
./scripts/setup.sh
# tansu (a Kafka-protocol broker) for the end-to-end tests; the first install compiles it (~15 min).
TANSU_BIN="$(./scripts/tansu.sh install)"
export TANSU_BIN
cargo build --release --all-targets
# The SmolLM2 package from the pinned base + the adapter in models/smollm2 (idempotent, ~10 s).
echo "test: SmolLM2 package at $(./scripts/base-package.sh)"
# The alert rules and their unit tests (deploy/prometheus/alerts.test.yaml).
promtool check rules deploy/prometheus/alerts.yaml
(cd deploy/prometheus && promtool test rules alerts.test.yaml)
promtool check config deploy/prometheus/prometheus.yml
# The container image's runtime stage from the release build, checked inside its file system.
./scripts/image.sh

# Benches are built above but not run: they are measurements, not tests.
cargo test --release --lib --bins --tests -- --test-threads 2

# libFuzzer on the parsers of outside bytes, a minute per target (FUZZ_SECONDS; 0 skips).
# The first run installs cargo-fuzz and builds the instrumented crate (~15 min), then reuses it.
if [ "${FUZZ_SECONDS:-60}" != 0 ]; then
  ./scripts/fuzz.sh
fi
