//! The service in-process on librdkafka's mock cluster, with a real redis-server and the shipped
//! model: windows → versions, forget → state erased and tombstone last, metrics and readiness.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use prefstream::config::parse_duration;
use prefstream::engine::{BatcherConfig, Engine, InferResult, Inferencer, ModelRef, Request};
use prefstream::event::{Event, EventBody};
use prefstream::kafka::KafkaClient;
use prefstream::pipeline::{PipelineConfig, Summary};
use prefstream::runtime::Device;
use prefstream::sampling::SamplingParams;
use prefstream::service::ServiceError;
use prefstream::service::{serve, ServiceConfig, Topics};
use prefstream::state::memory::MemoryStore;
use prefstream::state::redis::RedisStore;
use prefstream::state::{StateStore, Window};
use prefstream::telemetry::{serve_http, Health, Metrics};
use rdkafka::mocking::MockCluster;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_redis_forget_and_metrics() {
    let redis = RedisServer::start();
    let cluster = MockCluster::new(1).unwrap();
    for (t, p) in [(EVENTS, 4), (UPDATES, 4), (DLQ, 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let events = synth_events(6, 21, 21);
    let gone = events[0].user_id.clone();
    let forget = Event {
        schema_version: 1,
        event_id: "forget-1".into(),
        user_id: gone.clone(),
        ts: "2026-11-26T23:00:00Z".into(),
        body: EventBody::Forget,
    };
    let all: Vec<Event> = events.iter().cloned().chain([forget]).collect();
    produce_async(&brokers, &all).await;

    let engine = Engine::spawn("onnx".as_ref(), Device::Cpu, BatcherConfig { max_batch: 16, ..Default::default() })
        .expect("the shipped model loads (run scripts/setup.sh for ONNX Runtime)");
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let cfg = ServiceConfig {
        kafka: KafkaClient { brokers: brokers.clone(), options: vec![] },
        group: "mock-test".into(),
        topics: Topics::default(),
        pipeline: PipelineConfig { sampling: SamplingParams::GREEDY, ..PipelineConfig::default() },
        commit_interval: parse_duration("200ms").unwrap(),
        pause_after: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(5),
        buffer: 1024,
    };
    let (metrics, health) = (Metrics::new(), Arc::new(Health::default()));
    for f in [&health.engine, &health.redis] {
        f.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let addr = serve_http("127.0.0.1:0".parse().unwrap(), metrics.clone(), health.clone(), std::future::pending())
        .await
        .unwrap();
    let service = tokio::spawn(serve(cfg, Arc::new(store), Arc::new(engine), metrics.clone(), health, stop_rx));

    // Everyone's windows, then the tombstone for the forgotten user.
    let others: Vec<Event> = events.iter().filter(|e| e.user_id != gone).cloned().collect();
    let want_others = 5 * 5;
    let deadline = Instant::now() + Duration::from_secs(300);
    let reads = loop {
        let b = brokers.clone();
        let reads = tokio::task::spawn_blocking(move || read_all(&b, UPDATES)).await.unwrap();
        let tombstone = reads.iter().any(|r| r.payload.is_none());
        let versions = reads
            .iter()
            .filter_map(|r| r.payload.as_ref())
            .map(|p| serde_json::from_slice::<prefstream::pipeline::Update>(p).unwrap())
            .filter(|u| u.user_id != gone)
            .map(|u| (u.user_id, u.version))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if tombstone && versions >= want_others {
            break reads;
        }
        assert!(Instant::now() < deadline, "timed out: {versions} versions, tombstone {tombstone}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The forgotten user: the tombstone is their last message, and no key of theirs is left.
    let theirs: Vec<_> = reads.iter().filter(|r| r.key.as_deref() == Some(gone.as_bytes())).collect();
    assert!(theirs.last().unwrap().payload.is_none(), "the tombstone comes after the user's updates");
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("pref:{{{gone}}}:*")).query(&mut conn).unwrap();
    assert!(keys.is_empty(), "state of a forgotten user left: {keys:?}");

    let updates: Vec<_> = reads
        .iter()
        .filter_map(|r| r.payload.as_ref())
        .map(|p| serde_json::from_slice(p).unwrap())
        .filter(|u: &prefstream::pipeline::Update| u.user_id != gone)
        .collect();
    for u in &updates {
        prefstream::event::validate_update_value(&serde_json::to_value(u).unwrap()).expect("update schema");
    }
    check_ledger(&others, &updates, &mut conn, 4);

    let text = http_get(addr.port(), "/metrics");
    for line in [
        "prefstream_events_total{outcome=\"forget\"} 1",
        "prefstream_tombstones_published_total 1",
        "prefstream_windows_total{outcome=\"applied\"}",
    ] {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    deploy_names_exist(&text);
    assert!(http_get(addr.port(), "/healthz").contains("200 OK"));
    assert!(http_get(addr.port(), "/readyz").contains("200 OK"), "ready once assigned");

    stop_tx.send(true).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(60), service).await.expect("drains").unwrap().unwrap();
    assert_eq!(summary.records as usize, events.len() + 1);
    drop(cluster);
}

/// Every `prefstream_*` metric the dashboard and the alert rules query is one the running
/// service exports (a histogram's `_bucket` series through its family's `# TYPE` line).
fn deploy_names_exist(scraped: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["deploy/prometheus/alerts.yaml", "deploy/grafana/prefstream.json"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let names: std::collections::BTreeSet<&str> = text
            .match_indices("prefstream_")
            .map(|(i, _)| {
                let rest = &text[i..];
                &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
            })
            .filter(|n| !n.ends_with('_'))
            .collect();
        assert!(names.len() >= 5, "{file} names only {names:?}");
        for name in names {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(scraped.contains(&format!("# TYPE {family} ")), "{file} uses {name}, which /metrics lacks");
        }
    }
}

/// Starts the service on a fresh mock cluster with the in-memory store and the real model;
/// returns what the tests poke at. The cluster must outlive the service.
type Running = (Arc<Metrics>, watch::Sender<bool>, tokio::task::JoinHandle<Result<Summary, ServiceError>>);

fn mock_cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).unwrap();
    for (t, p) in [(EVENTS, 2), (UPDATES, 2), (DLQ, 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    cluster
}

async fn start(
    brokers: String,
    model: &std::path::Path,
    store: Arc<dyn StateStore>,
    pipeline: PipelineConfig,
    buffer: usize,
    pause_after: Duration,
) -> Running {
    let engine = Engine::spawn(model, Device::Cpu, BatcherConfig::default()).expect("the model package loads");
    // A fresh group per start: a restarted member need not wait out the old one's session
    // (records read again are duplicates, deduplicated by the store).
    let group = format!("mock-test-{}", free_port());
    let cfg = service_config(brokers, group, pipeline, buffer, pause_after);
    start_member(cfg, store, Arc::new(engine))
}

fn service_config(
    brokers: String,
    group: String,
    pipeline: PipelineConfig,
    buffer: usize,
    pause_after: Duration,
) -> ServiceConfig {
    ServiceConfig {
        kafka: KafkaClient { brokers, options: vec![] },
        group,
        topics: Topics::default(),
        pipeline,
        commit_interval: Duration::from_millis(200),
        pause_after,
        drain_timeout: Duration::from_secs(5),
        buffer,
    }
}

fn start_member(cfg: ServiceConfig, store: Arc<dyn StateStore>, model: Arc<dyn Inferencer>) -> Running {
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = tokio::spawn(serve(cfg, store, model, metrics.clone(), Arc::new(Health::default()), stop_rx));
    (metrics, stop_tx, service)
}

/// `produce_events` off the runtime's threads (librdkafka's producer blocks).
async fn produce_async(brokers: &str, events: &[Event]) {
    let (b, evs) = (brokers.to_string(), events.to_vec());
    tokio::task::spawn_blocking(move || produce_events(&b, &evs)).await.unwrap();
}

/// Every update published so far, read off the runtime's threads.
async fn updates_async(brokers: &str) -> Vec<prefstream::pipeline::Update> {
    let b = brokers.to_string();
    tokio::task::spawn_blocking(move || updates(&b)).await.unwrap()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Greedy, one lane, one window at a time, queues of one: the smallest pipeline, which a slow
/// stage fills at once.
fn one_window_at_a_time() -> PipelineConfig {
    PipelineConfig {
        sampling: SamplingParams::GREEDY,
        lanes: 1,
        lane_queue: 1,
        max_active_windows: 1,
        window_queue: 1,
        ..PipelineConfig::default()
    }
}

/// A slow stage (one window at a time, queues of one) makes the consumer pause its partitions;
/// it resumes and every window still gets its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_backpressure_pauses_then_resumes() {
    let cluster = mock_cluster();
    let pipeline = one_window_at_a_time();
    let store = Arc::new(MemoryStore::new());
    let (metrics, stop, service) =
        start(cluster.bootstrap_servers(), "onnx".as_ref(), store, pipeline, 1, Duration::from_millis(50)).await;
    let events = synth_events(4, 40, 41);
    produce_async(&cluster.bootstrap_servers(), &events).await;
    let applied = || metrics.windows.with_label_values(&["applied"]).get();
    wait_for("all 40 windows", Duration::from_secs(300), || applied() >= 40).await;
    assert!(metrics.pauses.get() >= 1, "the consumer paused under sustained backpressure");
    assert_eq!(metrics.consumer_paused.get(), 0, "and resumed");
    assert_eq!(metrics.events.with_label_values(&["appended"]).get(), 160);
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), service).await.expect("drains").unwrap().unwrap();
    drop(cluster);
}

/// `--window-idle`: a user who goes quiet with a partial window gets it inferred anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flush_infers_a_partial_window() {
    let cluster = mock_cluster();
    let mut pipeline = PipelineConfig { sampling: SamplingParams::GREEDY, ..PipelineConfig::default() };
    pipeline.window.idle = Some(Duration::from_millis(500));
    let store = Arc::new(MemoryStore::new());
    let (metrics, stop, service) =
        start(cluster.bootstrap_servers(), "onnx".as_ref(), store, pipeline, 64, Duration::from_secs(1)).await;
    let events = synth_events(1, 6, 42); // one full window and a partial one of 2
    produce_async(&cluster.bootstrap_servers(), &events).await;
    let applied = || metrics.windows.with_label_values(&["applied"]).get();
    wait_for("the full and the idle window", Duration::from_secs(120), || applied() >= 2).await;
    let updates = updates_async(&cluster.bootstrap_servers()).await;
    let mut sizes: Vec<usize> = updates.iter().map(|u| u.event_ids.len()).collect();
    sizes.sort();
    assert_eq!(sizes, [2, 4], "a window of 4, then the idle flush of the remaining 2");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), service).await.expect("drains").unwrap().unwrap();
    drop(cluster);
}

