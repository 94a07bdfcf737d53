//! Engine benchmarks (`harness = false`): tokens/s at batch 1/8/32, the KV cache against
//! re-feeding the sequence, and the bytes our code copies per step. Prints a Markdown table and
//! writes JSON (`--out FILE`, else `$OUT`, else `target/bench-engine.json`).
//!
//! ```text
//! cargo bench --bench engine -- [--device cpu|cuda[:N]] [--model DIR] [--new-tokens N] [--cache-tokens N] [--reps N]
//! cargo bench --bench engine -- --genai-model DIR [--prompt-len P] [--new-tokens N] [--reps N]
//! cargo bench --bench engine -- --genai-model DIR --check EXPECT.json
//! ```
//!
//! `--model` (env `PREFSTREAM_BENCH_MODEL`, default `onnx`) is a model package; prompts are real
//! 4-signal prompts from `examples/events.jsonl`. `--genai-model` is a package made by
//! `scripts/bench-genai.sh` around an onnxruntime-genai model: prompts are random token ids of
//! length P, the same on the Python side, so the two loops time the same work.
//! Every run forces exactly N new tokens (`Generator::ignore_stop`), greedy.

use std::path::{Path, PathBuf};
use std::time::Instant;

use prefstream::engine::{load_package, GenStats, Generator, Manifest};
use prefstream::event::parse_event;
use prefstream::prompt::Template;
use prefstream::runtime::Device;
use prefstream::sampling::argmax;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};

const BATCHES: [usize; 3] = [1, 8, 32];
/// Ids below this are the special tokens (src/tokenizer.rs); random prompts avoid them.
const FIRST_PLAIN_ID: u32 = 6;

struct Args {
    model: PathBuf,
    genai_model: Option<PathBuf>,
    new_tokens: usize,
    cache_tokens: usize,
    prompt_len: usize,
    reps: usize,
    batches: Vec<usize>,
    check: Option<PathBuf>,
    out: Option<PathBuf>,
    device: Device,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: std::env::var_os("PREFSTREAM_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|| "onnx".into()),
        genai_model: None,
        new_tokens: 64,
        cache_tokens: 256,
        prompt_len: 64,
        reps: 3,
        batches: BATCHES.to_vec(),
        check: None,
        out: std::env::var_os("OUT").filter(|s| !s.is_empty()).map(PathBuf::from),
        device: std::env::var("PREFSTREAM_BENCH_DEVICE")
            .unwrap_or_else(|_| "cpu".into())
            .parse()
            .unwrap_or_else(|e| die(&format!("PREFSTREAM_BENCH_DEVICE: {e}"))),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| die(&format!("{flag} needs a value")));
        let num = |s: String| s.parse::<usize>().unwrap_or_else(|_| die(&format!("bad number {s}")));
        match flag.as_str() {
            "--model" => a.model = val().into(),
            "--genai-model" => a.genai_model = Some(val().into()),
            "--new-tokens" => a.new_tokens = num(val()),
            "--cache-tokens" => a.cache_tokens = num(val()),
            "--prompt-len" => a.prompt_len = num(val()),
            "--reps" => a.reps = num(val()).max(1),
            "--batches" => a.batches = val().split(',').map(|s| num(s.to_string())).collect(),
            "--out" => a.out = Some(val().into()),
            "--check" => a.check = Some(val().into()),
            "--device" => a.device = val().parse().unwrap_or_else(|e| die(&format!("--device: {e}"))),
            "--bench" => {} // cargo bench passes this to every bench binary
            "-h" | "--help" => {
                println!("{}", include_str!("engine.rs").lines().take(14).collect::<Vec<_>>().join("\n"));
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other}")),
        }
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("bench engine: {msg}");
    std::process::exit(2)
}

fn open(dir: &Path, device: &Device) -> (Manifest, Generator) {
    let (manifest, mut gen) = load_package(dir, device)
        .unwrap_or_else(|e| die(&format!("{e} (set --model / PREFSTREAM_BENCH_MODEL to a package directory)")));
    gen.ignore_stop = true;
    (manifest, gen)
}

