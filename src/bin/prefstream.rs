//! `prefstream`: the serving CLI.

// See Cargo.toml: jemalloc is faster than glibc's malloc on the service's per-event allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use prefstream::config::{parse_duration, KafkaArgs, ModelArgs, OpsArgs, PipelineArgs, ServiceArgs};
use prefstream::engine::{load_package, BatcherConfig, Engine, EngineHandle, InferResult};
use prefstream::event::{parse_event, EventBody};
use prefstream::runtime::Device;
use prefstream::sampling::SamplingParams;
use prefstream::state::redis::RedisStore;
use prefstream::telemetry::{self, Health, LogFormat, Metrics};

#[derive(Parser)]
#[command(name = "prefstream", version, about = "Streaming preference inference (AlignXplore)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Async worker threads (Kafka, Redis, HTTP; the model has its own threads). 0: one per
    /// core. On a small host that also runs Redis or the broker, 1 is faster (fewer context
    /// switches; see docs/benchmarks.md).
    #[arg(long, env = "PREFSTREAM_WORKER_THREADS", default_value_t = 0, global = true)]
    worker_threads: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// The service: consume events (consumer group), keep each user's window in Redis, infer
    /// on every full window, compare-and-set the description, publish updates. SIGTERM drains.
    Run(RunArgs),
    /// The whole service on embedded parts (Kafka mock cluster, in-memory state, the shipped
    /// model) with synthetic users: prints updates as they happen and a summary.
    Demo(DemoArgs),
    /// Re-derive descriptions from a range of the event log (SRE backfills). Never joins the
    /// live consumer group. Modes: --dry-run (report only), default (write what live missed,
    /// live version rules), --rebuild (from no description, staged, swapped in at the end).
    Replay(ReplayArgs),
    /// Validates the configuration and reaches the brokers, Redis, the model and the device.
    Check(CheckArgs),
    /// Infer one user's preference description from a JSONL file of their events.
    Infer(InferArgs),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    #[command(flatten)]
    ops: OpsArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// Synthetic users.
    #[arg(long, env = "PREFSTREAM_DEMO_USERS", default_value_t = 6)]
    users: usize,
    /// Events per user (every --window-size of them make a window).
    #[arg(long, env = "PREFSTREAM_DEMO_EVENTS_PER_USER", default_value_t = 12)]
    events_per_user: usize,
    /// Stop waiting for updates after this long.
    #[arg(long, env = "PREFSTREAM_DEMO_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the summary as JSON.
    #[arg(long, env = "PREFSTREAM_JSON")]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Address for /metrics, /healthz and /readyz while the demo runs; `off` disables it.
    #[arg(long, env = "PREFSTREAM_HTTP", default_value = "off")]
    http: String,
}

