//! The policy: a small decoder-only transformer (GPT-2 shape, or with rotary positions) in candle.
//!
//! The math here is mirrored op for op by `train::export` (ONNX), so any change must be made
//! in both places; `tests/export.rs` compares the two. Training uses the slow (composed)
//! layer norm because candle's fused kernels have no backward (FACTS.md); the attention softmax
//! is our own fused op with a backward (`train::attention`).

use crate::train::attention::AttnMask;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, linear, linear_no_bias, Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// Additive value for masked attention scores; finite so fully-masked rows (left padding) stay NaN-free.
pub const MASK_VALUE: f32 = -1e9;
pub const LN_EPS: f32 = 1e-5;
/// Rotary base (Llama / Qwen's default).
pub const ROPE_THETA: f32 = 10_000.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub max_positions: usize,
    /// Rotary position embeddings on queries and keys instead of a learned position table.
    /// Relative positions let a copy skill learned on short prompts carry to long ones, which
    /// absolute positions did not (docs/training.md, attempts 3–7).
    #[serde(default)]
    pub rotary: bool,
}

impl GptConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_head
    }
}

/// θ^(-2i/head_dim) for each of the head's `head_dim / 2` rotated pairs (shared with the export).
pub fn rotary_inv_freq(head_dim: usize) -> Vec<f32> {
    rotary_inv_freq_with(head_dim, ROPE_THETA)
}

/// `rotary_inv_freq` for another base θ (SmolLM2 uses 100,000).
pub fn rotary_inv_freq_with(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f32) / head_dim as f32)).collect()
}

/// Rotary tables for `position_ids` `[b, s]`: cos and sin `[b, 1, s, head_dim]`, in the
/// rotate-half layout (angle of pair i = position · θ^(-2i/head_dim), repeated for both halves).
pub fn rotary_tables(position_ids: &Tensor, head_dim: usize) -> Result<(Tensor, Tensor)> {
    rotary_tables_with(position_ids, head_dim, ROPE_THETA)
}

/// `rotary_tables` for another base θ.
pub fn rotary_tables_with(position_ids: &Tensor, head_dim: usize, theta: f32) -> Result<(Tensor, Tensor)> {
    let (b, s) = position_ids.dims2()?;
    let inv = Tensor::from_vec(rotary_inv_freq_with(head_dim, theta), (1, 1, head_dim / 2), position_ids.device())?;
    let angles = position_ids.to_dtype(DType::F32)?.reshape((b, s, 1))?.broadcast_mul(&inv)?;
    let angles = Tensor::cat(&[&angles, &angles], 2)?.unsqueeze(1)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// x·cos + rotate_half(x)·sin, x `[b, h, s, head_dim]`.
pub(crate) fn rotate(x: &Tensor, (cos, sin): (&Tensor, &Tensor)) -> Result<Tensor> {
    let half = x.dim(3)? / 2;
    let rotated = Tensor::cat(&[&x.narrow(3, half, half)?.neg()?, &x.narrow(3, 0, half)?], 3)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// One layer's cache: key and value, each `[batch, heads, len, head_dim]`.
pub type KvPair = (Tensor, Tensor);

pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub(crate) fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, LN_EPS)
    }
}

pub(crate) struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc: Linear,
    proj: Linear,
    n_head: usize,
}

impl Block {
    pub(crate) fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            ln1: LayerNorm::new(d, vb.pp("ln1"))?,
            q: linear(d, d, vb.pp("attn.q"))?,
            k: linear(d, d, vb.pp("attn.k"))?,
            v: linear(d, d, vb.pp("attn.v"))?,
            o: linear(d, d, vb.pp("attn.o"))?,
            ln2: LayerNorm::new(d, vb.pp("ln2"))?,
            fc: linear(d, cfg.d_ff, vb.pp("mlp.fc"))?,
            proj: linear(cfg.d_ff, d, vb.pp("mlp.proj"))?,
            n_head: cfg.n_head,
        })
    }

    /// `mask`: which keys each query may read. `rope`: this step's rotary tables (the cache
    /// holds rotated keys).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mask: &AttnMask,
        past: Option<&KvPair>,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, KvPair)> {
        let (b, s, d) = x.dims3()?;
        let hd = d / self.n_head;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, s, self.n_head, hd))?.transpose(1, 2)?.contiguous();
        let mut q = split(self.q.forward(&h)?)?;
        let mut k = split(self.k.forward(&h)?)?;
        let mut v = split(self.v.forward(&h)?)?;
        if let Some(tables) = rope {
            q = rotate(&q, tables)?;
            k = rotate(&k, tables)?;
        }
        if let Some((pk, pv)) = past {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        let p = mask.softmax(&scores, 1.0 / (hd as f32).sqrt())?;
        let a = p.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
        let x = (x + self.o.forward(&a)?)?;
        let h = self.ln2.forward(&x)?;
        let h = self.proj.forward(&self.fc.forward(&h)?.gelu_erf()?)?;
        Ok(((x + h)?, (k, v)))
    }
}