/// One timed generation: seconds and the engine's counters.
fn run(gen: &mut Generator, prompts: &[Vec<u32>], new_tokens: usize) -> (f64, GenStats) {
    gen.max_new_tokens = new_tokens;
    gen.take_stats();
    let t0 = Instant::now();
    let out = gen.generate_ids(prompts, |_, logits| argmax(logits)).unwrap_or_else(|e| die(&e.to_string()));
    let secs = t0.elapsed().as_secs_f64();
    let got: Vec<usize> = out.iter().map(|o| o.tokens.len()).collect();
    if got.iter().any(|&n| n != new_tokens) {
        die(&format!("asked for {new_tokens} new tokens per row, got {got:?} (context too short?)"));
    }
    (secs, gen.take_stats())
}

/// Whole KV cache of `batch` rows at `len` positions, in bytes: what a loop that copied the
/// cache every step would move.
fn cache_bytes(gen: &Generator, batch: usize, len: usize) -> usize {
    let s = gen.session().spec();
    let elem = match s.kv_dtype {
        ort::value::TensorElementType::Float32 => 4,
        _ => 2,
    };
    2 * s.layers * batch * s.kv_heads * len * s.head_dim * elem
}

/// Tokens/s at each batch size: best of `reps` after one warm-up run.
fn throughput(gen: &mut Generator, args: &Args, prompts_for: impl Fn(usize) -> Vec<Vec<u32>>) -> Vec<Value> {
    let warm = prompts_for(1);
    run(gen, &warm, 4.min(args.new_tokens));
    let mut rows = Vec::new();
    for &b in &args.batches {
        let prompts = prompts_for(b);
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut tps = Vec::new();
        let mut stats = GenStats::default();
        let mut model_share = 0.0;
        for _ in 0..args.reps {
            let (secs, s) = run(gen, &prompts, args.new_tokens);
            tps.push((b * args.new_tokens) as f64 / secs);
            model_share = s.model_ms / 1e3 / secs;
            stats = s;
        }
        let best = tps.iter().copied().fold(0.0, f64::max);
        let med = median(&tps);
        let per_step = stats.bytes_copied / stats.steps.max(1);
        let whole = cache_bytes(gen, b, width + args.new_tokens);
        eprintln!("batch {b:>2}: {med:9.1} tok/s median (runs {tps:.1?}), {per_step} B copied/step");
        rows.push(json!({
            "batch": b,
            "prompt_tokens_max": width,
            "new_tokens": args.new_tokens,
            "tokens_per_s": med,
            "best_tokens_per_s": best,
            "runs_tokens_per_s": tps,
            "bytes_copied_per_step": per_step,
            "whole_cache_bytes_last_step": whole,
            "model_time_share": model_share,
        }));
    }
    rows
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn throughput_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| batch | prompt tokens (max) | new tokens | tokens/s (median) | best | runs | bytes copied / step | \
         whole cache at last step |\n|---:|---:|---:|---:|---:|---|---:|---:|\n",
    );
    for r in rows {
        let runs: Vec<String> =
            r["runs_tokens_per_s"].as_array().unwrap().iter().map(|v| format!("{:.0}", v.as_f64().unwrap())).collect();
        t += &format!(
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
            r["batch"],
            r["prompt_tokens_max"],
            r["new_tokens"],
            r["tokens_per_s"].as_f64().unwrap(),
            r["best_tokens_per_s"].as_f64().unwrap(),
            runs.join(", "),
            r["bytes_copied_per_step"],
            r["whole_cache_bytes_last_step"],
        );
    }
    t
}

/// 4-signal prompts from `examples/events.jsonl`, consecutive events in file order.
fn event_prompts(template: Template) -> Vec<String> {
    // The build tree's copy, else the working directory's (a bench binary shipped to another host).
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/events.jsonl");
    let path = if built.exists() { built } else { PathBuf::from("examples/events.jsonl") };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    let events: Vec<_> =
        text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| parse_event(l.as_bytes()).ok()).collect();
    let prompts: Vec<String> = events
        .chunks_exact(4)
        .filter(|w| w.iter().all(|e| e.user_id == w[0].user_id))
        .map(|w| template.build_prompt(None, w.iter().map(|e| &e.body)))
        .collect();
    if prompts.is_empty() {
        die(&format!("{}: no window of 4 events of one user", path.display()));
    }
    prompts
}

