//! Acc_jud evaluation on held-out users: the policy's descriptions (and references: Null,
//! raw signals E, Golden) scored by the judge on each user's held-out pairs, both A/B orders.
//! Also the paper's robustness (reversal, drift) and efficiency (time per update) studies.

pub mod audit;
pub mod llm_judge;

use crate::event::EventBody;
use crate::prompt::{build_prompt, parse_output, Template, NOT_PROVIDED};
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use crate::train::generate::generate;
use crate::train::judge::{mean, PairScores, Scorer};
use crate::train::model::Decoder;
use crate::train::sft::user_windows;
use crate::train::synth::{describe_surfaces, render_ugc, Annotation, Pair, Pref, Split, UserRecord, World};
use crate::train::teacher::{Rule, Stated};
use audit::{audit, mean_audit, Audit};
use rand::Rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Setting {
    /// Previous description "Not provided", the first 4 signals.
    Base4,
    /// "Not provided", 8 signals at once.
    Base8,
    /// Round 1 on signals 1–4, round 2 on the round-1 description + signals 5–8.
    Stream44,
}

/// The three settings of the paper's tables, in their order.
pub const SETTINGS: [Setting; 3] = [Setting::Base4, Setting::Base8, Setting::Stream44];

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
    /// Standard error of `acc_jud` over users.
    pub se: f32,
    pub format_rate: f32,
    pub users: usize,
    pub pairs: usize,
}

/// A held-out user with all its signals in order (and their ground truth, for the
/// robustness variants).
#[derive(Clone)]
pub struct EvalUser {
    pub user: UserRecord,
    pub signals: Vec<(EventBody, Annotation)>,
}

impl EvalUser {
    /// Signals `from..to` (clamped).
    pub fn span(&self, from: usize, to: usize) -> Vec<&EventBody> {
        self.annotated(from, to).into_iter().map(|s| s.0).collect()
    }

    /// Signals `from..to` (clamped) with their ground truth, as the teacher reads them.
    pub fn annotated(&self, from: usize, to: usize) -> Vec<(&EventBody, &Annotation)> {
        self.signals[from.min(self.signals.len())..to.min(self.signals.len())].iter().map(|s| (&s.0, &s.1)).collect()
    }

    /// The same user after a preference reversal of its first `n` signals (the user now
    /// prefers what it rejected), and of its held-out pairs when `pairs` is set.
    pub fn reversed(&self, n: usize, pairs: bool, rng: &mut impl Rng) -> EvalUser {
        let mut out = self.clone();
        for (body, ann) in out.signals.iter_mut().take(n) {
            match body {
                EventBody::Comparison { chosen, rejected, .. } => {
                    std::mem::swap(chosen, rejected);
                    std::mem::swap(&mut ann.chosen_poles, &mut ann.rejected_poles);
                }
                EventBody::Ugc { text } => {
                    ann.ugc_poles = ann.ugc_poles.iter().map(|p| Pref { dim: p.dim, dir: -p.dir }).collect();
                    *text = render_ugc(&ann.ugc_poles, rng);
                }
                EventBody::Forget => {}
            }
        }
        if pairs {
            out.user.prefs.iter_mut().for_each(|p| p.dir = -p.dir);
            for p in out.user.test_pairs.iter_mut() {
                std::mem::swap(&mut p.chosen, &mut p.rejected);
                std::mem::swap(&mut p.chosen_poles, &mut p.rejected_poles);
            }
        }
        out
    }
}

/// Held-out users that have at least 8 signals.
pub fn test_users(world: &World, limit: usize) -> Vec<EvalUser> {
    let windows = user_windows(world);
    world
        .users
        .iter()
        .filter(|u| u.split == Split::Test)
        .filter_map(|u| {
            let ws = windows.get(u.user_id.as_str())?;
            let signals: Vec<_> = ws.iter().flatten().map(|(e, a)| (e.body.clone(), (*a).clone())).collect();
            (signals.len() >= 8).then(|| EvalUser { user: u.clone(), signals })
        })
        .take(limit)
        .collect()
}