pub struct Gpt {
    wte: Embedding,
    /// None with rotary positions.
    wpe: Option<Embedding>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    pub cfg: GptConfig,
}

impl Gpt {
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..cfg.n_layer).map(|i| Block::new(cfg, vb.pp(format!("h.{i}")))).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: embedding(cfg.vocab_size, cfg.d_model, vb.pp("wte"))?,
            wpe: if cfg.rotary { None } else { Some(embedding(cfg.max_positions, cfg.d_model, vb.pp("wpe"))?) },
            blocks,
            ln_f: LayerNorm::new(cfg.d_model, vb.pp("ln_f"))?,
            lm_head: linear_no_bias(cfg.d_model, cfg.vocab_size, vb.pp("lm_head"))?,
            cfg: cfg.clone(),
        })
    }
}

/// What training needs of a decoder, whichever it is (the from-scratch `Gpt` or a pretrained
/// `Llama` with adapters): SFT, sampling, GRPO and evaluation are written once against it.
pub trait Decoder {
    /// The final (normed) hidden states `[b, s, d]` and the present cache per layer.
    /// `input_ids` and `position_ids` are u32 `[b, s]`; `attention_mask` is `[b, past + s]` (0/1).
    /// Losses that score a few positions project only those through `logits`.
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        past: Option<&[KvPair]>,
    ) -> Result<(Tensor, Vec<KvPair>)>;

    /// `hidden`, also handing out the residual stream the last block's attention reads in `tap`
    /// (the SFT's auxiliary probe trains it); a decoder without a tap leaves it `None`.
    fn hidden_tapped(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        past: Option<&[KvPair]>,
        _tap: &mut Option<Tensor>,
    ) -> Result<(Tensor, Vec<KvPair>)> {
        self.hidden(input_ids, attention_mask, position_ids, past)
    }

    /// Logits of final hidden states (`[.., d]` → `[.., vocab]`).
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;

    /// An empty cache (zero-length pasts), as the first generation step of the ONNX convention feeds.
    fn empty_past(&self, batch: usize, device: &Device) -> Result<Vec<KvPair>>;

    /// The longest sequence the positions cover.
    fn max_positions(&self) -> usize;

    /// Width of the hidden states.
    fn width(&self) -> usize;

    /// Logits `[b, s, vocab]` and the present cache per layer.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        past: Option<&[KvPair]>,
    ) -> Result<(Tensor, Vec<KvPair>)> {
        let (h, presents) = self.hidden(input_ids, attention_mask, position_ids, past)?;
        Ok((self.logits(&h)?, presents))
    }

    /// log p(target) at each of the flat positions `at` of `hidden` `[b, s, d]` (row-major
    /// `b * s + j`), projecting only those positions onto the vocabulary. Returns `[at.len()]`.
    fn target_logprobs(&self, hidden: &Tensor, at: Vec<u32>, targets: Vec<u32>) -> Result<Tensor> {
        target_logprobs(hidden, at, targets, |rows| self.logits(rows))
    }
}

impl Decoder for Gpt {
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        past: Option<&[KvPair]>,
    ) -> Result<(Tensor, Vec<KvPair>)> {
        self.hidden_tapped(input_ids, attention_mask, position_ids, past, &mut None)
    }

    /// The tap is the residual stream after the last-but-one block.
    fn hidden_tapped(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        past: Option<&[KvPair]>,
        tap: &mut Option<Tensor>,
    ) -> Result<(Tensor, Vec<KvPair>)> {
        let (_, s) = input_ids.dims2()?;
        let mask = AttnMask::new(attention_mask, s, true)?;
        let mut x = self.wte.forward(input_ids)?;
        if let Some(wpe) = &self.wpe {
            x = (x + wpe.forward(position_ids)?)?;
        }
        let rope = if self.cfg.rotary { Some(rotary_tables(position_ids, self.cfg.head_dim())?) } else { None };
        let mut presents = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, kv) = block.forward(&x, &mask, past.map(|p| &p[i]), rope.as_ref().map(|(c, s)| (c, s)))?;
            x = y;
            presents.push(kv);
            if i + 2 == self.blocks.len().max(2) {
                *tap = Some(x.clone());
            }
        }
        Ok((self.ln_f.forward(&x)?, presents))
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    fn empty_past(&self, batch: usize, device: &Device) -> Result<Vec<KvPair>> {
        let shape = (batch, self.cfg.n_head, 0, self.cfg.head_dim());
        (0..self.cfg.n_layer)
            .map(|_| Ok((Tensor::zeros(shape, DType::F32, device)?, Tensor::zeros(shape, DType::F32, device)?)))
            .collect()
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_positions
    }

    fn width(&self) -> usize {
        self.cfg.d_model
    }
}

