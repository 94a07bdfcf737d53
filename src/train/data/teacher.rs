//! The cold-start teacher. Like the paper's teacher (which sees the signals and the key
//! dimensions φ), it reads the signals' ground-truth poles and the user's active dimensions and
//! writes a reasoning chain and a description — G candidates, some with realistic mistakes
//! (a flipped stance, a dropped preference, a spurious one), later filtered by the judge.
//! It states each preference in the words the signals used (a pole's paraphrase as it appears
//! in the chosen response or the user's text), so the student learns to quote evidence.

use crate::event::EventBody;
use crate::train::synth::{any_surface, describe_in_order, surface_in, Annotation, Pref, UserRecord};
use rand::seq::SliceRandom;
use rand::Rng;

/// A preference and the words that state it.
pub type Stated = (Pref, String);

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub reasoning: String,
    pub description: String,
    pub prefs: Vec<Stated>,
}

/// One signal with its ground truth.
pub type Signal<'a> = (&'a EventBody, &'a Annotation);

fn joined(items: &[Stated]) -> String {
    items.iter().map(|s| s.1.as_str()).collect::<Vec<_>>().join(", ")
}

/// What each signal shows: the chosen response's poles (or the user's own text's), in its words
/// or, with `labels`, as each pole's label (so a pole seen twice is an exact repeat).
fn shown(sig: &Signal, labels: bool) -> Vec<Stated> {
    let (text, poles) = match sig.0 {
        EventBody::Comparison { chosen, .. } => (chosen.as_str(), &sig.1.chosen_poles),
        EventBody::Ugc { text } => (text.as_str(), &sig.1.ugc_poles),
        EventBody::Forget => ("", &sig.1.chosen_poles),
    };
    let mut out: Vec<(usize, Stated)> = poles
        .iter()
        .map(|p| {
            let label = crate::train::dims::pole(p.dim, p.dir).label;
            match surface_in(text, p) {
                Some((at, words)) => (at, (p.clone(), if labels { label } else { words }.to_string())),
                None => (usize::MAX, (p.clone(), label.to_string())),
            }
        })
        .collect();
    // In the order the text says them: the evidence line is then an in-order copy.
    out.sort_by_key(|o| o.0);
    out.into_iter().map(|o| o.1).collect()
}

/// One quoted pole in a response's evidence lines (byte range in the response) and what is true
/// of it: `key` — it is one of the user's preferences, with the user's stance (hidden from the
/// student); `recurs` — the window or the previous preferences show it more than once (visible).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub start: usize,
    pub end: usize,
    pub key: bool,
    pub recurs: bool,
}

/// Where `response`'s evidence lines quote each pole the window shows, with its marks: the
/// targets of the SFT's auxiliary probe (docs/training.md, attempt 17). Poles are looked up in
/// order from the start of the response, as `evidence` writes them.
pub fn evidence_marks(user: &UserRecord, prev: &[Stated], window: &[Signal], rule: Rule, response: &str) -> Vec<Mark> {
    let lines: Vec<Vec<Stated>> = window.iter().map(|s| shown(s, rule.labels())).collect();
    let all: Vec<&Pref> = lines.iter().flatten().map(|s| &s.0).chain(prev.iter().map(|s| &s.0)).collect();
    let mut out = Vec::new();
    let mut at = 0;
    for (p, words) in lines.iter().flatten() {
        let Some(i) = response[at..].find(words.as_str()) else {
            continue;
        };
        let start = at + i;
        at = start + words.len();
        let recurs = all.iter().filter(|q| **q == p).count() > 1;
        out.push(Mark { start, end: at, key: user.prefs.contains(p), recurs });
    }
    out
}

fn is_ugc(sig: &Signal) -> bool {
    matches!(sig.0, EventBody::Ugc { .. })
}

