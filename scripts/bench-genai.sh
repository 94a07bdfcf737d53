#!/usr/bin/env bash
# The engine against onnxruntime-genai (CPU build) on the same decoder: a random-weight Qwen2
# built by genai's model builder. Both loops run in this one script, alternating, on the same
# model.onnx and the same ONNX Runtime library (the one the genai wheel brings).
#
#   scripts/bench-genai.sh            # venv (idempotent), build the model once, time both
#   ROUNDS=3 NEW_TOKENS=64 PROMPT_LEN=64 BATCHES=1,8,32 scripts/bench-genai.sh
#
# Writes $WORK/report.json (WORK defaults to $HOME/.cache/prefstream/genai-bench) and prints a
# Markdown table with tokens/s and engine/genai ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="${PREFSTREAM_CACHE:-$HOME/.cache/prefstream}"
VENV="$CACHE/genai-venv"
WORK="${WORK:-$CACHE/genai-bench}"
MODEL="$WORK/model"
ROUNDS="${ROUNDS:-3}"
REPS="${REPS:-3}"
NEW_TOKENS="${NEW_TOKENS:-64}"
PROMPT_LEN="${PROMPT_LEN:-64}"
BATCHES="${BATCHES:-1,8,32}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

# 1. The venv. The CPU torch index is used only where it answers; otherwise plain PyPI.
if ! "$VENV/bin/python" -c 'import onnxruntime_genai, onnx_ir, transformers, torch, tokenizers' 2>/dev/null; then
    python3 -m venv "$VENV"
    PKGS=(torch==2.9.1 transformers onnx onnx-ir onnxruntime-genai tokenizers numpy)
    if curl -fsS -m 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
        "$VENV/bin/pip" install -q torch==2.9.1 --index-url https://download.pytorch.org/whl/cpu
    fi
    "$VENV/bin/pip" install -q "${PKGS[@]}"
fi
PY="$VENV/bin/python"

# 2. The model (once): random Qwen2 -> genai builder -> model.onnx + genai_config.json, plus the
#    tokenizer.json / manifest.json the engine's package loader wants.
if [[ ! -f "$MODEL/manifest.json" || ! -f "$MODEL/model.onnx" ]]; then
    rm -rf "$MODEL"
    mkdir -p "$WORK"
    "$PY" scripts/genai_bench.py build --out "$MODEL" --work "$WORK" --new-tokens "$NEW_TOKENS"
fi

# The same model with genai told to use 2 intra-op threads: the engine's sessions use ORT's
# default pool (one thread per core = 2 here), genai's default does not; this column compares
# like with like.
MODEL2="$WORK/model-2threads"
rm -rf "$MODEL2" && mkdir -p "$MODEL2"
for f in "$MODEL"/*; do [[ $(basename "$f") == genai_config.json ]] || ln -s "$f" "$MODEL2/"; done
"$PY" - "$MODEL/genai_config.json" "$MODEL2/genai_config.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 2
json.dump(d, open(sys.argv[2], "w"), indent=2)
PYEOF

# 3. The engine bench binary, run on genai's own libonnxruntime so both sides use one ORT.
cargo bench --bench engine --no-run 2>&1 | tail -n 2
BIN=$(cargo bench --bench engine --no-run --message-format=json 2>/dev/null |
    "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "engine" and m.get("executable"):
        print(m["executable"])')
ORT_LIB=$(ls "$("$PY" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')"/capi/libonnxruntime.so.1.* | head -n 1)
export ORT_DYLIB_PATH="$ORT_LIB"
echo "engine binary: $BIN"
echo "onnxruntime:   $ORT_LIB"
echo "load: $(uptime)"

# 4. Same tokens? genai's greedy output on 4 equal-length prompts, reproduced by the engine.
"$PY" scripts/genai_bench.py expect --model "$MODEL" --json "$WORK/expect.json"
"$BIN" --genai-model "$MODEL" --check "$WORK/expect.json" --out "$WORK/check.json"

# 5. Alternate the two sides so background load hits both alike.
G=() G2=() E=()
for r in $(seq 1 "$ROUNDS"); do
    "$PY" scripts/genai_bench.py time --model "$MODEL" --batches "$BATCHES" --prompt-len "$PROMPT_LEN" \
        --new-tokens "$NEW_TOKENS" --reps "$REPS" --json "$WORK/genai-$r.json"
    "$PY" scripts/genai_bench.py time --model "$MODEL2" --batches "$BATCHES" --prompt-len "$PROMPT_LEN" \
        --new-tokens "$NEW_TOKENS" --reps "$REPS" --json "$WORK/genai2-$r.json"
    "$BIN" --genai-model "$MODEL" --batches "$BATCHES" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" \
        --reps "$REPS" --out "$WORK/engine-$r.json" >"$WORK/engine-$r.md"
    G+=("$WORK/genai-$r.json") G2+=("$WORK/genai2-$r.json") E+=("$WORK/engine-$r.json")
    echo "round $r done; load: $(uptime)"
done
"$PY" scripts/genai_bench.py report --genai "${G[@]}" --genai2 "${G2[@]}" --engine "${E[@]}" --json "$WORK/report.json"
echo "wrote $WORK/report.json"
