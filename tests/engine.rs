//! The ONNX engine against the candle policy it was exported from, the cache against re-feeding,
//! the batcher under concurrency, and `prefstream infer`. Needs ONNX Runtime
//! (`scripts/setup.sh`); a missing library fails these tests with the fix in the message.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ort::value::TensorElementType;
use prefstream::engine::{load_package, BatcherConfig, Engine, Generator, Request};
use prefstream::event::{Event, EventBody};
use prefstream::prompt::{build_prompt, build_response, TEMPLATE_ID};
use prefstream::runtime::Device as OrtDevice;
use prefstream::sampling::SamplingParams;
use prefstream::tokenizer::TextTokenizer;
use prefstream::train::export::export_policy;
use prefstream::train::generate::generate;
use prefstream::train::model::{Gpt, GptConfig};
use rand::{rngs::StdRng, SeedableRng};

const MAX_NEW: usize = 16;

fn signal(i: usize) -> EventBody {
    let topics = ["tea", "hiking", "jazz", "chess", "sailing", "poetry"];
    let t = topics[i % topics.len()];
    EventBody::Comparison {
        post: format!("What should I do about {t}?"),
        chosen: format!("Go for {t} with a calm and logical plan."),
        rejected: format!("Skip {t} and keep it loud."),
    }
}

fn tokenizer() -> TextTokenizer {
    let mut corpus = Vec::new();
    for i in 0..12 {
        corpus.push(build_prompt(None, [&signal(i), &signal(i + 1)]));
        corpus.push(build_response("The user picks calm plans.", "The user likes calm, logical advice."));
    }
    TextTokenizer::train(corpus.into_iter(), 2000).unwrap()
}

/// A random tiny policy exported as a complete package in `dir`; returns the candle twin.
fn package(dir: &Path) -> (Gpt, TextTokenizer) {
    let tok = tokenizer();
    let cfg = GptConfig {
        vocab_size: tok.vocab_size(),
        n_layer: 2,
        n_head: 4,
        d_model: 32,
        d_ff: 64,
        max_positions: 1024,
        rotary: false,
    };
    let vm = VarMap::new();
    let model = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let weights = {
        let data = vm.data().lock().unwrap();
        for (name, var) in data.iter() {
            let t = var.as_tensor();
            let noise = Tensor::randn(0f32, 0.3, t.shape(), t.device()).unwrap();
            let ln_weight = name.contains("ln") && name.ends_with(".weight");
            var.set(&if ln_weight { (noise + 1.0).unwrap() } else { noise }).unwrap();
        }
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    };
    export_policy(&cfg, &weights, &dir.join("model.onnx")).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
    let manifest = serde_json::json!({
        "name": "engine-test", "version": "0.0.1", "template": TEMPLATE_ID,
        "model": "model.onnx", "tokenizer": "tokenizer.json",
        "generation": { "max_new_tokens": MAX_NEW },
        "policy_config": cfg,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    (model, tok)
}

fn open(dir: &Path) -> Generator {
    load_package(dir, &OrtDevice::Cpu).unwrap_or_else(|e| panic!("{e}")).1
}

/// Three prompts of different lengths, so two rows are left-padded.
fn prompts() -> Vec<String> {
    vec![
        "Infer the user's preferences".to_string(),
        build_prompt(None, [&signal(0)]),
        build_prompt(Some("likes tea"), [&signal(1), &signal(2)]),
    ]
}

#[test]
fn engine_matches_candle_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = package(dir.path());
    let mut gen = open(dir.path());
    let spec = gen.session().spec().clone();
    assert_eq!((spec.layers, spec.kv_heads, spec.head_dim), (2, 4, 8), "{spec:?}");
    assert_eq!(spec.kv_dtype, TensorElementType::Float32);
    assert!(spec.has_position_ids && !spec.has_use_cache_branch);

    let prompts = prompts();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p)).collect();
    assert!(ids[0].len() < ids[1].len() && ids[1].len() < ids[2].len());
    println!("prompt lengths {:?}", ids.iter().map(Vec::len).collect::<Vec<_>>());
    for (params, seed, no_repeat) in
        [(SamplingParams::GREEDY, 0, 0), (SamplingParams::PAPER, 11, 0), (SamplingParams::GREEDY, 0, 2)]
    {
        gen.no_repeat_ngram = no_repeat;
        let want = generate(&model, &tok, &ids, MAX_NEW, &params, no_repeat, &mut StdRng::seed_from_u64(seed)).unwrap();
        let got = gen.generate(&prompts, &params, seed).unwrap();
        assert!(want.iter().all(|w| !w.tokens.is_empty()), "the prompts must fit the context");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.tokens, w.tokens, "{params:?} no_repeat {no_repeat}");
            if no_repeat > 0 {
                let answer = prefstream::sampling::answer_part(&w.tokens, tok.answer_open);
                let bigrams: Vec<_> = answer.windows(2).collect();
                let distinct: std::collections::HashSet<_> = bigrams.iter().collect();
                assert_eq!(distinct.len(), bigrams.len(), "a bigram repeated: {:?}", w.tokens);
            }
            assert_eq!(g.text, w.text);
        }
    }
    let stats = gen.take_stats();
    assert!(stats.steps > 0 && stats.bytes_copied > 0, "{stats:?}");
}