/// One line per signal. With `labels` (the tally rule's form), a pole the window already showed
/// is also followed by "again", so "seen twice" is decided next to the words (`conclude_tally`).
fn evidence(window: &[Signal], labels: bool) -> Vec<String> {
    let mut seen: Vec<Pref> = Vec::new();
    window
        .iter()
        .enumerate()
        .map(|(i, sig)| {
            let verb = if is_ugc(sig) { "wrote about" } else { "chose" };
            let items: Vec<String> = shown(sig, labels)
                .into_iter()
                .map(|(p, words)| {
                    let again = labels && seen.contains(&p);
                    seen.push(p);
                    if again {
                        format!("{words} again")
                    } else {
                        words
                    }
                })
                .collect();
            format!("{}: {verb} {}.", i + 1, items.join(", "))
        })
        .collect()
}

/// What a careful teacher concludes: the previous preferences plus every key dimension the new
/// signals show with the user's true stance, in the signal's words. A signal that shows the
/// opposite stance (label noise, or a choice another preference decided) is passed over: the
/// true stance written there would be a flip in words the prompt does not contain, which the
/// student can only learn as "sometimes flip at random" (docs/training.md, attempt 11).
pub fn conclude(user: &UserRecord, prev: &[Stated], window: &[Signal]) -> Vec<Stated> {
    let mut out: Vec<Stated> = prev.to_vec();
    for sig in window {
        for (p, words) in shown(sig, false) {
            let known = out.iter().any(|q| q.0.dim == p.dim);
            if !known && user.prefs.contains(&p) {
                out.push((p, words));
            }
        }
    }
    out
}

/// A realistic mistake. In labels (the tally rule) never a flipped stance: the judge filter
/// would keep a flip only where it matches the hidden truth, which teaches the student to
/// flip at random (attempt 11).
fn mistake(prefs: &mut Vec<Stated>, window: &[Signal], labels: bool, rng: &mut impl Rng) {
    match rng.gen_range(usize::from(labels)..3) {
        0 if !prefs.is_empty() => {
            let i = rng.gen_range(0..prefs.len());
            let flipped = Pref { dim: prefs[i].0.dim, dir: -prefs[i].0.dir };
            prefs[i] = (flipped.clone(), any_surface(&flipped, rng).to_string());
        }
        1 if prefs.len() > 1 => {
            prefs.remove(rng.gen_range(0..prefs.len()));
        }
        _ => {
            let seen: Vec<Stated> = window
                .iter()
                .flat_map(|s| shown(s, labels))
                .filter(|p| !prefs.iter().any(|q| q.0.dim == p.0.dim))
                .collect();
            if let Some(p) = seen.choose(rng) {
                prefs.push(p.clone());
            }
        }
    }
}

/// A conclusion the student can reproduce from its prompt alone, in the signals' words: what
/// the user wrote about first (UGC shows only real preferences), then the previous
/// preferences, then the poles the new comparisons' chosen responses show, newest first (half
/// of those are dimensions the user does not care about); the first `cap` are kept. A pole seen
/// again takes its newest words and the better rank; an opposite stance replaces the old one.
/// Judged on held-out users, this rule at cap 8 reaches 68.0% Acc_jud in streaming 4+4, against
/// 64.5% for "the last 8 poles shown" (docs/training.md, attempt 9).
pub fn conclude_shown(prev: &[Stated], window: &[Signal], cap: usize) -> Vec<Stated> {
    // rank: 2 user's own text, 1 previous description, 0 a chosen response
    let mut items: Vec<(Stated, u8)> = prev.iter().map(|s| (s.clone(), 1)).collect();
    for sig in window {
        let rank = if is_ugc(sig) { 2 } else { 0 };
        for s in shown(sig, false) {
            let mut r = rank;
            if let Some(i) = items.iter().position(|q| q.0 .0.dim == s.0.dim) {
                let old = items.remove(i);
                if old.0 .0.dir == s.0.dir {
                    r = r.max(old.1);
                }
            }
            items.push((s, r));
        }
    }
    // Higher rank first; among the new ones the newest first, the previous ones keep their order.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].1.cmp(&items[a].1).then(if items[a].1 == 1 { a.cmp(&b) } else { b.cmp(&a) }));
    order.into_iter().take(cap).map(|i| items[i].0.clone()).collect()
}

