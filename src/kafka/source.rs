//! The consumer-group source, on its own thread (librdkafka calls the rebalance callback from
//! `poll`, and the callback blocks while the pipeline drains, so it must not sit on an async
//! worker). Offsets are tracked per record (`OffsetTracker`): begun when a record enters the
//! pipeline, done when its effect is durable; only the contiguous done prefix is committed —
//! every `commit_interval`, on revoke (after draining the revoked partitions) and at shutdown.
//!
//! Backpressure: the pipeline's channel is bounded. When it stays full for `pause_after`, the
//! assigned partitions are paused (the consumer keeps polling, so the group session and
//! rebalances are served) and resumed once records flow again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch};

use super::{KafkaClient, KafkaSetupError};
use crate::offsets::OffsetTracker;
use crate::pipeline::{Ack, Record};
use crate::telemetry::{Health, Metrics};

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub topic: String,
    pub group: String,
    pub commit_interval: Duration,
    pub pause_after: Duration,
    /// How long a revoke waits for the revoked partitions' records to become durable.
    pub drain_timeout: Duration,
}

/// A record polled but not yet handed to the pipeline (not begun in the tracker, so it never
/// holds back a commit; dropped on revoke and fetched again by the next owner).
struct Held {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

struct Shared {
    topic: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    held: Mutex<VecDeque<Held>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    drain_timeout: Duration,
    recover: mpsc::UnboundedSender<()>,
    /// Whether the loop holds the assignment paused; a new assignment is set to match.
    paused: AtomicBool,
}

struct SourceContext(Arc<Shared>);

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
        if matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)) {
            self.0.health.kafka.store(false, Ordering::Relaxed);
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.0;
        match rebalance {
            Rebalance::Revoke(tpl) => {
                s.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let parts: Vec<i32> =
                    tpl.elements().iter().filter(|e| e.topic() == s.topic).map(|e| e.partition()).collect();
                s.held.lock().expect("held lock").retain(|h| !parts.contains(&h.partition));
                // Drain: the pipeline runs on other threads; wait for what it took from these
                // partitions to become durable, then commit it. Whatever misses the deadline is
                // redelivered to the next owner (and deduplicated there).
                let deadline = Instant::now() + s.drain_timeout;
                let outstanding = || parts.iter().map(|p| s.tracker.lock().expect("tracker").outstanding(*p)).sum();
                let mut left: usize = outstanding();
                while left > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                    left = outstanding();
                }
                if left > 0 {
                    tracing::warn!(records = left, "revoke: drain timed out; those records will be redelivered");
                }
                commit(consumer, s, Some(&parts));
                let mut tracker = s.tracker.lock().expect("tracker");
                for p in &parts {
                    tracker.revoke(*p);
                }
                tracing::info!(partitions = ?parts, "partitions revoked");
            }
            Rebalance::Assign(_) => s.metrics.rebalances.with_label_values(&["assign"]).inc(),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.0;
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(partitions = ?parts, "partitions assigned");
            // librdkafka keeps a partition's pause flag across a revoke and a new assignment,
            // while the loop may have resumed in between (with nothing assigned): set the new
            // partitions to the loop's state, or one could stay paused for good.
            let set = if s.paused.load(Ordering::Relaxed) { consumer.pause(tpl) } else { consumer.resume(tpl) };
            if let Err(e) = set {
                tracing::warn!(error = %e, "cannot set the pause state of assigned partitions");
            }
            s.health.kafka.store(true, Ordering::Relaxed);
            // A member may have left claimed windows behind: look for them.
            let _ = s.recover.send(());
        }
        let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        s.metrics.assigned_partitions.set(n as i64);
    }
}

/// Commits the tracker's committable positions (all partitions, or only `only`), synchronously.
fn commit(consumer: &BaseConsumer<SourceContext>, s: &Shared, only: Option<&[i32]>) {
    let positions: Vec<(i32, i64)> = {
        let tracker = s.tracker.lock().expect("tracker");
        tracker.committable_all().into_iter().filter(|(p, _)| only.is_none_or(|o| o.contains(p))).collect()
    };
    if positions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, off) in &positions {
        if let Err(e) = tpl.add_partition_offset(&s.topic, *p, Offset::Offset(*off)) {
            tracing::warn!(error = %e, "cannot build commit list");
            return;
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            let mut tracker = s.tracker.lock().expect("tracker");
            for (p, off) in positions {
                tracker.mark_committed(p, off);
            }
            s.metrics.commits.with_label_values(&["ok"]).inc();
        }
        Err(e) => {
            s.metrics.commits.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, "offset commit failed; will retry");
        }
    }
}

