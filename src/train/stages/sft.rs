//! Stage 1, cold start: teacher candidates filtered by the judge (R_jud = 1), base and
//! streaming examples, and supervised fine-tuning with the loss on response tokens only.

use crate::event::Event;
use crate::prompt::{build_prompt, build_response, Template};
use crate::tokenizer::TextTokenizer;
use crate::train::batch::pad_right;
use crate::train::curves::Curves;
use crate::train::judge::{mean, PairScores, Scorer};
use crate::train::model::{Decoder, Gpt, GptConfig};
pub use crate::train::stages::schedule::{lr_at, TrainConfig};
use crate::train::synth::{Annotation, Split, UserRecord, World};
use crate::train::teacher::{evidence_marks, observe, teach, Mark, Rule, Signal, Stated};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Module, Optimizer, ParamsAdamW, VarMap};
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
    /// The poles the response's evidence lines quote, for the auxiliary probe (empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<Mark>,
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

/// Teacher → judge filter → examples, prompts in `template`. Per train user: a streaming chain
/// over its windows (the first window is a base example) plus a base example for every later
/// window. The response is the same text in every template; `tokenize` ends it with the
/// tokenizer's end token (`<eos>`, or ChatML's `<|im_end|>`).
#[allow(clippy::too_many_arguments)]
pub fn build_examples(
    world: &World,
    template: Template,
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
                    let prompt = template.build_prompt(
                        if streaming { prev.as_ref().map(|p| p.1.as_str()) } else { None },
                        bodies.iter().copied(),
                    );
                    let response = build_response(&cands[i].reasoning, &cands[i].description);
                    out.push(SftExample {
                        user_id: user.user_id.clone(),
                        streaming,
                        prompt,
                        marks: evidence_marks(user, prev_prefs, &signals, rule, &response),
                        response,
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
                marks: Vec::new(),
            }
        })
        .collect()
}

pub struct Tokenized {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// Response token index → probe targets (key, recurs), for tokens inside a `Mark`.
    pub aux: Vec<(usize, [f32; 2])>,
}

/// The probe targets of each response token that overlaps a mark.
fn token_marks(offsets: &[(usize, usize)], marks: &[Mark]) -> Vec<(usize, [f32; 2])> {
    let f = |b: bool| if b { 1.0 } else { 0.0 };
    offsets
        .iter()
        .enumerate()
        .filter_map(|(j, &(a, b))| {
            let m = marks.iter().find(|m| a < m.end && b > m.start)?;
            Some((j, [f(m.key), f(m.recurs)]))
        })
        .collect()
}