#[derive(Args)]
struct ReplayArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    /// Start of the range (RFC 3339, record timestamps; resolved with offsets-for-times).
    #[arg(long, env = "PREFSTREAM_REPLAY_FROM", conflicts_with = "offsets")]
    from: Option<String>,
    /// End of the range, exclusive (RFC 3339). Default: when the replay starts.
    #[arg(long, env = "PREFSTREAM_REPLAY_TO", conflicts_with = "offsets")]
    to: Option<String>,
    /// Explicit per-partition offsets instead of times: `0:100-200,1:0-50` (end exclusive).
    #[arg(long, env = "PREFSTREAM_REPLAY_OFFSETS")]
    offsets: Option<String>,
    /// Only these users (one user id per line).
    #[arg(long, env = "PREFSTREAM_REPLAY_USERS")]
    users: Option<PathBuf>,
    /// Compute and report what would change; write nothing (Redis and topics untouched).
    #[arg(long, env = "PREFSTREAM_REPLAY_DRY_RUN", conflicts_with = "rebuild")]
    dry_run: bool,
    /// Start the selected users from no description in a staging namespace and swap the
    /// results in at the end.
    #[arg(long, env = "PREFSTREAM_REPLAY_REBUILD")]
    rebuild: bool,
    /// Rebuild: also replace live descriptions derived from events this replay did not read.
    #[arg(long, env = "PREFSTREAM_REPLAY_FORCE", requires = "rebuild")]
    force: bool,
    /// Read at most this many events per second.
    #[arg(long, env = "PREFSTREAM_REPLAY_MAX_EVENTS_PER_SEC")]
    max_events_per_sec: Option<f64>,
    /// Windows inferred concurrently.
    #[arg(long, env = "PREFSTREAM_REPLAY_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Checkpoint file: progress is saved there, and a replay started with an existing one
    /// resumes where it stopped (write and rebuild modes).
    #[arg(long, env = "PREFSTREAM_REPLAY_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
    /// Write the final report (JSON) here as well as printing a summary.
    #[arg(long, env = "PREFSTREAM_REPLAY_REPORT")]
    report: Option<PathBuf>,
    /// Replay id (names the staging namespace). Default: derived from the start time.
    #[arg(long, env = "PREFSTREAM_REPLAY_ID")]
    id: Option<String>,
    /// The log counts as read to its end after this long without a record.
    #[arg(long, env = "PREFSTREAM_REPLAY_IDLE_END", default_value = "3s", value_parser = parse_duration)]
    idle_end: Duration,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    /// Create missing topics (events and updates with this many partitions, the DLQ with one;
    /// the updates topic compacted).
    #[arg(long, env = "PREFSTREAM_CREATE_TOPICS")]
    create_topics: Option<i32>,
    /// Replication factor of topics created by --create-topics.
    #[arg(long, env = "PREFSTREAM_REPLICATION", default_value_t = 1)]
    replication: i32,
    /// How long to wait for each dependency.
    #[arg(long, env = "PREFSTREAM_CHECK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct InferArgs {
    /// Model package directory (model.onnx, tokenizer.json, manifest.json).
    #[arg(long, env = "PREFSTREAM_MODEL", default_value = "onnx")]
    model: PathBuf,
    /// Events of one user, one JSON event per line.
    #[arg(long, env = "PREFSTREAM_EVENTS")]
    events: PathBuf,
    /// The user's previous description (streaming setting); none means "Not provided".
    #[arg(long, env = "PREFSTREAM_PREVIOUS")]
    previous: Option<String>,
    /// cpu, cuda or cuda:N. CUDA never falls back to CPU.
    #[arg(long, env = "PREFSTREAM_DEVICE", default_value = "cpu")]
    device: Device,
    /// Print one JSON object instead of text.
    #[arg(long, env = "PREFSTREAM_JSON")]
    json: bool,
    /// Greedy decoding instead of the paper's sampling (T=0.9, top-p 0.95, top-k 10).
    #[arg(long, env = "PREFSTREAM_GREEDY")]
    greedy: bool,
    #[arg(long, env = "PREFSTREAM_SEED", default_value_t = 0)]
    seed: u64,
    /// Overrides the package's generation.max_new_tokens.
    #[arg(long, env = "PREFSTREAM_MAX_NEW_TOKENS")]
    max_new_tokens: Option<usize>,
    /// Overrides the package's generation.no_repeat_ngram (0 turns the constraint off).
    #[arg(long, env = "PREFSTREAM_NO_REPEAT_NGRAM")]
    no_repeat_ngram: Option<usize>,
    /// Signals per prompt. Longer files are read as the stream would deliver them: window by
    /// window, each valid description becoming the next window's previous one.
    #[arg(long, env = "PREFSTREAM_WINDOW", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    window: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = || runtime(cli.worker_threads);
    match cli.cmd {
        Cmd::Run(args) => {
            telemetry::init_logging(args.ops.log_format);
            runtime()?.block_on(run(args))
        }
        Cmd::Demo(args) => {
            telemetry::init_logging(LogFormat::Text);
            runtime()?.block_on(demo(args))
        }
        Cmd::Replay(args) => {
            telemetry::init_logging(LogFormat::Text);
            runtime()?.block_on(replay(args))
        }
        Cmd::Check(args) => {
            telemetry::init_logging(LogFormat::Text);
            runtime()?.block_on(check(args))
        }
        Cmd::Infer(args) => {
            telemetry::init_logging(LogFormat::Text);
            infer(args)
        }
    }
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    Ok(builder.enable_all().build()?)
}

fn start_engine(model: &ModelArgs) -> Result<EngineHandle> {
    let config = BatcherConfig {
        max_batch: model.max_batch.max(1),
        max_wait_ms: model.batch_wait.as_millis() as u64,
        ..BatcherConfig::default()
    };
    Engine::spawn(&model.model, model.device, config).with_context(|| package_error(&model.model, model.device))
}

/// The context of every failed package load: which package, and how to get a good one.
fn package_error(path: &std::path::Path, device: impl std::fmt::Display) -> String {
    format!(
        "loading model package {} on {device} (a package is a directory of manifest.json, the model and \
         tokenizer files it names: `--model onnx` is the shipped one, `scripts/base-package.sh` assembles \
         the SmolLM2 one, `prefstream-train all --install DIR` trains a new one)",
        path.display()
    )
}

