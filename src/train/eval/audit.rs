//! What a description states, checked against the user's true preferences: where Acc_jud is
//! lost. Every pole label and paraphrase is unique (`dims`), so each clause of a description
//! names at most one pole; a stated pole is then right (a key dimension with the user's
//! stance), flipped (a key dimension, the opposite stance) or off-key (a dimension the user
//! does not care about), and a key dimension the signals showed with the user's stance but the
//! description leaves out is missed.

use crate::train::dims::{dims, pole};
use crate::train::synth::{Annotation, Pref, UserRecord};
use serde::Serialize;

/// The poles a description states, one per clause at most, in order.
pub fn stated_poles(description: &str) -> Vec<Pref> {
    description
        .split([';', '.'])
        .filter_map(|clause| {
            // The longest surface in the clause wins ("no trivia stuff" over "trivia").
            let mut best: Option<(usize, Pref)> = None;
            for d in dims() {
                for dir in [1i8, -1] {
                    let pl = pole(d.index, dir);
                    for s in pl.phrases.iter().chain(std::iter::once(&pl.label)) {
                        if clause.contains(s) && best.as_ref().is_none_or(|b| s.len() > b.0) {
                            best = Some((s.len(), Pref { dim: d.index, dir }));
                        }
                    }
                }
            }
            best.map(|b| b.1)
        })
        .collect()
}

/// Counts for one description, or means over many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Audit {
    pub right: f32,
    pub flipped: f32,
    pub off_key: f32,
    pub missed: f32,
}

/// Audit one description (`None`: failed the format check, states nothing) of `user`, who
/// showed `signals` so far.
pub fn audit(description: Option<&str>, user: &UserRecord, signals: &[&Annotation]) -> Audit {
    let stated = description.map(stated_poles).unwrap_or_default();
    let mut a = Audit::default();
    for p in &stated {
        match user.prefs.iter().find(|u| u.dim == p.dim) {
            Some(u) if u.dir == p.dir => a.right += 1.0,
            Some(_) => a.flipped += 1.0,
            None => a.off_key += 1.0,
        }
    }
    let shown = |k: &Pref| signals.iter().any(|s| s.chosen_poles.contains(k) || s.ugc_poles.contains(k));
    a.missed = user.prefs.iter().filter(|k| shown(k) && !stated.contains(k)).count() as f32;
    a
}

/// The mean of several audits.
pub fn mean_audit(items: &[Audit]) -> Audit {
    let n = items.len().max(1) as f32;
    let sum = |f: fn(&Audit) -> f32| items.iter().map(f).sum::<f32>() / n;
    Audit {
        right: sum(|a| a.right),
        flipped: sum(|a| a.flipped),
        off_key: sum(|a| a.off_key),
        missed: sum(|a| a.missed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::synth::{describe_in_order, Split};
    use rand::{rngs::StdRng, SeedableRng};

    fn surface(dim: usize, dir: i8, i: usize) -> &'static str {
        pole(dim, dir).phrases[i]
    }

    #[test]
    fn every_pole_surface_reads_back_as_its_pole() {
        let mut rng = StdRng::seed_from_u64(1);
        for d in dims() {
            for dir in [1i8, -1] {
                let pl = pole(d.index, dir);
                for s in pl.phrases.iter().chain(std::iter::once(&pl.label)) {
                    let desc = describe_in_order(&[s], &mut rng);
                    assert_eq!(stated_poles(&desc), vec![Pref { dim: d.index, dir }], "{desc}");
                }
            }
        }
    }

    #[test]
    fn audit_sorts_stated_poles_and_counts_what_was_shown_but_left_out() {
        let user = UserRecord {
            user_id: "u".into(),
            split: Split::Test,
            prefs: vec![Pref { dim: 3, dir: 1 }, Pref { dim: 10, dir: -1 }, Pref { dim: 20, dir: 1 }],
            golden: String::new(),
            test_pairs: vec![],
        };
        let mut rng = StdRng::seed_from_u64(2);
        // right (dim 3), flipped (dim 10), off-key (dim 40); dim 20 was shown and left out.
        let desc = describe_in_order(&[surface(3, 1, 0), surface(10, 1, 1), surface(40, -1, 0)], &mut rng);
        let mut ann = Annotation::unknown("e", "u");
        ann.chosen_poles = vec![Pref { dim: 20, dir: 1 }, Pref { dim: 3, dir: 1 }];
        let a = audit(Some(&desc), &user, &[&ann]);
        assert_eq!(a, Audit { right: 1.0, flipped: 1.0, off_key: 1.0, missed: 1.0 });
        // A failed output states nothing and misses both shown key dimensions.
        assert_eq!(audit(None, &user, &[&ann]).missed, 2.0);
        let m = mean_audit(&[a, Audit::default()]);
        assert_eq!(m.right, 0.5);
    }
}
