//! `prefstream`: the serving CLI.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use prefstream::engine::{load_package, InferResult};
use prefstream::event::{parse_event, EventBody};
use prefstream::prompt::build_prompt;
use prefstream::runtime::Device;
use prefstream::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "prefstream", version, about = "Streaming preference inference (AlignXplore)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Infer one user's preference description from a JSONL file of their events.
    Infer(InferArgs),
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
    /// Signals per prompt. Longer files are read as the stream would deliver them: window by
    /// window, each valid description becoming the next window's previous one.
    #[arg(long, env = "PREFSTREAM_WINDOW", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    window: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Infer(args) => infer(args),
    }
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
    let (manifest, mut generator) = load_package(&args.model, &args.device)
        .with_context(|| format!("loading model package {}", args.model.display()))?;
    if let Some(n) = args.max_new_tokens {
        generator.max_new_tokens = n;
    }
    let params = if args.greedy { SamplingParams::GREEDY } else { SamplingParams::PAPER };
    let started = Instant::now();
    let (mut previous, mut tokens, mut result) = (args.previous.clone(), 0, None);
    for window in signals.chunks(args.window as usize) {
        let prompt = build_prompt(previous.as_deref(), window);
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
