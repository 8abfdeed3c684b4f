//! Multi-digit arithmetic: `a + b`, `a - b`, `a * b` with a configurable number of digits.
//!
//! Demonstrations split the second operand by place value and write one step per part, in the
//! same `a op b = c, …` style as countdown:
//!
//! ```text
//! 123 + 45:  123 + 40 = 163, 163 + 5 = 168
//! 123 - 45:  123 - 40 = 83, 83 - 5 = 78
//! 123 * 45:  123 * 40 = 4920, 123 * 5 = 615, 4920 + 615 = 5535
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Problem, Split, TaskError, TaskRng, collect, r1_completion};
use crate::dataset::{Prompt, Sample};

/// Options of the arithmetic generator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArithmeticConfig {
    /// Fewest digits of an operand (≥ 1).
    pub min_digits: u32,
    /// Most digits of an operand (≤ 9, so products fit comfortably in an i64).
    pub max_digits: u32,
    /// Operators to draw from, each of `+`, `-`, `*`.
    pub ops: Vec<char>,
    /// Allow `a - b` with `a < b`; by default the larger operand comes first.
    pub allow_negative: bool,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        ArithmeticConfig {
            min_digits: 1,
            max_digits: 3,
            ops: vec!['+', '-', '*'],
            allow_negative: false,
        }
    }
}

impl ArithmeticConfig {
    pub fn validate(&self) -> Result<(), TaskError> {
        let bad = |message: String| {
            Err(TaskError::Config {
                task: "arithmetic",
                message,
            })
        };
        if self.min_digits < 1 || self.max_digits > 9 || self.min_digits > self.max_digits {
            return bad(format!(
                "digit range {}..={} must lie within 1..=9 and not be empty",
                self.min_digits, self.max_digits
            ));
        }
        if self.ops.is_empty() {
            return bad("`ops` is empty; use some of \"+\", \"-\", \"*\"".into());
        }
        if let Some(op) = self.ops.iter().find(|op| !matches!(op, '+' | '-' | '*')) {
            return bad(format!("operator `{op}` is not one of +, -, *"));
        }
        Ok(())
    }
}

/// One arithmetic problem `a op b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArithmeticProblem {
    pub a: i64,
    pub op: char,
    pub b: i64,
}

impl ArithmeticProblem {
    pub fn result(&self) -> i64 {
        match self.op {
            '+' => self.a + self.b,
            '-' => self.a - self.b,
            _ => self.a * self.b,
        }
    }

    pub fn question(&self) -> String {
        format!(
            "What is {} {} {}? Show your work in <think> </think> tags. And return the final \
             answer in <answer> </answer> tags.",
            self.a, self.op, self.b
        )
    }

    /// The place-value steps (see the module docs).
    pub fn reasoning(&self) -> String {
        let parts = place_parts(self.b);
        let mut steps = Vec::new();
        match self.op {
            '*' => {
                let products: Vec<i64> = parts.iter().map(|p| self.a * p).collect();
                for (p, prod) in parts.iter().zip(&products) {
                    steps.push(format!("{} * {p} = {prod}", self.a));
                }
                let mut acc = products[0];
                for prod in &products[1..] {
                    steps.push(format!("{acc} + {prod} = {}", acc + prod));
                    acc += prod;
                }
            }
            op => {
                let mut acc = self.a;
                for p in &parts {
                    let next = if op == '+' { acc + p } else { acc - p };
                    steps.push(format!("{acc} {op} {p} = {next}"));
                    acc = next;
                }
            }
        }
        steps.join(", ")
    }
}

/// The non-zero place-value parts of `n` (largest first), or `[0]`: 305 → [300, 5].
fn place_parts(n: i64) -> Vec<i64> {
    let mut parts = Vec::new();
    let mut unit = 1;
    let mut rest = n;
    while rest > 0 {
        let digit = rest % 10;
        if digit != 0 {
            parts.push(digit * unit);
        }
        rest /= 10;
        unit *= 10;
    }
    if parts.is_empty() {
        parts.push(0);
    }
    parts.reverse();
    parts
}

impl Problem for ArithmeticProblem {
    /// `arithmetic:<a> <op> <b>`, operands sorted for the commutative `+` and `*`.
    fn key(&self) -> String {
        let (a, b) = if self.op != '-' && self.a > self.b {
            (self.b, self.a)
        } else {
            (self.a, self.b)
        };
        format!("arithmetic:{a} {} {b}", self.op)
    }

    fn to_sample(&self, with_demo: bool) -> Sample {
        let answer = self.result().to_string();
        Sample {
            prompt: Prompt::Text(self.question()),
            completion: with_demo.then(|| r1_completion(&self.reasoning(), &answer)),
            answer: Some(answer),
            fields: BTreeMap::new(),
        }
    }
}

fn operand(rng: &mut TaskRng, cfg: &ArithmeticConfig) -> i64 {
    let digits = rng.range(cfg.min_digits as i64, cfg.max_digits as i64) as u32;
    let lo = if digits == 1 {
        0
    } else {
        10i64.pow(digits - 1)
    };
    rng.range(lo, 10i64.pow(digits) - 1)
}

fn draw(cfg: &ArithmeticConfig, rng: &mut TaskRng) -> ArithmeticProblem {
    let op = cfg.ops[rng.range(0, cfg.ops.len() as i64 - 1) as usize];
    let mut a = operand(rng, cfg);
    let mut b = operand(rng, cfg);
    if op == '-' && !cfg.allow_negative && a < b {
        std::mem::swap(&mut a, &mut b);
    }
    ArithmeticProblem { a, op, b }
}

/// `n` distinct arithmetic problems of `split` from `seed`.
pub fn generate(
    cfg: &ArithmeticConfig,
    split: Split,
    n: usize,
    seed: u64,
) -> Result<Vec<ArithmeticProblem>, TaskError> {
    cfg.validate()?;
    collect("arithmetic", split, n, seed, |rng| Some(draw(cfg, rng)))
}
