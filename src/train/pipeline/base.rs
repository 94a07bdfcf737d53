//! The steps on a pretrained base (SmolLM2-135M-Instruct): cold-start SFT and GRPO of LoRA
//! adapters with the base frozen, and the evaluation of the adapted policy beside the references.
//! The world, the judge (R_jud) and the teacher are the run's own, as for the tiny policy; the
//! prompts are ChatML and the tokenizer is the base's.

use super::{bar, holdout, read_json, write_json, Preset, Run};
use crate::prompt::Template;
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use crate::train::base::llama::{Llama, LoraConfig};
use crate::train::base::package::{base_tokenizer, load_adapted, load_merged, save_adapter};
use crate::train::base::Base;
use crate::train::eval::llm_judge::LlmJudge;
use crate::train::eval::{
    audit_markdown, audit_row, eval_policy, markdown, reference_rows, rescore, test_users, Policy, Setting,
};
use crate::train::judge::{Judge, Scorer};
use crate::train::sft::{self, TrainConfig};
use crate::train::synth::World;
use anyhow::{Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Sizes of the base's stages. One SFT sequence of ≈ 500 tokens costs ≈ 3.7 s on these 2 cores
/// with adapters on the top 10 of 30 layers (`../shared/FACTS.md`), so the budget is in
/// sequences: steps × batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BasePreset {
    pub lora_rank: usize,
    /// Adapters on layers `lora_first_layer..`; the layers below need no backward pass.
    pub lora_first_layer: usize,
    pub sft_steps: usize,
    pub sft_batch: usize,
    pub sft_lr: f64,
    /// Longest SFT sequence (prompt + response) in base tokens; longer examples are left out.
    pub max_len: usize,
    pub grpo_steps: usize,
    pub grpo_prompts: usize,
    pub grpo_lr: f64,
    pub eval_users: usize,
    pub max_new_tokens: usize,
}

impl BasePreset {
    pub fn full() -> Self {
        Self {
            lora_rank: 16,
            lora_first_layer: 20,
            sft_steps: 240,
            sft_batch: 4,
            sft_lr: 6e-4,
            max_len: 640,
            grpo_steps: 0,
            grpo_prompts: 4,
            grpo_lr: 2e-5,
            eval_users: 48,
            max_new_tokens: 256,
        }
    }

    pub fn quick() -> Self {
        Self {
            sft_steps: 2,
            sft_batch: 1,
            grpo_steps: 1,
            grpo_prompts: 2,
            eval_users: 2,
            max_new_tokens: 16,
            ..Self::full()
        }
    }

    fn lora(&self) -> LoraConfig {
        LoraConfig::all_projections(self.lora_rank, self.lora_first_layer)
    }
}

/// The adapter checkpoints of a run, in training order: (method, directory under the run).
pub const BASE_POLICIES: [(&str, &str); 2] = [("Base SFT", "base_sft"), ("Base SFT+GRPO", "base_grpo")];

struct BaseInputs {
    world: World,
    tok: TextTokenizer,
    judge: Judge,
    base: Base,
    btok: TextTokenizer,
}

impl Run {
    fn adapter_path(&self, dir: &str) -> PathBuf {
        self.path(dir).join("adapter.safetensors")
    }

    /// What every base step reads: the run's world, its tokenizer and judge (R_jud and the
    /// meter), the base and the base's tokenizer.
    fn base_inputs(&self, base_path: &Path) -> Result<BaseInputs> {
        let (world, tok, (judge, _)) = (self.world()?, self.tokenizer()?, self.load_judge()?);
        let t = std::time::Instant::now();
        let base = Base::load(base_path)?;
        tracing::info!(path = %base_path.display(), secs = t.elapsed().as_secs_f32(), "base loaded");
        let btok = base_tokenizer(&base)?;
        Ok(BaseInputs { world, tok, judge, base, btok })
    }

