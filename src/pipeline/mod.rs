//! Wires the stages: records (from any source) → ingest lanes (validate, dead-letter, append to
//! the per-user window) → window scheduler (one window at a time per user, inference, compare-
//! and-set, publish) → sink. Knows neither Kafka nor ONNX: the source hands in `Record`s with an
//! `Ack`, the model sits behind `engine::Inferencer`, publishing behind `Sink`.
//!
//! Delivery: a record is acked (its offset may be committed) once its effect is durable in the
//! state store — appended to a pending window (a full window is claimed in the same atomic step,
//! so a crash re-drives it from the store) or, for bad input, once the dead letter is published.
//! Everything after the claim is idempotent per window id.

mod ingest;
mod windows;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::engine::Inferencer;
pub use crate::engine::ModelRef;
use crate::offsets::OffsetTracker;
use crate::sampling::SamplingParams;
use crate::state::StateStore;
use crate::telemetry::{Health, Metrics};
use crate::window::WindowConfig;

pub use ingest::{classify, Verdict};
pub use windows::{process_window, WindowOutcome};

/// One message from the events topic.
#[derive(Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub ack: Ack,
}

/// Marks a record's effect durable in the source's offset tracker. Dropping it without `done`
/// leaves the offset uncommitted, so the record is delivered again after a restart.
#[derive(Debug, Default)]
pub struct Ack(Option<(Arc<Mutex<OffsetTracker>>, i32, i64)>);

impl Ack {
    pub fn new(tracker: Arc<Mutex<OffsetTracker>>, partition: i32, offset: i64) -> Self {
        Self(Some((tracker, partition, offset)))
    }

    /// For sources without offsets (files, replays).
    pub fn none() -> Self {
        Self(None)
    }

    pub fn done(self) {
        if let Some((tracker, partition, offset)) = self.0 {
            tracker.lock().expect("offset tracker lock").done(partition, offset);
        }
    }
}

/// The update published on the updates topic (`schemas/update.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub schema_version: u32,
    pub user_id: String,
    pub version: u64,
    pub previous_version: u64,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    pub event_ids: Vec<String>,
    pub model: ModelRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_event_ts: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_ts: Option<String>,
    pub produced_at: String,
}

/// A record that failed validation, as it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    /// The payload, truncated to the configured limit.
    pub payload: Vec<u8>,
    pub original_len: usize,
    pub reason: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where updates, tombstones and dead letters go. Each call returns once the write is
/// acknowledged (durable), or fails.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    async fn publish_update(&self, update: &Update) -> Result<(), SinkError>;
    /// A null-valued message keyed by the user: a compacted topic forgets them.
    async fn tombstone(&self, user: &str) -> Result<(), SinkError>;
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), SinkError>;
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub window: WindowConfig,
    /// Ingest lanes: records of one user always take the same lane (order kept), lanes run
    /// concurrently (Redis round trips overlap).
    pub lanes: usize,
    /// Records buffered per lane.
    pub lane_queue: usize,
    /// Windows inferred at once (the engine batches them).
    pub max_active_windows: usize,
    /// Windows waiting for inference before ingest blocks (backpressure).
    pub window_queue: usize,
    /// Invalid outputs retried this many times, then the window is parked.
    pub max_retries: u32,
    /// Larger payloads are dead-lettered.
    pub max_event_bytes: usize,
    /// Dead letters carry at most this much of the payload.
    pub dlq_max_bytes: usize,
    /// First attempt; retries sample with `SamplingParams::PAPER`.
    pub sampling: SamplingParams,
    pub seed: u64,
    /// How often claimed windows left by a crashed instance are looked for.
    pub recover_interval: Duration,
    /// How long shutdown waits for windows being inferred.
    pub shutdown_timeout: Duration,
    /// `false` in a write-mode replay: the live service already erased those users, and
    /// erasing again would delete state built after the forget.
    pub apply_forgets: bool,
    /// Users whose last written description is kept in memory (0: none).
    pub description_cache: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            window: WindowConfig::default(),
            lanes: 64,
            lane_queue: 256,
            max_active_windows: 32,
            window_queue: 1024,
            max_retries: 3,
            max_event_bytes: 1 << 20,
            dlq_max_bytes: 256 << 10,
            sampling: SamplingParams::PAPER,
            seed: 0,
            recover_interval: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            apply_forgets: true,
            description_cache: 100_000,
        }
    }
}

/// Everything the stages share.
pub struct Context {
    pub store: Arc<dyn StateStore>,
    pub inferencer: Arc<dyn Inferencer>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub config: PipelineConfig,
    /// `true` once shutdown begins.
    pub shutdown: watch::Receiver<bool>,
    pub descriptions: DescriptionCache,
}

