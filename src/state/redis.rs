//! Redis `StateStore`: every multi-step change is one Lua script (atomic, Cluster-safe thanks
//! to the per-user hash tag); never WATCH/MULTI, which is unsound on the shared multiplexed
//! connection. Scripts go through `redis::Script` (EVALSHA, reloaded after `SCRIPT FLUSH` or a
//! server restart). Layout: see `crate::state`.

pub use super::connection::RedisTls;
use super::connection::{is_transient, Conn};
use super::{
    check_append, now_rfc3339, AppendOutcome, ApplyOutcome, Description, FailOutcome, ParkedWindow, StateError,
    StateStore, DEFAULT_APPLIED_CAP, DEFAULT_SEEN_CAP,
};
use crate::event::Event;
use crate::window::Window;
use ::redis::{Cmd, FromRedisValue, RedisResult, Script};
use serde::Deserialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// Helpers shared by the claiming scripts; Redis scripts cannot import each other.
const CLAIM_LUA: &str = include_str!("claim.lua");
const APPEND_LUA: &str = include_str!("append.lua");
const TAKE_LUA: &str = include_str!("take.lua");
const APPLY_LUA: &str = include_str!("apply.lua");
const FAIL_LUA: &str = include_str!("fail.lua");

/// Every key suffix of a user (what `forget` deletes).
const SUFFIXES: [&str; 8] = ["desc", "pending", "seen", "seq", "inflight", "attempts", "applied", "parked"];

/// `pref:{<user>}:<suffix>`. Injective even for ids containing braces: suffixes hold no `}:`.
/// The live namespace.
pub const NAMESPACE: &str = "pref";

/// A key of the live namespace: `pref:{<user>}:<suffix>`.
pub fn key(user: &str, suffix: &str) -> String {
    ns_key(NAMESPACE, user, suffix)
}

fn ns_key(ns: &str, user: &str, suffix: &str) -> String {
    format!("{ns}:{{{user}}}:{suffix}")
}

struct Scripts {
    append: Script,
    take: Script,
    apply: Script,
    fail: Script,
}

#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    scripts: Arc<Scripts>,
    seen_cap: usize,
    applied_cap: usize,
    /// Key prefix: `pref` for the live state; replays stage into their own namespace.
    namespace: String,
    /// Replicas that must hold each write before it counts as done (WAIT); 0: the primary's
    /// acknowledgement is enough.
    wait_replicas: usize,
}

/// How long one WAIT may block; under the client's 0.5 s response timeout.
const WAIT_TIMEOUT_MS: u64 = 400;

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("seen_cap", &self.seen_cap).field("applied_cap", &self.applied_cap).finish()
    }
}

/// What the scripts store for a claimed window (inflight) and a parked one.
#[derive(Deserialize)]
struct StoredWindow {
    seq: u64,
    /// Claim time, ms since the epoch (server clock); 0 for claims made before it was recorded.
    #[serde(default)]
    at: u64,
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct StoredParked {
    reason: String,
    attempts: u32,
    seq: u64,
    events: Vec<Event>,
}

impl RedisStore {
    /// Connect (e.g. `redis://127.0.0.1:6379/`); fails if the server is unreachable.
    pub async fn connect(url: &str) -> Result<Self, StateError> {
        Self::open(url, &RedisTls::default(), false).await
    }

    /// Connect with TLS files for a `rediss://` URL. A failed handshake (wrong CA, a missing
    /// client certificate) is an error that names the flag to fix.
    pub async fn connect_with(url: &str, tls: &RedisTls) -> Result<Self, StateError> {
        Self::open(url, tls, false).await
    }

    /// Connect to one server, or to a Redis Cluster when `cluster` is set or `url` lists
    /// several comma-separated seed nodes (`redis://a:7000,redis://b:7001`).
    pub async fn open(url: &str, tls: &RedisTls, cluster: bool) -> Result<Self, StateError> {
        let conn = Conn::open(url, tls, cluster).await?;
        Ok(Self {
            conn,
            scripts: Arc::new(Scripts {
                append: Script::new(&format!("{CLAIM_LUA}\n{APPEND_LUA}")),
                take: Script::new(&format!("{CLAIM_LUA}\n{TAKE_LUA}")),
                apply: Script::new(APPLY_LUA),
                fail: Script::new(FAIL_LUA),
            }),
            seen_cap: DEFAULT_SEEN_CAP,
            applied_cap: DEFAULT_APPLIED_CAP,
            namespace: NAMESPACE.to_string(),
            wait_replicas: 0,
        })
    }

