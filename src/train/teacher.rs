//! The cold-start teacher. Like the paper's teacher (which sees the signals and the key
//! dimensions φ), it reads the signals' ground-truth poles and the user's active dimensions and
//! writes a reasoning chain and a description — G candidates, some with realistic mistakes
//! (a flipped stance, a dropped preference, a spurious one), later filtered by the judge.

use super::dims::pole;
use super::synth::{describe, Annotation, Pref, UserRecord};
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub reasoning: String,
    pub description: String,
    pub prefs: Vec<Pref>,
}

fn labels(prefs: &[Pref]) -> String {
    prefs.iter().map(|p| pole(p.dim, p.dir).label).collect::<Vec<_>>().join(", ")
}

/// Evidence line per signal: the poles the chosen response (or the user's own text) shows.
fn evidence(window: &[&Annotation]) -> Vec<String> {
    window
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if a.ugc_poles.is_empty() {
                format!("{}: chose {}.", i + 1, labels(&a.chosen_poles))
            } else {
                format!("{}: wrote about {}.", i + 1, labels(&a.ugc_poles))
            }
        })
        .collect()
}

/// What a careful teacher concludes: the previous preferences plus every key dimension the new
/// signals touch, with the user's true stance.
pub fn conclude(user: &UserRecord, prev: &[Pref], window: &[&Annotation]) -> Vec<Pref> {
    let mut out: Vec<Pref> = prev.to_vec();
    for a in window {
        for p in a.chosen_poles.iter().chain(&a.ugc_poles) {
            if let Some(truth) = user.prefs.iter().find(|q| q.dim == p.dim) {
                if !out.iter().any(|q| q.dim == p.dim) {
                    out.push(truth.clone());
                }
            }
        }
    }
    out
}

fn mistake(prefs: &mut Vec<Pref>, window: &[&Annotation], rng: &mut impl Rng) {
    match rng.gen_range(0..3) {
        0 if !prefs.is_empty() => {
            let i = rng.gen_range(0..prefs.len());
            prefs[i].dir = -prefs[i].dir;
        }
        1 if prefs.len() > 1 => {
            prefs.remove(rng.gen_range(0..prefs.len()));
        }
        _ => {
            let seen: Vec<&Pref> =
                window.iter().flat_map(|a| &a.chosen_poles).filter(|p| !prefs.iter().any(|q| q.dim == p.dim)).collect();
            if let Some(p) = seen.choose(rng) {
                prefs.push((*p).clone());
            }
        }
    }
}

/// `g` candidates for one window; the first is the careful one, the others err with
/// probability `error_rate`.
pub fn teach(
    user: &UserRecord,
    prev: &[Pref],
    window: &[&Annotation],
    g: usize,
    error_rate: f64,
    rng: &mut impl Rng,
) -> Vec<Candidate> {
    let lines = evidence(window);
    (0..g)
        .map(|i| {
            let mut prefs = conclude(user, prev, window);
            if i > 0 && rng.gen_bool(error_rate) {
                mistake(&mut prefs, window, rng);
            }
            let mut reasoning = lines.join(" ");
            if !prev.is_empty() {
                reasoning.push_str(&format!(" Before: {}.", labels(prev)));
            }
            reasoning.push_str(&format!(" So: {}.", labels(&prefs)));
            Candidate { reasoning, description: describe(&prefs, rng), prefs }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::synth::Split;
    use rand::{rngs::StdRng, SeedableRng};

    fn ann(chosen: Vec<Pref>) -> Annotation {
        Annotation {
            event_id: "e".into(),
            user_id: "u".into(),
            chosen_poles: chosen,
            rejected_poles: vec![],
            ugc_poles: vec![],
            noisy: false,
        }
    }

    #[test]
    fn careful_candidate_keeps_key_dims_with_true_stance() {
        let user = UserRecord {
            user_id: "u".into(),
            split: Split::Train,
            prefs: vec![Pref { dim: 3, dir: 1 }, Pref { dim: 50, dir: -1 }],
            golden: String::new(),
            test_pairs: vec![],
        };
        // the noisy signal shows dim 3 with the wrong pole; the teacher still states the truth
        let w = [ann(vec![Pref { dim: 3, dir: -1 }, Pref { dim: 7, dir: 1 }]), ann(vec![Pref { dim: 12, dir: 1 }])];
        let w: Vec<&Annotation> = w.iter().collect();
        let c = teach(&user, &[Pref { dim: 50, dir: -1 }], &w, 4, 1.0, &mut StdRng::seed_from_u64(1));
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].prefs, vec![Pref { dim: 50, dir: -1 }, Pref { dim: 3, dir: 1 }]);
        assert!(c[0].reasoning.starts_with("1: chose "));
        assert!(c[0].reasoning.contains("Before: "));
        assert!(c[1..].iter().any(|x| x.prefs != c[0].prefs));
    }
}
