#!/usr/bin/env python3
"""The onnxruntime-genai side of the engine comparison (run by scripts/bench-genai.sh).

  build  --out DIR [--precision fp16 --ep cuda]
                              random-weight Qwen2 (Hugging Face folder) -> genai model in DIR,
                              plus the tokenizer.json + manifest.json the prefstream engine needs
  expect --model DIR ...      genai's greedy tokens on fixed prompts (the engine must match)
  time   --model DIR ...      tokens/s of og.Generator at each batch size -> JSON
  report --genai A.json ...   merges genai and engine JSON into a Markdown table with ratios

Timing is the same on both sides: from handing over a [batch, prompt_len] block of token ids
to the last of `new_tokens` greedy tokens (prefill included), tokens/s = batch * new_tokens / s.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# Special tokens the engine looks up (src/prompt.rs); ids 0..5 as in src/tokenizer.rs.
SPECIAL = ["<pad>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"]
TEMPLATE_ID = "alignx-stream-v1"


def qwen2_config(args):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        torch_dtype="float32",
    )


def word_tokenizer(vocab_size):
    """A word-level tokenizer with the engine's special tokens; ids are all the bench needs."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return tok


def cmd_build(args):
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    hf = os.path.join(args.work, "hf")
    out = args.out
    os.makedirs(hf, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = qwen2_config(args)
    model = Qwen2ForCausalLM(cfg)  # random weights
    model.save_pretrained(hf)
    tok = word_tokenizer(args.vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")
    fast.save_pretrained(hf)
    builder = ["-p", args.precision, "-e", args.ep]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, *builder,
           "-c", os.path.join(args.work, "builder-cache")]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    # What the engine needs beside model.onnx (the builder's tokenizer.json is replaced by ours
    # so the special tokens certainly have the ids the engine expects).
    tok.save(os.path.join(out, "tokenizer.json"))
    manifest = {
        "name": "genai-qwen2-random",
        "version": "0.0.0",
        "template": TEMPLATE_ID,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        "generation": {"max_new_tokens": args.new_tokens},
        "source": {"builder": "onnxruntime_genai.models.builder " + " ".join(builder), "qwen2_config": cfg.to_dict()},
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    print(f"built {out}", flush=True)


def prompt_ids(batch, prompt_len, vocab, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(len(SPECIAL), vocab, size=(batch, prompt_len), dtype=np.int64)


def time_genai(model, batch, prompt_len, new_tokens, vocab, seed):
    import onnxruntime_genai as og

    ids = prompt_ids(batch, prompt_len, vocab, seed).astype("int32")
    params = og.GeneratorParams(model)
    total = prompt_len + new_tokens
    # min_length = max_length: genai masks eos until then, so every run makes new_tokens tokens.
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
    t0 = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    produced = 0
    while not gen.is_done():
        gen.generate_next_token()
        produced += 1
    secs = time.perf_counter() - t0
    got = len(gen.get_sequence(0)) - prompt_len
    if produced != new_tokens or got != new_tokens:
        raise SystemExit(f"genai produced {produced} steps / {got} tokens, wanted {new_tokens}")
    return secs


def cmd_expect(args):
    """Greedy tokens of genai on a few equal-length prompts, for the engine to reproduce."""
    import onnxruntime_genai as og

    model = og.Model(args.model)
    ids = prompt_ids(args.batch, args.prompt_len, args.vocab, 1234)
    params = og.GeneratorParams(model)
    total = args.prompt_len + args.new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=args.batch)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype("int32"))
    while not gen.is_done():
        gen.generate_next_token()
    tokens = [[int(t) for t in gen.get_sequence(r)[args.prompt_len:]] for r in range(args.batch)]
    with open(args.json, "w") as f:
        json.dump({"prompts": ids.tolist(), "tokens": tokens}, f)


def cmd_time(args):
    import onnxruntime
    import onnxruntime_genai as og

    model = og.Model(args.model)
    rows = []
    time_genai(model, 1, args.prompt_len, 4, args.vocab, 0)  # warm-up
    for b in args.batches:
        runs = [time_genai(model, b, args.prompt_len, args.new_tokens, args.vocab, r) for r in range(args.reps)]
        tps = [b * args.new_tokens / s for s in runs]
        rows.append({"batch": b, "tokens_per_s": max(tps), "runs_tokens_per_s": tps})
        print(f"genai batch {b:>2}: {max(tps):9.1f} tok/s (runs {', '.join(f'{t:.1f}' for t in tps)})", flush=True)
    res = {
        "side": "onnxruntime-genai",
        "genai_version": og.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "batches": rows,
    }
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)


