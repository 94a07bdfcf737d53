//! Stage 2: GRPO with the judge reward. G samples per prompt, reward R_jud × R_format,
//! advantages centred on the group mean and divided by the group std (zero-std groups carry no
//! signal), PPO clipped objective (ε = 0.2), no KL term, loss averaged over response tokens.
//! Streaming rounds as in the paper: round 2's previous description is the policy's own round-1
//! output for the same user.

use crate::prompt::{parse_output, ParsedOutput, Template};
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use crate::train::curves::Curves;
use crate::train::generate::{generate, response_logprobs};
use crate::train::judge::{mean, PairScores, Scorer};
use crate::train::model::Decoder;
use crate::train::sft::user_windows;
use crate::train::synth::{make_pair, Pair, Split, UserRecord, World};
use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct GrpoConfig {
    pub steps: usize,
    pub prompts_per_step: usize,
    pub group: usize,
    pub clip: f64,
    pub lr: f64,
    pub max_new: usize,
    /// No-repeat n-gram size for the rollouts, as the package will decode (0: off).
    pub no_repeat: usize,
    /// Optimizer steps per batch of samples; after the first the ratio departs from 1 and the clip acts.
    pub minibatches: usize,
    /// Fresh noise-free pairs drawn from each user's preferences for its reward (0, or a user
    /// without known preferences: the user's held-out pairs). R_jud over 8 pairs moves in
    /// steps of 1/8, so a group's differences were mostly the pairs' noise.
    pub reward_pairs: usize,
    /// Groups sampled from the raw policy (T 1, nothing truncated or blocked) rather than with
    /// the package's decoding; round 1's descriptions are always decoded as the package does.
    pub on_policy: bool,
}

/// Train users with at least two windows: a streaming round 2 needs an earlier window.
pub fn streaming_train_users<'w, T>(world: &'w World, windows: &HashMap<&str, Vec<T>>) -> Vec<&'w UserRecord> {
    world
        .users
        .iter()
        .filter(|u| u.split == Split::Train && windows.get(u.user_id.as_str()).is_some_and(|w| w.len() >= 2))
        .collect()
}

/// The pairs a sample for `u` is rewarded on: `k` fresh noise-free pairs drawn from the user's
/// preferences, or the held-out pairs where `k` is 0 or none are known (imported data).
pub fn reward_pairs(u: &UserRecord, k: usize, rng: &mut impl Rng) -> Vec<Pair> {
    if k > 0 && !u.prefs.is_empty() {
        (0..k).map(|_| make_pair(&u.prefs, None, rng).0).collect()
    } else {
        u.test_pairs.clone()
    }
}

/// R = R_jud × R_format of each output; output i answers prompt i / `group`, rewarded on
/// `pairs[i / group]`.
pub fn rewards(scorer: &Scorer, parsed: &[ParsedOutput], pairs: &[&[Pair]], group: usize) -> anyhow::Result<Vec<f32>> {
    let jobs: Vec<(&str, &[Pair])> =
        parsed.iter().enumerate().map(|(i, p)| (p.description.as_deref().unwrap_or(""), pairs[i / group])).collect();
    let scores = scorer.many_pair_scores(&jobs)?;
    Ok(parsed.iter().zip(scores).map(|(p, s)| if p.format_ok() { mean(&s) } else { 0.0 }).collect())
}

/// Group-normalised advantages: (r − mean) / std, all zero where the group's rewards are equal.
pub fn advantages(rewards: &[f32], group: usize) -> Vec<f32> {
    rewards
        .chunks(group)
        .flat_map(|g| {
            let m = mean(g);
            let std = (g.iter().map(|r| (r - m).powi(2)).sum::<f32>() / g.len() as f32).sqrt();
            g.iter().map(move |r| if std < 1e-6 { 0.0 } else { (r - m) / std }).collect::<Vec<_>>()
        })
        .collect()
}