fn package_bench(args: &Args) -> Value {
    let (manifest, mut gen) = open(&args.model, &args.device);
    let spec = gen.session().spec().clone();
    let texts = event_prompts(manifest.template);
    let mut encoded: Vec<Vec<u32>> = texts.iter().map(|p| gen.tokenizer().encode(p)).collect();
    // The prompt plus the longest run must fit under the model's position limit.
    let longest_run = args.new_tokens.max(args.cache_tokens);
    let mut note = String::new();
    if let Some(maxp) = manifest.max_positions {
        let room = maxp.saturating_sub(longest_run);
        if encoded.iter().any(|p| p.len() > room) {
            note =
                format!("prompts cut to their last {room} tokens: max_positions {maxp} minus {longest_run} new tokens");
            for p in encoded.iter_mut().filter(|p| p.len() > room) {
                p.drain(..p.len() - room);
            }
        }
    }
    let lens: Vec<usize> = encoded.iter().map(Vec::len).collect();
    let mean_len = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    println!(
        "## Engine on `{}` ({} {}; {} layers, {} kv heads × {}, {:?})\n",
        args.model.display(),
        manifest.name,
        manifest.version,
        spec.layers,
        spec.kv_heads,
        spec.head_dim,
        spec.kv_dtype
    );
    println!(
        "4-signal prompts from examples/events.jsonl: {} windows, {:.0} tokens on average (max {}). {note}\n",
        lens.len(),
        mean_len,
        lens.iter().max().unwrap()
    );
    let rows = throughput(&mut gen, args, |b| (0..b).map(|i| encoded[i % encoded.len()].clone()).collect());
    println!("{}", throughput_table(&rows));

    // Cache against re-feeding, batch 1, `cache_tokens` new tokens.
    let one = vec![encoded[0].clone()];
    let n = args.cache_tokens;
    let reps = args.reps;
    let mut timed = |use_cache: bool| {
        gen.use_cache = use_cache;
        let mut all = Vec::new();
        let mut stats = GenStats::default();
        let mut share = 0.0;
        for _ in 0..reps {
            let (secs, s) = run(&mut gen, &one, n);
            all.push(secs);
            share = s.model_ms / 1e3 / secs;
            stats = s;
        }
        gen.use_cache = true;
        (median(&all), stats, share)
    };
    let (with_s, with, with_share) = timed(true);
    let (without_s, without, without_share) = timed(false);
    let speedup = without_s / with_s;
    println!("Batch 1, prompt {} tokens, {n} new tokens (median of {reps} runs):\n", one[0].len());
    println!("| | seconds | tokens/s | bytes copied / step | model time share |\n|---|---:|---:|---:|---:|");
    for (name, secs, s, share) in
        [("KV cache", with_s, &with, with_share), ("no cache (re-feed)", without_s, &without, without_share)]
    {
        println!(
            "| {name} | {secs:.3} | {:.1} | {} | {:.0}% |",
            n as f64 / secs,
            s.bytes_copied / s.steps.max(1),
            100.0 * share
        );
    }
    println!("\nKV cache speed-up: {speedup:.1}× (target ≥ 5×)\n");
    json!({
        "model": args.model.display().to_string(),
        "manifest": { "name": manifest.name, "version": manifest.version, "max_positions": manifest.max_positions },
        "graph": { "layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                   "kv_dtype": format!("{:?}", spec.kv_dtype), "id_dtype": format!("{:?}", spec.id_dtype),
                   "position_ids": spec.has_position_ids, "share_buffer": spec.share_buffer },
        "prompts": { "windows": lens.len(), "mean_tokens": mean_len, "max_tokens": lens.iter().max(), "note": note },
        "batches": rows,
        "cache": {
            "batch": 1, "prompt_tokens": one[0].len(), "new_tokens": n,
            "with_cache_s": with_s, "without_cache_s": without_s, "speedup": speedup,
            "with_cache_bytes_per_step": with.bytes_copied / with.steps.max(1),
            "without_cache_bytes_per_step": without.bytes_copied / without.steps.max(1),
        },
    })
}

