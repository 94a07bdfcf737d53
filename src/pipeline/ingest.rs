//! Ingest: route records to lanes by key (one user → one lane, so a user's events keep their
//! order), validate, dead-letter bad input, append good events to the user's pending window.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::windows::Job;
use super::{retry, Context, DeadLetter, Record, StageError};
use crate::event::{parse_event, Event, EventBody};
use crate::state::AppendOutcome;
use crate::window::IdleTracker;

/// What to do with one record (pure; unit-tested).
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Event(Event),
    Forget(String),
    Dead(String),
}

/// Validate a record: size, UTF-8, JSON, schema (unknown `schema_version` and kinds rejected),
/// and that the message key is the event's user id (partitioning by user is what keeps a
/// user's events in order).
pub fn classify(key: Option<&[u8]>, payload: Option<&[u8]>, max_bytes: usize) -> Verdict {
    let Some(payload) = payload else {
        return Verdict::Dead("empty payload (null value)".into());
    };
    if payload.len() > max_bytes {
        return Verdict::Dead(format!("payload of {} bytes exceeds the {max_bytes}-byte limit", payload.len()));
    }
    let event = match parse_event(payload) {
        Ok(e) => e,
        Err(e) => return Verdict::Dead(format!("invalid event: {e}")),
    };
    if key != Some(event.user_id.as_bytes()) {
        let shown = key.map_or("none".to_string(), |k| format!("{:?}", String::from_utf8_lossy(k)));
        return Verdict::Dead(format!("message key {shown} is not the event's user_id {:?}", event.user_id));
    }
    match event.body {
        EventBody::Forget => Verdict::Forget(event.user_id),
        _ => Verdict::Event(event),
    }
}

fn lane_of(key: Option<&[u8]>, lanes: usize) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Fans records out to the lanes; returns the number of records once `records` closes and every
/// lane has finished.
pub(super) async fn run_lanes(
    ctx: Arc<Context>,
    mut records: mpsc::Receiver<Record>,
    jobs: mpsc::Sender<Job>,
    idle: Idle,
) -> Result<u64, StageError> {
    let n = ctx.config.lanes.max(1);
    let mut senders = Vec::with_capacity(n);
    let mut lanes = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel(ctx.config.lane_queue.max(1));
        senders.push(tx);
        lanes.push(tokio::spawn(lane(ctx.clone(), rx, jobs.clone(), idle.clone())));
    }
    drop(jobs);
    let mut count = 0u64;
    while let Some(record) = records.recv().await {
        count += 1;
        let i = lane_of(record.key.as_deref(), n);
        if senders[i].send(record).await.is_err() {
            break; // the lane failed; its error is reported below
        }
    }
    drop(senders);
    for l in lanes {
        l.await.map_err(|e| StageError::Fatal(format!("ingest lane panicked: {e}")))??;
    }
    Ok(count)
}

/// Shared by the lanes and the idle flusher: users whose partial window is waiting.
pub(super) type Idle = Arc<Mutex<IdleTracker>>;

pub(super) fn new_idle() -> Idle {
    Arc::new(Mutex::new(IdleTracker::new()))
}