    /// Each write waits until `n` replicas have it (`WAIT n`), so a failover that promotes a
    /// replica cannot lose an accepted event or an applied description. While a primary has
    /// fewer replicas, writes to its users fail and are retried (durability over
    /// availability, as Kafka's `min.insync.replicas` with `acks=all`).
    pub fn with_wait_replicas(mut self, n: usize) -> Self {
        self.wait_replicas = n;
        self
    }

    /// With `wait_replicas`, waits until that many replicas acknowledged every write made so
    /// far on the connection to `key`'s primary.
    async fn replicated(&self, key: &str) -> Result<(), StateError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let cmd = &::redis::cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT_MS).clone();
        let acked: usize = self.retry(|mut c| async move { c.on_primary_of(key, cmd).await }).await?;
        if acked < self.wait_replicas {
            let detail = format!("{acked} of {} replicas acknowledged within {WAIT_TIMEOUT_MS} ms", self.wait_replicas);
            return Err(::redis::RedisError::from((::redis::ErrorKind::Io, "write not replicated", detail)).into());
        }
        Ok(())
    }

    /// One round trip (for `prefstream check`): the server's answer and version, and on a
    /// Cluster how many primaries serve its slots.
    pub async fn ping(&self) -> Result<String, StateError> {
        let pong: String = self.query(&::redis::cmd("PING")).await?;
        // On a Cluster, INFO goes to every node: ask the first primary alone.
        let primaries = self.retry(|mut c| async move { c.primaries().await }).await?;
        let first = primaries.first();
        let info = &::redis::cmd("INFO").arg("server").clone();
        let info: String = self.retry(|mut c| async move { c.on_node(first, info).await }).await?;
        let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?").trim().to_string();
        if !self.conn.is_cluster() {
            return Ok(format!("{pong}, redis {version}"));
        }
        Ok(format!("{pong}, redis {version}, cluster of {} primaries", primaries.len()))
    }

    /// The same server under another key prefix (a replay's staging area). The hash tag stays
    /// the user id, so a user's live and staged keys share a slot.
    pub fn with_namespace(&self, namespace: &str) -> Self {
        Self { namespace: namespace.to_string(), ..self.clone() }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn key(&self, user: &str, suffix: &str) -> String {
        ns_key(&self.namespace, user, suffix)
    }

    /// Every key matching `pattern`, sorted: SCAN on the one server, or on each primary of a
    /// Cluster. A key that moves during a slot migration may be seen twice (deduplicated) or,
    /// rarely, missed; the callers (recovery, staging) run again.
    async fn scan_keys(&self, pattern: &str) -> Result<Vec<String>, StateError> {
        let nodes: Vec<Option<(String, u16)>> = if self.conn.is_cluster() {
            self.retry(|mut c| async move { c.primaries().await }).await?.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        let mut keys = Vec::new();
        for node in &nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
                let cmd = &cmd;
                let (next, page): (u64, Vec<String>) =
                    self.retry(|mut c| async move { c.on_node(node.as_ref(), cmd).await }).await?;
                keys.extend(page);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys.dedup(); // SCAN may return a key twice
        Ok(keys)
    }

    /// The user and suffix of one of this namespace's keys.
    fn split_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        key.strip_prefix(self.namespace.as_str())?.strip_prefix(":{")?.rsplit_once("}:")
    }

    /// Users of this namespace that have a `suffix` key, sorted.
    pub async fn users_with(&self, suffix: &str) -> Result<Vec<String>, StateError> {
        let keys = self.scan_keys(&format!("{}:{{*}}:{suffix}", self.namespace)).await?;
        let mut users: Vec<String> = keys
            .iter()
            .filter_map(|k| self.split_key(k))
            .filter(|(_, s)| *s == suffix)
            .map(|(u, _)| u.to_string())
            .collect();
        users.dedup();
        Ok(users)
    }

    /// Whether every id is in the user's dedupe memory (a replay asks: did I read the events
    /// the live description came from?).
    pub async fn has_seen(&self, user: &str, ids: &[String]) -> Result<bool, StateError> {
        if ids.is_empty() {
            return Ok(true);
        }
        let mut cmd = ::redis::cmd("ZMSCORE");
        cmd.arg(self.key(user, "seen")).arg(ids);
        let scores: Vec<Option<f64>> = self.query(&cmd).await?;
        Ok(scores.iter().all(Option::is_some))
    }

    /// Deletes every key of this namespace (a finished replay's staging area). Refuses the
    /// live namespace.
    pub async fn clear_namespace(&self) -> Result<u64, StateError> {
        if self.namespace == NAMESPACE {
            return Err(StateError::Invalid("refusing to clear the live namespace".into()));
        }
        // One DEL per user: a user's keys share a slot, so this is Cluster-safe too.
        let mut by_user: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
        let keys = self.scan_keys(&format!("{}:*", self.namespace)).await?;
        for k in &keys {
            if let Some((user, _)) = self.split_key(k) {
                by_user.entry(user).or_default().push(k);
            }
        }
        let mut deleted = 0;
        for keys in by_user.values() {
            deleted += self.query::<u64>(::redis::cmd("DEL").arg(keys)).await?;
        }
        Ok(deleted)
    }

    /// `apply` without the claim requirement: an operator's (or a rebuild's) write of a
    /// description that no claimed window produced. Still a compare-and-set, idempotent per id.
    pub async fn apply_unclaimed(
        &self,
        user: &str,
        id: &str,
        expected_version: u64,
        description: &str,
        event_ids: &[String],
        model: &str,
    ) -> Result<ApplyOutcome, StateError> {
        self.apply_with(user, id, expected_version, description, event_ids, model, false).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply_with(
        &self,
        user: &str,
        window_id: &str,
        expected_version: u64,
        description: &str,
        event_ids: &[String],
        model: &str,
        require_claim: bool,
    ) -> Result<ApplyOutcome, StateError> {
        let keys = self.keys(user, &["desc", "applied", "inflight", "attempts", "parked"]);
        let ids = serde_json::to_string(event_ids).map_err(|e| StateError::Invalid(e.to_string()))?;
        let args = [
            window_id.to_string(),
            expected_version.to_string(),
            description.to_string(),
            ids,
            model.to_string(),
            now_rfc3339(),
            self.applied_cap.to_string(),
            if require_claim { "1" } else { "0" }.to_string(),
        ];
        let reply = self.script(&self.scripts.apply, &keys, &args).await?;
        match reply.first().map(String::as_str) {
            Some("applied") => Ok(ApplyOutcome::Applied(number(user, &reply)?)),
            Some("already") => Ok(ApplyOutcome::AlreadyApplied(number(user, &reply)?)),
            Some("unclaimed") => Ok(ApplyOutcome::NotClaimed),
            Some("conflict") => Ok(ApplyOutcome::Conflict(number(user, &reply)?)),
            _ => Err(corrupt(user, format!("unexpected apply reply {reply:?}"))),
        }
    }

    /// A user's claimed windows with their claim times, oldest claim first.
    async fn claims(&self, user: &str) -> Result<Vec<(u64, Window)>, StateError> {
        let h: HashMap<String, String> = self.query(::redis::cmd("HGETALL").arg(self.key(user, "inflight"))).await?;
        let mut v = Vec::with_capacity(h.len());
        for (id, body) in &h {
            let s: StoredWindow =
                serde_json::from_str(body).map_err(|e| corrupt(user, format!("stored window: {e}")))?;
            let w = Window::new(user, s.events);
            if &w.id != id {
                return Err(corrupt(user, format!("inflight window {id} holds events of {}", w.id)));
            }
            v.push((s.seq, s.at, w));
        }
        v.sort_by_key(|(seq, _, _)| *seq);
        Ok(v.into_iter().map(|(_, at, w)| (at, w)).collect())
    }

    /// Bounds of the per-user dedupe (event ids) and applied (window ids) memories.
    pub fn with_caps(mut self, seen_cap: usize, applied_cap: usize) -> Self {
        self.seen_cap = seen_cap.max(1);
        self.applied_cap = applied_cap.max(1);
        self
    }

    /// Run `op`, retrying once after a connection error: the first call after the server
    /// dropped the connection fails, and makes the manager reconnect (or the Cluster client
    /// refresh its slot map) for the next one.
    /// If the first run did land before the connection dropped, the retry sees its effect:
    /// append reports `Duplicate` (a window it claimed stays inflight, re-driven through
    /// `inflight()`/`recover()`), apply reports `AlreadyApplied`, fail counts one more attempt.
    async fn retry<T, F, Fut>(&self, op: F) -> Result<T, StateError>
    where
        F: Fn(Conn) -> Fut + Send + Sync,
        Fut: Future<Output = RedisResult<T>> + Send,
        T: Send,
    {
        match op(self.conn.clone()).await {
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "redis call failed; retrying once after reconnect");
                Ok(op(self.conn.clone()).await?)
            }
            r => Ok(r?),
        }
    }

    async fn query<T: FromRedisValue + Send>(&self, cmd: &Cmd) -> Result<T, StateError> {
        self.retry(|mut c| async move { cmd.query_async::<T>(&mut c).await }).await
    }

    async fn script(&self, script: &Script, keys: &[String], args: &[String]) -> Result<Vec<String>, StateError> {
        let reply = self
            .retry(|mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                for a in args {
                    inv.arg(a);
                }
                inv.invoke_async::<Vec<String>>(&mut c).await
            })
            .await?;
        if let Some(key) = keys.first() {
            self.replicated(key).await?;
        }
        Ok(reply)
    }

    fn keys(&self, user: &str, suffixes: &[&str]) -> Vec<String> {
        suffixes.iter().map(|s| self.key(user, s)).collect()
    }

    /// Turn a script's `{'full', id, body}` into a window, checking that Lua and Rust agree
    /// on the window id.
    fn claimed(user: &str, reply: &[String]) -> Result<Window, StateError> {
        let [_, id, body] = reply else {
            return Err(corrupt(user, format!("unexpected claim reply {reply:?}")));
        };
        let w = window_from(user, body)?.1;
        if &w.id != id {
            return Err(corrupt(user, format!("window id mismatch: script {id}, events {}", w.id)));
        }
        Ok(w)
    }
}

