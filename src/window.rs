//! Per-user windowing, pure: window ids, event ordering, window configuration and idle tracking.
//! The state stores (`crate::state`) do the I/O; everything here is plain functions.

use crate::event::Event;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Events per window (AlignXplore streams 4 new signals per update).
pub const DEFAULT_WINDOW_SIZE: usize = 4;

/// `--window-size` / `--window-idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// A window is full (and inferred on) at this many events.
    pub size: usize,
    /// Flush a partial window after this long without a new event; `None` (default) = never.
    pub idle: Option<Duration>,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self { size: DEFAULT_WINDOW_SIZE, idle: None }
    }
}

impl WindowConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("window size must be at least 1".into());
        }
        if self.idle == Some(Duration::ZERO) {
            return Err("window idle timeout must be positive (omit it to disable idle flush)".into());
        }
        Ok(())
    }
}

/// A claimed batch of one user's events, ready for inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// `window_id` of the events' ids: stable across redelivery, so applying is idempotent.
    pub id: String,
    pub user_id: String,
    /// Ordered by timestamp, then arrival.
    pub events: Vec<Event>,
}

impl Window {
    /// Build a window from events in arrival order: orders them and computes the id.
    pub fn new(user_id: impl Into<String>, events: Vec<Event>) -> Self {
        let events = order_events(events);
        let id = window_id(&events.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>());
        Self { id, user_id: user_id.into(), events }
    }

    pub fn event_ids(&self) -> Vec<String> {
        self.events.iter().map(|e| e.event_id.clone()).collect()
    }
}

/// Stable window id: SHA-1 (hex) of the byte-wise sorted event ids, each written as
/// `<byte length>:<id>` (length-prefixed, so no separator can be forged by an id).
///
/// Why SHA-1 rather than FNV-1a: the Redis Lua scripts claim windows atomically and must
/// compute the same id server-side, and Redis Lua offers `redis.sha1hex` but no 64-bit integers.
/// `state::redis` checks on every claim that both sides agree.
pub fn window_id<S: AsRef<str>>(ids: &[S]) -> String {
    let mut sorted: Vec<&str> = ids.iter().map(|s| s.as_ref()).collect();
    sorted.sort_unstable(); // str Ord is byte-wise, like the Lua comparator
    let mut buf = String::new();
    for id in sorted {
        buf.push_str(&id.len().to_string());
        buf.push(':');
        buf.push_str(id);
    }
    sha1_hex(buf.as_bytes())
}

/// Order events by timestamp, then arrival (stable sort; unparsable timestamps sort first,
/// which cannot happen for schema-validated events).
pub fn order_events(mut events: Vec<Event>) -> Vec<Event> {
    events.sort_by_key(|e| chrono::DateTime::parse_from_rfc3339(&e.ts).ok());
    events
}

/// SHA-1 as hex (FIPS 180-4). Small and dependency-free; used only for ids, not security.
pub fn sha1_hex(data: &[u8]) -> String {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            let v = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16];
            w[i] = v.rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

/// Tracks, per user, when the pending (partial) window last grew, for `--window-idle`.
/// The pipeline calls `touch` on `Pending(_)`, `clear` when a window is taken or the user
/// forgotten, and periodically flushes the users `due` (via `StateStore::take_partial`).
#[derive(Debug, Default)]
pub struct IdleTracker {
    last: HashMap<String, Instant>,
}

impl IdleTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn touch(&mut self, user: &str, now: Instant) {
        self.last.insert(user.to_string(), now);
    }

    pub fn clear(&mut self, user: &str) {
        self.last.remove(user);
    }

    /// Users whose pending window has not grown for at least `idle`, sorted.
    pub fn due(&self, now: Instant, idle: Duration) -> Vec<String> {
        let mut users: Vec<String> = self
            .last
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= idle)
            .map(|(u, _)| u.clone())
            .collect();
        users.sort();
        users
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventBody;

    fn ev(id: &str, ts: &str) -> Event {
        Event {
            schema_version: 1,
            event_id: id.into(),
            user_id: "u".into(),
            ts: ts.into(),
            body: EventBody::Ugc { text: format!("text {id}") },
        }
    }

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(
            sha1_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // Multi-block input (1000 bytes).
        assert_eq!(sha1_hex(&[b'a'; 1000]), "291e9a6c66994949b57ba5e650361e98fc36b1ba");
    }

    #[test]
    fn window_id_is_order_independent_and_length_prefixed() {
        assert_eq!(window_id(&["b", "a", "c"]), window_id(&["c", "b", "a"]));
        assert_eq!(window_id(&["a", "b"]), sha1_hex(b"1:a1:b"));
        // Concatenation without length prefixes would collide here.
        assert_ne!(window_id(&["ab", "c"]), window_id(&["a", "bc"]));
        assert_ne!(window_id(&["a"]), window_id(&["a", "a"]));
    }

    #[test]
    fn events_ordered_by_ts_then_arrival() {
        let events = vec![
            ev("late", "2026-11-26T10:00:05Z"),
            ev("tie1", "2026-11-26T10:00:01Z"),
            // Same instant written with an offset: ties keep arrival order.
            ev("tie2", "2026-11-26T11:00:01+01:00"),
            ev("early", "2026-11-26T09:59:59Z"),
        ];
        let w = Window::new("u", events);
        assert_eq!(w.event_ids(), ["early", "tie1", "tie2", "late"]);
        assert_eq!(w.id, window_id(&["late", "tie1", "tie2", "early"]));
        assert_eq!(w.user_id, "u");
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = WindowConfig::default();
        assert_eq!(c.size, 4);
        assert_eq!(c.idle, None);
        assert!(c.validate().is_ok());
        assert!(WindowConfig { size: 0, idle: None }.validate().is_err());
        assert!(WindowConfig { size: 4, idle: Some(Duration::ZERO) }.validate().is_err());
    }

    #[test]
    fn idle_tracker_reports_due_users() {
        let t0 = Instant::now();
        let mut t = IdleTracker::new();
        t.touch("a", t0);
        t.touch("b", t0 + Duration::from_secs(5));
        let idle = Duration::from_secs(10);
        assert!(t.due(t0 + Duration::from_secs(9), idle).is_empty());
        assert_eq!(t.due(t0 + Duration::from_secs(10), idle), ["a"]);
        assert_eq!(t.due(t0 + Duration::from_secs(20), idle), ["a", "b"]);
        t.clear("a");
        t.touch("b", t0 + Duration::from_secs(15)); // grew again: not due yet
        assert!(t.due(t0 + Duration::from_secs(20), idle).is_empty());
        assert_eq!(t.len(), 1);
    }
}