/// Acc_jud of one description per user: the mean over every user's pairs, and its standard
/// error over users (a user's pairs share one description, so users are the independent draws).
fn score_descriptions(
    scorer: &dyn PairScores,
    users: &[EvalUser],
    descs: &[Option<String>],
) -> anyhow::Result<(f32, f32, usize)> {
    let jobs: Vec<(&str, &[_])> = users
        .iter()
        .zip(descs)
        .map(|(u, d)| (d.as_deref().unwrap_or(NOT_PROVIDED), u.user.test_pairs.as_slice()))
        .collect();
    let scores = scorer.many_pair_scores(&jobs)?;
    // A description that failed the format check scores 0 (R = R_jud · R_format).
    let per_user: Vec<Vec<f32>> =
        scores.iter().zip(descs).map(|(s, d)| s.iter().map(|&x| if d.is_some() { x } else { 0.0 }).collect()).collect();
    let all: Vec<f32> = per_user.iter().flatten().copied().collect();
    Ok((mean(&all), standard_error(&per_user.iter().map(|s| mean(s)).collect::<Vec<_>>()), all.len()))
}

/// `row` (a method in a setting, with the descriptions `descs` it wrote) scored again under
/// another judge: the same format rate, the other judge's Acc_jud.
pub fn rescore(
    judge: &dyn PairScores,
    row: &EvalRow,
    users: &[EvalUser],
    descs: &[Option<String>],
) -> anyhow::Result<EvalRow> {
    let (acc_jud, se, pairs) = score_descriptions(judge, users, descs)?;
    Ok(EvalRow { acc_jud, se, pairs, ..row.clone() })
}

/// Standard error of the mean of `xs` (sample standard deviation / √n); 0 below two values.
pub fn standard_error(xs: &[f32]) -> f32 {
    let n = xs.len() as f32;
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f32>() / (n - 1.0) / n).sqrt()
}

/// Reference rows that need no policy: Null, raw signals E (8 signals as the description), Golden.
pub fn reference_rows(scorer: &dyn PairScores, users: &[EvalUser]) -> anyhow::Result<Vec<EvalRow>> {
    let raw = |u: &EvalUser| {
        let p = build_prompt(None, u.span(0, 8));
        let start = p.find("Signals:\n").map(|i| i + 9).unwrap_or(0);
        let end = p.find("Reason about").unwrap_or(p.len());
        Some(p[start..end].trim().to_string())
    };
    let sets: [(&str, Vec<Option<String>>); 3] = [
        ("Null", users.iter().map(|_| Some(NOT_PROVIDED.to_string())).collect()),
        ("Raw signals E", users.iter().map(raw).collect()),
        ("Golden", users.iter().map(|u| Some(u.user.golden.clone())).collect()),
    ];
    sets.into_iter()
        .map(|(name, descs)| {
            let (acc, se, pairs) = score_descriptions(scorer, users, &descs)?;
            Ok(EvalRow {
                method: name.into(),
                setting: "-".into(),
                acc_jud: acc,
                se,
                format_rate: 1.0,
                users: users.len(),
                pairs,
            })
        })
        .collect()
}

/// The teacher's own descriptions in one setting: with `Rule::Shown` the ceiling of a student
/// that imitates the prompt-only rule perfectly; with `Rule::KeyDims` the paper's teacher,
/// which sees the user's key dimensions (out of the student's reach).
pub fn teacher_descriptions(
    users: &[EvalUser],
    setting: Setting,
    rule: Rule,
    rng: &mut impl Rng,
) -> Vec<Option<String>> {
    users
        .iter()
        .map(|u| {
            let conclude = |prev: &[Stated], from, to| rule.conclude(&u.user, prev, &u.annotated(from, to));
            let prefs = match setting {
                Setting::Base4 => conclude(&[], 0, 4),
                Setting::Base8 => conclude(&[], 0, 8),
                Setting::Stream44 => conclude(&conclude(&[], 0, 4), 4, 8),
            };
            let words: Vec<&str> = prefs.iter().map(|p| p.1.as_str()).collect();
            Some(describe_surfaces(&words, rng))
        })
        .collect()
}