fn corrupt(user: &str, detail: impl Into<String>) -> StateError {
    StateError::Corrupt { user: user.to_string(), detail: detail.into() }
}

/// A window as stored in Redis (`{seq, events}` JSON) read back; anything else is `Corrupt`.
pub fn window_from(user: &str, body: &str) -> Result<(u64, Window), StateError> {
    let s: StoredWindow = serde_json::from_str(body).map_err(|e| corrupt(user, format!("stored window: {e}")))?;
    Ok((s.seq, Window::new(user, s.events)))
}

fn number<T: std::str::FromStr>(user: &str, reply: &[String]) -> Result<T, StateError> {
    reply.get(1).and_then(|s| s.parse().ok()).ok_or_else(|| corrupt(user, format!("unexpected script reply {reply:?}")))
}

#[async_trait::async_trait]
impl StateStore for RedisStore {
    async fn append(&self, user: &str, event: &Event, window_size: usize) -> Result<AppendOutcome, StateError> {
        check_append(user, event, window_size)?;
        let keys = self.keys(user, &["pending", "seen", "seq", "inflight"]);
        let args = [event.event_id.clone(), event.to_json(), window_size.to_string(), self.seen_cap.to_string()];
        let reply = self.script(&self.scripts.append, &keys, &args).await?;
        match reply.first().map(String::as_str) {
            Some("dup") => Ok(AppendOutcome::Duplicate),
            Some("pending") => Ok(AppendOutcome::Pending(number(user, &reply)?)),
            Some("full") => Ok(AppendOutcome::Full(Self::claimed(user, &reply)?)),
            _ => Err(corrupt(user, format!("unexpected append reply {reply:?}"))),
        }
    }

