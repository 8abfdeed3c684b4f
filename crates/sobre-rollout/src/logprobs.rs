//! Log-probabilities (and entropies) of given completions under a model, computed by one
//! training forward. The trainer scores its policy and reference with this, so training
//! recomputes exactly the quantity sampling recorded.

use std::collections::HashMap;

use burn::prelude::*;
use sobre_model::{Batch, ForwardOptions, InferenceModel, MoeModel, RouterStats};

/// Prompt + completion pairs laid out for one training forward.
///
/// Row r is `prompt_r ++ completion_r`; the logits at the position of token `p_r + i − 1`
/// predict completion token i. Rows whose prompts are identical (GRPO's groups) share them:
/// each distinct prompt but its last token is a prefix computed once
/// ([`MoeModel::forward_positions_shared`]), and row r's own part is
/// `last prompt token ++ completion_r`, right-padded. Without repeated prompts (SFT), rows are
/// whole and right-padded.
#[derive(Debug, Clone)]
pub struct ScoredBatch {
    /// The rows (shared layout: their suffixes after the shared prefixes).
    pub batch: Batch,
    pub rows: usize,
    /// Longest completion (columns of the returned logprob matrix).
    pub max_completion: usize,
    /// `[rows, max_completion]`: 1 for real completion tokens, 0 for padding.
    pub mask: Vec<f32>,
    /// The distinct prompts' prefixes (left-padded) and the prefix of each row.
    shared: Option<(Batch, Vec<usize>)>,
    /// `[rows · max_completion]`: flat position in `batch` of the logits that predict each
    /// completion token (position 0 for padding: any valid index, masked out).
    logit_positions: Vec<usize>,
    /// `[rows · max_completion]`: each completion token (0 at padding).
    targets: Vec<usize>,
}

impl ScoredBatch {
    /// Every prompt must be non-empty (the first completion token is predicted by its last
    /// token). Shares repeated prompts.
    pub fn new(pairs: &[(&[u32], &[u32])], pad_id: u32) -> Self {
        Self::with_prefix_sharing(pairs, pad_id, true)
    }

    /// As [`ScoredBatch::new`]; `share = false` lays every row out whole, the reference the
    /// shared layout is tested against.
    pub fn with_prefix_sharing(pairs: &[(&[u32], &[u32])], pad_id: u32, share: bool) -> Self {
        let m = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let mut mask = vec![0.0; pairs.len() * m];
        let mut targets = vec![0usize; pairs.len() * m];
        for (r, (_, c)) in pairs.iter().enumerate() {
            for (i, &t) in c.iter().enumerate() {
                mask[r * m + i] = 1.0;
                targets[r * m + i] = t as usize;
            }
        }
        // Distinct prompts in order of first appearance; sharing pays only if one repeats and
        // some prompt has a token besides the one that stays in the rows.
        let mut distinct: Vec<&[u32]> = Vec::new();
        let mut index: HashMap<&[u32], usize> = HashMap::new();
        let prefix_of_row: Vec<usize> = pairs
            .iter()
            .map(|(p, _)| {
                *index.entry(p).or_insert_with(|| {
                    distinct.push(p);
                    distinct.len() - 1
                })
            })
            .collect();
        let share = share
            && distinct.len() < pairs.len()
            && distinct.iter().any(|p| p.len() > 1)
            && pairs.iter().all(|(p, _)| !p.is_empty());
        let (batch, shared, offsets) = if share {
            let prefixes: Vec<Vec<u32>> =
                distinct.iter().map(|p| p[..p.len() - 1].to_vec()).collect();
            let suffixes: Vec<Vec<u32>> = pairs
                .iter()
                .map(|(p, c)| p[p.len() - 1..].iter().chain(c.iter()).copied().collect())
                .collect();
            let mut batch = Batch::right_padded(&suffixes, pad_id);
            // RoPE positions continue each row's prompt.
            for (r, (p, _)) in pairs.iter().enumerate() {
                let row = &mut batch.positions[r * batch.seq..(r + 1) * batch.seq];
                for (i, pos) in row.iter_mut().enumerate() {
                    *pos = (p.len() - 1 + i) as u32;
                }
            }
            let prefixes = Batch::left_padded(&prefixes, pad_id);
            (batch, Some((prefixes, prefix_of_row)), vec![0; pairs.len()])
        } else {
            let seqs: Vec<Vec<u32>> = pairs
                .iter()
                .map(|(p, c)| p.iter().chain(c.iter()).copied().collect())
                .collect();
            let offsets = pairs
                .iter()
                .map(|(p, _)| p.len().saturating_sub(1))
                .collect();
            (Batch::right_padded(&seqs, pad_id), None, offsets)
        };
        let mut logit_positions = Vec::with_capacity(pairs.len() * m);
        for (r, offset) in offsets.iter().enumerate() {
            for i in 0..m {
                let valid = mask[r * m + i] > 0.0;
                logit_positions.push(if valid { r * batch.seq + offset + i } else { 0 });
            }
        }
        ScoredBatch {
            batch,
            rows: pairs.len(),
            max_completion: m,
            mask,
            shared,
            logit_positions,
            targets,
        }
    }

    /// Whether rows share their prompts' prefixes.
    pub fn shares_prefixes(&self) -> bool {
        self.shared.is_some()
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
    let (rows, m) = (scored.rows, scored.max_completion);
    // Logits only at the m positions per row that predict the completion tokens (the prompt's
    // own positions never reach the LM head).
    let positions = &scored.logit_positions;
    let (h, router) = match &scored.shared {
        Some((prefixes, prefix_of_row)) => {
            model.hidden_at_shared(prefixes, prefix_of_row, &scored.batch, positions, opts)
        }
        None => model.hidden_at(&scored.batch, positions, opts),
    };
    let device = h.device();
    let (logp, entropy) = model.token_scores(h, &scored.targets, temperature, entropy, opts);
    let entropy = entropy
        .iter()
        .zip(&scored.mask)
        .map(|(h, m)| h * m)
        .collect();
    let mask = scored.tensor(scored.mask.clone(), &device);
    Scored {
        logp: logp.reshape([rows, m]) * mask,
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

/// [`completion_logprobs`] on the host inference engine, for a model that is not being trained
/// (the frozen reference): no autodiff graph, plain buffers.
///
/// # Shapes
/// → `[rows · max_completion]`, row-major, 0 at padding.
pub fn completion_logprobs_host(
    model: &InferenceModel,
    scored: &ScoredBatch,
    temperature: f32,
) -> Vec<f32> {
    let positions = &scored.logit_positions;
    if positions.is_empty() {
        return vec![];
    }
    let logp = match &scored.shared {
        Some((prefixes, prefix_of_row)) => model.token_logprobs_shared(
            prefixes,
            prefix_of_row,
            (&scored.batch, positions),
            &scored.targets,
            temperature,
        ),
        None => model.token_logprobs(&scored.batch, positions, &scored.targets, temperature),
    };
    logp.iter()
        .zip(&scored.mask)
        .map(|(&lp, &m)| if m == 0.0 { 0.0 } else { lp })
        .collect()
}