/// A conclusion the student can reproduce from its prompt alone, in pole labels: a tally per
/// dimension, signed by stance — the previous preferences and what the user wrote count 2, a
/// chosen response 1 — keeping the dimensions at 2 or more: the previous preferences (unless
/// the window contradicts them), what the user wrote, and poles the new choices show twice.
/// A pole of a dimension the user does not care about rarely shows twice in a window, one the
/// user cares about often does, and the evidence lines mark the second sighting ("again"), so
/// the choice is visible where the student writes it. The previous preferences keep their
/// order, new ones follow in the order they reached 2; at most the last `cap` are kept.
pub fn conclude_tally(prev: &[Stated], window: &[Signal], cap: usize) -> Vec<Stated> {
    // (pole as tallied, score signed towards that pole)
    let mut items: Vec<(Pref, i32)> = prev.iter().map(|s| (s.0.clone(), 2)).collect();
    let mut kept: Vec<usize> = (0..items.len()).collect();
    for sig in window {
        let weight = if is_ugc(sig) { 2 } else { 1 };
        for (p, _) in shown(sig, true) {
            let i = match items.iter().position(|q| q.0.dim == p.dim) {
                Some(i) => i,
                None => {
                    items.push((p.clone(), 0));
                    items.len() - 1
                }
            };
            let item = &mut items[i];
            item.1 += if item.0 == p { weight } else { -weight };
            if item.1 < 0 {
                *item = (p.clone(), -item.1);
            }
            if items[i].1 < 2 {
                kept.retain(|&k| k != i);
            } else if !kept.contains(&i) {
                // a previous preference keeps its place; a new one joins at the end
                let at =
                    if i < prev.len() { kept.iter().position(|&k| k > i).unwrap_or(kept.len()) } else { kept.len() };
                kept.insert(at, i);
            }
        }
    }
    let label = |p: &Pref| crate::train::dims::pole(p.dim, p.dir).label.to_string();
    let out: Vec<Stated> = kept.iter().map(|&i| (items[i].0.clone(), label(&items[i].0))).collect();
    out[out.len().saturating_sub(cap)..].to_vec()
}

/// How the teacher concludes: from the user's key dimensions (the paper's teacher, which the
/// student cannot see), or from the prompt alone (`conclude_shown` or `conclude_tally` with
/// this cap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    KeyDims,
    Shown { cap: usize },
    Tally { cap: usize },
}

impl Rule {
    /// The tally rule states poles as labels, so that a repeat is exact.
    fn labels(self) -> bool {
        matches!(self, Rule::Tally { .. })
    }

    /// The careful conclusion for `window` after `prev`.
    pub fn conclude(self, user: &UserRecord, prev: &[Stated], window: &[Signal]) -> Vec<Stated> {
        match self {
            Rule::KeyDims => conclude(user, prev, window),
            Rule::Shown { cap } => conclude_shown(prev, window, cap),
            Rule::Tally { cap } => conclude_tally(prev, window, cap),
        }
    }
}

/// `g` candidates for one window; the first is the careful one, the others err with
/// probability `error_rate`.
pub fn teach(
    user: &UserRecord,
    prev: &[Stated],
    window: &[Signal],
    rule: Rule,
    g: usize,
    error_rate: f64,
    rng: &mut impl Rng,
) -> Vec<Candidate> {
    let labels = rule.labels();
    let lines = evidence(window, labels);
    let careful = rule.conclude(user, prev, window);
    (0..g)
        .map(|i| {
            let mut prefs = careful.clone();
            if i > 0 && rng.gen_bool(error_rate) {
                mistake(&mut prefs, window, labels, rng);
            }
            candidate(&lines, prefs, rng)
        })
        .collect()
}

