//! sobre-rollout: fast, exact sampling of groups of completions for GRPO.
//!
//! [`generate`](fn@generate) prefills each prompt once, copies its KV cache to the prompt's `group_size`
//! samples, and decodes every live sequence as one batch; finished sequences leave the batch.
//! Each (prompt key, sample index) draws from its own random stream, so a completion does not
//! depend on what else was in the batch.
//!
//! **Which log-probabilities a completion carries.** `Completion::logprobs[i]` is
//! `log softmax(logits / temperature)[token_i]`: the policy's distribution *after* temperature
//! and *before* top-k / top-p / min-p truncation (at temperature 0 it is the untempered
//! distribution). [`completion_logprobs`] computes the same quantity with a training forward
//! (no cache, gradients on), and the tests hold the two equal to 1e-4. On the CPU the sampler
//! runs on [`sobre_model::InferenceModel`], a second implementation of the same forward without
//! autodiff; it is held to the tensor forward for every family's options (1e-5 relative), so
//! the train/inference mismatch that separate inference engines introduce stays at float
//! rounding.
//!
//! **Tool calls** ([`tools`], [`generate_with_tools`]): a sequence that closes a call pauses
//! while the rest of the batch decodes; the response is inserted unsampled (log-prob 0,
//! `Completion::sampled = false`) and decoding resumes.
//!
//! Not here: tokenization (`sobre-data`; pass a [`Detokenizer`]), rewards, losses, the tools
//! themselves (`sobre-reward::tools`).

pub mod bench;
pub mod generate;
pub mod logprobs;
pub mod parallel;
pub mod sampling;
pub mod tools;

pub use generate::{
    Completion, Detokenizer, EngineKernels, EngineMode, FinishReason, Io, Prompt, generate,
    generate_on, generate_with, generate_with_tools, sequence_rng,
};
pub use logprobs::{
    Scored, ScoredBatch, completion_logprobs, completion_logprobs_host, completion_scores,
};
pub use sampling::{SamplingParams, sample, token_logprob};
pub use tools::{ToolCallRecord, ToolResponse, ToolSettings, Tools};

/// Why a generation request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("invalid sampling parameters: {0}")]
    Params(String),
    #[error("prompt {index} {msg}")]
    Prompt { index: usize, msg: String },
}

impl RolloutError {
    /// The same error with a prompt index counted from `offset` (a shard's first prompt).
    fn offset_prompt(self, offset: usize) -> Self {
        match self {
            RolloutError::Prompt { index, msg } => RolloutError::Prompt {
                index: index + offset,
                msg,
            },
            other => other,
        }
    }
}
