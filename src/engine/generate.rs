//! Batched generation on a `DecoderSession`: left padding + attention mask, positions from the
//! mask, per-row stop at `</answer>` (one token or text) or any end token, and the cache handed
//! from step to step.

use std::time::Instant;

use rand::{rngs::StdRng, SeedableRng};

use super::session::{Cache, DecoderSession, StepInput};
use super::Result;
use crate::padding::{pad_left, positions};
use crate::sampling::{allowed_in, sample, SamplingParams};
use crate::tokenizer::{AnswerStart, TextTokenizer};

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Completed `</answer>` or produced an end token (`TextTokenizer::is_stop`).
    StopToken,
    MaxTokens,
    /// The prompt leaves no room under the model's position limit.
    ContextFull,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Generated ids (no prompt), ending with the stop token if one was produced.
    pub tokens: Vec<u32>,
    /// The tokens' text without end and padding tokens (`TextTokenizer::decode_output`), as
    /// `parse_output` reads it.
    pub text: String,
    pub stop: Stop,
}

/// Counters a bench reports; accumulated until `take_stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenStats {
    pub steps: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Host copies made by our code (building inputs, reading logits); the cache is never copied
    /// when `use_cache` is on.
    pub bytes_copied: usize,
    pub model_ms: f64,
}

/// How one row picks its next token.
pub struct RowSampler {
    pub params: SamplingParams,
    pub rng: StdRng,
}

pub struct Generator {
    session: DecoderSession,
    tokenizer: TextTokenizer,
    pub max_new_tokens: usize,
    pub max_positions: Option<usize>,
    /// Never repeat an n-gram of this many tokens within the answer (0: off).
    pub no_repeat_ngram: usize,
    /// Off: re-feed the whole sequence every step without a cache (reference path for benches).
    pub use_cache: bool,
    /// On: never stop early at `</answer>` / an end token; every row gets `max_new_tokens` (benches
    /// that need a fixed number of tokens from an untrained model).
    pub ignore_stop: bool,
    stats: GenStats,
}

impl Generator {
    pub fn new(
        session: DecoderSession,
        tokenizer: TextTokenizer,
        max_new_tokens: usize,
        max_positions: Option<usize>,
    ) -> Self {
        Self {
            session,
            tokenizer,
            max_new_tokens,
            max_positions,
            no_repeat_ngram: 0,
            use_cache: true,
            ignore_stop: false,
            stats: GenStats::default(),
        }
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn session(&self) -> &DecoderSession {
        &self.session
    }

    pub fn take_stats(&mut self) -> GenStats {
        std::mem::take(&mut self.stats)
    }

    /// Generates for each prompt. One RNG seeded with `seed` is shared by the rows in order
    /// (as `train::generate` does), so greedy and seeded sampling match the candle policy.
    pub fn generate(&mut self, prompts: &[String], params: &SamplingParams, seed: u64) -> Result<Vec<Output>> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        let mut rng = StdRng::seed_from_u64(seed);
        self.generate_ids(&ids, |_, logits| sample(logits, params, &mut rng))
    }

