//! The judge R (the paper's R_jud): reads a description and two responses and says which one
//! the user prefers. Architecture: a small transformer encodes the description (so each
//! preference stays bound to its stance), each response is a bag of embeddings, and a bilinear
//! form scores description × response. Trained on golden descriptions (and subsets of them).
//! The post is not an input: in our data the preference never depends on it.

use crate::tokenizer::TextTokenizer;
use crate::train::attention::AttnMask;
use crate::train::batch::{pad_right, Batch};
use crate::train::model::{Block, GptConfig, LayerNorm};
use crate::train::synth::{any_surface, describe_surfaces, make_pair, random_prefs, utility, Pair};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub d_ff: usize,
    pub max_positions: usize,
}

impl JudgeConfig {
    pub fn small(vocab_size: usize) -> Self {
        Self { vocab_size, d_model: 64, n_head: 4, n_layer: 2, d_ff: 128, max_positions: 128 }
    }
    fn block_cfg(&self) -> GptConfig {
        GptConfig {
            vocab_size: self.vocab_size,
            n_layer: self.n_layer,
            n_head: self.n_head,
            d_model: self.d_model,
            d_ff: self.d_ff,
            max_positions: self.max_positions,
            rotary: false,
        }
    }
}

pub struct Judge {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    resp: Embedding,
    bilinear: Linear,
    pub cfg: JudgeConfig,
}

/// Masked mean over the sequence axis: `x` `[b, l, d]`, `mask` `[b, l]` (0/1 f32).
fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = x.broadcast_mul(&m)?.sum(1)?;
    let count = mask.sum_keepdim(1)?.maximum(1.0)?;
    sum.broadcast_div(&count)
}

impl Judge {
    pub fn new(cfg: &JudgeConfig, vb: VarBuilder) -> Result<Self> {
        let bc = cfg.block_cfg();
        let d = vb.pp("desc");
        Ok(Self {
            wte: embedding(cfg.vocab_size, cfg.d_model, d.pp("wte"))?,
            wpe: embedding(cfg.max_positions, cfg.d_model, d.pp("wpe"))?,
            blocks: (0..cfg.n_layer).map(|i| Block::new(&bc, d.pp(format!("h.{i}")))).collect::<Result<_>>()?,
            ln_f: LayerNorm::new(cfg.d_model, d.pp("ln_f"))?,
            resp: embedding(cfg.vocab_size, cfg.d_model, vb.pp("resp.wte"))?,
            bilinear: linear_no_bias(cfg.d_model, cfg.d_model, vb.pp("bilinear"))?,
            cfg: cfg.clone(),
        })
    }

    /// All ids u32, masks 0/1 (any dtype). Returns logits `[b, 2]` for (A, B).
    pub fn forward(
        &self,
        desc: &Tensor,
        desc_mask: &Tensor,
        a: &Tensor,
        a_mask: &Tensor,
        b: &Tensor,
        b_mask: &Tensor,
    ) -> Result<Tensor> {
        let (bsz, l) = desc.dims2()?;
        let dm = desc_mask.to_dtype(DType::F32)?;
        let pos = Tensor::arange(0u32, l as u32, desc.device())?.unsqueeze(0)?.broadcast_as((bsz, l))?.contiguous()?;
        let mut h = (self.wte.forward(desc)? + self.wpe.forward(&pos)?)?;
        // No causal mask: every description token may read every other (non-padding) one.
        let mask = AttnMask::new(desc_mask, l, false)?;
        for block in &self.blocks {
            h = block.forward(&h, &mask, None, None)?.0;
        }
        let u = self.bilinear.forward(&masked_mean(&self.ln_f.forward(&h)?, &dm)?)?;
        let score = |ids: &Tensor, mask: &Tensor| -> Result<Tensor> {
            let v = masked_mean(&self.resp.forward(ids)?, &mask.to_dtype(DType::F32)?)?;
            (&u * v)?.sum_keepdim(D::Minus1)
        };
        Tensor::cat(&[score(a, a_mask)?, score(b, b_mask)?], 1)
    }
}

/// Token limits for judge inputs (longer text is truncated).
pub const MAX_DESC_TOKENS: usize = 120;
pub const MAX_RESP_TOKENS: usize = 64;

/// A judge ready to score, with its tokenizer.
pub struct Scorer<'a> {
    pub judge: &'a Judge,
    pub tok: &'a TextTokenizer,
    pub device: Device,
}

