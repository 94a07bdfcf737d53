//! Importer for the real AlignX data set (JSON array or JSONL, one record per user).
//!
//! Each record holds the user's held-out pair (`prompt`, `chosen`, `rejected`), their history
//! (`Pair-wise Comparative Feedback`, optionally `User-Generated Content`) and their
//! `Preference Direction` over the 90 dimensions. Poles of individual signals are unknown,
//! so pole lists in pairs and annotations stay empty.

use crate::event::{Event, EventBody, SCHEMA_VERSION};
use crate::train::dims::dims;
use crate::train::synth::{describe, timestamp, Annotation, Pair, Pref, Split, UserRecord, World};
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::path::Path;

const PAIRS_FIELD: &str = "Pair-wise Comparative Feedback";
const UGC_FIELD: &str = "User-Generated Content";
const DIRECTION_FIELD: &str = "Preference Direction";
/// Event text limit of `schemas/event.schema.json`.
const MAX_TEXT_CHARS: usize = 16384;

/// History entries that could not become events (reported, not fatal).
#[derive(Default)]
struct Skipped {
    unparseable: usize,
    empty_or_long: usize,
}

/// Imports an AlignX file; `test_frac` of the users (chosen with `cfg_seed`) become test users.
pub fn import(path: &Path, cfg_seed: u64, test_frac: f64) -> Result<World> {
    if !(0.0..=1.0).contains(&test_frac) {
        bail!("test fraction {test_frac} is outside [0, 1]");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let records = split_records(path, &text)?;

    let n = records.len();
    let n_test = ((n as f64) * test_frac).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(cfg_seed);
    order.shuffle(&mut rng);
    let mut is_test = vec![false; n];
    for &i in &order[..n_test.min(n)] {
        is_test[i] = true;
    }

    let mut world = World { users: Vec::with_capacity(n), events: Vec::new(), annotations: Vec::new() };
    let mut skipped = Skipped::default();
    for (i, (where_, record)) in records.iter().enumerate() {
        import_record(i, record, is_test[i], &mut rng, &mut world, &mut skipped)
            .with_context(|| format!("{}: {where_}", path.display()))?;
    }
    if skipped.unparseable + skipped.empty_or_long > 0 {
        tracing::warn!(
            file = %path.display(),
            unparseable = skipped.unparseable,
            empty_or_too_long = skipped.empty_or_long,
            "skipped AlignX history entries"
        );
    }
    Ok(world)
}

/// Splits the file into records, each with a location for error messages.
fn split_records(path: &Path, text: &str) -> Result<Vec<(String, Value)>> {
    if text.trim_start().starts_with('[') {
        let all: Vec<Value> =
            serde_json::from_str(text).with_context(|| format!("{}: not a JSON array of records", path.display()))?;
        return Ok(all.into_iter().enumerate().map(|(i, v)| (format!("record {i}"), v)).collect());
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} (record {}): not JSON", path.display(), n + 1, out.len()))?;
        out.push((format!("line {} (record {})", n + 1, out.len()), v));
    }
    Ok(out)
}

fn str_field<'a>(obj: &'a Value, field: &str) -> Result<&'a str> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(anyhow!("missing field `{field}`")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(anyhow!("field `{field}` is not a string")),
    }
}

/// A list field that may also arrive JSON-encoded as a string; `None` when absent or
/// unparseable (the latter counted).
fn list_field(record: &Value, field: &str, skipped: &mut Skipped) -> Result<Vec<Value>> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(items)) => Ok(items),
            _ => {
                skipped.unparseable += 1;
                Ok(Vec::new())
            }
        },
        Some(_) => Err(anyhow!("field `{field}` is not an array")),
    }
}

/// A history item: an object, or a string holding one (`None` if it does not parse).
fn history_item(item: &Value, skipped: &mut Skipped) -> Option<Value> {
    match item {
        Value::Object(_) => Some(item.clone()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Some(v),
            _ => {
                skipped.unparseable += 1;
                None
            }
        },
        _ => {
            skipped.unparseable += 1;
            None
        }
    }
}

fn usable(texts: &[&str], skipped: &mut Skipped) -> bool {
    let ok = texts.iter().all(|t| !t.trim().is_empty() && t.chars().count() <= MAX_TEXT_CHARS);
    if !ok {
        skipped.empty_or_long += 1;
    }
    ok
}

