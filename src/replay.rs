//! `prefstream replay`: re-derive descriptions from a range of the event log. A replay is the
//! live pipeline (same validation, windows, window ids, retries, compare-and-set) fed by a
//! bounded reader instead of the consumer group, with a mode-specific store and sink:
//!
//! - `DryRun`: an in-memory store, nothing published; at the end each user's result is compared
//!   with the live description. Writes nothing anywhere (but the report).
//! - `Write`: the live store and the live updates topic. Events live already took are
//!   duplicates and change nothing; events it missed (lost Redis state, a bug since fixed) are
//!   windowed and applied under the live version rules.
//! - `Rebuild`: the selected users start from no description in a staging namespace
//!   (`replay:<id>`); at the end each user's staged description is swapped into the live key
//!   with one compare-and-set and published — unless the live description was derived from
//!   events the replay did not read (newer), which needs `force`.
//!
//! A checkpoint file (the contiguous done offsets per partition, as the live consumer commits
//! them) lets a killed replay resume: the staged state is in Redis, and windows it had claimed
//! are re-driven by the pipeline's recovery.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::engine::Inferencer;
use crate::kafka::reader::{spawn_reader, Range, ReaderConfig};
use crate::kafka::{KafkaClient, KafkaSink};
use crate::offsets::OffsetTracker;
use crate::pipeline::{self, Context, DeadLetter, PipelineConfig, Sink, SinkError, Update};
use crate::service::Topics;
use crate::state::memory::MemoryStore;
use crate::state::redis::RedisStore;
use crate::state::{ApplyOutcome, Description, StateStore};
use crate::telemetry::{Health, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    DryRun,
    Write,
    Rebuild,
}

pub struct ReplayConfig {
    pub kafka: KafkaClient,
    pub topics: Topics,
    pub range: Range,
    pub mode: Mode,
    pub force: bool,
    pub users: Option<HashSet<String>>,
    pub max_events_per_sec: Option<f64>,
    pub checkpoint: Option<PathBuf>,
    /// Names the staging namespace; kept in the checkpoint so a resume finds its state.
    pub id: String,
    pub pipeline: PipelineConfig,
    pub idle_end: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    id: String,
    mode: Mode,
    topic: String,
    /// Partition → next offset to read.
    positions: HashMap<i32, i64>,
    /// The read finished (only the final steps remain).
    done: bool,
}

fn load_checkpoint(path: &PathBuf) -> anyhow::Result<Option<Checkpoint>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// Write-then-rename, so a kill never leaves half a checkpoint.
fn save_checkpoint(path: &PathBuf, c: &Checkpoint) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(c).expect("checkpoint serializes"))?;
    std::fs::rename(tmp, path)
}

/// One user's outcome, in the report (the first few).
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub user: String,
    pub before: Option<String>,
    pub after: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub id: String,
    pub mode: Option<Mode>,
    pub resumed: bool,
    pub events_read: u64,
    pub events_skipped: u64,
    pub users: usize,
    pub windows_applied: u64,
    pub windows_parked: u64,
    pub dead_letters: u64,
    /// Users whose description differs (dry run: would differ) from the live one.
    pub descriptions_changed: usize,
    pub descriptions_unchanged: usize,
    /// Rebuild: users left alone because the live description is newer than the replay.
    pub skipped_newer: usize,
    pub swapped: usize,
    pub errors: Vec<String>,
    pub seconds: f64,
    pub changes: Vec<Change>,
}

impl ReplayReport {
    pub fn summary(&self) -> String {
        format!(
            "replay {} ({:?}{}): {} events read ({} skipped), {} users, {} windows applied, {} parked, \
             {} dead letters; descriptions changed {}, unchanged {}, swapped {}, skipped (live newer) {}; \
             {} errors; {:.1} s",
            self.id,
            self.mode.unwrap_or(Mode::DryRun),
            if self.resumed { ", resumed" } else { "" },
            self.events_read,
            self.events_skipped,
            self.users,
            self.windows_applied,
            self.windows_parked,
            self.dead_letters,
            self.descriptions_changed,
            self.descriptions_unchanged,
            self.swapped,
            self.skipped_newer,
            self.errors.len(),
            self.seconds
        )
    }
}

/// Publishes only in `Write` mode; dead letters were published by the live service already,
/// so a replay counts them and moves on.
struct ReplaySink {
    live: Option<KafkaSink>,
    dead: AtomicU64,
}

#[async_trait::async_trait]
impl Sink for ReplaySink {
    async fn publish_update(&self, update: &Update) -> Result<(), SinkError> {
        match &self.live {
            Some(s) => s.publish_update(update).await,
            None => Ok(()),
        }
    }

