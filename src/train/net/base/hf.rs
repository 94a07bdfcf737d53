//! A Hugging Face folder: `config.json` (LlamaConfig's fields), `model.safetensors` (any float
//! dtype, converted to f32) and `tokenizer.json`. `save` writes the same layout, so a base read
//! from GGUF can be kept as a folder too.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{sha256_file, Base, BaseSource, LlamaConfig};

pub fn load(dir: &Path) -> Result<Base> {
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()));
    let cfg: Value = serde_json::from_str(&read("config.json")?).context("config.json")?;
    let config = config(&cfg).with_context(|| format!("{}/config.json", dir.display()))?;
    let tokenizer_json = read("tokenizer.json")?;
    let st = dir.join("model.safetensors");
    let weights = candle_core::safetensors::load(&st, &Device::Cpu)
        .with_context(|| format!("reading {}", st.display()))?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    let source = BaseSource { format: "hf".into(), path: dir.to_path_buf(), sha256: sha256_file(&st)? };
    Ok(Base { config, weights, tokenizer_json, source })
}

fn config(v: &Value) -> Result<LlamaConfig> {
    let u = |k: &str| v[k].as_u64().map(|x| x as usize).with_context(|| format!("lacks `{k}`"));
    let heads = u("num_attention_heads")?;
    // transformers 5 moved rope_theta into rope_parameters.
    let theta = v["rope_theta"].as_f64().or_else(|| v["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10_000.0);
    Ok(LlamaConfig {
        vocab_size: u("vocab_size")?,
        hidden_size: u("hidden_size")?,
        intermediate_size: u("intermediate_size")?,
        num_hidden_layers: u("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: u("num_key_value_heads").unwrap_or(heads),
        rope_theta: theta as f32,
        rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        max_position_embeddings: u("max_position_embeddings").unwrap_or(2048),
    })
}

/// Writes `base` as a Hugging Face folder (f32 safetensors).
pub fn save(base: &Base, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let c = &base.config;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(dir.join("tokenizer.json"), &base.tokenizer_json)?;
    candle_core::safetensors::save(&base.weights, dir.join("model.safetensors"))?;
    Ok(())
}
