//! Batched generation with the candle policy and its KV cache (training-side sampling for
//! evaluation and GRPO; serving uses the ONNX engine).

use crate::sampling::{allowed_in, log_prob, sample, SamplingParams};
use crate::tokenizer::{AnswerStart, TextTokenizer};
use crate::train::batch::pad_left;
use crate::train::model::{positions_from_mask, Decoder, KvPair};
use candle_core::{Device, Result, Tensor};
use rand::Rng;

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, without the prompt; ends with the stop token if one was produced.
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token under the sampling policy's raw logits.
    pub logprobs: Vec<f32>,
    pub text: String,
}

/// Generate for each prompt (already tokenized) until `</answer>` (a token or spelled as text),
/// an end token or `max_new` tokens, never repeating an n-gram of `no_repeat` tokens within the
/// answer (0: off) — the stops and constraint of the engine, for any tokenizer.
pub fn generate(
    model: &dyn Decoder,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    max_new: usize,
    params: &SamplingParams,
    no_repeat: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Generation>> {
    let dev = Device::Cpu;
    let n = prompts.len();
    let batch = pad_left(prompts, tok.pad);
    let mut mask_rows: Vec<Vec<u32>> = batch.mask.chunks(batch.len).map(<[u32]>::to_vec).collect();
    let pos = positions_from_mask(&mask_rows, 0);
    let mut out: Vec<Generation> =
        (0..n).map(|_| Generation { tokens: vec![], logprobs: vec![], text: String::new() }).collect();
    if batch.len >= model.max_positions() {
        return Ok(out);
    }
    let (ids, mask) = batch.tensors(&dev)?;
    let pos_t = Tensor::new(pos, &dev)?;
    // Only the last position's logits are sampled from.
    // Detached at once, so the prefill's autograd graph (every layer's activations, when the
    // model has trainable adapters) is freed before decoding starts.
    let (mut past, mut logits) = {
        let (h, past) = model.hidden(&ids, &mask, &pos_t, None)?;
        (detached(past), model.logits(&h.narrow(1, batch.len - 1, 1)?)?.detach())
    };
    let mut next_pos: Vec<u32> = mask_rows.iter().map(|r| r.iter().sum()).collect();
    let mut done = vec![false; n];
    let mut answers = vec![AnswerStart::default(); n];
    // Learned positions end at max_positions: a longer sequence cannot be continued.
    let max_new = max_new.min(model.max_positions().saturating_sub(batch.len));
    if max_new == 0 {
        return Ok(out);
    }
    for _ in 0..max_new {
        let rows: Vec<Vec<f32>> = logits.squeeze(1)?.to_vec2()?; // one position per row
        let mut step = Vec::with_capacity(n);
        let mut scratch = Vec::new(); // for the no-repeat constraint
        for (i, row) in rows.iter().enumerate() {
            let t = if done[i] {
                tok.pad
            } else {
                sample(allowed_in(row, answers[i].answer(&out[i].tokens), no_repeat, &mut scratch), params, rng)
            };
            if !done[i] {
                out[i].tokens.push(t);
                // Under the raw logits, as `response_logprobs` recomputes them for GRPO.
                out[i].logprobs.push(log_prob(row, t));
                if no_repeat > 0 {
                    answers[i].push(tok, &out[i].tokens);
                }
                done[i] = tok.is_stop(&out[i].tokens);
            }
            step.push(t);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for r in mask_rows.iter_mut() {
            r.push(1);
        }
        let flat: Vec<u32> = mask_rows.iter().flatten().copied().collect();
        let mask = Tensor::from_vec(flat, (n, mask_rows[0].len()), &dev)?;
        let ids = Tensor::from_vec(step, (n, 1), &dev)?;
        let pos_t = Tensor::from_vec(next_pos.clone(), (n, 1), &dev)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
        let (l, p) = model.forward(&ids, &mask, &pos_t, Some(&past))?;
        logits = l.detach();
        past = detached(p);
    }
    for g in out.iter_mut() {
        g.text = tok.decode_output(&g.tokens);
    }
    Ok(out)
}

/// The cache without its autograd history. The weights are variables, so every cache tensor
/// otherwise keeps the whole graph of all earlier steps alive (≈ 15 GB for 32 rows × 256 new
/// tokens on 500-token prompts, which the OOM killer ended). Sampling needs no gradient.
fn detached(past: Vec<KvPair>) -> Vec<KvPair> {
    past.into_iter().map(|(k, v)| (k.detach(), v.detach())).collect()
}

/// Sum of log-probabilities of `response` after `prompt` under `model`, per token, with the
/// graph kept for backprop (GRPO). Rows are right-padded; returns `[b, max_resp]` log-probs and
/// the 0/1 response mask.
pub fn response_logprobs(model: &dyn Decoder, seqs: &[(Vec<u32>, Vec<u32>)], pad: u32) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let full: Vec<Vec<u32>> = seqs.iter().map(|(p, r)| p.iter().chain(r).copied().collect()).collect();
    let batch = crate::train::batch::pad_right(&full, pad);
    let (ids, mask) = batch.tensors(&dev)?;
    let pos = Tensor::arange(0u32, batch.len as u32, &dev)?
        .unsqueeze(0)?
        .broadcast_as((batch.rows, batch.len))?
        .contiguous()?;
    let (h, _) = model.hidden(&ids, &mask, &pos, None)?;
    let max_r = seqs.iter().map(|s| s.1.len()).max().unwrap_or(1).max(1);
    let mut idx = Vec::new();
    let mut tgt = Vec::new();
    let mut rmask = Vec::new();
    for (b, (p, r)) in seqs.iter().enumerate() {
        for j in 0..max_r {
            let (src, t, m) = if j < r.len() { (p.len() + j - 1, r[j], 1f32) } else { (0, pad, 0f32) };
            idx.push((b * batch.len + src) as u32);
            tgt.push(t);
            rmask.push(m);
        }
    }
    let picked = model.target_logprobs(&h, idx, tgt)?;
    Ok((picked.reshape((seqs.len(), max_r))?, Tensor::from_vec(rmask, (seqs.len(), max_r), &dev)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::{Gpt, GptConfig};
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use rand::{rngs::StdRng, SeedableRng};

    /// GRPO's ratio is exp(new − old): the log-probabilities recorded while sampling (left-padded
    /// batch, KV cache) must equal the ones recomputed for the update (right-padded, one pass),
    /// or the clip would act on a mismatch instead of on the policy's change.
    /// Sample from `model`, recompute, compare (left- vs right-padded, cache vs one pass).
    fn check_logprobs(model: &dyn Decoder, tok: &TextTokenizer, what: &str) {
        // prompts of different lengths, so the sampling batch is left-padded
        let prompts = vec![tok.encode("the user chose"), tok.encode("short replies and science topics the user")];
        let params = SamplingParams::PAPER;
        let outs = generate(model, tok, &prompts, 12, &params, 2, &mut StdRng::seed_from_u64(3)).unwrap();
        let seqs: Vec<_> = prompts.iter().zip(&outs).map(|(p, o)| (p.clone(), o.tokens.clone())).collect();
        let (lp, mask) = response_logprobs(model, &seqs, tok.pad).unwrap();
        let (lp, mask) = (lp.to_vec2::<f32>().unwrap(), mask.to_vec2::<f32>().unwrap());
        for (i, o) in outs.iter().enumerate() {
            assert!(!o.tokens.is_empty());
            for (j, old) in o.logprobs.iter().enumerate() {
                assert_eq!(mask[i][j], 1.0);
                assert!((lp[i][j] - old).abs() < 1e-4, "{what} row {i} token {j}: {} vs {old}", lp[i][j]);
            }
        }
    }

    fn tokenizer() -> TextTokenizer {
        let text = "the user chose short replies and science topics <think> </think> <answer> </answer>";
        TextTokenizer::train(std::iter::repeat_n(text.to_string(), 50), 300).unwrap()
    }

    /// GRPO's ratio is exp(new − old): the log-probabilities recorded while sampling (left-padded
    /// batch, KV cache) must equal the ones recomputed for the update (right-padded, one pass),
    /// or the clip would act on a mismatch instead of on the policy's change.
    #[test]
    fn sampled_logprobs_match_the_recomputed_ones() {
        let tok = tokenizer();
        let dev = Device::Cpu;
        for rotary in [false, true] {
            let cfg = GptConfig {
                vocab_size: tok.vocab_size(),
                n_layer: 2,
                n_head: 2,
                d_model: 16,
                d_ff: 32,
                max_positions: 64,
                rotary,
            };
            let vm = VarMap::new();
            let model = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
            check_logprobs(&model, &tok, &format!("gpt, rotary {rotary}"));
        }
    }

    /// The same for the pretrained-base decoder (grouped-query attention, LoRA adapters).
    #[test]
    fn sampled_logprobs_match_the_recomputed_ones_on_a_llama() {
        use crate::train::base::llama::tests::{random_base, tiny_config};
        use crate::train::base::llama::{Llama, LoraConfig};
        let tok = tokenizer();
        let base = random_base(&crate::train::base::LlamaConfig { vocab_size: tok.vocab_size(), ..tiny_config() });
        let vars = VarMap::new();
        let model = Llama::new(&base, Some((&LoraConfig::all_projections(2, 1), &vars))).unwrap();
        check_logprobs(&model, &tok, "llama");
    }
}
