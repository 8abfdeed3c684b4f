//! DeepSeek-R1's language-consistency reward (§2.3.3 of the R1 paper): "the proportion of target
//! language words in the CoT", added to the accuracy reward to stop the chain of thought from
//! mixing languages. R1 found that it costs a little accuracy but makes the reasoning readable.
//!
//! "Language" is read as Unicode script (UAX #24, from the `unicode-script` crate): a program can
//! tell Latin from Han or Cyrillic without a language model, but not English from French. A word
//! is a maximal run of alphabetic characters (combining marks of script Inherited continue it);
//! it counts as in the target language when every one of its letters is of the target script,
//! ignoring letters of script Common or Inherited (`ー`, `ʼ`). Runs without a letter of any script
//! (numbers, punctuation, a lone mark) are not words. Scripts written without spaces (Han, Thai,
//! Japanese kana) make a whole clause one word, so there the score is a share of runs, not of
//! words; and a script's non-alphabetic signs (Devanagari's virama) end a word, whose two halves
//! then both count.

use crate::registry::{bad_param, parse_params};
use crate::{Completion, Reward, RewardError, Sample};
use serde::Deserialize;
use unicode_script::UnicodeScript;

pub use unicode_script::Script;

/// Parameters of `language_consistency`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanguageParams {
    /// The target script by its Unicode name or 4-letter code, any case (default `"latin"`;
    /// `"han"`, `"cyrillic"`, `"arabic"`, `"devanagari"`, `"hiragana"`, `"old_italic"`, `"latn"`).
    pub script: String,
    /// Tag opening the chain of thought (default `"<think>"`); absent: it starts at the start.
    pub open: String,
    /// Tag closing it (default `"</think>"`); absent: it runs to the end.
    pub close: String,
    /// Score of a chain of thought with no words (default 0.0: skipping the thinking earns no
    /// consistency bonus).
    pub empty: f32,
}

impl Default for LanguageParams {
    fn default() -> Self {
        LanguageParams {
            script: "latin".to_string(),
            open: "<think>".to_string(),
            close: "</think>".to_string(),
            empty: 0.0,
        }
    }
}

/// Share of the chain of thought's words written in the target script.
#[derive(Debug, Clone)]
pub struct LanguageReward {
    pub params: LanguageParams,
    script: Script,
}

impl LanguageReward {
    /// Check the parameters (the script name, non-empty tags, a finite `empty`).
    pub fn new(params: LanguageParams) -> Result<Self, RewardError> {
        let script = parse_script(&params.script).ok_or_else(|| {
            bad_param(
                "language_consistency",
                "script",
                format!(
                    "`{}` is not a Unicode script of letters; valid values include latin, han, \
                     cyrillic, arabic, devanagari, hiragana, katakana, hangul, greek, hebrew, \
                     thai (any case, or 4-letter codes such as latn, hani)",
                    params.script
                ),
            )
        })?;
        for (key, tag) in [("open", &params.open), ("close", &params.close)] {
            if tag.is_empty() {
                return Err(bad_param("language_consistency", key, "must not be empty"));
            }
        }
        if !params.empty.is_finite() {
            return Err(bad_param(
                "language_consistency",
                "empty",
                format!("{} is not a finite number", params.empty),
            ));
        }
        Ok(LanguageReward { params, script })
    }

    /// The target script.
    pub fn script(&self) -> Script {
        self.script
    }
}

impl Default for LanguageReward {
    fn default() -> Self {
        LanguageReward {
            params: LanguageParams::default(),
            script: Script::Latin,
        }
    }
}

/// The script named `name`: its full Unicode name (`Old_Italic`; `_`, `-` or a space between
/// words) or its 4-letter code (`Latn`), in any case. `None` for unknown names and for Common,
/// Inherited and Unknown, which no language's letters are written in.
pub fn parse_script(name: &str) -> Option<Script> {
    // The crate parses exact spellings only; every full name is Title_Case except SignWriting,
    // and every code is Title case.
    let title = name
        .trim()
        .split(['_', '-', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next().map_or_else(String::new, |first| {
                first
                    .to_uppercase()
                    .chain(cs.flat_map(char::to_lowercase))
                    .collect()
            })
        })
        .collect::<Vec<_>>()
        .join("_");
    let script = Script::from_full_name(&title)
        .or_else(|| Script::from_short_name(&title))
        .or_else(|| {
            title
                .eq_ignore_ascii_case("signwriting")
                .then_some(Script::SignWriting)
        })?;
    match script {
        Script::Common | Script::Inherited | Script::Unknown => None,
        s => Some(s),
    }
}

/// The chain of thought of `text`: what lies between the first `open` and the first `close`
/// after it; from the start without `open`, to the end without `close`.
pub fn chain_of_thought<'a>(text: &'a str, open: &str, close: &str) -> &'a str {
    let start = text.find(open).map_or(0, |i| i + open.len());
    let rest = &text[start..];
    rest.find(close).map_or(rest, |end| &rest[..end])
}

