//! One decoder graph: discovery of its cache layout from the graph's inputs, and one forward
//! step with inputs bound by name.
//!
//! Steps run through an `IoBinding` so the `present.*` outputs stay where the execution
//! provider produced them (GPU memory under CUDA) and go back in as the next step's `past_*`
//! without a host round trip; only the logits are bound to host memory.

use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor, TensorElementType, ValueType};

use super::{EngineError, Result};
use crate::runtime::{self, Device};

/// What the engine learned about a decoder from its graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphSpec {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Element type of the caches (fp32 or fp16); empty pasts are allocated in it.
    pub kv_dtype: TensorElementType,
    /// Element type of `input_ids` / `attention_mask` / `position_ids` (int64 or int32).
    pub id_dtype: TensorElementType,
    pub has_position_ids: bool,
    /// Merged decoders (Optimum) pick the no-cache or cache subgraph with this bool input.
    pub has_use_cache_branch: bool,
    /// GroupQueryAttention graphs (onnxruntime-genai's `past_present_share_buffer`) can write
    /// each step's keys/values into the past buffer itself, so one buffer is bound as both
    /// `past_key_values.*` and `present.*` and no step copies the cache.
    pub share_buffer: bool,
}

/// The cache a step reads.
pub enum Cache<'a> {
    /// Growing pasts; the step returns new `present.*` values holding past + new.
    Grow(&'a [DynValue]),
    /// `[batch, kv_heads, max_len, head_dim]` buffers bound as past and present (`share_buffer`
    /// graphs); the step writes the new positions in place and returns no presents.
    Shared(&'a mut [DynTensor]),
}

pub struct DecoderSession {
    session: Session,
    spec: GraphSpec,
    device: Device,
    path: PathBuf,
}

/// Host bytes a step copied in our code (inputs built, logits read back).
#[derive(Debug)]
pub struct StepOutput {
    /// Last-position logits, row-major `[batch, vocab]`, as f32.
    pub logits: Vec<f32>,
    pub vocab: usize,
    /// `present.{i}.key`, `present.{i}.value` for each layer, in that order.
    pub presents: Vec<DynValue>,
    pub bytes_copied: usize,
}

/// Token ids, mask and positions of one step, row-major, as i64.
pub struct StepInput<'a> {
    pub batch: usize,
    pub ids: &'a [i64],
    pub mask: &'a [i64],
    pub positions: &'a [i64],
}

/// Element type and shape (`-1` for symbolic dimensions) of a graph input.
type TensorInfo = (TensorElementType, Vec<i64>);

fn tensor_info(vt: &ValueType) -> Option<TensorInfo> {
    match vt {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
        _ => None,
    }
}

