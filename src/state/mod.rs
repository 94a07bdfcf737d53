//! Per-user state behind one trait: the pending window (dedupe by event id), claimed windows
//! in flight, the description cache (compare-and-set on `version`, idempotent per window),
//! retries and parking, and erasure.
//!
//! Two implementations pass the same behavioural suite (`conformance`): `redis::RedisStore`
//! (Lua scripts; the production store) and `memory::MemoryStore` (the embedded default for the
//! demo and fast tests).
//!
//! Redis layout (all keys of a user share the hash tag `{<user_id>}`, so multi-key scripts
//! work on Redis Cluster):
//! - `pref:{u}:desc` hash: `version`, `description`, `event_ids` (JSON array), `updated_at`, `model`
//! - `pref:{u}:pending` list of event JSON in arrival order (the partial window)
//! - `pref:{u}:seen` sorted set event id -> arrival sequence (dedupe). Trim policy: only the
//!   newest `seen_cap` ids (default 4096) are kept; a redelivery is recognised as long as fewer
//!   than that many newer events of the same user arrived since, which covers Kafka
//!   redelivery (uncommitted tail) by a wide margin.
//! - `pref:{u}:seq` arrival counter
//! - `pref:{u}:inflight` hash window id -> `{"seq":N,"at":<claim ms>,"events":[...]}`: claimed windows not yet
//!   applied or parked; re-driven after a crash via `inflight(user)` / `recover(min_age)`
//! - `pref:{u}:attempts` hash window id -> failed attempts
//! - `pref:{u}:applied` sorted set window id -> version it produced (newest `applied_cap`,
//!   default 1024, kept), so re-applying a window does not bump the version twice
//! - `pref:{u}:parked` hash window id -> `{"reason":..,"attempts":N,"seq":N,"events":[...]}`

mod connection;
pub mod memory;
pub mod redis;

use crate::event::{Event, EventBody};
pub use crate::window::Window;
use serde::{Deserialize, Serialize};

/// Newest event ids remembered per user for dedupe.
pub const DEFAULT_SEEN_CAP: usize = 4096;
/// Newest applied window ids remembered per user for idempotent apply.
pub const DEFAULT_APPLIED_CAP: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    /// The event id was seen before: no effect.
    Duplicate,
    /// Appended; the pending window now holds this many events.
    Pending(usize),
    /// Appended and the window is full: claimed (inflight) for this caller.
    Full(Window),
}

/// The cached description, as recommendation services read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    /// Starts at 1, +1 per applied window.
    pub version: u64,
    pub description: String,
    /// Ids of the events of the window that produced this version.
    pub event_ids: Vec<String>,
    /// RFC 3339.
    pub updated_at: String,
    pub model: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Written; the new version.
    Applied(u64),
    /// This window was applied before and produced this version: nothing changed.
    AlreadyApplied(u64),
    /// The window is neither in flight nor parked (its user was forgotten meanwhile): nothing
    /// written, so an erased user is never brought back.
    NotClaimed,
    /// The stored version differs from the expected one: re-read and infer again.
    Conflict(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Try the window again; this was failed attempt number `n` (1-based).
    Retry(u32),
    /// Too many failures: moved to the parked set with the reason (report it).
    Parked,
    /// The window is not in flight (already applied, parked or forgotten).
    NotInflight,
}

/// A window that failed too often, kept for an operator.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedWindow {
    pub window: Window,
    pub reason: String,
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("corrupt state for user {user}: {detail}")]
    Corrupt { user: String, detail: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The connection's set-up is wrong (TLS files, a URL that does not match them).
    #[error("{0}")]
    Setup(String),
}

