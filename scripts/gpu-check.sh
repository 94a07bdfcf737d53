#!/usr/bin/env bash
# The CUDA check and GPU benchmarks, as one script for a GPU host that has no Rust toolchain.
#
# Here (development machine):
#   bash shared/gpu/stage-ort-cuda.sh            # ONNX Runtime's CUDA build, in pieces
#   scripts/gpu-check.sh pack                    # release binaries + the genai-shaped model
# There (GPU host, repository root, after the pieces arrived with `bash .device-stage/copy.sh K`):
#   scripts/gpu-check.sh run                     # writes everything under $OUT (default ./gpu-out)
#
# `run` checks that CUDA registers (and that a wrong device is an error, not a CPU fallback),
# runs `prefstream infer` and the whole service (`demo`: mock cluster, in-memory store) on CUDA
# and on CPU, and the engine bench (batch 1/8/32, cache vs no cache) on both devices.
set -uo pipefail
STAGE=.device-stage
case "${1:-}" in
pack)
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prefstream/target}"
  cargo build --release --bin prefstream
  BENCH=$(cargo bench --bench engine --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "engine" and m.get("executable"):
        print(m["executable"])')
  tmp=$(mktemp -d)
  cp "$CARGO_TARGET_DIR/release/prefstream" "$tmp/prefstream"
  cp "$BENCH" "$tmp/engine-bench"
  tar -cf - -C "$tmp" prefstream engine-bench | zstd -19 -T0 -q -f -o "$STAGE/bin.tar.zst"
  # Models made by scripts/genai_bench.py build (fp32/cpu: `model`; fp16/cuda: see docs/benchmarks.md),
  # with genai's greedy tokens (`expect-<name>.json`) where there are some. Carry stays < 64 MiB.
  rm -rf "$tmp" "$STAGE/genai"
  mkdir -p "$STAGE/genai"
  for m in ${GENAI_MODELS:-model-fp16-cuda model-fp16-cuda-l8}; do
    src="$HOME/.cache/prefstream/genai-bench/$m"
    [ -d "$src" ] && cp -rL "$src" "$STAGE/genai/$m"
    [ -f "$src/../expect-$m.json" ] && cp "$src/../expect-$m.json" "$STAGE/genai/"
  done
  du -sh "$STAGE"/bin.tar.zst "$STAGE"/genai/* 2>/dev/null
  ;;
run)
  OUT="${OUT:-$PWD/gpu-out}"
  mkdir -p "$OUT"
  # shellcheck disable=SC1091
  source "$STAGE/assemble.sh"
  mkdir -p /tmp/psbin
  "$STAGE/zstd" -d -q -c "$STAGE/bin.tar.zst" | tar -xf - -C /tmp/psbin
  P=/tmp/psbin/prefstream
  E=/tmp/psbin/engine-bench
  step() { echo; echo "== $* ($(date +%T))"; }
  PARTS=" ${GPU_CHECK_PARTS:-infer bench genai demo} "  # a later run can redo only some
  want() { [[ $PARTS == *" $1 "* ]]; }
  {
    step "card"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    want infer && {
    step "wrong device is an error (cuda:7)"
    "$P" infer --model onnx --events examples/events.jsonl --device cuda:7 --json; echo "exit $?"
    step "infer on cuda"
    "$P" infer --model onnx --events examples/events.jsonl --device cuda --json --greedy; echo "exit $?"
    step "infer on cpu"
    "$P" infer --model onnx --events examples/events.jsonl --device cpu --json --greedy; echo "exit $?"
    }
    want bench && for dev in cuda cpu; do
      step "engine bench, default package, $dev"
      timeout 150 "$E" --model onnx --device "$dev" --reps 3 --batches "${BENCH_BATCHES:-1,8,32}" \
        --out "$OUT/engine-$dev.json"
    done
    want genai && for dir in "$STAGE"/genai/*/; do
      m=$(basename "$dir")
      for dev in cuda cpu; do
        step "engine bench, Qwen2-shaped genai model $m (GQA), $dev"
        timeout 120 "$E" --genai-model "$dir" --device "$dev" --reps 3 --batches "${BENCH_BATCHES:-1,8,32}" --out "$OUT/genai-$m-$dev.json"
        if [ -f "$STAGE/genai/expect-$m.json" ]; then
          step "greedy tokens against onnxruntime-genai's (CPU) on $m, $dev"
          timeout 60 "$E" --genai-model "$dir" --device "$dev" --check "$STAGE/genai/expect-$m.json" \
            --out "$OUT/check-$m-$dev.json"
        fi
      done
    done
    want demo && for dev in cuda cpu; do
      step "service demo (mock cluster, in-memory store), 256 users x 16 events, max batch 32, $dev"
      timeout 150 "$P" demo --device "$dev" --users 256 --events-per-user 16 --max-batch 32 --json \
        > "$OUT/demo-$dev.txt" 2>"$OUT/demo-$dev.err"
      echo "exit $?"; tail -n 13 "$OUT/demo-$dev.txt"
    done
  } 2>&1 | tee "$OUT/gpu-check.log"
  ;;
*)
  sed -n 2,12p "$0"
  exit 2
  ;;
esac