    /// Generates with an own sampler per row, so a row's output does not depend on which other
    /// requests share its batch (the batcher's case).
    pub fn generate_rows(&mut self, prompts: &[String], samplers: &mut [RowSampler]) -> Result<Vec<Output>> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        self.generate_ids(&ids, |row, logits| {
            let s = &mut samplers[row];
            sample(logits, &s.params, &mut s.rng)
        })
    }

    /// The loop on token ids. `pick(row, logits)` is called only for unfinished rows, in order.
    pub fn generate_ids(
        &mut self,
        prompts: &[Vec<u32>],
        mut pick: impl FnMut(usize, &[f32]) -> u32,
    ) -> Result<Vec<Output>> {
        let ragged = prompts.iter().any(|p| p.len() != prompts[0].len());
        if self.session.spec().has_position_ids || !ragged {
            return self.generate_batch(prompts, pick);
        }
        // Graphs without position_ids (genai's GroupQueryAttention) take the valid tokens to come
        // first, so left padding breaks them: rows of equal length run together instead.
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (row, p) in prompts.iter().enumerate() {
            groups.entry(p.len()).or_default().push(row);
        }
        let mut out: Vec<Option<Output>> = (0..prompts.len()).map(|_| None).collect();
        for rows in groups.values() {
            let sub: Vec<Vec<u32>> = rows.iter().map(|&r| prompts[r].clone()).collect();
            let res = self.generate_batch(&sub, |i, logits| pick(rows[i], logits))?;
            for (i, o) in res.into_iter().enumerate() {
                out[rows[i]] = Some(o);
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every row belongs to one group")).collect())
    }

    fn generate_batch(
        &mut self,
        prompts: &[Vec<u32>],
        mut pick: impl FnMut(usize, &[f32]) -> u32,
    ) -> Result<Vec<Output>> {
        let n = prompts.len();
        let pad = self.tokenizer.pad;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut out: Vec<Output> =
            (0..n).map(|_| Output { tokens: vec![], text: String::new(), stop: Stop::MaxTokens }).collect();
        // Learned positions end at max_positions: leave what fits (candle's rule).
        let room = self.max_positions.map_or(usize::MAX, |m| m.saturating_sub(width));
        let max_new = self.max_new_tokens.min(room);
        if n == 0 || width == 0 || max_new == 0 {
            let stop = if room == 0 { Stop::ContextFull } else { Stop::MaxTokens };
            out.iter_mut().for_each(|o| o.stop = stop);
            return Ok(out);
        }
        // Left padding: every row's last token sits in the last column.
        let padded = pad_left(prompts, pad);
        let mut seqs: Vec<Vec<i64>> = padded.id_rows().map(|r| r.iter().map(|&t| i64::from(t)).collect()).collect();
        let mut mask: Vec<Vec<u32>> = padded.mask_rows().map(<[u32]>::to_vec).collect();
        self.stats.prompt_tokens += prompts.iter().map(Vec::len).sum::<usize>();

        let share = self.use_cache && self.session.spec().share_buffer;
        let mut shared = if share { self.session.shared_cache(n, width + max_new)? } else { vec![] };
        let mut past = if share { vec![] } else { self.session.empty_cache(n)? };
        let mut fed = 0; // columns already in the cache
        let mut done = vec![false; n];
        let mut scratch = Vec::new(); // for the no-repeat constraint
        let mut answers = vec![AnswerStart::default(); n];
        for step in 0..max_new {
            let from = if self.use_cache { fed } else { 0 };
            let ids: Vec<i64> = seqs.iter().flat_map(|r| r[from..].iter().copied()).collect();
            let flat_mask: Vec<i64> = mask.iter().flatten().map(|&m| i64::from(m)).collect();
            let positions: Vec<i64> = mask.iter().flat_map(|r| positions(r, from).map(i64::from)).collect();
            if !self.use_cache {
                past = self.session.empty_cache(n)?;
            }
            let t0 = Instant::now();
            let input = StepInput { batch: n, ids: &ids, mask: &flat_mask, positions: &positions };
            let cache = if share { Cache::Shared(&mut shared) } else { Cache::Grow(&past) };
            let res = self.session.step(&input, cache, self.use_cache && step > 0)?;
            self.stats.model_ms += t0.elapsed().as_secs_f64() * 1e3;
            self.stats.steps += 1;
            self.stats.bytes_copied += res.bytes_copied;
            if self.use_cache {
                if !share {
                    past = res.presents; // moved, never copied
                }
                fed = seqs[0].len();
            }
            for i in 0..n {
                let t = if done[i] {
                    pad // finished rows keep stepping; their tokens are ignored
                } else {
                    let row = &res.logits[i * res.vocab..(i + 1) * res.vocab];
                    let answer = answers[i].answer(&out[i].tokens);
                    let t = pick(i, allowed_in(row, answer, self.no_repeat_ngram, &mut scratch));
                    out[i].tokens.push(t);
                    if self.no_repeat_ngram > 0 {
                        answers[i].push(&self.tokenizer, &out[i].tokens);
                    }
                    if !self.ignore_stop && self.tokenizer.is_stop(&out[i].tokens) {
                        done[i] = true;
                        out[i].stop = Stop::StopToken;
                    }
                    t
                };
                seqs[i].push(i64::from(t));
                mask[i].push(1);
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        for o in out.iter_mut() {
            self.stats.generated_tokens += o.tokens.len();
            o.text = self.tokenizer.decode_output(&o.tokens);
        }
        Ok(out)
    }
}
