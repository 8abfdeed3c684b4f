//! Length shaping: open-r1's cosine-scaled reward and DAPO's soft overlong penalty.
//!
//! Lengths are in tokens when the caller gives [`Completion::num_tokens`], else in characters
//! (open-r1 measures `len(content)`, characters).

use crate::accuracy::{AccuracyParams, AccuracyReward};
use crate::countdown::{CountdownReward, Verdict};
use crate::registry::{bad_param, parse_params};
use crate::{Completion, Reward, RewardError, Sample};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Which shaping `length` applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthMode {
    /// open-r1's `get_cosine_scaled_reward` (default).
    #[default]
    Cosine,
    /// DAPO's soft overlong punishment.
    Overlong,
}

/// What decides "correct" for the cosine reward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Correctness {
    /// The `accuracy` reward (math answer equivalence) with its defaults.
    #[default]
    Accuracy,
    /// The `countdown` reward's verdict with its defaults.
    Countdown,
}

/// Parameters of `length` (and of `overlong`, which is `length` with `mode = "overlong"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LengthParams {
    /// `"cosine"` (default) or `"overlong"`.
    pub mode: LengthMode,
    /// Cosine: reward of the shortest wrong completion (most negative).
    pub min_value_wrong: f32,
    /// Cosine: reward of a wrong completion at `max_len`.
    pub max_value_wrong: f32,
    /// Cosine: reward of a correct completion at `max_len`.
    pub min_value_correct: f32,
    /// Cosine: reward of the shortest correct completion.
    pub max_value_correct: f32,
    /// Cosine: length at which the schedule ends (default 1000). Overlong: L_max (default: the
    /// completion's `max_tokens`, else DAPO's 20480).
    pub max_len: Option<usize>,
    /// Overlong: L_cache, the soft-penalty band below L_max (DAPO: 4096).
    pub cache_len: usize,
    /// Cosine: `"accuracy"` (default) or `"countdown"`.
    pub correctness: Correctness,
}

impl Default for LengthParams {
    fn default() -> Self {
        LengthParams {
            mode: LengthMode::Cosine,
            min_value_wrong: -1.0,
            max_value_wrong: -0.5,
            min_value_correct: 0.5,
            max_value_correct: 1.0,
            max_len: None,
            cache_len: 4096,
            correctness: Correctness::Accuracy,
        }
    }
}

/// Cosine length reward (correctness-dependent) or DAPO overlong penalty.
#[derive(Debug, Clone, Default)]
pub struct LengthReward {
    pub params: LengthParams,
    name: &'static str,
}

/// open-r1's cosine schedule: from `max_value` at length 0 to `min_value` at `max_len`.
/// For wrong answers the caller swaps the ends, so longer wrong answers are punished less.
pub fn cosine_scaled(len: usize, max_len: usize, min_value: f32, max_value: f32) -> f32 {
    let progress = (len as f64 / max_len.max(1) as f64).min(1.0);
    let cosine = (progress * std::f64::consts::PI).cos();
    (f64::from(min_value) + 0.5 * f64::from(max_value - min_value) * (1.0 + cosine)) as f32
}

/// DAPO's soft overlong punishment: 0 up to `l_max − l_cache`, then linear down to −1 at `l_max`,
/// −1 beyond.
pub fn soft_overlong(len: usize, l_max: usize, l_cache: usize) -> f32 {
    let free = l_max.saturating_sub(l_cache);
    if len <= free {
        0.0
    } else if len <= l_max {
        (free as f64 - len as f64) as f32 / l_cache.max(1) as f32
    } else {
        -1.0
    }
}

impl Reward for LengthReward {
    fn name(&self) -> &str {
        self.name
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        let p = &self.params;
        let len = completion.length();
        match p.mode {
            LengthMode::Overlong => {
                let l_max = p.max_len.or(completion.max_tokens).unwrap_or(20480);
                Some(soft_overlong(len, l_max, p.cache_len))
            }
            LengthMode::Cosine => {
                let correct = match p.correctness {
                    Correctness::Accuracy => AccuracyReward {
                        params: AccuracyParams::default(),
                    }
                    .is_correct(sample, completion.text)?,
                    Correctness::Countdown => {
                        CountdownReward::default().verdict(sample, completion.text)?
                            == Verdict::Correct
                    }
                };
                let (lo, hi) = if correct {
                    (p.min_value_correct, p.max_value_correct)
                } else {
                    (p.max_value_wrong, p.min_value_wrong)
                };
                Some(cosine_scaled(len, p.max_len.unwrap_or(1000), lo, hi))
            }
        }
    }
}

fn build_with(
    name: &'static str,
    params: &Map<String, Value>,
    forced: Option<LengthMode>,
) -> Result<Box<dyn Reward>, RewardError> {
    let mut p: LengthParams = parse_params(name, params)?;
    if let Some(m) = forced {
        if params.contains_key("mode") && p.mode != m {
            return Err(bad_param(
                name,
                "mode",
                "`overlong` is always mode = \"overlong\"",
            ));
        }
        p.mode = m;
    }
    if p.max_len == Some(0) {
        return Err(bad_param(name, "max_len", "must be positive"));
    }
    if p.mode == LengthMode::Overlong && p.cache_len == 0 {
        return Err(bad_param(name, "cache_len", "must be positive"));
    }
    Ok(Box::new(LengthReward { params: p, name }))
}

pub(crate) fn build_length(params: &Map<String, Value>) -> Result<Box<dyn Reward>, RewardError> {
    build_with("length", params, None)
}

pub(crate) fn build_overlong(params: &Map<String, Value>) -> Result<Box<dyn Reward>, RewardError> {
    build_with("overlong", params, Some(LengthMode::Overlong))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_open_r1() {
        // open-r1 defaults: correct at length 0 → 1.0, at max_len → 0.5; wrong: −1.0 → −0.5.
        assert!((cosine_scaled(0, 1000, 0.5, 1.0) - 1.0).abs() < 1e-6);
        assert!((cosine_scaled(1000, 1000, 0.5, 1.0) - 0.5).abs() < 1e-6);
        assert!((cosine_scaled(500, 1000, 0.5, 1.0) - 0.75).abs() < 1e-6);
        assert!((cosine_scaled(0, 1000, -0.5, -1.0) + 1.0).abs() < 1e-6);
        assert!((cosine_scaled(1000, 1000, -0.5, -1.0) + 0.5).abs() < 1e-6);
        assert!((cosine_scaled(5000, 1000, 0.5, 1.0) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn dapo_overlong() {
        assert_eq!(soft_overlong(100, 20480, 4096), 0.0);
        assert_eq!(soft_overlong(16384, 20480, 4096), 0.0);
        assert!((soft_overlong(18432, 20480, 4096) + 0.5).abs() < 1e-6);
        assert_eq!(soft_overlong(20480, 20480, 4096), -1.0);
        assert_eq!(soft_overlong(30000, 20480, 4096), -1.0);
    }

    #[test]
    fn cosine_by_correctness() {
        let r = build_length(&Map::new()).unwrap();
        let s: Sample = serde_json::from_value(serde_json::json!({"answer": "4"})).unwrap();
        let right = r.score(
            &s,
            &Completion {
                text: "<answer>4</answer>",
                num_tokens: Some(0),
                ..Default::default()
            },
        );
        let wrong = r.score(
            &s,
            &Completion {
                text: "<answer>5</answer>",
                num_tokens: Some(0),
                ..Default::default()
            },
        );
        assert_eq!((right, wrong), (Some(1.0), Some(-1.0)));
        assert_eq!(r.score(&Sample::new(), &Completion::new("x")), None);
    }
}
