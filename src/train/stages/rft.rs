//! Rejection-sampling fine-tuning (expert iteration, as in ReST / STaR): the policy samples G
//! responses per prompt, the judge reward R_jud × R_format picks the best of each group, and
//! the policy is fine-tuned on those with the SFT loss. It optimises the same reward as GRPO,
//! but every kept sample is a full supervised target, so a few thousand rollouts are a whole
//! training set. Measured on the full preset it did not move the policy beyond the noise
//! (docs/training.md, attempt 16), so it is off by default.
//! Prompts are built as GRPO's: base windows, and streaming round 2 whose previous description
//! is the policy's own best round-1 output for the same user.

use crate::prompt::{build_prompt, parse_output};
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use crate::train::generate::generate;
use crate::train::grpo::{reward_pairs, rewards, streaming_train_users};
use crate::train::judge::{mean, Scorer};
use crate::train::model::Decoder;
use crate::train::sft::{user_windows, Tokenized};
use crate::train::synth::{Pair, UserRecord, World};
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Debug, Clone)]
pub struct RftConfig {
    /// Train users sampled; each gives two base prompts and one streaming prompt.
    pub users: usize,
    pub group: usize,
    pub max_new: usize,
    pub no_repeat: usize,
    /// Fresh noise-free pairs per user for the reward (as GRPO's `reward_pairs`).
    pub reward_pairs: usize,
    /// Users per generation batch.
    pub chunk: usize,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RftStats {
    pub prompts: usize,
    pub samples: usize,
    pub format_ok: usize,
    pub mean_reward: f32,
    pub kept: usize,
    pub kept_mean_reward: f32,
}

/// One sampled response with its reward.
#[derive(Debug, Clone)]
struct Sample {
    tokens: Vec<u32>,
    description: Option<String>,
    reward: f32,
}

/// The group's best sample, if it beats the group's mean (a group of equals says nothing
/// about what to prefer) and is valid; among equals the shortest.
fn pick(group: &[Sample]) -> Option<&Sample> {
    let m = mean(&group.iter().map(|s| s.reward).collect::<Vec<_>>());
    group
        .iter()
        .filter(|s| s.description.is_some() && s.reward > m + 1e-6)
        .max_by(|a, b| a.reward.total_cmp(&b.reward).then(b.tokens.len().cmp(&a.tokens.len())))
}

fn sample_groups(
    model: &dyn Decoder,
    tok: &TextTokenizer,
    scorer: &Scorer,
    prompts: &[(String, &[Pair])],
    cfg: &RftConfig,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<(Vec<u32>, Vec<Sample>)>> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(&p.0)).collect();
    let all: Vec<Vec<u32>> = ids.iter().flat_map(|p| std::iter::repeat_n(p.clone(), cfg.group)).collect();
    let outs = generate(model, tok, &all, cfg.max_new, &SamplingParams::PAPER, cfg.no_repeat, rng)?;
    let parsed: Vec<_> = outs.iter().map(|o| parse_output(&o.text)).collect();
    let pairs: Vec<&[Pair]> = prompts.iter().map(|p| p.1).collect();
    let rewards = rewards(scorer, &parsed, &pairs, cfg.group)?;
    let samples: Vec<Sample> = outs
        .into_iter()
        .zip(parsed)
        .zip(rewards)
        .map(|((o, p), reward)| {
            let ok = p.format_ok();
            Sample { tokens: o.tokens, reward, description: p.description.filter(|_| ok) }
        })
        .collect();
    Ok(ids.into_iter().zip(samples.chunks(cfg.group).map(<[Sample]>::to_vec)).collect())
}