/// The teacher's descriptions (`teacher_descriptions`) scored and audited in each setting.
pub fn teacher_rule_rows(
    scorer: &Scorer,
    users: &[EvalUser],
    settings: &[Setting],
    rule: Rule,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<(EvalRow, AuditRow)>> {
    let method = match rule {
        Rule::KeyDims => "Teacher (sees key dimensions)".to_string(),
        Rule::Shown { cap } => format!("Teacher rule (prompt only, {cap} poles)"),
        Rule::Tally { cap } => format!("Teacher rule (tally, {cap} poles)"),
    };
    let mut rows = Vec::new();
    for &s in settings {
        let descs = teacher_descriptions(users, s, rule, rng);
        let (acc, se, pairs) = score_descriptions(scorer, users, &descs)?;
        let row = EvalRow {
            method: method.clone(),
            setting: s.name().into(),
            acc_jud: acc,
            se,
            format_rate: 1.0,
            users: users.len(),
            pairs,
        };
        rows.push((row, audit_row(&method, s, users, &descs)));
    }
    Ok(rows)
}

/// What `descs` (one per user, in `setting`) state against the users' true preferences.
pub fn audit_row(method: &str, setting: Setting, users: &[EvalUser], descs: &[Option<String>]) -> AuditRow {
    let seen = if setting == Setting::Base4 { 4 } else { 8 };
    let audits: Vec<Audit> = users
        .iter()
        .zip(descs)
        .map(|(u, d)| {
            let anns: Vec<&Annotation> = u.annotated(0, seen).into_iter().map(|s| s.1).collect();
            audit(d.as_deref(), &u.user, &anns)
        })
        .collect();
    AuditRow { method: method.into(), setting: setting.name().into(), audit: mean_audit(&audits) }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub method: String,
    pub setting: String,
    #[serde(flatten)]
    pub audit: Audit,
}

pub fn audit_markdown(rows: &[AuditRow]) -> String {
    let mut s = String::from(
        "\nWhat the descriptions state, per description (`train::audit`): poles of key dimensions with the \
         user's stance (right), with the opposite stance (flipped), of dimensions the user does not care \
         about (off-key), and key dimensions the signals showed with the user's stance that the description \
         leaves out (missed).\n\n| method | setting | right | flipped | off-key | missed |\n|---|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let a = &r.audit;
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            r.method, r.setting, a.right, a.flipped, a.off_key, a.missed
        ));
    }
    s
}

/// Best-of-N decoding: `candidates` samples per prompt, keeping the valid description under
/// which the judge best explains the window's own comparisons (mean P(chosen), both orders).
/// The criterion reads only what the service sees — the window — never held-out pairs.
#[derive(Clone, Copy)]
pub struct Rerank<'a> {
    pub scorer: &'a Scorer<'a>,
    pub candidates: usize,
}

/// Generation settings shared by the studies.
pub struct Policy<'a> {
    pub model: &'a dyn Decoder,
    /// The prompt template the policy was trained on.
    pub template: Template,
    pub tok: &'a TextTokenizer,
    pub params: SamplingParams,
    pub max_new: usize,
    /// No-repeat n-gram size (0: off).
    pub no_repeat: usize,
    pub batch: usize,
    pub rerank: Option<Rerank<'a>>,
}

/// A prompt and the window of signals it was built from.
pub type Job<'e> = (String, Vec<&'e EventBody>);

