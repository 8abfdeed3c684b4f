//! Supervised fine-tuning (cold start): cross-entropy on completion tokens only.
//!
//! Each row is `prompt ++ completion ++ eos`, right-padded; the prompt is masked out of the loss
//! (TRL's `completion_only_loss`). The loss is the mean negative log-likelihood over all
//! completion tokens of the batch, computed with the same scoring function GRPO uses
//! (temperature 1), plus the MoE balance loss when its coefficient is positive.

use burn::prelude::*;
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::{ForwardOptions, MoeModel, RouteTotals};

use crate::TrainError;
use crate::data::{Order, encode_prompt};
use crate::score::{Layout, Scored, score};

/// A tokenized demonstration: `(prompt ids, completion ids)`.
pub type Pair = (Vec<u32>, Vec<u32>);

/// `(prompt ids, completion ids)` of the next `batch_size` demonstrations, advancing `pos`.
/// Rows longer than `max_length` lose completion tokens from the end (a prompt alone longer
/// than that keeps its last tokens and one completion token).
pub fn next_batch(
    tok: &Tokenizer,
    template: &Template,
    demos: &[Sample],
    order: &mut Order,
    pos: &mut u64,
    batch_size: usize,
    max_length: usize,
) -> Result<Vec<Pair>, TrainError> {
    let mut out = Vec::with_capacity(batch_size);
    for _ in 0..batch_size {
        let s = &demos[order.index(*pos)];
        *pos += 1;
        let mut prompt = encode_prompt(tok, template, s)?;
        let text = s.completion.as_deref().unwrap_or("");
        let mut completion = tok
            .encode(text)
            .map_err(|e| TrainError::Data(format!("tokenizer: {e}")))?;
        completion.push(tok.special().eos);
        if prompt.len() + 1 > max_length {
            prompt.drain(..prompt.len() + 1 - max_length);
        }
        completion.truncate(max_length - prompt.len());
        out.push((prompt, completion));
    }
    Ok(out)
}

/// Completion tokens of `rows`: what the SFT loss averages over.
pub fn completion_tokens(rows: &[Pair]) -> usize {
    rows.iter().map(|(_, c)| c.len()).sum()
}

/// The training forward of `rows` (a batch, or one data-parallel shard of it): completion
/// log-probabilities at temperature 1 and router statistics (with the balance loss's pieces
/// when `aux_loss`).
pub fn sft_forward(model: &MoeModel, rows: &[Pair], pad: u32, aux_loss: bool) -> Scored {
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let layout = Layout::new(&pairs, pad);
    let opts = ForwardOptions {
        aux_loss,
        ..Default::default()
    };
    score(model, &layout, 1.0, opts, false)
}

/// The SFT loss of a forward's rows as part of a batch of `batch_tokens` completion tokens
/// whose routing totals are `batch_routes`: `−Σ log p(completion tokens) / batch_tokens`
/// (+ `aux_coef ·` the rows' share of the batch's balance loss), so that the shards of a batch
/// have losses that sum to the batch's. Returns the loss and its NLL part on the host.
pub fn sft_loss(
    scored: &Scored,
    batch_tokens: usize,
    aux_coef: f64,
    batch_routes: Option<&RouteTotals>,
) -> (Tensor<1>, f64) {
    let nll = scored.logp.clone().sum().neg() / batch_tokens.max(1) as f64;
    let nll_value = nll
        .clone()
        .try_into_vec_as::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN) as f64;
    let loss = match (&scored.router.aux_parts, batch_routes) {
        (Some(parts), Some(batch)) if aux_coef > 0.0 => nll + parts.loss_in(batch) * aux_coef,
        _ => nll,
    };
    (loss, nll_value)
}