/// The reasoning (evidence lines, then the conclusion) and description for `prefs`. The
/// conclusion starts with the previous preferences it keeps, in their order, so it is an
/// in-order copy of the prompt's past preferences; restating them on a line of their own
/// ("Before: …") only lengthened every streaming update (docs/training.md, attempt 10).
fn candidate(lines: &[String], prefs: Vec<Stated>, rng: &mut impl Rng) -> Candidate {
    let mut reasoning = lines.join(" ");
    reasoning.push_str(&format!(" So: {}.", joined(&prefs)));
    let words: Vec<&str> = prefs.iter().map(|s| s.1.as_str()).collect();
    Candidate { reasoning, description: describe_in_order(&words, rng), prefs }
}

/// The copy warm-up's target for a few signals: the evidence lines and every pole they show,
/// in the signals' own words. A function of the prompt alone, so a small student can learn to
/// quote before it learns to select (see `sft::copy_examples`). In `rule`'s words.
pub fn observe(window: &[Signal], rule: Rule, rng: &mut impl Rng) -> Candidate {
    let labels = rule.labels();
    candidate(&evidence(window, labels), window.iter().flat_map(|s| shown(s, labels)).collect(), rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dims::pole;
    use crate::train::synth::Split;
    use rand::{rngs::StdRng, SeedableRng};

    fn ann(chosen: Vec<Pref>) -> Annotation {
        Annotation { chosen_poles: chosen, ..Annotation::unknown("e", "u") }
    }

    #[test]
    fn careful_candidate_keeps_the_key_dims_shown_with_the_true_stance() {
        let user = UserRecord {
            user_id: "u".into(),
            split: Split::Train,
            prefs: vec![Pref { dim: 3, dir: 1 }, Pref { dim: 50, dir: -1 }, Pref { dim: 12, dir: 1 }],
            golden: String::new(),
            test_pairs: vec![],
        };
        let p12 = pole(12, 1).phrases[1];
        let body1 = EventBody::Comparison { post: "p".into(), chosen: "x".into(), rejected: "y".into() };
        let body2 = EventBody::Comparison { post: "p".into(), chosen: format!("Try {p12}."), rejected: "y".into() };
        // signal 1 is noisy (shows dim 3's wrong pole): the teacher passes over it rather than
        // state the truth in words the prompt lacks
        let a1 = ann(vec![Pref { dim: 3, dir: -1 }, Pref { dim: 7, dir: 1 }]);
        let a2 = ann(vec![Pref { dim: 12, dir: 1 }]);
        let w: Vec<Signal> = vec![(&body1, &a1), (&body2, &a2)];
        let prev = vec![(Pref { dim: 50, dir: -1 }, "earlier words".to_string())];
        let c = teach(&user, &prev, &w, Rule::KeyDims, 4, 1.0, &mut StdRng::seed_from_u64(1));
        assert_eq!(c.len(), 4);
        let dims: Vec<(usize, i8)> = c[0].prefs.iter().map(|s| (s.0.dim, s.0.dir)).collect();
        assert_eq!(dims, vec![(50, -1), (12, 1)]);
        assert_eq!(c[0].prefs[1].1, p12, "quotes the signal's paraphrase");
        assert!(c[0].reasoning.starts_with("1: chose "));
        assert!(c[0].reasoning.contains(&format!(" So: earlier words, {p12}.")));
        assert!(c[0].description.contains(p12));
        // the description states the conclusion in the reasoning's order
        let at = |w: &str| c[0].description.find(w).unwrap();
        assert!(at("earlier words") < at(p12));
        assert!(c[1..].iter().any(|x| x.prefs != c[0].prefs));
    }

    #[test]
    fn shown_rule_ranks_user_text_then_previous_then_newest_choices() {
        let ph = |d: usize, dir: i8| pole(d, dir).phrases[0];
        let text = |ps: &[(usize, i8)]| ps.iter().map(|&(d, dir)| format!("Try {}.", ph(d, dir))).collect::<String>();
        let prefs = |ps: &[(usize, i8)]| ps.iter().map(|&(dim, dir)| Pref { dim, dir }).collect::<Vec<_>>();
        let cmp =
            |ps: &[(usize, i8)]| EventBody::Comparison { post: "p".into(), chosen: text(ps), rejected: "y".into() };
        let (b1, b2, b3) = (cmp(&[(3, 1), (7, 1)]), EventBody::Ugc { text: text(&[(20, 1)]) }, cmp(&[(3, -1), (9, 1)]));
        let a1 = ann(prefs(&[(3, 1), (7, 1)]));
        let a2 = Annotation { ugc_poles: prefs(&[(20, 1)]), ..Annotation::unknown("e", "u") };
        let a3 = ann(prefs(&[(3, -1), (9, 1)]));
        let w: Vec<Signal> = vec![(&b1, &a1), (&b2, &a2), (&b3, &a3)];
        let prev = vec![(Pref { dim: 50, dir: -1 }, "earlier".to_string()), (Pref { dim: 51, dir: 1 }, "older".into())];
        let dims = |c: Vec<Stated>| c.iter().map(|s| (s.0.dim, s.0.dir)).collect::<Vec<_>>();
        // dim 3's newest stance wins; choices newest first
        assert_eq!(dims(conclude_shown(&prev, &w, 9)), vec![(20, 1), (50, -1), (51, 1), (9, 1), (3, -1), (7, 1)]);
        assert_eq!(dims(conclude_shown(&prev, &w, 4)), vec![(20, 1), (50, -1), (51, 1), (9, 1)]);
        assert_eq!(conclude_shown(&prev, &w, 9)[4].1, ph(3, -1), "in the signal's words");
    }

    #[test]
    fn tally_rule_keeps_what_the_user_wrote_repeats_and_uncontradicted_past() {
        let ph = |d: usize, dir: i8| pole(d, dir).phrases[0];
        let label = |d: usize, dir: i8| pole(d, dir).label;
        let text = |ps: &[(usize, i8)]| ps.iter().map(|&(d, dir)| format!("Try {}.", ph(d, dir))).collect::<String>();
        let prefs = |ps: &[(usize, i8)]| ps.iter().map(|&(dim, dir)| Pref { dim, dir }).collect::<Vec<_>>();
        let cmp =
            |ps: &[(usize, i8)]| EventBody::Comparison { post: "p".into(), chosen: text(ps), rejected: "y".into() };
        let bodies = [
            cmp(&[(3, 1), (7, 1)]),
            EventBody::Ugc { text: text(&[(20, 1)]) },
            cmp(&[(3, 1), (9, 1)]),
            cmp(&[(50, 1)]),
        ];
        let anns = [
            ann(prefs(&[(3, 1), (7, 1)])),
            Annotation { ugc_poles: prefs(&[(20, 1)]), ..Annotation::unknown("e", "u") },
            ann(prefs(&[(3, 1), (9, 1)])),
            ann(prefs(&[(50, 1)])),
        ];
        let w: Vec<Signal> = bodies.iter().zip(&anns).collect();
        let prev =
            vec![(Pref { dim: 50, dir: -1 }, label(50, -1).to_string()), (Pref { dim: 51, dir: 1 }, "old".into())];
        let dims = |c: Vec<Stated>| c.iter().map(|s| (s.0.dim, s.0.dir)).collect::<Vec<_>>();
        // dim 50 is contradicted once (2 - 1): dropped; dim 51 stays first; then what the user
        // wrote and the pole chosen twice, in the order they reached 2
        assert_eq!(dims(conclude_tally(&prev, &w, 9)), vec![(51, 1), (20, 1), (3, 1)]);
        assert_eq!(dims(conclude_tally(&prev, &w, 2)), vec![(20, 1), (3, 1)], "the oldest go first");
        let user = UserRecord {
            user_id: "u".into(),
            split: Split::Train,
            prefs: vec![],
            golden: String::new(),
            test_pairs: vec![],
        };
        let c = &teach(&user, &prev, &w, Rule::Tally { cap: 9 }, 1, 0.0, &mut StdRng::seed_from_u64(3))[0];
        assert!(c.reasoning.contains(&format!("3: chose {} again, {}.", label(3, 1), label(9, 1))), "{}", c.reasoning);
        assert!(c.reasoning.contains(&format!("2: wrote about {}.", label(20, 1))));
        assert!(c.reasoning.ends_with(&format!("So: {}, {}, {}.", label(51, 1), label(20, 1), label(3, 1))));
    }

    #[test]
    fn evidence_marks_locate_each_quoted_pole_with_key_and_recurrence() {
        let ph = |d: usize, dir: i8, i: usize| pole(d, dir).phrases[i];
        let cmp = |t: String| EventBody::Comparison { post: "p".into(), chosen: t, rejected: "y".into() };
        // dim 3 shows twice in other words; dim 7 once; dim 9 once but also in the past preferences
        let b1 = cmp(format!("Try {}. Go for {}.", ph(3, 1, 0), ph(7, 1, 0)));
        let b2 = cmp(format!("Try {}. Go for {}.", ph(9, -1, 0), ph(3, 1, 1)));
        let a1 = ann(vec![Pref { dim: 3, dir: 1 }, Pref { dim: 7, dir: 1 }]);
        let a2 = ann(vec![Pref { dim: 9, dir: -1 }, Pref { dim: 3, dir: 1 }]);
        let w: Vec<Signal> = vec![(&b1, &a1), (&b2, &a2)];
        let user = UserRecord {
            user_id: "u".into(),
            split: Split::Train,
            prefs: vec![Pref { dim: 3, dir: 1 }, Pref { dim: 9, dir: 1 }],
            golden: String::new(),
            test_pairs: vec![],
        };
        let prev = vec![(Pref { dim: 9, dir: -1 }, "earlier".to_string())];
        let c = &teach(&user, &prev, &w, Rule::KeyDims, 1, 0.0, &mut StdRng::seed_from_u64(4))[0];
        let response = crate::prompt::build_response(&c.reasoning, &c.description);
        let marks = evidence_marks(&user, &prev, &w, Rule::KeyDims, &response);
        let got: Vec<(&str, bool, bool)> = marks.iter().map(|m| (&response[m.start..m.end], m.key, m.recurs)).collect();
        assert_eq!(
            got,
            vec![
                (ph(3, 1, 0), true, true),
                (ph(7, 1, 0), false, false),
                (ph(9, -1, 0), false, true), // the user's stance on dim 9 is the other pole
                (ph(3, 1, 1), true, true),
            ]
        );
        assert!(marks.windows(2).all(|m| m[0].end <= m[1].start), "in order, in the evidence lines");
    }

    #[test]
    fn observe_quotes_every_pole_the_signals_show() {
        let p12 = pole(12, 1).phrases[1];
        let p40 = pole(40, -1).phrases[0];
        let body = EventBody::Comparison {
            post: "p".into(),
            chosen: format!("Try {p12}. Go for {p40}."),
            rejected: "y".into(),
        };
        // annotated out of the text's order: the evidence still follows the text
        let a = ann(vec![Pref { dim: 40, dir: -1 }, Pref { dim: 12, dir: 1 }]);
        let c = observe(&[(&body, &a)], Rule::KeyDims, &mut StdRng::seed_from_u64(2));
        assert_eq!(c.prefs.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(), vec![p12, p40]);
        assert_eq!(c.reasoning, format!("1: chose {p12}, {p40}. So: {p12}, {p40}."));
        assert!(c.description.contains(p12) && c.description.contains(p40));
    }
}
