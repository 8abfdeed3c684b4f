//! The rollout throughput benchmark behind `sobre bench rollout`.

use std::time::Instant;

use serde::Serialize;
use sobre_model::MoeModel;

use crate::RolloutError;
use crate::generate::{EngineKernels, EngineMode, Prompt, generate_with};
use crate::sampling::SamplingParams;

/// The workload: `prompts × group_size` completions of exactly `new_tokens` tokens.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutWorkload {
    pub prompts: usize,
    pub group_size: usize,
    pub new_tokens: usize,
    pub prompt_len: usize,
    pub seed: u64,
}

/// One measured engine mode.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutFigure {
    /// The mode, with `_tensor_ops` when burn tensor ops (fused kernels) ran it instead of the
    /// host engine.
    pub mode: String,
    pub seconds: f64,
    pub completion_tokens: usize,
    pub tokens_per_sec: f64,
}

/// Deterministic prompts of `prompt_len` tokens (ids spread over the vocabulary).
pub fn bench_prompts(w: &RolloutWorkload, vocab: usize) -> Vec<Prompt> {
    (0..w.prompts)
        .map(|p| Prompt {
            ids: (0..w.prompt_len)
                .map(|i| ((p * 7919 + i * 104_729 + 13) % vocab) as u32)
                .collect(),
            key: p as u64,
        })
        .collect()
}

/// Time each mode once on the same workload (temperature 1, `ignore_eos`). Every mode samples
/// the same tokens up to float rounding (tested), so the figures compare engines, not outputs.
pub fn bench_rollout(
    model: &MoeModel,
    w: &RolloutWorkload,
    modes: &[(EngineMode, EngineKernels)],
) -> Result<Vec<RolloutFigure>, RolloutError> {
    let prompts = bench_prompts(w, model.config.vocab_size);
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: w.new_tokens,
        ignore_eos: true,
        seed: w.seed,
        ..Default::default()
    };
    let mut out = Vec::new();
    for &(mode, kernels) in modes {
        let start = Instant::now();
        let done = generate_with(model, &prompts, w.group_size, &params, None, mode, kernels)?;
        let seconds = start.elapsed().as_secs_f64();
        let tokens: usize = done.iter().map(|c| c.tokens.len()).sum();
        out.push(RolloutFigure {
            mode: format!(
                "{}{}",
                match mode {
                    EngineMode::SharedPrefill => "shared_prefill",
                    EngineMode::SeparatePrefill => "separate_prefill",
                    EngineMode::NoCache => "no_cache",
                },
                match kernels {
                    EngineKernels::Host => "",
                    EngineKernels::Tensor(_) => "_tensor_ops",
                }
            ),
            seconds,
            completion_tokens: tokens,
            tokens_per_sec: tokens as f64 / seconds,
        });
    }
    Ok(out)
}
