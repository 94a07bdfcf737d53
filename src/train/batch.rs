//! Padding token sequences into rectangular batches.

use candle_core::{Device, Result, Tensor};

/// Row-major ids and 0/1 mask, `rows × len`.
pub struct Batch {
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
    pub rows: usize,
    pub len: usize,
}

impl Batch {
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::from_slice(&self.ids, (self.rows, self.len), device)?,
            Tensor::from_slice(&self.mask, (self.rows, self.len), device)?,
        ))
    }
}

fn pad(seqs: &[Vec<u32>], pad_id: u32, left: bool) -> Batch {
    let len = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut mask = Vec::with_capacity(seqs.len() * len);
    for s in seqs {
        let n = len - s.len();
        if left {
            ids.extend(std::iter::repeat_n(pad_id, n));
            mask.extend(std::iter::repeat_n(0, n));
        }
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(1, s.len()));
        if !left {
            ids.extend(std::iter::repeat_n(pad_id, n));
            mask.extend(std::iter::repeat_n(0, n));
        }
    }
    Batch { ids, mask, rows: seqs.len(), len }
}

pub fn pad_right(seqs: &[Vec<u32>], pad_id: u32) -> Batch {
    pad(seqs, pad_id, false)
}

pub fn pad_left(seqs: &[Vec<u32>], pad_id: u32) -> Batch {
    pad(seqs, pad_id, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_both_ways() {
        let b = pad_right(&[vec![5, 6], vec![7]], 0);
        assert_eq!((b.ids, b.mask, b.len), (vec![5, 6, 7, 0], vec![1, 1, 1, 0], 2));
        let b = pad_left(&[vec![5, 6], vec![7]], 0);
        assert_eq!((b.ids, b.mask), (vec![5, 6, 0, 7], vec![1, 1, 0, 1]));
    }
}
