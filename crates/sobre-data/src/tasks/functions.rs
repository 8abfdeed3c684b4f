//! Tiny programming problems: infer a function from three of its values and write it in Python.
//! The `code` reward runs the completion's code block against hidden tests, so this is the
//! smallest task on which R1's "a compiler can evaluate the responses against predefined test
//! cases" can be trained and measured from scratch.
//!
//! A problem shows `f(0)`, `f(1)` and `f(2)` of a hidden function from one of the families
//!
//! - `linear`: `a*x + b`, with `a` in `1..=max_slope` and `b` in `min_offset..=max_offset`;
//! - `square`: `x*x + b`;
//!
//! and the tests (HumanEval's `test` + `entry_point` form) check `f` at [`TEST_POINTS`], none of
//! which is shown. Demonstrations reason by differences, one step per result:
//!
//! ```text
//! <think>
//! 5-2=3, 8-5=3
//! </think>
//! <answer>
//! ```python
//! def f(x):
//!     return 3*x+2
//! ```
//! </answer>
//! ```
//!
//! The offset is `f(0)`, read off the prompt; equal differences mean `linear` with the
//! difference as slope, the differences 1 and 3 mean `square`. Negative operands are
//! parenthesised (`2-(-1)=3`). Problem keys are `functions:linear:a,b` and `functions:square:b`.
//!
//! Why `f(0)` is shown: a model trained from nothing on a few hundred demonstrations does two-
//! digit subtraction badly, and with `f(1)..f(3)` shown (three subtractions per answer) the
//! `small` preset left SFT at 1.5% pass@1 on held-out problems — too rare for GRPO's groups to
//! see a success. Copying the offset leaves one subtraction that decides the answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Problem, Split, TaskError, TaskRng, collect, r1_completion};
use crate::dataset::{Prompt, Sample};

/// Where the tests evaluate `f`: never at the shown 0, 1, 2, and on both sides of them.
pub const TEST_POINTS: [i64; 6] = [3, 4, 5, 7, 10, -3];

/// A family of hidden functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `a*x + b`.
    Linear,
    /// `x*x + b`.
    Square,
}

/// Options of the functions generator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// Families to draw from (each equally likely).
    pub families: Vec<Family>,
    /// Largest slope `a` of a linear function (slopes are `1..=max_slope`).
    pub max_slope: i64,
    /// Offsets `b` are drawn from `min_offset..=max_offset`.
    pub min_offset: i64,
    pub max_offset: i64,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        FunctionsConfig {
            families: vec![Family::Linear, Family::Square],
            max_slope: 15,
            min_offset: -30,
            max_offset: 40,
        }
    }
}

impl FunctionsConfig {
    pub fn validate(&self) -> Result<(), TaskError> {
        let bad = |message: String| {
            Err(TaskError::Config {
                task: "functions",
                message,
            })
        };
        if self.families.is_empty() {
            return bad("`families` is empty; use some of \"linear\", \"square\"".into());
        }
        if !(1..=1000).contains(&self.max_slope) {
            return bad(format!(
                "max_slope must lie within 1..=1000, found {}",
                self.max_slope
            ));
        }
        if self.min_offset > self.max_offset
            || self.min_offset < -1_000_000
            || self.max_offset > 1_000_000
        {
            return bad(format!(
                "offset range {}..={} must not be empty and lie within ±1000000",
                self.min_offset, self.max_offset
            ));
        }
        Ok(())
    }
}

/// One problem: `f(x) = slope*x + offset` (linear) or `x*x + offset` (square).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionProblem {
    pub family: Family,
    /// The linear slope `a` (1 for `square`, where it is not used).
    pub slope: i64,
    pub offset: i64,
}

/// `n` as an operand of `-`: negatives in parentheses.
fn operand(n: i64) -> String {
    if n < 0 {
        format!("({n})")
    } else {
        n.to_string()
    }
}

/// `head` followed by `+b`, `-b` or nothing.
fn plus(head: &str, b: i64) -> String {
    match b {
        0 => head.to_string(),
        b if b > 0 => format!("{head}+{b}"),
        b => format!("{head}{b}"),
    }
}

impl FunctionProblem {
    pub fn eval(&self, x: i64) -> i64 {
        match self.family {
            Family::Linear => self.slope * x + self.offset,
            Family::Square => x * x + self.offset,
        }
    }

    /// The Python expression of `f`, as a demonstration writes it: `3*x+2`, `x-4`, `x*x`.
    pub fn expression(&self) -> String {
        let head = match (self.family, self.slope) {
            (Family::Square, _) => "x*x".to_string(),
            (Family::Linear, 1) => "x".to_string(),
            (Family::Linear, a) => format!("{a}*x"),
        };
        plus(&head, self.offset)
    }

