//! Input events and their validation against `schemas/event.schema.json` (the single source).

use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

pub const SCHEMA_VERSION: u32 = 1;
pub const EVENT_SCHEMA: &str = include_str!("../schemas/event.schema.json");
pub const UPDATE_SCHEMA: &str = include_str!("../schemas/update.schema.json");

/// One user interaction event, exactly as it travels on the events topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub schema_version: u32,
    pub event_id: String,
    pub user_id: String,
    /// RFC 3339 timestamp.
    pub ts: String,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EventBody {
    /// AlignX pair-wise comparative feedback: the user chose `chosen` over `rejected` for `post`.
    Comparison { post: String, chosen: String, rejected: String },
    /// User-generated content.
    Ugc { text: String },
    /// Erase the user: state deleted, tombstone published.
    Forget,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema violation at {path}: {message}")]
    Schema { path: String, message: String },
}

fn validator(schema: &'static str, cell: &'static OnceLock<jsonschema::Validator>) -> &'static jsonschema::Validator {
    cell.get_or_init(|| {
        let schema: serde_json::Value = serde_json::from_str(schema).expect("bundled schema is JSON");
        jsonschema::options().should_validate_formats(true).build(&schema).expect("bundled schema compiles")
    })
}

/// Validate a JSON value against a bundled schema, reporting the first violation.
fn check(v: &serde_json::Value, validator: &jsonschema::Validator) -> Result<(), EventError> {
    match validator.iter_errors(v).next() {
        None => Ok(()),
        Some(e) => Err(EventError::Schema { path: e.instance_path.to_string(), message: e.to_string() }),
    }
}

pub fn validate_event_value(v: &serde_json::Value) -> Result<(), EventError> {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    check(v, validator(EVENT_SCHEMA, &V))
}

pub fn validate_update_value(v: &serde_json::Value) -> Result<(), EventError> {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    check(v, validator(UPDATE_SCHEMA, &V))
}

/// Parse raw bytes (a Kafka payload or a JSONL line) into a validated event.
pub fn parse_event(bytes: &[u8]) -> Result<Event, EventError> {
    let text = std::str::from_utf8(bytes)?;
    let value: serde_json::Value = serde_json::from_str(text)?;
    validate_event_value(&value)?;
    Ok(serde_json::from_value(value)?)
}

impl Event {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("event serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comparison() -> Event {
        Event {
            schema_version: 1,
            event_id: "e1".into(),
            user_id: "u1".into(),
            ts: "2026-11-26T10:00:00Z".into(),
            body: EventBody::Comparison { post: "p".into(), chosen: "a".into(), rejected: "b".into() },
        }
    }

    #[test]
    fn roundtrip_validates() {
        let e = comparison();
        let parsed = parse_event(e.to_json().as_bytes()).unwrap();
        assert_eq!(parsed, e);
        let forget = Event { body: EventBody::Forget, ..e };
        assert_eq!(parse_event(forget.to_json().as_bytes()).unwrap(), forget);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(parse_event(b"\xff\xfe"), Err(EventError::Utf8(_))));
        assert!(matches!(parse_event(b"{not json"), Err(EventError::Json(_))));
        let mut v: serde_json::Value = serde_json::from_str(&comparison().to_json()).unwrap();
        v["schema_version"] = 2.into();
        assert!(matches!(parse_event(v.to_string().as_bytes()), Err(EventError::Schema { .. })));
        let mut v: serde_json::Value = serde_json::from_str(&comparison().to_json()).unwrap();
        v["kind"] = "click".into();
        assert!(matches!(parse_event(v.to_string().as_bytes()), Err(EventError::Schema { .. })));
        let mut v: serde_json::Value = serde_json::from_str(&comparison().to_json()).unwrap();
        v["ts"] = "yesterday".into();
        assert!(matches!(parse_event(v.to_string().as_bytes()), Err(EventError::Schema { .. })));
        let mut v: serde_json::Value = serde_json::from_str(&comparison().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("chosen");
        assert!(matches!(parse_event(v.to_string().as_bytes()), Err(EventError::Schema { .. })));
    }
}