/// A model whose outputs fail the format check (its package is cut to 4 new tokens, so no
/// `</answer>` is ever written) never replaces a good description: each window is retried,
/// then parked with the reason, and nothing is published for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_output_keeps_the_description_and_parks_the_window() {
    let cluster = mock_cluster();
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let pipeline = PipelineConfig { sampling: SamplingParams::GREEDY, max_retries: 2, ..PipelineConfig::default() };
    let events = synth_events(1, 8, 43);
    let user = events[0].user_id.clone();

    // A good description first, from the shipped model.
    let (metrics, stop, service) = start(
        cluster.bootstrap_servers(),
        "onnx".as_ref(),
        store.clone(),
        pipeline.clone(),
        64,
        Duration::from_secs(1),
    )
    .await;
    produce_async(&cluster.bootstrap_servers(), &events[..4]).await;
    wait_for("the first window", Duration::from_secs(120), || {
        metrics.windows.with_label_values(&["applied"]).get() >= 1
    })
    .await;
    stop.send(true).unwrap();
    service.await.unwrap().unwrap();
    let good = store.current(&user).await.unwrap().expect("a description");

    // Then a broken package.
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "tokenizer.json"] {
        std::fs::copy(std::path::Path::new("onnx").join(f), dir.path().join(f)).unwrap();
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read("onnx/manifest.json").unwrap()).unwrap();
    manifest["generation"]["max_new_tokens"] = 4.into();
    std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
    let (metrics, stop, service) =
        start(cluster.bootstrap_servers(), dir.path(), store.clone(), pipeline, 64, Duration::from_secs(1)).await;
    produce_async(&cluster.bootstrap_servers(), &events[4..]).await;
    wait_for("the window to be parked", Duration::from_secs(120), || {
        metrics.windows.with_label_values(&["parked"]).get() >= 1
    })
    .await;
    assert_eq!(metrics.invalid_outputs.get(), 3, "the first attempt and two retries");
    assert_eq!(metrics.updates_published.get(), 0);
    assert_eq!(store.current(&user).await.unwrap(), Some(good), "the good description is kept");
    let parked = store.parked(&user).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].attempts, 3);
    assert!(parked[0].reason.starts_with("invalid model output"), "{}", parked[0].reason);
    let ids: Vec<String> = events[4..].iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(parked[0].window, Window::new(&user, events[4..].to_vec()), "parked with its events {ids:?}");
    stop.send(true).unwrap();
    service.await.unwrap().unwrap();
    drop(cluster);
}