/// `(words in script, words)` of `text`, words as the [module](self) defines them.
pub fn script_word_counts(text: &str, script: Script) -> (usize, usize) {
    let (mut in_script, mut words) = (0usize, 0usize);
    // The word being read: has it a letter of some script, are all its letters of `script`?
    let (mut has_letter, mut all_in_script) = (false, true);
    for c in text.chars().chain(std::iter::once(' ')) {
        // ASCII first: most completions are mostly ASCII, and its letters are all Latin.
        let (in_word, letter_script) = if c.is_ascii() {
            let alpha = c.is_ascii_alphabetic();
            (alpha, alpha.then_some(Script::Latin))
        } else {
            match c.script() {
                Script::Inherited => (true, None),
                Script::Common | Script::Unknown => (c.is_alphabetic(), None),
                s => (c.is_alphabetic(), c.is_alphabetic().then_some(s)),
            }
        };
        if in_word {
            if let Some(s) = letter_script {
                has_letter = true;
                all_in_script &= s == script;
            }
        } else {
            if has_letter {
                words += 1;
                in_script += usize::from(all_in_script);
            }
            (has_letter, all_in_script) = (false, true);
        }
    }
    (in_script, words)
}

/// Share of the words of `text` in `script`; `None` when `text` has no words.
pub fn script_share(text: &str, script: Script) -> Option<f32> {
    let (in_script, words) = script_word_counts(text, script);
    (words > 0).then(|| (in_script as f64 / words as f64) as f32)
}

impl Reward for LanguageReward {
    fn name(&self) -> &str {
        "language_consistency"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        let p = &self.params;
        let cot = chain_of_thought(completion.text, &p.open, &p.close);
        Some(script_share(cot, self.script).unwrap_or(p.empty))
    }
}

