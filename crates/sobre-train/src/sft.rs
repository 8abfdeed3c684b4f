//! Supervised fine-tuning (cold start): cross-entropy on completion tokens only.
//!
//! Each row is `prompt ++ completion ++ eos`, right-padded; the prompt is masked out of the loss
//! (TRL's `completion_only_loss`). The loss is the mean negative log-likelihood over all
//! completion tokens of the batch, computed with the same scoring function GRPO uses
//! (temperature 1), plus the MoE balance loss when its coefficient is positive.
//!
//! With `[tools]`, a demonstration's tool responses (the text between the response markers)
//! are tokenized on their own, as a rollout inserts them, and left out of the loss: the model
//! is taught to call the tool, not to play it (TRL trains on assistant turns only).

use burn::prelude::*;
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::{ForwardOptions, MoeModel, RouteTotals};

use crate::TrainError;
use crate::data::{Order, encode_prompt};
use crate::score::{Layout, Scored, exclude_tokens, score};

/// A tokenized demonstration: `(prompt ids, completion ids, the completion tokens in the loss)`.
pub type Pair = (Vec<u32>, Vec<u32>, Vec<bool>);

/// `text`'s ids and which of them are in the loss: with `responses = Some((open, close))`,
/// every `open … close` span is encoded on its own and out of the loss, the text between
/// spans encoded piece by piece; otherwise the whole text, all in the loss.
pub fn encode_completion(
    tok: &Tokenizer,
    text: &str,
    responses: Option<(&str, &str)>,
) -> Result<(Vec<u32>, Vec<bool>), TrainError> {
    let enc = |t: &str| {
        tok.encode(t)
            .map_err(|e| TrainError::Data(format!("tokenizer: {e}")))
    };
    let (mut ids, mut trained) = (Vec::new(), Vec::new());
    let mut push = |t: &str, in_loss: bool| -> Result<(), TrainError> {
        let piece = enc(t)?;
        trained.extend(std::iter::repeat_n(in_loss, piece.len()));
        ids.extend(piece);
        Ok(())
    };
    let Some((open, close)) = responses.filter(|(o, c)| !o.is_empty() && !c.is_empty()) else {
        push(text, true)?;
        return Ok((ids, trained));
    };
    let mut rest = text;
    while let Some(start) = rest.find(open) {
        let Some(len) = rest[start + open.len()..].find(close) else {
            break;
        };
        let end = start + open.len() + len + close.len();
        push(&rest[..start], true)?;
        push(&rest[start..end], false)?;
        rest = &rest[end..];
    }
    push(rest, true)?;
    Ok((ids, trained))
}

/// `(prompt ids, completion ids)` of the next `batch_size` demonstrations, advancing `pos`.
/// Rows longer than `max_length` lose completion tokens from the end (a prompt alone longer
/// than that keeps its last tokens and one completion token).
#[allow(clippy::too_many_arguments)]
pub fn next_batch(
    tok: &Tokenizer,
    template: &Template,
    demos: &[Sample],
    order: &mut Order,
    pos: &mut u64,
    batch_size: usize,
    max_length: usize,
    responses: Option<(&str, &str)>,
) -> Result<Vec<Pair>, TrainError> {
    let mut out = Vec::with_capacity(batch_size);
    for _ in 0..batch_size {
        let s = &demos[order.index(*pos)];
        *pos += 1;
        let mut prompt = encode_prompt(tok, template, s)?;
        let text = s.completion.as_deref().unwrap_or("");
        let (mut completion, mut trained) = encode_completion(tok, text, responses)?;
        completion.push(tok.special().eos);
        trained.push(true);
        if prompt.len() + 1 > max_length {
            prompt.drain(..prompt.len() + 1 - max_length);
        }
        completion.truncate(max_length - prompt.len());
        trained.truncate(completion.len());
        out.push((prompt, completion, trained));
    }
    Ok(out)
}

/// Completion tokens of `rows` in the loss: what the SFT loss averages over.
pub fn completion_tokens(rows: &[Pair]) -> usize {
    rows.iter()
        .map(|(_, _, t)| t.iter().filter(|&&x| x).count())
        .sum()
}

/// The training forward of `rows` (a batch, or one data-parallel shard of it): completion
/// log-probabilities at temperature 1 and router statistics (with the balance loss's pieces
/// when `aux_loss`), its layers recomputed in the backward with `recompute`
/// (`sft.gradient_checkpointing`).
pub fn sft_forward(
    model: &MoeModel,
    rows: &[Pair],
    pad: u32,
    aux_loss: bool,
    recompute: bool,
) -> Scored {
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(p, c, _)| (p.as_slice(), c.as_slice()))
        .collect();
    let mut layout = Layout::with_prefix_sharing(&pairs, pad, !recompute);
    exclude_tokens(
        &mut layout,
        rows.iter().map(|(_, _, trained)| trained.as_slice()),
    );
    let opts = ForwardOptions {
        aux_loss,
        recompute_layers: recompute,
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

#[cfg(test)]
mod tests {
    use sobre_data::tokenizer::TrainOptions;

    use super::*;

    /// A calculator demonstration: the two `<result>…</result>` spans are tokenized as the
    /// rollout inserts them (on their own) and are the only tokens out of the loss; the ids
    /// decode back to the text.
    #[test]
    fn tool_responses_in_demonstrations_are_out_of_the_loss() {
        let text = "<think>\n<calc>15 + 3</calc><result>18</result>, <calc>18 - 7</calc><result>11</result>\n</think>";
        let texts = vec![text.to_string(); 50];
        let opts = TrainOptions {
            vocab_size: 300,
            added_tokens: ["<calc>", "</calc>", "<result>", "</result>"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        };
        let tok = Tokenizer::train(texts.iter(), &opts).unwrap();
        let (ids, trained) =
            encode_completion(&tok, text, Some(("<result>", "</result>"))).unwrap();
        assert_eq!(ids.len(), trained.len());
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        let out: Vec<u32> = ids
            .iter()
            .zip(&trained)
            .filter(|(_, t)| !**t)
            .map(|(i, _)| *i)
            .collect();
        let mut want = tok.encode("<result>18</result>").unwrap();
        want.extend(tok.encode("<result>11</result>").unwrap());
        assert_eq!(out, want);
        // Without tools every token is in the loss.
        let (plain, all) = encode_completion(&tok, text, None).unwrap();
        assert!(all.iter().all(|&t| t));
        assert_eq!(tok.decode(&plain, true).unwrap(), text);
        // An unclosed response marker is ordinary text.
        let (_, open) =
            encode_completion(&tok, "a <result>18", Some(("<result>", "</result>"))).unwrap();
        assert!(open.iter().all(|&t| t));
    }
}