fn genai_bench(args: &Args, dir: &Path) -> Value {
    let (manifest, mut gen) = open(dir, &args.device);
    let spec = gen.session().spec().clone();
    let vocab = gen.tokenizer().vocab_size() as u32;
    println!(
        "## Engine on the onnxruntime-genai model `{}` ({} layers, {} kv heads × {}, ids {:?}, position_ids: {}, \
         shared past/present buffer: {})\n",
        dir.display(),
        spec.layers,
        spec.kv_heads,
        spec.head_dim,
        spec.id_dtype,
        spec.has_position_ids,
        spec.share_buffer
    );
    println!("Random prompts of {} ids, {} new tokens, greedy.\n", args.prompt_len, args.new_tokens);
    let p = args.prompt_len;
    // The same ids are not needed on both sides (random weights), only the same shapes.
    let rows = throughput(&mut gen, args, |b| {
        let mut rng = StdRng::seed_from_u64(b as u64);
        (0..b).map(|_| (0..p).map(|_| rng.gen_range(FIRST_PLAIN_ID..vocab)).collect()).collect()
    });
    println!("{}", throughput_table(&rows));
    json!({
        "model": dir.display().to_string(),
        "manifest": manifest.name,
        "graph": { "layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                   "kv_dtype": format!("{:?}", spec.kv_dtype), "id_dtype": format!("{:?}", spec.id_dtype),
                   "position_ids": spec.has_position_ids, "share_buffer": spec.share_buffer },
        "prompt_len": p,
        "new_tokens": args.new_tokens,
        "batches": rows,
    })
}

/// Greedy tokens against onnxruntime-genai's on the same prompts (`genai_bench.py expect`),
/// then left padding: ragged rows in one batch against each row alone.
fn genai_check(dir: &Path, expect: &Path, device: &Device) -> Value {
    let (_, mut gen) = open(dir, device);
    let text = std::fs::read_to_string(expect).unwrap_or_else(|e| die(&format!("{}: {e}", expect.display())));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| die(&e.to_string()));
    let ids = |x: &Value| -> Vec<Vec<u32>> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
            .collect()
    };
    let (prompts, want) = (ids(&v["prompts"]), ids(&v["tokens"]));
    gen.max_new_tokens = want[0].len();
    let greedy = |gen: &mut Generator, p: &[Vec<u32>]| -> Vec<Vec<u32>> {
        let out = gen.generate_ids(p, |_, l| argmax(l)).unwrap_or_else(|e| die(&e.to_string()));
        out.into_iter().map(|o| o.tokens).collect()
    };
    let got = greedy(&mut gen, &prompts);
    let same = got == want;
    println!(
        "engine tokens {} onnxruntime-genai's on {} equal-length prompts",
        if same { "match" } else { "DIFFER from" },
        prompts.len()
    );
    if !same {
        println!("  engine: {got:?}\n  genai:  {want:?}");
    }
    // Ragged prompts: the engine left-pads; does a padded row still get what it gets alone?
    let ragged: Vec<Vec<u32>> = prompts.iter().enumerate().map(|(i, p)| p[3 * i..].to_vec()).collect();
    let batched = greedy(&mut gen, &ragged);
    let alone: Vec<Vec<u32>> = ragged.iter().map(|p| greedy(&mut gen, std::slice::from_ref(p)).remove(0)).collect();
    let padded_ok = batched == alone;
    println!("left-padded batch {} each row alone", if padded_ok { "matches" } else { "DIFFERS from" });
    json!({ "match_genai": same, "engine": got, "genai": want, "left_padding_matches_alone": padded_ok })
}

fn main() {
    let args = parse_args();
    let ort = prefstream::runtime::ort_library_path().map(|p| p.display().to_string()).unwrap_or_default();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut report = json!({
        "ort_library": ort, "threads_available": threads, "reps": args.reps, "device": args.device.to_string(),
    });
    match &args.genai_model {
        Some(dir) if args.check.is_some() => {
            report["check"] = genai_check(dir, args.check.as_deref().unwrap(), &args.device)
        }
        Some(dir) => report["genai_model"] = genai_bench(&args, dir),
        None => report["package"] = package_bench(&args),
    }
    let out =
        args.out.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-engine.json"));
    let out = if out.is_dir() { out.join("bench-engine.json") } else { out };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap())
        .unwrap_or_else(|e| die(&format!("{}: {e}", out.display())));
    eprintln!("wrote {}", out.display());
}