/// Samples, rewards and keeps the best of each group; returns the kept (prompt, response)
/// pairs as SFT data (the response ends with the stop token it was sampled with, then EOS).
pub fn collect(
    model: &dyn Decoder,
    tok: &TextTokenizer,
    scorer: &Scorer,
    world: &World,
    cfg: &RftConfig,
    rng: &mut impl Rng,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<Tokenized>, RftStats)> {
    let windows = user_windows(world);
    let users = streaming_train_users(world, &windows);
    let picked: Vec<&UserRecord> = users.choose_multiple(rng, cfg.users).copied().collect();
    let mut acc = Kept::default();
    progress.set_length(picked.len() as u64);
    for chunk in picked.chunks(cfg.chunk.max(1)) {
        let pairs: Vec<Vec<Pair>> = chunk.iter().map(|u| reward_pairs(u, cfg.reward_pairs, rng)).collect();
        let mut base = Vec::new();
        let mut next = Vec::new();
        for (u, p) in chunk.iter().zip(&pairs) {
            let ws = &windows[u.user_id.as_str()];
            let w = rng.gen_range(1..ws.len());
            let bodies = |k: usize| ws[k].iter().map(|x| &x.0.body).collect::<Vec<_>>();
            base.push((build_prompt(None, bodies(w - 1)), p.as_slice()));
            base.push((build_prompt(None, bodies(w)), p.as_slice()));
            next.push(bodies(w));
        }
        let groups = sample_groups(model, tok, scorer, &base, cfg, rng)?;
        // Round 2 continues from the best valid round-1 description of the earlier window.
        let mut stream = Vec::new();
        for (i, (ids, group)) in groups.iter().enumerate() {
            acc.add(ids, group, tok.eos);
            if i % 2 == 0 {
                let prev = group
                    .iter()
                    .filter(|s| s.description.is_some())
                    .max_by(|a, b| a.reward.total_cmp(&b.reward))
                    .and_then(|s| s.description.as_deref());
                stream.push((build_prompt(prev, next[i / 2].iter().copied()), pairs[i / 2].as_slice()));
            }
        }
        for (ids, group) in sample_groups(model, tok, scorer, &stream, cfg, rng)? {
            acc.add(&ids, &group, tok.eos);
        }
        progress.inc(chunk.len() as u64);
        progress.set_message(format!("kept {} of {}", acc.data.len(), acc.stats.prompts));
    }
    let mut stats = acc.stats;
    stats.mean_reward = mean(&acc.rewards);
    stats.kept = acc.data.len();
    stats.kept_mean_reward = mean(&acc.kept_rewards);
    Ok((acc.data, stats))
}

/// What `collect` keeps, with the statistics of everything it sampled.
#[derive(Default)]
struct Kept {
    data: Vec<Tokenized>,
    stats: RftStats,
    rewards: Vec<f32>,
    kept_rewards: Vec<f32>,
}

impl Kept {
    fn add(&mut self, prompt: &[u32], group: &[Sample], eos: u32) {
        self.stats.prompts += 1;
        self.stats.samples += group.len();
        self.stats.format_ok += group.iter().filter(|s| s.description.is_some()).count();
        self.rewards.extend(group.iter().map(|s| s.reward));
        if let Some(best) = pick(group) {
            self.kept_rewards.push(best.reward);
            let mut response = best.tokens.clone();
            response.push(eos);
            self.data.push(Tokenized { prompt: prompt.to_vec(), response, aux: Vec::new() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(reward: f32, len: usize, valid: bool) -> Sample {
        Sample { tokens: vec![0; len], description: valid.then(|| "d".into()), reward }
    }

    #[test]
    fn picks_the_best_valid_sample_above_the_group_mean() {
        let g = [s(0.5, 9, true), s(0.9, 12, true), s(0.9, 10, true), s(0.2, 3, true)];
        assert_eq!(pick(&g).unwrap().tokens.len(), 10, "the shorter of two equal best");
        assert!(pick(&[s(0.7, 5, true), s(0.7, 6, true)]).is_none(), "a group of equals teaches nothing");
        assert!(pick(&[s(0.0, 5, false), s(0.0, 6, false)]).is_none());
        let invalid_best = [s(0.0, 5, false), s(0.6, 6, true)];
        assert_eq!(pick(&invalid_best).unwrap().reward, 0.6);
    }
}