/// The description this instance wrote last, per user, so the next window need not read it
/// back. Safe because the write is a compare-and-set on the version: a stale entry (another
/// writer, a forget) fails it, is dropped, and the window is inferred again on the stored one.
#[derive(Debug, Default)]
pub struct DescriptionCache {
    map: Mutex<std::collections::HashMap<String, (u64, String)>>,
    cap: usize,
}

impl DescriptionCache {
    pub fn new(cap: usize) -> Self {
        Self { map: Mutex::default(), cap }
    }

    fn get(&self, user: &str) -> Option<(u64, String)> {
        self.map.lock().expect("cache lock").get(user).cloned()
    }

    fn put(&self, user: &str, version: u64, description: &str) {
        if self.cap == 0 {
            return;
        }
        let mut map = self.map.lock().expect("cache lock");
        if map.len() >= self.cap && !map.contains_key(user) {
            map.clear(); // crude but bounded; misses only cost a read
        }
        map.insert(user.to_string(), (version, description.to_string()));
    }

    fn forget(&self, user: &str) {
        self.map.lock().expect("cache lock").remove(user);
    }
}

impl Context {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Why a stage gave up on an operation (the record or window stays unacked / in flight and is
/// redone after restart).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("shutting down before {0} succeeded")]
    Abandoned(&'static str),
    /// Retrying cannot help (corrupt state, an invalid argument): the caller gives up on this
    /// record or window, says why, and goes on.
    #[error("{0}")]
    Permanent(String),
    #[error("fatal: {0}")]
    Fatal(String),
}

/// Whether retrying an error can succeed.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for crate::state::StateError {
    fn is_transient(&self) -> bool {
        // Connection loss, failover (READONLY), BUSY scripts, OOM: all pass. Corrupt stored
        // data and invalid arguments do not.
        matches!(self, crate::state::StateError::Redis(_))
    }
}

impl Transient for SinkError {
    fn is_transient(&self) -> bool {
        true // broker outages end; librdkafka already retried within delivery.timeout.ms
    }
}

/// Retry a transient failure with capped exponential backoff until it succeeds; during
/// shutdown give up after `shutdown_timeout` (the work is redone after restart, never lost).
pub(crate) async fn retry<T, E: std::fmt::Display + Transient, F, Fut>(
    ctx: &Context,
    component: &'static str,
    mut op: F,
) -> Result<T, StageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(20);
    let mut stopping_since: Option<tokio::time::Instant> = None;
    loop {
        match op().await {
            Ok(v) => {
                health_flag(ctx, component, true);
                return Ok(v);
            }
            Err(e) if !e.is_transient() => return Err(StageError::Permanent(format!("{component}: {e}"))),
            Err(e) => {
                health_flag(ctx, component, false);
                ctx.metrics.retries.with_label_values(&[component]).inc();
                tracing::warn!(component, error = %e, retry_in_ms = delay.as_millis() as u64, "transient failure");
                if ctx.stopping() {
                    let since = *stopping_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= ctx.config.shutdown_timeout {
                        return Err(StageError::Abandoned(component));
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn health_flag(ctx: &Context, component: &str, ok: bool) {
    let flag = match component {
        "redis" => &ctx.health.redis,
        "kafka" => &ctx.health.kafka,
        _ => return,
    };
    flag.store(ok, std::sync::atomic::Ordering::Relaxed);
}

/// Counts at the end of a run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub records: u64,
    pub windows_started: u64,
}

/// Runs until `records` closes (the source stopped) and the window stage has drained (or the
/// shutdown timeout passed). `recover` asks for a recovery scan (on start and on each partition
/// assignment); one also runs every `recover_interval`.
pub async fn run(
    ctx: Arc<Context>,
    records: mpsc::Receiver<Record>,
    recover: mpsc::UnboundedReceiver<()>,
) -> Result<Summary, StageError> {
    let (jobs_tx, jobs_rx) = mpsc::channel(ctx.config.window_queue.max(1));
    let scheduler = tokio::spawn(windows::schedule(ctx.clone(), jobs_rx));
    let recovery = tokio::spawn(windows::recover_loop(ctx.clone(), jobs_tx.clone(), recover));
    let idle = ingest::new_idle();
    let flusher = ctx
        .config
        .window
        .idle
        .map(|after| tokio::spawn(ingest::idle_flush(ctx.clone(), jobs_tx.clone(), idle.clone(), after)));
    let records_seen = ingest::run_lanes(ctx.clone(), records, jobs_tx, idle).await?;
    recovery.abort();
    if let Some(flusher) = flusher {
        flusher.abort();
    }
    // The lanes and helper tasks held the last job senders: the scheduler now drains and ends.
    let windows_started = scheduler.await.map_err(|e| StageError::Fatal(format!("scheduler panicked: {e}")))??;
    Ok(Summary { records: records_seen, windows_started })
}
