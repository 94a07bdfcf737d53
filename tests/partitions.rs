//! Network partitions: the `prefstream` binary in one network namespace, tansu and redis-server
//! in two others (`common::netns`), and the link between the service and one of them cut with
//! iptables DROP (packets vanish; nothing is refused) for longer than every timeout while the
//! test keeps producing, then healed. After each cut the ledger must balance — every event in
//! exactly one applied window or still pending, no version applied with two windows — and
//! `/readyz` must have said "not ready" during the cut and "ready" after it. Needs root,
//! iproute2 and iptables (scripts/setup.sh).

mod common;

use std::time::{Duration, Instant};

use common::netns::{Net, Peer};
use common::*;
use prefstream::event::Event;

/// What the service showed while cut off.
#[derive(Debug, Default)]
struct DuringCut {
    unready_after: Option<Duration>,
    paused: bool,
    max_rss: u64,
}

/// Samples readiness, the pause gauge and memory every 250 ms for `hold`.
fn watch(service: &Service, hold: Duration) -> DuringCut {
    let start = Instant::now();
    let mut seen = DuringCut::default();
    while start.elapsed() < hold {
        if seen.unready_after.is_none() && !service.ready() {
            seen.unready_after = Some(start.elapsed());
        }
        seen.paused |= service.metric("prefstream_consumer_paused") == Some(1.0);
        seen.max_rss = seen.max_rss.max(service.rss_bytes());
        std::thread::sleep(Duration::from_millis(250));
    }
    seen
}

fn wait_ready(service: &Service, timeout: Duration) -> Duration {
    let start = Instant::now();
    while !service.ready() {
        assert!(start.elapsed() < timeout, "not ready {timeout:?} after the heal:\n{}", service.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// The figures of a scenario (printed for the record; run with `--nocapture` to see them).
fn report(name: &str, events: &[Event], updates: &[prefstream::pipeline::Update], redis: &RedisServer) {
    let distinct: std::collections::BTreeSet<(&str, u64)> =
        updates.iter().map(|u| (u.user_id.as_str(), u.version)).collect();
    let mut conn = redis.conn();
    let users: std::collections::BTreeSet<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
    let pending: usize = users
        .iter()
        .map(|u| redis::cmd("LLEN").arg(format!("pref:{{{u}}}:pending")).query::<usize>(&mut conn).unwrap())
        .sum();
    eprintln!(
        "{name}: events produced {}, windows applied {}, events pending {pending}, publications {} \
         (re-publications of the same window {}), lost 0, applied twice 0",
        events.len(),
        distinct.len(),
        updates.len(),
        updates.len() - distinct.len()
    );
}

/// One scenario: 240 events are taken, then the rest arrive paced while the link between the
/// service and `peer` is cut for `hold` (from 1 s into the arrivals), then healed; returns
/// once everything is applied and the ledger balances.
fn cut_and_heal(net: &Net, peer: Peer, events: &[Event], hold: Duration, extra: &[&str]) -> Outcome {
    let broker = Tansu::start_at(net.server(Peer::Kafka));
    broker.create_service_topics(4);
    let redis = RedisServer::start_at(net.server(Peer::Redis));
    let brokers = broker.brokers();
    let (before, during) = events.split_at(240);
    produce_events(&brokers, before);
    let name = format!("cut-{peer:?}");
    let mut service = Service::start_at(net.service(), &brokers, &redis.url(), &name, extra);
    wait_for_versions(&brokers, windows(before), Duration::from_secs(300), &[&service]);
    wait_ready(&service, Duration::from_secs(30));
    let rss_before = service.rss_bytes();

    // One event per user every 100 ms, from the test's namespace.
    let producing = produce_paced(&brokers, during, 12, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(1));
    net.cut(peer);
    let seen = watch(&service, hold);
    net.heal(peer);
    producing.join().expect("producer");
    let ready_in = wait_ready(&service, Duration::from_secs(120));

    let all = wait_for_versions(&brokers, windows(events), Duration::from_secs(600), &[&service]);
    check_ledger_eventually(&brokers, events, &redis, Duration::from_secs(60));
    let metrics = service.metrics();
    let sample = |name: &str| metric_value(&metrics, name).unwrap_or(0.0);
    eprintln!(
        "{peer:?} cut {hold:?}: {seen:?}; RSS before {rss_before}; ready {ready_in:?} after the heal; \
         retries redis {} kafka {}, windows already applied {}, recovered {}",
        sample("prefstream_retries_total{component=\"redis\"}"),
        sample("prefstream_retries_total{component=\"kafka\"}"),
        sample("prefstream_windows_total{outcome=\"already_applied\"}"),
        sample("prefstream_recovered_windows_total"),
    );
    report(&format!("{peer:?} cut"), events, &all, &redis);
    assert!(service.ready(), "ready after catching up");
    assert!(service.terminate().success(), "SIGTERM exits cleanly:\n{}", service.log_text());
    Outcome { seen, rss_before, metrics }
}

struct Outcome {
    seen: DuringCut,
    rss_before: u64,
    metrics: String,
}

impl Outcome {
    /// The stated cap: what the bounded buffers hold plus librdkafka's prefetch, never the
    /// backlog — 64 MiB over the service's steady state.
    fn assert_memory_bounded(&self) {
        let (before, max) = (self.rss_before, self.seen.max_rss);
        assert!(max < before + (64 << 20), "RSS grew from {before} to {max} bytes during the cut");
    }
}

/// Cut from Redis for 20 s (the client's response timeout is 0.5 s, its connect timeout 1 s,
/// the retry backoff at most 5 s) while 480 more events arrive: appends fail and are retried,
/// the small buffer fills, the consumer pauses instead of buffering, `/readyz` says redis is
/// down; after the heal everything is applied once.
#[test]
fn cut_from_redis_while_events_arrive_then_healed() {
    let _g = serial();
    let net = Net::create();
    let events = synth_events(12, 60, 31);
    // One lane and a 64-record buffer, so the pipeline's own bound is reached in seconds.
    let out = cut_and_heal(&net, Peer::Redis, &events, Duration::from_secs(20), &["--lanes", "1", "--buffer", "64"]);
    let unready = out.seen.unready_after.expect("/readyz stayed 200 while Redis was cut off");
    assert!(unready < Duration::from_secs(10), "readiness fell only after {unready:?}");
    assert!(out.seen.paused, "the consumer never paused while the pipeline could not write");
    out.assert_memory_bounded();
    let retries = metric_value(&out.metrics, "prefstream_retries_total{component=\"redis\"}");
    assert!(retries.unwrap_or(0.0) > 0.0, "{}", out.metrics);
}

/// Cut from the broker for 45 s — past the consumer group's session (6 s), librdkafka's request
/// timeout (10 s here) and its connection set-up timeout (5 s here) — while 240 more events
/// are produced to the broker from outside: the member is evicted, `/readyz` says kafka is
/// down; after the heal the service rejoins, reads what it missed and applies everything once.
#[test]
fn cut_from_the_broker_then_healed() {
    let _g = serial();
    let net = Net::create();
    let events = synth_events(12, 40, 32);
    let timeouts = ["-X", "socket.timeout.ms=10000", "-X", "socket.connection.setup.timeout.ms=5000"];
    let out = cut_and_heal(&net, Peer::Kafka, &events, Duration::from_secs(45), &timeouts);
    assert!(out.seen.unready_after.is_some(), "/readyz stayed 200 while the broker was cut off");
    out.assert_memory_bounded();
}