    /// The canonical solution: `def f(x):\n    return <expression>\n`.
    pub fn solution(&self) -> String {
        format!("def f(x):\n    return {}\n", self.expression())
    }

    pub fn question(&self) -> String {
        format!(
            "f(0)={}, f(1)={}, f(2)={}. Write f in Python.",
            self.eval(0),
            self.eval(1),
            self.eval(2)
        )
    }

    /// The two differences (see the module docs).
    pub fn reasoning(&self) -> String {
        let [y0, y1, y2] = [0, 1, 2].map(|x| self.eval(x));
        format!(
            "{y1}-{}={}, {y2}-{}={}",
            operand(y0),
            y1 - y0,
            operand(y1),
            y2 - y1
        )
    }

    /// HumanEval's `test`: `check(candidate)` asserting `f` at every test point.
    pub fn test_program(&self) -> String {
        let pairs: Vec<String> = TEST_POINTS
            .iter()
            .map(|&x| format!("({x}, {})", self.eval(x)))
            .collect();
        format!(
            "def check(candidate):\n    for x, y in [{}]:\n        assert candidate(x) == y\n",
            pairs.join(", ")
        )
    }
}

impl Problem for FunctionProblem {
    fn key(&self) -> String {
        match self.family {
            Family::Linear => format!("functions:linear:{},{}", self.slope, self.offset),
            Family::Square => format!("functions:square:{}", self.offset),
        }
    }

    fn to_sample(&self, with_demo: bool) -> Sample {
        let code = format!("```python\n{}```", self.solution());
        let mut fields = BTreeMap::new();
        fields.insert("test".to_string(), Value::from(self.test_program()));
        fields.insert("entry_point".to_string(), Value::from("f"));
        Sample {
            prompt: Prompt::Text(self.question()),
            answer: Some(self.expression()),
            completion: with_demo.then(|| r1_completion(&self.reasoning(), &code)),
            fields,
        }
    }
}

fn draw(cfg: &FunctionsConfig, rng: &mut TaskRng) -> FunctionProblem {
    let family = cfg.families[rng.range(0, cfg.families.len() as i64 - 1) as usize];
    let slope = match family {
        Family::Linear => rng.range(1, cfg.max_slope),
        Family::Square => 1,
    };
    let offset = rng.range(cfg.min_offset, cfg.max_offset);
    FunctionProblem {
        family,
        slope,
        offset,
    }
}

/// `n` distinct function problems of `split` from `seed`.
pub fn generate(
    cfg: &FunctionsConfig,
    split: Split,
    n: usize,
    seed: u64,
) -> Result<Vec<FunctionProblem>, TaskError> {
    cfg.validate()?;
    collect("functions", split, n, seed, |rng| Some(draw(cfg, rng)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(family: Family, slope: i64, offset: i64) -> FunctionProblem {
        FunctionProblem {
            family,
            slope,
            offset,
        }
    }

    #[test]
    fn demonstrations_spell_out_the_differences() {
        let s = p(Family::Linear, 3, 2).to_sample(true);
        assert_eq!(
            s.completion.as_deref(),
            Some(
                "<think>\n5-2=3, 8-5=3\n</think>\n<answer>\n```python\ndef f(x):\n    \
                 return 3*x+2\n```\n</answer>"
            )
        );
        assert_eq!(
            s.prompt,
            Prompt::Text("f(0)=2, f(1)=5, f(2)=8. Write f in Python.".into())
        );
        assert_eq!(p(Family::Linear, 3, -4).reasoning(), "-1-(-4)=3, 2-(-1)=3");
        assert_eq!(p(Family::Square, 1, -4).reasoning(), "-3-(-4)=1, 0-(-3)=3");
        assert_eq!(p(Family::Square, 1, 0).expression(), "x*x");
        assert_eq!(p(Family::Linear, 1, -7).expression(), "x-7");
        assert_eq!(p(Family::Linear, 12, 0).expression(), "12*x");
    }

    #[test]
    fn the_test_program_checks_hidden_points() {
        assert_eq!(
            p(Family::Linear, 2, 1).test_program(),
            "def check(candidate):\n    for x, y in [(3, 7), (4, 9), (5, 11), (7, 15), (10, 21), \
             (-3, -5)]:\n        assert candidate(x) == y\n"
        );
    }

    #[test]
    fn keys_are_distinct_and_validation_names_the_option() {
        let cfg = FunctionsConfig::default();
        let train = generate(&cfg, Split::Train, 300, 7).unwrap();
        let keys: std::collections::BTreeSet<String> = train.iter().map(|p| p.key()).collect();
        assert_eq!(keys.len(), 300);
        assert!(train.iter().any(|p| p.family == Family::Square));
        let bad = FunctionsConfig {
            max_slope: 0,
            ..cfg
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("max_slope"), "{e}");
    }
}