/// Starts the consumer thread. It ends after `shutdown` turns true: it stops taking records,
/// waits (up to `drain_wait`) for those taken to become durable, commits, leaves the group and
/// closes `records`.
#[allow(clippy::too_many_arguments)]
pub fn spawn_source(
    client: &KafkaClient,
    cfg: SourceConfig,
    records: mpsc::Sender<Record>,
    recover: mpsc::UnboundedSender<()>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
    drain_wait: Duration,
) -> Result<JoinHandle<()>, KafkaSetupError> {
    let mut config = client.config();
    config.set("group.id", &cfg.group);
    for (k, v) in
        [("enable.auto.commit", "false"), ("enable.auto.offset.store", "false"), ("enable.partition.eof", "false")]
    {
        config.set(k, v);
    }
    // Defaults an operator may override with -X.
    for (k, v) in [("auto.offset.reset", "earliest")] {
        if client.options.iter().all(|(key, _)| key != k) {
            config.set(k, v);
        }
    }
    let shared = Arc::new(Shared {
        topic: cfg.topic.clone(),
        tracker: Arc::new(Mutex::new(OffsetTracker::new())),
        held: Mutex::new(VecDeque::new()),
        metrics,
        health,
        drain_timeout: cfg.drain_timeout,
        recover,
        paused: AtomicBool::new(false),
    });
    let consumer: BaseConsumer<SourceContext> = config.create_with_context(SourceContext(shared.clone()))?;
    consumer.subscribe(&[&cfg.topic])?;
    std::thread::Builder::new()
        .name("prefstream-source".into())
        .spawn(move || poll_loop(consumer, shared, cfg, records, shutdown, drain_wait))
        .map_err(|e| KafkaSetupError::Invalid(format!("cannot start the consumer thread: {e}")))
}

fn poll_loop(
    consumer: BaseConsumer<SourceContext>,
    s: Arc<Shared>,
    cfg: SourceConfig,
    records: mpsc::Sender<Record>,
    shutdown: watch::Receiver<bool>,
    drain_wait: Duration,
) {
    let mut last_commit = Instant::now();
    let mut blocked_since: Option<Instant> = None;
    while !*shutdown.borrow() {
        // Hand held records to the pipeline while it has room.
        let mut closed = false;
        {
            let mut held = s.held.lock().expect("held lock");
            while !held.is_empty() {
                match records.try_reserve() {
                    Ok(permit) => {
                        let h = held.pop_front().expect("not empty");
                        s.tracker.lock().expect("tracker").begin(h.partition, h.offset);
                        let ack = Ack::new(s.tracker.clone(), h.partition, h.offset);
                        permit.send(Record {
                            partition: h.partition,
                            offset: h.offset,
                            key: h.key,
                            payload: h.payload,
                            ack,
                        });
                        blocked_since = None;
                    }
                    Err(mpsc::error::TrySendError::Full(())) => {
                        blocked_since.get_or_insert_with(Instant::now);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        closed = true;
                        break;
                    }
                }
            }
            // Nothing left to hand over (a revoke drops held records too): not blocked, so a
            // pause ends. Without this a revoke during a pause left the consumer paused for good.
            if held.is_empty() {
                blocked_since = None;
            }
        }
        if closed {
            tracing::error!("the pipeline stopped taking records; stopping the consumer");
            break;
        }
        let blocked = blocked_since.is_some();
        let paused = s.paused.load(Ordering::Relaxed);
        if blocked && !paused && blocked_since.is_some_and(|t| t.elapsed() >= cfg.pause_after) {
            set_paused(&consumer, &s, true);
        } else if !blocked && paused {
            set_paused(&consumer, &s, false);
        }
        let paused = s.paused.load(Ordering::Relaxed);
        if blocked && !paused {
            // Wait for room; polling now would only pile up more held records.
            std::thread::sleep(Duration::from_millis(1));
        } else {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    s.health.kafka.store(true, Ordering::Relaxed);
                    if paused {
                        // A partition assigned during the pause is not paused yet: pause the
                        // whole assignment again, so `held` stays bounded. (Same pause: not
                        // counted or logged again.)
                        if let Err(e) = consumer.assignment().and_then(|a| consumer.pause(&a)) {
                            tracing::warn!(error = %e, "cannot pause partitions");
                        }
                    }
                    s.held.lock().expect("held lock").push_back(Held {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                    });
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consume error"),
                None => {}
            }
        }
        if last_commit.elapsed() >= cfg.commit_interval {
            commit(&consumer, &s, None);
            last_commit = Instant::now();
            let outstanding = s.tracker.lock().expect("tracker").total_outstanding();
            s.metrics.records_outstanding.set(outstanding as i64);
        }
    }
    // Shutdown: stop taking, let what was taken become durable, commit, leave the group.
    s.held.lock().expect("held lock").clear();
    let deadline = Instant::now() + drain_wait;
    while s.tracker.lock().expect("tracker").total_outstanding() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    commit(&consumer, &s, None);
    let left = s.tracker.lock().expect("tracker").total_outstanding();
    tracing::info!(uncommitted_records = left, "consumer stopping");
    drop(records); // the pipeline sees the end of the stream
    consumer.unsubscribe();
    drop(consumer); // closes: leaves the group (the revoke callback commits again)
}

/// Pauses or resumes every assigned partition; on success records the state in `s.paused`.
fn set_paused(consumer: &BaseConsumer<SourceContext>, s: &Shared, pause: bool) {
    let result = consumer.assignment().and_then(|a| if pause { consumer.pause(&a) } else { consumer.resume(&a) });
    match result {
        Ok(()) => {
            s.paused.store(pause, Ordering::Relaxed);
            s.metrics.consumer_paused.set(pause as i64);
            if pause {
                s.metrics.pauses.inc();
                tracing::info!("backpressure: partitions paused");
            } else {
                tracing::info!("backpressure over: partitions resumed");
            }
        }
        Err(e) => tracing::warn!(error = %e, pause, "cannot pause/resume partitions"),
    }
}