/// The state store. All operations on one user are atomic; a window is claimed by exactly one
/// caller and stays in flight until `apply` or `fail` (parking) clears it.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// Dedupe by `event_id`, push, and when the window reaches `window_size` claim it.
    async fn append(&self, user: &str, event: &Event, window_size: usize) -> Result<AppendOutcome, StateError>;

    /// Claim up to `max` pending events as a (partial) window: the `--window-idle` flush.
    async fn take_partial(&self, user: &str, max: usize) -> Result<Option<Window>, StateError>;

    /// Events waiting in the user's pending window.
    async fn pending_len(&self, user: &str) -> Result<usize, StateError>;

    async fn current(&self, user: &str) -> Result<Option<Description>, StateError>;

    /// Compare-and-set the description on `expected_version` (0 = none yet), idempotent on
    /// `window_id`. The window must be claimed (in flight or parked), else `NotClaimed`.
    /// Un-parks a parked window; an inflight window stays inflight until `complete`, so that a
    /// crash before its update is published re-drives it.
    async fn apply(
        &self,
        user: &str,
        window_id: &str,
        expected_version: u64,
        description: &str,
        event_ids: &[String],
        model: &str,
    ) -> Result<ApplyOutcome, StateError>;

    /// The version `window_id` produced, if it was applied (and is still remembered).
    async fn applied_version(&self, user: &str, window_id: &str) -> Result<Option<u64>, StateError>;

    /// The window's update is published: forget its claim (`apply` already forgot its attempts).
    async fn complete(&self, user: &str, window_id: &str) -> Result<(), StateError>;

    /// Count a failed attempt (e.g. invalid model output); park after `max_retries` retries.
    async fn fail(
        &self,
        user: &str,
        window_id: &str,
        reason: &str,
        max_retries: u32,
    ) -> Result<FailOutcome, StateError>;

    /// The user's claimed, unfinished windows, oldest claim first.
    async fn inflight(&self, user: &str) -> Result<Vec<Window>, StateError>;

    /// Every user's unfinished windows claimed at least `min_age` ago (after a crash: zero;
    /// periodic scans: long enough that a live owner has finished them). Applying is idempotent
    /// per window, so re-driving a window another instance is also working on is harmless.
    async fn recover(&self, min_age: std::time::Duration) -> Result<Vec<Window>, StateError>;

    async fn parked(&self, user: &str) -> Result<Vec<ParkedWindow>, StateError>;

    /// Delete every key of the user (the `forget` event).
    async fn forget(&self, user: &str) -> Result<(), StateError>;
}

