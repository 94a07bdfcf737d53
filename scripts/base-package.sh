#!/usr/bin/env bash
# Assembles the runnable SmolLM2 package from the pinned base (fetched by scripts/setup.sh) and
# the adapter kept in git (models/smollm2/), into $PREFSTREAM_CACHE/packages/smollm2-<adapter
# sha256, 12 hex>-<precision>. PREFSTREAM_PRECISION: int8 (default: 8-bit weights, the fast CPU
# package, greedy text as fp32's), fp32, fp16 (CUDA) or int4. Idempotent: a package already
# assembled for this adapter and precision is kept. Prints the package directory. Needs the
# release `prefstream-train` (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${PREFSTREAM_CACHE:-$HOME/.cache/prefstream}"
TARGET="${CARGO_TARGET_DIR:-target}"
ADAPTER=models/smollm2/adapter.safetensors
BASE="$CACHE/base/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$BASE" ] || { echo "base-package: $BASE is missing: run scripts/setup.sh" >&2; exit 1; }
KEY=$(sha256sum "$ADAPTER" | cut -c1-12)
PRECISION="${PREFSTREAM_PRECISION:-int8}"
OUT="$CACHE/packages/smollm2-$KEY-$PRECISION"
if [ ! -f "$OUT/manifest.json" ]; then
  rm -rf "$OUT.part"
  "$TARGET/release/prefstream-train" package --base "$BASE" --adapter "$ADAPTER" --out "$OUT.part" \
    --max-new-tokens 256 --precision "$PRECISION" >&2
  rm -rf "$OUT" && mv "$OUT.part" "$OUT"
fi
echo "$OUT"