    async fn take_partial(&self, user: &str, max: usize) -> Result<Option<Window>, StateError> {
        if max == 0 {
            return Err(StateError::Invalid("take_partial needs max >= 1".into()));
        }
        let keys = self.keys(user, &["pending", "seq", "inflight"]);
        let reply = self.script(&self.scripts.take, &keys, &[max.to_string()]).await?;
        match reply.first().map(String::as_str) {
            Some("empty") => Ok(None),
            Some("full") => Ok(Some(Self::claimed(user, &reply)?)),
            _ => Err(corrupt(user, format!("unexpected take reply {reply:?}"))),
        }
    }

    async fn pending_len(&self, user: &str) -> Result<usize, StateError> {
        self.query(::redis::cmd("LLEN").arg(self.key(user, "pending"))).await
    }

    async fn current(&self, user: &str) -> Result<Option<Description>, StateError> {
        let h: HashMap<String, String> = self.query(::redis::cmd("HGETALL").arg(self.key(user, "desc"))).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| h.get(name).cloned().ok_or_else(|| corrupt(user, format!("desc lacks {name}")));
        Ok(Some(Description {
            version: field("version")?.parse().map_err(|e| corrupt(user, format!("desc version: {e}")))?,
            description: field("description")?,
            event_ids: serde_json::from_str(&field("event_ids")?)
                .map_err(|e| corrupt(user, format!("desc event_ids: {e}")))?,
            updated_at: field("updated_at")?,
            model: field("model")?,
        }))
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
        self.apply_with(user, window_id, expected_version, description, event_ids, model, true).await
    }

