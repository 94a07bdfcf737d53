//! The one versioned prompt template (shared by training, evaluation and serving) and the
//! parser + format check for model output.

use crate::event::EventBody;

/// Bump when the template text changes: a model is trained for exactly one template.
pub const TEMPLATE_ID: &str = "alignx-stream-v1";
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
pub const ANSWER_OPEN: &str = "<answer>";
pub const ANSWER_CLOSE: &str = "</answer>";
pub const EOS: &str = "<eos>";
pub const PAD: &str = "<pad>";
pub const NOT_PROVIDED: &str = "Not provided";
/// Longest description accepted; longer output is treated as degenerate.
pub const MAX_DESCRIPTION_CHARS: usize = 4096;

/// The policy prompt. As in the AlignXplore reference code it ends by opening the reasoning
/// tag, so the model continues with its reasoning. `previous` is the last description (streaming)
/// or `None` (base setting).
pub fn build_prompt<'a>(previous: Option<&str>, signals: impl IntoIterator<Item = &'a EventBody>) -> String {
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
    s.push_str("Reason about the signals, then state the preferences.\nAssistant: ");
    s.push_str(THINK_OPEN);
    s
}

/// The training target for a prompt from `build_prompt`: what the model must continue with.
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
/// `<think>` is tolerated for models prompted without it). End-of-sequence and padding markers
/// are ignored. Strict: exactly `reasoning</think><answer>description</answer>`.
pub fn parse_output(generated: &str) -> ParsedOutput {
    let text = generated.replace(EOS, "").replace(PAD, "");
    let body = text.trim_start().strip_prefix(THINK_OPEN).unwrap_or(&text);
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

    #[test]
    fn well_formed_output_parses() {
        let out = parse_output(&format!("{}<eos>", build_response("because", " The user likes tea. ")));
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
