//! A bounded reader for replays: reads assigned partitions from start offsets to an end
//! (explicit offsets, or the first record at or after a timestamp), optionally only some users'
//! records, at most N records per second. It never subscribes, so it never joins a consumer
//! group and never commits: the live service's group is untouched.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::{KafkaClient, KafkaSetupError};
use crate::offsets::OffsetTracker;
use crate::pipeline::{Ack, Record};

/// Where each partition's read stops (exclusive).
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Per partition: stop before this offset.
    Offsets(HashMap<i32, i64>),
    /// Stop at the first record whose timestamp (ms since the epoch) is at or after this.
    Time(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    /// Partition → first offset to read. Partitions not listed are not read.
    pub start: HashMap<i32, i64>,
    pub end: End,
}

/// What the reader saw.
#[derive(Debug, Default, Clone)]
pub struct ReaderStats {
    pub read: u64,
    /// Records of users outside `--users`.
    pub skipped: u64,
    /// Users whose records were passed on.
    pub users: HashSet<String>,
}

fn consumer(client: &KafkaClient) -> Result<BaseConsumer, KafkaSetupError> {
    let mut cfg = client.config();
    // A group id is required by librdkafka's fetcher even without joining; this one is never
    // joined (no subscribe) and never committed to.
    cfg.set("group.id", format!("prefstream-replay-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // A start offset the broker calls out of range (tansu 0.6 counts record batches in its
        // watermarks) restarts the partition from its beginning, never from its end; records
        // before the range's start are skipped below.
        .set("auto.offset.reset", "earliest");
    Ok(cfg.create()?)
}

/// Resolves `--from`/`--to` (ms since the epoch) to a range with the broker's
/// offsets-for-times. Partitions with nothing at or after `from` are left out.
pub fn resolve_times(client: &KafkaClient, topic: &str, from_ms: i64, to_ms: i64) -> Result<Range, KafkaSetupError> {
    let c = consumer(client)?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if parts.is_empty() {
        return Err(KafkaSetupError::Invalid(format!("topic {topic} does not exist or has no partitions")));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Offset(from_ms))?;
    }
    let found = c.offsets_for_times(tpl, Duration::from_secs(10))?;
    let mut start = HashMap::new();
    for e in found.elements_for_topic(topic) {
        if let Offset::Offset(o) = e.offset() {
            start.insert(e.partition(), o);
        }
    }
    Ok(Range { start, end: End::Time(to_ms) })
}

/// Parses `--offsets 0:100-200,1:0-50` (end exclusive).
pub fn parse_offsets(s: &str) -> Result<Range, String> {
    let (mut start, mut end) = (HashMap::new(), HashMap::new());
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("expected PARTITION:START-END, got {part:?}");
        let (p, range) = part.split_once(':').ok_or_else(bad)?;
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let (p, a, b): (i32, i64, i64) =
            (p.parse().map_err(|_| bad())?, a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if a < 0 || b < a {
            return Err(format!("{part:?}: need 0 <= START <= END"));
        }
        start.insert(p, a);
        end.insert(p, b);
    }
    if start.is_empty() {
        return Err("no partitions given".into());
    }
    Ok(Range { start, end: End::Offsets(end) })
}

pub struct ReaderConfig {
    pub topic: String,
    pub range: Range,
    pub users: Option<HashSet<String>>,
    pub max_per_sec: Option<f64>,
    /// The log counts as read to its end after this long without a record.
    pub idle_end: Duration,
}

/// Starts the reader thread; it closes `records` when every partition reached its end (or the
/// log went quiet), or at shutdown.
pub fn spawn_reader(
    client: &KafkaClient,
    cfg: ReaderConfig,
    tracker: Arc<Mutex<OffsetTracker>>,
    records: mpsc::Sender<Record>,
    shutdown: watch::Receiver<bool>,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<JoinHandle<ReaderStats>, KafkaSetupError> {
    let c = consumer(client)?;
    let mut tpl = TopicPartitionList::new();
    let mut open: HashSet<i32> = HashSet::new();
    for (p, o) in &cfg.range.start {
        if let End::Offsets(end) = &cfg.range.end {
            if end.get(p).is_some_and(|e| e <= o) {
                continue; // empty range
            }
        }
        tpl.add_partition_offset(&cfg.topic, *p, Offset::Offset(*o))?;
        open.insert(*p);
    }
    c.assign(&tpl)?;
    std::thread::Builder::new()
        .name("prefstream-replay-reader".into())
        .spawn(move || {
            let mut stats = ReaderStats::default();
            let started = Instant::now();
            let mut last = Instant::now();
            while !open.is_empty() && !*shutdown.borrow() && last.elapsed() < cfg.idle_end {
                let Some(m) = c.poll(Duration::from_millis(100)) else { continue };
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "replay read error");
                        continue;
                    }
                };
                last = Instant::now();
                let (p, o) = (m.partition(), m.offset());
                if !open.contains(&p) || cfg.range.start.get(&p).is_some_and(|s| o < *s) {
                    continue;
                }
                let past_end = match &cfg.range.end {
                    End::Offsets(end) => end.get(&p).is_some_and(|e| o >= *e),
                    End::Time(to) => match m.timestamp() {
                        Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t >= *to,
                        Timestamp::NotAvailable => false,
                    },
                };
                if past_end {
                    open.remove(&p);
                    let _ = c.pause(&{
                        let mut t = TopicPartitionList::new();
                        let _ = t.add_partition(&cfg.topic, p);
                        t
                    });
                    continue;
                }
                if let End::Offsets(end) = &cfg.range.end {
                    if end.get(&p).is_some_and(|e| o + 1 >= *e) {
                        open.remove(&p);
                    }
                }
                let key = m.key().map(<[u8]>::to_vec);
                let user = key.as_deref().map(String::from_utf8_lossy).map(|k| k.into_owned());
                if let (Some(filter), Some(u)) = (&cfg.users, &user) {
                    if !filter.contains(u) {
                        stats.skipped += 1;
                        continue;
                    }
                }
                if let Some(rate) = cfg.max_per_sec {
                    let due = started + Duration::from_secs_f64(stats.read as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                tracker.lock().expect("tracker").begin(p, o);
                let record = Record {
                    partition: p,
                    offset: o,
                    key,
                    payload: m.payload().map(<[u8]>::to_vec),
                    ack: Ack::new(tracker.clone(), p, o),
                };
                if records.blocking_send(record).is_err() {
                    break;
                }
                // Only empty polls count towards `idle_end`, not waiting for the pipeline.
                last = Instant::now();
                stats.read += 1;
                progress(stats.read);
                if let Some(u) = user {
                    stats.users.insert(u);
                }
            }
            stats
        })
        .map_err(|e| KafkaSetupError::Invalid(format!("cannot start the replay reader: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse() {
        let r = parse_offsets("0:10-20, 3:0-5").unwrap();
        assert_eq!(r.start, HashMap::from([(0, 10), (3, 0)]));
        assert_eq!(r.end, End::Offsets(HashMap::from([(0, 20), (3, 5)])));
        for bad in ["", "0:20-10", "x:1-2", "0:1", "0-1-2"] {
            assert!(parse_offsets(bad).is_err(), "{bad}");
        }
    }
}
