//! Synthetic AlignX-style world: users with hidden preferences over the 90 dimensions,
//! their comparison / UGC signal events, held-out test pairs and ground-truth annotations.

use crate::event::{parse_event, Event, EventBody, SCHEMA_VERSION};
use crate::train::dims::{dims, pole};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

/// Golden description for a user with no known preference.
pub const NOT_PROVIDED: &str = "Not provided";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Pref {
    pub dim: usize,
    pub dir: i8,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pair {
    pub post: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_poles: Vec<Pref>,
    pub rejected_poles: Vec<Pref>,
}

impl Pair {
    /// A pair whose poles are unknown (imported data, or a live window's comparison).
    pub fn unannotated(post: &str, chosen: &str, rejected: &str) -> Self {
        Self {
            post: post.into(),
            chosen: chosen.into(),
            rejected: rejected.into(),
            chosen_poles: Vec::new(),
            rejected_poles: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: String,
    pub split: Split,
    pub prefs: Vec<Pref>,
    pub golden: String,
    pub test_pairs: Vec<Pair>,
}

/// Ground truth for one signal event (what the paper's teacher gets as "key dimensions").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Annotation {
    pub event_id: String,
    pub user_id: String,
    pub chosen_poles: Vec<Pref>,
    pub rejected_poles: Vec<Pref>,
    pub ugc_poles: Vec<Pref>,
    pub noisy: bool,
}

impl Annotation {
    /// An annotation with no known poles (imported data, or before the generator fills it in).
    pub fn unknown(event_id: &str, user_id: &str) -> Self {
        Self {
            event_id: event_id.to_string(),
            user_id: user_id.to_string(),
            chosen_poles: Vec::new(),
            rejected_poles: Vec::new(),
            ugc_poles: Vec::new(),
            noisy: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub seed: u64,
    pub users: usize,
    pub test_users: usize,
    pub signals_per_user: usize,
    pub test_pairs_per_user: usize,
    pub ugc_rate: f64,
    pub label_noise: f64,
    pub min_active: usize,
    pub max_active: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 7,
            users: 1200,
            test_users: 200,
            signals_per_user: 16,
            test_pairs_per_user: 8,
            ugc_rate: 0.15,
            label_noise: 0.10,
            min_active: 3,
            max_active: 8,
        }
    }
}

pub struct World {
    pub users: Vec<UserRecord>,
    pub events: Vec<Event>,
    pub annotations: Vec<Annotation>,
}

const VERBS: [&str; 6] = ["prefers", "likes", "values", "leans toward", "enjoys", "favors"];

const POSTS: [&str; 36] = [
    "Any tips for my weekend?",
    "How should I spend my evening?",
    "What should I do on my day off?",
    "Ideas for a birthday gift?",
    "How do I plan my week?",
    "What is a good new hobby?",
    "How can I unwind after work?",
    "Any advice for a first trip abroad?",
    "What should I cook tonight?",
    "How do I stay motivated?",
    "What is worth reading this month?",
    "How should I decorate my room?",
    "Any ideas for a family Sunday?",
    "How do I make new friends?",
    "What should I do with my bonus?",
    "Tips for a long train ride?",
    "How can I learn something new?",
    "What should I watch tonight?",
    "How do I get ready for exams?",
    "Ideas for a rainy afternoon?",
    "How can I improve my mornings?",
    "What should I pack for a trip?",
    "How do I handle a busy week?",
    "Any advice for a job change?",
    "What is a fun date idea?",
    "How should I spend my vacation?",
    "How do I talk to my neighbor?",
    "What should I buy for my desk?",
    "Ideas to celebrate a small win?",
    "How do I get back into shape?",
    "What can I do this summer?",
    "How should I start the new year?",
    "Any tips for a quiet holiday?",
    "What makes a good weekend plan?",
    "How do I pick a new phone?",
    "What should I try next month?",
];

/// Response sentences; `{}` takes a pole phrase (kept short: at most 3 words + phrase).
const SENTENCES: [&str; 10] = [
    "I'd go with {}.",
    "Think {}.",
    "Here you get {}.",
    "Try {}.",
    "My pick is {}.",
    "Go for {}.",
    "Best bet is {}.",
    "Consider {}.",
    "Focus on {}.",
    "Start with {}.",
];

const UGC_SENTENCES: [&str; 8] = [
    "Lately I can't get enough of {}.",
    "Honestly, {} is my thing.",
    "Nothing beats {} for me.",
    "I keep coming back to {}.",
    "Give me {} any day.",
    "Big fan of {} here.",
    "My week was all about {}.",
    "I really love {}.",
];

/// Description text for a set of preferences, e.g.
/// "The user prefers concise answers; enjoys science topics; values orderly plans."
/// Empty input gives [`NOT_PROVIDED`].
pub fn describe(prefs: &[Pref], rng: &mut impl Rng) -> String {
    let labels: Vec<&str> = prefs.iter().map(|p| pole(p.dim, p.dir).label).collect();
    describe_surfaces(&labels, rng)
}

/// A description from the words that state each preference: a pole's label or any of its
/// paraphrases (the words the user's own signals used), in random order with varied verbs.
pub fn describe_surfaces(surfaces: &[&str], rng: &mut impl Rng) -> String {
    let mut order: Vec<&str> = surfaces.to_vec();
    order.shuffle(rng);
    describe_in_order(&order, rng)
}

/// Like [`describe_surfaces`] but keeping the given order: the teacher lists its conclusion in
/// the order its reasoning did, so the student's answer (and, next round, its "So:" line) is
/// an in-order copy rather than a permutation it cannot see.
pub fn describe_in_order(surfaces: &[&str], rng: &mut impl Rng) -> String {
    if surfaces.is_empty() {
        return NOT_PROVIDED.to_string();
    }
    let clauses: Vec<String> = surfaces.iter().map(|s| format!("{} {s}", pick(&VERBS, rng))).collect();
    format!("The user {}.", clauses.join("; "))
}

/// The paraphrase of `p`'s pole that `text` uses, if any, and where it starts.
pub fn surface_in(text: &str, p: &Pref) -> Option<(usize, &'static str)> {
    pole(p.dim, p.dir).phrases.iter().find_map(|&ph| text.find(ph).map(|at| (at, ph)))
}

/// The label or one of the paraphrases of a pole, at random.
pub fn any_surface(p: &Pref, rng: &mut impl Rng) -> &'static str {
    let pl = pole(p.dim, p.dir);
    let i = rng.gen_range(0..=pl.phrases.len());
    if i == pl.phrases.len() {
        pl.label
    } else {
        pl.phrases[i]
    }
}

fn pick<'a>(items: &[&'a str], rng: &mut impl Rng) -> &'a str {
    items[rng.gen_range(0..items.len())]
}

