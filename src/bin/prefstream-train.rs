//! `prefstream-train`: builds the model package (synthetic data → tokenizer → judge → cold-start
//! SFT → ONNX export → evaluation).

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use prefstream::train::base::package::{write_package, PackageSpec};
use prefstream::train::base::{default_gguf, Base};
use prefstream::train::eval::{markdown, SETTINGS};
use prefstream::train::export::Precision;
use prefstream::train::pipeline::{best_policy, Preset, Run};
use prefstream::train::synth::SynthConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    version,
    about = "Train prefstream's preference-inference model (AlignXplore method) and export it to ONNX.",
    long_about = "Each step reads and writes a run directory (--run), so steps can be rerun one by one; `all` runs the whole chain from a seed.\nTypical: prefstream-train all --run runs/main --install onnx/"
)]
struct Cli {
    /// Run directory holding data, checkpoints, curves and reports.
    #[arg(long, env = "PREFSTREAM_RUN", default_value = "runs/default", global = true)]
    run: PathBuf,
    /// Seed for everything (data, initialisation, sampling).
    #[arg(long, env = "PREFSTREAM_SEED", default_value_t = 7, global = true)]
    seed: u64,
    /// Small sizes for smoke tests (minutes → seconds); the model is not useful.
    #[arg(long, env = "PREFSTREAM_QUICK", global = true)]
    quick: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct SynthArgs {
    /// Number of users (held-out test users included).
    #[arg(long, env = "PREFSTREAM_USERS")]
    users: Option<usize>,
    /// Held-out users (never trained on).
    #[arg(long, env = "PREFSTREAM_TEST_USERS")]
    test_users: Option<usize>,
    /// Probability that a comparison's choice goes against the user's utility.
    #[arg(long, env = "PREFSTREAM_LABEL_NOISE", default_value_t = 0.1)]
    label_noise: f64,
    /// Signal events per user.
    #[arg(long, env = "PREFSTREAM_SIGNALS", default_value_t = 20)]
    signals_per_user: usize,
    /// Import real AlignX JSON/JSONL instead of generating a synthetic world.
    #[arg(long, env = "PREFSTREAM_ALIGNX")]
    alignx: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the synthetic AlignX-style world (events.jsonl, users.jsonl, annotations.jsonl).
    Synth(SynthArgs),
    /// Train the byte-level BPE tokenizer (tokenizer.json).
    Tokenizer,
    /// Train the judge R on golden descriptions and report Acc_jud (golden / null).
    Judge,
    /// Cold start: teacher candidates filtered by the judge, then SFT of the policy.
    Sft {
        /// Start from the run's saved copy warm-up (policy_copy.safetensors) instead of
        /// training it again. A preset with more layers than the warm-up grows it: the new
        /// blocks start as the identity.
        #[arg(long, env = "PREFSTREAM_FROM_COPY")]
        from_copy: bool,
    },
    /// Stage 2: GRPO from the SFT checkpoint with the judge reward.
    Grpo,
    /// Rejection-sampling fine-tuning from the SFT checkpoint: best of G samples by the judge
    /// reward, then SFT on them (policy_rft.safetensors).
    Rft {
        /// Checkpoint to start from: `policy` (SFT) or `policy_rft` (another round).
        #[arg(long, env = "PREFSTREAM_RFT_FROM", default_value = "policy")]
        from: String,
    },
    /// Export the policy and judge to ONNX with tokenizer and manifest.
    Export {
        /// Package directory to write.
        #[arg(long, env = "PREFSTREAM_PACKAGE")]
        out: Option<PathBuf>,
        /// Which checkpoint: `policy` (SFT), `policy_rft` (SFT+RFT) or `policy_grpo` (SFT+GRPO).
        #[arg(long, env = "PREFSTREAM_POLICY", default_value = "policy")]
        policy: String,
    },
    /// Acc_jud of the trained policies on held-out users (base-4, base-8, streaming 4+4).
    Eval {
        /// Also the robustness (reversal, drift) and efficiency (time per update) studies.
        #[arg(long, env = "PREFSTREAM_STUDIES")]
        studies: bool,
        /// Greedy decoding instead of the paper's inference sampling (T 0.9, top-p 0.95, top-k 10),
        /// which `all` and the service use.
        #[arg(long, env = "PREFSTREAM_EVAL_GREEDY")]
        greedy: bool,
        /// Score with this other run directory's judge and tokenizer instead of this run's
        /// (each `all` retrains the judge; compare two runs' policies under one judge).
        #[arg(long, env = "PREFSTREAM_JUDGE_RUN")]
        judge_run: Option<PathBuf>,
        /// Also score best-of-N decoding (N ≥ 2): N samples per window, keeping the description
        /// under which the judge best explains the window's own comparisons.
        #[arg(long, env = "PREFSTREAM_EVAL_BEST_OF", default_value_t = 0)]
        best_of: usize,
    },
    /// Cold start on a pretrained base: LoRA adapters (base frozen) trained on the teacher's
    /// judge-filtered reasoning in ChatML (base_sft/adapter.safetensors). Needs synth,
    /// tokenizer and judge in the run.
    BaseSft {
        #[command(flatten)]
        base: BaseArg,
        /// Continue from this adapter instead of fresh adapters: another `sft_steps` × `sft_batch`
        /// sequences, drawn with another seed (a second pass over the filtered data).
        #[arg(long, env = "PREFSTREAM_BASE_RESUME", value_name = "ADAPTER")]
        resume: Option<PathBuf>,
    },
    /// GRPO of the base SFT adapter with the judge reward (base_grpo/adapter.safetensors).
    BaseGrpo(BaseArg),
    /// Acc_jud of the base policies (base_sft, base_grpo) on held-out users beside Null, the
    /// raw signals and Golden (base_eval.json, base_eval.md).
    BaseEval {
        #[command(flatten)]
        base: BaseArg,
        /// Also the base without adapters (zero-shot).
        #[arg(long, env = "PREFSTREAM_ZERO_SHOT")]
        zero_shot: bool,
        /// Greedy decoding instead of the paper's inference sampling.
        #[arg(long, env = "PREFSTREAM_EVAL_GREEDY")]
        greedy: bool,
        /// Also score every row with a second, different judge: the base model zero-shot,
        /// reading P("A") against P("B") in both orders (the paper's cross-model test).
        #[arg(long, env = "PREFSTREAM_SECOND_JUDGE")]
        second_judge: bool,
    },
    /// Package a pretrained base (+ a LoRA adapter) as a runnable model: merged weights in
    /// ONNX, the base's tokenizer, a manifest naming the base by sha256 (ChatML template).
    Package {
        /// A GGUF file or a Hugging Face folder (config.json, model.safetensors, tokenizer.json);
        /// default: the SmolLM2-135M-Instruct GGUF that scripts/setup.sh keeps in the cache.
        #[arg(long, env = "PREFSTREAM_BASE")]
        base: Option<PathBuf>,
        /// adapter.safetensors (with its adapter.json beside it); none: the base as it is.
        #[arg(long, env = "PREFSTREAM_ADAPTER")]
        adapter: Option<PathBuf>,
        /// Package directory to write.
        #[arg(long, env = "PREFSTREAM_PACKAGE")]
        out: PathBuf,
        /// Keep only the first N layers (small packages for tests; 0 = all).
        #[arg(long, env = "PREFSTREAM_BASE_LAYERS", default_value_t = 0)]
        layers: usize,
        /// Generation budget written in the manifest.
        #[arg(long, env = "PREFSTREAM_MAX_NEW_TOKENS", default_value_t = 320)]
        max_new_tokens: usize,
        /// Weights and compute of model.onnx: fp32 (reference), fp16 (CUDA), int8 or int4
        /// (block-quantized projections through ONNX Runtime's MatMulNBits, for CPU serving).
        #[arg(long, env = "PREFSTREAM_PRECISION", value_enum, default_value_t = Precision::Fp32)]
        precision: Precision,
    },
    /// The whole chain from the seed.
    All {
        #[command(flatten)]
        synth: SynthArgs,
        /// Also copy the finished package here (e.g. onnx/).
        #[arg(long, env = "PREFSTREAM_INSTALL")]
        install: Option<PathBuf>,
        /// Also the robustness and efficiency studies (≈ 7 min; `eval --studies` runs them later).
        #[arg(long, env = "PREFSTREAM_STUDIES")]
        studies: bool,
        /// Train on a pretrained base instead of the tiny decoder: synth, tokenizer, judge,
        /// base-sft, base-grpo, base-eval, then the package in RUN/base_package. `--base`
        /// alone takes the SmolLM2-135M-Instruct GGUF that scripts/setup.sh keeps in the cache.
        #[arg(long, num_args = 0..=1, value_name = "PATH")]
        base: Option<Option<PathBuf>>,
    },
}

#[derive(Args, Clone)]
struct BaseArg {
    /// A GGUF file or a Hugging Face folder; default: the SmolLM2-135M-Instruct GGUF that
    /// scripts/setup.sh keeps in the cache.
    #[arg(long, env = "PREFSTREAM_BASE")]
    base: Option<PathBuf>,
}

impl BaseArg {
    fn path(&self) -> PathBuf {
        self.base.clone().unwrap_or_else(default_gguf)
    }
}

fn synth_cfg(a: &SynthArgs, p: &Preset, seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        users: a.users.unwrap_or(p.users),
        test_users: a.test_users.unwrap_or(p.test_users),
        signals_per_user: a.signals_per_user,
        label_noise: a.label_noise,
        ..SynthConfig::default()
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let run = Run::new(cli.run.clone(), cli.seed)?;
    let preset = || -> Result<Preset> {
        if cli.quick {
            Ok(Preset::quick())
        } else {
            Ok(run.preset().unwrap_or_else(|_| Preset::full()))
        }
    };
    let started = Instant::now();
    match &cli.cmd {
        Cmd::Synth(a) => {
            let p = preset()?;
            run.set_preset(&p)?;
            run.synth(&synth_cfg(a, &p, cli.seed), a.alignx.as_deref())?;
        }
        Cmd::Tokenizer => {
            run.tokenizer_step(preset()?.vocab)?;
        }
        Cmd::Judge => {
            run.judge_step(&preset()?)?;
        }
        Cmd::Sft { from_copy } => run.sft_step(&preset()?, *from_copy)?,
        Cmd::Grpo => run.grpo_step(&preset()?)?,
        Cmd::Rft { from } => run.rft_step(&preset()?, from)?,
        Cmd::Export { out, policy } => {
            run.export_step(&out.clone().unwrap_or_else(|| cli.run.join("package")), &preset()?, policy)?
        }
        Cmd::Eval { studies, greedy, judge_run, best_of } => {
            let rows = run.eval_step(&preset()?, &SETTINGS, *studies, *greedy, judge_run.as_deref(), *best_of)?;
            println!("{}", markdown(&rows))
        }
        Cmd::BaseSft { base, resume } => {
            run.base_sft_step(&preset()?, &base.path(), resume.as_deref())?;
        }
        Cmd::BaseGrpo(b) => {
            run.base_grpo_step(&preset()?, &b.path())?;
        }
        Cmd::BaseEval { base, zero_shot, greedy, second_judge } => {
            let rows = run.base_eval_step(&preset()?, &base.path(), &SETTINGS, *zero_shot, *greedy, *second_judge)?;
            println!("{}", markdown(&rows))
        }
        Cmd::Package { base, adapter, out, layers, max_new_tokens, precision } => {
            let base = base.clone().unwrap_or_else(default_gguf);
            package(&base, adapter.as_deref(), out, *layers, *max_new_tokens, *precision)?;
        }
        Cmd::All { synth, install, studies, base } => {
            let p = preset()?;
            run.set_preset(&p)?;
            run.synth(&synth_cfg(synth, &p, cli.seed), synth.alignx.as_deref())?;
            run.tokenizer_step(p.vocab)?;
            run.judge_step(&p)?;
            if let Some(base) = base {
                let path = base.clone().unwrap_or_else(default_gguf);
                let mut adapter = run.base_sft_step(&p, &path, None)?;
                if p.base.grpo_steps > 0 {
                    adapter = run.base_grpo_step(&p, &path)?;
                }
                let rows = run.base_eval_step(&p, &path, &SETTINGS, false, false, false)?;
                println!("{}", markdown(&rows));
                let out = cli.run.join("base_package");
                package(&path, Some(&adapter), &out, 0, p.base.max_new_tokens, Precision::Fp32)?;
                if let Some(dest) = install {
                    install_package(&out, dest, &["model.onnx", "tokenizer.json", "manifest.json"])?;
                }
                tracing::info!(seconds = started.elapsed().as_secs_f64(), "done");
                return Ok(());
            }
            run.sft_step(&p, false)?;
            run.grpo_step(&p)?;
            if p.rft_users > 0 {
                run.rft_step(&p, "policy")?;
            }
            let rows = run.eval_step(&p, &SETTINGS, *studies, false, None, 0)?;
            println!("{}", markdown(&rows));
            let package = cli.run.join("package");
            run.export_step(&package, &p, best_policy(&rows))?;
            if let Some(dest) = install {
                install_package(&package, dest, &["model.onnx", "judge.onnx", "tokenizer.json", "manifest.json"])?;
            }
        }
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "done");
    Ok(())
}

fn package(
    base: &Path,
    adapter: Option<&Path>,
    out: &Path,
    layers: usize,
    max_new_tokens: usize,
    precision: Precision,
) -> Result<()> {
    let mut b = Base::load(base)?;
    if layers > 0 {
        b.truncate(layers);
    }
    let version = format!("0.1.0+{}", if adapter.is_some() { "adapter" } else { "base" });
    let spec = PackageSpec { name: "prefstream-alignx-smollm2", version: &version, adapter, max_new_tokens, precision };
    let manifest = write_package(&b, &spec, out)?;
    tracing::info!(manifest = %manifest.display(), "package written");
    Ok(())
}

fn install_package(package: &Path, dest: &Path, files: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    for f in files {
        std::fs::copy(package.join(f), dest.join(f))?;
    }
    tracing::info!(dest = %dest.display(), "package installed");
    Ok(())
}
