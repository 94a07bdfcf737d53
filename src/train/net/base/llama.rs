//! The Llama-family decoder in candle (RMSNorm, grouped-query attention with rotate-half
//! rotary, SiLU-gated MLP), with optional LoRA adapters on its projections.
//!
//! The base weights stay plain tensors (frozen: candle tracks gradients only from variables),
//! the adapters are variables of a `VarMap`. `train::export::export_llama` mirrors this op for
//! op; `tests/base.rs` compares the two.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{layer_name, Base, LlamaConfig, EMBED, FINAL_NORM, LM_HEAD, NORMS, PROJECTIONS};
use crate::train::attention::AttnMask;
use crate::train::model::{rotary_tables_with, rotate, Decoder, KvPair};

/// Where the adapters go. LoRA: `W x + (α / r) · B A x`, A `[r, in]` random, B `[out, r]` zero,
/// so training starts from the base exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Adapters on layers `first_layer..` only: the layers below need no backward pass, which
    /// is most of a step's cost on CPU (FACTS.md: top 10 of 30 layers, 3.7 s vs 6.6 s).
    pub first_layer: usize,
    /// Projection names (`self_attn.q_proj`, …, `mlp.down_proj`).
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    pub fn all_projections(rank: usize, first_layer: usize) -> Self {
        Self {
            rank,
            alpha: 2.0 * rank as f32,
            first_layer,
            targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Adapter tensor names: `{projection weight name without .weight}.lora_a|lora_b`.
pub fn lora_names(layer: usize, proj: &str) -> (String, String) {
    let stem = format!("model.layers.{layer}.{proj}");
    (format!("{stem}.lora_a"), format!("{stem}.lora_b"))
}

struct Proj {
    w: Tensor,
    lora: Option<(Tensor, Tensor, f32)>,
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = linear(x, &self.w)?;
        match &self.lora {
            None => Ok(y),
            Some((a, b, scale)) => y + (linear(&linear(x, a)?, b)? * f64::from(*scale))?,
        }
    }
}

/// `x · wᵀ` for x `[.., in]`, w `[out, in]` (one 2-D matmul, as candle's Linear does).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / k;
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out)
}

/// RMSNorm composed of ops with a backward: `x / sqrt(mean(x²) + ε) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + f64::from(eps))?.sqrt()?)?.broadcast_mul(w)
}

struct Layer {
    in_norm: Tensor,
    post_norm: Tensor,
    proj: HashMap<&'static str, Proj>,
}

pub struct Llama {
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    layers: Vec<Layer>,
    pub cfg: LlamaConfig,
}

