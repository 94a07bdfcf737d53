#!/usr/bin/env bash
# The CUDA check and GPU benchmarks, as one script for a GPU host that has no Rust toolchain and
# takes at most ~64 MiB (working tree included) per call.
#
# Here (development machine):
#   bash ../shared/gpu/stage-ort-cuda.sh         # ONNX Runtime's CUDA build, in pieces
#   scripts/gpu-check.sh pack                    # one payload: ORT CUDA + release binaries +
#                                                #   the SmolLM2 base, split in N pieces
# There (GPU host, repository root), one call per piece, back to back (the host stays warm
# ~30 s between calls), each carrying `.device-stage/pl.K`:
#   scripts/gpu-check.sh recv K                  # keeps piece K under /tmp/pl
#   scripts/gpu-check.sh run                     # with the last piece: everything under $OUT
#
# `run` checks that CUDA registers (and that a wrong device is an error, not a CPU fallback),
# assembles the SmolLM2 packages (fp16 for CUDA, fp32) from the base and the committed
# adapter with the carried `prefstream-train`, writes a description on CUDA, and runs the
# engine bench (SmolLM2 fp16/fp32 and the tiny package, batch 1/8/32/128) and the whole
# service (`demo`) on CUDA. GPU_CHECK_PARTS picks parts (default `infer smollm2`; also
# `bench`, `demo`: the tiny package on cuda and cpu; `genai`: GENAI_MODELS packed).
set -uo pipefail
STAGE=.device-stage
case "${1:-}" in
pack)
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prefstream/target}"
  cargo build --release --bin prefstream --bin prefstream-train
  BENCH=$(cargo bench --bench engine --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "engine" and m.get("executable"):
        print(m["executable"])')
  tmp=$(mktemp -d)
  mkdir -p "$tmp/ortgpu" "$tmp/base"
  cp "$CARGO_TARGET_DIR/release/prefstream" "$CARGO_TARGET_DIR/release/prefstream-train" "$tmp/"
  cp "$BENCH" "$tmp/engine-bench"
  strip "$tmp"/prefstream "$tmp"/prefstream-train "$tmp"/engine-bench
  tar -cf - -C "$tmp" prefstream prefstream-train engine-bench | zstd -19 -T0 -q -f -o "$tmp/bin.tar.zst"
  rm "$tmp"/prefstream "$tmp"/prefstream-train "$tmp"/engine-bench
  cp "$STAGE"/part* "$STAGE"/base.tar.zst "$STAGE"/zstd "$STAGE"/assemble.sh "$tmp/ortgpu/"
  GGUF="${PREFSTREAM_CACHE:-$HOME/.cache/prefstream}/base/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ "${GPU_NO_BASE:-0}" = 1 ] || zstd -19 --long=27 -T0 -q -o "$tmp/base/base.gguf.zst" "$GGUF"
  # Models made by scripts/genai_bench.py build, where there are some (GENAI_MODELS).
  for m in ${GENAI_MODELS:-}; do
    src="$HOME/.cache/prefstream/genai-bench/$m"
    [ -d "$src" ] && mkdir -p "$tmp/genai" && cp -rL "$src" "$tmp/genai/$m"
    [ -f "$src/../expect-$m.json" ] && cp "$src/../expect-$m.json" "$tmp/genai/"
  done
  # Pieces sized so that one piece plus the working tree stays under the host's 64 MiB.
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  piece=$(( 67108864 - tree - 1200000 ))
  rm -f "$STAGE"/pl.*
  tar -cf - -C "$tmp" . | split -b "$piece" -d -a 1 - "$STAGE/pl."
  rm -rf "$tmp"
  n=$(ls "$STAGE"/pl.* | wc -l)
  echo "tree $tree bytes; $n pieces of at most $piece bytes:"; ls -la "$STAGE"/pl.*
  ;;
recv)
  mkdir -p /tmp/pl && cp "$STAGE/pl.$2" /tmp/pl/ && ls -la /tmp/pl && df -h /tmp | tail -1
  ;;
