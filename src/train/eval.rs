//! Acc_jud evaluation on held-out users: the policy's descriptions (and references: Null,
//! raw signals E, Golden) scored by the judge on each user's held-out pairs, both A/B orders.

use super::generate::generate;
use super::judge::{mean, Scorer};
use super::model::Gpt;
use super::sft::user_windows;
use super::synth::{Split, UserRecord, World};
use crate::event::EventBody;
use crate::prompt::{build_prompt, parse_output, NOT_PROVIDED};
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use rand::Rng;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Setting {
    /// Previous description "Not provided", the first 4 signals.
    Base4,
    /// "Not provided", 8 signals at once.
    Base8,
    /// Round 1 on signals 1–4, round 2 on the round-1 description + signals 5–8.
    Stream44,
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::Base4 => "base-4",
            Setting::Base8 => "base-8",
            Setting::Stream44 => "streaming 4+4",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    pub method: String,
    pub setting: String,
    pub acc_jud: f32,
    pub format_rate: f32,
    pub users: usize,
    pub pairs: usize,
}

/// Held-out users with their first two windows of signals.
pub fn test_users(world: &World, limit: usize) -> Vec<(&UserRecord, Vec<&EventBody>, Vec<&EventBody>)> {
    let windows = user_windows(world);
    world
        .users
        .iter()
        .filter(|u| u.split == Split::Test)
        .filter_map(|u| {
            let ws = windows.get(u.user_id.as_str())?;
            (ws.len() >= 2)
                .then(|| (u, ws[0].iter().map(|x| &x.0.body).collect(), ws[1].iter().map(|x| &x.0.body).collect()))
        })
        .take(limit)
        .collect()
}

fn score_descriptions(
    scorer: &Scorer,
    users: &[(&UserRecord, Vec<&EventBody>, Vec<&EventBody>)],
    descs: &[Option<String>],
) -> anyhow::Result<(f32, usize)> {
    let jobs: Vec<(&str, &[_])> = users
        .iter()
        .zip(descs)
        .map(|(u, d)| (d.as_deref().unwrap_or(NOT_PROVIDED), u.0.test_pairs.as_slice()))
        .collect();
    let scores = scorer.many_pair_scores(&jobs)?;
    // A description that failed the format check scores 0 (R = R_jud · R_format).
    let all: Vec<f32> =
        scores.iter().zip(descs).flat_map(|(s, d)| s.iter().map(move |&x| if d.is_some() { x } else { 0.0 })).collect();
    Ok((mean(&all), all.len()))
}

/// Reference rows that need no policy: Null, raw signals E (8 signals as the description), Golden.
pub fn reference_rows(
    scorer: &Scorer,
    users: &[(&UserRecord, Vec<&EventBody>, Vec<&EventBody>)],
) -> anyhow::Result<Vec<EvalRow>> {
    let raw = |u: &(&UserRecord, Vec<&EventBody>, Vec<&EventBody>)| {
        let p = build_prompt(None, u.1.iter().chain(&u.2).copied());
        let start = p.find("Signals:\n").map(|i| i + 9).unwrap_or(0);
        let end = p.find("Reason about").unwrap_or(p.len());
        Some(p[start..end].trim().to_string())
    };
    let sets: [(&str, Vec<Option<String>>); 3] = [
        ("Null", users.iter().map(|_| Some(NOT_PROVIDED.to_string())).collect()),
        ("Raw signals E", users.iter().map(raw).collect()),
        ("Golden", users.iter().map(|u| Some(u.0.golden.clone())).collect()),
    ];
    sets.into_iter()
        .map(|(name, descs)| {
            let (acc, pairs) = score_descriptions(scorer, users, &descs)?;
            Ok(EvalRow {
                method: name.into(),
                setting: "-".into(),
                acc_jud: acc,
                format_rate: 1.0,
                users: users.len(),
                pairs,
            })
        })
        .collect()
}

/// Run the policy in one setting and score its final descriptions.
#[allow(clippy::too_many_arguments)]
pub fn eval_policy(
    method: &str,
    model: &Gpt,
    tok: &TextTokenizer,
    scorer: &Scorer,
    users: &[(&UserRecord, Vec<&EventBody>, Vec<&EventBody>)],
    setting: Setting,
    params: &SamplingParams,
    max_new: usize,
    batch: usize,
    rng: &mut impl Rng,
) -> anyhow::Result<(EvalRow, Vec<Option<String>>)> {
    let run = |prompts: Vec<String>, rng: &mut _| -> anyhow::Result<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(batch) {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|p| tok.encode(p)).collect();
            for g in generate(model, tok, &ids, max_new, params, rng)? {
                out.push(parse_output(&g.text).description);
            }
        }
        Ok(out)
    };
    let descs = match setting {
        Setting::Base4 => run(users.iter().map(|u| build_prompt(None, u.1.iter().copied())).collect(), rng)?,
        Setting::Base8 => {
            run(users.iter().map(|u| build_prompt(None, u.1.iter().chain(&u.2).copied())).collect(), rng)?
        }
        Setting::Stream44 => {
            let first = run(users.iter().map(|u| build_prompt(None, u.1.iter().copied())).collect(), rng)?;
            run(users.iter().zip(&first).map(|(u, d)| build_prompt(d.as_deref(), u.2.iter().copied())).collect(), rng)?
        }
    };
    let (acc, pairs) = score_descriptions(scorer, users, &descs)?;
    let ok = descs.iter().filter(|d| d.is_some()).count() as f32 / descs.len().max(1) as f32;
    Ok((
        EvalRow {
            method: method.into(),
            setting: setting.name().into(),
            acc_jud: acc,
            format_rate: ok,
            users: users.len(),
            pairs,
        },
        descs,
    ))
}

pub fn markdown(rows: &[EvalRow]) -> String {
    let mut s = String::from(
        "| method | setting | Acc_jud (%) | format ok (%) | users | pairs |\n|---|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.1} | {} | {} |\n",
            r.method,
            r.setting,
            100.0 * r.acc_jud,
            100.0 * r.format_rate,
            r.users,
            r.pairs
        ));
    }
    s
}
