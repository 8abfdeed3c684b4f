//! Log-probabilities (and entropies) of given completions under a model, computed by one
//! training forward. The trainer scores its policy and reference with this, so training
//! recomputes exactly the quantity sampling recorded.

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
    pub rows: usize,
    /// Longest completion (columns of the returned logprob matrix).
    pub max_completion: usize,
    /// `[rows, max_completion]`: 1 for real completion tokens, 0 for padding.
    pub mask: Vec<f32>,
    prompt_lens: Vec<usize>,
    targets: Vec<i64>,
}

impl ScoredBatch {
    /// Every prompt must be non-empty (the first completion token is predicted by its last token).
    pub fn new(pairs: &[(&[u32], &[u32])], pad_id: u32) -> Self {
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(p, c)| p.iter().chain(c.iter()).copied().collect())
            .collect();
        let m = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let mut mask = vec![0.0; pairs.len() * m];
        let mut targets = vec![0i64; pairs.len() * m];
        for (r, (_, c)) in pairs.iter().enumerate() {
            for (i, &t) in c.iter().enumerate() {
                mask[r * m + i] = 1.0;
                targets[r * m + i] = t as i64;
            }
        }
        ScoredBatch {
            batch: Batch::right_padded(&seqs, pad_id),
            rows: pairs.len(),
            max_completion: m,
            mask,
            prompt_lens: pairs.iter().map(|(p, _)| p.len()).collect(),
            targets,
        }
    }

    /// A host `[rows, max_completion]` matrix as a tensor.
    pub fn tensor(&self, values: Vec<f32>, device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(values, [self.rows, self.max_completion]),
            device,
        )
    }
}

/// What [`completion_scores`] returns.
pub struct Scored {
    /// `[rows, max_completion]`, differentiable on an autodiff device; 0 at padding.
    pub logp: Tensor<2>,
    /// Entropy of the tempered policy at each completion position, host
    /// `[rows · max_completion]` (0 at padding); empty unless asked for.
    pub entropy: Vec<f32>,
    pub router: RouterStats,
}

/// `log softmax(logits / temperature)` at each completion token (temperature 0 means
/// untempered, as in sampling), and optionally the per-position entropy (detached).
///
/// # Shapes
/// `logp`: `[rows, max_completion]`.
pub fn completion_scores(
    model: &MoeModel,
    scored: &ScoredBatch,
    temperature: f32,
    opts: ForwardOptions,
    entropy: bool,
) -> Scored {
    let (rows, seq) = (scored.rows, scored.batch.seq);
    let m = scored.max_completion;
    // Logits only at the m positions per row that predict the completion tokens (the prompt's
    // own positions never reach the LM head). A row's columns past its own completion read
    // position 0 (any valid index; masked out).
    let mut index = Vec::with_capacity(rows * m);
    for r in 0..rows {
        let p = scored.prompt_lens[r];
        for i in 0..m {
            let valid = scored.mask[r * m + i] > 0.0;
            index.push(if valid { r * seq + p + i - 1 } else { r * seq });
        }
    }
    let (mut picked, router) = model.forward_positions(&scored.batch, &index, opts);
    let device = picked.device();
    if temperature > 0.0 && temperature != 1.0 {
        picked = picked / temperature as f64;
    }
    let lp = log_softmax(picked, 1);
    let mask = scored.tensor(scored.mask.clone(), &device);
    let entropy = if entropy {
        let d = lp.clone().detach();
        let h = (d.clone().exp() * d).sum_dim(1).neg().reshape([rows, m]) * mask.clone();
        h.try_into_vec_as::<f32>().unwrap_or_default()
    } else {
        vec![]
    };
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(scored.targets.clone(), [rows * m, 1]),
        &device,
    );
    Scored {
        logp: lp.gather(1, targets).reshape([rows, m]) * mask,
        entropy,
        router,
    }
}

/// [`completion_scores`] without entropies.
pub fn completion_logprobs(
    model: &MoeModel,
    scored: &ScoredBatch,
    temperature: f32,
    opts: ForwardOptions,
) -> (Tensor<2>, RouterStats) {
    let s = completion_scores(model, scored, temperature, opts, false);
    (s.logp, s.router)
}