fn enc(tok: &TextTokenizer, text: &str, max: usize) -> Vec<u32> {
    let mut ids = tok.encode(text);
    ids.truncate(max);
    ids
}

impl Scorer<'_> {
    /// P(user prefers A) for each (description, A, B).
    pub fn prob_a(&self, items: &[(&str, &str, &str)]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(256) {
            let d: Vec<_> = chunk.iter().map(|x| enc(self.tok, x.0, MAX_DESC_TOKENS)).collect();
            let a: Vec<_> = chunk.iter().map(|x| enc(self.tok, x.1, MAX_RESP_TOKENS)).collect();
            let b: Vec<_> = chunk.iter().map(|x| enc(self.tok, x.2, MAX_RESP_TOKENS)).collect();
            let (d, a, b) = (pad_right(&d, self.tok.pad), pad_right(&a, self.tok.pad), pad_right(&b, self.tok.pad));
            let t = |x: &Batch| x.tensors(&self.device);
            let ((di, dm), (ai, am), (bi, bm)) = (t(&d)?, t(&a)?, t(&b)?);
            let logits = self.judge.forward(&di, &dm, &ai, &am, &bi, &bm)?;
            let p = candle_nn::ops::softmax(&logits, D::Minus1)?.narrow(1, 0, 1)?.squeeze(1)?;
            out.extend(p.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// What scores a description against a user's held-out pairs: the trained judge (`Scorer`,
/// R_jud and the meter of `eval`) or a second, different one (`LlmJudge`, the paper's
/// cross-model check).
pub trait PairScores {
    /// P(the chosen response), averaged over both A/B orders, per pair of each job.
    fn many_chosen_probs(&self, jobs: &[(&str, &[Pair])]) -> anyhow::Result<Vec<Vec<f32>>>;

    /// Acc_jud indicator per pair of each job, scored in both A/B orders: 1 if the averaged
    /// probability of the chosen response is above one half, 0.5 on an exact tie, else 0.
    fn many_pair_scores(&self, jobs: &[(&str, &[Pair])]) -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(self.many_chosen_probs(jobs)?.into_iter().map(|v| v.into_iter().map(indicator).collect()).collect())
    }
}

/// Both orders of every pair of every job, as (description, post, A, B) — chosen first, then
/// rejected first.
pub fn both_orders<'a>(jobs: &'a [(&'a str, &'a [Pair])]) -> Vec<(&'a str, &'a str, &'a str, &'a str)> {
    jobs.iter()
        .flat_map(|(d, pairs)| {
            pairs.iter().flat_map(move |p| {
                let (post, c, r) = (p.post.as_str(), p.chosen.as_str(), p.rejected.as_str());
                [(*d, post, c, r), (*d, post, r, c)]
            })
        })
        .collect()
}

/// Folds `both_orders`' P(A) back into P(chosen) per pair of each job.
pub fn fold_orders(jobs: &[(&str, &[Pair])], prob_a: &[f32]) -> Vec<Vec<f32>> {
    let mut it = prob_a.chunks(2).map(|c| (c[0] + 1.0 - c[1]) / 2.0);
    jobs.iter().map(|(_, pairs)| it.by_ref().take(pairs.len()).collect()).collect()
}

impl PairScores for Scorer<'_> {
    fn many_chosen_probs(&self, jobs: &[(&str, &[Pair])]) -> anyhow::Result<Vec<Vec<f32>>> {
        // This judge reads the description and the two responses, not the post.
        let items: Vec<_> = both_orders(jobs).into_iter().map(|(d, _, a, b)| (d, a, b)).collect();
        Ok(fold_orders(jobs, &self.prob_a(&items)?))
    }
}

fn indicator(p_chosen: f32) -> f32 {
    if p_chosen > 0.5 {
        1.0
    } else if p_chosen == 0.5 {
        0.5
    } else {
        0.0
    }
}

pub fn mean(xs: &[f32]) -> f32 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f32>() / xs.len() as f32
    }
}