impl DecoderSession {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let session = runtime::session_from_file(path, device)?;
        let mut spec =
            discover(&session, path).map_err(|message| EngineError::Graph { path: path.to_path_buf(), message })?;
        // Checked on CPU only so far (the CUDA run predates it); PREFSTREAM_KV_SHARE=0 opts out.
        spec.share_buffer &= *device == Device::Cpu && std::env::var("PREFSTREAM_KV_SHARE").map_or(true, |v| v != "0");
        tracing::info!(path = %path.display(), ?spec, %device, "decoder loaded");
        Ok(Self { session, spec, device: *device, path: path.to_path_buf() })
    }

    pub fn spec(&self) -> &GraphSpec {
        &self.spec
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Zero-length pasts `[batch, kv_heads, 0, head_dim]` in the graph's cache dtype.
    pub fn empty_cache(&self, batch: usize) -> Result<Vec<DynValue>> {
        Ok(self.shared_cache(batch, 0)?.into_iter().map(DynTensor::into_dyn).collect())
    }

    /// `2 * layers` cache tensors `[batch, kv_heads, max_len, head_dim]` in the graph's cache
    /// dtype: the buffers of `Cache::Shared`, allocated once per batch.
    pub fn shared_cache(&self, batch: usize, max_len: usize) -> Result<Vec<DynTensor>> {
        let s = &self.spec;
        let shape = [batch as i64, s.kv_heads as i64, max_len as i64, s.head_dim as i64];
        (0..2 * s.layers).map(|_| Ok(DynTensor::new(&Allocator::default(), s.kv_dtype, shape)?)).collect()
    }

    /// Runs one step. The cache holds `2 * layers` values (key, value per layer); they are bound,
    /// not copied. `cache_branch` feeds `use_cache_branch` on merged decoders.
    pub fn step(&mut self, input: &StepInput, cache: Cache<'_>, cache_branch: bool) -> Result<StepOutput> {
        let spec = &self.spec;
        let b = input.batch;
        let seq = input.ids.len() / b;
        let mut bytes = 0;
        let mut ints = |name: &str, data: &[i64], cols: usize| -> Result<DynValue> {
            bytes += data.len() * if spec.id_dtype == TensorElementType::Int32 { 4 } else { 8 };
            int_tensor(spec.id_dtype, [b as i64, cols as i64], data).map_err(|e| graph_err(&self.path, name, e))
        };
        let ids = ints("input_ids", input.ids, seq)?;
        let mask = ints("attention_mask", input.mask, input.mask.len() / b)?;
        let positions = if spec.has_position_ids { Some(ints("position_ids", input.positions, seq)?) } else { None };
        let branch = Tensor::<bool>::from_array(([1usize], vec![cache_branch]))?.into_dyn();

        let mut binding = self.session.create_binding()?;
        binding.bind_input("input_ids", &ids)?;
        binding.bind_input("attention_mask", &mask)?;
        if let Some(p) = &positions {
            binding.bind_input("position_ids", p)?;
        }
        if spec.has_use_cache_branch {
            binding.bind_input("use_cache_branch", &branch)?;
        }
        let names = |i: usize| {
            let kind = if i.is_multiple_of(2) { "key" } else { "value" };
            (format!("past_key_values.{}.{kind}", i / 2), format!("present.{}.{kind}", i / 2))
        };
        let shared = matches!(cache, Cache::Shared(_));
        match cache {
            Cache::Grow(past) => {
                for (i, v) in past.iter().enumerate() {
                    binding.bind_input(names(i).0, v)?;
                }
            }
            Cache::Shared(buffers) => {
                // Tensors made by `Tensor::new` are bound without a clone, so input and output
                // are the same memory and GroupQueryAttention sees the shared buffer.
                for (i, v) in buffers.iter_mut().enumerate() {
                    let (past, present) = names(i);
                    binding.bind_input(past, &*v)?;
                    binding.bind_output(present, v)?;
                }
            }
        }
        let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        let cache_mem = match self.device {
            Device::Cpu => host.clone(),
            Device::Cuda(n) => {
                MemoryInfo::new(AllocationDevice::CUDA, n as i32, AllocatorType::Device, MemoryType::Default)?
            }
        };
        binding.bind_output_to_device("logits", &host)?;
        if !shared {
            for i in 0..2 * spec.layers {
                binding.bind_output_to_device(names(i).1, &cache_mem)?;
            }
        }
        let mut out = self.session.run_binding(&binding)?;
        let logits = out.remove("logits").ok_or_else(|| graph_err(&self.path, "logits", "missing output"))?;
        let (rows, vocab) = last_logits(&logits, b).map_err(|e| graph_err(&self.path, "logits", e))?;
        bytes += rows.len() * 4;
        let mut presents = Vec::new();
        if !shared {
            for i in 0..2 * spec.layers {
                let name = names(i).1;
                presents.push(out.remove(name.as_str()).ok_or_else(|| graph_err(&self.path, &name, "missing output"))?);
            }
        }
        Ok(StepOutput { logits: rows, vocab, presents, bytes_copied: bytes })
    }
}

fn graph_err(path: &Path, name: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Graph { path: path.to_path_buf(), message: format!("{name}: {e}") }
}

fn int_tensor(ty: TensorElementType, shape: [i64; 2], data: &[i64]) -> Result<DynValue, String> {
    let shape = shape.map(|d| d as usize);
    let v = match ty {
        TensorElementType::Int64 => Tensor::from_array((shape, data.to_vec())).map(|t| t.into_dyn()),
        TensorElementType::Int32 => {
            Tensor::from_array((shape, data.iter().map(|&x| x as i32).collect::<Vec<_>>())).map(|t| t.into_dyn())
        }
        other => return Err(format!("unsupported id dtype {other:?}")),
    };
    v.map_err(|e| e.to_string())
}

/// Copies the last position's logits `[b, s, vocab]` → `[b, vocab]` f32 (fp16/bf16 converted).
fn last_logits(value: &DynValue, b: usize) -> Result<(Vec<f32>, usize), String> {
    let t = value.view().downcast::<DynTensorValueType>().map_err(|e| e.to_string())?;
    let shape = t.shape().to_vec();
    let [rows, seq, vocab] = shape[..] else { return Err(format!("expected rank 3, got {shape:?}")) };
    if rows as usize != b || seq < 1 {
        return Err(format!("unexpected shape {shape:?} for batch {b}"));
    }
    if !t.memory_info().is_cpu_accessible() {
        return Err("logits are not in host memory".into());
    }
    let (seq, vocab) = (seq as usize, vocab as usize);
    let n = b * seq * vocab;
    let last = |row: usize| (row * seq + seq - 1) * vocab;
    let mut out = Vec::with_capacity(b * vocab);
    match *t.data_type() {
        TensorElementType::Float32 => {
            let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
            (0..b).for_each(|r| out.extend_from_slice(&data[last(r)..last(r) + vocab]));
        }
        ty @ (TensorElementType::Float16 | TensorElementType::Bfloat16) => {
            // ort's half types sit behind a feature we do not enable; read the raw bits.
            let data = unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u16>(), n) };
            let cvt = if ty == TensorElementType::Float16 { f16_to_f32 } else { bf16_to_f32 };
            (0..b).for_each(|r| out.extend(data[last(r)..last(r) + vocab].iter().map(|&h| cvt(h))));
        }
        other => return Err(format!("unsupported logits dtype {other:?}")),
    }
    Ok((out, vocab))
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// IEEE half → single (exact; subnormals normalised).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: shift until the implicit bit appears
            let shift = f.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((f << shift) & 0x3ff) << 13)
        }
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// The onnxruntime-genai `genai_config.json` beside the model, if any.
fn genai_config(model: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(model.with_file_name("genai_config.json")).ok()?).ok()
}

