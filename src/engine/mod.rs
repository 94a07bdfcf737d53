//! The inference engine: an ONNX Runtime decoder (graph discovered at load time), batched
//! generation with the KV cache, and a model thread fed through a bounded channel.
//!
//! - `session`: open a decoder, discover its cache layout, run one forward step.
//! - `generate`: the batched generation loop (left padding, stop tokens, sampling).
//! - `batcher`: the model thread and the cloneable `EngineHandle` services call.

pub mod batcher;
pub mod generate;
pub mod session;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::event::EventBody;
use crate::prompt::{parse_output, Template, ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN};
use crate::runtime::{Device, RuntimeError};
use crate::sampling::SamplingParams;
use crate::tokenizer::{SpecialTokens, TextTokenizer, TokenizerError};

pub use batcher::{BatcherConfig, Engine, EngineHandle};
pub use generate::{GenStats, Generator, Output, Stop};
pub use session::{DecoderSession, GraphSpec};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("model package {dir}: {message}")]
    Package { dir: PathBuf, message: String },
    #[error("model graph {path}: {message}")]
    Graph { path: PathBuf, message: String },
    #[error("onnx runtime: {0}")]
    Ort(#[from] ort::Error),
    #[error("inference failed: {0}")]
    Failed(String),
    #[error("the engine thread has stopped")]
    Stopped,
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What `manifest.json` says that serving needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The prompt template the model was trained for (`template`).
    pub template: Template,
    /// `special_tokens`: end and padding tokens by role (our own names where absent).
    pub special_tokens: SpecialTokens,
    pub max_new_tokens: usize,
    /// `generation.no_repeat_ngram` (0 or absent: off); see `sampling::block_repeats`.
    pub no_repeat_ngram: usize,
    /// Learned-position models cannot go past this; `None` for rotary models (no limit known).
    pub max_positions: Option<usize>,
    pub model_file: String,
    pub tokenizer_file: String,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::Package {
            dir: dir.to_path_buf(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::parse(dir, &text)
    }

    /// The manifest from its text (pure: what `load` reads, and what the fuzzer feeds).
    pub fn parse(dir: &Path, text: &str) -> Result<Self> {
        let bad = |message: String| EngineError::Package { dir: dir.to_path_buf(), message };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("manifest.json: {e}")))?;
        let string =
            |key: &str| v[key].as_str().map(str::to_string).ok_or_else(|| bad(format!("manifest lacks `{key}`")));
        // A model is trained for exactly one prompt template: refuse an unknown one up front.
        let template = Template::from_id(&string("template")?).map_err(|e| bad(e.to_string()))?;
        let m = Self {
            name: string("name")?,
            version: string("version")?,
            template,
            special_tokens: special_tokens(&v["special_tokens"]).map_err(|e| bad(format!("special_tokens: {e}")))?,
            max_new_tokens: v["generation"]["max_new_tokens"]
                .as_u64()
                .ok_or_else(|| bad("manifest lacks `generation.max_new_tokens`".into()))?
                as usize,
            no_repeat_ngram: v["generation"]["no_repeat_ngram"].as_u64().unwrap_or(0) as usize,
            max_positions: v["policy_config"]["max_positions"].as_u64().map(|n| n as usize),
            model_file: v["model"].as_str().unwrap_or("model.onnx").to_string(),
            tokenizer_file: v["tokenizer"].as_str().unwrap_or("tokenizer.json").to_string(),
        };
        Ok(m)
    }
}

/// `special_tokens` of a manifest: `eos` (a string or a list; every one ends a row), `pad`, and
/// the four tags. A missing key means our own tokenizer's name. The tags' text is the output
/// format's; the key only documents it, so any other text is refused rather than silently
/// parsed with ours.
fn special_tokens(v: &serde_json::Value) -> std::result::Result<SpecialTokens, String> {
    let mut out = SpecialTokens::default();
    if v.is_null() {
        return Ok(out);
    }
    if !v.is_object() {
        return Err("must be an object".into());
    }
    let text = |key: &str| -> std::result::Result<Option<String>, String> {
        match &v[key] {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(s) if !s.is_empty() => Ok(Some(s.clone())),
            other => Err(format!("`{key}` must be a non-empty string, not {other}")),
        }
    };
    match &v["eos"] {
        serde_json::Value::Null => {}
        serde_json::Value::Array(list) if !list.is_empty() => {
            out.eos = list
                .iter()
                .map(|t| t.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("`eos` must list non-empty strings, not {}", v["eos"]))?;
        }
        _ => out.eos = vec![text("eos")?.ok_or("`eos` is null")?],
    }
    if let Some(pad) = text("pad")? {
        out.pad = pad;
    }
    for (key, tag) in [
        ("think_open", THINK_OPEN),
        ("think_close", THINK_CLOSE),
        ("answer_open", ANSWER_OPEN),
        ("answer_close", ANSWER_CLOSE),
    ] {
        if let Some(t) = text(key)? {
            if t != tag {
                return Err(format!(
                    "`{key}` is `{t}`, but the output format's tag is `{tag}` (a tag may be one token or plain \
                     text; its text is fixed)"
                ));
            }
        }
    }
    Ok(out)
}

