//! A second, different judge (the paper's cross-model test): a pretrained instruction model
//! (SmolLM2-135M-Instruct, no fine-tuning) reads the description, the post and the two
//! responses in a ChatML prompt, and its next-token probabilities of "A" and "B" are the
//! verdict — read in both A/B orders, as the trained judge is.

use super::super::judge::{both_orders, fold_orders, PairScores};
use crate::tokenizer::TextTokenizer;
use crate::train::model::Decoder;
use crate::train::synth::Pair;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};

/// Longest description, post and response text the prompt keeps (characters), so one pair
/// stays a few hundred tokens.
const MAX_CHARS: usize = 600;

pub struct LlmJudge<'a> {
    pub model: &'a dyn Decoder,
    pub tok: &'a TextTokenizer,
    pub device: Device,
    /// Token ids of "A" and "B" as the answer's first token.
    a: u32,
    b: u32,
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(MAX_CHARS) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The judge's prompt for one ordered pair.
pub fn prompt(description: &str, post: &str, a: &str, b: &str) -> String {
    format!(
        "<|im_start|>system\nYou predict which of two responses a user prefers.<|im_end|>\n\
         <|im_start|>user\nWhat we know about the user: {}\n\nThe user's request: {}\n\n\
         Response A: {}\n\nResponse B: {}\n\nWhich response does this user prefer? Answer with one letter, A or B.\
         <|im_end|>\n<|im_start|>assistant\n",
        clip(description),
        clip(post),
        clip(a),
        clip(b)
    )
}

impl<'a> LlmJudge<'a> {
    pub fn new(model: &'a dyn Decoder, tok: &'a TextTokenizer, device: Device) -> Result<Self> {
        let id = |s: &str| {
            let ids = tok.encode(s);
            ensure!(ids.len() == 1, "{s:?} is not one token of this tokenizer ({ids:?})");
            Ok(ids[0])
        };
        Ok(Self { model, tok, device, a: id("A")?, b: id("B")? })
    }

    /// P(A) against P(B) at the answer's first token, for one prompt.
    fn prob_a(&self, text: &str) -> Result<f32> {
        let ids = self.tok.encode(text);
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), &self.device)?;
        let mask = Tensor::ones((1, n), DType::U32, &self.device)?;
        let pos = Tensor::arange(0u32, n as u32, &self.device)?.reshape((1, n))?;
        let (hidden, _) = self.model.hidden(&input, &mask, &pos, None)?;
        let last = self.model.logits(&hidden.narrow(1, n - 1, 1)?)?.flatten_all()?;
        let ids = Tensor::new(&[self.a, self.b], &self.device)?;
        let two = last.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        let p = candle_nn::ops::softmax(&two, D::Minus1)?.to_vec1::<f32>()?;
        Ok(p[0])
    }
}

impl PairScores for LlmJudge<'_> {
    fn many_chosen_probs(&self, jobs: &[(&str, &[Pair])]) -> anyhow::Result<Vec<Vec<f32>>> {
        let probs: Vec<f32> = both_orders(jobs)
            .into_iter()
            .map(|(d, post, a, b)| self.prob_a(&prompt(d, post, a, b)))
            .collect::<Result<_>>()?;
        Ok(fold_orders(jobs, &probs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_names_both_responses_and_asks_for_one_letter() {
        let p = prompt("likes brevity", "How do I boil an egg?", "Boil 8 minutes.", "Well, first…");
        assert!(p.contains("Response A: Boil 8 minutes.") && p.contains("Response B: Well, first…"));
        assert!(p.ends_with("<|im_start|>assistant\n"));
        let long = "x".repeat(5000);
        assert!(prompt(&long, "", "", "").len() < 1000, "long texts are clipped");
    }
}