fn import_record(
    index: usize,
    record: &Value,
    test: bool,
    rng: &mut StdRng,
    world: &mut World,
    skipped: &mut Skipped,
) -> Result<()> {
    if !record.is_object() {
        bail!("record is not a JSON object");
    }
    let user_id = format!("alignx-{index}");
    let test_pair =
        Pair::unannotated(str_field(record, "prompt")?, str_field(record, "chosen")?, str_field(record, "rejected")?);
    let prefs = match record.get(DIRECTION_FIELD) {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => parse_direction(v).with_context(|| format!("field `{DIRECTION_FIELD}`"))?,
    };

    let mut bodies = Vec::new();
    for (j, item) in list_field(record, PAIRS_FIELD, skipped)?.iter().enumerate() {
        let Some(item) = history_item(item, skipped) else {
            continue;
        };
        let field = |name: &str| str_field(&item, name).with_context(|| format!("`{PAIRS_FIELD}`[{j}]"));
        let (post, chosen, rejected) = (field("prompt")?, field("chosen")?, field("rejected")?);
        if usable(&[post, chosen, rejected], skipped) {
            bodies.push(EventBody::Comparison {
                post: post.to_string(),
                chosen: chosen.to_string(),
                rejected: rejected.to_string(),
            });
        }
    }
    // UGC is optional in AlignX; malformed entries are skipped rather than fatal.
    for item in list_field(record, UGC_FIELD, skipped)? {
        let Some(item) = history_item(&item, skipped) else {
            continue;
        };
        match item.get("comment").and_then(Value::as_str) {
            Some(text) if usable(&[text], skipped) => bodies.push(EventBody::Ugc { text: text.to_string() }),
            Some(_) => {}
            None => skipped.unparseable += 1,
        }
    }

    // AlignX has no timestamps: users a day apart, signals five minutes apart.
    for (n, body) in bodies.into_iter().enumerate() {
        let event_id = format!("{user_id}-e{n:03}");
        world.annotations.push(Annotation::unknown(&event_id, &user_id));
        world.events.push(Event {
            schema_version: SCHEMA_VERSION,
            event_id,
            user_id: user_id.clone(),
            ts: timestamp(index as i64 * 24 * 60 + 5 * (n as i64 + 1)),
            body,
        });
    }
    world.users.push(UserRecord {
        user_id,
        split: if test { Split::Test } else { Split::Train },
        golden: describe(&prefs, rng),
        prefs,
        test_pairs: vec![test_pair],
    });
    Ok(())
}

