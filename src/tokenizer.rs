//! The model package's tokenizer (`tokenizer.json`, Hugging Face format) with the ids generation
//! needs. Our own is byte-level BPE with the output format's tags as special tokens (trained
//! here, so both sides agree); another model's tokenizer keeps its own special tokens, named by
//! role in the manifest (`SpecialTokens`), and may spell the tags as ordinary text.

use crate::prompt::{ANSWER_CLOSE, ANSWER_OPEN, EOS, PAD, THINK_CLOSE, THINK_OPEN};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens of our own tokenizer, in id order: `<pad>` is 0 and `<eos>` is 1.
pub const SPECIAL_TOKENS: [&str; 6] = [PAD, EOS, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE];

/// `TextTokenizer::answer_close` when the tag is not one token: an id no vocabulary has.
pub const NO_TOKEN: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer {0} lacks the special token {1}")]
    MissingSpecial(String, String),
    #[error("tokenizer: {0}")]
    Other(String),
}

/// The end and padding tokens by role (`manifest.json` `special_tokens`). The tags' text is
/// fixed by the output format (`prompt::THINK_OPEN`…); whether the vocabulary holds each as
/// one token is found out at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// End of turn or sequence; each one stops generation. The first is the one training
    /// appends to a response.
    pub eos: Vec<String>,
    /// Fills left padding and finished rows; may be the same token as an eos.
    pub pad: String,
}

impl Default for SpecialTokens {
    /// Our own tokenizer's names (packages whose manifest names none).
    fn default() -> Self {
        Self { eos: vec![EOS.to_string()], pad: PAD.to_string() }
    }
}

/// A tag of the output format as the vocabulary holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// An added token: the tokenizer always encodes the tag as this one id.
    Token(u32),
    /// Ordinary text that takes several tokens.
    Text(&'static str),
}

/// A loaded tokenizer with the ids generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub pad: u32,
    /// The first end token (`SpecialTokens::eos[0]`): what training appends to a response.
    pub eos: u32,
    /// Every end token; generation stops at any of them.
    pub eos_ids: Vec<u32>,
    /// `</answer>`'s id when it is one token, else `NO_TOKEN` (a plain comparison with it never
    /// matches; `is_stop` also sees the tag spelled as text).
    pub answer_close: u32,
    /// `<answer>` where the vocabulary has it as one token (the no-repeat constraint applies
    /// after it; `AnswerStart` also finds it spelled as text).
    pub answer_open: Option<u32>,
    pub answer_open_tag: Tag,
    pub answer_close_tag: Tag,
}