async fn lane(
    ctx: Arc<Context>,
    mut rx: mpsc::Receiver<Record>,
    jobs: mpsc::Sender<Job>,
    idle: Idle,
) -> Result<(), StageError> {
    while let Some(record) = rx.recv().await {
        let started = Instant::now();
        match handle(&ctx, record, &jobs, &idle).await {
            Ok(()) => {}
            // The record stays unacked: redelivered after restart.
            Err(StageError::Abandoned(what)) => tracing::warn!(what, "record abandoned at shutdown"),
            Err(StageError::Permanent(e)) => tracing::error!(error = %e, "record skipped"),
            Err(e) => return Err(e),
        }
        ctx.metrics.stage_seconds.with_label_values(&["ingest"]).observe(started.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn handle(ctx: &Context, record: Record, jobs: &mpsc::Sender<Job>, idle: &Idle) -> Result<(), StageError> {
    let cfg = &ctx.config;
    match classify(record.key.as_deref(), record.payload.as_deref(), cfg.max_event_bytes) {
        Verdict::Dead(reason) => dead_letter(ctx, record, reason).await?,
        Verdict::Forget(_) if !cfg.apply_forgets => {
            ctx.metrics.events.with_label_values(&["forget_skipped"]).inc();
            record.ack.done();
        }
        Verdict::Forget(user) => {
            // Ordered behind the user's windows by the scheduler; acked once the tombstone is out.
            ctx.metrics.events.with_label_values(&["forget"]).inc();
            idle.lock().expect("idle lock").clear(&user);
            send(jobs, Job::Forget { user, ack: record.ack }).await?;
        }
        Verdict::Event(event) => {
            let user = event.user_id.clone();
            let outcome = match retry(ctx, "redis", || ctx.store.append(&user, &event, cfg.window.size)).await {
                Err(StageError::Permanent(reason)) => {
                    // The user's stored state cannot take the event: dead-letter it with why.
                    return dead_letter(ctx, record, format!("cannot store the event: {reason}")).await;
                }
                other => other?,
            };
            record.ack.done();
            match outcome {
                AppendOutcome::Duplicate => ctx.metrics.events.with_label_values(&["duplicate"]).inc(),
                AppendOutcome::Pending(_) => {
                    ctx.metrics.events.with_label_values(&["appended"]).inc();
                    if cfg.window.idle.is_some() {
                        idle.lock().expect("idle lock").touch(&user, Instant::now());
                    }
                }
                AppendOutcome::Full(window) => {
                    ctx.metrics.events.with_label_values(&["appended"]).inc();
                    idle.lock().expect("idle lock").clear(&user);
                    send(jobs, Job::Window { window, claimed: Instant::now(), recovered: false }).await?;
                }
            }
        }
    }
    Ok(())
}

async fn dead_letter(ctx: &Context, record: Record, reason: String) -> Result<(), StageError> {
    let cfg = &ctx.config;
    let payload = record.payload.as_deref().unwrap_or_default();
    let letter = DeadLetter {
        key: record.key.clone(),
        payload: payload[..payload.len().min(cfg.dlq_max_bytes)].to_vec(),
        original_len: payload.len(),
        reason,
        partition: record.partition,
        offset: record.offset,
    };
    tracing::warn!(partition = letter.partition, offset = letter.offset, reason = %letter.reason, "dead-lettering record");
    retry(ctx, "kafka", || ctx.sink.dead_letter(&letter)).await?;
    ctx.metrics.events.with_label_values(&["dead_lettered"]).inc();
    record.ack.done();
    Ok(())
}

async fn send(jobs: &mpsc::Sender<Job>, job: Job) -> Result<(), StageError> {
    jobs.send(job).await.map_err(|_| StageError::Fatal("the window scheduler stopped".into()))
}

/// `--window-idle`: claims the partial windows of users who went quiet. The tracker is in
/// memory: after a restart a partial window waits for the user's next event.
pub(super) async fn idle_flush(ctx: Arc<Context>, jobs: mpsc::Sender<Job>, idle: Idle, idle_after: Duration) {
    let mut tick = tokio::time::interval((idle_after / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)));
    loop {
        tick.tick().await;
        let due = idle.lock().expect("idle lock").due(Instant::now(), idle_after);
        for user in due {
            idle.lock().expect("idle lock").clear(&user);
            match retry(&ctx, "redis", || ctx.store.take_partial(&user, ctx.config.window.size)).await {
                Ok(Some(window)) => {
                    if send(&jobs, Job::Window { window, claimed: Instant::now(), recovered: false }).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_json(user: &str) -> String {
        format!(
            r#"{{"schema_version":1,"event_id":"e1","user_id":"{user}","ts":"2026-11-26T10:00:00Z","kind":"ugc","text":"hi"}}"#
        )
    }

    #[test]
    fn classify_sorts_good_from_bad() {
        let good = event_json("u1");
        assert!(matches!(classify(Some(b"u1"), Some(good.as_bytes()), 1 << 20), Verdict::Event(_)));
        let reason = |v: Verdict| match v {
            Verdict::Dead(r) => r,
            other => panic!("expected a dead letter, got {other:?}"),
        };
        assert!(reason(classify(Some(b"u2"), Some(good.as_bytes()), 1 << 20)).contains("not the event's user_id"));
        assert!(reason(classify(None, Some(good.as_bytes()), 1 << 20)).contains("key none"));
        assert!(reason(classify(Some(b"u1"), Some(good.as_bytes()), 10)).contains("exceeds"));
        assert!(reason(classify(Some(b"u1"), None, 10)).contains("null"));
        assert!(reason(classify(Some(b"u1"), Some(b"\xff\xfe{"), 1 << 20)).contains("UTF-8"));
        assert!(reason(classify(Some(b"u1"), Some(b"{nope"), 1 << 20)).contains("JSON"));
        let v2 = good.replace("\"schema_version\":1", "\"schema_version\":2");
        assert!(reason(classify(Some(b"u1"), Some(v2.as_bytes()), 1 << 20)).contains("schema"));
        let kind = good.replace("\"ugc\"", "\"click\"");
        assert!(reason(classify(Some(b"u1"), Some(kind.as_bytes()), 1 << 20)).contains("schema"));
        let forget =
            r#"{"schema_version":1,"event_id":"f","user_id":"u1","ts":"2026-11-26T10:00:00Z","kind":"forget"}"#;
        assert_eq!(classify(Some(b"u1"), Some(forget.as_bytes()), 1 << 20), Verdict::Forget("u1".into()));
    }

    #[test]
    fn one_user_one_lane() {
        let a = lane_of(Some(b"user-a"), 64);
        assert_eq!(a, lane_of(Some(b"user-a"), 64));
        assert!(a < 64);
        let spread: std::collections::HashSet<usize> =
            (0..200).map(|i| lane_of(Some(format!("u{i}").as_bytes()), 8)).collect();
        assert_eq!(spread.len(), 8, "users spread over every lane");
    }
}
