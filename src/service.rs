//! The service assembled: Kafka source → pipeline → Kafka sink, with any state store and any
//! inferencer behind their traits. `prefstream run` and `prefstream demo` both start here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::engine::Inferencer;
use crate::kafka::{spawn_source, KafkaClient, KafkaSetupError, KafkaSink, SourceConfig};
use crate::pipeline::{self, Context, PipelineConfig, StageError, Summary};
use crate::state::StateStore;
use crate::telemetry::{Health, Metrics};

#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub updates: String,
    pub dlq: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            events: "prefstream.events".into(),
            updates: "prefstream.updates".into(),
            dlq: "prefstream.events.dlq".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub kafka: KafkaClient,
    pub group: String,
    pub topics: Topics,
    pub pipeline: PipelineConfig,
    pub commit_interval: Duration,
    pub pause_after: Duration,
    pub drain_timeout: Duration,
    /// Records buffered between the consumer thread and the lanes.
    pub buffer: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// Runs until `shutdown` turns true and the drain finishes (or a fatal error).
pub async fn serve(
    cfg: ServiceConfig,
    store: Arc<dyn StateStore>,
    inferencer: Arc<dyn Inferencer>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary, ServiceError> {
    let sink = Arc::new(KafkaSink::new(&cfg.kafka, &cfg.topics.events, &cfg.topics.updates, &cfg.topics.dlq)?);
    let (records_tx, records_rx) = mpsc::channel(cfg.buffer.max(1));
    let (recover_tx, recover_rx) = mpsc::unbounded_channel();
    let source = spawn_source(
        &cfg.kafka,
        SourceConfig {
            topic: cfg.topics.events.clone(),
            group: cfg.group.clone(),
            commit_interval: cfg.commit_interval,
            pause_after: cfg.pause_after,
            drain_timeout: cfg.drain_timeout,
        },
        records_tx,
        recover_tx,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
        cfg.pipeline.shutdown_timeout,
    )?;
    let ctx = Arc::new(Context {
        store,
        inferencer,
        sink: sink.clone(),
        metrics,
        health,
        descriptions: pipeline::DescriptionCache::new(cfg.pipeline.description_cache),
        config: cfg.pipeline.clone(),
        shutdown,
    });
    let result = pipeline::run(ctx, records_rx, recover_rx).await;
    // The source closes the records channel only after its final commit; wait for it to leave
    // the group too.
    let _ = tokio::task::spawn_blocking(move || source.join()).await;
    sink.flush(Duration::from_secs(10));
    Ok(result?)
}

/// A shutdown switch: `true` once SIGTERM or SIGINT arrives.
pub fn shutdown_on_signals() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let signal_tx = tx.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining");
        let _ = signal_tx.send(true);
    });
    (tx, rx)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