/// Distinct seeds per user so each user's data depends only on (seed, index).
fn user_seed(seed: u64, i: usize) -> u64 {
    // splitmix64 finaliser
    let mut z = seed ^ (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fill(template: &str, phrase: &str) -> String {
    template.replacen("{}", phrase, 1)
}

/// One response: a sentence per pole, in random order.
fn render_response(poles: &[Pref], rng: &mut impl Rng) -> String {
    let mut sentences: Vec<String> =
        poles.iter().map(|p| fill(pick(&SENTENCES, rng), pick(pole(p.dim, p.dir).phrases, rng))).collect();
    sentences.shuffle(rng);
    sentences.join(" ")
}

/// Σ over the user's active dims of dir · pole; inactive dims contribute nothing.
pub fn utility(prefs: &[Pref], poles: &[Pref]) -> i32 {
    poles
        .iter()
        .filter_map(|p| prefs.iter().find(|u| u.dim == p.dim).map(|u| i32::from(u.dir) * i32::from(p.dir)))
        .sum()
}

fn sample_dims(from: &[usize], n: usize, rng: &mut impl Rng) -> Vec<usize> {
    from.choose_multiple(rng, n.min(from.len())).copied().collect()
}

/// A comparison pair. `label_noise: None` means a test pair: no noise, ties re-drawn.
/// Returns the pair and whether its label was flipped by noise.
pub fn make_pair(prefs: &[Pref], label_noise: Option<f64>, rng: &mut impl Rng) -> (Pair, bool) {
    let active: Vec<usize> = prefs.iter().map(|p| p.dim).collect();
    let inactive: Vec<usize> = (0..dims().len()).filter(|d| !active.contains(d)).collect();
    loop {
        let n_act = rng.gen_range(1..=2);
        let n_inact = rng.gen_range(1..=2);
        let mut set = sample_dims(&active, n_act, rng);
        set.extend(sample_dims(&inactive, n_inact, rng));
        set.shuffle(rng);
        let a: Vec<Pref> = set.iter().map(|&dim| Pref { dim, dir: if rng.gen_bool(0.5) { 1 } else { -1 } }).collect();
        let b: Vec<Pref> = a.iter().map(|p| Pref { dim: p.dim, dir: -p.dir }).collect();
        let (ua, ub) = (utility(prefs, &a), utility(prefs, &b));
        if ua == ub && label_noise.is_none() && !active.is_empty() {
            continue;
        }
        let a_wins = match ua.cmp(&ub) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => rng.gen_bool(0.5),
        };
        let (mut chosen, mut rejected) = if a_wins { (a, b) } else { (b, a) };
        let noisy = match label_noise {
            Some(p) if p > 0.0 => rng.gen_bool(p.min(1.0)),
            _ => false,
        };
        if noisy {
            std::mem::swap(&mut chosen, &mut rejected);
        }
        let post = pick(&POSTS, rng).to_string();
        let chosen_text = render_response(&chosen, rng);
        let rejected_text = render_response(&rejected, rng);
        chosen.sort_by_key(|p| p.dim);
        rejected.sort_by_key(|p| p.dim);
        let pair =
            Pair { post, chosen: chosen_text, rejected: rejected_text, chosen_poles: chosen, rejected_poles: rejected };
        return (pair, noisy);
    }
}

/// UGC text praising the user's preferred pole of 1–2 active dims.
fn make_ugc(prefs: &[Pref], rng: &mut impl Rng) -> (String, Vec<Pref>) {
    let n = rng.gen_range(1..=2).min(prefs.len());
    let mut poles: Vec<Pref> = prefs.choose_multiple(rng, n).cloned().collect();
    let text = render_ugc(&poles, rng);
    poles.sort_by_key(|p| p.dim);
    (text, poles)
}

/// UGC sentences praising the given poles.
pub fn render_ugc(poles: &[Pref], rng: &mut impl Rng) -> String {
    poles
        .iter()
        .map(|p| fill(pick(&UGC_SENTENCES, rng), pick(pole(p.dim, p.dir).phrases, rng)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// RFC 3339 timestamp `minutes` after 2026-01-01T00:00:00Z.
pub(crate) fn timestamp(minutes: i64) -> String {
    let base = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("valid base date")
        .and_utc();
    (base + chrono::Duration::minutes(minutes)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// k ∈ [min, max] distinct active dimensions with a random stance each, sorted by dimension.
pub fn random_prefs(min: usize, max: usize, rng: &mut impl Rng) -> Vec<Pref> {
    let k = rng.gen_range(min..=max);
    let mut prefs: Vec<Pref> = rand::seq::index::sample(rng, dims().len(), k)
        .into_iter()
        .map(|dim| Pref { dim, dir: if rng.gen_bool(0.5) { 1 } else { -1 } })
        .collect();
    prefs.sort_by_key(|p| p.dim);
    prefs
}

pub fn generate(cfg: &SynthConfig) -> World {
    let n_dims = dims().len();
    let max_active = cfg.max_active.clamp(1, n_dims - 2);
    let min_active = cfg.min_active.clamp(1, max_active);
    let mut world = World {
        users: Vec::with_capacity(cfg.users),
        events: Vec::with_capacity(cfg.users * cfg.signals_per_user),
        annotations: Vec::with_capacity(cfg.users * cfg.signals_per_user),
    };
    for i in 0..cfg.users {
        let mut rng = StdRng::seed_from_u64(user_seed(cfg.seed, i));
        let user_id = format!("u{}-{i:05}", cfg.seed);
        let prefs = random_prefs(min_active, max_active, &mut rng);
        let golden = describe(&prefs, &mut rng);

        // Users are a day apart; a user's signals a few minutes apart.
        let user_start = i as i64 * 24 * 60;
        for n in 0..cfg.signals_per_user {
            let event_id = format!("{user_id}-e{n:03}");
            let ts = timestamp(user_start + 5 * (n as i64 + 1));
            let mut ann = Annotation::unknown(&event_id, &user_id);
            let body = if cfg.ugc_rate > 0.0 && rng.gen_bool(cfg.ugc_rate.min(1.0)) {
                let (text, poles) = make_ugc(&prefs, &mut rng);
                ann.ugc_poles = poles;
                EventBody::Ugc { text }
            } else {
                let (pair, noisy) = make_pair(&prefs, Some(cfg.label_noise), &mut rng);
                ann.chosen_poles = pair.chosen_poles;
                ann.rejected_poles = pair.rejected_poles;
                ann.noisy = noisy;
                EventBody::Comparison { post: pair.post, chosen: pair.chosen, rejected: pair.rejected }
            };
            world.events.push(Event { schema_version: SCHEMA_VERSION, event_id, user_id: user_id.clone(), ts, body });
            world.annotations.push(ann);
        }

        let test_pairs = (0..cfg.test_pairs_per_user).map(|_| make_pair(&prefs, None, &mut rng).0).collect();
        world.users.push(UserRecord {
            user_id,
            split: if i < cfg.test_users { Split::Test } else { Split::Train },
            prefs,
            golden,
            test_pairs,
        });
    }
    world
}

fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for item in items {
        serde_json::to_writer(&mut out, item).with_context(|| format!("writing {}", path.display()))?;
        out.write_all(b"\n").with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Parse every non-blank line of a JSONL file, naming file and line number on error.
fn read_jsonl<T>(path: &Path, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: read error", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let item = parse(&line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        items.push(item);
    }
    Ok(items)
}

/// Writes `events.jsonl`, `users.jsonl` and `annotations.jsonl` into `dir` (created if needed).
pub fn write_world(dir: &Path, w: &World) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_jsonl(&dir.join("events.jsonl"), &w.events)?;
    write_jsonl(&dir.join("users.jsonl"), &w.users)?;
    write_jsonl(&dir.join("annotations.jsonl"), &w.annotations)?;
    Ok(())
}

/// Reads a world written by [`write_world`]; events are schema-validated.
pub fn read_world(dir: &Path) -> Result<World> {
    let events = read_jsonl(&dir.join("events.jsonl"), |l| parse_event(l.as_bytes()).map_err(anyhow::Error::from))?;
    let users = read_jsonl(&dir.join("users.jsonl"), |l| serde_json::from_str(l).map_err(anyhow::Error::from))?;
    let annotations =
        read_jsonl(&dir.join("annotations.jsonl"), |l| serde_json::from_str(l).map_err(anyhow::Error::from))?;
    Ok(World { users, events, annotations })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate_event_value;

    fn small() -> SynthConfig {
        SynthConfig { users: 40, test_users: 10, ..SynthConfig::default() }
    }

    #[test]
    fn deterministic_from_seed() {
        let a = generate(&small());
        let b = generate(&small());
        assert_eq!(a.events, b.events);
        assert_eq!(serde_json::to_string(&a.users).unwrap(), serde_json::to_string(&b.users).unwrap());
        let c = generate(&SynthConfig { seed: 8, ..small() });
        assert_ne!(a.events[0].body, c.events[0].body);
    }

    #[test]
    fn shape_and_schema() {
        let cfg = small();
        let w = generate(&cfg);
        assert_eq!(w.users.len(), cfg.users);
        assert_eq!(w.events.len(), cfg.users * cfg.signals_per_user);
        assert_eq!(w.annotations.len(), w.events.len());
        let tests = w.users.iter().filter(|u| u.split == Split::Test).count();
        assert_eq!(tests, cfg.test_users);
        assert_eq!(w.users[0].user_id, "u7-00000");
        assert_eq!(w.events[1].event_id, "u7-00000-e001");
        let mut ugc = 0;
        for (e, a) in w.events.iter().zip(&w.annotations) {
            let v = serde_json::to_value(e).unwrap();
            validate_event_value(&v).unwrap_or_else(|err| panic!("{}: {err}", e.event_id));
            assert_eq!(e.event_id, a.event_id);
            if let EventBody::Comparison { chosen, .. } = &e.body {
                let n = chosen.split('.').filter(|s| !s.trim().is_empty()).count();
                assert!((2..=4).contains(&n), "{chosen}");
                for s in chosen.split('.').filter(|s| !s.trim().is_empty()) {
                    assert!(s.split_whitespace().count() <= 7, "{s}");
                }
            } else {
                ugc += 1;
                assert!(!a.ugc_poles.is_empty());
            }
        }
        assert!(ugc > 0);
        for pair in w.events.windows(2) {
            if pair[0].user_id == pair[1].user_id {
                assert!(pair[0].ts < pair[1].ts);
            } else {
                assert!(pair[0].user_id < pair[1].user_id);
            }
        }
        for u in &w.users {
            assert!((cfg.min_active..=cfg.max_active).contains(&u.prefs.len()));
            assert!(u.golden.starts_with("The user ") && u.golden.ends_with('.'));
            assert_eq!(u.golden.matches(';').count(), u.prefs.len() - 1);
            assert_eq!(u.test_pairs.len(), cfg.test_pairs_per_user);
            for p in &u.test_pairs {
                assert!(utility(&u.prefs, &p.chosen_poles) > utility(&u.prefs, &p.rejected_poles));
            }
        }
    }

    #[test]
    fn annotations_agree_with_utility() {
        let w = generate(&small());
        let mut noisy = 0;
        let mut strict = 0;
        for a in &w.annotations {
            if a.chosen_poles.is_empty() {
                continue;
            }
            let u = w.users.iter().find(|u| u.user_id == a.user_id).unwrap();
            let (uc, ur) = (utility(&u.prefs, &a.chosen_poles), utility(&u.prefs, &a.rejected_poles));
            if a.noisy {
                noisy += 1;
                assert!(uc <= ur);
            } else {
                assert!(uc >= ur, "{}", a.event_id);
                strict += usize::from(uc > ur);
            }
        }
        assert!(noisy > 0 && strict > 0);
    }

    #[test]
    fn describe_uses_labels() {
        let mut rng = StdRng::seed_from_u64(1);
        let prefs = [Pref { dim: 16, dir: 1 }, Pref { dim: 47, dir: -1 }];
        let d = describe(&prefs, &mut rng);
        assert!(d.contains("concise answers") && d.contains("no science talk"), "{d}");
        assert_eq!(describe(&[], &mut rng), NOT_PROVIDED);
    }

    #[test]
    fn world_roundtrips_through_files() {
        let w = generate(&SynthConfig { users: 5, test_users: 2, ..SynthConfig::default() });
        let dir = tempfile::tempdir().unwrap();
        write_world(dir.path(), &w).unwrap();
        let r = read_world(dir.path()).unwrap();
        assert_eq!(r.events, w.events);
        assert_eq!(serde_json::to_string(&r.users).unwrap(), serde_json::to_string(&w.users).unwrap());
        assert_eq!(serde_json::to_string(&r.annotations).unwrap(), serde_json::to_string(&w.annotations).unwrap());
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let w = generate(&SynthConfig { users: 2, test_users: 1, ..SynthConfig::default() });
        let dir = tempfile::tempdir().unwrap();
        write_world(dir.path(), &w).unwrap();
        let path = dir.path().join("events.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[2] = "{\"schema_version\": 1, \"kind\": \"comparison\"}";
        std::fs::write(&path, lines.join("\n")).unwrap();
        let err = format!("{:#}", read_world(dir.path()).err().unwrap());
        assert!(err.contains("events.jsonl:3"), "{err}");
    }
}