pub(crate) fn build(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    let p: LanguageParams = parse_params("language_consistency", params)?;
    Ok(Box::new(LanguageReward::new(p)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CombinedReward;

    fn score(r: &LanguageReward, text: &str) -> Option<f32> {
        r.score(&Sample::new(), &Completion::new(text))
    }

    fn with_script(script: &str) -> LanguageReward {
        LanguageReward::new(LanguageParams {
            script: script.to_string(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn all_english_is_one() {
        let r = LanguageReward::default();
        let text = "<think>\nLet me add the two numbers first.\n</think>\n<answer>\n5\n</answer>";
        assert_eq!(score(&r, text), Some(1.0));
    }

    #[test]
    fn mixed_counts_words() {
        // I, think, 这个, is, right: 4 Latin words of 5.
        let r = LanguageReward::default();
        assert_eq!(
            script_word_counts("I think 这个 is right", Script::Latin),
            (4, 5)
        );
        assert_eq!(score(&r, "<think>I think 这个 is right</think>"), Some(0.8));
        // A word mixing scripts is not in the target script.
        assert_eq!(script_word_counts("用Python写 code", Script::Latin), (1, 2));
    }

    #[test]
    fn han_target() {
        let r = with_script("han");
        assert_eq!(r.script(), Script::Han);
        // Two runs of Han (the full-width comma is Common and separates them), one Latin word.
        assert_eq!(
            score(&r, "<think>我们先算一下，答案是 five</think>"),
            Some(2.0 / 3.0)
        );
        assert_eq!(
            score(&r, "<think>我们先算一下，然后检查。</think>"),
            Some(1.0)
        );
        assert_eq!(
            score(&with_script("latin"), "<think>我们先算一下</think>"),
            Some(0.0)
        );
    }

    #[test]
    fn numbers_and_punctuation_ignored() {
        assert_eq!(script_word_counts("2+3=5 so yes", Script::Latin), (2, 2));
        assert_eq!(
            score(&LanguageReward::default(), "<think>2+3=5 so yes</think>"),
            Some(1.0)
        );
        // Common and Inherited characters in a word are ignored: the prolonged sound mark ー is
        // Common, the decomposed acute accent Inherited.
        assert_eq!(script_word_counts("コーヒー", Script::Katakana), (1, 1));
        assert_eq!(
            script_word_counts("cafe\u{301} re\u{301}sume\u{301}", Script::Latin),
            (2, 2)
        );
    }

    #[test]
    fn only_the_chain_of_thought_counts() {
        let r = LanguageReward::default();
        let text = "前言 <think>all english here</think> <answer>答案是五</answer>";
        assert_eq!(
            chain_of_thought(text, "<think>", "</think>"),
            "all english here"
        );
        assert_eq!(score(&r, text), Some(1.0));
        // No open tag (the template opened it): from the start; no close tag: to the end.
        assert_eq!(score(&r, "think 一下</think>答案答案答案"), Some(0.5));
        assert_eq!(score(&r, "<think>still thinking 还在"), Some(2.0 / 3.0));
        let custom = LanguageReward::new(LanguageParams {
            open: "<reasoning>".into(),
            close: "</reasoning>".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            score(&custom, "中文 <reasoning>fine</reasoning>"),
            Some(1.0)
        );
    }

    #[test]
    fn empty_chain_of_thought() {
        assert_eq!(
            score(&LanguageReward::default(), "<think>\n</think>answer"),
            Some(0.0)
        );
        assert_eq!(score(&LanguageReward::default(), ""), Some(0.0));
        let lenient = LanguageReward::new(LanguageParams {
            empty: 1.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(score(&lenient, "<think>42 = 6 * 7</think>"), Some(1.0));
        assert_eq!(script_share("... 123", Script::Latin), None);
    }

    #[test]
    fn megabyte_in_one_pass() {
        // 1 MB of mixed text (a third of its words Cyrillic), without tags: one linear pass.
        let text = "word слово 42, x ".repeat(1 << 16);
        assert!(text.len() > 1 << 20);
        let start = std::time::Instant::now();
        let counts = script_word_counts(&text, Script::Cyrillic);
        let elapsed = start.elapsed();
        assert_eq!(counts, (1 << 16, 3 << 16));
        assert!(elapsed.as_millis() < 500, "{elapsed:?}");
        let r = with_script("cyrillic");
        assert_eq!(score(&r, &text), Some(1.0 / 3.0));
    }

    #[test]
    fn script_names() {
        assert_eq!(parse_script("latin"), Some(Script::Latin));
        assert_eq!(parse_script("LATIN"), Some(Script::Latin));
        assert_eq!(parse_script("Cyrillic"), Some(Script::Cyrillic));
        assert_eq!(parse_script("old italic"), Some(Script::Old_Italic));
        assert_eq!(parse_script("signwriting"), Some(Script::SignWriting));
        assert_eq!(parse_script("hani"), Some(Script::Han));
        assert_eq!(parse_script("common"), None);
        assert_eq!(parse_script("inherited"), None);
        assert_eq!(parse_script("unknown"), None);
        assert_eq!(parse_script("klingon"), None);
        // Every script of a character, spelled in lower case, parses back.
        let mut scripts: Vec<Script> = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .map(|c| c.script())
            .collect();
        scripts.sort_by_key(|s| s.full_name());
        scripts.dedup();
        assert!(scripts.len() > 150, "{}", scripts.len());
        for s in scripts {
            let expected = match s {
                Script::Common | Script::Inherited | Script::Unknown => None,
                s => Some(s),
            };
            assert_eq!(
                parse_script(&s.full_name().to_lowercase()),
                expected,
                "{s:?}"
            );
            assert_eq!(
                parse_script(&s.short_name().to_uppercase()),
                expected,
                "{s:?}"
            );
        }
    }

    #[test]
    fn unknown_script_is_an_error_naming_the_key() {
        let mut params = serde_json::Map::new();
        params.insert("script".into(), "klingon".into());
        let e = build(&params).unwrap_err().to_string();
        assert!(
            e.contains("`language_consistency`") && e.contains("`script`") && e.contains("klingon"),
            "{e}"
        );
        assert!(
            e.contains("latin") && e.contains("han") && e.contains("cyrillic"),
            "{e}"
        );
        params.insert("script".into(), "common".into());
        assert!(build(&params).unwrap_err().to_string().contains("`script`"));
        params.insert("script".into(), 3.into());
        assert!(build(&params).unwrap_err().to_string().contains("`script`"));
        let mut params = serde_json::Map::new();
        params.insert("close".into(), "".into());
        assert!(build(&params).unwrap_err().to_string().contains("`close`"));
    }

    #[test]
    fn registry_builds_it_by_name() {
        let rewards = CombinedReward::from_toml(
            r#"
            [[reward]]
            name = "language_consistency"
            weight = 0.5
            script = "Han"
            open = "<reasoning>"
            close = "</reasoning>"
            empty = 0.25
            "#,
        )
        .unwrap();
        assert_eq!(rewards.names(), vec!["language_consistency"]);
        let s = Sample::new();
        let out = rewards.score(&s, &Completion::new("<reasoning>先 think 再答</reasoning>"));
        assert_eq!(
            out.components[0],
            ("language_consistency".to_string(), Some(2.0 / 3.0))
        );
        assert_eq!(out.total, 0.5 * (2.0f32 / 3.0));
        let out = rewards.score(&s, &Completion::new("<reasoning></reasoning>"));
        assert_eq!(out.total, 0.125);
        let e = CombinedReward::from_toml(
            "[[reward]]\nname = \"language_consistency\"\nscrpt = \"han\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`language_consistency`") && e.contains("`scrpt`"),
            "{e}"
        );
        assert!(crate::reward_names().contains(&"language_consistency"));
    }
}