/// log p(target) at the flat positions `at` (row-major `b * s + j`) of `hidden` `[b, s, d]`,
/// projecting only those rows through `logits`. Returns `[at.len()]`.
pub(crate) fn target_logprobs(
    hidden: &Tensor,
    at: Vec<u32>,
    targets: Vec<u32>,
    logits: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, s, d) = hidden.dims3()?;
    let n = at.len();
    let dev = hidden.device();
    let rows = hidden.reshape((b * s, d))?.index_select(&Tensor::from_vec(at, n, dev)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&logits(&rows)?, D::Minus1)?;
    logp.gather(&Tensor::from_vec(targets, (n, 1), dev)?, 1)?.squeeze(1)
}

pub use crate::padding::positions_from_mask;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    pub fn tiny() -> GptConfig {
        GptConfig { vocab_size: 50, n_layer: 2, n_head: 2, d_model: 16, d_ff: 32, max_positions: 32, rotary: false }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for rotary in [false, true] {
            every_parameter_gets_a_gradient_with(&GptConfig { rotary, ..tiny() });
        }
    }

    fn every_parameter_gets_a_gradient_with(cfg: &GptConfig) {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let model = Gpt::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 7, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &dev).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3], [0, 1, 2, 3]], &dev).unwrap();
        let (logits, _) = model.forward(&ids, &mask, &pos, None).unwrap();
        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = vm.data().lock().unwrap();
        assert_eq!(vars.len(), if cfg.rotary { 1 } else { 2 } + 2 * 16 + 3);
        for (name, var) in vars.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }

    #[test]
    fn cached_forward_matches_full_forward() {
        for rotary in [false, true] {
            cached_forward_matches_full_forward_with(&GptConfig { rotary, ..tiny() });
        }
    }

    /// Rotary attention scores depend only on the distance between query and key.
    #[test]
    fn rotary_scores_are_relative() {
        let dev = Device::Cpu;
        let q = Tensor::new(&[0.3f32, -1.2, 0.7, 0.5], &dev).unwrap().reshape((1, 1, 1, 4)).unwrap();
        let k = Tensor::new(&[1.1f32, 0.4, -0.6, 0.9], &dev).unwrap().reshape((1, 1, 1, 4)).unwrap();
        let score = |pq: u32, pk: u32| {
            let at = |p: u32| rotary_tables(&Tensor::new(&[[p]], &dev).unwrap(), 4).unwrap();
            let (cq, sq) = at(pq);
            let (ck, sk) = at(pk);
            let rq = rotate(&q, (&cq, &sq)).unwrap();
            let rk = rotate(&k, (&ck, &sk)).unwrap();
            (rq * rk).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        assert!((score(7, 3) - score(104, 100)).abs() < 1e-4);
        assert!((score(7, 3) - score(7, 5)).abs() > 1e-3);
    }

    fn cached_forward_matches_full_forward_with(cfg: &GptConfig) {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let model = Gpt::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let ids = Tensor::new(&[[3u32, 9, 4, 7, 11]], &dev).unwrap();
        let mask = Tensor::ones((1, 5), DType::U32, &dev).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4]], &dev).unwrap();
        let (full, _) = model.forward(&ids, &mask, &pos, None).unwrap();
        let (_, past) = model
            .forward(&ids.narrow(1, 0, 4).unwrap(), &mask.narrow(1, 0, 4).unwrap(), &pos.narrow(1, 0, 4).unwrap(), None)
            .unwrap();
        let (step, _) =
            model.forward(&ids.narrow(1, 4, 1).unwrap(), &mask, &pos.narrow(1, 4, 1).unwrap(), Some(&past)).unwrap();
        let a = full.narrow(1, 4, 1).unwrap();
        let diff = (a - step).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "diff {diff}");
    }
}
