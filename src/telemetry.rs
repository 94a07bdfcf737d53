//! Observability: metrics (the `metrics` facade, exported in Prometheus's text format),
//! readiness flags, the `/metrics` `/healthz` `/readyz` HTTP endpoint, logging setup, and
//! redaction of secrets before anything is logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// The service's recorder, shared by its handles and (after [`Metrics::install_global`]) by
/// the `metrics` macros of any library, so everything lands in the one `/metrics`.
#[derive(Clone)]
struct SharedRecorder(Arc<PrometheusRecorder>);

impl Recorder for SharedRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Counter {
        self.0.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Gauge {
        self.0.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Histogram {
        self.0.register_histogram(key, metadata)
    }
}

const METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

fn key(name: &str, label: Option<(&'static str, &str)>) -> Key {
    match label {
        Some((k, v)) => Key::from_parts(name.to_string(), vec![metrics::Label::new(k, v.to_string())]),
        None => Key::from_name(name.to_string()),
    }
}

/// A counter exported through `metrics`, with its value kept beside it so that the service's
/// own reports (`demo`, the replay report, tests) can read it; the exporter cannot be read back.
#[derive(Clone)]
pub struct Counter {
    handle: metrics::Counter,
    value: Arc<AtomicU64>,
}

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1)
    }
    pub fn inc_by(&self, n: u64) {
        self.handle.increment(n);
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// An integer gauge (the exporter stores gauges as f64; ours are counts and flags).
#[derive(Clone)]
pub struct Gauge {
    handle: metrics::Gauge,
    value: Arc<AtomicI64>,
}

impl Gauge {
    pub fn set(&self, v: i64) {
        self.handle.set(v as f64);
        self.value.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Histogram(metrics::Histogram);

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        self.0.record(seconds)
    }
}

/// A family of series under one name and one label, registered on first use of a value.
pub struct Family<T> {
    recorder: SharedRecorder,
    name: &'static str,
    label: &'static str,
    series: Mutex<HashMap<String, T>>,
    make: fn(&SharedRecorder, Key) -> T,
}

impl<T: Clone> Family<T> {
    fn new(
        recorder: &SharedRecorder,
        name: &'static str,
        label: &'static str,
        make: fn(&SharedRecorder, Key) -> T,
    ) -> Self {
        Self { recorder: recorder.clone(), name, label, series: Mutex::default(), make }
    }

    /// The series for `values[0]` (one label; the slice keeps the `prometheus` crate's call shape).
    pub fn with_label_values(&self, values: &[&str]) -> T {
        let value = values.first().copied().unwrap_or_default();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = series.get(value) {
            return s.clone();
        }
        let s = (self.make)(&self.recorder, key(self.name, Some((self.label, value))));
        series.insert(value.to_string(), s.clone());
        s
    }
}

fn make_counter(r: &SharedRecorder, key: Key) -> Counter {
    Counter { handle: r.register_counter(&key, &METADATA), value: Arc::default() }
}

fn make_histogram(r: &SharedRecorder, key: Key) -> Histogram {
    Histogram(r.register_histogram(&key, &METADATA))
}

pub type CounterVec = Family<Counter>;
pub type HistogramVec = Family<Histogram>;

/// Every metric the service exports, through the `metrics` facade into one Prometheus
/// recorder of its own (so tests and embedded runs each count separately).
pub struct Metrics {
    recorder: SharedRecorder,
    handle: PrometheusHandle,
    /// Records taken from the events topic, by outcome:
    /// appended | duplicate | dead_lettered | forget.
    pub events: CounterVec,
    /// Windows finished, by outcome: applied | already_applied | parked | abandoned | unclaimed.
    pub windows: CounterVec,
    /// Model outputs that failed the format check (the description was kept).
    pub invalid_outputs: Counter,
    /// Compare-and-set conflicts (another writer moved the version).
    pub conflicts: Counter,
    pub updates_published: Counter,
    pub tombstones_published: Counter,
    /// Transient errors that were retried, by component: redis | kafka | engine.
    pub retries: CounterVec,
    pub inference_seconds: Histogram,
    /// From claim (window full) to published update.
    pub window_seconds: Histogram,
    pub generated_tokens: Counter,
    /// Windows queued or running in the inference stage.
    pub windows_inflight: Gauge,
    /// Records taken from Kafka whose effect is not yet durable.
    pub records_outstanding: Gauge,
    /// 1 while the consumer's partitions are paused for backpressure.
    pub consumer_paused: Gauge,
    pub pauses: Counter,
    pub commits: CounterVec,
    pub rebalances: CounterVec,
    pub assigned_partitions: Gauge,
    pub recovered_windows: Counter,
    /// 1 while `/readyz` would answer 200 (set on each scrape), so alerts can see readiness.
    pub ready: Gauge,
    pub stage_seconds: HistogramVec,
}

fn exponential(start: f64, factor: f64, n: i32) -> Vec<f64> {
    (0..n).map(|i| start * factor.powi(i)).collect()
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let latency = exponential(0.005, 2.0, 14);
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("prefstream_inference_seconds".into()), &latency)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("prefstream_window_seconds".into()), &latency))
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("prefstream_stage_seconds".into()),
                    &exponential(0.0001, 4.0, 10),
                )
            })
            .expect("non-empty buckets");
        let prometheus = builder.build_recorder();
        let handle = prometheus.handle();
        let recorder = SharedRecorder(Arc::new(prometheus));
        let r = &recorder;
        let describe = |name: &'static str, help: &'static str| {
            // One description per name; the exporter keys HELP by name, whatever the kind.
            r.describe_counter(KeyName::from(name), None, SharedString::from(help));
        };
        let counter = |name: &'static str, help: &'static str| {
            describe(name, help);
            make_counter(r, key(name, None))
        };
        let gauge = |name: &'static str, help: &'static str| {
            describe(name, help);
            Gauge { handle: r.register_gauge(&key(name, None), &METADATA), value: Arc::default() }
        };
        let histogram = |name: &'static str, help: &'static str| {
            describe(name, help);
            make_histogram(r, key(name, None))
        };
        let family = |name: &'static str, help: &'static str, label: &'static str, values: &[&str]| {
            describe(name, help);
            let f = Family::new(r, name, label, make_counter);
            // Every known label value at zero from the start, so each series exists from the
            // first scrape and rate() and the alert rules see 0 → n rather than a series appearing.
            for v in values {
                f.with_label_values(&[v]);
            }
            f
        };
        describe("prefstream_stage_seconds", "Time spent per record or window in each stage");
        let stage_seconds = Family::new(r, "prefstream_stage_seconds", "stage", make_histogram);
        Arc::new(Self {
            events: family(
                "prefstream_events_total",
                "Records taken from the events topic, by outcome",
                "outcome",
                &["appended", "duplicate", "dead_lettered", "forget", "forget_skipped"],
            ),
            windows: family(
                "prefstream_windows_total",
                "Windows finished, by outcome",
                "outcome",
                &["applied", "already_applied", "parked", "abandoned", "unclaimed", "failed"],
            ),
            invalid_outputs: counter(
                "prefstream_invalid_outputs_total",
                "Model outputs that failed the format check (previous description kept)",
            ),
            conflicts: counter(
                "prefstream_version_conflicts_total",
                "Compare-and-set conflicts on the description version",
            ),
            updates_published: counter("prefstream_updates_published_total", "Preference updates published"),
            tombstones_published: counter(
                "prefstream_tombstones_published_total",
                "Tombstones published for forget events",
            ),
            retries: family(
                "prefstream_retries_total",
                "Transient errors retried, by component",
                "component",
                &["redis", "kafka", "engine"],
            ),
            inference_seconds: histogram("prefstream_inference_seconds", "Model latency per window"),
            window_seconds: histogram("prefstream_window_seconds", "From claimed window to published update"),
            generated_tokens: counter("prefstream_generated_tokens_total", "Tokens generated by the model"),
            windows_inflight: gauge("prefstream_windows_inflight", "Windows queued or running in the inference stage"),
            records_outstanding: gauge(
                "prefstream_records_outstanding",
                "Records taken whose effect is not durable yet",
            ),
            consumer_paused: gauge("prefstream_consumer_paused", "1 while partitions are paused for backpressure"),
            pauses: counter(
                "prefstream_consumer_pauses_total",
                "Times the consumer paused its partitions for backpressure",
            ),
            commits: family("prefstream_offset_commits_total", "Offset commits, by result", "result", &["ok", "error"]),
            rebalances: family(
                "prefstream_rebalances_total",
                "Rebalance callbacks, by kind",
                "kind",
                &["assign", "revoke"],
            ),
            assigned_partitions: gauge("prefstream_assigned_partitions", "Partitions assigned to this instance"),
            recovered_windows: counter("prefstream_recovered_windows_total", "Claimed windows re-driven after a crash"),
            ready: gauge("prefstream_ready", "1 while every dependency answered on its last use and no shutdown began"),
            stage_seconds,
            recorder,
            handle,
        })
    }

    /// Makes this recorder the process's global one, so `metrics::counter!` and friends in
    /// libraries report into the same `/metrics`. Once per process; later calls are ignored.
    pub fn install_global(&self) {
        let _ = metrics::set_global_recorder(self.recorder.clone());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// What `/readyz` reports: every dependency answered on its last use.
#[derive(Debug, Default)]
pub struct Health {
    pub kafka: AtomicBool,
    pub redis: AtomicBool,
    pub engine: AtomicBool,
    /// Set once shutdown begins, so load balancers stop routing before the drain ends.
    pub stopping: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.kafka.load(Ordering::Relaxed)
            && self.redis.load(Ordering::Relaxed)
            && self.engine.load(Ordering::Relaxed)
            && !self.stopping.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> String {
        let flag = |b: &AtomicBool| if b.load(Ordering::Relaxed) { "ok" } else { "down" };
        format!(
            "kafka {}\nredis {}\nengine {}\nstopping {}\n",
            flag(&self.kafka),
            flag(&self.redis),
            flag(&self.engine),
            self.stopping.load(Ordering::Relaxed)
        )
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (dependencies up) until
/// `shutdown` resolves. Returns the bound address (port 0 picks a free one).
pub async fn serve_http(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    use axum::{http::StatusCode, routing::get, Router};
    let ready = health.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || async move {
                metrics.ready.set(health.ready() as i64);
                metrics.render()
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                let code = if ready.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (code, ready.report())
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(bound)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,librdkafka=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // `try_init`: tests may set a subscriber first.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// True for librdkafka properties whose values are credentials.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "credential", "ssl.key.pem", "ssl.keystore", "private"]
        .iter()
        .any(|s| k.contains(s))
        || k.ends_with(".key")
}

/// `key=value` pairs for logging, with secret values replaced.
pub fn redact_pairs(pairs: &[(String, String)]) -> Vec<String> {
    pairs.iter().map(|(k, v)| if is_secret_key(k) { format!("{k}=***") } else { format!("{k}={v}") }).collect()
}

/// A URL with its password (and a user-only credential) masked: `redis://user:***@host/`;
/// each of a comma-separated list (a Redis Cluster's seeds).
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let pairs = vec![
            ("sasl.password".to_string(), "hunter2".to_string()),
            ("sasl.username".to_string(), "svc".to_string()),
            ("ssl.key.password".to_string(), "k".to_string()),
            ("sasl.oauthbearer.client.secret".to_string(), "s".to_string()),
            ("ssl.key.pem".to_string(), "PEM".to_string()),
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
        ];
        let out = redact_pairs(&pairs).join(" ");
        for secret in ["hunter2", "=k ", "=s ", "PEM"] {
            assert!(!format!("{out} ").contains(secret), "{out}");
        }
        assert!(out.contains("sasl.username=svc") && out.contains("security.protocol=SASL_SSL"));
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://:pw@a:1,redis://u:pw@b:2"), "redis://:***@a:1,redis://u:***@b:2");
        assert_eq!(redact_url("rediss://u:p@a@h/"), "rediss://u:***@h/");
        assert_eq!(redact_url("redis://tok@h/"), "redis://***@h/");
        assert_eq!(redact_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
    }

    #[test]
    fn metrics_render_and_readiness() {
        let m = Metrics::new();
        m.events.with_label_values(&["appended"]).inc();
        let text = m.render();
        assert!(text.contains("prefstream_events_total{outcome=\"appended\"} 1"), "{text}");
        let h = Health::default();
        assert!(!h.ready());
        for f in [&h.kafka, &h.redis, &h.engine] {
            f.store(true, Ordering::Relaxed);
        }
        assert!(h.ready());
        h.stopping.store(true, Ordering::Relaxed);
        assert!(!h.ready());
    }
}
