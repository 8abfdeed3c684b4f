//! On-policy distillation: the student samples, a frozen teacher scores the sampled tokens, and
//! the per-token reverse KL between them becomes part of each token's advantage
//! (`grpo.teacher`, `grpo.teacher_coef`, `grpo.teacher_only`).
//!
//! Per completion token `t` (sampled from the student `π` at the rollout temperature):
//!
//! `A_t = A_verifier + coef · (log π_teacher(y_t | y_<t) − log π_sampler(y_t | y_<t))`
//!
//! `log π_sampler − log π_teacher` is the single-sample (k1) estimate of the reverse KL
//! `KL(π ‖ π_teacher)` at that position, so the policy-gradient objective with this advantage
//! descends the reverse KL on the student's own samples: the "on-policy distillation" recipe of
//! Thinking Machines (2025, advantage = −reverse KL, discount 0) and Agarwal et al.'s GKD with
//! on-policy data and the reverse-KL end of its divergence (TRL's `GKDTrainer` with `lmbda = 1`,
//! `beta = 1`). TRL computes that divergence over the whole vocabulary from both models' logits;
//! sobre uses the sampled-token form, which needs only the teacher's log-probability of each
//! sampled token (no `[tokens, vocab]` teacher logits kept) and is unbiased for the same gradient.
//! The teacher term is a constant of the loss (like a verifier advantage): the gradient flows
//! through the importance ratio only.
//!
//! `teacher_only = true` drops the verifier's advantage (pure distillation); rewards are still
//! computed and logged. The teacher's tokenizer must be the student's: the log-probabilities
//! compare the same token ids.

use std::path::Path;

use sobre_data::tokenizer::Tokenizer;

use crate::TrainError;
use crate::compare::load_for_eval;
use crate::config::ConfigError;
use crate::grpo::Reference;

/// The teacher model of `grpo.teacher` (`dir`), frozen and served like the KL reference, after
/// checking that its tokenizer is the student's; its weight matrices in `bf16` with `bf16`
/// (`model.frozen_dtype`). `origin` names the config in errors.
pub fn load_teacher(
    dir: &Path,
    student: &Tokenizer,
    bf16: bool,
    origin: &str,
) -> Result<Reference, TrainError> {
    let err = |msg: String| {
        TrainError::Config(ConfigError {
            origin: origin.to_string(),
            key: Some("grpo.teacher".into()),
            msg,
        })
    };
    let (model, tok, dir) = load_for_eval(dir, None).map_err(|e| err(e.to_string()))?;
    if let Err(m) = same_vocabulary(&tok, student) {
        return Err(err(format!(
            "the teacher in {} does not share the student's tokenizer ({m}): on-policy \
             distillation compares log-probabilities of the same token ids; for a teacher with \
             another tokenizer, distil off-policy (`sobre generate --keep correct`, then SFT)",
            dir.display()
        )));
    }
    Reference::new(model, bf16)
}

/// `Ok` when `teacher` and `student` map the same ids to the same tokens and agree on the
/// special tokens; else the first difference.
pub fn same_vocabulary(teacher: &Tokenizer, student: &Tokenizer) -> Result<(), String> {
    let (a, b) = (teacher.vocab_size(), student.vocab_size());
    if a != b {
        return Err(format!("{a} tokens against the student's {b}"));
    }
    for id in 0..a as u32 {
        let (ta, tb) = (teacher.id_to_token(id), student.id_to_token(id));
        if ta != tb {
            return Err(format!(
                "token id {id} is {ta:?} for the teacher and {tb:?} for the student"
            ));
        }
    }
    if teacher.special() != student.special() {
        return Err(format!(
            "special tokens differ: {:?} against the student's {:?}",
            teacher.special(),
            student.special()
        ));
    }
    Ok(())
}

/// Add the teacher's term to per-token advantages, in place: for every token with `mask > 0`,
/// `advantages[t] += coef · (teacher[t] − sampled[t])`. All `[rows · tokens]`.
pub fn add_teacher_advantages(
    advantages: &mut [f32],
    teacher: &[f32],
    sampled: &[f32],
    mask: &[f32],
    coef: f32,
) {
    for (((a, t), s), m) in advantages.iter_mut().zip(teacher).zip(sampled).zip(mask) {
        if *m > 0.0 {
            *a += coef * (t - s);
        }
    }
}