impl Llama {
    /// The base alone, or with adapters registered in `vars` (created, or taken as they are
    /// when `vars` already holds them, e.g. after `VarMap::load`).
    pub fn new(base: &Base, lora: Option<(&LoraConfig, &VarMap)>) -> Result<Self> {
        let cfg = base.config.clone();
        let get = |name: &str| {
            base.weights.get(name).cloned().ok_or_else(|| candle_core::Error::Msg(format!("base lacks `{name}`")))
        };
        let embed = get(EMBED)?;
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { get(LM_HEAD)? };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut proj = HashMap::new();
            for p in PROJECTIONS {
                let w = get(&layer_name(i, p))?;
                let adapter = match lora {
                    Some((lc, vars)) if i >= lc.first_layer && lc.targets.iter().any(|t| t == p) => {
                        let vb = VarBuilder::from_varmap(vars, DType::F32, w.device());
                        let (out, inp) = w.dims2()?;
                        let (an, bn) = lora_names(i, p);
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a = vb.get_with_hints((lc.rank, inp), &an, Init::Uniform { lo: -bound, up: bound })?;
                        let b = vb.get_with_hints((out, lc.rank), &bn, Init::Const(0.0))?;
                        Some((a, b, lc.scale()))
                    }
                    _ => None,
                };
                proj.insert(p, Proj { w, lora: adapter });
            }
            let [n1, n2] = NORMS;
            layers.push(Layer { in_norm: get(&layer_name(i, n1))?, post_norm: get(&layer_name(i, n2))?, proj });
        }
        Ok(Self { embed, lm_head, norm: get(FINAL_NORM)?, layers, cfg })
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &AttnMask,
        past: Option<&KvPair>,
        rope: (&Tensor, &Tensor),
    ) -> Result<(Tensor, KvPair)> {
        let c = &self.cfg;
        let (b, s, d) = x.dims3()?;
        let (h, kvh, hd, g) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim(), c.group());
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous();
        let q = rotate(&heads(l.proj["self_attn.q_proj"].forward(x)?, h)?, rope)?;
        let mut k = rotate(&heads(l.proj["self_attn.k_proj"].forward(x)?, kvh)?, rope)?;
        let mut v = heads(l.proj["self_attn.v_proj"].forward(x)?, kvh)?;
        if let Some((pk, pv)) = past {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        let t = k.dim(2)?;
        // Query head j reads key/value head j / g: group the g query heads of each kv head
        // along the rows instead of repeating the cache.
        let qg = q.reshape((b, kvh, g * s, hd))?;
        let scores = qg.matmul(&k.transpose(2, 3)?.contiguous()?)?.reshape((b, h, s, t))?;
        let p = mask.softmax(&scores, 1.0 / (hd as f32).sqrt())?;
        let a = p.reshape((b, kvh, g * s, t))?.matmul(&v)?.reshape((b, h, s, hd))?;
        let a = a.transpose(1, 2)?.reshape((b, s, d))?;
        Ok((l.proj["self_attn.o_proj"].forward(&a)?, (k, v)))
    }

    /// Greedy decoding of one prompt with the KV cache; stops before any of `stop`.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        let dev = self.embed.device();
        let mut ids: Vec<u32> = prompt.to_vec();
        let mut past: Option<Vec<KvPair>> = None;
        let mut out = Vec::new();
        for _ in 0..max_new {
            let from = past.as_ref().map_or(0, |_| ids.len() - 1);
            let step = Tensor::new(&ids[from..], dev)?.unsqueeze(0)?;
            let pos: Vec<u32> = (from as u32..ids.len() as u32).collect();
            let pos = Tensor::new(pos.as_slice(), dev)?.unsqueeze(0)?;
            let mask = Tensor::ones((1, ids.len()), DType::U32, dev)?;
            let (h, presents) = self.hidden(&step, &mask, &pos, past.as_deref())?;
            let last = h.narrow(1, h.dim(1)? - 1, 1)?;
            let next = self.logits(&last)?.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            ids.push(next);
            past = Some(presents);
        }
        Ok(out)
    }

    /// The base weights with every adapter folded in (`W + (α/r)·B·A`), for export.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(EMBED.to_string(), self.embed.clone());
        if !self.cfg.tie_word_embeddings {
            out.insert(LM_HEAD.to_string(), self.lm_head.clone());
        }
        out.insert(FINAL_NORM.to_string(), self.norm.clone());
        for (i, l) in self.layers.iter().enumerate() {
            let [n1, n2] = NORMS;
            out.insert(layer_name(i, n1), l.in_norm.clone());
            out.insert(layer_name(i, n2), l.post_norm.clone());
            for (name, p) in &l.proj {
                let w = match &p.lora {
                    None => p.w.clone(),
                    Some((a, b, scale)) => (&p.w + (b.matmul(a)? * f64::from(*scale))?)?,
                };
                out.insert(layer_name(i, name), w.detach());
            }
        }
        Ok(out)
    }
}