    /// Cold-start SFT of LoRA adapters on the base: the teacher's candidates filtered by the
    /// run's judge (R_jud = 1), in ChatML, loss on the response only. Writes
    /// `base_sft/adapter.safetensors` + `adapter.json` and `base_sft_curve.*`. With `resume`,
    /// training continues from that adapter, with batches drawn from a stream salted by its hash.
    pub fn base_sft_step(&self, preset: &Preset, base_path: &Path, resume: Option<&Path>) -> Result<PathBuf> {
        let bp = &preset.base;
        let BaseInputs { world, tok, judge, base, btok } = self.base_inputs(base_path)?;
        let scorer = Scorer { judge: &judge, tok: &tok, device: Device::Cpu };
        let mut rng = self.rng(13);
        let pb = bar("teacher");
        let (examples, stats) =
            sft::build_examples(&world, Template::ChatMl, &scorer, preset.teacher_rule(), 4, 0.6, &mut rng, &pb)?;
        pb.finish();
        tracing::info!(?stats, "cold-start data filtered by R_jud");
        let data = sft::tokenize(&examples, &btok, bp.max_len);
        let (valid, train) = holdout(&data);
        let tokens: usize = train.iter().map(|t| t.prompt.len() + t.response.len()).sum();
        tracing::info!(
            examples = data.len(),
            dropped = examples.len() - data.len(),
            mean_tokens = tokens / train.len().max(1),
            sequences = bp.sft_steps * bp.sft_batch,
            "tokenized for the base"
        );
        let (model, vars, lora) = match resume {
            Some(path) => {
                // The same filtered data, other batches: an rng stream salted by the adapter's
                // hash, so each resumed pass (pass 2 from pass 1, pass 3 from pass 2…) draws anew.
                let digest = crate::train::base::sha256_file(path)?;
                rng = self.rng(14 ^ u64::from_str_radix(&digest[..15], 16)?);
                let (model, vars, info) = load_adapted(&base, path).context("the adapter to resume from")?;
                (model, vars, info.lora)
            }
            None => {
                let (lora, vars) = (bp.lora(), VarMap::new());
                (Llama::new(&base, Some((&lora, &vars)))?, vars, lora)
            }
        };
        let tc = TrainConfig {
            steps: bp.sft_steps,
            batch: bp.sft_batch,
            lr: bp.sft_lr,
            warmup: (bp.sft_steps / 20).max(1),
            aux: 0.0,
        };
        let pb = bar("base sft");
        let curves = sft::train(&model, &vars, train, valid, &tc, btok.pad, &mut rng, &pb)?;
        pb.finish();
        curves.write(&self.dir, "base_sft_curve")?;
        let path = save_adapter(&vars, &lora, &base, &self.path("base_sft"))?;
        write_json(&self.path("base_preset.json"), bp)?;
        tracing::info!(adapter = %path.display(), "base SFT adapter written");
        Ok(path)
    }

    /// GRPO of the SFT adapter (R_jud × R_format, G = 4, clip 0.2, no KL), rollouts in ChatML.
    /// Writes `base_grpo/adapter.safetensors` and `base_grpo_curve.*`.
    pub fn base_grpo_step(&self, preset: &Preset, base_path: &Path) -> Result<PathBuf> {
        let bp = &preset.base;
        let BaseInputs { world, tok, judge, base, btok } = self.base_inputs(base_path)?;
        let scorer = Scorer { judge: &judge, tok: &tok, device: Device::Cpu };
        let (model, vars, info) =
            load_adapted(&base, &self.adapter_path("base_sft")).context("the base SFT adapter (run base-sft first)")?;
        let cfg = preset.grpo_config(bp.grpo_steps, bp.grpo_prompts, bp.grpo_lr, bp.max_new_tokens);
        let pb = bar("base grpo");
        let curves = crate::train::grpo::train(
            &model,
            &vars,
            &btok,
            Template::ChatMl,
            &scorer,
            &world,
            &cfg,
            &mut self.rng(15),
            &pb,
        )?;
        pb.finish();
        curves.write(&self.dir, "base_grpo_curve")?;
        save_adapter(&vars, &info.lora, &base, &self.path("base_grpo"))
    }

