//! Per-token KL estimators between the policy and a frozen reference, from sampled tokens.
//!
//! With `δ = ref − logp` (log π_ref(y) − log π_θ(y) at the sampled token), after J. Schulman,
//! "Approximating KL divergence" (2020), as TRL and verl (`kl_penalty`) use them:
//! - `k1 = logp − ref = −δ` (unbiased, high variance, can be negative),
//! - `k2 = ½ δ²` (biased, low variance; its gradient is the true KL's gradient),
//! - `k3 = exp(δ) − δ − 1` (unbiased, ≥ 0; DeepSeekMath's GRPO and TRL's choice).

use burn::prelude::*;

/// A KL estimator by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    K1,
    K2,
    K3,
}

impl KlEstimator {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "k1" => Some(KlEstimator::K1),
            "k2" => Some(KlEstimator::K2),
            "k3" => Some(KlEstimator::K3),
            _ => None,
        }
    }

    /// The estimate per token (differentiable through `logp`).
    ///
    /// # Shapes
    /// `logp`, `ref_logp`: `[rows, tokens]` → `[rows, tokens]`.
    pub fn per_token(self, logp: Tensor<2>, ref_logp: Tensor<2>) -> Tensor<2> {
        let delta = ref_logp - logp;
        match self {
            KlEstimator::K1 => delta.neg(),
            KlEstimator::K2 => delta.powf_scalar(2.0) * 0.5,
            KlEstimator::K3 => delta.clone().exp() - delta - 1.0,
        }
    }

    /// The same estimate on host values (for logging).
    pub fn host(self, logp: f32, ref_logp: f32) -> f32 {
        let d = (ref_logp - logp) as f64;
        (match self {
            KlEstimator::K1 => -d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => d.exp() - d - 1.0,
        }) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_by_hand() {
        let device = sobre_model::default_device();
        // logp = [-1, -2], ref = [-1.5, -1]: δ = [-0.5, 1].
        let logp = Tensor::<2>::from_data(TensorData::new(vec![-1.0f32, -2.0], [1, 2]), &device);
        let rf = Tensor::<2>::from_data(TensorData::new(vec![-1.5f32, -1.0], [1, 2]), &device);
        let get = |k: KlEstimator| {
            k.per_token(logp.clone(), rf.clone())
                .try_into_vec_as::<f32>()
                .unwrap()
        };
        let want = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        assert!(want(&get(KlEstimator::K1), &[0.5, -1.0]));
        assert!(want(&get(KlEstimator::K2), &[0.125, 0.5]));
        // k3: e^-0.5 + 0.5 - 1 = 0.1065307; e^1 - 1 - 1 = 0.7182818.
        assert!(want(&get(KlEstimator::K3), &[0.106_530_7, 0.718_281_8]));
        assert!((KlEstimator::K3.host(-2.0, -1.0) - 0.718_281_8).abs() < 1e-6);
    }
}
