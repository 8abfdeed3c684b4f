//! Per-token log-probabilities (and entropies) of given completions under a model, from one
//! training forward over right-padded `prompt ++ completion` rows.
//!
//! The same quantity as `sobre_rollout::completion_logprobs` — `log softmax(logits / T)` at each
//! completion token, with the rollout's temperature rule (T = 0 means untempered) so that
//! training recomputes exactly what sampling recorded — plus the policy's entropy per token,
//! computed from the same logits (detached) for logging.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use sobre_model::{Batch, ForwardOptions, MoeModel, RouterStats};

/// Rows laid out for one forward.
#[derive(Debug, Clone)]
pub struct Layout {
    pub batch: Batch,
    pub rows: usize,
    /// Longest completion (columns of the outputs).
    pub max_completion: usize,
    /// `[rows, max_completion]`: 1 for completion tokens, 0 for padding.
    pub mask: Vec<f32>,
    prompt_lens: Vec<usize>,
    targets: Vec<i64>,
}

impl Layout {
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
        Layout {
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

/// The output of [`score`].
pub struct Scored {
    /// `[rows, max_completion]`, differentiable on an autodiff device; 0 at padding.
    pub logp: Tensor<2>,
    /// Entropy of the (tempered) policy at each position, host `[rows · max_completion]`
    /// (0 at padding); empty unless asked for.
    pub entropy: Vec<f32>,
    pub router: RouterStats,
}

/// Score the completions of `layout`. Every prompt must be non-empty.
pub fn score(
    model: &MoeModel,
    layout: &Layout,
    temperature: f32,
    opts: ForwardOptions,
    entropy: bool,
) -> Scored {
    let out = model.forward(&layout.batch, None, opts);
    let [rows, seq, vocab] = out.logits.dims();
    let device = out.logits.device();
    let m = layout.max_completion;
    // The logits at position p + i − 1 predict completion token i.
    let mut index = Vec::with_capacity(rows * m);
    for r in 0..rows {
        let p = layout.prompt_lens[r];
        for i in 0..m {
            let valid = layout.mask[r * m + i] > 0.0;
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
    let mask = layout.tensor(layout.mask.clone(), &device);
    let ent = if entropy {
        let d = lp.clone().detach();
        let h = (d.clone().exp() * d).sum_dim(1).neg().reshape([rows, m]) * mask.clone();
        h.try_into_vec_as::<f32>().unwrap_or_default()
    } else {
        vec![]
    };
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(layout.targets.clone(), [rows * m, 1]),
        &device,
    );
    Scored {
        logp: lp.gather(1, targets).reshape([rows, m]) * mask,
        entropy: ent,
        router: out.router,
    }
}

/// A tensor's values on the host.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap_or_default()
}