/// `Σ_t mask · (sampled[t] − teacher[t])`: the reverse-KL estimate summed over the loss's
/// tokens (the `teacher/reverse_kl` metric divides it by their number).
pub fn reverse_kl_sum(teacher: &[f32], sampled: &[f32], mask: &[f32]) -> f64 {
    teacher
        .iter()
        .zip(sampled)
        .zip(mask)
        .filter(|(_, m)| **m > 0.0)
        .map(|((t, s), _)| (s - t) as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;

    use super::*;
    use crate::kl::KlEstimator;
    use crate::losses::{LossSettings, PolicyLossInput, grpo};

    /// One row of three tokens (the last one padding), verifier advantage 0.5, coef 2.
    /// Hand-computed: A = [0.5 + 2(−1.0 + 1.2), 0.5 + 2(−2.0 + 0.5), (pad)] = [0.9, −2.5, 0.5];
    /// the reverse KL summed over the 2 tokens is (−1.2 + 1.0) + (−0.5 + 2.0) = 1.3.
    /// With `old = sg[logp]` and `logp = sampled` every ratio is 1 and inside the clip range,
    /// so the `grpo` loss is −mean over the row's 2 tokens = −(0.9 − 2.5)/2 = 0.8, and its
    /// gradient with respect to `logp_t` is −A_t / 2 = [−0.45, 1.25, 0].
    #[test]
    fn gkd_loss_against_a_hand_computed_case() {
        let sampled = [-1.2f32, -0.5, 0.0];
        let teacher = [-1.0f32, -2.0, -7.0];
        let mask = [1.0f32, 1.0, 0.0];
        let mut adv = [0.5f32; 3];
        add_teacher_advantages(&mut adv, &teacher, &sampled, &mask, 2.0);
        for (a, w) in adv.iter().zip([0.9f32, -2.5, 0.5]) {
            assert!((a - w).abs() < 1e-6, "{adv:?}");
        }
        let rkl = reverse_kl_sum(&teacher, &sampled, &mask);
        assert!((rkl - 1.3).abs() < 1e-6, "{rkl}");

        let device = sobre_model::default_device().autodiff();
        let t = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [1, 3]), &device);
        let logp = t(&sampled).require_grad();
        let input = PolicyLossInput {
            logp: logp.clone(),
            old_logp: logp.clone().detach(),
            ref_logp: None,
            advantages: t(&adv),
            mask: t(&mask),
        };
        let settings = LossSettings {
            epsilon: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            kl: KlEstimator::K3,
            max_completion_length: 3,
            dapo_normalizer: 1.0,
        };
        let loss = grpo(&input, &settings);
        let value = loss.clone().try_into_vec_as::<f32>().unwrap()[0];
        assert!((value - 0.8).abs() < 1e-6, "{value}");
        let g = logp
            .grad(&loss.backward())
            .unwrap()
            .try_into_vec_as::<f32>()
            .unwrap();
        for (a, w) in g.iter().zip([-0.45f32, 1.25, 0.0]) {
            assert!((a - w).abs() < 1e-6, "{g:?}");
        }
    }

    /// The teacher's signal vanishes where the teacher agrees with the sampler, and masked
    /// tokens keep their advantage whatever the teacher says.
    #[test]
    fn agreeing_teacher_adds_nothing_and_masked_tokens_are_untouched() {
        let lp = [-0.3f32, -1.7, -0.01, -4.0];
        let mut adv = [1.0f32, -1.0, 0.25, 3.0];
        let mut teacher = lp;
        teacher[3] = 0.0;
        add_teacher_advantages(&mut adv, &teacher, &lp, &[1.0, 1.0, 1.0, 0.0], 0.7);
        assert_eq!(adv, [1.0, -1.0, 0.25, 3.0]);
        assert_eq!(reverse_kl_sum(&teacher, &lp, &[1.0, 1.0, 1.0, 0.0]), 0.0);
    }
}