impl Policy<'_> {
    fn job<'e>(&self, previous: Option<&str>, window: Vec<&'e EventBody>) -> Job<'e> {
        (self.template.build_prompt(previous, window.iter().copied()), window)
    }

    /// Descriptions (None where the format check failed) for each prompt.
    pub fn describe(&self, jobs: &[Job], rng: &mut impl Rng) -> anyhow::Result<Vec<Option<String>>> {
        let n = self.rerank.map_or(1, |r| r.candidates.max(1));
        let prompts: Vec<&String> = jobs.iter().flat_map(|j| std::iter::repeat_n(&j.0, n)).collect();
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.batch) {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|p| self.tok.encode(p)).collect();
            for g in generate(self.model, self.tok, &ids, self.max_new, &self.params, self.no_repeat, rng)? {
                out.push(parse_output(&g.text).description);
            }
        }
        let Some(r) = self.rerank.filter(|_| n > 1) else { return Ok(out) };
        let evidence: Vec<Vec<Pair>> = jobs.iter().map(|j| window_pairs(&j.1)).collect();
        let scored: Vec<(&str, &[Pair])> =
            out.iter().enumerate().filter_map(|(i, d)| Some((d.as_deref()?, evidence[i / n].as_slice()))).collect();
        let mut probs = r.scorer.many_chosen_probs(&scored)?.into_iter().map(|p| mean(&p));
        let scores: Vec<Option<f32>> = out.iter().map(|d| d.as_ref().and_then(|_| probs.next())).collect();
        Ok(out.chunks(n).zip(scores.chunks(n)).map(|(c, s)| pick_best(c, s)).collect())
    }

    /// Final descriptions of each user in one setting.
    pub fn run(&self, users: &[EvalUser], setting: Setting, rng: &mut impl Rng) -> anyhow::Result<Vec<Option<String>>> {
        let base = |from, to| users.iter().map(|u| self.job(None, u.span(from, to))).collect();
        let jobs: Vec<Job> = match setting {
            Setting::Base4 => base(0, 4),
            Setting::Base8 => base(0, 8),
            Setting::Stream44 => {
                let first = self.describe(&base(0, 4), rng)?;
                users.iter().zip(&first).map(|(u, d)| self.job(d.as_deref(), u.span(4, 8))).collect()
            }
        };
        self.describe(&jobs, rng)
    }
}

/// The window's comparisons as judge pairs.
fn window_pairs(window: &[&EventBody]) -> Vec<Pair> {
    window
        .iter()
        .filter_map(|b| match b {
            EventBody::Comparison { post, chosen, rejected } => Some(Pair::unannotated(post, chosen, rejected)),
            _ => None,
        })
        .collect()
}

/// The best-scored valid candidate (the first among equals); None if none is valid.
pub fn pick_best(candidates: &[Option<String>], scores: &[Option<f32>]) -> Option<String> {
    let mut best: Option<(usize, f32)> = None;
    for (i, s) in scores.iter().enumerate() {
        if let (Some(_), Some(s)) = (&candidates[i], s) {
            if best.is_none_or(|(_, b)| *s > b) {
                best = Some((i, *s));
            }
        }
    }
    best.and_then(|(i, _)| candidates[i].clone())
}

/// Run the policy in one setting and score its final descriptions.
pub fn eval_policy(
    method: &str,
    policy: &Policy,
    scorer: &Scorer,
    users: &[EvalUser],
    setting: Setting,
    rng: &mut impl Rng,
) -> anyhow::Result<(EvalRow, Vec<Option<String>>)> {
    let descs = policy.run(users, setting, rng)?;
    let (acc, se, pairs) = score_descriptions(scorer, users, &descs)?;
    let ok = descs.iter().filter(|d| d.is_some()).count() as f32 / descs.len().max(1) as f32;
    let row = EvalRow {
        method: method.into(),
        setting: setting.name().into(),
        acc_jud: acc,
        se,
        format_rate: ok,
        users: users.len(),
        pairs,
    };
    Ok((row, descs))
}

#[derive(Debug, Clone, Serialize)]
pub struct RobustRow {
    pub method: String,
    pub variant: String,
    pub setting: String,
    pub acc_jud: f32,
}

