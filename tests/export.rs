//! The exported ONNX graphs must compute what the candle models compute. Needs ONNX Runtime
//! (`scripts/setup.sh`); a missing library fails the test with the fix in the message.

mod onnx_check;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onnx_check::{max_diff, ort_f32, ort_i64};
use ort::session::{Session, SessionInputValue};
use prefstream::runtime::{self, Device as OrtDevice};
use prefstream::train::export::{export_judge, export_policy};
use prefstream::train::judge::{Judge, JudgeConfig};
use prefstream::train::model::{positions_from_mask, Decoder, Gpt, GptConfig, KvPair};

const TOL: f32 = 1e-4;

/// Re-draws every parameter so LN and biases are non-trivial too (defaults are 1/0).
fn randomize(vm: &VarMap) -> HashMap<String, Tensor> {
    let data = vm.data().lock().unwrap();
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        let noise = Tensor::randn(0f32, 0.3, t.shape(), t.device()).unwrap();
        let is_ln = name.contains("ln");
        let value = if is_ln && name.ends_with(".weight") { (noise + 1.0).unwrap() } else { noise };
        var.set(&value).unwrap();
    }
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

fn open(path: &std::path::Path) -> Session {
    runtime::session_from_file(path, &OrtDevice::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

fn ids_tensor(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

/// Guards against a vacuous comparison (e.g. everything ~0).
fn assert_nontrivial(t: &Tensor) {
    let m = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(m > 0.1, "reference output is near zero ({m})");
}

/// Runs the policy graph and returns the worst diff over logits and all presents.
fn run_policy(
    session: &mut Session,
    ids: &[Vec<u32>],
    mask: &[Vec<u32>],
    pos: &[Vec<u32>],
    past: &[KvPair],
    logits: &Tensor,
    presents: &[KvPair],
) -> f32 {
    let mut inputs: Vec<(String, SessionInputValue)> = vec![
        ("input_ids".into(), ort_i64(ids)),
        ("attention_mask".into(), ort_i64(mask)),
        ("position_ids".into(), ort_i64(pos)),
    ];
    for (i, (k, v)) in past.iter().enumerate() {
        inputs.push((format!("past_key_values.{i}.key"), ort_f32(k)));
        inputs.push((format!("past_key_values.{i}.value"), ort_f32(v)));
    }
    let out = session.run(inputs).unwrap_or_else(|e| panic!("onnx run: {e}"));
    let mut worst = max_diff(&out, "logits", logits);
    for (i, (k, v)) in presents.iter().enumerate() {
        worst = worst.max(max_diff(&out, &format!("present.{i}.key"), k));
        worst = worst.max(max_diff(&out, &format!("present.{i}.value"), v));
    }
    worst
}

#[test]
fn policy_onnx_matches_candle() {
    policy_matches(false);
}

#[test]
fn rotary_policy_onnx_matches_candle() {
    policy_matches(true);
}

fn policy_matches(rotary: bool) {
    let dev = Device::Cpu;
    let cfg = GptConfig { vocab_size: 64, n_layer: 2, n_head: 4, d_model: 32, d_ff: 64, max_positions: 64, rotary };
    let vm = VarMap::new();
    let model = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let weights = randomize(&vm);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.onnx");
    export_policy(&cfg, &weights, &path).unwrap();
    let mut session = open(&path);

    // (a) prefill: batch 2, seq 5, row 1 left-padded, zero-length pasts.
    let ids = vec![vec![3u32, 17, 42, 8, 63], vec![0, 0, 5, 29, 11]];
    let mask = vec![vec![1u32; 5], vec![0, 0, 1, 1, 1]];
    let pos = positions_from_mask(&mask, 0);
    let (logits, presents) = model.forward(&ids_tensor(&ids), &ids_tensor(&mask), &ids_tensor(&pos), None).unwrap();
    assert_nontrivial(&logits);
    let empty = model.empty_past(2, &dev).unwrap();
    let diff_a = run_policy(&mut session, &ids, &mask, &pos, &empty, &logits, &presents);
    println!("policy prefill max diff {diff_a:e}");
    assert!(diff_a < TOL, "prefill diff {diff_a}");

    // (b) one decode step on a past of length 5.
    let ids_b = vec![vec![21u32], vec![7]];
    let mask_b: Vec<Vec<u32>> = mask.iter().map(|r| r.iter().copied().chain([1]).collect()).collect();
    let pos_b = positions_from_mask(&mask_b, 5);
    let (logits_b, presents_b) =
        model.forward(&ids_tensor(&ids_b), &ids_tensor(&mask_b), &ids_tensor(&pos_b), Some(&presents)).unwrap();
    let diff_b = run_policy(&mut session, &ids_b, &mask_b, &pos_b, &presents, &logits_b, &presents_b);
    println!("policy decode-step max diff {diff_b:e}");
    assert!(diff_b < TOL, "decode diff {diff_b}");
}

#[test]
fn judge_onnx_matches_candle() {
    let dev = Device::Cpu;
    let cfg = JudgeConfig { vocab_size: 64, d_model: 32, n_head: 4, n_layer: 2, d_ff: 64, max_positions: 64 };
    let vm = VarMap::new();
    let judge = Judge::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let weights = randomize(&vm);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("judge.onnx");
    export_judge(&cfg, &weights, &path).unwrap();
    let mut session = open(&path);

    // Right padding in every input, plus an all-padding response (mean over nothing -> 0).
    let d = vec![vec![1u32, 2, 3, 4, 5, 6], vec![7, 8, 9, 0, 0, 0]];
    let dm = vec![vec![1u32; 6], vec![1, 1, 1, 0, 0, 0]];
    let a = vec![vec![10u32, 11, 12], vec![13, 0, 0]];
    let am = vec![vec![1u32, 1, 1], vec![1, 0, 0]];
    let b = vec![vec![20u32, 21], vec![0, 0]];
    let bm = vec![vec![1u32, 1], vec![0, 0]];
    let t = ids_tensor;
    let want = judge.forward(&t(&d), &t(&dm), &t(&a), &t(&am), &t(&b), &t(&bm)).unwrap();
    assert_nontrivial(&want);
    let inputs: Vec<(&str, SessionInputValue)> = vec![
        ("description_ids", ort_i64(&d)),
        ("description_mask", ort_i64(&dm)),
        ("a_ids", ort_i64(&a)),
        ("a_mask", ort_i64(&am)),
        ("b_ids", ort_i64(&b)),
        ("b_mask", ort_i64(&bm)),
    ];
    let out = session.run(inputs).unwrap_or_else(|e| panic!("onnx run: {e}"));
    let diff = max_diff(&out, "logits", &want);
    println!("judge max diff {diff:e}");
    assert!(diff < TOL, "judge diff {diff}");
}

#[test]
fn missing_model_is_an_error_naming_it() {
    let err = runtime::session_from_file(std::path::Path::new("/no/such/model.onnx"), &OrtDevice::Cpu).err().unwrap();
    assert!(err.to_string().contains("/no/such/model.onnx"), "{err}");
}

/// Asking for CUDA on a library without the CUDA EP must fail, never fall back to CPU.
#[test]
fn cuda_on_a_cpu_library_is_an_error() {
    use ort::ep::ExecutionProvider;
    runtime::environment().unwrap_or_else(|e| panic!("{e}"));
    if ort::ep::CUDA::is_available().unwrap() {
        return; // a CUDA build: nothing to check here
    }
    let cfg = GptConfig { vocab_size: 8, n_layer: 1, n_head: 1, d_model: 4, d_ff: 8, max_positions: 8, rotary: false };
    let vm = VarMap::new();
    Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let weights = randomize(&vm);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.onnx");
    export_policy(&cfg, &weights, &path).unwrap();
    let Err(err) = runtime::session_from_file(&path, &OrtDevice::Cuda(0)) else {
        panic!("CUDA silently fell back to CPU");
    };
    println!("{err}");
    assert!(err.to_string().contains("CUDA"), "{err}");
}
