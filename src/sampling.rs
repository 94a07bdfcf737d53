//! Next-token choice from a logits row: greedy, or the paper's sampling (temperature, top-k,
//! top-p). Pure, shared by candle generation in training and the ONNX engine.

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

impl SamplingParams {
    pub const GREEDY: Self = Self { temperature: 0.0, top_k: 0, top_p: 1.0 };
    /// AlignXplore's inference setting.
    pub const PAPER: Self = Self { temperature: 0.9, top_k: 10, top_p: 0.95 };
    /// The model's own distribution, untruncated.
    pub const POLICY: Self = Self { temperature: 1.0, top_k: 0, top_p: 1.0 };
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Pick a token id. Ties and NaNs resolve deterministically (lowest index).
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if p.temperature <= 0.0 || p.top_k == 1 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = if p.top_k == 0 { logits.len() } else { p.top_k.min(logits.len()) };
    idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / p.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    // Nucleus: the smallest prefix whose mass reaches top_p.
    let mut mass = 0.0;
    let mut keep = probs.len();
    for (n, &q) in probs.iter().enumerate() {
        mass += q;
        if mass >= p.top_p {
            keep = n + 1;
            break;
        }
    }
    let total: f32 = probs[..keep].iter().sum();
    let mut r = rng.gen::<f32>() * total;
    for (n, &q) in probs[..keep].iter().enumerate() {
        if r < q {
            return idx[n] as u32;
        }
        r -= q;
    }
    idx[keep - 1] as u32
}

/// No-repeat n-gram constraint (`n` = 0: off). Greedy decoding of a small model loops on one
/// phrase ("prefers X; prefers X; …") until the token budget runs out; this sets to -inf every
/// token that would complete an n-gram already in `answer`, the part of the response after
/// `<answer>` (see `answer_part`). The reasoning is left alone: its summary legitimately
/// repeats the phrases it listed per signal.
pub fn block_repeats(logits: &mut [f32], answer: &[u32], n: usize) {
    if n == 0 || answer.len() + 1 < n {
        return;
    }
    let prefix = &answer[answer.len() + 1 - n..];
    for w in answer.windows(n) {
        if &w[..n - 1] == prefix {
            if let Some(v) = logits.get_mut(w[n - 1] as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

/// The generated tokens after the last `answer_open` (`<answer>`); empty before it.
pub fn answer_part(generated: &[u32], answer_open: Option<u32>) -> &[u32] {
    match answer_open.and_then(|open| generated.iter().rposition(|&t| t == open)) {
        Some(i) => &generated[i + 1..],
        None => &[],
    }
}

/// The logits a row may pick from: `row` itself when the constraint is off (`n` = 0), else
/// a copy in `scratch` with the answer's repeats blocked (`block_repeats`). For a vocabulary
/// whose `<answer>` is one token; `allowed_in` takes the answer itself.
pub fn allowed<'a>(
    row: &'a [f32],
    generated: &[u32],
    answer_open: Option<u32>,
    n: usize,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    allowed_in(row, answer_part(generated, answer_open), n, scratch)
}

/// `allowed` given the answer so far (the tokens after `<answer>`, however it was found:
/// `tokenizer::AnswerStart` follows a tag spelled as text).
pub fn allowed_in<'a>(row: &'a [f32], answer: &[u32], n: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
    if n == 0 {
        return row;
    }
    scratch.clear();
    scratch.extend_from_slice(row);
    block_repeats(scratch, answer, n);
    scratch
}

/// Log-probability of `token` under softmax(logits) (used for GRPO ratios).
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&v| (v - max).exp()).sum::<f32>().ln() + max;
    logits[token as usize] - lse
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn greedy_and_filters() {
        let logits = [0.1, 3.0, 2.9, -1.0, 0.0];
        assert_eq!(sample(&logits, &SamplingParams::GREEDY, &mut StdRng::seed_from_u64(0)), 1);
        let mut rng = StdRng::seed_from_u64(1);
        let p = SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0 };
        for _ in 0..200 {
            assert!(matches!(sample(&logits, &p, &mut rng), 1 | 2));
        }
        // top_p small keeps only the best token
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.1 };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
    }

    #[test]
    fn repeats_are_blocked_within_the_answer_only() {
        // "a b c a b" with n = 3: "a b" was followed by c, so c is blocked; nothing else is.
        let mut logits = [1.0f32; 6];
        block_repeats(&mut logits, &[0, 1, 2, 0, 1], 3);
        assert_eq!(logits, [1.0, 1.0, f32::NEG_INFINITY, 1.0, 1.0, 1.0]);
        // n = 1 blocks every token already used; n = 0 and short parts block nothing.
        let mut logits = [1.0f32; 4];
        block_repeats(&mut logits, &[3, 1], 1);
        assert_eq!(logits, [1.0, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY]);
        let mut logits = [1.0f32; 4];
        block_repeats(&mut logits, &[0, 1, 2, 0, 1], 0);
        block_repeats(&mut logits, &[0], 3);
        assert_eq!(logits, [1.0; 4]);
        // Out-of-vocabulary ids in the history are ignored, not a panic.
        block_repeats(&mut logits, &[0, 9, 0], 2);
        // The answer starts after `<answer>`; before it (the reasoning) nothing is constrained.
        assert_eq!(answer_part(&[5, 6, 7], Some(9)), &[] as &[u32]);
        assert_eq!(answer_part(&[5, 9, 6, 7], Some(9)), &[6, 7]);
        assert_eq!(answer_part(&[5, 9], Some(9)), &[] as &[u32]);
        assert_eq!(answer_part(&[5, 9, 6], None), &[] as &[u32]);
        let (row, mut scratch) = ([1.0f32; 4], Vec::new());
        assert_eq!(allowed_in(&row, &[1, 2, 1], 2, &mut scratch), &[1.0, 1.0, f32::NEG_INFINITY, 1.0]);
        assert_eq!(allowed(&row, &[0, 9, 1, 2, 1], Some(9), 2, &mut scratch), &[1.0, 1.0, f32::NEG_INFINITY, 1.0]);
        assert_eq!(allowed_in(&row, &[1, 2, 1], 0, &mut scratch), &row);
    }

    #[test]
    fn sampling_follows_probabilities_and_seed() {
        let logits = [0.0f32, (3.0f32).ln()];
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let mut rng = StdRng::seed_from_u64(7);
        let ones = (0..4000).filter(|_| sample(&logits, &p, &mut rng) == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
        let a: Vec<u32> = {
            let mut r = StdRng::seed_from_u64(3);
            (0..20).map(|_| sample(&logits, &p, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = StdRng::seed_from_u64(3);
            (0..20).map(|_| sample(&logits, &p, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert!((log_prob(&logits, 1) - (0.75f32).ln()).abs() < 1e-5);
    }
}
