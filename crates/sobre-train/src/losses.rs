//! GRPO policy losses, registered by name: pure functions from per-token log-probabilities,
//! old and reference log-probabilities, advantages and a mask to a scalar loss.
//!
//! The shape of this module follows verl's `trainer/ppo/core_algos.py` (`compute_policy_loss`
//! computes the clipped per-token objective, `agg_loss` reduces it with a named mode, and a
//! registry maps names to policy-loss functions) and the loss types of TRL's
//! `GRPOTrainer._compute_loss`, whose formulas these are:
//!
//! per token: `r = exp(logp − old)`, `ℓ = −min(r·A, clip(r, 1−ε, 1+ε_high)·A) + β·KL`
//! (the KL term is added per token before aggregation, as TRL does), then
//! - `grpo`    — mean over each sequence's tokens, then mean over sequences (DeepSeekMath;
//!   verl's `seq-mean-token-mean`);
//! - `bnpo`    — sum over all tokens of the mini-batch / their number (verl's `token-mean`);
//! - `dr_grpo` — sum / (sequences × max_completion_length): a constant normaliser, so long
//!   completions are not down-weighted (Dr. GRPO; verl's `seq-mean-token-sum-norm`);
//! - `dapo`    — token-level mean over the whole generation batch (DAPO): the sum of a
//!   mini-batch is divided by the batch's total token count / number of mini-batches, so every
//!   token of the batch weighs the same whatever mini-batch it falls in;
//! - `gspo`    — the importance ratio is the sequence's `exp(mean_t(logp − old))` (GSPO), in
//!   the per-token stop-gradient form `s_t = sg[s] · π(y_t) / sg[π(y_t)]`, clipped per sequence
//!   and aggregated like `grpo`.
//!
//! Masked entries must hold `logp = old = ref = 0` or any finite value; they are multiplied out.

use burn::prelude::*;

use crate::kl::KlEstimator;

/// Inputs of a policy loss. All `[rows, tokens]`; `advantages` holds each row's advantage in
/// every column; `mask` is 1 for tokens that take part in the loss.
pub struct PolicyLossInput {
    /// Current policy log-probabilities (differentiable).
    pub logp: Tensor<2>,
    /// Log-probabilities of the policy that sampled (constants).
    pub old_logp: Tensor<2>,
    /// Reference model log-probabilities, when `beta > 0`.
    pub ref_logp: Option<Tensor<2>>,
    pub advantages: Tensor<2>,
    pub mask: Tensor<2>,
}

/// Settings shared by every loss.
#[derive(Debug, Clone, Copy)]
pub struct LossSettings {
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub kl: KlEstimator,
    /// `dr_grpo`'s constant: the generation limit.
    pub max_completion_length: usize,
    /// `dapo`'s normaliser: tokens of the generation batch / number of mini-batches.
    pub dapo_normalizer: f64,
}

/// A registered policy loss.
pub type PolicyLossFn = fn(&PolicyLossInput, &LossSettings) -> Tensor<1>;

/// Every loss by name.
pub const LOSS_REGISTRY: &[(&str, PolicyLossFn)] = &[
    ("grpo", grpo),
    ("bnpo", bnpo),
    ("dr_grpo", dr_grpo),
    ("dapo", dapo),
    ("gspo", gspo),
];