/// A full Redis (`maxmemory` with `noeviction`, issue 29 item 3): every write is refused with
/// OOM, so the service takes nothing in (no append, no version) and retries; once memory is
/// freed it goes on, and every event ends in exactly one window, none lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_redis_refuses_writes_then_recovers() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let mut conn = redis.conn();
    let config = |conn: &mut redis::Connection, k: &str, v: &str| {
        let () = redis::cmd("CONFIG").arg("SET").arg(k).arg(v).query(conn).unwrap();
    };
    config(&mut conn, "maxmemory-policy", "noeviction");
    config(&mut conn, "maxmemory", "1"); // below what an empty server uses: every write is refused

    let cluster = mock_cluster();
    let pipeline = PipelineConfig { sampling: SamplingParams::GREEDY, ..PipelineConfig::default() };
    let (metrics, stop, service) =
        start(cluster.bootstrap_servers(), "onnx".as_ref(), Arc::new(store), pipeline, 64, Duration::from_secs(1))
            .await;
    let events = synth_events(3, 8, 51);
    produce_async(&cluster.bootstrap_servers(), &events).await;

    let retries = || metrics.retries.with_label_values(&["redis"]).get();
    wait_for("refused writes to be retried", Duration::from_secs(60), || retries() >= 2).await;
    assert_eq!(metrics.events.with_label_values(&["appended"]).get(), 0, "nothing appended while full");
    assert_eq!(metrics.events.with_label_values(&["dead_lettered"]).get(), 0, "a full Redis is not bad input");
    assert_eq!(metrics.updates_published.get(), 0);
    assert!(!service.is_finished(), "the service waits for Redis rather than exiting");

    config(&mut conn, "maxmemory", "0");
    let applied = || metrics.windows.with_label_values(&["applied"]).get();
    wait_for("all 6 windows after memory is freed", Duration::from_secs(300), || applied() >= 6).await;
    let published = updates_async(&cluster.bootstrap_servers()).await;
    check_ledger(&events, &published, &mut conn, 4);
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), service).await.expect("drains").unwrap().unwrap();
    drop(cluster);
}

