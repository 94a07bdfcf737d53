//! In-process `StateStore` (the embedded default for `prefstream demo` and fast tests). Same
//! semantics as the Redis store, including the bounded dedupe and applied memories; nothing
//! survives the process.

use super::{
    check_append, now_rfc3339, AppendOutcome, ApplyOutcome, Description, FailOutcome, ParkedWindow, StateError,
    StateStore, DEFAULT_APPLIED_CAP, DEFAULT_SEEN_CAP,
};
use crate::event::Event;
use crate::window::Window;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct UserState {
    desc: Option<Description>,
    pending: VecDeque<Event>,
    seq: u64,
    seen: HashSet<String>,
    /// Seen ids, oldest first, for trimming.
    seen_order: VecDeque<String>,
    /// Window id -> (claim sequence, window).
    /// Window id -> (claim sequence, claim time, window).
    inflight: HashMap<String, (u64, std::time::Instant, Window)>,
    attempts: HashMap<String, u32>,
    applied: HashMap<String, u64>,
    applied_order: VecDeque<String>,
    /// Window id -> (claim sequence, parked window).
    parked: HashMap<String, (u64, ParkedWindow)>,
}

impl UserState {
    fn is_empty(&self) -> bool {
        self.desc.is_none()
            && self.pending.is_empty()
            && self.seen.is_empty()
            && self.inflight.is_empty()
            && self.parked.is_empty()
            && self.applied.is_empty()
    }

    /// Move up to `n` pending events into a claimed window.
    fn claim(&mut self, user: &str, n: usize) -> Window {
        let events: Vec<Event> = self.pending.drain(..n.min(self.pending.len())).collect();
        self.seq += 1;
        let w = Window::new(user, events);
        self.inflight.insert(w.id.clone(), (self.seq, std::time::Instant::now(), w.clone()));
        w
    }

    fn release(&mut self, window_id: &str) {
        self.inflight.remove(window_id);
        self.attempts.remove(window_id);
    }
}

#[derive(Debug)]
pub struct MemoryStore {
    users: Mutex<HashMap<String, UserState>>,
    seen_cap: usize,
    applied_cap: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_caps(DEFAULT_SEEN_CAP, DEFAULT_APPLIED_CAP)
    }

    /// Bounds of the per-user dedupe (event ids) and applied (window ids) memories.
    pub fn with_caps(seen_cap: usize, applied_cap: usize) -> Self {
        Self { users: Mutex::new(HashMap::new()), seen_cap: seen_cap.max(1), applied_cap: applied_cap.max(1) }
    }

    /// Run `f` on the user's state under the lock (never held across an await).
    fn with_user<T>(&self, user: &str, f: impl FnOnce(&mut UserState) -> T) -> T {
        // A panic while holding the lock cannot leave a user half-updated in a way that
        // matters more than the panic itself, so recover from poisoning.
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let state = users.entry(user.to_string()).or_default();
        let out = f(state);
        if state.is_empty() {
            users.remove(user); // keep the map from growing with read-only lookups
        }
        out
    }
}

fn sorted_windows(mut v: Vec<(u64, Window)>) -> Vec<Window> {
    v.sort_by_key(|(seq, _)| *seq);
    v.into_iter().map(|(_, w)| w).collect()
}

#[async_trait::async_trait]
impl StateStore for MemoryStore {
    async fn append(&self, user: &str, event: &Event, window_size: usize) -> Result<AppendOutcome, StateError> {
        check_append(user, event, window_size)?;
        let seen_cap = self.seen_cap;
        Ok(self.with_user(user, |s| {
            if s.seen.contains(&event.event_id) {
                return AppendOutcome::Duplicate;
            }
            s.seq += 1;
            s.seen.insert(event.event_id.clone());
            s.seen_order.push_back(event.event_id.clone());
            while s.seen_order.len() > seen_cap {
                if let Some(old) = s.seen_order.pop_front() {
                    s.seen.remove(&old);
                }
            }
            s.pending.push_back(event.clone());
            if s.pending.len() < window_size {
                AppendOutcome::Pending(s.pending.len())
            } else {
                AppendOutcome::Full(s.claim(user, window_size))
            }
        }))
    }

    async fn take_partial(&self, user: &str, max: usize) -> Result<Option<Window>, StateError> {
        if max == 0 {
            return Err(StateError::Invalid("take_partial needs max >= 1".into()));
        }
        Ok(self.with_user(user, |s| (!s.pending.is_empty()).then(|| s.claim(user, max))))
    }

    async fn pending_len(&self, user: &str) -> Result<usize, StateError> {
        Ok(self.with_user(user, |s| s.pending.len()))
    }

    async fn current(&self, user: &str) -> Result<Option<Description>, StateError> {
        Ok(self.with_user(user, |s| s.desc.clone()))
    }