/// Shared argument checks, so both stores reject the same inputs.
pub(crate) fn check_append(user: &str, event: &Event, window_size: usize) -> Result<(), StateError> {
    if window_size == 0 {
        return Err(StateError::Invalid("window size must be at least 1".into()));
    }
    if event.user_id != user {
        return Err(StateError::Invalid(format!(
            "event {} belongs to user {:?}, not {user:?}",
            event.event_id, event.user_id
        )));
    }
    if matches!(event.body, EventBody::Forget) {
        return Err(StateError::Invalid("forget events are not windowed; call forget()".into()));
    }
    Ok(())
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The behavioural suite every `StateStore` must pass (used by the memory unit tests and
/// `tests/state_redis.rs`). Panics on the first failed expectation. Uses fresh user ids, so
/// it can run against a shared store.
#[doc(hidden)]
pub mod conformance {
    use super::*;
    use crate::window::window_id;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn fresh_user(tag: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        format!("conf-{tag}-{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
    }

    pub fn event(user: &str, id: &str, second: u32) -> Event {
        Event {
            schema_version: 1,
            event_id: id.into(),
            user_id: user.into(),
            ts: format!("2026-11-26T10:{:02}:{:02}Z", second / 60, second % 60),
            body: EventBody::Comparison {
                post: format!("post {id}"),
                chosen: "a \"quoted\" / unicode é answer".into(),
                rejected: "b".into(),
            },
        }
    }

    fn expect_full(o: AppendOutcome) -> Window {
        match o {
            AppendOutcome::Full(w) => w,
            other => panic!("expected a full window, got {other:?}"),
        }
    }

    pub async fn run_all<S: StateStore + ?Sized>(store: &S) {
        append_dedupe_and_claim(store).await;
        window_ordered_by_ts(store).await;
        odd_event_ids(store).await;
        apply_cas_and_idempotence(store).await;
        fail_retries_then_parks(store).await;
        take_partial_window(store).await;
        forget_deletes_everything(store).await;
        rejects_bad_arguments(store).await;
        concurrent_appends(store).await;
    }

    pub async fn append_dedupe_and_claim<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("append");
        for (i, id) in ["e1", "e2", "e3"].iter().enumerate() {
            assert_eq!(store.append(&u, &event(&u, id, i as u32), 4).await.unwrap(), AppendOutcome::Pending(i + 1));
        }
        assert_eq!(store.append(&u, &event(&u, "e2", 1), 4).await.unwrap(), AppendOutcome::Duplicate);
        assert_eq!(store.pending_len(&u).await.unwrap(), 3);
        let w = expect_full(store.append(&u, &event(&u, "e4", 3), 4).await.unwrap());
        assert_eq!(w.user_id, u);
        assert_eq!(w.event_ids(), ["e1", "e2", "e3", "e4"]);
        assert_eq!(w.id, window_id(&["e4", "e3", "e2", "e1"]));
        assert_eq!(w.events[0], event(&u, "e1", 0), "events round-trip unchanged");
        assert_eq!(store.pending_len(&u).await.unwrap(), 0);
        // Claimed windows survive until applied or parked.
        assert_eq!(store.inflight(&u).await.unwrap(), vec![w.clone()]);
        assert!(store.recover(std::time::Duration::ZERO).await.unwrap().contains(&w));
        let old = store.recover(std::time::Duration::from_secs(3600)).await.unwrap();
        assert!(!old.contains(&w), "a fresh claim is left to its owner by periodic scans");
        // Redelivered events of a claimed window stay duplicates.
        assert_eq!(store.append(&u, &event(&u, "e4", 3), 4).await.unwrap(), AppendOutcome::Duplicate);
        // The next window starts empty; a second claim is kept in claim order.
        for (i, id) in ["e5", "e6", "e7"].iter().enumerate() {
            assert_eq!(
                store.append(&u, &event(&u, id, 10 + i as u32), 4).await.unwrap(),
                AppendOutcome::Pending(i + 1)
            );
        }
        let w2 = expect_full(store.append(&u, &event(&u, "e8", 20), 4).await.unwrap());
        assert_eq!(store.inflight(&u).await.unwrap(), vec![w.clone(), w2.clone()]);
        // A smaller window size takes effect on the next append.
        assert_eq!(store.append(&u, &event(&u, "e9", 30), 4).await.unwrap(), AppendOutcome::Pending(1));
        let w3 = expect_full(store.append(&u, &event(&u, "e10", 31), 2).await.unwrap());
        assert_eq!(w3.event_ids(), ["e9", "e10"]);
        store.forget(&u).await.unwrap();
    }

    /// Ids JSON escapes (quote, backslash, control) and non-ASCII ids name the window exactly
    /// as `window_id` does (the Redis claim reads plain ids without decoding the event).
    pub async fn odd_event_ids<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("ids");
        let ids = ["q\"uote", "back\\slash", "tab\t", "é-ünï-中"];
        for (i, id) in ids.iter().enumerate().take(3) {
            store.append(&u, &event(&u, id, i as u32), 4).await.unwrap();
        }
        let w = expect_full(store.append(&u, &event(&u, ids[3], 3), 4).await.unwrap());
        assert_eq!(w.id, window_id(&ids));
        assert_eq!(w.event_ids(), ids);
        store.forget(&u).await.unwrap();
    }

    pub async fn window_ordered_by_ts<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("order");
        store.append(&u, &event(&u, "late", 50), 3).await.unwrap();
        store.append(&u, &event(&u, "tie-a", 10), 3).await.unwrap();
        let w = expect_full(store.append(&u, &event(&u, "tie-b", 10), 3).await.unwrap());
        assert_eq!(w.event_ids(), ["tie-a", "tie-b", "late"]);
        store.forget(&u).await.unwrap();
    }

    pub async fn apply_cas_and_idempotence<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("apply");
        assert_eq!(store.current(&u).await.unwrap(), None);
        store.append(&u, &event(&u, "a1", 1), 2).await.unwrap();
        let w = expect_full(store.append(&u, &event(&u, "a2", 2), 2).await.unwrap());
        let ids = w.event_ids();
        let r = store.apply(&u, &w.id, 0, "likes \"short\" answers", &ids, "tiny-v1").await.unwrap();
        assert_eq!(r, ApplyOutcome::Applied(1));
        let d = store.current(&u).await.unwrap().expect("description written");
        assert_eq!(d.version, 1);
        assert_eq!(d.description, "likes \"short\" answers");
        assert_eq!(d.event_ids, ids);
        assert_eq!(d.model, "tiny-v1");
        assert!(chrono::DateTime::parse_from_rfc3339(&d.updated_at).is_ok(), "updated_at {:?}", d.updated_at);
        assert_eq!(store.applied_version(&u, &w.id).await.unwrap(), Some(1));
        assert_eq!(store.inflight(&u).await.unwrap(), vec![w.clone()], "applied but not yet published");
        store.complete(&u, &w.id).await.unwrap();
        assert!(store.inflight(&u).await.unwrap().is_empty(), "complete releases the window");
        store.complete(&u, &w.id).await.unwrap();
        // Replaying the same window (any expected version) never bumps the version again.
        assert_eq!(store.apply(&u, &w.id, 0, "other", &ids, "m").await.unwrap(), ApplyOutcome::AlreadyApplied(1));
        assert_eq!(store.apply(&u, &w.id, 1, "other", &ids, "m").await.unwrap(), ApplyOutcome::AlreadyApplied(1));
        assert_eq!(store.current(&u).await.unwrap().unwrap().description, "likes \"short\" answers");
        // A stale expected version is a conflict, with nothing written.
        store.append(&u, &event(&u, "a3", 3), 2).await.unwrap();
        let w2 = expect_full(store.append(&u, &event(&u, "a4", 4), 2).await.unwrap());
        let ids2 = w2.event_ids();
        assert_eq!(store.applied_version(&u, &w2.id).await.unwrap(), None);
        assert_eq!(store.apply(&u, &w2.id, 0, "stale", &ids2, "m").await.unwrap(), ApplyOutcome::Conflict(1));
        assert_eq!(store.current(&u).await.unwrap().unwrap().version, 1);
        assert_eq!(store.inflight(&u).await.unwrap(), vec![w2.clone()], "a conflict keeps the window");
        assert_eq!(store.apply(&u, &w2.id, 1, "second", &ids2, "m").await.unwrap(), ApplyOutcome::Applied(2));
        let d = store.current(&u).await.unwrap().unwrap();
        assert_eq!((d.version, d.description.as_str(), d.event_ids), (2, "second", ids2));
        store.forget(&u).await.unwrap();
    }

    pub async fn fail_retries_then_parks<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("fail");
        store.append(&u, &event(&u, "f1", 1), 2).await.unwrap();
        let w = expect_full(store.append(&u, &event(&u, "f2", 2), 2).await.unwrap());
        let reason = "no <answer> tag: \"…\"";
        assert_eq!(store.fail(&u, &w.id, reason, 2).await.unwrap(), FailOutcome::Retry(1));
        assert_eq!(store.fail(&u, &w.id, reason, 2).await.unwrap(), FailOutcome::Retry(2));
        assert_eq!(store.inflight(&u).await.unwrap(), vec![w.clone()]);
        assert_eq!(store.fail(&u, &w.id, reason, 2).await.unwrap(), FailOutcome::Parked);
        assert!(store.inflight(&u).await.unwrap().is_empty());
        assert!(!store.recover(std::time::Duration::ZERO).await.unwrap().iter().any(|x| x.user_id == u));
        let parked = store.parked(&u).await.unwrap();
        assert_eq!(parked, vec![ParkedWindow { window: w.clone(), reason: reason.into(), attempts: 3 }]);
        assert_eq!(store.fail(&u, &w.id, reason, 2).await.unwrap(), FailOutcome::NotInflight);
        // Invalid output never touched the description.
        assert_eq!(store.current(&u).await.unwrap(), None);
        // An operator can still apply a parked window; that un-parks it.
        assert_eq!(store.apply(&u, &w.id, 0, "fixed", &w.event_ids(), "m").await.unwrap(), ApplyOutcome::Applied(1));
        assert!(store.parked(&u).await.unwrap().is_empty());
        // Zero retries parks on the first failure.
        store.append(&u, &event(&u, "f3", 3), 2).await.unwrap();
        let w2 = expect_full(store.append(&u, &event(&u, "f4", 4), 2).await.unwrap());
        assert_eq!(store.fail(&u, &w2.id, "x", 0).await.unwrap(), FailOutcome::Parked);
        assert_eq!(store.fail(&u, "no-such-window", "x", 3).await.unwrap(), FailOutcome::NotInflight);
        assert_eq!(store.apply(&u, "no-such-window", 1, "x", &[], "m").await.unwrap(), ApplyOutcome::NotClaimed);
        store.forget(&u).await.unwrap();
    }

    pub async fn take_partial_window<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("partial");
        assert_eq!(store.take_partial(&u, 4).await.unwrap(), None);
        store.append(&u, &event(&u, "p2", 2), 4).await.unwrap();
        store.append(&u, &event(&u, "p1", 1), 4).await.unwrap();
        store.append(&u, &event(&u, "p3", 3), 4).await.unwrap();
        let w = store.take_partial(&u, 2).await.unwrap().expect("partial window");
        assert_eq!(w.event_ids(), ["p1", "p2"]);
        assert_eq!(w.id, window_id(&["p1", "p2"]));
        assert_eq!(store.pending_len(&u).await.unwrap(), 1);
        let w2 = store.take_partial(&u, 4).await.unwrap().expect("rest");
        assert_eq!(w2.event_ids(), ["p3"]);
        assert_eq!(store.take_partial(&u, 4).await.unwrap(), None);
        assert_eq!(store.inflight(&u).await.unwrap(), vec![w.clone(), w2]);
        assert_eq!(store.apply(&u, &w.id, 0, "d", &w.event_ids(), "m").await.unwrap(), ApplyOutcome::Applied(1));
        store.forget(&u).await.unwrap();
    }

    pub async fn forget_deletes_everything<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("forget");
        let other = fresh_user("bystander");
        store.append(&other, &event(&other, "o1", 1), 4).await.unwrap();
        store.append(&u, &event(&u, "g1", 1), 2).await.unwrap();
        let w = expect_full(store.append(&u, &event(&u, "g2", 2), 2).await.unwrap());
        store.apply(&u, &w.id, 0, "d", &w.event_ids(), "m").await.unwrap();
        store.append(&u, &event(&u, "g3", 3), 2).await.unwrap();
        let w2 = expect_full(store.append(&u, &event(&u, "g4", 4), 2).await.unwrap());
        store.fail(&u, &w2.id, "bad", 0).await.unwrap();
        store.append(&u, &event(&u, "g5", 5), 2).await.unwrap();
        let w3 = expect_full(store.append(&u, &event(&u, "g6", 6), 2).await.unwrap());
        store.append(&u, &event(&u, "g7", 7), 2).await.unwrap();

        store.forget(&u).await.unwrap();
        // A window claimed before the forget (e.g. by another instance) cannot resurrect the user.
        assert_eq!(store.apply(&u, &w3.id, 1, "late", &w3.event_ids(), "m").await.unwrap(), ApplyOutcome::NotClaimed);
        assert_eq!(store.current(&u).await.unwrap(), None);
        assert_eq!(store.pending_len(&u).await.unwrap(), 0);
        assert!(store.inflight(&u).await.unwrap().is_empty());
        assert!(store.parked(&u).await.unwrap().is_empty());
        // Dedupe memory and applied windows are gone too: the user starts over.
        assert_eq!(store.append(&u, &event(&u, "g1", 1), 2).await.unwrap(), AppendOutcome::Pending(1));
        let again = expect_full(store.append(&u, &event(&u, "g2", 2), 2).await.unwrap());
        assert_eq!(again.id, w.id);
        assert_eq!(store.apply(&u, &w.id, 0, "d", &w.event_ids(), "m").await.unwrap(), ApplyOutcome::Applied(1));
        // Forgetting a user leaves the others alone; forgetting twice is fine.
        assert_eq!(store.pending_len(&other).await.unwrap(), 1);
        store.forget(&u).await.unwrap();
        store.forget(&u).await.unwrap();
        store.forget(&other).await.unwrap();
    }

    pub async fn rejects_bad_arguments<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("bad");
        let e = event(&u, "b1", 1);
        assert!(matches!(store.append(&u, &e, 0).await, Err(StateError::Invalid(_))));
        assert!(matches!(store.append("someone-else", &e, 4).await, Err(StateError::Invalid(_))));
        let forget = Event { body: EventBody::Forget, ..e };
        assert!(matches!(store.append(&u, &forget, 4).await, Err(StateError::Invalid(_))));
        assert_eq!(store.pending_len(&u).await.unwrap(), 0);
    }

    /// 8 concurrent appenders of the same 12 events (in different orders) claim exactly 3
    /// windows of 4 distinct events.
    pub async fn concurrent_appends<S: StateStore + ?Sized>(store: &S) {
        let u = fresh_user("concurrent");
        let events: Vec<Event> = (0..12).map(|i| event(&u, &format!("c{i:02}"), i)).collect();
        let (ur, evr) = (&u, &events);
        let worker = move |k: usize| async move {
            let mut windows = Vec::new();
            for j in 0..evr.len() {
                let e = &evr[(j + k) % evr.len()];
                if let AppendOutcome::Full(w) = store.append(ur, e, 4).await.unwrap() {
                    windows.push(w);
                }
                tokio::task::yield_now().await;
            }
            windows
        };
        let (a, b, c, d, e, f, g, h) =
            tokio::join!(worker(0), worker(1), worker(2), worker(3), worker(4), worker(5), worker(6), worker(7));
        let windows: Vec<Window> = [a, b, c, d, e, f, g, h].into_iter().flatten().collect();
        assert_eq!(windows.len(), 3, "{windows:?}");
        let mut ids: Vec<String> = windows.iter().flat_map(|w| w.event_ids()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 12);
        assert!(windows.iter().all(|w| w.events.len() == 4));
        assert_eq!(store.inflight(&u).await.unwrap().len(), 3);
        store.forget(&u).await.unwrap();
    }
}
