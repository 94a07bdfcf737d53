//! Command-line and environment configuration shared by the `prefstream` subcommands. Every
//! flag has an environment variable (`PREFSTREAM_…`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::kafka::{parse_option, KafkaClient};
use crate::pipeline::PipelineConfig;
use crate::runtime::Device;
use crate::sampling::SamplingParams;
use crate::service::{ServiceConfig, Topics};
use crate::telemetry::LogFormat;
use crate::window::WindowConfig;

/// `30s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("not a duration: {s:?} (try 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {s:?}"));
    }
    // `from_secs_f64` panics past u64::MAX seconds (found by fuzz/fuzz_targets/kafka_option.rs).
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} is too long"))
}

#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "PREFSTREAM_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// A librdkafka property passed through as is, e.g. `-X security.protocol=SASL_SSL
    /// -X sasl.password=…` (repeatable; in the env var, separate pairs with `;`). Secret values
    /// are never logged.
    #[arg(short = 'X', long = "kafka-option", env = "PREFSTREAM_KAFKA_OPTIONS", value_delimiter = ';',
          value_parser = parse_option, value_name = "KEY=VALUE")]
    pub kafka_options: Vec<(String, String)>,
    /// Consumer group of the live service (replays never join it).
    #[arg(long, env = "PREFSTREAM_GROUP", default_value = "prefstream")]
    pub group: String,
    /// Input events, one JSON event per message, key = user id.
    #[arg(long, env = "PREFSTREAM_EVENTS_TOPIC", default_value = "prefstream.events")]
    pub events_topic: String,
    /// Published descriptions (key = user id; compact it): updates and tombstones.
    #[arg(long, env = "PREFSTREAM_UPDATES_TOPIC", default_value = "prefstream.updates")]
    pub updates_topic: String,
    /// Dead-letter topic: bad records with the reason in the `prefstream.error` header.
    #[arg(long, env = "PREFSTREAM_DLQ_TOPIC", default_value = "prefstream.events.dlq")]
    pub dlq_topic: String,
}

impl KafkaArgs {
    pub fn client(&self) -> KafkaClient {
        KafkaClient { brokers: self.brokers.clone(), options: self.kafka_options.clone() }
    }

    pub fn topics(&self) -> Topics {
        Topics { events: self.events_topic.clone(), updates: self.updates_topic.clone(), dlq: self.dlq_topic.clone() }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model package directory (model.onnx, tokenizer.json, manifest.json).
    #[arg(long, env = "PREFSTREAM_MODEL", default_value = "onnx")]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N. CUDA never falls back to CPU silently.
    #[arg(long, env = "PREFSTREAM_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Largest batch the engine runs at once (windows of different users).
    #[arg(long, env = "PREFSTREAM_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// How long the engine waits for more windows to fill a batch.
    #[arg(long, env = "PREFSTREAM_BATCH_WAIT", default_value = "5ms", value_parser = parse_duration)]
    pub batch_wait: Duration,
    /// Greedy decoding on the first attempt. Default: the paper's sampling, seeded by the window
    /// id and --seed (also reproducible). Retries after invalid output always sample. A replay
    /// reproduces live when it uses the same decoding flags.
    #[arg(long, env = "PREFSTREAM_GREEDY")]
    pub greedy: bool,
    /// Base seed of the per-window sampling seeds.
    #[arg(long, env = "PREFSTREAM_SEED", default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Events per window; a full window is inferred on.
    #[arg(long, env = "PREFSTREAM_WINDOW_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub window_size: u64,
    /// Infer on a partial window after this long without a new event of the user (off by default).
    #[arg(long, env = "PREFSTREAM_WINDOW_IDLE", value_parser = parse_duration)]
    pub window_idle: Option<Duration>,
    /// Invalid model outputs retried this many times before the window is parked.
    #[arg(long, env = "PREFSTREAM_MAX_RETRIES", default_value_t = 3)]
    pub max_retries: u32,
    /// Payloads larger than this are dead-lettered.
    #[arg(long, env = "PREFSTREAM_MAX_EVENT_BYTES", default_value_t = 1 << 20)]
    pub max_event_bytes: usize,
    /// Dead letters keep at most this much of the payload (header `prefstream.truncated`).
    #[arg(long, env = "PREFSTREAM_DLQ_MAX_BYTES", default_value_t = 256 << 10)]
    pub dlq_max_bytes: usize,
    /// Concurrent ingest lanes (one user always uses the same lane).
    #[arg(long, env = "PREFSTREAM_LANES", default_value_t = 64)]
    pub lanes: usize,
    /// Windows inferred concurrently.
    #[arg(long, env = "PREFSTREAM_MAX_ACTIVE_WINDOWS", default_value_t = 32)]
    pub max_active_windows: usize,
    /// Windows waiting for inference before ingest blocks and the consumer pauses.
    #[arg(long, env = "PREFSTREAM_WINDOW_QUEUE", default_value_t = 1024)]
    pub window_queue: usize,
    /// Records buffered between the consumer and the lanes.
    #[arg(long, env = "PREFSTREAM_BUFFER", default_value_t = 4096)]
    pub buffer: usize,
    /// Pause the partitions after the pipeline refused records this long.
    #[arg(long, env = "PREFSTREAM_PAUSE_AFTER", default_value = "1s", value_parser = parse_duration)]
    pub pause_after: Duration,
    /// How often durable offsets are committed (also on revoke and shutdown).
    #[arg(long, env = "PREFSTREAM_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub commit_interval: Duration,
    /// On revoke, how long to wait for the revoked partitions' records before committing.
    #[arg(long, env = "PREFSTREAM_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// On SIGTERM, how long to wait for records and windows in flight.
    #[arg(long, env = "PREFSTREAM_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Users whose last written description is kept in memory, saving a Redis read per
    /// window (0 disables; a stale entry only costs a retry of the compare-and-set).
    #[arg(long, env = "PREFSTREAM_DESCRIPTION_CACHE", default_value_t = 100_000)]
    pub description_cache: usize,
    /// How often to look for windows a crashed instance claimed but never finished.
    #[arg(long, env = "PREFSTREAM_RECOVER_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub recover_interval: Duration,
}

impl PipelineArgs {
    pub fn pipeline(&self, model: &ModelArgs) -> Result<PipelineConfig, String> {
        let window = WindowConfig { size: self.window_size as usize, idle: self.window_idle };
        window.validate()?;
        Ok(PipelineConfig {
            window,
            lanes: self.lanes.max(1),
            lane_queue: 256,
            max_active_windows: self.max_active_windows.max(1),
            window_queue: self.window_queue.max(1),
            max_retries: self.max_retries,
            max_event_bytes: self.max_event_bytes,
            dlq_max_bytes: self.dlq_max_bytes,
            sampling: if model.greedy { SamplingParams::GREEDY } else { SamplingParams::PAPER },
            seed: model.seed,
            recover_interval: self.recover_interval.max(Duration::from_secs(1)),
            shutdown_timeout: self.shutdown_timeout,
            apply_forgets: true,
            description_cache: self.description_cache,
        })
    }