    async fn apply(
        &self,
        user: &str,
        window_id: &str,
        expected_version: u64,
        description: &str,
        event_ids: &[String],
        model: &str,
    ) -> Result<ApplyOutcome, StateError> {
        let applied_cap = self.applied_cap;
        Ok(self.with_user(user, |s| {
            if let Some(&v) = s.applied.get(window_id) {
                s.parked.remove(window_id);
                s.attempts.remove(window_id);
                return ApplyOutcome::AlreadyApplied(v);
            }
            if !s.inflight.contains_key(window_id) && !s.parked.contains_key(window_id) {
                return ApplyOutcome::NotClaimed;
            }
            let cur = s.desc.as_ref().map_or(0, |d| d.version);
            if cur != expected_version {
                return ApplyOutcome::Conflict(cur);
            }
            let v = cur + 1;
            s.desc = Some(Description {
                version: v,
                description: description.to_string(),
                event_ids: event_ids.to_vec(),
                updated_at: now_rfc3339(),
                model: model.to_string(),
            });
            s.applied.insert(window_id.to_string(), v);
            s.applied_order.push_back(window_id.to_string());
            while s.applied_order.len() > applied_cap {
                if let Some(old) = s.applied_order.pop_front() {
                    s.applied.remove(&old);
                }
            }
            s.parked.remove(window_id);
            s.attempts.remove(window_id);
            ApplyOutcome::Applied(v)
        }))
    }

    async fn applied_version(&self, user: &str, window_id: &str) -> Result<Option<u64>, StateError> {
        Ok(self.with_user(user, |s| s.applied.get(window_id).copied()))
    }

    async fn complete(&self, user: &str, window_id: &str) -> Result<(), StateError> {
        self.with_user(user, |s| s.release(window_id));
        Ok(())
    }

    async fn fail(
        &self,
        user: &str,
        window_id: &str,
        reason: &str,
        max_retries: u32,
    ) -> Result<FailOutcome, StateError> {
        Ok(self.with_user(user, |s| {
            if !s.inflight.contains_key(window_id) {
                return FailOutcome::NotInflight;
            }
            let n = s.attempts.entry(window_id.to_string()).or_insert(0);
            *n += 1;
            let attempts = *n;
            if attempts <= max_retries {
                return FailOutcome::Retry(attempts);
            }
            s.attempts.remove(window_id);
            if let Some((seq, _, window)) = s.inflight.remove(window_id) {
                s.parked.insert(window_id.to_string(), (seq, ParkedWindow { window, reason: reason.into(), attempts }));
            }
            FailOutcome::Parked
        }))
    }

    async fn inflight(&self, user: &str) -> Result<Vec<Window>, StateError> {
        Ok(self.with_user(user, |s| sorted_windows(s.inflight.values().map(|(n, _, w)| (*n, w.clone())).collect())))
    }

    async fn recover(&self, min_age: std::time::Duration) -> Result<Vec<Window>, StateError> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = users.keys().collect();
        names.sort();
        let old = |(n, at, w): &(u64, std::time::Instant, Window)| (at.elapsed() >= min_age).then(|| (*n, w.clone()));
        Ok(names
            .into_iter()
            .flat_map(|u| sorted_windows(users[u].inflight.values().filter_map(old).collect()))
            .collect())
    }

    async fn parked(&self, user: &str) -> Result<Vec<ParkedWindow>, StateError> {
        Ok(self.with_user(user, |s| {
            let mut v: Vec<(u64, ParkedWindow)> = s.parked.values().cloned().collect();
            v.sort_by_key(|(seq, _)| *seq);
            v.into_iter().map(|(_, p)| p).collect()
        }))
    }

    async fn forget(&self, user: &str) -> Result<(), StateError> {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::conformance;

    #[tokio::test]
    async fn memory_store_conformance() {
        conformance::run_all(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn works_behind_dyn() {
        let store: std::sync::Arc<dyn StateStore> = std::sync::Arc::new(MemoryStore::new());
        conformance::append_dedupe_and_claim(store.as_ref()).await;
    }

    #[tokio::test]
    async fn seen_memory_is_bounded() {
        let store = MemoryStore::with_caps(3, 2);
        let u = "u";
        for i in 0..5 {
            let e = conformance::event(u, &format!("s{i}"), i);
            assert_eq!(store.append(u, &e, 100).await.unwrap(), AppendOutcome::Pending(i as usize + 1));
        }
        // The newest 3 ids are remembered, older ones were trimmed.
        assert_eq!(store.append(u, &conformance::event(u, "s4", 4), 100).await.unwrap(), AppendOutcome::Duplicate);
        assert_eq!(store.append(u, &conformance::event(u, "s2", 2), 100).await.unwrap(), AppendOutcome::Duplicate);
        assert_eq!(store.append(u, &conformance::event(u, "s0", 0), 100).await.unwrap(), AppendOutcome::Pending(6));
    }

    #[tokio::test]
    async fn applied_memory_is_bounded() {
        let store = MemoryStore::with_caps(100, 2);
        let u = "u";
        let ids = vec!["x".to_string()];
        let mut windows = Vec::new();
        for v in 0..3u64 {
            let AppendOutcome::Full(w) =
                store.append(u, &conformance::event(u, &format!("a{v}"), v as u32), 1).await.unwrap()
            else {
                panic!("a window of one is full at once")
            };
            assert_eq!(store.apply(u, &w.id, v, "d", &ids, "m").await.unwrap(), ApplyOutcome::Applied(v + 1));
            windows.push(w.id);
        }
        assert_eq!(store.apply(u, &windows[2], 0, "d", &ids, "m").await.unwrap(), ApplyOutcome::AlreadyApplied(3));
        assert_eq!(store.apply(u, &windows[1], 0, "d", &ids, "m").await.unwrap(), ApplyOutcome::AlreadyApplied(2));
        // Beyond the bound a very old window is no longer recognised; CAS still protects it.
        assert_eq!(store.apply(u, &windows[0], 0, "d", &ids, "m").await.unwrap(), ApplyOutcome::Conflict(3));
    }
}
