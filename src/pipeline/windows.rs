//! The window stage: a scheduler that runs at most one job per user at a time (a user's windows
//! in claim order, a `forget` after the windows before it) and at most `max_active_windows`
//! overall; the per-window work (infer → compare-and-set → publish → complete); and the
//! recovery of windows a crashed instance claimed but never finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{retry, Ack, Context, StageError, Update};
use crate::engine::{EngineError, Request};
use crate::sampling::SamplingParams;
use crate::state::{ApplyOutcome, FailOutcome};
use crate::window::Window;

pub(super) enum Job {
    Window {
        window: Window,
        claimed: Instant,
        recovered: bool,
    },
    /// Acked once the user's state is deleted and the tombstone is published.
    Forget {
        user: String,
        ack: Ack,
    },
}

impl Job {
    fn user(&self) -> &str {
        match self {
            Job::Window { window, .. } => &window.user_id,
            Job::Forget { user, .. } => user,
        }
    }
}

#[derive(Default)]
struct Queues {
    per_user: HashMap<String, VecDeque<Job>>,
    /// Users with a job running.
    busy: HashSet<String>,
    /// Users not busy with jobs queued, in the order they became ready.
    ready: VecDeque<String>,
    /// Window ids queued or running (recovery must not start a second copy).
    known: HashSet<String>,
    queued: usize,
}

impl Queues {
    fn push(&mut self, job: Job) -> bool {
        if let Job::Window { window, .. } = &job {
            if !self.known.insert(window.id.clone()) {
                return false;
            }
        }
        let user = job.user().to_string();
        let q = self.per_user.entry(user.clone()).or_default();
        q.push_back(job);
        self.queued += 1;
        if q.len() == 1 && !self.busy.contains(&user) {
            self.ready.push_back(user);
        }
        true
    }

    /// The next runnable job, marking its user busy.
    fn pop(&mut self) -> Option<Job> {
        let user = self.ready.pop_front()?;
        let q = self.per_user.get_mut(&user)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.per_user.remove(&user);
        }
        self.queued -= 1;
        self.busy.insert(user);
        Some(job)
    }

    fn finished(&mut self, user: &str, window_id: Option<&str>) {
        self.busy.remove(user);
        if let Some(id) = window_id {
            self.known.remove(id);
        }
        if self.per_user.contains_key(user) {
            self.ready.push_back(user.to_string());
        }
    }
}

/// Runs until every job sender is gone and all jobs finished. Returns windows started.
pub(super) async fn schedule(ctx: Arc<Context>, mut jobs: mpsc::Receiver<Job>) -> Result<u64, StageError> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Option<String>, Result<(), StageError>)>();
    let mut q = Queues::default();
    let (mut active, mut started, mut open) = (0usize, 0u64, true);
    let max_active = ctx.config.max_active_windows.max(1);
    loop {
        while active < max_active {
            let Some(job) = q.pop() else { break };
            active += 1;
            let (ctx, done) = (ctx.clone(), done_tx.clone());
            let user = job.user().to_string();
            let wid = match &job {
                Job::Window { window, .. } => {
                    started += 1;
                    Some(window.id.clone())
                }
                Job::Forget { .. } => None,
            };
            tokio::spawn(async move {
                let r = run_job(&ctx, job).await;
                let _ = done.send((user, wid, r));
            });
        }
        ctx.metrics.windows_inflight.set((q.queued + active) as i64);
        if !open && active == 0 && q.queued == 0 {
            return Ok(started);
        }
        tokio::select! {
            job = jobs.recv(), if open && q.queued < ctx.config.window_queue.max(1) => match job {
                Some(job) => {
                    let recovered = matches!(job, Job::Window { recovered: true, .. });
                    if q.push(job) && recovered {
                        ctx.metrics.recovered_windows.inc();
                    }
                }
                None => open = false,
            },
            Some((user, wid, r)) = done_rx.recv() => {
                active -= 1;
                q.finished(&user, wid.as_deref());
                if let Err(StageError::Fatal(e)) = r {
                    return Err(StageError::Fatal(e));
                }
            }
        }
    }
}

