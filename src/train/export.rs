//! ONNX export of the trained policy and judge, mirroring `train::model` / `train::judge` op for op.
//!
//! The policy follows the Hugging Face Optimum / onnxruntime-genai decoder convention
//! (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` in;
//! `logits`, `present.{i}.key|value` out) so the serving engine can run it and a real
//! Optimum export alike. `tests/export.rs` checks both graphs against candle.

use std::{collections::HashMap, path::Path};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};

use crate::onnx::{Attribute, DataType, Dim, GraphBuilder};
use crate::train::judge::JudgeConfig;
use crate::train::model::{rotary_inv_freq_with, GptConfig, LN_EPS, MASK_VALUE, ROPE_THETA};

mod llama;

pub use llama::{export_llama, export_llama_as, quantize_blocks, Precision};

const FLOAT: i64 = DataType::Float as i64;

/// Sizes of one transformer block.
#[derive(Debug, Clone, Copy)]
struct BlockDims {
    d_model: usize,
    n_head: usize,
    d_ff: usize,
}

impl BlockDims {
    fn head_dim(&self) -> usize {
        self.d_model / self.n_head
    }
}

/// A graph under construction plus the weights it draws initializers from.
struct Emitter<'w> {
    g: GraphBuilder,
    weights: &'w HashMap<String, Tensor>,
    /// Element type of the caches (and of the activations of an fp16 Llama export).
    act: DataType,
    prec: Precision,
}

impl<'w> Emitter<'w> {
    fn new(name: &str, weights: &'w HashMap<String, Tensor>) -> Self {
        Self { g: GraphBuilder::new(name), weights, act: DataType::Float, prec: Precision::Fp32 }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<&'w Tensor> {
        let t = self.weights.get(name).with_context(|| format!("missing parameter `{name}`"))?;
        ensure!(t.dims() == shape, "parameter `{name}` has shape {:?}, expected {shape:?}", t.dims());
        Ok(t)
    }

