//! The versioned prompt templates (shared by training, evaluation and serving) and the parser +
//! format check for model output.

use crate::event::EventBody;

/// The id of `Template::Plain`, the template the shipped package and the training code use.
pub const TEMPLATE_ID: &str = "alignx-stream-v1";
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
pub const ANSWER_OPEN: &str = "<answer>";
pub const ANSWER_CLOSE: &str = "</answer>";
/// Our own tokenizer's end and padding tokens; other packages name theirs in the manifest.
pub const EOS: &str = "<eos>";
pub const PAD: &str = "<pad>";
pub const NOT_PROVIDED: &str = "Not provided";
/// Longest description accepted; longer output is treated as degenerate.
pub const MAX_DESCRIPTION_CHARS: usize = 4096;

/// The prompt templates a package may name (`manifest.json` `template`). A model is trained for
/// exactly one, so each is versioned: changing a template's text means a new id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Template {
    /// `alignx-stream-v1`: plain text ending in `Assistant: <think>` (the shipped tiny model was
    /// trained on it byte for byte).
    Plain,
    /// `alignx-stream-chatml-v1`: the same body as a ChatML system + user turn, for instruction
    /// tuned bases (SmolLM2, Qwen) whose tokenizers mark turns with `<|im_start|>`/`<|im_end|>`.
    ChatMl,
}

/// The system turn of `Template::ChatMl`.
const CHATML_SYSTEM: &str = "You infer a user's preferences from their past preferences and new signals. \
Answer as <think>reasoning</think><answer>description</answer>.";

/// An unknown `template` id in a package.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prompt template `{0}` (known: {known})", known = Template::known_ids())]
pub struct UnknownTemplate(pub String);

impl Template {
    pub const ALL: [Template; 2] = [Template::Plain, Template::ChatMl];

    pub fn from_id(id: &str) -> Result<Self, UnknownTemplate> {
        Self::ALL.into_iter().find(|t| t.id() == id).ok_or_else(|| UnknownTemplate(id.to_string()))
    }

    pub fn id(self) -> &'static str {
        match self {
            Template::Plain => TEMPLATE_ID,
            Template::ChatMl => "alignx-stream-chatml-v1",
        }
    }

    /// The known ids, comma-separated (for error messages).
    pub fn known_ids() -> String {
        Self::ALL.map(Template::id).join(", ")
    }

    /// The policy prompt. As in the AlignXplore reference code it ends by opening the reasoning
    /// tag, so the model continues with its reasoning. `previous` is the last description
    /// (streaming) or `None` (base setting).
    pub fn build_prompt<'a>(self, previous: Option<&str>, signals: impl IntoIterator<Item = &'a EventBody>) -> String {
        let body = prompt_body(previous, signals);
        match self {
            Template::Plain => format!("{body}\nAssistant: {THINK_OPEN}"),
            Template::ChatMl => format!(
                "<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n\
                 <|im_start|>assistant\n{THINK_OPEN}"
            ),
        }
    }

    /// The training target for a prompt from `build_prompt`: what the model must continue with.
    /// `Plain` is `build_response` (no end marker: training appends the eos id after encoding);
    /// `ChatMl` closes the assistant turn with `eos` (`<|im_end|>`), as its chat format does.
    pub fn build_response(self, reasoning: &str, description: &str, eos: &str) -> String {
        match self {
            Template::Plain => build_response(reasoning, description),
            Template::ChatMl => format!("{}{eos}", build_response(reasoning, description)),
        }
    }
}

/// Instruction, past preferences and numbered signals: what every template carries. No
/// trailing newline (each template adds its own turn ending).
fn prompt_body<'a>(previous: Option<&str>, signals: impl IntoIterator<Item = &'a EventBody>) -> String {
    let prev = previous.map(str::trim).filter(|p| !p.is_empty()).unwrap_or(NOT_PROVIDED);
    let mut s = String::with_capacity(512);
    s.push_str("Infer the user's preferences from their past preferences and new signals.\n");
    s.push_str("Past preferences: ");
    s.push_str(prev);
    s.push_str("\nSignals:\n");
    let mut n = 0;
    for body in signals {
        match body {
            EventBody::Comparison { post, chosen, rejected } => {
                n += 1;
                s.push_str(&format!("{n}. *Post:* {post} *Chosen:* {chosen} *Rejected:* {rejected}\n"));
            }
            EventBody::Ugc { text } => {
                n += 1;
                s.push_str(&format!("{n}. *User wrote:* {text}\n"));
            }
            EventBody::Forget => {}
        }
    }
    s.push_str("Reason about the signals, then state the preferences.");
    s
}