#[test]
fn cache_and_no_cache_agree() {
    let dir = tempfile::tempdir().unwrap();
    package(dir.path());
    let mut gen = open(dir.path());
    let prompts = prompts();
    let cached = gen.generate(&prompts, &SamplingParams::GREEDY, 0).unwrap();
    let with_cache = gen.take_stats();
    gen.use_cache = false;
    let refed = gen.generate(&prompts, &SamplingParams::GREEDY, 0).unwrap();
    let without = gen.take_stats();
    assert_eq!(cached, refed);
    assert!(cached.iter().all(|o| !o.tokens.is_empty()));
    // Re-feeding the sequence copies more every step than feeding one token.
    assert!(without.bytes_copied > with_cache.bytes_copied, "{with_cache:?} vs {without:?}");
    println!("bytes copied: cache {} / no cache {}", with_cache.bytes_copied, without.bytes_copied);
}

#[test]
fn batcher_answers_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    package(dir.path());
    let handle = Engine::spawn(dir.path(), OrtDevice::Cpu, BatcherConfig { max_batch: 4, max_wait_ms: 50, queue: 8 })
        .unwrap_or_else(|e| panic!("{e}"));
    let request = |i: usize| Request {
        previous: (i % 2 == 1).then(|| "likes tea".to_string()),
        signals: (0..=i % 3).map(|k| signal(i + k)).collect(),
        sampling: SamplingParams::GREEDY,
        seed: i as u64,
    };
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let h = handle.clone();
            let req = request(i);
            std::thread::spawn(move || h.infer(req))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    drop(handle);

    // Each answer is what the request gets alone: batching and padding change nothing.
    let mut gen = open(dir.path());
    for (i, r) in results.iter().enumerate() {
        let req = request(i);
        let alone =
            gen.generate(&[build_prompt(req.previous.as_deref(), &req.signals)], &req.sampling, req.seed).unwrap();
        assert_eq!(r.raw, alone[0].text, "request {i}");
        assert_eq!(r.tokens, alone[0].tokens.len());
        assert!(r.latency_ms > 0.0);
        assert!(!r.format_ok && r.description.is_none(), "a random model cannot pass the format check");
    }
}

fn write_events(path: &Path, users: &[&str]) {
    let lines: Vec<String> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            Event {
                schema_version: 1,
                event_id: format!("e{i}"),
                user_id: u.to_string(),
                ts: "2026-11-26T10:00:00Z".into(),
                body: signal(i),
            }
            .to_json()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn infer_cli_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    package(dir.path());
    let events = dir.path().join("events.jsonl");
    write_events(&events, &["u1"; 6]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefstream"))
        .args(["infer", "--json", "--greedy", "--max-new-tokens", "6", "--model"])
        .arg(dir.path())
        .arg("--events")
        .arg(&events)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    for key in ["description", "reasoning", "format_ok", "tokens", "latency_ms"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["windows"], 2, "6 events are two windows of 4: {v}");
    assert!(v["tokens"].as_u64().unwrap() > 0);

    // Events of two users are refused, naming the line.
    write_events(&events, &["u1", "u2"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefstream"))
        .env("PREFSTREAM_MODEL", dir.path())
        .args(["infer", "--events"])
        .arg(&events)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("events.jsonl:2"), "{stderr}");
}

/// An onnxruntime-genai GQA graph (`tests/fixtures/genai-gqa`): the shared past/present buffer
/// and re-feeding both give genai's own greedy tokens, and a left-padded ragged batch gives each
/// row what it gets alone.
#[test]
fn genai_gqa_graph_matches_genai() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/genai-gqa");
    let mut gen = open(&dir);
    let spec = gen.session().spec().clone();
    assert_eq!((spec.layers, spec.kv_heads, spec.head_dim), (2, 2, 16), "{spec:?}");
    assert!(spec.share_buffer && !spec.has_position_ids, "{spec:?}");
    let expect: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expect.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<Vec<u32>> { serde_json::from_value(v.clone()).unwrap() };
    let (prompts, want) = (ids(&expect["prompts"]), ids(&expect["tokens"]));
    gen.max_new_tokens = want[0].len();
    gen.ignore_stop = true;
    let argmax = |_: usize, l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
    let greedy = |gen: &mut Generator, p: &[Vec<u32>]| -> Vec<Vec<u32>> {
        gen.generate_ids(p, argmax).unwrap().into_iter().map(|o| o.tokens).collect()
    };
    assert_eq!(greedy(&mut gen, &prompts), want, "shared buffer");
    let ragged: Vec<Vec<u32>> = prompts.iter().enumerate().map(|(i, p)| p[3 * i..].to_vec()).collect();
    let batched = greedy(&mut gen, &ragged);
    for (row, p) in ragged.iter().enumerate() {
        assert_eq!(greedy(&mut gen, std::slice::from_ref(p))[0], batched[row], "row {row}");
    }
    gen.use_cache = false;
    assert_eq!(greedy(&mut gen, &prompts), want, "no cache");
}