/// One judge training example, drawn fresh from the synthetic world's generator (so the judge
/// cannot memorise users): a description of a random subset of a random user's preferences and
/// a pair labelled by the utility over that subset (ties skipped), in random order.
pub fn sample_example(rng: &mut impl Rng) -> Option<(String, String, String, u32)> {
    let mut prefs = random_prefs(3, 8, rng);
    let (pair, _) = make_pair(&prefs, None, rng);
    prefs.shuffle(rng);
    if rng.gen_bool(0.5) {
        prefs.truncate(rng.gen_range(1..=prefs.len()));
    }
    let du = utility(&prefs, &pair.chosen_poles) - utility(&prefs, &pair.rejected_poles);
    if du == 0 {
        return None;
    }
    let (better, worse) = if du > 0 { (pair.chosen, pair.rejected) } else { (pair.rejected, pair.chosen) };
    // Descriptions state preferences in labels or in the signals' own paraphrases.
    let surfaces: Vec<&str> = prefs.iter().map(|p| any_surface(p, rng)).collect();
    let desc = describe_surfaces(&surfaces, rng);
    Some(if rng.gen_bool(0.5) { (desc, better, worse, 0) } else { (desc, worse, better, 1) })
}

/// Train the judge on freshly generated examples (see `sample_example`). Returns the loss/accuracy curve.
pub fn train_judge(
    judge: &Judge,
    vars: &candle_nn::VarMap,
    tok: &TextTokenizer,
    cfg: &crate::train::stages::schedule::TrainConfig,
    rng: &mut impl Rng,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<crate::train::curves::Curves> {
    use candle_nn::Optimizer;
    let dev = Device::Cpu;
    let mut opt = candle_nn::AdamW::new(
        vars.all_vars(),
        candle_nn::ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let (steps, batch) = (cfg.steps, cfg.batch);
    let mut curves = crate::train::curves::Curves::new(&["loss", "train_acc"]);
    progress.set_length(steps as u64);
    for step in 0..steps {
        let mut ex = Vec::with_capacity(batch);
        while ex.len() < batch {
            if let Some(e) = sample_example(rng) {
                ex.push(e);
            }
        }
        let d: Vec<_> = ex.iter().map(|x| enc(tok, &x.0, MAX_DESC_TOKENS)).collect();
        let a: Vec<_> = ex.iter().map(|x| enc(tok, &x.1, MAX_RESP_TOKENS)).collect();
        let b: Vec<_> = ex.iter().map(|x| enc(tok, &x.2, MAX_RESP_TOKENS)).collect();
        let ((di, dm), (ai, am), (bi, bm)) = (
            pad_right(&d, tok.pad).tensors(&dev)?,
            pad_right(&a, tok.pad).tensors(&dev)?,
            pad_right(&b, tok.pad).tensors(&dev)?,
        );
        let labels = Tensor::new(ex.iter().map(|x| x.3).collect::<Vec<u32>>(), &dev)?;
        let logits = judge.forward(&di, &dm, &ai, &am, &bi, &bm)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        opt.set_learning_rate(crate::train::stages::schedule::lr_at(step, cfg));
        opt.backward_step(&loss)?;
        let acc = logits.argmax(D::Minus1)?.eq(&labels)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        let l = loss.to_scalar::<f32>()?;
        curves.push(step + 1, vec![l as f64, acc as f64]);
        progress.set_message(format!("loss {l:.3} acc {acc:.2}"));
        if (step + 1) % (steps / 10).max(1) == 0 {
            tracing::info!(step = step + 1, loss = l, acc, "judge");
        }
        progress.inc(1);
    }
    Ok(curves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn every_parameter_gets_a_gradient_and_order_is_symmetric() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = JudgeConfig { vocab_size: 40, d_model: 16, n_head: 2, n_layer: 1, d_ff: 32, max_positions: 16 };
        let j = Judge::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let d = Tensor::new(&[[1u32, 2, 3], [4, 5, 0]], &dev).unwrap();
        let dm = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev).unwrap();
        let a = Tensor::new(&[[6u32, 7], [8, 0]], &dev).unwrap();
        let am = Tensor::new(&[[1u32, 1], [1, 0]], &dev).unwrap();
        let b = Tensor::new(&[[9u32, 10], [11, 12]], &dev).unwrap();
        let bm = Tensor::ones((2, 2), DType::U32, &dev).unwrap();
        let ab = j.forward(&d, &dm, &a, &am, &b, &bm).unwrap();
        let ba = j.forward(&d, &dm, &b, &bm, &a, &am).unwrap();
        let swapped = Tensor::cat(&[ba.narrow(1, 1, 1).unwrap(), ba.narrow(1, 0, 1).unwrap()], 1).unwrap();
        assert!((ab.clone() - swapped).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        let loss = ab.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            // A key bias adds q·b to every score of a query alike, which softmax cancels: its
            // true gradient is zero and only rounding makes it non-zero (so it is not asserted).
            if name.ends_with("attn.k.bias") {
                continue;
            }
            assert!(g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
        }
    }
}
