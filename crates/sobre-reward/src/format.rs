//! R1's format reward and open-r1's tag-count reward.
//!
//! `format` (strict) is TRL/open-r1's `^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$` with
//! one deliberate difference: open-r1 compiles it with `re.MULTILINE`, so its `$` also accepts
//! text after a newline following `</answer>`; the issue asks for "nothing after", so ours is
//! anchored at the true end. `lenient` tolerates any whitespace around and between the blocks.

use crate::registry::parse_params;
use crate::{Completion, Reward, RewardError, Sample};
use regex::Regex;
use serde::Deserialize;
use std::sync::LazyLock;

static STRICT: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?s)\A<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\z").ok());
static LENIENT: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?s)\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\z").ok());

/// How strictly `format` reads the R1 shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatMode {
    /// Exactly `<think>\n…\n</think>\n<answer>\n…\n</answer>`, nothing before or after.
    #[default]
    Strict,
    /// `<think>…</think>` then `<answer>…</answer>`, any whitespace around them.
    Lenient,
}

/// Parameters of `format`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FormatParams {
    /// `"strict"` (default) or `"lenient"`.
    pub mode: FormatMode,
}

/// 1.0 when the completion has the R1 shape, else 0.0.
#[derive(Debug, Clone, Default)]
pub struct FormatReward {
    pub params: FormatParams,
}

impl FormatReward {
    /// Does `text` have the R1 shape in this mode?
    pub fn matches(&self, text: &str) -> bool {
        // Cheap rejections first: most malformed completions fail here without the regex.
        if !text.contains("</answer>") || !text.contains("<think>") {
            return false;
        }
        let re = match self.params.mode {
            FormatMode::Strict => &*STRICT,
            FormatMode::Lenient => &*LENIENT,
        };
        re.as_ref().is_some_and(|r| r.is_match(text))
    }
}

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        Some(if self.matches(completion.text) {
            1.0
        } else {
            0.0
        })
    }
}

pub(crate) fn build_format(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    Ok(Box::new(FormatReward {
        params: parse_params("format", params)?,
    }))
}

/// Parameters of `tag_count` (none).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagCountParams {}

/// open-r1's `tag_count_reward`: 0.25 for each of `<think>\n`, `\n</think>\n`, `\n<answer>\n`,
/// `\n</answer>` present exactly once.
#[derive(Debug, Clone, Default)]
pub struct TagCountReward;

impl TagCountReward {
    /// The partial credit for `text`.
    pub fn count(text: &str) -> f32 {
        ["<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>"]
            .iter()
            .map(|tag| {
                if text.matches(tag).take(2).count() == 1 {
                    0.25
                } else {
                    0.0
                }
            })
            .sum()
    }
}

impl Reward for TagCountReward {
    fn name(&self) -> &str {
        "tag_count"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        Some(Self::count(completion.text))
    }
}

pub(crate) fn build_tag_count(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    let _: TagCountParams = parse_params("tag_count", params)?;
    Ok(Box::new(TagCountReward))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(t: &str) -> bool {
        FormatReward::default().matches(t)
    }

    fn lenient(t: &str) -> bool {
        FormatReward {
            params: FormatParams {
                mode: FormatMode::Lenient,
            },
        }
        .matches(t)
    }

    #[test]
    fn strict_shape() {
        assert!(strict("<think>\nhmm\n</think>\n<answer>\n42\n</answer>"));
        assert!(strict("<think>\n\n</think>\n<answer>\n\n</answer>"));
        assert!(!strict(
            "<think>\nhmm\n</think>\n<answer>\n42\n</answer>\nmore"
        ));
        assert!(!strict("<think>hmm</think><answer>42</answer>"));
        assert!(!strict(" <think>\nhmm\n</think>\n<answer>\n42\n</answer>"));
        assert!(!strict("<answer>\n42\n</answer>"));
    }

    #[test]
    fn lenient_shape() {
        assert!(lenient("<think>hmm</think><answer>42</answer>"));
        assert!(lenient("\n <think>hmm</think>\n\n<answer> 42 </answer>\n"));
        assert!(!lenient("<think>hmm</think><answer>42</answer> trailing"));
        assert!(!lenient("<answer>42</answer><think>hmm</think>"));
    }

    #[test]
    fn tag_count() {
        assert_eq!(
            TagCountReward::count("<think>\na\n</think>\n<answer>\nb\n</answer>"),
            1.0
        );
        assert_eq!(TagCountReward::count("<think>\na"), 0.25);
        assert_eq!(TagCountReward::count("<think>\n<think>\n"), 0.0);
        assert_eq!(TagCountReward::count(""), 0.0);
    }
}
