//! Per-token log-probabilities (and entropies) of given completions under a model, from one
//! training forward over right-padded `prompt ++ completion` rows.
//!
//! The computation lives in `sobre_rollout::logprobs`, next to the sampler whose recorded
//! logprobs it must reproduce (`log softmax(logits / T)`, T = 0 meaning untempered); the
//! trainer uses it under the names below.

use burn::prelude::*;

pub use sobre_rollout::logprobs::{Scored, ScoredBatch as Layout, completion_scores as score};

/// Take tokens out of `layout`'s loss mask: row `r`'s column `i` where `in_loss[r][i]` is false
/// (tool responses, SFT spans not trained on). Columns past a row's flags are left as they are.
pub fn exclude_tokens<'a>(layout: &mut Layout, in_loss: impl IntoIterator<Item = &'a [bool]>) {
    let m = layout.max_completion;
    for (r, flags) in in_loss.into_iter().enumerate() {
        for (i, _) in flags.iter().take(m).enumerate().filter(|(_, k)| !**k) {
            layout.mask[r * m + i] = 0.0;
        }
    }
}

/// A tensor's values on the host.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap_or_default()
}