/// `Template::Plain.build_prompt` (kept for the training code, which serves that template).
pub fn build_prompt<'a>(previous: Option<&str>, signals: impl IntoIterator<Item = &'a EventBody>) -> String {
    Template::Plain.build_prompt(previous, signals)
}

/// The training target for a prompt from `build_prompt` (`Template::Plain`): what the model must
/// continue with.
pub fn build_response(reasoning: &str, description: &str) -> String {
    format!("{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{description}{ANSWER_CLOSE}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no </think>")]
    MissingThinkClose,
    #[error("no <answer> after </think>")]
    MissingAnswer,
    #[error("<answer> is never closed (truncated output?)")]
    UnclosedAnswer,
    #[error("a tag appears where it must not (nested or repeated)")]
    MisplacedTag,
    #[error("text after </answer>")]
    TrailingText,
    #[error("empty answer")]
    EmptyAnswer,
    #[error("answer longer than {MAX_DESCRIPTION_CHARS} characters")]
    AnswerTooLong,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedOutput {
    pub reasoning: String,
    /// The description, only when the whole output passed the format check.
    pub description: Option<String>,
    pub error: Option<FormatError>,
}

impl ParsedOutput {
    pub fn format_ok(&self) -> bool {
        self.error.is_none()
    }
}

const TAGS: [&str; 4] = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE];

fn has_tag(s: &str) -> bool {
    TAGS.iter().any(|t| s.contains(t))
}

