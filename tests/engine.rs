//! The ONNX engine against the candle policy it was exported from, the cache against re-feeding,
//! the batcher under concurrency, `prefstream infer`, and a package whose tokenizer has none of
//! our special token names (ChatML, tags as plain text). Needs ONNX Runtime
//! (`scripts/setup.sh`); a missing library fails these tests with the fix in the message.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ort::value::TensorElementType;
use prefstream::engine::Stop;
use prefstream::engine::{load_package, BatcherConfig, Engine, Generator, Request};
use prefstream::event::{Event, EventBody};
use prefstream::prompt::{build_prompt, build_response, parse_output, Template, TEMPLATE_ID};
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

/// A random tiny policy over `vocab_size` tokens exported to `dir/model.onnx`.
fn export_random(vocab_size: usize, dir: &Path) -> (Gpt, GptConfig) {
    let cfg =
        GptConfig { vocab_size, n_layer: 2, n_head: 4, d_model: 32, d_ff: 64, max_positions: 1024, rotary: false };
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
    (model, cfg)
}

/// A random tiny policy exported as a complete package in `dir`; returns the candle twin.
fn package(dir: &Path) -> (Gpt, TextTokenizer) {
    let tok = tokenizer();
    let (model, cfg) = export_random(tok.vocab_size(), dir);
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
            // The engine's text leaves the end token out; candle's keeps it.
            assert_eq!(g.text, tok.decode_output(&w.tokens));
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

const CHATML_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A byte-level BPE tokenizer whose only special tokens are ChatML's (SmolLM2's names): no
/// `<pad>`, no `<eos>`, and the tags are ordinary text.
fn chatml_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut corpus = Vec::new();
    for i in 0..12 {
        corpus.push(Template::ChatMl.build_prompt(None, [&signal(i), &signal(i + 1)]));
        corpus.push(Template::ChatMl.build_response("The user picks calm plans.", "Calm advice.", "<|im_end|>"));
    }
    let trainer = BpeTrainer::builder()
        .vocab_size(600)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(CHATML_SPECIALS.iter().map(|t| tokenizers::AddedToken::from(*t, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = tokenizers::models::TrainerWrapper::from(trainer);
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, corpus.into_iter()).unwrap();
    tok
}

/// An Optimum-convention package of "someone else's" model: random weights, the ChatML
/// tokenizer, a ChatML template, and end/pad tokens named in the manifest (`eos` as given).
fn chatml_package(dir: &Path, eos: serde_json::Value) {
    let tok = chatml_tokenizer();
    let (_, cfg) = export_random(tok.get_vocab_size(true), dir);
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let manifest = serde_json::json!({
        "name": "foreign-chatml", "version": "0.0.1", "template": "alignx-stream-chatml-v1",
        "generation": { "max_new_tokens": 24 },
        "special_tokens": {
            "eos": eos, "pad": "<|im_end|>",
            "think_open": "<think>", "think_close": "</think>", "answer_open": "<answer>", "answer_close": "</answer>"
        },
        "policy_config": cfg,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

/// Feeds `script` token by token through the pick closure (then a filler token forever),
/// recording the logits each step was offered.
fn forced(gen: &mut Generator, prompt: &[u32], script: &[u32]) -> (prefstream::engine::Output, Vec<Vec<f32>>) {
    let filler = gen.tokenizer().encode("x")[0];
    let mut seen = Vec::new();
    let out = gen
        .generate_ids(&[prompt.to_vec()], |_, logits| {
            seen.push(logits.to_vec());
            script.get(seen.len() - 1).copied().unwrap_or(filler)
        })
        .unwrap();
    (out.into_iter().next().unwrap(), seen)
}

#[test]
fn optimum_model_with_foreign_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    chatml_package(dir.path(), "<|im_end|>".into());
    let (manifest, mut gen) = load_package(dir.path(), &OrtDevice::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(manifest.template, Template::ChatMl);
    let tok = gen.tokenizer().clone();
    let im_end = tok.encode("<|im_end|>");
    assert_eq!((im_end.len(), tok.eos, tok.pad, tok.eos_ids.clone()), (1, im_end[0], im_end[0], im_end.clone()));
    assert!(tok.encode("</answer>").len() > 1, "the tag must be plain text here");
    assert_eq!(tok.answer_open, None);

    // Generation runs on the package's own template.
    let prompt_text = manifest.template.build_prompt(Some("likes tea"), [&signal(0), &signal(1)]);
    assert!(prompt_text.starts_with("<|im_start|>system"));
    let prompt = tok.encode(&prompt_text);
    assert!(prompt.contains(&tok.encode("<|im_start|>")[0]));
    let free = gen.generate(std::slice::from_ref(&prompt_text), &SamplingParams::GREEDY, 0).unwrap();
    assert!(!free[0].tokens.is_empty());
    assert!(!free[0].text.contains("<|im_end|>") && !free[0].text.contains("<|endoftext|>"), "{:?}", free[0].text);

    // Stop by the end token: the row ends there and its text leaves the token out.
    let mut script = tok.encode("some reasoning");
    script.push(tok.eos);
    let (out, _) = forced(&mut gen, &prompt, &script);
    assert_eq!((out.tokens.clone(), out.stop), (script.clone(), Stop::StopToken));
    assert_eq!(out.text, tok.decode(&script[..script.len() - 1]));
    assert!(!out.text.contains("<|"), "{}", out.text);

    // Stop by `</answer>` spelled in several tokens; the well-formed output passes the check.
    gen.no_repeat_ngram = 1;
    let script = tok.encode("r</think><answer>d d</answer>");
    let (out, seen) = forced(&mut gen, &prompt, &script);
    assert_eq!((out.tokens.clone(), out.stop), (script.clone(), Stop::StopToken), "{:?}", out.text);
    assert!(!out.text.contains("<|"), "{}", out.text);
    let parsed = parse_output(&out.text);
    assert!(parsed.format_ok(), "{:?}: {parsed:?}", out.text);
    assert_eq!((parsed.reasoning.as_str(), parsed.description.as_deref()), ("r", Some("d d")));
    // The no-repeat constraint found the multi-token `<answer>`: nothing is blocked before the
    // answer, and the answer's first token is blocked once it has been used.
    let first = (1..=script.len()).find(|&n| tok.decode(&script[..n]).contains("<answer>")).unwrap();
    assert!(seen[..=first].iter().all(|l| l.iter().all(|v| v.is_finite())), "blocked before the answer");
    assert_eq!(seen[first + 1][script[first] as usize], f32::NEG_INFINITY);

    // The CLI prints a sensible --json for it: no special token in the raw text.
    let events = dir.path().join("events.jsonl");
    write_events(&events, &["u1"; 2]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefstream"))
        .args(["infer", "--json", "--greedy", "--model"])
        .arg(dir.path())
        .arg("--events")
        .arg(&events)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    // Random weights may spell "<|" from ordinary byte tokens; only whole special tokens count.
    let raw = v["raw"].as_str().unwrap();
    assert!(v["tokens"].as_u64().unwrap() > 0 && !CHATML_SPECIALS.iter().any(|t| raw.contains(t)), "{v}");
}

#[test]
fn several_end_tokens_each_stop_and_an_absent_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    chatml_package(dir.path(), serde_json::json!(["<|im_end|>", "<|endoftext|>"]));
    let mut gen = open(dir.path());
    let tok = gen.tokenizer().clone();
    let prompt = tok.encode(&Template::ChatMl.build_prompt(None, [&signal(3)]));
    let endoftext = tok.encode("<|endoftext|>")[0];
    assert_eq!(tok.eos_ids, [tok.eos, endoftext]);
    let (out, _) = forced(&mut gen, &prompt, &[tok.encode("r")[0], endoftext]);
    assert_eq!((out.tokens.len(), out.stop), (2, Stop::StopToken));
    assert_eq!(out.text, tok.decode(&out.tokens[..1]));

    chatml_package(dir.path(), "<|eot_id|>".into());
    let e = load_package(dir.path(), &OrtDevice::Cpu).err().expect("an absent end token is an error").to_string();
    assert!(e.contains("<|eot_id|>") && e.contains("tokenizer.json"), "{e}");
    // And our own names are not assumed: the default `<eos>` is absent from this vocabulary.
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("special_tokens");
    std::fs::write(dir.path().join("manifest.json"), m.to_string()).unwrap();
    let e = load_package(dir.path(), &OrtDevice::Cpu).err().expect("no <eos> here").to_string();
    assert!(e.contains("<eos>"), "{e}");
}