    async fn tombstone(&self, user: &str) -> Result<(), SinkError> {
        match &self.live {
            Some(s) => s.tombstone(user).await,
            None => Ok(()),
        }
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), SinkError> {
        self.dead.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(partition = letter.partition, offset = letter.offset, reason = %letter.reason, "bad record skipped");
        Ok(())
    }
}

/// Runs a replay to the end of its range (or until `shutdown`), then compares or swaps.
pub async fn run(
    mut cfg: ReplayConfig,
    live: RedisStore,
    inferencer: Arc<dyn Inferencer>,
    shutdown: watch::Receiver<bool>,
    progress: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let mut report = ReplayReport { mode: Some(cfg.mode), ..Default::default() };
    cfg.pipeline.apply_forgets = cfg.mode != Mode::Write;
    if cfg.mode == Mode::DryRun {
        cfg.checkpoint = None; // a dry run writes nothing but its report; it is not resumable
    }
    let previous = match &cfg.checkpoint {
        Some(path) => load_checkpoint(path)?,
        None => None,
    };
    if let Some(c) = &previous {
        anyhow::ensure!(
            c.mode == cfg.mode && c.topic == cfg.topics.events,
            "checkpoint is for a {:?} replay of {}; remove it to start over",
            c.mode,
            c.topic
        );
        cfg.id = c.id.clone();
        report.resumed = true;
        for (p, o) in &c.positions {
            cfg.range.start.insert(*p, *o);
        }
    }
    report.id = cfg.id.clone();
    let staging = live.with_namespace(&format!("replay:{}", cfg.id));
    let store: Arc<dyn StateStore> = match cfg.mode {
        Mode::DryRun => Arc::new(MemoryStore::new()),
        Mode::Write => Arc::new(live.clone()),
        Mode::Rebuild => Arc::new(staging.clone()),
    };
    let sink = Arc::new(ReplaySink {
        live: match cfg.mode {
            Mode::Write => Some(KafkaSink::new(&cfg.kafka, &cfg.topics.events, &cfg.topics.updates, &cfg.topics.dlq)?),
            _ => None,
        },
        dead: AtomicU64::new(0),
    });
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let ctx = Arc::new(Context {
        store: store.clone(),
        inferencer,
        sink: sink.clone(),
        metrics: metrics.clone(),
        health,
        descriptions: pipeline::DescriptionCache::new(cfg.pipeline.description_cache),
        config: cfg.pipeline.clone(),
        shutdown: shutdown.clone(),
    });

    let read_done = previous.as_ref().is_some_and(|c| c.done);
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let mut users_read = HashSet::new();
    if !read_done {
        let (tx, rx) = mpsc::channel(4096);
        let (recover_tx, recover_rx) = mpsc::unbounded_channel();
        // Windows a killed run had claimed in the staging namespace are re-driven.
        let _ = recover_tx.send(());
        let reader = spawn_reader(
            &cfg.kafka,
            ReaderConfig {
                topic: cfg.topics.events.clone(),
                range: cfg.range.clone(),
                users: cfg.users.clone(),
                max_per_sec: cfg.max_events_per_sec,
                idle_end: cfg.idle_end,
            },
            tracker.clone(),
            tx,
            shutdown.clone(),
            progress,
        )?;
        // Dry runs have no checkpoint (cleared above).
        let saver = cfg.checkpoint.clone().map(|path| {
            let template = Checkpoint {
                id: cfg.id.clone(),
                mode: cfg.mode,
                topic: cfg.topics.events.clone(),
                positions: HashMap::new(),
                done: false,
            };
            Arc::new(CheckpointSaver { path, template, tracker: tracker.clone(), base: cfg.range.start.clone() })
        });
        let checkpointer = saver.clone().map(|saver| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Err(e) = saver.save(false) {
                        tracing::warn!(error = %e, "cannot write the checkpoint");
                    }
                }
            })
        });
        drop(recover_tx);
        let result = pipeline::run(ctx.clone(), rx, recover_rx).await;
        if let Some(c) = checkpointer {
            c.abort();
        }
        let stats = tokio::task::spawn_blocking(move || reader.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the replay reader panicked"))?;
        result?;
        report.events_read = stats.read;
        report.events_skipped = stats.skipped;
        users_read = stats.users;
        if *shutdown.borrow() {
            // Stopped early: keep the checkpoint where the durable prefix ends.
            if let Some(saver) = &saver {
                saver.save(false)?;
            }
            anyhow::bail!("replay stopped before the end of its range; run the same command to resume");
        }
        if let Some(saver) = &saver {
            saver.save(true)?;
        }
    }
    report.windows_applied = metrics.windows.with_label_values(&["applied"]).get();
    report.windows_parked = metrics.windows.with_label_values(&["parked"]).get();
    report.dead_letters = sink.dead.load(Ordering::Relaxed);

    match cfg.mode {
        Mode::Write => report.users = users_read.len(),
        Mode::DryRun => {
            let mut users: Vec<String> = users_read.into_iter().collect();
            users.sort();
            report.users = users.len();
            for user in users {
                let (Some(after), before) = (store.current(&user).await?, live.current(&user).await?) else { continue };
                tally(&mut report, &user, before.as_ref(), &after);
            }
        }
        Mode::Rebuild => {
            let users = staging.users_with("desc").await?;
            report.users = users.len();
            let kafka = KafkaSink::new(&cfg.kafka, &cfg.topics.events, &cfg.topics.updates, &cfg.topics.dlq)?;
            // The staged descriptions are this replay's model's: its template goes out with them.
            let template = ctx.inferencer.model().template;
            for user in users {
                if let Err(e) = swap(&cfg, &live, &staging, &kafka, &template, &user, &mut report).await {
                    report.errors.push(format!("{user}: {e:#}"));
                }
            }
            kafka.flush(Duration::from_secs(10));
            // Skipped users and users without a full window leave staged keys behind.
            if report.errors.is_empty() {
                staging.clear_namespace().await?;
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Writes the checkpoint: the tracker's contiguous done position per partition of the range
/// (the range's start where nothing was taken yet).
struct CheckpointSaver {
    path: PathBuf,
    template: Checkpoint,
    tracker: Arc<Mutex<OffsetTracker>>,
    base: HashMap<i32, i64>,
}

impl CheckpointSaver {
    fn save(&self, done: bool) -> std::io::Result<()> {
        let positions = {
            let t = self.tracker.lock().expect("tracker");
            self.base.iter().map(|(p, start)| (*p, t.position(*p).unwrap_or(*start))).collect()
        };
        save_checkpoint(&self.path, &Checkpoint { positions, done, ..self.template.clone() })
    }
}

fn tally(report: &mut ReplayReport, user: &str, before: Option<&Description>, after: &Description) {
    if before.is_some_and(|b| b.description == after.description) {
        report.descriptions_unchanged += 1;
    } else {
        report.descriptions_changed += 1;
        if report.changes.len() < 20 {
            report.changes.push(Change {
                user: user.to_string(),
                before: before.map(|b| b.description.clone()),
                after: after.description.clone(),
            });
        }
    }
}

/// Moves one user's staged description into the live key (one compare-and-set), publishes
/// it, and clears the staging keys.
async fn swap(
    cfg: &ReplayConfig,
    live: &RedisStore,
    staging: &RedisStore,
    sink: &KafkaSink,
    template: &str,
    user: &str,
    report: &mut ReplayReport,
) -> anyhow::Result<()> {
    let Some(staged) = staging.current(user).await? else { return Ok(()) };
    let window_id = format!("rebuild:{}", cfg.id);
    for _ in 0..3 {
        let current = live.current(user).await?;
        if let Some(c) = &current {
            // Newer = derived from events this replay never read.
            if !cfg.force
                && !staging.has_seen(user, &c.event_ids).await?
                && live.applied_version(user, &window_id).await?.is_none()
            {
                report.skipped_newer += 1;
                return Ok(());
            }
        }
        let expected = current.as_ref().map_or(0, |d| d.version);
        let version = match live
            .apply_unclaimed(user, &window_id, expected, &staged.description, &staged.event_ids, &staged.model)
            .await?
        {
            ApplyOutcome::Applied(v) | ApplyOutcome::AlreadyApplied(v) => v,
            ApplyOutcome::Conflict(_) | ApplyOutcome::NotClaimed => continue, // live moved meanwhile: decide again
        };
        tally(report, user, current.as_ref(), &staged);
        let (name, version_label) = staged.model.split_once('@').unwrap_or((&staged.model, ""));
        let update = Update {
            schema_version: 1,
            user_id: user.to_string(),
            version,
            previous_version: version - 1,
            description: staged.description.clone(),
            reasoning: None,
            event_ids: staged.event_ids.clone(),
            model: crate::engine::ModelRef {
                name: name.to_string(),
                version: version_label.to_string(),
                template: template.to_string(),
            },
            first_event_ts: None,
            last_event_ts: None,
            produced_at: crate::state::now_rfc3339(),
        };
        sink.publish_update(&update).await?;
        staging.forget(user).await?;
        report.swapped += 1;
        return Ok(());
    }
    anyhow::bail!("the live description kept changing during the swap")
}