    fn store(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.g.init_f32(name, &dims, &data))
    }

    /// A parameter stored as is (embeddings, LN, biases).
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<String> {
        let t = self.tensor(name, shape)?;
        self.store(name, t)
    }

    /// candle `Linear` keeps `[out, in]` and computes `x·Wᵀ`: store `Wᵀ` for a plain MatMul.
    fn linear(&mut self, x: &str, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<String> {
        let w = self.tensor(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let wt = self.store(&format!("{prefix}.weight_t"), &w.t()?.contiguous()?)?;
        let y = self.g.node("MatMul", &[x, &wt], vec![]);
        if !bias {
            return Ok(y);
        }
        let b = self.param(&format!("{prefix}.bias"), &[d_out])?;
        Ok(self.g.node("Add", &[&y, &b], vec![]))
    }

    fn layer_norm(&mut self, x: &str, prefix: &str, d: usize) -> Result<String> {
        let w = self.param(&format!("{prefix}.weight"), &[d])?;
        let b = self.param(&format!("{prefix}.bias"), &[d])?;
        Ok(self.g.node(
            "LayerNormalization",
            &[x, &w, &b],
            vec![Attribute::int("axis", -1), Attribute::float("epsilon", LN_EPS)],
        ))
    }

    /// Exact GELU: 0.5·x·(1 + erf(x/√2)), as candle's `gelu_erf`.
    fn gelu(&mut self, x: &str) -> String {
        let inv_sqrt2 = self.g.scalar_f32(std::f32::consts::FRAC_1_SQRT_2);
        let one = self.g.scalar_f32(1.0);
        let half = self.g.scalar_f32(0.5);
        let t = self.g.node("Mul", &[x, &inv_sqrt2], vec![]);
        let t = self.g.node("Erf", &[&t], vec![]);
        let t = self.g.node("Add", &[&t, &one], vec![]);
        let t = self.g.node("Mul", &[&t, &half], vec![]);
        self.g.node("Mul", &[&t, x], vec![])
    }

    /// `(1 - keep) * MASK_VALUE`, the additive twin of a 0/1 keep mask.
    fn mask_bias(&mut self, keep: &str) -> String {
        let one = self.g.scalar_f32(1.0);
        let big = self.g.scalar_f32(MASK_VALUE);
        let t = self.g.node("Sub", &[&one, keep], vec![]);
        self.g.node("Mul", &[&t, &big], vec![])
    }

    /// Size of axis `axis` of `x` as a 1-element int64 tensor.
    fn dim(&mut self, x: &str, axis: i64) -> String {
        self.g.node("Shape", &[x], vec![Attribute::int("start", axis), Attribute::int("end", axis + 1)])
    }

    fn scalar(&mut self, one_elem: &str) -> String {
        self.g.node("Squeeze", &[one_elem], vec![])
    }

    fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let axes = self.g.const_i64(axes);
        self.g.node("Unsqueeze", &[x, &axes], vec![])
    }

    fn embed(&mut self, table: &str, ids: &str) -> String {
        self.g.node("Gather", &[table, ids], vec![Attribute::int("axis", 0)])
    }

    /// Masked mean over axis 1: `Σ_j x_j·m_j / max(Σ_j m_j, 1)`; x `[b,L,d]`, mask int64 `[b,L]`.
    fn masked_mean(&mut self, x: &str, mask: &str) -> String {
        let m = self.g.node("Cast", &[mask], vec![Attribute::int("to", FLOAT)]);
        let m = self.unsqueeze(&m, &[2]);
        let axis1 = self.g.const_i64(&[1]);
        let xm = self.g.node("Mul", &[x, &m], vec![]);
        let num = self.g.node("ReduceSum", &[&xm, &axis1], vec![Attribute::int("keepdims", 0)]);
        let den = self.g.node("ReduceSum", &[&m, &axis1], vec![Attribute::int("keepdims", 0)]);
        let one = self.g.scalar_f32(1.0);
        let den = self.g.node("Max", &[&den, &one], vec![]);
        self.g.node("Div", &[&num, &den], vec![])
    }

    /// cos and sin `[b,1,s,hd]` for int64 `position_ids` `[b,s]`, as `model::rotary_tables`.
    fn rotary_tables(&mut self, pos: &str, hd: usize, theta: f32) -> (String, String) {
        let inv = self.g.init_f32("rope.inv_freq", &[(hd / 2) as i64], &rotary_inv_freq_with(hd, theta));
        let p = self.g.node("Cast", &[pos], vec![Attribute::int("to", FLOAT)]);
        let p = self.unsqueeze(&p, &[2]);
        let angles = self.g.node("Mul", &[&p, &inv], vec![]);
        let angles = self.g.node("Concat", &[&angles, &angles], vec![Attribute::int("axis", 2)]);
        let angles = self.unsqueeze(&angles, &[1]);
        (self.g.node("Cos", &[&angles], vec![]), self.g.node("Sin", &[&angles], vec![]))
    }

    /// x·cos + rotate_half(x)·sin for x `[b,h,s,hd]`.
    fn rotate(&mut self, x: &str, hd: usize, (cos, sin): (&str, &str)) -> String {
        let half = (hd / 2) as i64;
        let axis = self.g.const_i64(&[3]);
        let (zero, mid, end) = (self.g.const_i64(&[0]), self.g.const_i64(&[half]), self.g.const_i64(&[2 * half]));
        let first = self.g.node("Slice", &[x, &zero, &mid, &axis], vec![]);
        let second = self.g.node("Slice", &[x, &mid, &end, &axis], vec![]);
        let second = self.g.node("Neg", &[&second], vec![]);
        let rotated = self.g.node("Concat", &[&second, &first], vec![Attribute::int("axis", 3)]);
        let a = self.g.node("Mul", &[x, cos], vec![]);
        let b = self.g.node("Mul", &[&rotated, sin], vec![]);
        self.g.node("Add", &[&a, &b], vec![])
    }

    /// keep[b,1,s,t] = (j <= past + i) * attention_mask[b,j], with past = total - s (as
    /// attention_bias), and its additive twin.
    fn causal_mask(&mut self, ids: &str, mask: &str) -> (String, String) {
        let s1 = self.dim(ids, 1);
        let t1 = self.dim(mask, 1);
        let past1 = self.g.node("Sub", &[&t1, &s1], vec![]);
        let (s0, t0, past0) = (self.scalar(&s1), self.scalar(&t1), self.scalar(&past1));
        let zero = self.g.scalar_i64(0);
        let one = self.g.scalar_i64(1);
        let rows = self.g.node("Range", &[&zero, &s0, &one], vec![]);
        let rows = self.g.node("Add", &[&rows, &past0], vec![]);
        let rows = self.unsqueeze(&rows, &[1]);
        let cols = self.g.node("Range", &[&zero, &t0, &one], vec![]);
        let causal = self.g.node("LessOrEqual", &[&cols, &rows], vec![]);
        let causal = self.g.node("Cast", &[&causal], vec![Attribute::int("to", FLOAT)]);
        let pad = self.g.node("Cast", &[mask], vec![Attribute::int("to", FLOAT)]);
        let pad = self.unsqueeze(&pad, &[1, 2]);
        let keep = self.g.node("Mul", &[&causal, &pad], vec![]);
        let bias = self.mask_bias(&keep);
        (keep, bias)
    }

    /// The decoder inputs of the Optimum convention, with `kv_heads` cache heads.
    fn decoder_inputs(&mut self, layers: usize, kv_heads: usize, head_dim: usize) -> DecoderIo {
        let (batch, seq) = (Dim::from("batch_size"), Dim::from("sequence_length"));
        let total = Dim::from("total_sequence_length");
        let ids = self.g.input("input_ids", DataType::Int64, vec![batch.clone(), seq.clone()]);
        let mask = self.g.input("attention_mask", DataType::Int64, vec![batch.clone(), total.clone()]);
        let pos = self.g.input("position_ids", DataType::Int64, vec![batch.clone(), seq]);
        let past_shape = vec![batch.clone(), kv_heads.into(), "past_sequence_length".into(), head_dim.into()];
        let pasts = (0..layers)
            .map(|i| {
                (
                    self.g.input(&format!("past_key_values.{i}.key"), self.act, past_shape.clone()),
                    self.g.input(&format!("past_key_values.{i}.value"), self.act, past_shape.clone()),
                )
            })
            .collect();
        let present_shape = vec![batch, kv_heads.into(), total, head_dim.into()];
        DecoderIo { ids, mask, pos, pasts, present_shape }
    }

    /// Names `k`/`v` as layer `i`'s `present.{i}.key|value` outputs.
    fn presents(&mut self, i: usize, k: String, v: String, shape: &[Dim]) {
        for (value, kind) in [(k, "key"), (v, "value")] {
            let name = format!("present.{i}.{kind}");
            self.g.node_to("Identity", &[&value], &name, vec![]);
            self.g.output(&name, self.act, shape.to_vec());
        }
    }

    /// One pre-LN block (shared by policy and judge). `keep`/`bias` are `[b,1,s|1,total]`;
    /// `past` are `[b,h,past,hd]` caches to prepend (of rotated keys, with `rope`). Returns
    /// (x, k, v) with k/v `[b,h,total,hd]`.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        x: &str,
        prefix: &str,
        dims: BlockDims,
        keep: &str,
        bias: &str,
        past: Option<(&str, &str)>,
        rope: Option<(&str, &str)>,
    ) -> Result<(String, String, String)> {
        let (d, h, hd) = (dims.d_model, dims.n_head, dims.head_dim());
        let heads_shape = self.g.const_i64(&[0, 0, h as i64, hd as i64]);
        let model_shape = self.g.const_i64(&[0, 0, d as i64]);
        let to_heads = vec![Attribute::ints("perm", &[0, 2, 1, 3])];

        let hn = self.layer_norm(x, &format!("{prefix}.ln1"), d)?;
        let split = |e: &mut Emitter<'w>, name: &str| -> Result<String> {
            let y = e.linear(&hn, &format!("{prefix}.attn.{name}"), d, d, true)?;
            let y = e.g.node("Reshape", &[&y, &heads_shape], vec![]);
            Ok(e.g.node("Transpose", &[&y], to_heads.clone()))
        };
        let mut q = split(self, "q")?;
        let mut k = split(self, "k")?;
        let mut v = split(self, "v")?;
        if let Some(tables) = rope {
            q = self.rotate(&q, hd, tables);
            k = self.rotate(&k, hd, tables);
        }
        if let Some((pk, pv)) = past {
            k = self.g.node("Concat", &[pk, &k], vec![Attribute::int("axis", 2)]);
            v = self.g.node("Concat", &[pv, &v], vec![Attribute::int("axis", 2)]);
        }
        let kt = self.g.node("Transpose", &[&k], vec![Attribute::ints("perm", &[0, 1, 3, 2])]);
        let scores = self.g.node("MatMul", &[&q, &kt], vec![]);
        let scale = self.g.scalar_f32((1.0 / (hd as f64).sqrt()) as f32);
        let scores = self.g.node("Mul", &[&scores, &scale], vec![]);
        let scores = self.g.node("Mul", &[&scores, keep], vec![]);
        let scores = self.g.node("Add", &[&scores, bias], vec![]);
        let p = self.g.node("Softmax", &[&scores], vec![Attribute::int("axis", -1)]);
        let a = self.g.node("MatMul", &[&p, &v], vec![]);
        let a = self.g.node("Transpose", &[&a], to_heads);
        let a = self.g.node("Reshape", &[&a, &model_shape], vec![]);
        let o = self.linear(&a, &format!("{prefix}.attn.o"), d, d, true)?;
        let x = self.g.node("Add", &[x, &o], vec![]);

        let hn = self.layer_norm(&x, &format!("{prefix}.ln2"), d)?;
        let f = self.linear(&hn, &format!("{prefix}.mlp.fc"), d, dims.d_ff, true)?;
        let f = self.gelu(&f);
        let f = self.linear(&f, &format!("{prefix}.mlp.proj"), dims.d_ff, d, true)?;
        let x = self.g.node("Add", &[&x, &f], vec![]);
        Ok((x, k, v))
    }
}