/// Loads a package directory into a ready generator.
pub fn load_package(dir: &Path, device: &Device) -> Result<(Manifest, Generator)> {
    let manifest = Manifest::load(dir)?;
    let tokenizer = TextTokenizer::load_with(&dir.join(&manifest.tokenizer_file), &manifest.special_tokens)?;
    let session = DecoderSession::open(&dir.join(&manifest.model_file), device)?;
    let mut generator = Generator::new(session, tokenizer, manifest.max_new_tokens, manifest.max_positions);
    generator.no_repeat_ngram = manifest.no_repeat_ngram;
    Ok((manifest, generator))
}

/// Which model wrote a description (published with every update).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub template: String,
}

impl ModelRef {
    /// How the state store records the writer: `name@version`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

impl From<&Manifest> for ModelRef {
    fn from(m: &Manifest) -> Self {
        Self { name: m.name.clone(), version: m.version.clone(), template: m.template.id().to_string() }
    }
}

/// The model as the pipeline sees it (the backend trait of text-embeddings-inference). The
/// product implements it with `EngineHandle`; benchmarks swap in an instant one to measure
/// the delivery machinery alone.
#[async_trait::async_trait]
pub trait Inferencer: Send + Sync {
    fn model(&self) -> ModelRef;
    async fn infer(&self, req: Request) -> Result<InferResult>;
}

/// One inference request: the previous description plus the newest signals.
#[derive(Debug, Clone)]
pub struct Request {
    pub previous: Option<String>,
    pub signals: Vec<EventBody>,
    pub sampling: SamplingParams,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferResult {
    /// The new description; `None` when the output failed the format check.
    pub description: Option<String>,
    pub reasoning: String,
    pub format_ok: bool,
    pub format_error: Option<String>,
    /// Everything generated after the prompt, tags included, end and padding tokens left out.
    pub raw: String,
    /// Generated tokens.
    pub tokens: usize,
    pub latency_ms: f64,
}

impl InferResult {
    pub fn from_output(out: &Output, latency_ms: f64) -> Self {
        let parsed = parse_output(&out.text);
        let format_error = match (&parsed.error, out.stop) {
            (_, Stop::ContextFull) => Some("prompt does not fit the model's context".to_string()),
            (Some(e), _) => Some(e.to_string()),
            (None, _) => None,
        };
        Self {
            format_ok: format_error.is_none(),
            description: parsed.description.filter(|_| format_error.is_none()),
            reasoning: parsed.reasoning,
            format_error,
            raw: out.text.clone(),
            tokens: out.tokens.len(),
            latency_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(extra: serde_json::Value) -> Result<Manifest> {
        let dir = tempfile::tempdir().unwrap();
        let mut v = json!({"name": "m", "version": "1", "template": "alignx-stream-v1",
                           "generation": {"max_new_tokens": 8}});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        std::fs::write(dir.path().join("manifest.json"), v.to_string()).unwrap();
        Manifest::load(dir.path())
    }

    #[test]
    fn special_tokens_by_role_default_to_our_names() {
        let m = manifest(json!({})).unwrap();
        assert_eq!((m.template, m.special_tokens), (Template::Plain, SpecialTokens::default()));
        let m = manifest(json!({"template": "alignx-stream-chatml-v1",
            "special_tokens": {"eos": "<|im_end|>", "pad": "<|im_end|>", "answer_close": "</answer>"}}))
        .unwrap();
        assert_eq!(m.template, Template::ChatMl);
        assert_eq!(m.special_tokens, SpecialTokens { eos: vec!["<|im_end|>".into()], pad: "<|im_end|>".into() });
        let m = manifest(json!({"special_tokens": {"eos": ["<|im_end|>", "<|endoftext|>"]}})).unwrap();
        assert_eq!(m.special_tokens.eos, ["<|im_end|>", "<|endoftext|>"]);
        assert_eq!(m.special_tokens.pad, "<pad>");
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let err = |extra| manifest(extra).unwrap_err().to_string();
        let e = err(json!({"template": "alignx-stream-v9"}));
        assert!(e.contains("alignx-stream-v9") && e.contains("alignx-stream-chatml-v1"), "{e}");
        let e = err(json!({"special_tokens": {"eos": []}}));
        assert!(e.contains("special_tokens") && e.contains("eos"), "{e}");
        let e = err(json!({"special_tokens": {"eos": ["<|im_end|>", 3]}}));
        assert!(e.contains("eos"), "{e}");
        let e = err(json!({"special_tokens": {"answer_close": "</ans>"}}));
        assert!(e.contains("</ans>") && e.contains("</answer>"), "{e}");
        let e = err(json!({"special_tokens": "<eos>"}));
        assert!(e.contains("object"), "{e}");
    }
}