/// The state store of `run`, `replay` and `check`: one server or a Cluster, TLS, and the
/// replicas each write waits for.
async fn connect_redis(svc: &ServiceArgs) -> Result<RedisStore> {
    let store = RedisStore::open(&svc.redis_url, &svc.redis.tls(), svc.redis.redis_cluster)
        .await
        .with_context(|| format!("cannot reach Redis at {}", telemetry::redact_url(&svc.redis_url)))?;
    Ok(store.with_wait_replicas(svc.redis.redis_wait_replicas))
}

async fn run(args: RunArgs) -> Result<()> {
    let cfg = args.svc.pipeline.service(&args.svc.kafka, &args.svc.model).map_err(anyhow::Error::msg)?;
    let http = args.ops.http_addr().map_err(anyhow::Error::msg)?;
    tracing::info!(
        brokers = %args.svc.kafka.brokers,
        kafka_options = ?telemetry::redact_pairs(&args.svc.kafka.kafka_options),
        group = %args.svc.kafka.group,
        events = %args.svc.kafka.events_topic,
        updates = %args.svc.kafka.updates_topic,
        dlq = %args.svc.kafka.dlq_topic,
        redis = %telemetry::redact_url(&args.svc.redis_url),
        model = %args.svc.model.model.display(),
        device = %args.svc.model.device,
        window_size = cfg.pipeline.window.size,
        "starting prefstream"
    );
    let (metrics, health) = (Metrics::new(), Arc::new(Health::default()));
    metrics.install_global();
    let (stop_tx, stop_rx) = prefstream::service::shutdown_on_signals();
    if let Some(addr) = http {
        let mut rx = stop_rx.clone();
        let bound = telemetry::serve_http(addr, metrics.clone(), health.clone(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .with_context(|| format!("cannot listen on {addr} (--http)"))?;
        tracing::info!(%bound, "serving /metrics /healthz /readyz");
    }
    let engine = start_engine(&args.svc.model)?;
    health.engine.store(true, Ordering::Relaxed);
    let store = connect_redis(&args.svc).await?;
    health.redis.store(true, Ordering::Relaxed);
    let stopping = health.clone();
    let mut watch = stop_rx.clone();
    tokio::spawn(async move {
        let _ = watch.wait_for(|s| *s).await;
        stopping.stopping.store(true, Ordering::Relaxed);
    });
    let summary = prefstream::service::serve(cfg, Arc::new(store), Arc::new(engine), metrics, health, stop_rx).await;
    drop(stop_tx);
    let summary = summary?;
    tracing::info!(records = summary.records, windows = summary.windows_started, "stopped cleanly");
    Ok(())
}

async fn demo(args: DemoArgs) -> Result<()> {
    let kafka = KafkaArgs {
        brokers: String::new(),
        kafka_options: Vec::new(),
        group: "prefstream-demo".into(),
        events_topic: "prefstream.events".into(),
        updates_topic: "prefstream.updates".into(),
        dlq_topic: "prefstream.events.dlq".into(),
    };
    let cfg = args.pipeline.service(&kafka, &args.model).map_err(anyhow::Error::msg)?;
    let (metrics, health) = (Metrics::new(), Arc::new(Health::default()));
    if args.http != "off" {
        let addr = args.http.parse().with_context(|| format!("--http {:?}", args.http))?;
        telemetry::serve_http(addr, metrics.clone(), health.clone(), std::future::pending()).await?;
    }
    eprintln!("loading model {} on {}", args.model.model.display(), args.model.device);
    let engine = start_engine(&args.model)?;
    health.engine.store(true, Ordering::Relaxed);
    let demo_cfg = prefstream::demo::DemoConfig {
        users: args.users,
        events_per_user: args.events_per_user,
        seed: args.model.seed,
        timeout: args.timeout,
    };
    let s = prefstream::demo::run(demo_cfg, cfg, Arc::new(engine), metrics, health).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "\nsummary: {} users, {} events, {} dead letters, {}/{} windows published, {} invalid outputs \
             (retried), {} parked, {:.1} s ({:.2} windows/s)",
            s.users,
            s.events,
            s.dead_letters,
            s.updates,
            s.windows_expected,
            s.invalid_outputs,
            s.parked,
            s.seconds,
            s.windows_per_sec
        );
    }
    if ((s.updates + s.parked) as usize) < s.windows_expected {
        bail!("the demo did not finish: {} of {} windows", s.updates + s.parked, s.windows_expected);
    }
    Ok(())
}

