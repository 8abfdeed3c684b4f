//! Log-probabilities of given completions under a model, computed by a training forward.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use sobre_model::{Batch, ForwardOptions, MoeModel, RouterStats};

/// Prompt + completion pairs laid out for one training forward, right-padded.
///
/// Row r holds `prompt_r ++ completion_r`; the logits at position `p_r + i − 1` predict
/// completion token i, so the targets are the completion tokens shifted into those columns.
#[derive(Debug, Clone)]
pub struct ScoredBatch {
    pub batch: Batch,
    /// Longest completion (columns of the returned logprob matrix).
    pub max_completion: usize,
    /// `[rows, max_completion]`: 1 for real completion tokens, 0 for padding.
    pub completion_mask: Vec<f32>,
    prompt_lens: Vec<usize>,
    targets: Vec<i64>,
}

impl ScoredBatch {
    pub fn new(pairs: &[(&[u32], &[u32])], pad_id: u32) -> Self {
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(p, c)| p.iter().chain(c.iter()).copied().collect())
            .collect();
        let max_completion = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let mut completion_mask = vec![0.0; pairs.len() * max_completion];
        let mut targets = vec![0i64; pairs.len() * max_completion];
        for (r, (_, c)) in pairs.iter().enumerate() {
            for (i, &t) in c.iter().enumerate() {
                completion_mask[r * max_completion + i] = 1.0;
                targets[r * max_completion + i] = t as i64;
            }
        }
        ScoredBatch {
            batch: Batch::right_padded(&seqs, pad_id),
            max_completion,
            completion_mask,
            prompt_lens: pairs.iter().map(|(p, _)| p.len()).collect(),
            targets,
        }
    }

    pub fn rows(&self) -> usize {
        self.prompt_lens.len()
    }
}

/// `log softmax(logits / temperature)` at each completion token, differentiable when the model
/// is on an autodiff device. Padding entries are 0 (multiply by `completion_mask` anyway).
///
/// # Shapes
/// returns `[rows, max_completion]`.
pub fn completion_logprobs(
    model: &MoeModel,
    scored: &ScoredBatch,
    temperature: f32,
    opts: ForwardOptions,
) -> (Tensor<2>, RouterStats) {
    let out = model.forward(&scored.batch, None, opts);
    let [rows, seq, vocab] = out.logits.dims();
    let device = out.logits.device();
    let m = scored.max_completion;
    // Gather, per row, the m logit rows that predict the completion tokens. A row's columns
    // past its own completion read position 0 (any valid index; masked out).
    let mut index = Vec::with_capacity(rows * m);
    for r in 0..rows {
        let p = scored.prompt_lens[r];
        for i in 0..m {
            let valid = scored.completion_mask[r * m + i] > 0.0;
            index.push(if valid {
                (r * seq + p + i - 1) as i64
            } else {
                (r * seq) as i64
            });
        }
    }
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [rows * m]), &device);
    let mut picked = out.logits.reshape([rows * seq, vocab]).select(0, index);
    if temperature > 0.0 && temperature != 1.0 {
        picked = picked / temperature as f64;
    }
    let lp = log_softmax(picked, 1);
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(scored.targets.clone(), [rows * m, 1]),
        &device,
    );
    let mask = Tensor::<2>::from_data(
        TensorData::new(scored.completion_mask.clone(), [rows, m]),
        &device,
    );
    (lp.gather(1, targets).reshape([rows, m]) * mask, out.router)
}