/// The loss registered under `name`.
pub fn policy_loss_fn(name: &str) -> Option<PolicyLossFn> {
    LOSS_REGISTRY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

/// The weight of one data-parallel shard's loss in its mini-batch's loss, such that
/// `Σ_shards weight · loss(shard) = loss(mini-batch)` for every registered loss: the means over
/// sequences (`grpo`, `gspo`, and `dr_grpo`, whose constant normaliser counts the shard's rows)
/// weigh a shard by its rows, `bnpo`'s token mean by its tokens, and `dapo` already divides by a
/// batch-wide constant. `tokens` count the mask's ones.
pub fn shard_weight(
    name: &str,
    shard_rows: usize,
    rows: usize,
    shard_tokens: f64,
    tokens: f64,
) -> f64 {
    match name {
        "dapo" => 1.0,
        "bnpo" => shard_tokens / tokens.max(1.0),
        _ => shard_rows as f64 / rows.max(1) as f64,
    }
}

/// Whether the loss uses a sequence-level importance ratio.
pub fn is_sequence_level(name: &str) -> bool {
    name == "gspo"
}

/// `−min(r·A, clip(r, 1−ε, 1+ε_high)·A)` per token, from `log r`.
pub fn clipped_objective(
    log_ratio: Tensor<2>,
    advantages: Tensor<2>,
    eps: f64,
    eps_high: f64,
) -> Tensor<2> {
    let ratio = log_ratio.exp();
    let unclipped = ratio.clone() * advantages.clone();
    let clipped = ratio.clamp(1.0 - eps, 1.0 + eps_high) * advantages;
    unclipped.min_pair(clipped).neg()
}

/// The per-token loss (clipped objective + β·KL) from a log-ratio.
fn per_token(input: &PolicyLossInput, log_ratio: Tensor<2>, s: &LossSettings) -> Tensor<2> {
    let mut loss = clipped_objective(
        log_ratio,
        input.advantages.clone(),
        s.epsilon,
        s.epsilon_high,
    );
    if s.beta > 0.0
        && let Some(r) = &input.ref_logp
    {
        loss = loss + s.kl.per_token(input.logp.clone(), r.clone()) * s.beta;
    }
    loss
}

/// Mean over each row's masked tokens (rows without tokens count 0), then mean over rows.
pub fn seq_mean_token_mean(loss: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let per_row = (loss * mask.clone()).sum_dim(1) / mask.sum_dim(1).clamp_min(1.0);
    per_row.mean()
}

/// Sum over masked tokens / their number.
pub fn token_mean(loss: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let n = mask.clone().sum().clamp_min(1.0);
    (loss * mask).sum() / n
}

/// Sum over masked tokens / a constant.
pub fn token_sum_over(loss: Tensor<2>, mask: Tensor<2>, normalizer: f64) -> Tensor<1> {
    (loss * mask).sum() / normalizer.max(1.0)
}

fn token_log_ratio(input: &PolicyLossInput) -> Tensor<2> {
    input.logp.clone() - input.old_logp.clone()
}

/// GRPO (DeepSeekMath): per-sequence token mean.
pub fn grpo(input: &PolicyLossInput, s: &LossSettings) -> Tensor<1> {
    seq_mean_token_mean(
        per_token(input, token_log_ratio(input), s),
        input.mask.clone(),
    )
}

/// BNPO: token mean over the mini-batch.
pub fn bnpo(input: &PolicyLossInput, s: &LossSettings) -> Tensor<1> {
    token_mean(
        per_token(input, token_log_ratio(input), s),
        input.mask.clone(),
    )
}

/// Dr. GRPO: token sum over sequences × generation limit.
pub fn dr_grpo(input: &PolicyLossInput, s: &LossSettings) -> Tensor<1> {
    let rows = input.mask.dims()[0];
    let norm = (rows * s.max_completion_length) as f64;
    token_sum_over(
        per_token(input, token_log_ratio(input), s),
        input.mask.clone(),
        norm,
    )
}

/// DAPO: token-level mean over the generation batch.
pub fn dapo(input: &PolicyLossInput, s: &LossSettings) -> Tensor<1> {
    token_sum_over(
        per_token(input, token_log_ratio(input), s),
        input.mask.clone(),
        s.dapo_normalizer,
    )
}

/// GSPO's log-ratio in the per-token stop-gradient form:
/// `log s_t = sg[mean_t(logp − old)] + logp_t − sg[logp_t]` (equal to the sequence log-ratio in
/// value; its gradient is the token's own).
pub fn sequence_log_ratio(logp: Tensor<2>, old: Tensor<2>, mask: Tensor<2>) -> Tensor<2> {
    let [_, m] = logp.dims();
    let seq = ((logp.clone() - old) * mask.clone()).sum_dim(1) / mask.sum_dim(1).clamp_min(1.0);
    seq.detach().repeat_dim(1, m) + logp.clone() - logp.detach()
}

/// GSPO: sequence-level ratio, aggregated as `grpo`.
pub fn gspo(input: &PolicyLossInput, s: &LossSettings) -> Tensor<1> {
    let lr = sequence_log_ratio(
        input.logp.clone(),
        input.old_logp.clone(),
        input.mask.clone(),
    );
    seq_mean_token_mean(per_token(input, lr, s), input.mask.clone())
}

/// Host-side clip statistics: the share of masked tokens whose ratio was clipped below
/// (`r < 1−ε` with `A < 0`) and above (`r > 1+ε_high` with `A > 0`), as TRL logs them.
/// `log_ratio`, `adv`, `mask` are `[rows · tokens]` row-major.
pub fn clip_fractions(
    log_ratio: &[f32],
    adv: &[f32],
    mask: &[f32],
    eps: f64,
    eps_high: f64,
) -> (f64, f64) {
    let (mut low, mut high, mut n) = (0usize, 0usize, 0usize);
    for ((&lr, &a), &m) in log_ratio.iter().zip(adv).zip(mask) {
        if m == 0.0 {
            continue;
        }
        n += 1;
        let r = (lr as f64).exp();
        if r < 1.0 - eps && a < 0.0 {
            low += 1;
        }
        if r > 1.0 + eps_high && a > 0.0 {
            high += 1;
        }
    }
    let n = n.max(1) as f64;
    (low as f64 / n, high as f64 / n)
}

/// Host log-ratios as the loss sees them: per token, or the row's mean for sequence level.
pub fn host_log_ratios(
    logp: &[f32],
    old: &[f32],
    mask: &[f32],
    tokens: usize,
    sequence: bool,
) -> Vec<f32> {
    let mut out: Vec<f32> = logp.iter().zip(old).map(|(a, b)| a - b).collect();
    if sequence && tokens > 0 {
        for (row, m) in out.chunks_mut(tokens).zip(mask.chunks(tokens)) {
            let n: f32 = m.iter().sum();
            let mean = row.iter().zip(m).map(|(x, k)| x * k).sum::<f32>() / n.max(1.0);
            row.iter_mut().for_each(|x| *x = mean);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        let device = sobre_model::default_device();
        Tensor::from_data(TensorData::new(v, shape), &device)
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.try_into_vec_as::<f32>().unwrap()[0]
    }

    fn settings(beta: f64) -> LossSettings {
        LossSettings {
            epsilon: 0.2,
            epsilon_high: 0.28,
            beta,
            kl: KlEstimator::K3,
            max_completion_length: 4,
            dapo_normalizer: 5.0,
        }
    }

    /// Two rows of up to 3 tokens; row 0 has 3 real tokens, row 1 has 2.
    /// log ratios: row 0 [ln 1.5, 0, ln 0.5], row 1 [ln 1.1, ln 0.7, pad]. A = [+1, −2].
    fn input() -> PolicyLossInput {
        let logp = vec![1.5f32.ln(), 0.0, 0.5f32.ln(), 1.1f32.ln(), 0.7f32.ln(), 0.0];
        PolicyLossInput {
            logp: t2(logp, [2, 3]),
            old_logp: t2(vec![0.0; 6], [2, 3]),
            ref_logp: None,
            advantages: t2(vec![1.0, 1.0, 1.0, -2.0, -2.0, -2.0], [2, 3]),
            mask: t2(vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [2, 3]),
        }
    }

    /// Rows `rows` of a `[n, m]` row-major vector, as a tensor.
    fn rows_of(v: &[f32], m: usize, rows: std::ops::Range<usize>) -> Tensor<2> {
        t2(v[rows.start * m..rows.end * m].to_vec(), [rows.len(), m])
    }

    /// Data-parallel shards: every registered loss, with the KL term on, over 5 rows of varied
    /// lengths (one fully masked) cut into 1, 2 and 3 shards, sums to the whole batch's loss.
    #[test]
    fn shard_weights_make_shard_losses_sum_to_the_batch_loss() {
        let (n, m) = (5usize, 4usize);
        let logp: Vec<f32> = (0..n * m).map(|i| -0.3 - 0.11 * (i % 7) as f32).collect();
        let old: Vec<f32> = (0..n * m).map(|i| -0.35 - 0.09 * (i % 5) as f32).collect();
        let refp: Vec<f32> = (0..n * m).map(|i| -0.4 - 0.05 * (i % 3) as f32).collect();
        let adv: Vec<f32> = [0.7f32, -1.2, 0.4, 1.5, -0.3]
            .iter()
            .flat_map(|&a| std::iter::repeat_n(a, m))
            .collect();
        let lens = [4usize, 2, 0, 3, 1];
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&l| (0..m).map(move |i| if i < l { 1.0 } else { 0.0 }))
            .collect();
        let part = |r: std::ops::Range<usize>| PolicyLossInput {
            logp: rows_of(&logp, m, r.clone()),
            old_logp: rows_of(&old, m, r.clone()),
            ref_logp: Some(rows_of(&refp, m, r.clone())),
            advantages: rows_of(&adv, m, r.clone()),
            mask: rows_of(&mask, m, r),
        };
        let s = settings(0.04);
        let tokens: f64 = lens.iter().sum::<usize>() as f64;
        for (name, f) in LOSS_REGISTRY {
            let whole = scalar(f(&part(0..n), &s)) as f64;
            assert!(
                whole.abs() > 1e-3,
                "{name}: a loss that is ~0 proves nothing"
            );
            let cuts: [Vec<std::ops::Range<usize>>; 3] = [
                std::iter::once(0..n).collect(),
                vec![0..3, 3..5],
                vec![0..2, 2..4, 4..5],
            ];
            for shards in cuts {
                let sum: f64 = shards
                    .iter()
                    .map(|r| {
                        let t: f64 = lens[r.clone()].iter().sum::<usize>() as f64;
                        let w = shard_weight(name, r.len(), n, t, tokens);
                        w * scalar(f(&part(r.clone()), &s)) as f64
                    })
                    .sum();
                assert!(
                    (sum - whole).abs() < 1e-5,
                    "{name}, {} shards: {sum} vs {whole}",
                    shards.len()
                );
            }
        }
    }

    // Per-token losses by hand (ε = 0.2, ε_high = 0.28):
    // row 0, A = 1: r = 1.5 → min(1.5, 1.28) = 1.28 → −1.28; r = 1 → −1; r = 0.5 → min(0.5, 0.8) = 0.5 → −0.5.
    // row 1, A = −2: r = 1.1 → min(−2.2, −2.2) → 2.2; r = 0.7 → min(−1.4, −1.6) = −1.6 → 1.6.
    // sums: row 0 −2.78 (3 tokens), row 1 3.8 (2 tokens); total 1.02 over 5 tokens.

    #[test]
    fn grpo_is_sequence_mean_of_token_means() {
        // (−2.78/3 + 3.8/2) / 2 = (−0.926667 + 1.9) / 2 = 0.486667
        let v = scalar(grpo(&input(), &settings(0.0)));
        assert!((v - 0.486_667).abs() < 1e-5, "{v}");
    }

    #[test]
    fn bnpo_dr_grpo_and_dapo_normalisers() {
        let s = settings(0.0);
        assert!((scalar(bnpo(&input(), &s)) - 1.02 / 5.0).abs() < 1e-5);
        // 2 rows × max_completion_length 4 = 8.
        assert!((scalar(dr_grpo(&input(), &s)) - 1.02 / 8.0).abs() < 1e-5);
        assert!((scalar(dapo(&input(), &s)) - 1.02 / 5.0).abs() < 1e-5);
    }

    #[test]
    fn gspo_uses_the_sequence_ratio() {
        // row 0: mean log r = (ln 1.5 + 0 + ln 0.5) / 3 = ln(0.75)/3 → s = 0.75^(1/3) = 0.908560;
        //   A = 1: min(0.908560, clip = 0.908560) → −0.908560 per token.
        // row 1: mean = (ln 1.1 + ln 0.7)/2 = ln(0.77)/2 → s = 0.877496; A = −2:
        //   min(−1.754993, clip(0.877496, 0.8, 1.28)·−2 = −1.754993) → 1.754993.
        // loss = (−0.908560 + 1.754993) / 2 = 0.423217
        let v = scalar(gspo(&input(), &settings(0.0)));
        assert!((v - 0.423_217).abs() < 1e-5, "{v}");
    }

    #[test]
    fn kl_term_is_added_per_token() {
        let mut inp = input();
        // ref = logp + 1 on every token → δ = 1, k3 = e − 2 = 0.718282 per token.
        let logp: Vec<f32> = inp.logp.clone().try_into_vec_as::<f32>().unwrap();
        inp.ref_logp = Some(t2(logp.iter().map(|x| x + 1.0).collect(), [2, 3]));
        let v = scalar(grpo(&inp, &settings(0.1)));
        assert!((v - (0.486_667 + 0.071_828)).abs() < 1e-5, "{v}");
    }

    #[test]
    fn gradients_flow_with_ratio_one() {
        // μ = 1: old = sg[logp], ratio 1, ∂ℓ/∂logp = −A / tokens-of-row / rows for grpo.
        let device = sobre_model::default_device().autodiff();
        let logp = Tensor::<2>::from_data(TensorData::new(vec![-1.0f32, -2.0], [1, 2]), &device)
            .require_grad();
        let inp = PolicyLossInput {
            logp: logp.clone(),
            old_logp: logp.clone().detach(),
            ref_logp: None,
            advantages: Tensor::from_data(TensorData::new(vec![2.0f32, 2.0], [1, 2]), &device),
            mask: Tensor::from_data(TensorData::new(vec![1.0f32, 1.0], [1, 2]), &device),
        };
        for f in [grpo as PolicyLossFn, gspo] {
            let loss = f(&inp, &settings(0.0));
            let g = logp
                .grad(&loss.backward())
                .unwrap()
                .try_into_vec_as::<f32>()
                .unwrap();
            assert!(g.iter().all(|x| (x + 1.0).abs() < 1e-5), "{g:?}");
        }
    }

    #[test]
    fn clip_fraction_by_hand() {
        let lr = [1.5f32.ln(), 0.0, 0.5f32.ln(), 1.1f32.ln(), 0.7f32.ln(), 0.0];
        let adv = [1.0, 1.0, 1.0, -2.0, -2.0, -2.0];
        let mask = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        // high: r = 1.5 with A > 0; low: r = 0.7 < 0.8 with A < 0. 5 tokens.
        let (low, high) = clip_fractions(&lr, &adv, &mask, 0.2, 0.28);
        assert!((low - 0.2).abs() < 1e-9 && (high - 0.2).abs() < 1e-9);
        assert!(policy_loss_fn("dr_grpo").is_some() && policy_loss_fn("ppo").is_none());
    }
}
