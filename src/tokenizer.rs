//! The model package's tokenizer (`tokenizer.json`, Hugging Face format): byte-level BPE with
//! the special tokens of the output format. Training lives here too so both sides agree.

use crate::prompt::{ANSWER_CLOSE, ANSWER_OPEN, EOS, PAD, THINK_CLOSE, THINK_OPEN};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens, in id order: `<pad>` is 0 and `<eos>` is 1.
pub const SPECIAL_TOKENS: [&str; 6] = [PAD, EOS, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer {0} lacks the special token {1}")]
    MissingSpecial(String, String),
    #[error("tokenizer: {0}")]
    Other(String),
}

/// A loaded tokenizer with the ids generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub pad: u32,
    pub eos: u32,
    pub answer_close: u32,
    /// `<answer>` where the vocabulary has it: the no-repeat constraint applies after it.
    pub answer_open: Option<u32>,
}

impl TextTokenizer {
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), message: e.to_string() })?;
        Self::from_tokenizer(inner, &path.display().to_string())
    }

    fn from_tokenizer(inner: Tokenizer, name: &str) -> Result<Self, TokenizerError> {
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| TokenizerError::MissingSpecial(name.into(), t.into()));
        let answer_open = inner.token_to_id(ANSWER_OPEN);
        Ok(Self { pad: id(PAD)?, eos: id(EOS)?, answer_close: id(ANSWER_CLOSE)?, answer_open, inner })
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        // Encoding our own tokenizer cannot fail on a &str; map defensively to empty.
        self.inner.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }

    /// `encode`, with each token's byte range in `text` (byte-level BPE: a leading space
    /// belongs to the token that follows it).
    pub fn encode_with_offsets(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        self.inner.encode(text, false).map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec())).unwrap_or_default()
    }

    /// Decode keeping the tags (they are special tokens) so the format check can see them.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner.save(path, false).map_err(|e| TokenizerError::Other(e.to_string()))
    }

    /// Train byte-level BPE on `texts`.
    pub fn train(texts: impl Iterator<Item = String> + Send, vocab_size: usize) -> Result<Self, TokenizerError> {
        let specials = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = tokenizers::models::TrainerWrapper::from(trainer);
        let mut tok = Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::default()));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.train(&mut trainer, texts).map_err(|e| TokenizerError::Other(e.to_string()))?;
        Self::from_tokenizer(tok, "trained")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_with_special_tokens_and_round_trips() {
        let corpus: Vec<String> = (0..200)
            .map(|i| format!("The user likes tea number {i}.<think>so</think><answer>tea</answer><eos>"))
            .collect();
        let tok = TextTokenizer::train(corpus.into_iter(), 300).unwrap();
        assert_eq!((tok.pad, tok.eos), (0, 1));
        let ids = tok.encode("why<think>a</think><answer>b c</answer>");
        assert!(ids.contains(&tok.answer_close));
        assert_eq!(tok.decode(&ids).replace(' ', ""), "why<think>a</think><answer>bc</answer>");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let again = TextTokenizer::load(&path).unwrap();
        assert_eq!(again.encode("The user likes tea."), tok.encode("The user likes tea."));
        assert!(TextTokenizer::load(&dir.path().join("missing.json")).is_err());
    }
}
