//! Rectangular batches of token rows (pure; shared by serving and training): right padding for
//! training targets, left padding for generation (every row's last token in the last column),
//! and the position ids that make left padding invisible to the model.

/// Row-major ids and 0/1 mask, `rows × len`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
    pub rows: usize,
    pub len: usize,
}

impl Batch {
    /// The rows of ids (or, with `mask`, of the mask), each `len` long.
    pub fn id_rows(&self) -> impl Iterator<Item = &[u32]> {
        self.ids.chunks(self.len)
    }

    pub fn mask_rows(&self) -> impl Iterator<Item = &[u32]> {
        self.mask.chunks(self.len)
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

/// Position ids of columns `from..` of one left-padded row: the number of real tokens before
/// each column (pads get 0).
pub fn positions(mask_row: &[u32], from: usize) -> impl Iterator<Item = u32> + '_ {
    let before: u32 = mask_row[..from].iter().sum();
    mask_row[from..].iter().scan(before, |seen, &m| {
        let p = if m == 1 { *seen } else { 0 };
        *seen += m;
        Some(p)
    })
}

/// `positions` of every row.
pub fn positions_from_mask(mask: &[Vec<u32>], past: usize) -> Vec<Vec<u32>> {
    mask.iter().map(|row| positions(row, past).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_both_ways() {
        let b = pad_right(&[vec![5, 6], vec![7]], 0);
        assert_eq!((b.ids.clone(), b.mask.clone(), b.len), (vec![5, 6, 7, 0], vec![1, 1, 1, 0], 2));
        let b = pad_left(&[vec![5, 6], vec![7]], 0);
        assert_eq!((b.ids.clone(), b.mask.clone()), (vec![5, 6, 0, 7], vec![1, 1, 0, 1]));
        assert_eq!(b.id_rows().collect::<Vec<_>>(), [&[5, 6][..], &[0, 7][..]]);
    }

    #[test]
    fn positions_skip_left_padding() {
        assert_eq!(
            positions_from_mask(&[vec![0, 0, 1, 1], vec![1, 1, 1, 1]], 0),
            vec![vec![0, 0, 0, 1], vec![0, 1, 2, 3]]
        );
        assert_eq!(positions_from_mask(&[vec![0, 1, 1, 1]], 3), vec![vec![2]]);
        assert_eq!(positions(&[0, 0, 1, 1, 1, 1], 5).collect::<Vec<_>>(), [3]);
    }
}
