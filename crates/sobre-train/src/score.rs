//! Per-token log-probabilities (and entropies) of given completions under a model, from one
//! training forward over right-padded `prompt ++ completion` rows.
//!
//! The computation lives in `sobre_rollout::logprobs`, next to the sampler whose recorded
//! logprobs it must reproduce (`log softmax(logits / T)`, T = 0 meaning untempered); the
//! trainer uses it under the names below.

use burn::prelude::*;

pub use sobre_rollout::logprobs::{Scored, ScoredBatch as Layout, completion_scores as score};

/// A tensor's values on the host.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap_or_default()
}