/// `kv_heads` / `head_dim` from genai's config, for graphs whose cache shapes leave them
/// symbolic (its builder names head_dim `kv_cache_dim`).
fn genai_cache_dims(model: &Path) -> Option<(i64, i64)> {
    let v = genai_config(model)?;
    let d = &v["model"]["decoder"];
    Some((d["num_key_value_heads"].as_i64()?, d["head_size"].as_i64()?))
}

/// Finds the cache layout from `past_key_values.{i}.key|value` inputs and checks the rest of
/// the contract (no shapes are assumed).
fn discover(session: &Session, path: &Path) -> Result<GraphSpec, String> {
    let inputs: Vec<(String, Option<TensorInfo>)> =
        session.inputs().iter().map(|o| (o.name().to_string(), tensor_info(o.dtype()))).collect();
    let find = |name: &str| inputs.iter().find(|(n, _)| n == name).and_then(|(_, t)| t.clone());
    let outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();

    let (id_dtype, _) = find("input_ids").ok_or("no `input_ids` input")?;
    find("attention_mask").ok_or("no `attention_mask` input")?;
    if !matches!(id_dtype, TensorElementType::Int64 | TensorElementType::Int32) {
        return Err(format!("`input_ids` has dtype {id_dtype:?}; expected int64 or int32"));
    }
    let layers = inputs
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("past_key_values.")?.strip_suffix(".key")?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .ok_or("no `past_key_values.{i}.key` inputs: not a decoder with KV cache")?;
    let (kv_dtype, shape) = find("past_key_values.0.key").ok_or("no `past_key_values.0.key`")?;
    let [_, mut kv_heads, _, mut head_dim] = shape[..] else {
        return Err(format!(
            "past_key_values.0.key has rank {}, expected [batch, kv_heads, past, head_dim]",
            shape.len()
        ));
    };
    if kv_heads <= 0 || head_dim <= 0 {
        match genai_cache_dims(path) {
            Some((h, d)) if (kv_heads <= 0 || kv_heads == h) && (head_dim <= 0 || head_dim == d) => {
                (kv_heads, head_dim) = (h, d);
            }
            _ => {
                return Err(format!(
                    "past_key_values.0.key shape {shape:?} leaves kv_heads/head_dim symbolic \
                     (and no genai_config.json beside the model gives them)"
                ))
            }
        }
    }
    if !matches!(kv_dtype, TensorElementType::Float32 | TensorElementType::Float16 | TensorElementType::Bfloat16) {
        return Err(format!("cache dtype {kv_dtype:?} is not supported"));
    }
    for i in 0..layers {
        for kind in ["key", "value"] {
            let name = format!("past_key_values.{i}.{kind}");
            let (ty, s) = find(&name).ok_or_else(|| format!("missing input `{name}`"))?;
            // Compared with layer 0 as declared (symbolic dimensions included).
            if ty != kv_dtype || s.len() != 4 || s[1] != shape[1] || s[3] != shape[3] {
                return Err(format!("`{name}` is {ty:?} {s:?}, unlike past_key_values.0.key"));
            }
            let out = format!("present.{i}.{kind}");
            if !outputs.contains(&out) {
                return Err(format!("missing output `{out}`"));
            }
        }
    }
    if !outputs.iter().any(|o| o == "logits") {
        return Err("missing output `logits`".into());
    }
    let known = |n: &str| {
        matches!(n, "input_ids" | "attention_mask" | "position_ids" | "use_cache_branch")
            || n.starts_with("past_key_values.")
    };
    if let Some((n, _)) = inputs.iter().find(|(n, _)| !known(n)) {
        return Err(format!("unexpected input `{n}`"));
    }
    Ok(GraphSpec {
        layers,
        kv_heads: kv_heads as usize,
        head_dim: head_dim as usize,
        kv_dtype,
        id_dtype,
        has_position_ids: find("position_ids").is_some(),
        has_use_cache_branch: find("use_cache_branch").is_some(),
        // genai sets this only for its GroupQueryAttention graphs, which take no position_ids.
        share_buffer: find("position_ids").is_none()
            && genai_config(path).is_some_and(|v| v["search"]["past_present_share_buffer"] == true),
    })
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn half_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0200), 2f32.powi(-15));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
