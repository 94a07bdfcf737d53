//! Service throughput (`harness = false`): events through consume → validate → window (Redis)
//! → infer → compare-and-set (Redis) → publish, on librdkafka's mock cluster and a real
//! redis-server started here.
//!
//! ```text
//! cargo bench --bench pipeline -- [--events N] [--users U] [--lanes L] [--model DIR] [--windows W] [--workers T] [--cluster P] [--skip-model]
//! ```
//!
//! Two runs:
//! 1. the delivery machinery alone: the model is replaced by an *instant inferencer* (this file
//!    only; the product always runs the real model) — events/s until every event is durable and
//!    every window's update is acknowledged, Redis commands and CPU per event (`INFO stats`,
//!    `INFO cpu`) — on one redis-server, then on a Redis Cluster of P primaries (default 3);
//! 2. the real default model end to end: windows/s (W windows, default 256).

// The service binary's allocator (src/bin/prefstream.rs), so the bench measures what ships.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prefstream::engine::{BatcherConfig, Engine, InferResult, Inferencer, ModelRef, Request, Result as EngineResult};
use prefstream::kafka::KafkaClient;
use prefstream::pipeline::PipelineConfig;
use prefstream::runtime::Device;
use prefstream::sampling::SamplingParams;
use prefstream::service::{serve, ServiceConfig, Topics};
use prefstream::state::redis::RedisStore;
use prefstream::telemetry::{Health, Metrics};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::json;

/// Answers at once with a valid description (bench only).
struct InstantInferencer;

#[async_trait::async_trait]
impl Inferencer for InstantInferencer {
    fn model(&self) -> ModelRef {
        ModelRef { name: "instant".into(), version: "0".into(), template: prefstream::prompt::TEMPLATE_ID.into() }
    }

    async fn infer(&self, req: Request) -> EngineResult<InferResult> {
        Ok(InferResult {
            description: Some(format!("likes {} things", req.signals.len())),
            reasoning: String::new(),
            format_ok: true,
            format_error: None,
            raw: String::new(),
            tokens: 0,
            latency_ms: 0.0,
        })
    }
}

/// The Redis the bench runs against: one `redis-server`, or a Redis Cluster of `primaries`
/// cluster-enabled servers made with `redis-cli --cluster create` (all on localhost).
struct Redis {
    nodes: Vec<(Child, u16)>,
    _dirs: Vec<tempfile::TempDir>,
}

fn spawn_server(extra: &[&str], dir: &std::path::Path) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/redis.sh installs it)");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