/// PPO clipped surrogate, negated for minimisation, averaged over response tokens.
pub fn clipped_loss(
    new_lp: &Tensor,
    old_lp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> candle_core::Result<Tensor> {
    let ratio = (new_lp - old_lp)?.exp()?;
    let adv = adv.unsqueeze(1)?.broadcast_as(ratio.shape())?;
    let unclipped = (&ratio * &adv)?;
    let clipped = (ratio.clamp(1.0 - clip, 1.0 + clip)? * &adv)?;
    let obj = unclipped.minimum(&clipped)?;
    let tokens = mask.sum_all()?.maximum(1.0)?;
    (obj * mask)?.sum_all()?.div(&tokens)?.neg()
}

struct Rollout {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    old_logprobs: Vec<f32>,
    reward: f32,
    format_ok: bool,
}

#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &dyn Decoder,
    vars: &VarMap,
    tok: &TextTokenizer,
    template: Template,
    scorer: &Scorer,
    world: &World,
    cfg: &GrpoConfig,
    rng: &mut impl Rng,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Curves> {
    let windows = user_windows(world);
    let users = streaming_train_users(world, &windows);
    let mut opt = AdamW::new(vars.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut curves = Curves::new(&["mean_reward", "format_rate", "mean_response_tokens", "loss"]);
    let sampling = SamplingParams::PAPER;
    progress.set_length(cfg.steps as u64);
    for step in 0..cfg.steps {
        // Prompts: half base (no previous description), half streaming round 2.
        let picked: Vec<&UserRecord> = users.choose_multiple(rng, cfg.prompts_per_step).copied().collect();
        let mut prompts = Vec::with_capacity(picked.len());
        let mut round1 = Vec::new();
        for (i, u) in picked.iter().enumerate() {
            let ws = &windows[u.user_id.as_str()];
            let w = rng.gen_range(1..ws.len());
            let bodies = |k: usize| ws[k].iter().map(|x| &x.0.body).collect::<Vec<_>>();
            if i % 2 == 0 {
                prompts.push(template.build_prompt(None, bodies(w)));
            } else {
                round1.push((prompts.len(), template.build_prompt(None, bodies(w - 1)), bodies(w)));
                prompts.push(String::new());
            }
        }
        if !round1.is_empty() {
            let ids: Vec<Vec<u32>> = round1.iter().map(|r| tok.encode(&r.1)).collect();
            let outs = generate(model, tok, &ids, cfg.max_new, &sampling, cfg.no_repeat, rng)?;
            for (r, o) in round1.iter().zip(outs) {
                prompts[r.0] = template.build_prompt(parse_output(&o.text).description.as_deref(), r.2.iter().copied());
            }
        }
        // G samples per prompt.
        let ids: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(tok.encode(p), cfg.group)).collect();
        let (group_sampling, group_no_repeat) =
            if cfg.on_policy { (SamplingParams::POLICY, 0) } else { (sampling, cfg.no_repeat) };
        let outs = generate(model, tok, &ids, cfg.max_new, &group_sampling, group_no_repeat, rng)?;
        let parsed: Vec<_> = outs.iter().map(|o| parse_output(&o.text)).collect();
        let pairs: Vec<Vec<Pair>> = picked.iter().map(|u| reward_pairs(u, cfg.reward_pairs, rng)).collect();
        let pairs: Vec<&[Pair]> = pairs.iter().map(Vec::as_slice).collect();
        let scores = rewards(scorer, &parsed, &pairs, cfg.group)?;
        let rollouts: Vec<Rollout> = outs
            .into_iter()
            .zip(ids)
            .zip(parsed.iter().zip(scores))
            .map(|((o, prompt), (p, reward))| Rollout {
                prompt,
                reward,
                format_ok: p.format_ok(),
                tokens: o.tokens,
                old_logprobs: o.logprobs,
            })
            .collect();
        let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
        let adv = advantages(&rewards, cfg.group);
        let mut losses = Vec::new();
        let live: Vec<usize> =
            (0..rollouts.len()).filter(|&i| adv[i] != 0.0 && !rollouts[i].tokens.is_empty()).collect();
        let per = live.len().div_ceil(cfg.minibatches.max(1)).max(1);
        for mb in live.chunks(per) {
            let seqs: Vec<(Vec<u32>, Vec<u32>)> =
                mb.iter().map(|&i| (rollouts[i].prompt.clone(), rollouts[i].tokens.clone())).collect();
            let (new_lp, mask) = response_logprobs(model, &seqs, tok.pad)?;
            let width = new_lp.dim(1)?;
            let old: Vec<f32> = mb
                .iter()
                .flat_map(|&i| {
                    let o = &rollouts[i].old_logprobs;
                    (0..width).map(move |j| o.get(j).copied().unwrap_or(0.0))
                })
                .collect();
            let old = Tensor::from_vec(old, (mb.len(), width), new_lp.device())?;
            let a = Tensor::from_vec(mb.iter().map(|&i| adv[i]).collect::<Vec<f32>>(), mb.len(), new_lp.device())?;
            let loss = clipped_loss(&new_lp, &old, &a, &mask, cfg.clip)?;
            opt.backward_step(&loss)?;
            losses.push(loss.to_scalar::<f32>()?);
        }
        let fr = rollouts.iter().filter(|r| r.format_ok).count() as f64 / rollouts.len() as f64;
        let len = rollouts.iter().map(|r| r.tokens.len()).sum::<usize>() as f64 / rollouts.len() as f64;
        let mr = mean(&rewards) as f64;
        curves.push(step + 1, vec![mr, fr, len, mean(&losses) as f64]);
        progress.set_message(format!("reward {mr:.3} format {fr:.2} len {len:.0}"));
        progress.inc(1);
        if (step + 1) % (cfg.steps / 10).max(1) == 0 {
            tracing::info!(step = step + 1, mean_reward = mr, format_rate = fr, mean_len = len, "grpo");
        }
    }
    Ok(curves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn advantages_are_group_normalised() {
        let a = advantages(&[1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5], 4);
        assert_eq!(&a[..4], &[1.0, -1.0, 1.0, -1.0]);
        assert_eq!(&a[4..], &[0.0; 4]);
    }

    #[test]
    fn clip_bounds_the_ratio() {
        let dev = Device::Cpu;
        let old = Tensor::new(&[[0.0f32, 0.0]], &dev).unwrap();
        let new = Tensor::new(&[[1.0f32, -1.0]], &dev).unwrap(); // ratios e and 1/e
        let mask = Tensor::new(&[[1.0f32, 1.0]], &dev).unwrap();
        let pos = clipped_loss(&new, &old, &Tensor::new(&[1.0f32], &dev).unwrap(), &mask, 0.2).unwrap();
        // min(e, 1.2) = 1.2 and min(1/e, 0.8) = 1/e  → −(1.2 + 0.3679)/2
        let want = -(1.2 + (-1.0f32).exp()) / 2.0;
        assert!((pos.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    }
}