/// Parse what the model generated after the prompt (which already opened `<think>`; a leading
/// `<think>` is tolerated for models prompted without it). Strict: exactly
/// `reasoning</think><answer>description</answer>`. `generated` must not hold the package's end
/// or padding tokens (`TextTokenizer::decode_output` leaves them out): their names differ per
/// tokenizer, so they are not known here.
pub fn parse_output(generated: &str) -> ParsedOutput {
    let body = generated.trim_start().strip_prefix(THINK_OPEN).unwrap_or(generated);
    let fail = |reasoning: &str, e| ParsedOutput {
        reasoning: reasoning.trim().to_string(),
        description: None,
        error: Some(e),
    };
    let Some((reasoning, rest)) = body.split_once(THINK_CLOSE) else {
        return fail(body, FormatError::MissingThinkClose);
    };
    if has_tag(reasoning) {
        return fail(reasoning, FormatError::MisplacedTag);
    }
    let Some(rest) = rest.trim_start().strip_prefix(ANSWER_OPEN) else {
        let e = match rest.split_once(ANSWER_OPEN) {
            Some((between, _)) if has_tag(between) => FormatError::MisplacedTag,
            Some(_) => FormatError::TrailingText,
            None => FormatError::MissingAnswer,
        };
        return fail(reasoning, e);
    };
    let Some((answer, tail)) = rest.split_once(ANSWER_CLOSE) else {
        return fail(reasoning, if has_tag(rest) { FormatError::MisplacedTag } else { FormatError::UnclosedAnswer });
    };
    if has_tag(answer) {
        return fail(reasoning, FormatError::MisplacedTag);
    }
    if !tail.trim().is_empty() {
        return fail(reasoning, FormatError::TrailingText);
    }
    let answer = answer.trim();
    if answer.is_empty() {
        return fail(reasoning, FormatError::EmptyAnswer);
    }
    if answer.chars().count() > MAX_DESCRIPTION_CHARS {
        return fail(reasoning, FormatError::AnswerTooLong);
    }
    ParsedOutput { reasoning: reasoning.trim().to_string(), description: Some(answer.to_string()), error: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_numbers_signals_and_opens_think() {
        let a = EventBody::Comparison { post: "P".into(), chosen: "C".into(), rejected: "R".into() };
        let b = EventBody::Ugc { text: "T".into() };
        let p = build_prompt(None, [&a, &b]);
        assert!(p.contains("Past preferences: Not provided\n"));
        assert!(p.contains("1. *Post:* P *Chosen:* C *Rejected:* R\n2. *User wrote:* T\n"));
        assert!(p.ends_with("Assistant: <think>"));
        let p = build_prompt(Some("likes tea"), [&a]);
        assert!(p.contains("Past preferences: likes tea\n"));
        assert_eq!(build_prompt(Some("  "), [&a]), build_prompt(None, [&a]));
    }

    /// `Template::Plain` is the text the shipped model was trained on, byte for byte.
    #[test]
    fn plain_template_is_unchanged() {
        let a = EventBody::Comparison { post: "P".into(), chosen: "C".into(), rejected: "R".into() };
        let b = EventBody::Ugc { text: "T".into() };
        let want = "Infer the user's preferences from their past preferences and new signals.\n\
                    Past preferences: likes tea\nSignals:\n\
                    1. *Post:* P *Chosen:* C *Rejected:* R\n2. *User wrote:* T\n\
                    Reason about the signals, then state the preferences.\nAssistant: <think>";
        assert_eq!(Template::Plain.build_prompt(Some("likes tea"), [&a, &b]), want);
        assert_eq!(build_prompt(Some("likes tea"), [&a, &b]), want);
        assert_eq!(Template::Plain.build_response("r", "d", "<eos>"), "r</think><answer>d</answer>");
        assert_eq!(Template::Plain.build_response("r", "d", "<eos>"), build_response("r", "d"));
    }

    #[test]
    fn chatml_template_wraps_the_same_body() {
        let a = EventBody::Ugc { text: "T".into() };
        let p = Template::ChatMl.build_prompt(None, [&a]);
        assert!(p.starts_with("<|im_start|>system\n"), "{p}");
        assert!(p.ends_with("<|im_end|>\n<|im_start|>assistant\n<think>"), "{p}");
        let user = "<|im_start|>user\nInfer the user's preferences from their past preferences and new signals.\n\
                    Past preferences: Not provided\nSignals:\n1. *User wrote:* T\n\
                    Reason about the signals, then state the preferences.<|im_end|>\n";
        assert!(p.contains(user), "{p}");
        assert_eq!(p.matches("<|im_start|>").count(), 3);
        let r = Template::ChatMl.build_response("r", "d", "<|im_end|>");
        assert_eq!(r, "r</think><answer>d</answer><|im_end|>");
        // The prompt opened <think>; the response without its end-of-turn marker parses.
        assert!(parse_output(r.strip_suffix("<|im_end|>").unwrap()).format_ok());
    }

    #[test]
    fn template_ids_round_trip_and_unknown_ones_name_the_known() {
        for t in Template::ALL {
            assert_eq!(Template::from_id(t.id()), Ok(t));
        }
        assert_eq!(Template::Plain.id(), TEMPLATE_ID);
        assert_eq!(Template::ChatMl.id(), "alignx-stream-chatml-v1");
        let e = Template::from_id("alignx-stream-v0").unwrap_err().to_string();
        assert!(e.contains("alignx-stream-v0") && e.contains("alignx-stream-v1") && e.contains("chatml"), "{e}");
    }

    #[test]
    fn well_formed_output_parses() {
        let out = parse_output(&build_response("because", " The user likes tea. "));
        assert_eq!(out.description.as_deref(), Some("The user likes tea."));
        assert_eq!(out.reasoning, "because");
        assert!(out.format_ok());
        assert!(parse_output("<think>r</think>\n<answer>d</answer>\n").format_ok());
    }

    #[test]
    fn adversarial_outputs_fail_the_check() {
        let cases = [
            ("reasoning only", FormatError::MissingThinkClose),
            ("r</think>no answer tag", FormatError::MissingAnswer),
            ("r</think><answer>cut off mid", FormatError::UnclosedAnswer),
            ("r<think>x</think><answer>d</answer>", FormatError::MisplacedTag),
            ("r</think><answer>a<answer>b</answer></answer>", FormatError::MisplacedTag),
            ("r</think><answer>d</answer> and more", FormatError::TrailingText),
            ("r</think><answer>d</answer><answer>e</answer>", FormatError::TrailingText),
            ("r</think><answer>  </answer>", FormatError::EmptyAnswer),
            ("r</think>text<answer>d</answer>", FormatError::TrailingText),
            ("r</think></think><answer>d</answer>", FormatError::MisplacedTag),
        ];
        for (text, want) in cases {
            let out = parse_output(text);
            assert_eq!(out.error, Some(want), "{text}");
            assert!(out.description.is_none());
        }
        let huge = format!("r</think><answer>{}</answer>", "x".repeat(100_000));
        assert_eq!(parse_output(&huge).error, Some(FormatError::AnswerTooLong));
    }
}
