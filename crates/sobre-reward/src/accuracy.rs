//! The math accuracy reward: 1.0 when the completion's final answer is mathematically equivalent
//! to the sample's gold answer, else 0.0. See [`crate::math`] for extraction and equivalence.

use crate::math::{answers_equivalent, extract_answer, extract_gold};
use crate::registry::parse_params;
use crate::{Completion, Reward, RewardError, Sample};
use serde::Deserialize;
use serde_json::Value;

/// Parameters of `accuracy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccuracyParams {
    /// Sample field holding the gold answer (default `"answer"`).
    pub field: String,
}

impl Default for AccuracyParams {
    fn default() -> Self {
        AccuracyParams {
            field: "answer".into(),
        }
    }
}

/// Math answer equivalence against `sample[field]`.
///
/// `None` when the sample has no gold answer; 0.0 when the completion has no extractable answer.
#[derive(Debug, Clone, Default)]
pub struct AccuracyReward {
    pub params: AccuracyParams,
}

/// The gold answer of a sample as text: strings as they are, numbers printed.
pub(crate) fn gold_text(sample: &Sample, field: &str) -> Option<String> {
    match sample.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl AccuracyReward {
    /// Is the completion's answer correct? `None` when the sample has no gold answer.
    pub fn is_correct(&self, sample: &Sample, text: &str) -> Option<bool> {
        let gold = gold_text(sample, &self.params.field)?;
        let gold = extract_gold(&gold);
        Some(extract_answer(text).is_some_and(|pred| answers_equivalent(gold, pred)))
    }
}

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        self.is_correct(sample, completion.text)
            .map(|c| if c { 1.0 } else { 0.0 })
    }
}

pub(crate) fn build(
    params: &serde_json::Map<String, Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    Ok(Box::new(AccuracyReward {
        params: parse_params("accuracy", params)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(answer: Value, text: &str) -> Option<f32> {
        let mut s = Sample::new();
        s.insert("answer".into(), answer);
        AccuracyReward::default().score(&s, &Completion::new(text))
    }

    #[test]
    fn scores() {
        assert_eq!(score("72".into(), "<answer>72</answer>"), Some(1.0));
        assert_eq!(score(72.into(), "so \\boxed{72}"), Some(1.0));
        assert_eq!(
            score(
                "Natalia sold 48/2 = 24.\n#### 72".into(),
                "<answer>\n72\n</answer>"
            ),
            Some(1.0)
        );
        assert_eq!(
            score("\\frac{1}{2}".into(), "<answer>0.5</answer>"),
            Some(1.0)
        );
        assert_eq!(score("72".into(), "<answer>73</answer>"), Some(0.0));
        assert_eq!(score("72".into(), "no answer"), Some(0.0));
        assert_eq!(
            AccuracyReward::default().score(&Sample::new(), &Completion::new("\\boxed{1}")),
            None
        );
    }
}