run)
  OUT="${OUT:-$PWD/gpu-out}"
  mkdir -p "$OUT" /tmp/pl
  cp "$STAGE"/pl.* /tmp/pl/ 2>/dev/null
  if [ ! -d /tmp/payload ]; then
    mkdir -p /tmp/payload && cat /tmp/pl/pl.* | tar -xf - -C /tmp/payload || { echo "payload incomplete: $(ls /tmp/pl)"; exit 1; }
  fi
  mkdir -p /tmp/ortgpu && cp -n /tmp/payload/ortgpu/* /tmp/ortgpu/
  # shellcheck disable=SC1091
  source /tmp/ortgpu/assemble.sh
  mkdir -p /tmp/psbin
  /tmp/ortgpu/zstd -d -q -c /tmp/payload/bin.tar.zst | tar -xf - -C /tmp/psbin
  P=/tmp/psbin/prefstream
  T=/tmp/psbin/prefstream-train
  E=/tmp/psbin/engine-bench
  GENAI=/tmp/payload/genai
  export PREFSTREAM_CACHE=/tmp/pscache
  mkdir -p "$PREFSTREAM_CACHE/base"
  [ -f /tmp/payload/base/base.gguf.zst ] && /tmp/ortgpu/zstd -d -q -f --long=27 /tmp/payload/base/base.gguf.zst \
    -o "$PREFSTREAM_CACHE/base/SmolLM2-135M-Instruct.Q4_1.gguf"
  step() { echo; echo "== $* ($(date +%T))"; }
  PARTS=" ${GPU_CHECK_PARTS:-infer smollm2} "  # a later run can redo only some
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
    want smollm2 && {
    for p in fp16 fp32; do
      step "SmolLM2 package, $p, assembled from the base + models/smollm2 adapter (host CPU)"
      /usr/bin/time -f "%e s, %M KiB" "$T" package --adapter models/smollm2/adapter.safetensors \
        --out "/tmp/pkg-$p" --precision "$p" --max-new-tokens 256 2>&1 | tail -n 2
      du -sh "/tmp/pkg-$p/model.onnx"
    done
    step "SmolLM2 fp16: a description of examples/natural.jsonl on cuda (greedy)"
    "$P" infer --model /tmp/pkg-fp16 --events examples/natural.jsonl --device cuda --json --greedy; echo "exit $?"
    for p in fp16 fp32; do
      step "engine bench, SmolLM2 $p, cuda, 128 new tokens"
      timeout 150 "$E" --model "/tmp/pkg-$p" --device cuda --reps 2 --new-tokens 128 --cache-tokens 32 \
        --batches "${SMOL_BATCHES:-1,8,32,128}" --out "$OUT/smollm2-$p-cuda.json"
    done
    step "engine bench, tiny package (onnx/), cuda, 128 new tokens"
    timeout 100 "$E" --model onnx --device cuda --reps 2 --new-tokens 128 --cache-tokens 32 \
      --batches "${SMOL_BATCHES:-1,8,32,128}" --out "$OUT/tiny-cuda.json"
    step "service demo with SmolLM2 fp16 on cuda: 256 users x 8 events, max batch 128"
    timeout 150 "$P" demo --model /tmp/pkg-fp16 --device cuda --users 256 --events-per-user 8 --max-batch 128 \
      --json > "$OUT/demo-smollm2-cuda.txt" 2>"$OUT/demo-smollm2-cuda.err"
    echo "exit $?"; tail -n 13 "$OUT/demo-smollm2-cuda.txt"
    }
    want genai && for dir in "$GENAI"/*/; do
      m=$(basename "$dir")
      for dev in cuda cpu; do
        step "engine bench, Qwen2-shaped genai model $m (GQA), $dev"
        timeout 120 "$E" --genai-model "$dir" --device "$dev" --reps 3 --batches "${BENCH_BATCHES:-1,8,32}" --out "$OUT/genai-$m-$dev.json"
        if [ -f "$GENAI/expect-$m.json" ]; then
          step "greedy tokens against onnxruntime-genai's (CPU) on $m, $dev"
          timeout 60 "$E" --genai-model "$dir" --device "$dev" --check "$GENAI/expect-$m.json" \
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