/// Table 4 / Figure 2 of the paper: full reversal (signals and pairs), and drift (the earliest
/// k of 8 signals reversed, pairs unchanged), streaming 4+4 vs base-8.
pub fn robustness(
    method: &str,
    policy: &Policy,
    scorer: &Scorer,
    users: &[EvalUser],
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<RobustRow>> {
    let mut variants: Vec<(String, Vec<EvalUser>)> =
        vec![("reversal".into(), users.iter().map(|u| u.reversed(8, true, rng)).collect())];
    for k in 0..=4 {
        variants.push((format!("drift k={k}"), users.iter().map(|u| u.reversed(k, false, rng)).collect()));
    }
    let mut rows = Vec::new();
    for (name, us) in &variants {
        for s in [Setting::Base8, Setting::Stream44] {
            let (row, _) = eval_policy(method, policy, scorer, us, s, rng)?;
            rows.push(RobustRow {
                method: method.into(),
                variant: name.clone(),
                setting: s.name().into(),
                acc_jud: row.acc_jud,
            });
        }
    }
    Ok(rows)
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EfficiencyRow {
    pub round: usize,
    pub signals_seen: usize,
    pub streaming_ms_per_update: f64,
    pub base_ms_per_update: f64,
    pub streaming_prompt_tokens: f64,
    pub base_prompt_tokens: f64,
}

/// Figure 3: mean time per update over rounds (4 new signals a round). Streaming reads the
/// previous description + 4 signals; base re-reads every signal so far.
pub fn efficiency(
    policy: &Policy,
    users: &[EvalUser],
    rounds: usize,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<EfficiencyRow>> {
    let users: Vec<&EvalUser> = users.iter().filter(|u| u.signals.len() >= 4 * rounds).collect();
    let n = users.len().max(1) as f64;
    let mut prev: Vec<Option<String>> = vec![None; users.len()];
    let mut rows = Vec::new();
    let tokens = |ps: &[Job]| ps.iter().map(|p| policy.tok.encode(&p.0).len()).sum::<usize>() as f64 / n;
    for r in 1..=rounds {
        let stream: Vec<Job> =
            users.iter().zip(&prev).map(|(u, d)| policy.job(d.as_deref(), u.span(4 * (r - 1), 4 * r))).collect();
        let base: Vec<Job> = users.iter().map(|u| policy.job(None, u.span(0, 4 * r))).collect();
        let t = Instant::now();
        prev = policy.describe(&stream, rng)?;
        let stream_ms = t.elapsed().as_secs_f64() * 1e3 / n;
        let t = Instant::now();
        policy.describe(&base, rng)?;
        let base_ms = t.elapsed().as_secs_f64() * 1e3 / n;
        rows.push(EfficiencyRow {
            round: r,
            signals_seen: 4 * r,
            streaming_ms_per_update: stream_ms,
            base_ms_per_update: base_ms,
            streaming_prompt_tokens: tokens(&stream),
            base_prompt_tokens: tokens(&base),
        });
    }
    Ok(rows)
}

pub fn markdown(rows: &[EvalRow]) -> String {
    let mut s = String::from(
        "| method | setting | Acc_jud (%) | ± SE | format ok (%) | users | pairs |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {} | {} |\n",
            r.method,
            r.setting,
            100.0 * r.acc_jud,
            100.0 * r.se,
            100.0 * r.format_rate,
            r.users,
            r.pairs
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_of_n_keeps_the_best_scored_valid_candidate() {
        let c = |s: &str| Some(s.to_string());
        let cands = [None, c("a"), c("b"), c("c")];
        // An invalid candidate never wins, whatever its score; the first of equals wins.
        assert_eq!(pick_best(&cands, &[Some(0.9), Some(0.4), Some(0.7), Some(0.7)]), c("b"));
        assert_eq!(pick_best(&cands, &[None, Some(0.5), Some(0.5), Some(0.5)]), c("a"));
        assert_eq!(pick_best(&[None, None], &[None, None]), None);
        // A window without comparisons scores every candidate alike: the first valid one.
        assert_eq!(pick_best(&cands, &[None, Some(0.0), Some(0.0), Some(0.0)]), c("a"));
    }

    #[test]
    fn window_pairs_are_the_windows_comparisons() {
        let cmp = EventBody::Comparison { post: "p".into(), chosen: "a".into(), rejected: "b".into() };
        let ugc = EventBody::Ugc { text: "t".into() };
        let pairs = window_pairs(&[&ugc, &cmp, &EventBody::Forget]);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].chosen.as_str(), pairs[0].rejected.as_str()), ("a", "b"));
    }

    #[test]
    fn standard_error_is_the_sample_deviation_over_root_n() {
        // sd of [0, 1, 0, 1] is √(1/3); over √4.
        assert!((standard_error(&[0.0, 1.0, 0.0, 1.0]) - (1.0f32 / 3.0).sqrt() / 2.0).abs() < 1e-6);
        assert_eq!(standard_error(&[0.5, 0.5, 0.5]), 0.0);
        assert_eq!(standard_error(&[0.7]), 0.0);
    }
}