impl Decoder for Llama {
    /// Final normed hidden states `[b, s, d]` and the present cache per layer. `input_ids` and
    /// `position_ids` u32 `[b, s]`; `attention_mask` `[b, past + s]` (0/1).
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        past: Option<&[KvPair]>,
    ) -> Result<(Tensor, Vec<KvPair>)> {
        let c = &self.cfg;
        let (b, s) = input_ids.dims2()?;
        let mask = AttnMask::new(attention_mask, s, true)?;
        let (cos, sin) = rotary_tables_with(position_ids, c.head_dim(), c.rope_theta)?;
        let mut x = self.embed.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, s, c.hidden_size))?;
        let mut presents = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &l.in_norm, c.rms_norm_eps)?;
            let (a, kv) = self.attention(l, &hn, &mask, past.map(|p| &p[i]), (&cos, &sin))?;
            x = (x + a)?;
            let hn = rms_norm(&x, &l.post_norm, c.rms_norm_eps)?;
            let gate = l.proj["mlp.gate_proj"].forward(&hn)?.silu()?;
            let up = l.proj["mlp.up_proj"].forward(&hn)?;
            x = (x + l.proj["mlp.down_proj"].forward(&(gate * up)?)?)?;
            presents.push(kv);
        }
        Ok((rms_norm(&x, &self.norm, c.rms_norm_eps)?, presents))
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, &self.lm_head)
    }

    fn empty_past(&self, batch: usize, device: &Device) -> Result<Vec<KvPair>> {
        let c = &self.cfg;
        let z = || Tensor::zeros((batch, c.num_key_value_heads, 0, c.head_dim()), DType::F32, device);
        (0..c.num_hidden_layers).map(|_| Ok((z()?, z()?))).collect()
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn width(&self) -> usize {
        self.cfg.hidden_size
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::train::base::BaseSource;

    /// A random-weight base (norm weights near 1) for tests.
    pub fn random_base(cfg: &LlamaConfig) -> Base {
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let kv = cfg.num_key_value_heads * hd;
        let rnd = |shape: &[usize]| Tensor::randn(0f32, 0.3, shape, &dev).unwrap();
        let norm = |n: usize| (Tensor::randn(0f32, 0.1, n, &dev).unwrap() + 1.0).unwrap();
        weights.insert(EMBED.to_string(), rnd(&[cfg.vocab_size, d]));
        weights.insert(FINAL_NORM.to_string(), norm(d));
        for i in 0..cfg.num_hidden_layers {
            for (p, shape) in [
                ("self_attn.q_proj", [d, d]),
                ("self_attn.k_proj", [kv, d]),
                ("self_attn.v_proj", [kv, d]),
                ("self_attn.o_proj", [d, d]),
                ("mlp.gate_proj", [f, d]),
                ("mlp.up_proj", [f, d]),
                ("mlp.down_proj", [d, f]),
            ] {
                weights.insert(layer_name(i, p), rnd(&shape));
            }
            for n in NORMS {
                weights.insert(layer_name(i, n), norm(d));
            }
        }
        let source = BaseSource { format: "test".into(), path: "random".into(), sha256: String::new() };
        Base { config: cfg.clone(), weights, tokenizer_json: String::new(), source }
    }

    pub fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 40,
            hidden_size: 24,
            intermediate_size: 32,
            num_hidden_layers: 3,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            max_position_embeddings: 64,
        }
    }

    fn inputs(dev: &Device) -> (Tensor, Tensor, Tensor) {
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5], [0, 0, 7, 8, 9]], dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dev).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 0, 0, 1, 2]], dev).unwrap();
        (ids, mask, pos)
    }

    /// Grouped-query attention computed by repeating the cache heads (Hugging Face's
    /// `repeat_kv`) gives the same result as the row-grouped matmul.
    #[test]
    fn grouped_attention_matches_repeated_heads() {
        let cfg = tiny_config();
        let base = random_base(&cfg);
        let dev = Device::Cpu;
        let model = Llama::new(&base, None).unwrap();
        let (ids, mask, pos) = inputs(&dev);
        let x = model.embed.index_select(&ids.flatten_all().unwrap(), 0).unwrap().reshape((2, 5, 24)).unwrap();
        let l = &model.layers[0];
        let am = AttnMask::new(&mask, 5, true).unwrap();
        let (cos, sin) = rotary_tables_with(&pos, cfg.head_dim(), cfg.rope_theta).unwrap();
        let (got, _) = model.attention(l, &x, &am, None, (&cos, &sin)).unwrap();
        // Reference: repeat each kv head g times.
        let heads =
            |t: Tensor, n: usize| t.reshape((2, 5, n, 4)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let q = rotate(&heads(l.proj["self_attn.q_proj"].forward(&x).unwrap(), 6), (&cos, &sin)).unwrap();
        let k = rotate(&heads(l.proj["self_attn.k_proj"].forward(&x).unwrap(), 2), (&cos, &sin)).unwrap();
        let v = heads(l.proj["self_attn.v_proj"].forward(&x).unwrap(), 2);
        let rep = |t: &Tensor| {
            let parts: Vec<Tensor> = (0..6).map(|j| t.narrow(1, j / 3, 1).unwrap()).collect();
            Tensor::cat(&parts, 1).unwrap()
        };
        let scores = q.matmul(&rep(&k).transpose(2, 3).unwrap().contiguous().unwrap()).unwrap();
        let p = am.softmax(&scores, 0.5).unwrap();
        let a = p.matmul(&rep(&v)).unwrap().transpose(1, 2).unwrap().reshape((2, 5, 24)).unwrap();
        let want = l.proj["self_attn.o_proj"].forward(&a).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "diff {diff}");
    }

    #[test]
    fn cached_forward_matches_full_forward() {
        let base = random_base(&tiny_config());
        let dev = Device::Cpu;
        let model = Llama::new(&base, None).unwrap();
        let (ids, mask, pos) = inputs(&dev);
        let (full, _) = model.forward(&ids, &mask, &pos, None).unwrap();
        let n = |t: &Tensor, a, l| t.narrow(1, a, l).unwrap();
        let (_, past) = model.forward(&n(&ids, 0, 3), &n(&mask, 0, 3), &n(&pos, 0, 3), None).unwrap();
        let (step, _) = model.forward(&n(&ids, 3, 2), &mask, &n(&pos, 3, 2), Some(&past)).unwrap();
        let diff = (n(&full, 3, 2) - step).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "diff {diff}");
    }

    #[test]
    fn every_adapter_gets_a_gradient_and_the_base_stays_frozen() {
        let base = random_base(&tiny_config());
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let lc = LoraConfig::all_projections(4, 1);
        let model = Llama::new(&base, Some((&lc, &vars))).unwrap();
        // B starts at zero, which leaves A without a gradient: move B off zero first.
        for (name, var) in vars.data().lock().unwrap().iter() {
            if name.ends_with("lora_b") {
                var.set(&Tensor::randn(0f32, 0.1, var.shape(), &dev).unwrap()).unwrap();
            }
        }
        let (ids, mask, pos) = inputs(&dev);
        let (logits, _) = model.forward(&ids, &mask, &pos, None).unwrap();
        let grads = logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let data = vars.data().lock().unwrap();
        assert_eq!(data.len(), 2 * 7 * 2, "adapters on layers 1 and 2 only");
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
        for w in base.weights.values() {
            assert!(grads.get(w).is_none(), "a base weight received a gradient");
        }
    }

    #[test]
    fn merged_weights_compute_what_the_adapters_do() {
        let cfg = tiny_config();
        let base = random_base(&cfg);
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let lc = LoraConfig::all_projections(4, 0);
        let model = Llama::new(&base, Some((&lc, &vars))).unwrap();
        for var in vars.all_vars() {
            var.set(&Tensor::randn(0f32, 0.2, var.shape(), &dev).unwrap()).unwrap();
        }
        let merged = Base { weights: model.merged_weights().unwrap(), ..random_base(&cfg) };
        let plain = Llama::new(&merged, None).unwrap();
        let (ids, mask, pos) = inputs(&dev);
        let a = model.forward(&ids, &mask, &pos, None).unwrap().0;
        let b = plain.forward(&ids, &mask, &pos, None).unwrap().0;
        let base_only = Llama::new(&base, None).unwrap().forward(&ids, &mask, &pos, None).unwrap().0;
        let d = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d(&a, &b) < 1e-4, "merged differs by {}", d(&a, &b));
        assert!(d(&a, &base_only) > 1e-2, "the adapters changed nothing");
    }
}