    /// Acc_jud of the base policies that exist in the run (and of the base without adapters
    /// with `zero_shot`) beside Null / raw signals / Golden, under the run's judge, on held-out
    /// users. Writes `base_eval.json` and `base_eval.md`.
    ///
    /// With `second_judge`, every row is also scored by a second, different judge — the base
    /// itself, zero-shot, reading P("A") against P("B") (`eval::llm_judge`, the paper's
    /// cross-model test) — into `second_judge` of the report.
    pub fn base_eval_step(
        &self,
        preset: &Preset,
        base_path: &Path,
        settings: &[Setting],
        zero_shot: bool,
        greedy: bool,
        second_judge: bool,
    ) -> Result<Vec<crate::train::eval::EvalRow>> {
        let bp: BasePreset = read_json(&self.path("base_preset.json")).unwrap_or_else(|_| preset.base.clone());
        let BaseInputs { world, tok, judge, base, btok } = self.base_inputs(base_path)?;
        let scorer = Scorer { judge: &judge, tok: &tok, device: Device::Cpu };
        let users = test_users(&world, bp.eval_users);
        let mut rows = reference_rows(&scorer, &users)?;
        let plain = second_judge.then(|| Llama::new(&base, None)).transpose()?;
        let judge2 = plain.as_ref().map(|m| LlmJudge::new(m, &btok, Device::Cpu)).transpose()?;
        let mut rows2 = match &judge2 {
            Some(j) => {
                let t = std::time::Instant::now();
                let r = reference_rows(j, &users)?;
                tracing::info!(secs = t.elapsed().as_secs_f32(), ?r, "second judge: references");
                r
            }
            None => Vec::new(),
        };
        let mut audits = Vec::new();
        let mut samples = Vec::new();
        let mut models: Vec<(&str, Llama)> = Vec::new();
        if zero_shot {
            models.push(("Base, no adapter", Llama::new(&base, None)?));
        }
        for (method, dir) in BASE_POLICIES {
            let path = self.adapter_path(dir);
            if path.exists() {
                models.push((method, load_merged(&base, &path)?));
            }
        }
        let mut rng = self.rng(14);
        for (method, model) in &models {
            let policy = Policy {
                model,
                template: Template::ChatMl,
                tok: &btok,
                params: if greedy { SamplingParams::GREEDY } else { SamplingParams::PAPER },
                max_new: bp.max_new_tokens,
                no_repeat: preset.no_repeat_ngram,
                batch: 16,
                rerank: None,
            };
            for &s in settings {
                let t = std::time::Instant::now();
                let (row, descs) = eval_policy(method, &policy, &scorer, &users, s, &mut rng)?;
                tracing::info!(
                    method,
                    setting = s.name(),
                    acc_jud = row.acc_jud,
                    se = row.se,
                    format = row.format_rate,
                    secs = t.elapsed().as_secs_f32(),
                    "base policy"
                );
                if let Some(j) = &judge2 {
                    let r = rescore(j, &row, &users, &descs)?;
                    tracing::info!(method, setting = s.name(), acc_jud = r.acc_jud, se = r.se, "second judge");
                    rows2.push(r);
                }
                audits.push(audit_row(method, s, &users, &descs));
                for (u, d) in users.iter().zip(&descs).take(3) {
                    samples.push(serde_json::json!({"method": method, "setting": s.name(), "user": u.user.user_id,
                        "golden": u.user.golden, "description": d}));
                }
                rows.push(row);
            }
        }
        write_json(
            &self.path("base_eval.json"),
            &serde_json::json!({"rows": rows, "audit": audits, "samples": samples, "greedy": greedy,
                "second_judge": rows2}),
        )?;
        let mut md = markdown(&rows);
        md.push_str(&audit_markdown(&audits));
        if !rows2.is_empty() {
            md.push_str("\n### Second judge (SmolLM2-135M-Instruct zero-shot, P(A) vs P(B), both orders)\n\n");
            md.push_str(&markdown(&rows2));
        }
        std::fs::write(self.path("base_eval.md"), md)?;
        Ok(rows)
    }
}