/// Writes the policy as an Optimum-convention decoder with KV cache.
pub fn export_policy(cfg: &GptConfig, weights: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    ensure!(cfg.n_head > 0 && cfg.d_model.is_multiple_of(cfg.n_head), "d_model must be a multiple of n_head");
    let bd = BlockDims { d_model: cfg.d_model, n_head: cfg.n_head, d_ff: cfg.d_ff };
    let mut e = Emitter::new("prefstream_policy", weights);
    let DecoderIo { ids, mask, pos, pasts, present_shape } = e.decoder_inputs(cfg.n_layer, cfg.n_head, cfg.head_dim());
    let (keep, bias) = e.causal_mask(&ids, &mask);

    let wte = e.param("wte.weight", &[cfg.vocab_size, cfg.d_model])?;
    let mut x = e.embed(&wte, &ids);
    let rope = if cfg.rotary {
        Some(e.rotary_tables(&pos, cfg.head_dim(), ROPE_THETA))
    } else {
        let wpe = e.param("wpe.weight", &[cfg.max_positions, cfg.d_model])?;
        let posv = e.embed(&wpe, &pos);
        x = e.g.node("Add", &[&x, &posv], vec![]);
        None
    };

    for (i, (pk, pv)) in pasts.iter().enumerate() {
        let tables = rope.as_ref().map(|(c, s)| (c.as_str(), s.as_str()));
        let (y, k, v) = e.block(&x, &format!("h.{i}"), bd, &keep, &bias, Some((pk, pv)), tables)?;
        x = y;
        e.presents(i, k, v, &present_shape);
    }
    let x = e.layer_norm(&x, "ln_f", cfg.d_model)?;
    let logits = e.linear(&x, "lm_head", cfg.d_model, cfg.vocab_size, false)?;
    e.g.node_to("Identity", &[&logits], "logits", vec![]);
    let logits_shape = vec!["batch_size".into(), "sequence_length".into(), Dim::from(cfg.vocab_size)];
    e.g.output("logits", DataType::Float, logits_shape);

    write(e, path)
}