def cmd_report(args):
    import statistics

    def runs(paths):
        """All timed runs per batch size (rounds x reps), and the first file's metadata."""
        by, meta = {}, None
        for p in paths:
            with open(p) as f:
                d = json.load(f)
            meta = meta or d
            rows = d["batches"] if "batches" in d else d["genai_model"]["batches"]
            for r in rows:
                by.setdefault(r["batch"], []).extend(r["runs_tokens_per_s"])
        return meta, by

    gmeta, g = runs(args.genai)
    _, g2 = runs(args.genai2) if args.genai2 else (None, {})
    _, e = runs(args.engine)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    lines = [
        f"onnxruntime-genai {gmeta['genai_version']} (onnxruntime {gmeta['onnxruntime_version']}); "
        f"prompt {gmeta['prompt_len']} random ids, {gmeta['new_tokens']} new tokens, greedy; "
        f"median (best) of {len(next(iter(g.values())))} runs per cell",
        "",
        "| batch | engine tok/s | genai tok/s (default) | engine / genai | genai tok/s (2 threads) "
        "| engine / genai (2 threads) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    table = []
    for b in sorted(g):
        em, gm, g2m = med(e.get(b, [])), med(g[b]), med(g2.get(b, []))
        row = {"batch": b, "engine_median": em, "genai_median": gm, "genai_2threads_median": g2m,
               "ratio_median": em / gm, "ratio_2threads_median": em / g2m if g2.get(b) else None,
               "engine_best": max(e.get(b, [0.0])), "genai_best": max(g[b]),
               "genai_2threads_best": max(g2.get(b, [0.0])),
               "engine_runs": e.get(b, []), "genai_runs": g[b], "genai_2threads_runs": g2.get(b, [])}
        table.append(row)
        lines.append(
            f"| {b} | {em:.0f} ({row['engine_best']:.0f}) | {gm:.0f} ({row['genai_best']:.0f}) | {em / gm:.2f}x | "
            f"{g2m:.0f} ({row['genai_2threads_best']:.0f}) | {em / g2m:.2f}x |")
    text = "\n".join(lines)
    print(text)
    with open(args.json, "w") as f:
        json.dump({"genai": gmeta, "table": table, "markdown": text}, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--work", required=True)
    b.add_argument("--vocab", type=int, default=2048)
    b.add_argument("--hidden", type=int, default=256)
    b.add_argument("--intermediate", type=int, default=512)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--kv-heads", type=int, default=2)
    b.add_argument("--max-positions", type=int, default=2048)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    # fp16 + cuda gives the GPU-shaped graph (fp16 KV cache, GroupQueryAttention's CUDA kernel).
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    b.add_argument("--ep", default="cpu", choices=["cpu", "cuda"])
    t = sub.add_parser("time")
    t.add_argument("--model", required=True)
    t.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    t.add_argument("--prompt-len", type=int, default=64)
    t.add_argument("--new-tokens", type=int, default=64)
    t.add_argument("--vocab", type=int, default=2048)
    t.add_argument("--reps", type=int, default=3)
    t.add_argument("--json", required=True)
    x = sub.add_parser("expect")
    x.add_argument("--model", required=True)
    x.add_argument("--batch", type=int, default=4)
    x.add_argument("--prompt-len", type=int, default=24)
    x.add_argument("--new-tokens", type=int, default=16)
    x.add_argument("--vocab", type=int, default=2048)
    x.add_argument("--json", required=True)
    r = sub.add_parser("report")
    r.add_argument("--genai", nargs="+", required=True)
    r.add_argument("--genai2", nargs="*", default=[])
    r.add_argument("--engine", nargs="+", required=True)
    r.add_argument("--json", required=True)
    args = ap.parse_args()
    {"build": cmd_build, "expect": cmd_expect, "time": cmd_time, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
