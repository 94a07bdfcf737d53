//! Candle tensors of padded batches (the padding itself is `crate::padding`, shared with serving).

use candle_core::{Device, Result, Tensor};

pub use crate::padding::{pad_left, pad_right, Batch};

impl Batch {
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::from_slice(&self.ids, (self.rows, self.len), device)?,
            Tensor::from_slice(&self.mask, (self.rows, self.len), device)?,
        ))
    }
}