struct DecoderIo {
    ids: String,
    mask: String,
    pos: String,
    pasts: Vec<(String, String)>,
    present_shape: Vec<Dim>,
}

/// Writes the judge: description encoder + bilinear score against each response's mean embedding.
pub fn export_judge(cfg: &JudgeConfig, weights: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    ensure!(cfg.n_head > 0 && cfg.d_model.is_multiple_of(cfg.n_head), "d_model must be a multiple of n_head");
    let bd = BlockDims { d_model: cfg.d_model, n_head: cfg.n_head, d_ff: cfg.d_ff };
    let d = cfg.d_model;
    let batch = Dim::from("batch");
    let mut e = Emitter::new("prefstream_judge", weights);
    let pair = |e: &mut Emitter, ids: &str, mask: &str, len: &str| {
        let shape = vec![batch.clone(), Dim::from(len)];
        (e.g.input(ids, DataType::Int64, shape.clone()), e.g.input(mask, DataType::Int64, shape))
    };
    let (desc_ids, desc_mask) = pair(&mut e, "description_ids", "description_mask", "description_length");
    let (a_ids, a_mask) = pair(&mut e, "a_ids", "a_mask", "a_length");
    let (b_ids, b_mask) = pair(&mut e, "b_ids", "b_mask", "b_length");

    // Bidirectional attention: keep[b,1,1,L] is the description mask alone.
    let keep = e.g.node("Cast", &[&desc_mask], vec![Attribute::int("to", FLOAT)]);
    let keep = e.unsqueeze(&keep, &[1, 2]);
    let bias = e.mask_bias(&keep);

    let l1 = e.dim(&desc_ids, 1);
    let l0 = e.scalar(&l1);
    let zero = e.g.scalar_i64(0);
    let one = e.g.scalar_i64(1);
    let pos = e.g.node("Range", &[&zero, &l0, &one], vec![]);
    let wte = e.param("desc.wte.weight", &[cfg.vocab_size, d])?;
    let wpe = e.param("desc.wpe.weight", &[cfg.max_positions, d])?;
    let tok = e.embed(&wte, &desc_ids);
    let posv = e.embed(&wpe, &pos);
    let mut x = e.g.node("Add", &[&tok, &posv], vec![]);
    for i in 0..cfg.n_layer {
        x = e.block(&x, &format!("desc.h.{i}"), bd, &keep, &bias, None, None)?.0;
    }
    let x = e.layer_norm(&x, "desc.ln_f", d)?;
    let u = e.masked_mean(&x, &desc_mask);
    let uw = e.linear(&u, "bilinear", d, d, false)?;

    let resp = e.param("resp.wte.weight", &[cfg.vocab_size, d])?;
    let axis1 = e.g.const_i64(&[1]);
    let mut scores = Vec::new();
    for (ids, mask) in [(&a_ids, &a_mask), (&b_ids, &b_mask)] {
        let emb = e.embed(&resp, ids);
        let v = e.masked_mean(&emb, mask);
        let prod = e.g.node("Mul", &[&uw, &v], vec![]);
        scores.push(e.g.node("ReduceSum", &[&prod, &axis1], vec![Attribute::int("keepdims", 1)]));
    }
    e.g.node_to("Concat", &[&scores[0], &scores[1]], "logits", vec![Attribute::int("axis", 1)]);
    e.g.output("logits", DataType::Float, vec![batch, Dim::from(2usize)]);

    write(e, path)
}

fn write(e: Emitter, path: &Path) -> Result<()> {
    e.g.finish().write(path).with_context(|| format!("writing {}", path.display()))
}