impl TextTokenizer {
    /// Loads a tokenizer that uses our own special token names.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        Self::load_with(path, &SpecialTokens::default())
    }

    /// Loads a package's tokenizer whose end and padding tokens are `specials`.
    pub fn load_with(path: &Path, specials: &SpecialTokens) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), message: e.to_string() })?;
        Self::from_tokenizer(inner, &path.display().to_string(), specials)
    }

    /// Wraps a tokenizer; `name` (its file) is what errors report. The end and padding tokens
    /// must be in the vocabulary; the tags need not be.
    pub fn from_tokenizer(inner: Tokenizer, name: &str, specials: &SpecialTokens) -> Result<Self, TokenizerError> {
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| TokenizerError::MissingSpecial(name.into(), t.into()));
        let eos_ids = specials.eos.iter().map(|t| id(t)).collect::<Result<Vec<_>, _>>()?;
        let Some(&eos) = eos_ids.first() else {
            return Err(TokenizerError::Other(format!("{name}: no end-of-sequence token named")));
        };
        let pad = id(&specials.pad)?;
        // Only an added token is a tag by id: a merged vocabulary entry that happens to spell
        // the tag is one of several ways the model can write it, so it is matched as text.
        let added = inner.get_added_tokens_decoder();
        let tag = |text: &'static str| {
            added.iter().find(|(_, t)| t.content == text).map_or(Tag::Text(text), |(&id, _)| Tag::Token(id))
        };
        let (answer_open_tag, answer_close_tag) = (tag(ANSWER_OPEN), tag(ANSWER_CLOSE));
        let answer_open = match answer_open_tag {
            Tag::Token(id) => Some(id),
            Tag::Text(_) => None,
        };
        let answer_close = match answer_close_tag {
            Tag::Token(id) => id,
            Tag::Text(_) => NO_TOKEN,
        };
        Ok(Self { inner, pad, eos, eos_ids, answer_close, answer_open, answer_open_tag, answer_close_tag })
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

    /// Decode keeping every token (tags that are special tokens included).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// The text of generated ids as the format check reads it: the tags kept, the end and
    /// padding tokens left out (their names are the package's, unknown to `parse_output`).
    pub fn decode_output(&self, ids: &[u32]) -> String {
        let kept: Vec<u32> = ids.iter().copied().filter(|&t| t != self.pad && !self.eos_ids.contains(&t)).collect();
        self.decode(&kept)
    }

    /// Whether the newest token of `generated` completes `tag`. A text tag is looked for in the
    /// decoded tail only: the model may spell it with any tokens (`</`, `ans`, `wer>`…), each
    /// at least one byte, so tag length + 2 tokens always cover it (the 2 for the newest token
    /// and a decoder that drops a leading space).
    pub fn completes(&self, generated: &[u32], tag: Tag) -> bool {
        match tag {
            Tag::Token(id) => generated.last() == Some(&id),
            Tag::Text(text) => {
                let Some(last) = generated.len().checked_sub(1) else { return false };
                let from = generated.len().saturating_sub(text.len() + 2);
                let tail = self.decode(&generated[from..]);
                if !tail.contains(text) {
                    return false;
                }
                // New only if the tail without the newest token has fewer occurrences.
                tail.matches(text).count() > self.decode(&generated[from..last]).matches(text).count()
            }
        }
    }

    /// Whether a row whose generated tokens are `generated` is finished: its newest token is an
    /// end token, or it completes `</answer>`.
    pub fn is_stop(&self, generated: &[u32]) -> bool {
        generated.last().is_some_and(|t| self.eos_ids.contains(t)) || self.completes(generated, self.answer_close_tag)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner.save(path, false).map_err(|e| TokenizerError::Other(e.to_string()))
    }

    /// Train byte-level BPE on `texts`, with our special tokens (`SPECIAL_TOKENS`).
    pub fn train(texts: impl Iterator<Item = String> + Send, vocab_size: usize) -> Result<Self, TokenizerError> {
        let tok = train_bpe(texts, vocab_size, &SPECIAL_TOKENS)?;
        Self::from_tokenizer(tok, "trained", &SpecialTokens::default())
    }
}

/// Where a row's answer begins, followed token by token as the row grows (the no-repeat
/// constraint applies after the last `<answer>`). Tracking it step by step costs one look at the
/// newest tokens, where finding a text tag again in the whole row each step would decode it all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnswerStart(Option<usize>);

impl AnswerStart {
    /// Call after each token is appended to `generated`.
    pub fn push(&mut self, tok: &TextTokenizer, generated: &[u32]) {
        if tok.completes(generated, tok.answer_open_tag) {
            self.0 = Some(generated.len());
        }
    }

    /// The tokens after the last `<answer>` (empty before one).
    pub fn answer<'a>(&self, generated: &'a [u32]) -> &'a [u32] {
        self.0.map_or(&[], |i| &generated[i.min(generated.len())..])
    }
}