async fn run_job(ctx: &Context, job: Job) -> Result<(), StageError> {
    match job {
        Job::Window { window, claimed, recovered } => {
            let outcome = match process_window(ctx, &window, recovered).await {
                Ok(o) => o,
                Err(StageError::Abandoned(_)) => WindowOutcome::Abandoned,
                Err(StageError::Permanent(e)) => {
                    // Left claimed for an operator (and the next recovery scan); logged loudly.
                    tracing::error!(user = %window.user_id, window = %window.id, error = %e, "window failed");
                    WindowOutcome::Failed
                }
                Err(e) => return Err(e),
            };
            ctx.metrics.windows.with_label_values(&[outcome.label()]).inc();
            if matches!(outcome, WindowOutcome::Applied(_)) {
                ctx.metrics.window_seconds.observe(claimed.elapsed().as_secs_f64());
            }
            Ok(())
        }
        Job::Forget { user, ack } => {
            ctx.descriptions.forget(&user);
            let forgotten = async {
                retry(ctx, "redis", || ctx.store.forget(&user)).await?;
                retry(ctx, "kafka", || ctx.sink.tombstone(&user)).await
            };
            match forgotten.await {
                Ok(()) => {
                    ctx.metrics.tombstones_published.inc();
                    tracing::info!(user, "user forgotten; tombstone published");
                }
                Err(StageError::Permanent(e)) => tracing::error!(user, error = %e, "forget failed"),
                Err(e) => return Err(e), // not acked: redelivered after restart
            }
            ack.done();
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowOutcome {
    /// A new description was written and published with this version.
    Applied(u64),
    /// The window had been applied before (a redelivery or a crash before publishing):
    /// the stored description was (re)published, the version did not move.
    AlreadyApplied(u64),
    /// Too many invalid outputs: parked in the store for an operator.
    Parked,
    /// Shutdown came first; the window stays claimed and is redone after restart.
    Abandoned,
    /// The claim was gone before the write (the user was forgotten meanwhile): dropped.
    Unclaimed,
    /// A permanent state error (logged); the window stays claimed.
    Failed,
}

impl WindowOutcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Applied(_) => "applied",
            Self::AlreadyApplied(_) => "already_applied",
            Self::Parked => "parked",
            Self::Abandoned => "abandoned",
            Self::Unclaimed => "unclaimed",
            Self::Failed => "failed",
        }
    }
}

/// Seed for a window's attempt: fixed by the window, so a replay decodes the same way.
/// (SHA-1 rather than std's hasher, whose output may change between Rust releases.)
fn seed_for(base: u64, window_id: &str, attempt: u32) -> u64 {
    let hex = crate::window::sha1_hex(format!("{base}:{window_id}:{attempt}").as_bytes());
    u64::from_str_radix(&hex[..16], 16).expect("sha1 hex")
}