impl Redis {
    fn start(primaries: usize) -> Self {
        let dirs: Vec<_> = (0..primaries.max(1)).map(|_| tempfile::tempdir().unwrap()).collect();
        if primaries <= 1 {
            return Self { nodes: vec![spawn_server(&[], dirs[0].path())], _dirs: dirs };
        }
        let cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"];
        let nodes: Vec<_> = dirs.iter().map(|d| spawn_server(&cluster, d.path())).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|(_, p)| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create");
        let r = Self { nodes, _dirs: dirs };
        while !r.nodes.iter().all(|(_, p)| r.query(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            std::thread::sleep(Duration::from_millis(100));
        }
        r
    }

    fn url(&self) -> String {
        self.nodes.iter().map(|(_, p)| format!("redis://127.0.0.1:{p}/")).collect::<Vec<_>>().join(",")
    }

    fn query(&self, port: u16, args: &[&str]) -> String {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
        redis::cmd(args[0]).arg(&args[1..]).query(&mut c).unwrap()
    }

    /// A number from `INFO section`, summed over the nodes.
    fn sum(&self, section: &str, key: &str) -> f64 {
        self.nodes
            .iter()
            .map(|(_, p)| {
                let info = self.query(*p, &["INFO", section]);
                info.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            })
            .sum()
    }

    /// (commands processed, socket reads processed, CPU seconds used): reads per command shows
    /// how well the service's requests are pipelined (each read costs the server a syscall).
    fn stats(&self) -> (u64, u64, f64) {
        (
            self.sum("stats", "total_commands_processed") as u64,
            self.sum("stats", "total_reads_processed") as u64,
            self.sum("cpu", "used_cpu_user") + self.sum("cpu", "used_cpu_sys"),
        )
    }

    /// Where the servers' time went: `INFO commandstats` summed over the nodes, largest first
    /// (commands run inside scripts are counted both on their own line and in the EVALSHA that
    /// ran them).
    fn command_time(&self) -> Vec<(String, u64, f64)> {
        let mut by_name: std::collections::BTreeMap<String, (u64, f64)> = Default::default();
        for (_, p) in &self.nodes {
            for l in self.query(*p, &["INFO", "commandstats"]).lines() {
                let Some((name, rest)) = l.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
                let field = |k: &str| rest.split(',').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
                let (Some(calls), Some(usec)) = (field("calls"), field("usec")) else { continue };
                let e = by_name.entry(name.to_string()).or_default();
                e.0 += calls.parse::<u64>().unwrap_or(0);
                e.1 += usec.parse::<f64>().unwrap_or(0.0);
            }
        }
        let mut rows: Vec<(String, u64, f64)> = by_name.into_iter().map(|(n, (c, u))| (n, c, u)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        for (c, _) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Args {
    skip_model: bool,
    /// Primaries of the Redis Cluster run beside the one-node run (0: no cluster run).
    cluster: usize,
    events: usize,
    users: usize,
    lanes: usize,
    windows: usize,
    model: String,
    /// Tokio worker threads (`prefstream --worker-threads`); 1 measured fastest on 2 cores.
    workers: usize,
}

fn args() -> Args {
    let mut a = Args {
        skip_model: false,
        cluster: 3,
        events: 200_000,
        users: 25_000,
        lanes: 64,
        windows: 256,
        model: "onnx".into(),
        workers: 1,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--events" => a.events = val().parse().unwrap(),
            "--users" => a.users = val().parse().unwrap(),
            "--lanes" => a.lanes = val().parse().unwrap(),
            "--windows" => a.windows = val().parse().unwrap(),
            "--model" => a.model = val(),
            "--workers" => a.workers = val().parse().unwrap(),
            "--cluster" => a.cluster = val().parse().unwrap(),
            "--skip-model" => {
                a.skip_model = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue; // cargo bench passes `--bench`
            }
        }
        i += 2;
    }
    a
}

fn produce(brokers: &str, events: usize, users: usize) {
    let p: ThreadedProducer<DefaultProducerContext> = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    for i in 0..events {
        let user = format!("user-{:06}", i % users);
        let payload = json!({
            "schema_version": 1, "event_id": format!("ev-{i:08}"), "user_id": user,
            "ts": "2026-11-26T10:00:00Z", "kind": "ugc", "text": "I mostly read history books on the train."
        })
        .to_string();
        loop {
            match p.send(BaseRecord::to("prefstream.events").key(&user).payload(&payload)) {
                Ok(()) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
    p.flush(Duration::from_secs(120)).unwrap();
}

struct Outcome {
    seconds: f64,
    durable_seconds: f64,
    updates: u64,
    redis_commands: u64,
    redis_reads: u64,
    redis_cpu: f64,
}

async fn run_once(
    events: usize,
    users: usize,
    lanes: usize,
    inferencer: Arc<dyn Inferencer>,
    max_active: usize,
    primaries: usize,
) -> Outcome {
    let redis = Redis::start(primaries);
    let cluster = MockCluster::new(1).unwrap();
    let topics = Topics::default();
    // The mock broker keeps at most 5 MB / 100,000 records per partition and silently drops
    // older ones: 16 partitions hold the default 200,000 events with room to spare.
    for (t, p) in [(&topics.events, 16), (&topics.updates, 16), (&topics.dlq, 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || produce(&b, events, users)).await.unwrap();
    let store = RedisStore::open(&redis.url(), &Default::default(), false).await.unwrap();
    let cfg = ServiceConfig {
        kafka: KafkaClient { brokers, options: vec![] },
        group: "bench".into(),
        topics,
        pipeline: PipelineConfig {
            lanes,
            max_active_windows: max_active,
            sampling: SamplingParams::GREEDY,
            ..PipelineConfig::default()
        },
        commit_interval: Duration::from_secs(1),
        pause_after: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(10),
        buffer: 8192,
    };
    let (metrics, health) = (Metrics::new(), Arc::new(Health::default()));
    health.redis.store(true, Ordering::Relaxed);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let before = redis.stats();
    let m = metrics.clone();
    let task = tokio::spawn(serve(cfg, Arc::new(store), inferencer, m, health, stop_rx));
    let want_updates = (users * (events / users / 4)) as u64; // events spread evenly over users
                                                              // Timing starts when the first record arrives (the group join is not throughput).
    let appended = || metrics.events.with_label_values(&["appended"]).get();
    while appended() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let mut durable_seconds = 0.0;
    let mut last_report = Instant::now();
    loop {
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "progress: appended {} duplicates {} updates {} windows in stage {} paused {}",
                appended(),
                metrics.events.with_label_values(&["duplicate"]).get(),
                metrics.updates_published.get(),
                metrics.windows_inflight.get(),
                metrics.consumer_paused.get()
            );
        }
        if durable_seconds == 0.0 && appended() as usize >= events {
            durable_seconds = started.elapsed().as_secs_f64();
        }
        if metrics.updates_published.get() >= want_updates && durable_seconds > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = redis.stats();
    let rows = redis.command_time();
    let total: f64 = rows.iter().filter(|r| r.0 != "evalsha" && r.0 != "exec").map(|r| r.2).sum();
    eprintln!("redis time by command (µs per event; commands inside scripts also count in evalsha):");
    for (name, calls, usec) in rows.into_iter().take(12) {
        eprintln!("  {name:<18} {calls:>9} calls  {:>7.2} µs/event", usec / events as f64);
    }
    eprintln!("  (commands outside evalsha/exec totals: {:.2} µs/event)", total / events as f64);
    let (redis_commands, redis_reads, redis_cpu) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    drop(cluster);
    Outcome {
        seconds,
        durable_seconds,
        updates: metrics.updates_published.get(),
        redis_commands,
        redis_reads,
        redis_cpu,
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.workers).enable_all().build().unwrap();
    rt.block_on(bench(a));
}

async fn bench(a: Args) {
    prefstream::telemetry::init_logging(prefstream::telemetry::LogFormat::Text);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "machine: {cores} cores; mock cluster (in-process) + redis-server (localhost); {} tokio worker(s)\n",
        a.workers
    );

    println!("| run | events | windows | seconds | events/s | Redis commands/event | Redis socket reads/event | Redis CPU µs/event |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut setups = vec![(1, "one node".to_string())];
    if a.cluster > 1 {
        setups.push((a.cluster, format!("Redis Cluster of {} primaries", a.cluster)));
    }
    for (primaries, name) in setups {
        let o = run_once(a.events, a.users, a.lanes, Arc::new(InstantInferencer), 256, primaries).await;
        println!(
            "| instant inferencer, {name}, to durable (appended) | {} | – | {:.2} | {:.0} | – | – | – |",
            a.events,
            o.durable_seconds,
            a.events as f64 / o.durable_seconds
        );
        println!(
            "| instant inferencer, {name}, all updates published | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} |",
            a.events,
            o.updates,
            o.seconds,
            a.events as f64 / o.seconds,
            o.redis_commands as f64 / a.events as f64,
            o.redis_reads as f64 / a.events as f64,
            o.redis_cpu * 1e6 / a.events as f64
        );
    }

    if a.skip_model {
        return;
    }
    let engine = Engine::spawn(a.model.as_ref(), Device::Cpu, BatcherConfig { max_batch: 16, ..Default::default() })
        .expect("model package (run scripts/setup.sh)");
    let users = a.windows.min(64);
    let events = a.windows * 4;
    let o = run_once(events, users, a.lanes, Arc::new(engine), 32, 1).await;
    println!(
        "| default model ({}), max batch 16 | {} | {} | {:.2} | {:.0} ({:.2} windows/s) | {:.2} | {:.2} | {:.1} |",
        a.model,
        events,
        o.updates,
        o.seconds,
        events as f64 / o.seconds,
        o.updates as f64 / o.seconds,
        o.redis_commands as f64 / events as f64,
        o.redis_reads as f64 / events as f64,
        o.redis_cpu * 1e6 / events as f64
    );
}