pub fn tokenize(examples: &[SftExample], tok: &TextTokenizer, max_len: usize) -> Vec<Tokenized> {
    examples
        .iter()
        .map(|e| {
            let (mut response, offsets) = tok.encode_with_offsets(&e.response);
            response.push(tok.eos);
            Tokenized { prompt: tok.encode(&e.prompt), response, aux: token_marks(&offsets, &e.marks) }
        })
        .filter(|t| t.prompt.len() + t.response.len() <= max_len)
        .collect()
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

/// The auxiliary probe: a linear read-out of the residual stream that the last block's attention
/// sees, trained to tell, at each pole an evidence line quotes, whether it is a key preference
/// and whether the window shows it again. Training only; not part of the package.
pub struct Probe {
    head: candle_nn::Linear,
    weight: f64,
}

/// Binary cross-entropy on logits, composed from ops that have a backward in candle:
/// max(x, 0) − x·y + ln(1 + e^−|x|).
fn bce_with_logits(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let soft = (x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    (soft - (x * y)?)?.mean_all()
}

/// Cross-entropy on response tokens only, each sequence's loss normalised by its length.
/// Only the response positions go through the vocabulary projection. With a probe, its loss
/// (weighted) is added and also returned on its own.
pub fn sft_loss(
    model: &dyn Decoder,
    items: &[&Tokenized],
    pad: u32,
    probe: Option<&Probe>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let dev = Device::Cpu;
    let inputs: Vec<Vec<u32>> = items.iter().map(|t| t.prompt.iter().chain(&t.response).copied().collect()).collect();
    let b = pad_right(&inputs, pad);
    let len = b.len - 1;
    let mut x = Vec::with_capacity(b.rows * len);
    let (mut at, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
    let (mut probe_at, mut probe_y) = (Vec::new(), Vec::new());
    for (r, t) in items.iter().enumerate() {
        for &(j, target) in &t.aux {
            if t.prompt.len() + j < len {
                probe_at.push((r * len + t.prompt.len() + j) as u32);
                probe_y.extend(target);
            }
        }
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
    let mut tap = None;
    let (h, _) = model.hidden_tapped(&x, &mask, &pos, None, &mut tap)?;
    let n = w.len();
    let lm = (model.target_logprobs(&h, at, y)? * Tensor::from_vec(w, n, &dev)?)?.sum_all()?.neg()?;
    match (probe, tap) {
        (Some(p), Some(tap)) if !probe_at.is_empty() => {
            let d = tap.dim(2)?;
            let n = probe_at.len();
            let rows = tap.reshape((b.rows * len, d))?.index_select(&Tensor::from_vec(probe_at, n, &dev)?, 0)?;
            let aux = bce_with_logits(&p.head.forward(&rows)?, &Tensor::from_vec(probe_y, (n, 2), &dev)?)?;
            Ok(((lm + (&aux * p.weight)?)?, Some(aux)))
        }
        _ => Ok((lm, None)),
    }
}

#[allow(clippy::too_many_arguments)]
/// Supervised fine-tuning. Returns the loss curve (train loss, held-out loss every 50 steps).
pub fn train(
    model: &dyn Decoder,
    vars: &VarMap,
    train: &[Tokenized],
    valid: &[Tokenized],
    cfg: &TrainConfig,
    pad: u32,
    rng: &mut impl Rng,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Curves> {
    let probe_vars = VarMap::new();
    let probe = if cfg.aux > 0.0 {
        let vb = candle_nn::VarBuilder::from_varmap(&probe_vars, DType::F32, &Device::Cpu);
        Some(Probe { head: candle_nn::linear(model.width(), 2, vb.pp("probe"))?, weight: cfg.aux })
    } else {
        None
    };
    let params: Vec<_> = vars.all_vars().into_iter().chain(probe_vars.all_vars()).collect();
    let mut opt = AdamW::new(params, ParamsAdamW { lr: cfg.lr, weight_decay: 0.01, ..Default::default() })?;
    let mut curves = Curves::new(&["train_loss", "valid_loss", "lr", "probe_loss"]);
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
        let (loss, aux) = sft_loss(model, &items, pad, probe.as_ref())?;
        opt.backward_step(&loss)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let a = aux.map(|t| t.to_dtype(DType::F64)?.to_scalar::<f64>()).transpose()?.unwrap_or(f64::NAN);
        if (step % 50 == 49 || step + 1 == cfg.steps) && !valid.is_empty() {
            let v: Vec<&Tokenized> = valid.iter().take(64).collect();
            valid_loss = v
                .chunks(cfg.batch)
                .map(|c| sft_loss(model, c, pad, None).and_then(|t| t.0.to_scalar::<f32>()))
                .sum::<candle_core::Result<f32>>()? as f64
                / v.chunks(cfg.batch).len() as f64;
        }
        curves.push(step + 1, vec![l, valid_loss, lr, a]);
        progress.set_message(format!("loss {l:.3} valid {valid_loss:.3}"));
        if (step + 1) % (cfg.steps / 10).max(1) == 0 {
            tracing::info!(step = step + 1, loss = l, valid_loss, lr, probe_loss = a, "sft");
        }
        progress.inc(1);
    }
    Ok(curves)
}

/// Loads a checkpoint into `vars`, which may have more blocks than it: a block the checkpoint
/// lacks starts as the identity (its two output projections zero), so the loaded network's
/// function is unchanged and the new depth is learned from there. Returns the new tensors.
pub fn load_grown(vars: &VarMap, path: &std::path::Path) -> candle_core::Result<usize> {
    let saved = candle_core::safetensors::load(path, &Device::Cpu)?;
    let data = vars.data().lock().expect("varmap lock");
    // Only whole blocks may be new; anything else missing is the wrong checkpoint. Checked
    // before anything is set, so a refused load leaves `vars` as it was.
    if let Some(name) = data.keys().find(|n| !saved.contains_key(*n) && !n.starts_with("h.")) {
        candle_core::bail!("{} has no tensor {name}: not a checkpoint of this policy", path.display())
    }
    let mut new = 0;
    for (name, var) in data.iter() {
        match saved.get(name) {
            Some(t) => var.set(t)?,
            None => {
                new += 1;
                if name.contains(".attn.o.") || name.contains(".mlp.proj.") {
                    var.set(&var.zeros_like()?)?;
                }
            }
        }
    }
    Ok(new)
}

pub fn new_policy(cfg: &GptConfig, vars: &VarMap) -> candle_core::Result<Gpt> {
    Gpt::new(cfg, candle_nn::VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_marks_cover_the_tokens_that_overlap_a_mark() {
        let marks = [Mark { start: 3, end: 8, key: true, recurs: false }];
        // tokens [0,3) [3,5) [5,9) [9,12): the middle two overlap bytes 3..8
        let offsets = [(0, 3), (3, 5), (5, 9), (9, 12)];
        assert_eq!(token_marks(&offsets, &marks), vec![(1, [1.0, 0.0]), (2, [1.0, 0.0])]);
        assert!(token_marks(&offsets, &[]).is_empty());
    }

    #[test]
    fn bce_matches_the_closed_form() {
        let x = Tensor::new(&[2.0f32, -1.0, 0.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1.0f32, 1.0, 0.0], &Device::Cpu).unwrap();
        let got = bce_with_logits(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        let want = [(2.0f32, 1.0f32), (-1.0, 1.0), (0.0, 0.0)]
            .iter()
            .map(|&(x, y)| -(y * (1.0 / (1.0 + (-x).exp())).ln() + (1.0 - y) * (1.0 / (1.0 + x.exp())).ln()))
            .sum::<f32>()
            / 3.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    fn tiny(n_layer: usize) -> (Gpt, VarMap) {
        let cfg =
            GptConfig { vocab_size: 40, n_layer, n_head: 2, d_model: 16, d_ff: 32, max_positions: 32, rotary: true };
        let vars = VarMap::new();
        (new_policy(&cfg, &vars).unwrap(), vars)
    }

    #[test]
    fn the_probe_learns_a_feature_the_stream_carries() {
        // The target is a property of the token itself (its id's parity), which the residual
        // stream carries: the probe's loss must fall well below chance (ln 2 ≈ 0.69).
        use rand::{rngs::StdRng, SeedableRng};
        let (model, vars) = tiny(2);
        let mut rng = StdRng::seed_from_u64(5);
        let data: Vec<Tokenized> = (0..64)
            .map(|_| {
                let response: Vec<u32> = (0..8).map(|_| rng.gen_range(2..40)).collect();
                let aux = response.iter().enumerate().map(|(j, &t)| (j, [(t % 2) as f32, 0.0])).collect();
                Tokenized { prompt: vec![rng.gen_range(2..40), rng.gen_range(2..40)], response, aux }
            })
            .collect();
        let tc = TrainConfig { steps: 150, batch: 8, lr: 1e-2, warmup: 5, aux: 1.0 };
        let curves = train(&model, &vars, &data, &[], &tc, 0, &mut rng, &indicatif::ProgressBar::hidden()).unwrap();
        let probe: Vec<f64> = curves.rows.iter().rev().take(20).map(|r| r.1[3]).collect();
        let last = probe.iter().sum::<f64>() / probe.len() as f64;
        // half of the labels (the second column) are constant 0, so chance is ≈ 0.35
        assert!(last < 0.2, "probe loss {last}");
    }

    #[test]
    fn a_grown_policy_computes_what_the_checkpoint_did() {
        let (small, small_vars) = tiny(2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.safetensors");
        small_vars.save(&path).unwrap();
        let (big, big_vars) = tiny(3);
        assert_eq!(load_grown(&big_vars, &path).unwrap(), 16, "one new block: 8 weights and 8 biases / norms");
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[3u32, 7, 1, 30, 12]], &dev).unwrap();
        let mask = Tensor::ones((1, 5), DType::U32, &dev).unwrap();
        let pos = Tensor::arange(0u32, 5, &dev).unwrap().unsqueeze(0).unwrap();
        let a = small.forward(&ids, &mask, &pos, None).unwrap().0;
        let b = big.forward(&ids, &mask, &pos, None).unwrap().0;
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        let other = VarMap::new();
        other.get((2, 2), "unrelated", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu).unwrap();
        let wrong = dir.path().join("wrong.safetensors");
        other.save(&wrong).unwrap();
        assert!(load_grown(&big_vars, &wrong).is_err(), "a checkpoint without the embeddings is refused");
        let same = big.forward(&ids, &mask, &pos, None).unwrap().0;
        let moved = (a - same).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved < 1e-6, "a refused load changed nothing: {moved}");
    }
}