/// Infer one claimed window and make its effect durable and visible: compare-and-set the new
/// description on the version it was conditioned on, publish the update, release the claim.
/// Invalid output keeps the previous description and is retried (sampling, a fresh seed per
/// attempt), then parked. A `recovered` window (claimed by an earlier run) is first checked for
/// having been applied already, so that it is re-published rather than inferred again; a fresh
/// claim cannot have been (apply.lua would say so anyway), which saves a round trip.
pub async fn process_window(ctx: &Context, window: &Window, recovered: bool) -> Result<WindowOutcome, StageError> {
    let (user, wid, cfg) = (window.user_id.as_str(), window.id.as_str(), &ctx.config);
    let model = ctx.inferencer.model();
    let ids = window.event_ids();
    let update = |version: u64, description: String, reasoning: Option<String>| Update {
        schema_version: 1,
        user_id: user.to_string(),
        version,
        previous_version: version - 1,
        description,
        reasoning,
        event_ids: ids.clone(),
        model: model.clone(),
        first_event_ts: window.events.first().map(|e| e.ts.clone()),
        last_event_ts: window.events.last().map(|e| e.ts.clone()),
        produced_at: crate::state::now_rfc3339(),
    };
    let mut attempt = 0u32;
    let mut check_applied = recovered;
    loop {
        let applied =
            if check_applied { retry(ctx, "redis", || ctx.store.applied_version(user, wid)).await? } else { None };
        check_applied = true;
        if let Some(v) = applied {
            // Publish what is stored, unless a newer window already superseded it.
            let current = retry(ctx, "redis", || ctx.store.current(user)).await?;
            if let Some(d) = current.filter(|d| d.version == v) {
                let u = update(v, d.description, None);
                retry(ctx, "kafka", || ctx.sink.publish_update(&u)).await?;
                ctx.metrics.updates_published.inc();
            }
            retry(ctx, "redis", || ctx.store.complete(user, wid)).await?;
            return Ok(WindowOutcome::AlreadyApplied(v));
        }
        if ctx.stopping() {
            return Ok(WindowOutcome::Abandoned);
        }
        let (expected, previous) = match ctx.descriptions.get(user) {
            Some((v, d)) => (v, Some(d)),
            None => {
                let current = retry(ctx, "redis", || ctx.store.current(user)).await?;
                (current.as_ref().map_or(0, |d| d.version), current.map(|d| d.description))
            }
        };
        let sampling = if attempt == 0 { cfg.sampling } else { SamplingParams::PAPER };
        let request = Request {
            previous,
            signals: window.events.iter().map(|e| e.body.clone()).collect(),
            sampling,
            seed: seed_for(cfg.seed, wid, attempt),
        };
        let started = Instant::now();
        let result = ctx.inferencer.infer(request).await;
        ctx.metrics.inference_seconds.observe(started.elapsed().as_secs_f64());
        let (description, reasoning, problem) = match result {
            Ok(r) => {
                ctx.metrics.generated_tokens.inc_by(r.tokens as u64);
                (r.description, r.reasoning, r.format_error)
            }
            Err(EngineError::Stopped) => return Err(StageError::Fatal("the engine thread stopped".into())),
            Err(e) => {
                ctx.metrics.retries.with_label_values(&["engine"]).inc();
                (None, String::new(), Some(format!("engine error: {e}")))
            }
        };
        let Some(description) = description else {
            ctx.metrics.invalid_outputs.inc();
            let reason = format!("invalid model output: {}", problem.unwrap_or_else(|| "no description".into()));
            match retry(ctx, "redis", || ctx.store.fail(user, wid, &reason, cfg.max_retries)).await? {
                FailOutcome::Retry(n) => {
                    tracing::warn!(user, window = wid, attempt = n, %reason, "retrying window");
                    attempt = n;
                    continue;
                }
                FailOutcome::Parked | FailOutcome::NotInflight => {
                    tracing::error!(user, window = wid, %reason, "window parked; the description is unchanged");
                    return Ok(WindowOutcome::Parked);
                }
            }
        };
        let label = model.label();
        match retry(ctx, "redis", || ctx.store.apply(user, wid, expected, &description, &ids, &label)).await? {
            ApplyOutcome::Applied(v) => {
                ctx.descriptions.put(user, v, &description);
                let u = update(v, description, Some(reasoning));
                retry(ctx, "kafka", || ctx.sink.publish_update(&u)).await?;
                ctx.metrics.updates_published.inc();
                retry(ctx, "redis", || ctx.store.complete(user, wid)).await?;
                tracing::debug!(user, version = v, "description updated");
                return Ok(WindowOutcome::Applied(v));
            }
            // Applied meanwhile (another instance): the top of the loop publishes it.
            ApplyOutcome::AlreadyApplied(_) => {
                ctx.descriptions.forget(user);
                continue;
            }
            ApplyOutcome::NotClaimed => {
                ctx.descriptions.forget(user);
                tracing::info!(user, window = wid, "window dropped: its user was forgotten meanwhile");
                return Ok(WindowOutcome::Unclaimed);
            }
            // Another writer moved the version: infer again on the new description.
            ApplyOutcome::Conflict(_) => {
                ctx.metrics.conflicts.inc();
                ctx.descriptions.forget(user);
                continue;
            }
        }
    }
}

