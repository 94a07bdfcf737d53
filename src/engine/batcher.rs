//! The model on its own thread behind a bounded channel (as text-embeddings-inference does):
//! callers block on a per-request reply channel; the thread groups requests into batches of up
//! to `max_batch`, waiting at most `max_wait_ms` after the first one arrives.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, SeedableRng};

use super::generate::RowSampler;
use super::{load_package, EngineError, Generator, InferResult, Manifest, Request, Result};
use crate::runtime::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_wait_ms: u64,
    /// Requests that may wait in the channel; `infer` blocks when it is full (backpressure).
    pub queue: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self { max_batch: 8, max_wait_ms: 5, queue: 64 }
    }
}

struct Job {
    prompt: String,
    sampler: RowSampler,
    enqueued: Instant,
    reply: SyncSender<Result<InferResult>>,
}

/// A cloneable handle to the model thread. The thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    manifest: Arc<Manifest>,
}

pub struct Engine;

impl Engine {
    /// Loads the package (errors surface here, not on the first request) and starts the thread.
    pub fn spawn(package_dir: &Path, device: Device, config: BatcherConfig) -> Result<EngineHandle> {
        let (manifest, generator) = load_package(package_dir, &device)?;
        let (tx, rx) = mpsc::sync_channel(config.queue.max(1));
        std::thread::Builder::new()
            .name("prefstream-engine".into())
            .spawn(move || run(generator, rx, config))
            .map_err(|e| EngineError::Failed(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle { tx, manifest: Arc::new(manifest) })
    }
}

impl EngineHandle {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Runs one request through the batcher and waits for its result.
    pub fn infer(&self, req: Request) -> Result<InferResult> {
        let prompt = self.manifest.template.build_prompt(req.previous.as_deref(), &req.signals);
        let (reply, answer) = mpsc::sync_channel(1);
        let sampler = RowSampler { params: req.sampling, rng: StdRng::seed_from_u64(req.seed) };
        let job = Job { prompt, sampler, enqueued: Instant::now(), reply };
        self.tx.send(job).map_err(|_| EngineError::Stopped)?;
        answer.recv().map_err(|_| EngineError::Stopped)?
    }
}

#[async_trait::async_trait]
impl super::Inferencer for EngineHandle {
    fn model(&self) -> super::ModelRef {
        self.manifest().into()
    }

    async fn infer(&self, req: Request) -> Result<InferResult> {
        // `infer` blocks on the model thread's reply: keep it off the async workers.
        let handle = self.clone();
        tokio::task::spawn_blocking(move || EngineHandle::infer(&handle, req))
            .await
            .map_err(|e| EngineError::Failed(format!("inference task failed: {e}")))?
    }
}

fn run(mut generator: Generator, rx: Receiver<Job>, config: BatcherConfig) {
    let max_batch = config.max_batch.max(1);
    let wait = Duration::from_millis(config.max_wait_ms);
    // `recv` fails only when every handle is gone: then the thread ends.
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + wait;
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        run_batch(&mut generator, jobs);
    }
    tracing::debug!("engine thread stopping: no handles left");
}

fn run_batch(generator: &mut Generator, jobs: Vec<Job>) {
    let prompts: Vec<String> = jobs.iter().map(|j| j.prompt.clone()).collect();
    let (mut samplers, replies): (Vec<RowSampler>, Vec<(Instant, SyncSender<_>)>) =
        jobs.into_iter().map(|j| (j.sampler, (j.enqueued, j.reply))).unzip();
    let started = Instant::now();
    let outputs = generator.generate_rows(&prompts, &mut samplers);
    tracing::debug!(batch = prompts.len(), ms = started.elapsed().as_secs_f64() * 1e3, "batch done");
    match outputs {
        Ok(outputs) => {
            for (out, (enqueued, reply)) in outputs.iter().zip(replies) {
                let latency_ms = enqueued.elapsed().as_secs_f64() * 1e3;
                // A caller that gave up is not an error of the batch.
                let _ = reply.send(Ok(InferResult::from_output(out, latency_ms)));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "batch failed");
            let msg = e.to_string();
            for (_, reply) in replies {
                let _ = reply.send(Err(EngineError::Failed(msg.clone())));
            }
        }
    }
}
