//! Stage 1, cold start: teacher candidates filtered by the judge (R_jud = 1), base and
//! streaming examples, and supervised fine-tuning with the loss on response tokens only.

use super::batch::pad_right;
use super::curves::Curves;
use super::judge::{mean, Scorer};
use super::model::{Gpt, GptConfig};
use super::synth::{Annotation, Split, UserRecord, World};
use super::teacher::{observe, teach, Rule, Signal, Stated};
use crate::event::Event;
use crate::prompt::{build_prompt, build_response};
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;

pub const WINDOW: usize = 4;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SftExample {
    pub user_id: String,
    pub streaming: bool,
    pub prompt: String,
    pub response: String,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FilterStats {
    pub candidates: usize,
    pub kept_candidates: usize,
    pub examples: usize,
    pub windows_without_kept: usize,
}

/// A user's signals in order, each with its ground-truth annotation, cut into windows.
pub fn user_windows(world: &World) -> HashMap<&str, Vec<Vec<(&Event, &Annotation)>>> {
    let mut by_user: HashMap<&str, Vec<(&Event, &Annotation)>> = HashMap::new();
    for (e, a) in annotated(world) {
        by_user.entry(e.user_id.as_str()).or_default().push((e, a));
    }
    by_user.into_iter().map(|(u, evs)| (u, evs.chunks_exact(WINDOW).map(<[_]>::to_vec).collect())).collect()
}

/// Every event that has a ground-truth annotation, in stream order, with it.
fn annotated(world: &World) -> impl Iterator<Item = (&Event, &Annotation)> {
    let ann: HashMap<&str, &Annotation> = world.annotations.iter().map(|a| (a.event_id.as_str(), a)).collect();
    world.events.iter().filter_map(move |e| Some((e, *ann.get(e.event_id.as_str())?)))
}

/// Teacher → judge filter → examples. Per train user: a streaming chain over its windows
/// (the first window is a base example) plus a base example for every later window.
pub fn build_examples(
    world: &World,
    scorer: &Scorer,
    rule: Rule,
    g: usize,
    error_rate: f64,
    rng: &mut impl Rng,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<SftExample>, FilterStats)> {
    let windows = user_windows(world);
    let mut stats = FilterStats::default();
    let mut out = Vec::new();
    let users: Vec<&UserRecord> =
        world.users.iter().filter(|u| u.split == Split::Train && !u.test_pairs.is_empty()).collect();
    progress.set_length(users.len() as u64);
    for user in users {
        progress.inc(1);
        let Some(ws) = windows.get(user.user_id.as_str()) else {
            continue;
        };
        let mut prev: Option<(Vec<Stated>, String)> = None;
        for (w, win) in ws.iter().enumerate() {
            let signals: Vec<Signal> = win.iter().map(|x| (&x.0.body, x.1)).collect();
            let bodies: Vec<_> = win.iter().map(|x| &x.0.body).collect();
            let settings: &[bool] = if w == 0 { &[false] } else { &[true, false] };
            for &streaming in settings {
                let prev_prefs: &[Stated] =
                    if streaming { prev.as_ref().map(|p| p.0.as_slice()).unwrap_or(&[]) } else { &[] };
                let cands = teach(user, prev_prefs, &signals, rule, g, error_rate, rng);
                let jobs: Vec<(&str, &[_])> =
                    cands.iter().map(|c| (c.description.as_str(), user.test_pairs.as_slice())).collect();
                let scores = scorer.many_pair_scores(&jobs)?;
                stats.candidates += cands.len();
                let kept: Vec<usize> = (0..cands.len()).filter(|&i| mean(&scores[i]) > 0.5).collect();
                stats.kept_candidates += kept.len();
                let chosen = kept.first().copied();
                if let Some(i) = chosen {
                    let prompt = build_prompt(
                        if streaming { prev.as_ref().map(|p| p.1.as_str()) } else { None },
                        bodies.iter().copied(),
                    );
                    out.push(SftExample {
                        user_id: user.user_id.clone(),
                        streaming,
                        prompt,
                        response: build_response(&cands[i].reasoning, &cands[i].description),
                    });
                } else {
                    stats.windows_without_kept += 1;
                }
                // The chain continues from what the streaming (or first) round concluded.
                if streaming || w == 0 {
                    let c = &cands[chosen.unwrap_or(0)];
                    prev = Some((c.prefs.clone(), c.description.clone()));
                }
            }
        }
    }
    stats.examples = out.len();
    Ok((out, stats))
}

/// Copy warm-up data: one signal per example from every train user, the target quoting every
/// pole the signal shows (`teacher::observe`). Short sequences, so steps are cheap; a tiny
/// decoder trained on the 4-signal task alone never learned to copy within the budget.
pub fn copy_examples(world: &World, rule: Rule, rng: &mut impl Rng) -> Vec<SftExample> {
    let train: std::collections::HashSet<&str> =
        world.users.iter().filter(|u| u.split == Split::Train).map(|u| u.user_id.as_str()).collect();
    annotated(world)
        .filter(|(e, _)| train.contains(e.user_id.as_str()))
        .map(|(e, a)| {
            let c = observe(&[(&e.body, a)], rule, rng);
            SftExample {
                user_id: e.user_id.clone(),
                streaming: false,
                prompt: build_prompt(None, [&e.body]),
                response: build_response(&c.reasoning, &c.description),
            }
        })
        .collect()
}

pub struct Tokenized {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

pub fn tokenize(examples: &[SftExample], tok: &TextTokenizer, max_len: usize) -> Vec<Tokenized> {
    examples
        .iter()
        .map(|e| {
            let mut response = tok.encode(&e.response);
            response.push(tok.eos);
            Tokenized { prompt: tok.encode(&e.prompt), response }
        })
        .filter(|t| t.prompt.len() + t.response.len() <= max_len)
        .collect()
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
}

/// Linear warm-up, then cosine decay to 10%.
pub fn lr_at(step: usize, cfg: &TrainConfig) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let t = (step - cfg.warmup) as f64 / (cfg.steps.saturating_sub(cfg.warmup)).max(1) as f64;
    cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
}

/// Batches of similar length (less padding), in random order.
fn batches(data: &[Tokenized], batch: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..data.len()).collect();
    idx.shuffle(rng);
    let mut out = Vec::new();
    for chunk in idx.chunks(batch * 16) {
        let mut c = chunk.to_vec();
        c.sort_by_key(|&i| data[i].prompt.len() + data[i].response.len());
        out.extend(c.chunks(batch).map(<[usize]>::to_vec));
    }
    out.shuffle(rng);
    out
}