/// Looks for claimed windows nobody is working on: at start and on every partition assignment
/// (`requests`: all claims), and every `recover_interval` (claims older than that). Applying is idempotent per window, so
/// re-driving a window another live instance is also finishing costs work, not correctness.
pub(super) async fn recover_loop(
    ctx: Arc<Context>,
    jobs: mpsc::Sender<Job>,
    mut requests: mpsc::UnboundedReceiver<()>,
) {
    let mut tick = tokio::time::interval(ctx.config.recover_interval);
    tick.tick().await; // the first tick is immediate; startup recovery comes as a request
    let mut open = true;
    loop {
        // Requests (start, partition assignment: an owner may just have died) take every claim;
        // periodic scans only claims older than the interval, which live owners have finished.
        let min_age = tokio::select! {
            _ = tick.tick() => ctx.config.recover_interval,
            r = requests.recv(), if open => {
                if r.is_none() {
                    open = false;
                    continue;
                }
                std::time::Duration::ZERO
            }
        };
        if ctx.stopping() {
            return;
        }
        let Ok(windows) = retry(&ctx, "redis", || ctx.store.recover(min_age)).await else { return };
        if !windows.is_empty() {
            tracing::info!(windows = windows.len(), "re-driving claimed windows");
        }
        for window in windows {
            if jobs.send(Job::Window { window, claimed: Instant::now(), recovered: true }).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::conformance::event;

    fn window(user: &str, id: &str) -> Job {
        Job::Window { window: Window::new(user, vec![event(user, id, 1)]), claimed: Instant::now(), recovered: false }
    }

    #[test]
    fn one_job_per_user_in_order() {
        let mut q = Queues::default();
        assert!(q.push(window("a", "a1")));
        assert!(q.push(window("a", "a2")));
        assert!(q.push(Job::Forget { user: "a".into(), ack: Ack::none() }));
        assert!(q.push(window("b", "b1")));
        assert!(!q.push(window("b", "b1")), "a window already known is not queued twice");
        let first = q.pop().unwrap();
        assert!(matches!(&first, Job::Window { window, .. } if window.events[0].event_id == "a1"));
        let second = q.pop().unwrap();
        assert_eq!(second.user(), "b", "a is busy, so b runs");
        assert!(q.pop().is_none(), "both users busy");
        let Job::Window { window: wa, .. } = first else { unreachable!() };
        q.finished("a", Some(&wa.id));
        assert!(matches!(q.pop().unwrap(), Job::Window { window, .. } if window.events[0].event_id == "a2"));
        q.finished("a", None);
        assert!(matches!(q.pop().unwrap(), Job::Forget { .. }));
        q.finished("a", None);
        q.finished("b", None);
        assert!(q.pop().is_none());
        assert_eq!(q.queued, 0);
        assert!(q.push(window("a", "a1")), "finished windows can be queued again");
    }

    #[test]
    fn seeds_are_stable_per_window_and_attempt() {
        assert_eq!(seed_for(1, "w", 0), seed_for(1, "w", 0));
        assert_ne!(seed_for(1, "w", 0), seed_for(1, "w", 1));
        assert_ne!(seed_for(1, "w", 0), seed_for(1, "v", 0));
    }

    /// Unit-test doubles: an inferencer that writes "after <previous>", a sink that keeps updates.
    struct Echo;

    #[async_trait::async_trait]
    impl crate::engine::Inferencer for Echo {
        fn model(&self) -> crate::engine::ModelRef {
            crate::engine::ModelRef { name: "echo".into(), version: "1".into(), template: "t".into() }
        }

        async fn infer(&self, req: Request) -> crate::engine::Result<crate::engine::InferResult> {
            let description = format!("after {}", req.previous.as_deref().unwrap_or("nothing"));
            Ok(crate::engine::InferResult {
                description: Some(description),
                reasoning: String::new(),
                format_ok: true,
                format_error: None,
                raw: String::new(),
                tokens: 1,
                latency_ms: 0.0,
            })
        }
    }

    #[derive(Default)]
    struct Keep(std::sync::Mutex<Vec<super::super::Update>>);

    #[async_trait::async_trait]
    impl super::super::Sink for Keep {
        async fn publish_update(&self, u: &super::super::Update) -> Result<(), super::super::SinkError> {
            self.0.lock().unwrap().push(u.clone());
            Ok(())
        }
        async fn tombstone(&self, _: &str) -> Result<(), super::super::SinkError> {
            Ok(())
        }
        async fn dead_letter(&self, _: &super::super::DeadLetter) -> Result<(), super::super::SinkError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_stale_cached_description_is_caught_by_the_compare_and_set() {
        use crate::state::{memory::MemoryStore, AppendOutcome, StateStore};
        let store = Arc::new(MemoryStore::new());
        let sink = Arc::new(Keep::default());
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let ctx = Context {
            store: store.clone(),
            inferencer: Arc::new(Echo),
            sink: sink.clone(),
            metrics: crate::telemetry::Metrics::new(),
            health: Arc::default(),
            config: super::super::PipelineConfig::default(),
            shutdown,
            descriptions: super::super::DescriptionCache::new(10),
        };
        let claim = |id: &'static str| {
            let store = store.clone();
            async move {
                match store.append("u", &event("u", id, 1), 1).await.unwrap() {
                    AppendOutcome::Full(w) => w,
                    other => panic!("{other:?}"),
                }
            }
        };
        let w1 = claim("e1").await;
        assert_eq!(process_window(&ctx, &w1, false).await.unwrap(), WindowOutcome::Applied(1));
        // Another writer moves the description on behind this instance's cache.
        let w2 = claim("e2").await;
        store.apply("u", &w2.id, 1, "written elsewhere", &w2.event_ids(), "other").await.unwrap();
        store.complete("u", &w2.id).await.unwrap();
        let w3 = claim("e3").await;
        assert_eq!(process_window(&ctx, &w3, false).await.unwrap(), WindowOutcome::Applied(3));
        assert_eq!(ctx.metrics.conflicts.get(), 1, "the cached version was stale");
        let d = store.current("u").await.unwrap().unwrap();
        assert_eq!(d.description, "after written elsewhere", "inferred again on the stored description");
        let published: Vec<(u64, String)> =
            sink.0.lock().unwrap().iter().map(|u| (u.version, u.description.clone())).collect();
        assert_eq!(published, [(1, "after nothing".to_string()), (3, "after written elsewhere".to_string())]);
        assert!(store.inflight("u").await.unwrap().is_empty(), "claims released after publishing");
    }

    #[test]
    fn the_description_cache_is_bounded() {
        let c = super::super::DescriptionCache::new(2);
        c.put("a", 1, "x");
        c.put("b", 1, "y");
        c.put("a", 2, "z");
        assert_eq!(c.get("a"), Some((2, "z".to_string())));
        c.put("c", 1, "w"); // full: cleared, then c
        assert_eq!((c.get("a"), c.get("c")), (None, Some((1, "w".to_string()))));
        let off = super::super::DescriptionCache::new(0);
        off.put("a", 1, "x");
        assert_eq!(off.get("a"), None);
    }
}