/// The real model behind a fixed delay per request: an engine far slower than usual.
struct SlowModel {
    inner: Arc<dyn Inferencer>,
    delay: Duration,
}

#[async_trait::async_trait]
impl Inferencer for SlowModel {
    fn model(&self) -> ModelRef {
        self.inner.model()
    }

    async fn infer(&self, req: Request) -> prefstream::engine::Result<InferResult> {
        tokio::time::sleep(self.delay).await;
        self.inner.infer(req).await
    }
}

/// A slow model (issue 29 item 4): each window takes 1.5 s, ≈ 20× the tiny model's latency
/// here. Backpressure reaches the consumer (partitions paused), a second member joining the
/// group mid-stream gets its partitions within the drain timeout plus the group's own delays,
/// both members drain at shutdown within their timeout, and every event ends in exactly one
/// applied window — none lost, none applied twice (checked on redis-server). It found a
/// consumer left paused for good when a revoke emptied its held records during a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_model_backpressure_rebalance_and_drain() {
    let redis = RedisServer::start();
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let pipeline = one_window_at_a_time();
    let slow = || -> Arc<dyn Inferencer> {
        let engine = Engine::spawn("onnx".as_ref(), Device::Cpu, BatcherConfig::default()).expect("the model loads");
        Arc::new(SlowModel { inner: Arc::new(engine), delay: Duration::from_millis(1500) })
    };
    let group = format!("slow-{}", free_port());
    let member = |store: RedisStore| {
        let mut cfg = service_config(brokers.clone(), group.clone(), pipeline.clone(), 1, Duration::from_millis(50));
        // The mock coordinator waits out a member's session before it completes a join; the
        // default 45 s would hide how long the drain itself takes.
        cfg.kafka.options = ["session.timeout.ms=6000", "heartbeat.interval.ms=500"]
            .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap())
            .to_vec();
        start_member(cfg, Arc::new(store), slow())
    };
    let (a, stop_a, service_a) = member(RedisStore::connect(&redis.url()).await.unwrap());
    let events = synth_events(6, 8, 61); // 12 windows: ≥ 18 s of model time
    produce_async(&brokers, &events).await;
    wait_for("the consumer to pause under a slow model", Duration::from_secs(60), || a.consumer_paused.get() == 1)
        .await;
    let applied = |m: &Metrics| m.windows.with_label_values(&["applied"]).get();
    assert!(applied(&a) < 12, "paused before the backlog was worked off");

    let joined = Instant::now();
    let (b, stop_b, service_b) = member(RedisStore::connect(&redis.url()).await.unwrap());
    wait_for("the new member's partitions", Duration::from_secs(30), || b.assigned_partitions.get() >= 1).await;
    let rebalance = joined.elapsed();
    assert!(a.rebalances.with_label_values(&["revoke"]).get() >= 1, "the first member gave partitions up");
    eprintln!("rebalance under a slow model: {rebalance:?}; applied before: {}", applied(&a));

    let outcomes = |m: &Metrics| {
        ["applied", "already_applied", "parked", "abandoned", "unclaimed", "failed"]
            .map(|o| format!("{o} {}", m.windows.with_label_values(&[o]).get()))
            .join(", ")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while applied(&a) + applied(&b) < 12 {
        assert!(
            Instant::now() < deadline,
            "not every window was applied: A [{}] appended {}, B [{}] appended {}",
            outcomes(&a),
            a.events.with_label_values(&["appended"]).get(),
            outcomes(&b),
            b.events.with_label_values(&["appended"]).get()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published = updates_async(&brokers).await;
    check_ledger(&events, &published, &mut redis.conn(), 4);
    assert_eq!(applied(&a) + applied(&b), 12, "no window applied twice");
    for (stop, service) in [(stop_a, service_a), (stop_b, service_b)] {
        stop.send(true).unwrap();
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), service).await.expect("drains").unwrap().unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "shutdown took {:?}", t.elapsed());
    }
    drop(cluster);
}
