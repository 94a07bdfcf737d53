//! Masked attention softmax as one fused op with its own backward.
//!
//! The composed form (scale, mask multiply, bias add, then max / sub / exp / sum / div) makes
//! about ten single-threaded passes over the `[b, h, s, t]` score tensor, forward and backward;
//! at SFT lengths (≈ 540 tokens) that was most of a training step on two cores. This op reads
//! the scores once, runs rows in parallel, and computes the same probabilities as the additive
//! mask the ONNX export uses (`MASK_VALUE`): zero on masked keys, and a uniform row where a
//! query may read nothing (left padding), whose gradient is zero.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Which keys each query may read: key padding `[b, t]` (1 = real token), optionally causal
/// with `past` cached positions before the `s` queries.
#[derive(Debug, Clone)]
pub struct AttnMask {
    keys: Arc<Vec<u8>>,
    batch: usize,
    total: usize,
    queries: usize,
    causal: bool,
}

impl AttnMask {
    /// `attention_mask` `[b, t]` (0/1, any dtype) for `queries` new positions at the end.
    pub fn new(attention_mask: &Tensor, queries: usize, causal: bool) -> Result<Self> {
        let (batch, total) = attention_mask.dims2()?;
        let keys = attention_mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { keys: Arc::new(keys.iter().map(|&m| u8::from(m != 0.0)).collect()), batch, total, queries, causal })
    }

    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        self.keys[b * self.total + j] == 1 && (!self.causal || j <= self.total - self.queries + i)
    }

    /// softmax(scale · scores) over the allowed keys; `scores` is `[b, h, s, t]`.
    pub fn softmax(&self, scores: &Tensor, scale: f32) -> Result<Tensor> {
        scores.apply_op1(MaskedSoftmax { mask: self.clone(), scale })
    }

    fn check(&self, shape: &Shape) -> Result<usize> {
        let (b, h, s, t) = shape.dims4()?;
        if b != self.batch || s != self.queries || t != self.total {
            return Err(Error::Msg(format!("scores {shape:?} do not match mask [{}, {}]", self.batch, self.total)));
        }
        Ok(h)
    }

    /// Row r of the flattened `[b, h, s, t]` → (batch, query).
    fn row(&self, r: usize, heads: usize) -> (usize, usize) {
        (r / (heads * self.queries), r % self.queries)
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| Error::Msg("masked softmax needs contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

struct MaskedSoftmax {
    mask: AttnMask,
    scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let heads = self.mask.check(layout.shape())?;
        let x = contiguous(storage, layout)?;
        let t = self.mask.total;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(r, (p, x))| {
            let (b, i) = self.mask.row(r, heads);
            let mut max = f32::NEG_INFINITY;
            for j in (0..t).filter(|&j| self.mask.allowed(b, i, j)) {
                max = max.max(x[j] * self.scale);
            }
            if max == f32::NEG_INFINITY {
                p.fill(1.0 / t as f32);
                return;
            }
            let mut sum = 0.0;
            for j in (0..t).filter(|&j| self.mask.allowed(b, i, j)) {
                p[j] = (x[j] * self.scale - max).exp();
                sum += p[j];
            }
            p.iter_mut().for_each(|v| *v /= sum);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = res.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &MaskedSoftmaxGrad(self))?;
        Ok(Some(grad))
    }
}

/// d scores = scale · p · (g − Σ g·p) on allowed keys; zero elsewhere and on rows with none.
struct MaskedSoftmaxGrad<'a>(&'a MaskedSoftmax);

impl CustomOp2 for MaskedSoftmaxGrad<'_> {
    fn name(&self) -> &'static str {
        "masked-softmax-grad"
    }

    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let MaskedSoftmax { mask, scale } = self.0;
        let heads = mask.check(pl.shape())?;
        let (p, g) = (contiguous(ps, pl)?, contiguous(gs, gl)?);
        let t = mask.total;
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(t).zip(p.par_chunks(t).zip(g.par_chunks(t))).enumerate().for_each(|(r, (d, (p, g)))| {
            let (b, i) = mask.row(r, heads);
            if !(0..t).any(|j| mask.allowed(b, i, j)) {
                return;
            }
            let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for j in 0..t {
                d[j] = scale * p[j] * (g[j] - dot);
            }
        });
        Ok((CpuStorage::F32(out), pl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::MASK_VALUE;
    use candle_core::{Device, Var, D};

    /// The composed form the fused op replaces (and the ONNX export still uses).
    fn reference(scores: &Tensor, mask: &Tensor, s: usize, causal: bool, scale: f64) -> Result<Tensor> {
        let (b, t) = mask.dims2()?;
        let past = t - s;
        let c: Vec<f32> = (0..s).flat_map(|i| (0..t).map(move |j| f32::from(!causal || j <= past + i))).collect();
        let keep = Tensor::from_vec(c, (1, 1, s, t), mask.device())?
            .broadcast_mul(&mask.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?)?;
        let bias = ((1.0 - &keep)? * MASK_VALUE as f64)?;
        candle_nn::ops::softmax(&(scores * scale)?.broadcast_mul(&keep)?.broadcast_add(&bias)?, D::Minus1)
    }

    #[test]
    fn matches_the_composed_form_and_its_gradient() {
        let dev = Device::Cpu;
        // Row 1 is left-padded, so with a past of 1 its first query may read nothing.
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &dev).unwrap();
        for (causal, s) in [(true, 4), (true, 1), (false, 5)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, s, 5), &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 1.0, (2, 3, s, 5), &dev).unwrap();
            let m = AttnMask::new(&mask, s, causal).unwrap();
            let fused = m.softmax(x.as_tensor(), 0.5).unwrap();
            let composed = reference(x.as_tensor(), &mask, s, causal, 0.5).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&fused, &composed) < 1e-6, "forward, causal {causal}, s {s}");
            let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
            assert!(diff(gf, gc) < 1e-5, "gradient, causal {causal}, s {s}");
        }
    }
}