/// Cross-entropy on response tokens only, each sequence's loss normalised by its length.
/// Only the response positions go through the vocabulary projection.
pub fn sft_loss(model: &Gpt, items: &[&Tokenized], pad: u32) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    let inputs: Vec<Vec<u32>> = items.iter().map(|t| t.prompt.iter().chain(&t.response).copied().collect()).collect();
    let b = pad_right(&inputs, pad);
    let len = b.len - 1;
    let mut x = Vec::with_capacity(b.rows * len);
    let (mut at, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for (r, t) in items.iter().enumerate() {
        let row = &b.ids[r * b.len..(r + 1) * b.len];
        x.extend_from_slice(&row[..len]);
        let start = t.prompt.len() - 1; // position predicting the first response token
        at.extend((start..start + t.response.len()).map(|j| (r * len + j) as u32));
        y.extend_from_slice(&t.response);
        w.extend(std::iter::repeat_n(1.0 / (t.response.len() * items.len()) as f32, t.response.len()));
    }
    let mask: Vec<u32> = b.mask.chunks(b.len).flat_map(|r| r[..len].to_vec()).collect();
    let x = Tensor::from_vec(x, (b.rows, len), &dev)?;
    let mask = Tensor::from_vec(mask, (b.rows, len), &dev)?;
    let pos = Tensor::arange(0u32, len as u32, &dev)?.unsqueeze(0)?.broadcast_as((b.rows, len))?.contiguous()?;
    let (h, _) = model.hidden(&x, &mask, &pos, None)?;
    let n = w.len();
    (model.target_logprobs(&h, at, y)? * Tensor::from_vec(w, n, &dev)?)?.sum_all()?.neg()
}

#[allow(clippy::too_many_arguments)]
/// Supervised fine-tuning. Returns the loss curve (train loss, held-out loss every 50 steps).
pub fn train(
    model: &Gpt,
    vars: &VarMap,
    train: &[Tokenized],
    valid: &[Tokenized],
    cfg: &TrainConfig,
    pad: u32,
    rng: &mut impl Rng,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Curves> {
    let mut opt = AdamW::new(vars.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 0.01, ..Default::default() })?;
    let mut curves = Curves::new(&["train_loss", "valid_loss", "lr"]);
    let mut queue: Vec<Vec<usize>> = Vec::new();
    let mut valid_loss = f64::NAN;
    progress.set_length(cfg.steps as u64);
    for step in 0..cfg.steps {
        if queue.is_empty() {
            queue = batches(train, cfg.batch, rng);
        }
        let idx = queue.pop().expect("non-empty training set");
        let items: Vec<&Tokenized> = idx.iter().map(|&i| &train[i]).collect();
        let lr = lr_at(step, cfg);
        opt.set_learning_rate(lr);
        let loss = sft_loss(model, &items, pad)?;
        opt.backward_step(&loss)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if (step % 50 == 49 || step + 1 == cfg.steps) && !valid.is_empty() {
            let v: Vec<&Tokenized> = valid.iter().take(64).collect();
            valid_loss = v
                .chunks(cfg.batch)
                .map(|c| sft_loss(model, c, pad).and_then(|t| t.to_scalar::<f32>()))
                .sum::<candle_core::Result<f32>>()? as f64
                / v.chunks(cfg.batch).len() as f64;
        }
        curves.push(step + 1, vec![l, valid_loss, lr]);
        progress.set_message(format!("loss {l:.3} valid {valid_loss:.3}"));
        if (step + 1) % (cfg.steps / 10).max(1) == 0 {
            tracing::info!(step = step + 1, loss = l, valid_loss, lr, "sft");
        }
        progress.inc(1);
    }
    Ok(curves)
}

pub fn new_policy(cfg: &GptConfig, vars: &VarMap) -> candle_core::Result<Gpt> {
    Gpt::new(cfg, candle_nn::VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = TrainConfig { steps: 100, batch: 1, lr: 1.0, warmup: 10 };
        assert!((lr_at(0, &cfg) - 0.1).abs() < 1e-9);
        assert!((lr_at(10, &cfg) - 1.0).abs() < 1e-9);
        assert!((lr_at(100, &cfg) - 0.1).abs() < 1e-9);
        assert!(lr_at(50, &cfg) < 1.0 && lr_at(50, &cfg) > 0.1);
    }
}
