//! The n-gram repetition penalty of "Demystifying Long Chain-of-Thought Reasoning" (Appendix
//! C.2), as open-r1's `get_repetition_penalty_reward`: `(1 − distinct/total) × max_penalty`
//! over lower-cased whitespace-separated word n-grams.

use crate::registry::{bad_param, parse_params};
use crate::{Completion, Reward, RewardError, Sample};
use serde::Deserialize;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// Parameters of `repetition`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepetitionParams {
    /// Words per n-gram (default 3).
    pub ngram_size: usize,
    /// Penalty when every n-gram repeats; must be ≤ 0 (default −1.0).
    pub max_penalty: f32,
}

impl Default for RepetitionParams {
    fn default() -> Self {
        RepetitionParams {
            ngram_size: 3,
            max_penalty: -1.0,
        }
    }
}

/// Penalises repeated word n-grams.
#[derive(Debug, Clone, Default)]
pub struct RepetitionReward {
    pub params: RepetitionParams,
}

/// `(1 − distinct/total)` of the word n-grams of `text`; 0 for texts shorter than one n-gram.
pub fn repeated_fraction(text: &str, n: usize) -> f32 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if n == 0 || words.len() < n {
        return 0.0;
    }
    // Hash each word once (lower-cased), then n-grams as hashes of hashes: no allocation per
    // n-gram, so a 1 MB completion costs one pass.
    let hashes: Vec<u64> = words
        .iter()
        .map(|w| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for c in w.chars().flat_map(char::to_lowercase) {
                c.hash(&mut h);
            }
            h.finish()
        })
        .collect();
    let total = hashes.len() - n + 1;
    let mut seen = HashSet::with_capacity(total);
    for g in hashes.windows(n) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        g.hash(&mut h);
        seen.insert(h.finish());
    }
    (1.0 - seen.len() as f64 / total as f64) as f32
}

impl Reward for RepetitionReward {
    fn name(&self) -> &str {
        "repetition"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        Some(repeated_fraction(completion.text, self.params.ngram_size) * self.params.max_penalty)
    }
}

pub(crate) fn build(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    let p: RepetitionParams = parse_params("repetition", params)?;
    if p.ngram_size == 0 {
        return Err(bad_param("repetition", "ngram_size", "must be at least 1"));
    }
    if p.max_penalty.is_nan() || p.max_penalty > 0.0 {
        return Err(bad_param(
            "repetition",
            "max_penalty",
            format!("{} should not be positive", p.max_penalty),
        ));
    }
    Ok(Box::new(RepetitionReward { params: p }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions() {
        assert_eq!(repeated_fraction("", 3), 0.0);
        assert_eq!(repeated_fraction("a b", 3), 0.0);
        assert_eq!(repeated_fraction("a b c d", 3), 0.0);
        // 6 trigrams, 3 distinct ("a b c", "b c a", "c a b") → 0.5
        assert!((repeated_fraction("a b c a b c A B", 3) - 0.5).abs() < 1e-6);
        let r = RepetitionReward::default();
        assert_eq!(
            r.score(&Sample::new(), &Completion::new("x x x x")),
            Some(-(1.0 - 1.0 / 2.0))
        );
    }
}
