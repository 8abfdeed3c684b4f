//! Group-relative advantages from rewards (host data; one scalar per completion).
//!
//! Follows TRL's `GRPOTrainer._generate_and_score_completions`: rewards are laid out
//! `[num_groups, group_size]` (completions of a prompt are contiguous), the group mean is
//! subtracted, and the result is divided by a standard deviation chosen by `scale_rewards`:
//! - `group`: the group's own std (DeepSeekMath's GRPO; TRL's default),
//! - `batch`: the std of all rewards of the batch (more robust with few samples per group),
//! - `none`: no division (Dr. GRPO: the std term biases towards too easy / too hard prompts).
//!
//! Stds are unbiased (`N − 1`, as `torch.std`), and `1e-4` is added before dividing (TRL).

/// How advantages are scaled; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

impl ScaleRewards {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "group" => Some(ScaleRewards::Group),
            "batch" => Some(ScaleRewards::Batch),
            "none" => Some(ScaleRewards::None),
            _ => None,
        }
    }
}

/// Added to the std before dividing (TRL).
pub const STD_EPS: f32 = 1e-4;

/// Mean and unbiased standard deviation (0 for fewer than two values).
pub fn mean_std(xs: &[f32]) -> (f32, f32) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean as f32, 0.0);
    }
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean as f32, var.sqrt() as f32)
}

/// Advantages for `rewards` laid out as consecutive groups of `group_size`.
///
/// # Panics
/// If `rewards.len()` is not a multiple of `group_size` (a caller bug).
pub fn group_advantages(rewards: &[f32], group_size: usize, scale: ScaleRewards) -> Vec<f32> {
    assert!(
        group_size > 0 && rewards.len().is_multiple_of(group_size),
        "rewards must form whole groups"
    );
    let batch_std = mean_std(rewards).1;
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let (mean, std) = mean_std(group);
        let denom = match scale {
            ScaleRewards::Group => std + STD_EPS,
            ScaleRewards::Batch => batch_std + STD_EPS,
            ScaleRewards::None => 1.0,
        };
        out.extend(group.iter().map(|&r| (r - mean) / denom));
    }
    out
}

/// Whether each group's rewards all tie (std ≈ 0): such a group has zero advantages and
/// teaches nothing (DAPO's dynamic sampling drops it).
pub fn zero_std_groups(rewards: &[f32], group_size: usize) -> Vec<bool> {
    rewards
        .chunks(group_size)
        .map(|g| mean_std(g).1 < 1e-6)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn group_scaling_by_hand() {
        // Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735.
        // A = ±0.5 / (0.57735 + 1e-4) = ±0.86588.
        // Group [2, 2, 2, 2]: all zero.
        let a = group_advantages(
            &[1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0],
            4,
            ScaleRewards::Group,
        );
        close(
            &a,
            &[0.86588, -0.86588, -0.86588, 0.86588, 0.0, 0.0, 0.0, 0.0],
            1e-4,
        );
    }

    #[test]
    fn batch_and_none_scaling_by_hand() {
        // rewards [0, 1, 3, 5]: groups of 2 → means 0.5 and 4.
        // batch mean 2.25, unbiased var = (5.0625 + 1.5625 + 0.5625 + 7.5625) / 3 = 4.91667, std 2.21736.
        let r = [0.0, 1.0, 3.0, 5.0];
        let a = group_advantages(&r, 2, ScaleRewards::Batch);
        let d = 2.21736 + 1e-4;
        close(&a, &[-0.5 / d, 0.5 / d, -1.0 / d, 1.0 / d], 1e-4);
        let a = group_advantages(&r, 2, ScaleRewards::None);
        close(&a, &[-0.5, 0.5, -1.0, 1.0], 1e-6);
    }

    #[test]
    fn zero_std_detection() {
        assert_eq!(
            zero_std_groups(&[1.0, 1.0, 0.0, 1.0, 0.5, 0.5], 2),
            vec![true, false, true]
        );
    }
}
