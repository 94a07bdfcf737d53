//! ONNX export of a Llama-family decoder (`base::llama::Llama`, adapters merged), in four
//! precisions: fp32 (the reference), fp16 for CUDA, and 8- or 4-bit block-quantized weights
//! (ONNX Runtime's `MatMulNBits`) with fp32 activations for CPU serving.

use std::{collections::HashMap, path::Path, str::FromStr};

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{write, Emitter, FLOAT};
use crate::onnx::{Attribute, DataType, Dim, TensorProto};
use crate::train::base::{layer_name, LlamaConfig, EMBED, FINAL_NORM, LM_HEAD};
use crate::train::model::rotary_inv_freq_with;

const FLOAT16: i64 = DataType::Float16 as i64;

/// Weights per scale in the quantized exports (what ONNX Runtime's own 4-bit quantizer uses).
pub const QUANT_BLOCK: usize = 32;

/// How the export stores weights and what it computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere: the reference, and what the CPU runs without quantization.
    #[default]
    Fp32,
    /// fp16 weights, activations and caches; RMS norms and softmax in fp32. For CUDA.
    Fp16,
    /// Projections and LM head as 8-bit blocks (`MatMulNBits`, int8 compute on CPU),
    /// embedding table in fp16, activations and caches in fp32. For CPU serving.
    Int8,
    /// The same with 4-bit blocks.
    Int4,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }

    fn bits(self) -> Option<u32> {
        match self {
            Precision::Int8 => Some(8),
            Precision::Int4 => Some(4),
            _ => None,
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// Symmetric block quantization of `w` (`[n, k]`, row-major) along k for `MatMulNBits`: per
/// row, blocks of `block` weights share one scale (`max |w| / qmax`); a code is `round(w /
/// scale)` offset by the format's default zero point (8 for 4 bits, 128 for 8), 4-bit codes
/// packed two per byte, low nibble first. Returns (codes `[n, k_blocks, block·bits/8]`,
/// scales `[n, k_blocks]`); a k not a multiple of `block` is padded with zeros.
pub fn quantize_blocks(w: &[f32], n: usize, k: usize, bits: u32, block: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(bits == 4 || bits == 8, "MatMulNBits here takes 4 or 8 bits");
    assert_eq!(w.len(), n * k, "weights are not [n, k]");
    let k_blocks = k.div_ceil(block);
    let blob = block * bits as usize / 8;
    let (qmax, zero) = ((1i32 << (bits - 1)) - 1, 1i32 << (bits - 1));
    let mut codes = vec![0u8; n * k_blocks * blob];
    let mut scales = vec![0f32; n * k_blocks];
    for row in 0..n {
        for kb in 0..k_blocks {
            let (start, end) = (kb * block, ((kb + 1) * block).min(k));
            let vals = &w[row * k + start..row * k + end];
            let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / qmax as f32;
            scales[row * k_blocks + kb] = scale;
            let out = &mut codes[(row * k_blocks + kb) * blob..][..blob];
            for j in 0..block {
                let v = vals.get(j).copied().unwrap_or(0.0);
                let q = if scale > 0.0 { (v / scale).round() as i32 } else { 0 };
                let code = (q.clamp(-zero, qmax) + zero) as u8;
                if bits == 8 {
                    out[j] = code;
                } else {
                    out[j / 2] |= code << (4 * (j % 2));
                }
            }
        }
    }
    (codes, scales)
}

/// Writes the decoder in fp32 (see `export_llama_as`).
pub fn export_llama(cfg: &LlamaConfig, weights: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    export_llama_as(cfg, weights, path, Precision::Fp32)
}

/// Writes a Llama-family decoder in the Optimum convention (logits of the last position only),
/// caches with `num_key_value_heads` heads. The LM head reads the embedding through `Gemm(transB)` when tied, so the 49k × d
/// table is stored once (twice when quantized: fp16 rows to gather, 4/8-bit blocks to multiply).
pub fn export_llama_as(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    path: &Path,
    prec: Precision,
) -> Result<()> {
    cfg.check()?;
    let (d, hd) = (cfg.hidden_size, cfg.head_dim());
    let mut e = Emitter::new("prefstream_llama", weights);
    e.prec = prec;
    e.act = if prec == Precision::Fp16 { DataType::Float16 } else { DataType::Float };
    let io = e.decoder_inputs(cfg.num_hidden_layers, cfg.num_key_value_heads, hd);
    // Only the additive mask: exp(score - 1e9) is 0 as exp(-1e9) is, one pass fewer a layer.
    let (_, bias) = e.causal_mask(&io.ids, &io.mask);
    let table = e.tensor(EMBED, &[cfg.vocab_size, d])?;
    let embed =
        if prec == Precision::Fp32 { e.param(EMBED, &[cfg.vocab_size, d])? } else { e.store_f16(EMBED, table)? };
    let rows = e.embed(&embed, &io.ids);
    let mut x = if prec == Precision::Fp32 { rows } else { e.act_of_f16(&rows) };
    let (cos, sin) = e.rotary_caches(cfg);
    for (i, (pk, pv)) in io.pasts.iter().enumerate() {
        let (y, k, v) = e.llama_block(&x, i, cfg, &bias, (pk, pv), (&io.pos, &cos, &sin))?;
        x = y;
        e.presents(i, k, v, &io.present_shape);
    }
    // Logits of the last position only, `[b, 1, vocab]`: generation reads no other, and a
    // prefill of 16 × 310 tokens would otherwise write 975 MB of fp32 logits and spend an LM-head
    // product on every prompt token. (The engine reads the last position of any `[b, s, vocab]`.)
    let (last, end, axis) = (e.g.const_i64(&[-1]), e.g.const_i64(&[i64::MAX]), e.g.const_i64(&[1]));
    let x = e.g.node("Slice", &[&x, &last, &end, &axis], vec![]);
    let x = e.rms_norm(&x, FINAL_NORM, d, cfg.rms_norm_eps)?;
    let head_name = if cfg.tie_word_embeddings { EMBED } else { LM_HEAD };
    let logits = match prec {
        Precision::Fp32 | Precision::Fp16 => {
            let head = match (prec, cfg.tie_word_embeddings) {
                (_, true) => embed, // the table stored for the gather
                (Precision::Fp32, false) => e.param(LM_HEAD, &[cfg.vocab_size, d])?,
                _ => {
                    let t = e.tensor(LM_HEAD, &[cfg.vocab_size, d])?;
                    e.store_f16(LM_HEAD, t)?
                }
            };
            let rows = e.g.const_i64(&[-1, d as i64]);
            let flat = e.g.node("Reshape", &[&x, &rows], vec![]);
            let logits = e.g.node("Gemm", &[&flat, &head], vec![Attribute::int("transB", 1)]);
            let shape = e.g.const_i64(&[-1, 1, cfg.vocab_size as i64]);
            e.g.node("Reshape", &[&logits, &shape], vec![])
        }
        Precision::Int8 | Precision::Int4 => {
            let w = e.tensor(head_name, &[cfg.vocab_size, d])?;
            e.nbits(&x, head_name, w)?
        }
    };
    e.g.node_to("Identity", &[&logits], "logits", vec![]);
    let logits_shape = vec!["batch_size".into(), Dim::from(1usize), Dim::from(cfg.vocab_size)];
    e.g.output("logits", e.act, logits_shape);
    write(e, path)
}

impl Emitter<'_> {
    /// `t` as an fp16 initializer.
    fn store_f16(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.g.init_f16(&format!("{name}.f16"), &dims, &data))
    }

    fn cast(&mut self, x: &str, to: i64) -> String {
        self.g.node("Cast", &[x], vec![Attribute::int("to", to)])
    }

    /// An fp32 value in the activation type.
    fn act_of_f32(&mut self, x: &str) -> String {
        if self.act == DataType::Float16 {
            self.cast(x, FLOAT16)
        } else {
            x.to_string()
        }
    }

    /// An fp16 value (gathered embedding rows) in the activation type.
    fn act_of_f16(&mut self, x: &str) -> String {
        if self.act == DataType::Float16 {
            x.to_string()
        } else {
            self.cast(x, FLOAT)
        }
    }

    /// An activation in fp32 (for the norms and the softmax).
    fn f32_of_act(&mut self, x: &str) -> String {
        if self.act == DataType::Float16 {
            self.cast(x, FLOAT)
        } else {
            x.to_string()
        }
    }

    /// `x·Wᵀ` for a bias-free projection `name` (`[d_out, d_in]`), in the precision.
    fn projection(&mut self, x: &str, name: &str, d_in: usize, d_out: usize) -> Result<String> {
        let w = self.tensor(name, &[d_out, d_in])?;
        self.matmul_by(x, name, w)
    }

    /// `x·Wᵀ` for `w` (`[n, k]`, stored as `name`…): Wᵀ in fp32 or fp16 for a plain MatMul, or
    /// quantized blocks for `MatMulNBits`.
    fn matmul_by(&mut self, x: &str, name: &str, w: &Tensor) -> Result<String> {
        let wt = match self.prec {
            Precision::Fp32 => self.store(&format!("{name}_t"), &w.t()?.contiguous()?)?,
            Precision::Fp16 => self.store_f16(&format!("{name}_t"), &w.t()?.contiguous()?)?,
            Precision::Int8 | Precision::Int4 => return self.nbits(x, name, w),
        };
        Ok(self.g.node("MatMul", &[x, &wt], vec![]))
    }

    /// `x·Wᵀ` with `w` (`[n, k]`) block-quantized: one `MatMulNBits`, int8 compute on CPU.
    fn nbits(&mut self, x: &str, name: &str, w: &Tensor) -> Result<String> {
        let bits = self.prec.bits().expect("a quantized precision");
        let (n, k) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (codes, scales) = quantize_blocks(&data, n, k, bits, QUANT_BLOCK);
        let k_blocks = k.div_ceil(QUANT_BLOCK) as i64;
        let blob = (QUANT_BLOCK * bits as usize / 8) as i64;
        let b = self.g.init_raw(TensorProto::raw(
            format!("{name}.q{bits}"),
            &[n as i64, k_blocks, blob],
            DataType::Uint8,
            codes,
        ));
        let s = self.g.init_f32(&format!("{name}.scales"), &[n as i64 * k_blocks], &scales);
        Ok(self.g.ms_node(
            "MatMulNBits",
            &[x, &b, &s],
            vec![
                Attribute::int("K", k as i64),
                Attribute::int("N", n as i64),
                Attribute::int("bits", i64::from(bits)),
                Attribute::int("block_size", QUANT_BLOCK as i64),
                // int8 activations × int8/int4 weights: the fast CPU path.
                Attribute::int("accuracy_level", 4),
            ],
        ))
    }

    /// cos and sin of position · θ^(-2i/head_dim) for every position the base supports,
    /// `[max_positions, head_dim / 2]`: the caches of ONNX Runtime's `RotaryEmbedding`.
    fn rotary_caches(&mut self, cfg: &LlamaConfig) -> (String, String) {
        let inv = rotary_inv_freq_with(cfg.head_dim(), cfg.rope_theta);
        let n = cfg.max_position_embeddings;
        let angles: Vec<f32> = (0..n).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
        let dims = [n as i64, inv.len() as i64];
        if self.act == DataType::Float16 {
            (self.g.init_f16("rope.cos_cache", &dims, &cos), self.g.init_f16("rope.sin_cache", &dims, &sin))
        } else {
            (self.g.init_f32("rope.cos_cache", &dims, &cos), self.g.init_f32("rope.sin_cache", &dims, &sin))
        }
    }

    /// Rotate-half RoPE on `x` `[b, heads, s, hd]` in one contrib node.
    fn rope(&mut self, x: &str, (pos, cos, sin): (&str, &str, &str)) -> String {
        self.g.ms_node("RotaryEmbedding", &[x, pos, cos, sin], vec![Attribute::int("interleaved", 0)])
    }

    /// Projections of one input (q/k/v, gate/up) as one matmul over their stacked weights and
    /// a `Split`: one larger product instead of several small ones, and fewer nodes a step.
    fn fused(&mut self, x: &str, layer: usize, parts: &[&str], d_in: usize, d_outs: &[usize]) -> Result<Vec<String>> {
        let mut rows = Vec::with_capacity(parts.len());
        for (part, &d_out) in parts.iter().zip(d_outs) {
            rows.push(self.tensor(&layer_name(layer, part), &[d_out, d_in])?.clone());
        }
        // e.g. model.layers.3.self_attn.q_proj+k_proj+v_proj.weight
        let joined = parts.iter().map(|p| p.rsplit('.').next().unwrap_or(p)).collect::<Vec<_>>().join("+");
        let prefix = parts[0].rsplit_once('.').map_or("", |(a, _)| a);
        let name = layer_name(layer, &format!("{prefix}.{joined}"));
        let y = self.matmul_by(x, &name, &Tensor::cat(&rows, 0)?)?;
        let sizes: Vec<i64> = d_outs.iter().map(|&n| n as i64).collect();
        let sizes = self.g.const_i64(&sizes);
        Ok(self.g.split(&y, &sizes, -1, parts.len()))
    }

    /// `x / sqrt(mean(x²) + ε) · w`, as `base::llama::rms_norm`, computed in fp32.
    fn rms_norm(&mut self, x: &str, weight: &str, d: usize, eps: f32) -> Result<String> {
        let w = self.param(weight, &[d])?;
        let x = self.f32_of_act(x);
        // Pow(x, 2), not Mul(x, x): the pattern ONNX Runtime fuses into one
        // SimplifiedLayerNormalization node (about 150 fewer nodes a step for SmolLM2).
        let two = self.g.scalar_f32(2.0);
        let sq = self.g.node("Pow", &[&x, &two], vec![]);
        let ms = self.g.node("ReduceMean", &[&sq], vec![Attribute::ints("axes", &[-1]), Attribute::int("keepdims", 1)]);
        let eps = self.g.scalar_f32(eps);
        let ms = self.g.node("Add", &[&ms, &eps], vec![]);
        let rms = self.g.node("Sqrt", &[&ms], vec![]);
        let y = self.g.node("Div", &[&x, &rms], vec![]);
        let y = self.g.node("Mul", &[&y, &w], vec![]);
        Ok(self.act_of_f32(&y))
    }

    /// One Llama block (`base::llama::Llama::hidden`'s loop body). Returns (x, k, v).
    #[allow(clippy::too_many_arguments)]
    fn llama_block(
        &mut self,
        x: &str,
        i: usize,
        c: &LlamaConfig,
        bias: &str,
        (pk, pv): (&str, &str),
        rope: (&str, &str, &str),
    ) -> Result<(String, String, String)> {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (h, kvh, hd) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim());
        let kv = c.num_key_value_heads * hd;
        let to_heads = vec![Attribute::ints("perm", &[0, 2, 1, 3])];
        let proj = |e: &mut Self, x: &str, what: &str, din: usize, dout: usize| {
            e.projection(x, &layer_name(i, what), din, dout)
        };
        let hn = self.rms_norm(x, &layer_name(i, "input_layernorm"), d, c.rms_norm_eps)?;
        let heads = |e: &mut Self, y: String, n: i64| {
            let shape = e.g.const_i64(&[0, 0, n, hd as i64]);
            let y = e.g.node("Reshape", &[&y, &shape], vec![]);
            e.g.node("Transpose", &[&y], to_heads.clone())
        };
        let qkv = self.fused(&hn, i, &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], d, &[d, kv, kv])?;
        let [q, k, v] = <[String; 3]>::try_from(qkv).expect("three projections");
        let q = heads(self, q, h);
        let q = self.rope(&q, rope);
        let k = heads(self, k, kvh);
        let k = self.rope(&k, rope);
        let v = heads(self, v, kvh);
        let k = self.g.node("Concat", &[pk, &k], vec![Attribute::int("axis", 2)]);
        let v = self.g.node("Concat", &[pv, &v], vec![Attribute::int("axis", 2)]);
        // Grouped-query attention as in candle: the g query heads of a kv head become rows.
        let grouped = self.g.const_i64(&[0, kvh, -1, hd as i64]);
        let qg = self.g.node("Reshape", &[&q, &grouped], vec![]);
        let kt = self.g.node("Transpose", &[&k], vec![Attribute::ints("perm", &[0, 1, 3, 2])]);
        let scores = self.g.node("MatMul", &[&qg, &kt], vec![]);
        let per_head = self.g.const_i64(&[0, h, -1, 0]);
        let scores = self.g.node("Reshape", &[&scores, &per_head], vec![]);
        // Scale, mask and softmax in fp32: the mask's -1e9 does not fit fp16.
        let scores = self.f32_of_act(&scores);
        let scale = self.g.scalar_f32((1.0 / (hd as f64).sqrt()) as f32);
        let scores = self.g.node("Mul", &[&scores, &scale], vec![]);
        let scores = self.g.node("Add", &[&scores, bias], vec![]);
        let p = self.g.node("Softmax", &[&scores], vec![Attribute::int("axis", -1)]);
        let p = self.act_of_f32(&p);
        let per_group = self.g.const_i64(&[0, kvh, -1, 0]);
        let p = self.g.node("Reshape", &[&p, &per_group], vec![]);
        let a = self.g.node("MatMul", &[&p, &v], vec![]);
        let per_head = self.g.const_i64(&[0, h, -1, hd as i64]);
        let a = self.g.node("Reshape", &[&a, &per_head], vec![]);
        let a = self.g.node("Transpose", &[&a], to_heads);
        let model_shape = self.g.const_i64(&[0, 0, d as i64]);
        let a = self.g.node("Reshape", &[&a, &model_shape], vec![]);
        let o = proj(self, &a, "self_attn.o_proj", d, d)?;
        let x = self.g.node("Add", &[x, &o], vec![]);

        let hn = self.rms_norm(&x, &layer_name(i, "post_attention_layernorm"), d, c.rms_norm_eps)?;
        let gate_up = self.fused(&hn, i, &["mlp.gate_proj", "mlp.up_proj"], d, &[f, f])?;
        let [gate, up] = <[String; 2]>::try_from(gate_up).expect("two projections");
        let sig = self.g.node("Sigmoid", &[&gate], vec![]);
        let gate = self.g.node("Mul", &[&gate, &sig], vec![]);
        let m = self.g.node("Mul", &[&gate, &up], vec![]);
        let down = proj(self, &m, "mlp.down_proj", f, d)?;
        let x = self.g.node("Add", &[&x, &down], vec![]);
        Ok((x, k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dequantizes as `MatMulNBits` does: (code - zero point) · scale.
    fn dequantize(codes: &[u8], scales: &[f32], n: usize, k: usize, bits: u32) -> Vec<f32> {
        let kb = k.div_ceil(QUANT_BLOCK);
        let blob = QUANT_BLOCK * bits as usize / 8;
        let zero = 1i32 << (bits - 1);
        let mut out = Vec::with_capacity(n * k);
        for row in 0..n {
            for col in 0..k {
                let (b, j) = (col / QUANT_BLOCK, col % QUANT_BLOCK);
                let base = (row * kb + b) * blob;
                let code = if bits == 8 { codes[base + j] } else { (codes[base + j / 2] >> (4 * (j % 2))) & 0xf };
                out.push((i32::from(code) - zero) as f32 * scales[row * kb + b]);
            }
        }
        out
    }

    #[test]
    fn block_quantization_round_trips_within_half_a_step() {
        let (n, k) = (3, 80); // 80 = 2.5 blocks: the padded tail is exercised
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for bits in [4, 8] {
            let (codes, scales) = quantize_blocks(&w, n, k, bits, QUANT_BLOCK);
            assert_eq!(codes.len(), n * 3 * QUANT_BLOCK * bits as usize / 8);
            assert_eq!(scales.len(), n * 3);
            let back = dequantize(&codes, &scales, n, k, bits);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = scales[(i / k) * 3 + (i % k) / QUANT_BLOCK];
                assert!((a - b).abs() <= step / 2.0 + 1e-6, "bits {bits}, weight {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_largest_weight_of_a_block_is_exact_and_zero_blocks_stay_zero() {
        let mut w = vec![0f32; 64];
        w[5] = -3.5;
        w[6] = 1.0;
        let (codes, scales) = quantize_blocks(&w, 1, 64, 4, QUANT_BLOCK);
        assert_eq!(scales[1], 0.0);
        let back = dequantize(&codes, &scales, 1, 64, 4);
        assert_eq!(back[5], -3.5);
        assert!(back[32..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn precisions_parse_by_name() {
        for p in [Precision::Fp32, Precision::Fp16, Precision::Int8, Precision::Int4] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert!("int3".parse::<Precision>().is_err());
    }
}