fn rfc3339_ms(s: &str, flag: &str) -> Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("{flag} {s:?} is not RFC 3339"))?
        .timestamp_millis())
}

async fn replay(args: ReplayArgs) -> Result<()> {
    use prefstream::kafka::reader::{parse_offsets, resolve_times};
    use prefstream::replay::{Mode, ReplayConfig};
    let mut pipeline = args.svc.pipeline.pipeline(&args.svc.model).map_err(anyhow::Error::msg)?;
    pipeline.max_active_windows = args.concurrency.max(1);
    let client = args.svc.kafka.client();
    let topics = args.svc.kafka.topics();
    let range = match (&args.offsets, &args.from) {
        (Some(o), _) => parse_offsets(o).map_err(anyhow::Error::msg)?,
        (None, Some(from)) => {
            let from = rfc3339_ms(from, "--from")?;
            let to = match &args.to {
                Some(t) => rfc3339_ms(t, "--to")?,
                None => chrono::Utc::now().timestamp_millis(),
            };
            anyhow::ensure!(from < to, "--from must be before --to");
            let (c, t) = (client.clone(), topics.events.clone());
            tokio::task::spawn_blocking(move || resolve_times(&c, &t, from, to)).await??
        }
        (None, None) => bail!("give a range: --from/--to (RFC 3339) or --offsets P:START-END,..."),
    };
    let users = match &args.users {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--users {}", path.display()))?;
            Some(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        }
        None => None,
    };
    let mode = if args.dry_run {
        Mode::DryRun
    } else if args.rebuild {
        Mode::Rebuild
    } else {
        Mode::Write
    };
    let id = args.id.clone().unwrap_or_else(|| chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string());
    let events_in_range: Option<u64> = match &range.end {
        prefstream::kafka::reader::End::Offsets(end) => {
            Some(range.start.iter().map(|(p, s)| end.get(p).map_or(0, |e| (e - s).max(0) as u64)).sum())
        }
        prefstream::kafka::reader::End::Time(_) => None,
    };
    let cfg = ReplayConfig {
        kafka: client,
        topics,
        range,
        mode,
        force: args.force,
        users,
        max_events_per_sec: args.max_events_per_sec,
        checkpoint: args.checkpoint.clone(),
        id,
        pipeline,
        idle_end: args.idle_end,
    };
    let engine = start_engine(&args.svc.model)?;
    let live = connect_redis(&args.svc).await?;
    let (_stop_tx, stop_rx) = prefstream::service::shutdown_on_signals();
    let bar = match events_in_range {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} events [{elapsed_precise}, ETA {eta}] {per_sec}",
        )
        .expect("valid template"),
    );
    let progress_bar = bar.clone();
    let report =
        prefstream::replay::run(cfg, live, Arc::new(engine), stop_rx, move |n| progress_bar.set_position(n)).await;
    bar.finish_and_clear();
    let report = report?;
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("--report {}", path.display()))?;
    }
    println!("{}", report.summary());
    for c in &report.changes {
        println!("  {}: {:?} -> {:?}", c.user, c.before.as_deref().unwrap_or("(none)"), c.after);
    }
    if !report.errors.is_empty() {
        bail!("{} error(s): {}", report.errors.len(), report.errors.join("; "));
    }
    Ok(())
}