    pub fn service(&self, kafka: &KafkaArgs, model: &ModelArgs) -> Result<ServiceConfig, String> {
        Ok(ServiceConfig {
            kafka: kafka.client(),
            group: kafka.group.clone(),
            topics: kafka.topics(),
            pipeline: self.pipeline(model)?,
            commit_interval: self.commit_interval,
            pause_after: self.pause_after,
            drain_timeout: self.drain_timeout,
            buffer: self.buffer,
        })
    }
}

/// How to reach Redis beyond its URL: TLS files for `rediss://` (refused with `redis://`), and Cluster mode.
#[derive(Args, Debug, Clone, Default)]
pub struct RedisArgs {
    /// PEM CA bundle that signed the Redis server's certificate (`rediss://`); default: the
    /// system's roots.
    #[arg(long, env = "PREFSTREAM_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (`tls-auth-clients yes`).
    #[arg(long, env = "PREFSTREAM_REDIS_CLIENT_CERT", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM private key of --redis-client-cert.
    #[arg(long, env = "PREFSTREAM_REDIS_CLIENT_KEY", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,
    /// --redis-url is a seed node of a Redis Cluster (implied when it lists several,
    /// comma-separated): commands go to the primary of each user's slot, SCANs to every
    /// primary, and MOVED/ASK and failovers are followed.
    #[arg(long, env = "PREFSTREAM_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// Replicas that must acknowledge each write before it counts (Redis `WAIT`), so that a
    /// failover cannot lose accepted events; while a primary has fewer, its users' writes are
    /// retried. 0: the primary's acknowledgement is enough (replication is asynchronous).
    #[arg(long, env = "PREFSTREAM_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: usize,
}

impl RedisArgs {
    pub fn tls(&self) -> crate::state::redis::RedisTls {
        crate::state::redis::RedisTls {
            ca_file: self.redis_ca_file.clone(),
            client_cert: self.redis_client_cert.clone(),
            client_key: self.redis_client_key.clone(),
        }
    }
}

/// What `run`, `replay` and `check` all need: Kafka, Redis, the model and the pipeline.
#[derive(Args, Debug, Clone)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Redis holding windows and descriptions (`redis://[:password@]host:port/db`), or the
    /// seed nodes of a Redis Cluster separated by commas (`redis://a:7000,redis://b:7001`;
    /// see --redis-cluster). Run it with AOF (`appendonly yes`) so that a restart keeps
    /// accepted events.
    #[arg(long, env = "PREFSTREAM_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

#[derive(Args, Debug, Clone)]
pub struct OpsArgs {
    /// Address for /metrics (Prometheus), /healthz and /readyz; `off` disables it.
    #[arg(long, env = "PREFSTREAM_HTTP", default_value = "127.0.0.1:9464")]
    pub http: String,
    #[arg(long, env = "PREFSTREAM_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

impl OpsArgs {
    pub fn http_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.http == "off" {
            return Ok(None);
        }
        self.http.parse().map(Some).map_err(|e| format!("--http {:?}: {e}", self.http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-1s").is_err());
        // Past u64::MAX seconds: an error, not a panic (a fuzzer's find).
        assert!(parse_duration("19999999999999999999999999").is_err());
        assert!(parse_duration("1e300h").is_err());
    }
}
