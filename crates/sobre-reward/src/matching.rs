//! String rewards: `exact_match` of the extracted answer and `regex_match`.

use crate::math::extract_answer;
use crate::registry::{bad_param, parse_params};
use crate::{Completion, Reward, RewardError, Sample};
use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Parameters of `exact_match`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExactMatchParams {
    /// Sample field with the expected answer (default `"answer"`).
    pub field: String,
    /// Compare the extracted answer (`<answer>`, `\boxed`, `####`) rather than the whole text.
    pub extract: bool,
    /// Case-sensitive comparison (default true).
    pub case_sensitive: bool,
}

impl Default for ExactMatchParams {
    fn default() -> Self {
        ExactMatchParams {
            field: "answer".into(),
            extract: true,
            case_sensitive: true,
        }
    }
}

/// 1.0 when the answer equals `sample[field]` after trimming whitespace, else 0.0; `None` when
/// the sample has no such field.
#[derive(Debug, Clone, Default)]
pub struct ExactMatchReward {
    pub params: ExactMatchParams,
}

impl Reward for ExactMatchReward {
    fn name(&self) -> &str {
        "exact_match"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        let gold = crate::accuracy::gold_text(sample, &self.params.field)?;
        let pred = if self.params.extract {
            extract_answer(completion.text)
        } else {
            Some(completion.text)
        };
        let Some(pred) = pred else { return Some(0.0) };
        let (g, p) = (gold.trim(), pred.trim());
        let eq = if self.params.case_sensitive {
            g == p
        } else {
            g.to_lowercase() == p.to_lowercase()
        };
        Some(if eq { 1.0 } else { 0.0 })
    }
}

/// What `regex_match` searches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegexTarget {
    /// The whole completion (default).
    #[default]
    Completion,
    /// The extracted answer only.
    Answer,
}

/// Parameters of `regex_match`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegexMatchParams {
    /// The pattern (Rust `regex` syntax, linear-time: no backreferences). Required.
    pub pattern: Option<String>,
    /// `"completion"` (default) or `"answer"`.
    pub target: RegexTarget,
    /// Require the pattern to match the whole target rather than somewhere in it.
    pub full: bool,
}

/// 1.0 when the pattern matches, else 0.0.
#[derive(Debug, Clone)]
pub struct RegexMatchReward {
    re: Regex,
    target: RegexTarget,
}

impl Reward for RegexMatchReward {
    fn name(&self) -> &str {
        "regex_match"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        let hay = match self.target {
            RegexTarget::Completion => completion.text,
            RegexTarget::Answer => match extract_answer(completion.text) {
                Some(a) => a,
                None => return Some(0.0),
            },
        };
        Some(if self.re.is_match(hay) { 1.0 } else { 0.0 })
    }
}

pub(crate) fn build_exact_match(
    params: &Map<String, Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    Ok(Box::new(ExactMatchReward {
        params: parse_params("exact_match", params)?,
    }))
}

pub(crate) fn build_regex_match(
    params: &Map<String, Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    let p: RegexMatchParams = parse_params("regex_match", params)?;
    let Some(pattern) = p.pattern else {
        return Err(bad_param("regex_match", "pattern", "is required"));
    };
    let pattern = if p.full {
        format!(r"\A(?:{pattern})\z")
    } else {
        pattern
    };
    // A size limit keeps a pathological pattern from taking memory; matching is linear anyway.
    let re = RegexBuilder::new(&pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| bad_param("regex_match", "pattern", e.to_string()))?;
    Ok(Box::new(RegexMatchReward {
        re,
        target: p.target,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_regex() {
        let s: Sample = serde_json::from_value(serde_json::json!({"answer": "Paris"})).unwrap();
        let em = build_exact_match(&Map::new()).unwrap();
        assert_eq!(
            em.score(&s, &Completion::new("<answer> Paris </answer>")),
            Some(1.0)
        );
        assert_eq!(
            em.score(&s, &Completion::new("<answer>paris</answer>")),
            Some(0.0)
        );
        let mut m = Map::new();
        m.insert("pattern".into(), "^[0-9]+$".into());
        m.insert("target".into(), "answer".into());
        let rm = build_regex_match(&m).unwrap();
        assert_eq!(
            rm.score(&s, &Completion::new("<answer>42</answer>")),
            Some(1.0)
        );
        assert_eq!(
            rm.score(&s, &Completion::new("<answer>4x</answer>")),
            Some(0.0)
        );
        assert!(
            build_regex_match(&Map::new())
                .unwrap_err()
                .to_string()
                .contains("`pattern`")
        );
    }
}
