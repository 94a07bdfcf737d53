//! `prefstream demo`: the whole service on embedded parts — librdkafka's in-process mock cluster,
//! the in-memory state store (same trait as Redis) and the shipped model — fed with synthetic
//! users. Prints updates as they are published and a summary at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::watch;

use crate::engine::Inferencer;
use crate::kafka::KafkaClient;
use crate::pipeline::Update;
use crate::service::{serve, ServiceConfig};
use crate::state::memory::MemoryStore;
use crate::telemetry::{Health, Metrics};
use crate::train::synth::{generate, SynthConfig};

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub users: usize,
    pub events_per_user: usize,
    pub seed: u64,
    /// Give up waiting for updates after this long.
    pub timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoSummary {
    pub users: usize,
    pub events: usize,
    pub malformed: usize,
    pub dead_letters: u64,
    pub windows_expected: usize,
    pub updates: u64,
    pub invalid_outputs: u64,
    pub parked: u64,
    pub seconds: f64,
    pub windows_per_sec: f64,
}

/// Runs the demo; `service` carries the pipeline settings (its brokers are replaced by the
/// mock cluster's).
pub async fn run(
    cfg: DemoConfig,
    mut service: ServiceConfig,
    inferencer: Arc<dyn Inferencer>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<DemoSummary> {
    // `MockCluster` is !Send: it lives in this (non-spawned) future.
    let cluster = MockCluster::new(1)?;
    service.kafka = KafkaClient { brokers: cluster.bootstrap_servers(), options: service.kafka.options.clone() };
    let topics = service.topics.clone();
    // (The mock cluster's admin API does not create topics; its own call does.)
    for (topic, parts) in [(&topics.events, 4), (&topics.updates, 4), (&topics.dlq, 1)] {
        cluster.create_topic(topic, parts, 1)?;
    }
    health.redis.store(true, std::sync::atomic::Ordering::Relaxed);

    let world = generate(&SynthConfig {
        seed: cfg.seed,
        users: cfg.users,
        test_users: 0,
        signals_per_user: cfg.events_per_user,
        test_pairs_per_user: 1,
        ..SynthConfig::default()
    });
    let producer: FutureProducer = service.kafka.config().create()?;
    let mut per_user = std::collections::HashMap::<String, usize>::new();
    for e in &world.events {
        *per_user.entry(e.user_id.clone()).or_default() += 1;
    }
    // All in flight at once (awaiting each delivery in turn costs a linger per event).
    let payloads: Vec<String> = world.events.iter().map(|e| e.to_json()).collect();
    let sends = world.events.iter().zip(&payloads).map(|(e, payload)| {
        producer.send(FutureRecord::to(&topics.events).key(&e.user_id).payload(payload), Timeout::Never)
    });
    futures::future::try_join_all(sends).await.map_err(|(e, _)| e)?;
    // Bad input goes to the dead-letter topic and the stream goes on.
    let malformed: [(&str, &str); 2] = [
        ("u-bad", "{this is not json"),
        (
            "u-bad",
            r#"{"schema_version":1,"event_id":"x","user_id":"u-bad","ts":"2026-11-26T10:00:00Z","kind":"click"}"#,
        ),
    ];
    for (key, payload) in malformed {
        producer
            .send(FutureRecord::to(&topics.events).key(key).payload(payload), Timeout::Never)
            .await
            .map_err(|(e, _)| e)?;
    }
    let windows_expected: usize = per_user.values().map(|n| n / service.pipeline.window.size).sum();
    println!(
        "demo: {} users, {} events (+{} malformed) on an embedded Kafka mock cluster; {} windows to infer",
        per_user.len(),
        world.events.len(),
        malformed.len(),
        windows_expected
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = watch_updates(&service.kafka, &topics.updates, &topics.dlq)?;
    let started = Instant::now();
    let store = Arc::new(MemoryStore::new());
    let serve_fut = serve(service, store, inferencer, metrics.clone(), health, stop_rx);
    tokio::pin!(serve_fut);
    let done = |m: &Metrics| {
        let finished = m.windows.with_label_values(&["applied"]).get() + m.windows.with_label_values(&["parked"]).get();
        finished as usize >= windows_expected && m.events.with_label_values(&["dead_lettered"]).get() >= 2
    };
    let watcher = tokio::spawn(watcher);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut serve_fut => { r?; break; }
            _ = tick.tick() => {
                if done(&metrics) || started.elapsed() > cfg.timeout {
                    if !done(&metrics) {
                        println!("demo: timed out after {:?}", cfg.timeout);
                    }
                    // Let the last updates reach the watcher, then drain and stop.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let updates = metrics.updates_published.get();
    // Every client closes before the cluster goes away (a client of a vanished cluster
    // blocks on close).
    watcher.abort();
    let _ = watcher.await;
    drop(producer);
    drop(cluster);
    Ok(DemoSummary {
        users: per_user.len(),
        events: world.events.len(),
        malformed: malformed.len(),
        dead_letters: metrics.events.with_label_values(&["dead_lettered"]).get(),
        windows_expected,
        updates,
        invalid_outputs: metrics.invalid_outputs.get(),
        parked: metrics.windows.with_label_values(&["parked"]).get(),
        seconds,
        windows_per_sec: updates as f64 / seconds,
    })
}

/// Prints every update and dead letter as it arrives (a separate consumer group, as a
/// recommendation service would read them).
fn watch_updates(
    client: &KafkaClient,
    updates: &str,
    dlq: &str,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut cfg = client.config();
    cfg.set("group.id", "prefstream-demo-watch").set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cfg.create()?;
    consumer.subscribe(&[updates, dlq])?;
    let (updates, dlq) = (updates.to_string(), dlq.to_string());
    Ok(async move {
        let mut stream = consumer.stream();
        while let Some(Ok(m)) = stream.next().await {
            if m.topic() == dlq {
                let reason = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == crate::kafka::sink::HEADER_ERROR))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                println!("dead letter  {reason}");
            } else if m.topic() == updates {
                match m.payload().map(serde_json::from_slice::<Update>) {
                    Some(Ok(u)) => println!("{:<14} v{:<3} {}", u.user_id, u.version, u.description),
                    Some(Err(e)) => println!("unreadable update: {e}"),
                    None => println!("tombstone    {}", String::from_utf8_lossy(m.key().unwrap_or_default())),
                }
            }
        }
    })
}