/// Byte-level BPE trained on `texts` whose added special tokens are `specials` (ids from 0).
fn train_bpe(
    texts: impl Iterator<Item = String> + Send,
    vocab_size: usize,
    specials: &[&str],
) -> Result<Tokenizer, TokenizerError> {
    let specials = specials.iter().map(|t| AddedToken::from(*t, true)).collect();
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
    Ok(tok)
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
        assert_eq!((tok.answer_open_tag, tok.answer_close_tag), (Tag::Token(4), Tag::Token(5)));
        assert!(tok.is_stop(&ids) && !tok.is_stop(&ids[..ids.len() - 1]));
        assert_eq!(tok.decode(&ids).replace(' ', ""), "why<think>a</think><answer>bc</answer>");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let again = TextTokenizer::load(&path).unwrap();
        assert_eq!(again.encode("The user likes tea."), tok.encode("The user likes tea."));
        assert!(TextTokenizer::load(&dir.path().join("missing.json")).is_err());
    }

    /// A ChatML tokenizer: only `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are special; the
    /// tags are ordinary text.
    fn chatml() -> TextTokenizer {
        let corpus =
            (0..200).map(|i| format!("<|im_start|>user likes tea {i}<|im_end|> so</think><answer>tea</answer>"));
        let bpe = train_bpe(corpus, 400, &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).unwrap();
        let specials =
            SpecialTokens { eos: vec!["<|im_end|>".into(), "<|endoftext|>".into()], pad: "<|im_end|>".into() };
        TextTokenizer::from_tokenizer(bpe, "chatml", &specials).unwrap()
    }

    #[test]
    fn tags_spelled_as_text_are_found_in_the_tail() {
        let tok = chatml();
        assert_eq!((tok.eos, tok.pad, tok.eos_ids.clone()), (2, 2, vec![2, 0]));
        assert_eq!((tok.answer_open_tag, tok.answer_close_tag), (Tag::Text("<answer>"), Tag::Text("</answer>")));
        assert_eq!((tok.answer_open, tok.answer_close), (None, NO_TOKEN));
        let ids = tok.encode("long reasoning here</think><answer>tea tea</answer>");
        let close = ids.len();
        // Stops exactly where `</answer>` is complete, however many tokens spell it.
        for n in 1..=close {
            assert_eq!(tok.is_stop(&ids[..n]), n == close, "{n}: {:?}", tok.decode(&ids[..n]));
        }
        // The same tag written one character per token.
        let mut spelled = tok.encode("x");
        for c in "</answer>".chars() {
            assert!(!tok.is_stop(&spelled));
            spelled.push(tok.inner.token_to_id(&c.to_string()).unwrap()); // (encode would add a space)
        }
        assert!(tok.is_stop(&spelled), "{:?} {spelled:?}", tok.decode(&spelled));
        assert!(tok.is_stop(&[5, 6, 2]) && tok.is_stop(&[5, 0]) && !tok.is_stop(&[]));
        // The answer starts after the token that completes `<answer>`.
        let mut start = AnswerStart::default();
        for n in 1..=ids.len() {
            start.push(&tok, &ids[..n]);
            let answer = tok.decode(start.answer(&ids[..n]));
            assert!(!answer.contains("<answer>") && !answer.contains("think"), "{answer}");
        }
        assert_eq!(tok.decode(start.answer(&ids)).trim(), "tea tea</answer>");
        assert_eq!(AnswerStart::default().answer(&ids), &[] as &[u32]);
        // End and padding tokens are left out of the output text.
        let mut out = ids.clone();
        out.push(tok.eos);
        assert_eq!(tok.decode_output(&out), tok.decode(&ids));
        assert!(tok.decode(&out).ends_with("<|im_end|>"));
    }

    #[test]
    fn a_missing_end_token_is_named() {
        let bpe = train_bpe((0..50).map(|i| format!("tea {i}")), 300, &["<|im_end|>"]).unwrap();
        let specials = SpecialTokens { eos: vec!["<|eot_id|>".into()], pad: "<|im_end|>".into() };
        let e = TextTokenizer::from_tokenizer(bpe.clone(), "pkg/tokenizer.json", &specials).err().unwrap();
        assert!(
            matches!(&e, TokenizerError::MissingSpecial(f, t) if f == "pkg/tokenizer.json" && t == "<|eot_id|>"),
            "{e}"
        );
        let e = TextTokenizer::from_tokenizer(bpe, "t", &SpecialTokens::default()).err().unwrap();
        assert!(e.to_string().contains("<eos>"), "{e}");
    }
}