async fn check(args: CheckArgs) -> Result<()> {
    let mut failed = 0;
    let mut report = |what: &str, r: Result<String>| match r {
        Ok(detail) => println!("ok    {what}: {detail}"),
        Err(e) => {
            failed += 1;
            println!("FAIL  {what}: {e:#}");
        }
    };
    report(
        "configuration",
        args.svc
            .pipeline
            .service(&args.svc.kafka, &args.svc.model)
            .map(|c| format!("window size {}", c.pipeline.window.size))
            .map_err(anyhow::Error::msg),
    );
    let client = args.svc.kafka.client();
    if let Some(parts) = args.create_topics {
        let topics = args.svc.kafka.topics();
        let r = client
            .ensure_topics(
                &[(&topics.events, parts, false), (&topics.updates, parts, true), (&topics.dlq, 1, false)],
                args.replication,
            )
            .await;
        report("create topics", r.map(|_| "created or present".into()).map_err(Into::into));
    }
    let names = [
        args.svc.kafka.events_topic.as_str(),
        args.svc.kafka.updates_topic.as_str(),
        args.svc.kafka.dlq_topic.as_str(),
    ];
    let timeout = args.timeout;
    let described = tokio::task::spawn_blocking({
        let client = client.clone();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        move || client.describe(&names.iter().map(String::as_str).collect::<Vec<_>>(), timeout)
    })
    .await?;
    match described {
        Ok(parts) => {
            report("brokers", Ok(args.svc.kafka.brokers.clone()));
            for (name, p) in names.iter().zip(parts) {
                let r = p
                    .map(|n| format!("{n} partitions"))
                    .context("topic does not exist (create it, or run `prefstream check --create-topics N`)");
                report(&format!("topic {name}"), r);
            }
        }
        Err(e) => {
            report("brokers", Err(anyhow::Error::new(e).context(format!("cannot reach {}", args.svc.kafka.brokers))))
        }
    }
    let redis =
        tokio::time::timeout(timeout, async { Ok::<_, anyhow::Error>(connect_redis(&args.svc).await?.ping().await?) })
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))
            .and_then(|r| r);
    report(&format!("redis {}", telemetry::redact_url(&args.svc.redis_url)), redis);
    let model = args.svc.model.clone();
    let engine = tokio::task::spawn_blocking(move || -> Result<String> {
        let (manifest, mut generator) = load_package(&model.model, &model.device)?;
        generator.max_new_tokens = 4;
        let started = Instant::now();
        generator.generate(&[manifest.template.build_prompt(None, &[])], &SamplingParams::GREEDY, 0)?;
        Ok(format!(
            "{} {} ran on {} ({:.0} ms for 4 tokens)",
            manifest.name,
            manifest.version,
            model.device,
            started.elapsed().as_secs_f64() * 1e3
        ))
    })
    .await?;
    report(&format!("model {}", args.svc.model.model.display()), engine);
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// Reads the signals of one user; rejects bad lines (with file:line), mixed users and forgets.
fn read_signals(path: &Path) -> Result<Vec<EventBody>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut user: Option<String> = None;
    let mut signals = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), n + 1);
        let event = parse_event(line.as_bytes()).with_context(|| format!("{at}: invalid event"))?;
        match &user {
            None => user = Some(event.user_id.clone()),
            Some(u) if *u != event.user_id => {
                bail!(
                    "{at}: event of user {:?}, but the file started with user {u:?}; give one user's events",
                    event.user_id
                )
            }
            Some(_) => {}
        }
        if event.body == EventBody::Forget {
            bail!("{at}: a forget event cannot be inferred from");
        }
        signals.push(event.body);
    }
    if signals.is_empty() {
        bail!("{}: no events", path.display());
    }
    Ok(signals)
}

fn infer(args: InferArgs) -> Result<()> {
    let signals = read_signals(&args.events)?;
    let (manifest, mut generator) =
        load_package(&args.model, &args.device).with_context(|| package_error(&args.model, args.device))?;
    if let Some(n) = args.max_new_tokens {
        generator.max_new_tokens = n;
    }
    if let Some(n) = args.no_repeat_ngram {
        generator.no_repeat_ngram = n;
    }
    let params = if args.greedy { SamplingParams::GREEDY } else { SamplingParams::PAPER };
    let started = Instant::now();
    let (mut previous, mut tokens, mut result) = (args.previous.clone(), 0, None);
    for window in signals.chunks(args.window as usize) {
        let prompt = manifest.template.build_prompt(previous.as_deref(), window);
        let outputs = generator.generate(&[prompt], &params, args.seed)?;
        let r = InferResult::from_output(&outputs[0], 0.0);
        tokens += r.tokens;
        // As in serving: an invalid output never replaces a good description.
        if r.description.is_some() {
            previous = r.description.clone();
        }
        result = Some(r);
    }
    let mut result = result.context("no events")?;
    result.tokens = tokens;
    result.latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let windows = signals.len().div_ceil(args.window as usize);
    if args.json {
        let mut v = serde_json::to_value(&result)?;
        v["model"] = manifest.name.into();
        v["model_version"] = manifest.version.into();
        v["device"] = args.device.to_string().into();
        v["windows"] = windows.into();
        println!("{v}");
    } else {
        println!("Reasoning:\n{}\n", result.reasoning);
        match (&result.description, &result.format_error) {
            (Some(d), _) => println!("Description:\n{d}"),
            (None, e) => {
                println!("Description: none (output failed the format check: {})", e.as_deref().unwrap_or("?"))
            }
        }
        eprintln!(
            "{} tokens, {windows} window(s), {:.1} ms ({} {})",
            result.tokens, result.latency_ms, manifest.name, manifest.version
        );
    }
    Ok(())
}