    async fn applied_version(&self, user: &str, window_id: &str) -> Result<Option<u64>, StateError> {
        let v: Option<f64> = self.query(::redis::cmd("ZSCORE").arg(self.key(user, "applied")).arg(window_id)).await?;
        Ok(v.map(|v| v as u64))
    }

    async fn complete(&self, user: &str, window_id: &str) -> Result<(), StateError> {
        // apply.lua already dropped the window's attempt count.
        let key = self.key(user, "inflight");
        let _: i64 = self.query(::redis::cmd("HDEL").arg(&key).arg(window_id)).await?;
        self.replicated(&key).await?;
        Ok(())
    }

    async fn fail(
        &self,
        user: &str,
        window_id: &str,
        reason: &str,
        max_retries: u32,
    ) -> Result<FailOutcome, StateError> {
        let keys = self.keys(user, &["inflight", "attempts", "parked"]);
        let args = [window_id.to_string(), reason.to_string(), max_retries.to_string()];
        let reply = self.script(&self.scripts.fail, &keys, &args).await?;
        match reply.first().map(String::as_str) {
            Some("gone") => Ok(FailOutcome::NotInflight),
            Some("retry") => Ok(FailOutcome::Retry(number(user, &reply)?)),
            Some("parked") => Ok(FailOutcome::Parked),
            _ => Err(corrupt(user, format!("unexpected fail reply {reply:?}"))),
        }
    }

    async fn inflight(&self, user: &str) -> Result<Vec<Window>, StateError> {
        Ok(self.claims(user).await?.into_iter().map(|(_, w)| w).collect())
    }

    async fn recover(&self, min_age: std::time::Duration) -> Result<Vec<Window>, StateError> {
        let (secs, micros): (u64, u64) = self.query(&::redis::cmd("TIME")).await?;
        let cutoff = (secs * 1000 + micros / 1000).saturating_sub(min_age.as_millis() as u64);
        let mut out = Vec::new();
        for u in self.users_with("inflight").await? {
            out.extend(self.claims(&u).await?.into_iter().filter(|(at, _)| *at <= cutoff).map(|(_, w)| w));
        }
        Ok(out)
    }

    async fn parked(&self, user: &str) -> Result<Vec<ParkedWindow>, StateError> {
        let h: HashMap<String, String> = self.query(::redis::cmd("HGETALL").arg(self.key(user, "parked"))).await?;
        let mut v = Vec::with_capacity(h.len());
        for body in h.values() {
            let p: StoredParked =
                serde_json::from_str(body).map_err(|e| corrupt(user, format!("parked window: {e}")))?;
            let window = Window::new(user, p.events);
            v.push((p.seq, ParkedWindow { window, reason: p.reason, attempts: p.attempts }));
        }
        v.sort_by_key(|(seq, _)| *seq);
        Ok(v.into_iter().map(|(_, p)| p).collect())
    }

    async fn forget(&self, user: &str) -> Result<(), StateError> {
        // One DEL of same-slot keys: atomic, and Cluster-safe thanks to the hash tag.
        let mut cmd = ::redis::cmd("DEL");
        for k in self.keys(user, &SUFFIXES) {
            cmd.arg(k);
        }
        let _: i64 = self.query(&cmd).await?;
        self.replicated(&self.key(user, "desc")).await
    }
}