/// Parses the 90-element direction vector.
///
/// Two encodings are accepted: AlignX's own (1 = positive, 0 = negative, 0.5 = neutral) and
/// a signed one (sign = direction, 0 = neutral). A vector with a value strictly between 0
/// and 1 is read as AlignX's; otherwise as signed (real AlignX vectors are mostly 0.5).
fn parse_direction(v: &Value) -> Result<Vec<Pref>> {
    let items = v.as_array().ok_or_else(|| anyhow!("not an array"))?;
    let n = dims().len();
    if items.len() != n {
        bail!("has {} values, expected {n}", items.len());
    }
    let values = items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let f = match x {
                Value::Number(num) => num.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            f.filter(|f| f.is_finite()).ok_or_else(|| anyhow!("value {i} ({x}) is not a number"))
        })
        .collect::<Result<Vec<f64>>>()?;
    let alignx = values.iter().any(|&f| f > 0.0 && f < 1.0) && values.iter().all(|&f| f >= 0.0);
    let centre = if alignx { 0.5 } else { 0.0 };
    Ok(values
        .iter()
        .enumerate()
        .filter(|(_, &f)| f != centre)
        .map(|(dim, &f)| Pref { dim, dir: if f > centre { 1 } else { -1 } })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate_event_value;
    use crate::train::synth::NOT_PROVIDED;
    use serde_json::json;

    fn direction(entries: &[(usize, Value)], neutral: Value) -> Value {
        let mut v = vec![neutral; 90];
        for (i, x) in entries {
            v[*i] = x.clone();
        }
        Value::Array(v)
    }

    fn record(i: usize) -> Value {
        json!({
            "prompt": format!("post {i}"),
            "chosen": "good reply",
            "rejected": "bad reply",
            "Preference Direction": direction(&[(16, json!(1)), (47, json!(0))], json!(0.5)),
            "Pair-wise Comparative Feedback": [
                {"prompt": "p1", "chosen": "c1", "rejected": "r1", "Preference Direction": []},
                "{\"prompt\": \"p2\", \"chosen\": \"c2\", \"rejected\": \"r2\"}",
                "not json at all",
                {"prompt": "", "chosen": "c3", "rejected": "r3"}
            ],
            "User-Generated Content": [{"prompt": "q", "comment": "I like short answers."}]
        })
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn imports_array_and_jsonl() {
        let array = Value::Array((0..4).map(record).collect()).to_string();
        let jsonl: String = (0..4).map(|i| format!("{}\n\n", record(i))).collect();
        for text in [array, jsonl] {
            let f = write(&text);
            let w = import(f.path(), 3, 0.5).unwrap();
            assert_eq!(w.users.len(), 4);
            assert_eq!(w.users.iter().filter(|u| u.split == Split::Test).count(), 2);
            let u = &w.users[1];
            assert_eq!(u.user_id, "alignx-1");
            assert_eq!(u.prefs, vec![Pref { dim: 16, dir: 1 }, Pref { dim: 47, dir: -1 }]);
            assert!(u.golden.contains("concise answers") && u.golden.contains("no science talk"));
            assert_eq!(u.test_pairs.len(), 1);
            assert_eq!(u.test_pairs[0].post, "post 1");
            // 2 usable pairs + 1 UGC per user; the broken string and empty prompt are skipped.
            assert_eq!(w.events.len(), 12);
            assert_eq!(w.annotations.len(), 12);
            assert_eq!(w.events[3].event_id, "alignx-1-e000");
            for e in &w.events {
                validate_event_value(&serde_json::to_value(e).unwrap()).unwrap();
            }
            assert!(matches!(w.events[2].body, EventBody::Ugc { .. }));
        }
    }

    #[test]
    fn signed_and_string_directions() {
        let mut r = record(0);
        r["Preference Direction"] = direction(&[(3, json!("-1")), (5, json!("1"))], json!("0"));
        let f = write(&Value::Array(vec![r.clone()]).to_string());
        let w = import(f.path(), 1, 0.0).unwrap();
        assert_eq!(w.users[0].prefs, vec![Pref { dim: 3, dir: -1 }, Pref { dim: 5, dir: 1 }]);
        assert_eq!(w.users[0].split, Split::Train);

        r["Preference Direction"] = direction(&[], json!(0.5));
        let f = write(&Value::Array(vec![r]).to_string());
        let w = import(f.path(), 1, 1.0).unwrap();
        assert_eq!(w.users[0].golden, NOT_PROVIDED);
        assert_eq!(w.users[0].split, Split::Test);
    }

    #[test]
    fn errors_name_file_record_and_field() {
        let mut bad = record(1);
        bad.as_object_mut().unwrap().remove("chosen");
        let f = write(&Value::Array(vec![record(0), bad]).to_string());
        let err = format!("{:#}", import(f.path(), 1, 0.1).err().unwrap());
        let name = f.path().file_name().unwrap().to_string_lossy().to_string();
        assert!(err.contains(&name) && err.contains("record 1"), "{err}");
        assert!(err.contains("`chosen`"), "{err}");

        let mut bad = record(0);
        bad["Pair-wise Comparative Feedback"][0].as_object_mut().unwrap().remove("rejected");
        let f = write(&format!("{}\n{}\n", record(0), bad));
        let err = format!("{:#}", import(f.path(), 1, 0.1).err().unwrap());
        assert!(err.contains("line 2 (record 1)"), "{err}");
        assert!(err.contains("[0]") && err.contains("`rejected`"), "{err}");

        let f = write(&format!("{}\n{{oops\n", record(0)));
        let err = format!("{:#}", import(f.path(), 1, 0.1).err().unwrap());
        assert!(err.contains("line 2"), "{err}");

        let mut bad = record(0);
        bad["Preference Direction"] = json!([1, 0]);
        let f = write(&Value::Array(vec![bad]).to_string());
        let err = format!("{:#}", import(f.path(), 1, 0.1).err().unwrap());
        assert!(err.contains("Preference Direction") && err.contains("expected 90"), "{err}");

        assert!(import(f.path(), 1, 1.5).is_err());
    }
}
