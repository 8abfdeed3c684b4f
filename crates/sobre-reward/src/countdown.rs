//! The countdown reward of TinyZero: the answer is an equation over the sample's `nums` that must
//! equal `target`.
//!
//! As TinyZero's `compute_score`: the equation is the last `<answer>…</answer>`; no answer scores
//! `no_answer_score` (0.0); an answer that uses characters other than digits, `+ - * / ( ) .` and
//! whitespace, or uses the wrong numbers, or does not evaluate (division by zero, bad syntax), or
//! evaluates to something else, scores `format_score` (0.1); the right value scores
//! `correct_score` (1.0). Two deliberate differences: the answer is searched in the whole
//! completion, not only its last line, and the value is compared with exact rational arithmetic
//! rather than within 1e-5.

use crate::math::extract::last_answer_tag;
use crate::registry::{bad_param, parse_params};
use crate::{Completion, Reward, RewardError, Sample};
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::Zero;
use serde::Deserialize;
use serde_json::Value;

/// Longest equation (bytes) evaluated; longer ones are well-formed-but-wrong at best.
const MAX_EQUATION_LEN: usize = 1000;
/// Deepest parenthesis nesting evaluated.
const MAX_DEPTH: usize = 64;

/// How often each number of `nums` may appear.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberUse {
    /// Every number exactly once (TinyZero).
    #[default]
    ExactlyOnce,
    /// Any subset, each at most once.
    AtMostOnce,
}

/// Parameters of `countdown`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CountdownParams {
    /// Score of a correct equation.
    pub correct_score: f32,
    /// Score of an answer that is there but wrong (TinyZero's `format_score`).
    pub format_score: f32,
    /// Score when there is no `<answer>…</answer>`.
    pub no_answer_score: f32,
    /// `"exactly_once"` (default) or `"at_most_once"`.
    pub use_numbers: NumberUse,
    /// Sample field with the numbers (default `"nums"`).
    pub nums_field: String,
    /// Sample field with the target (default `"target"`).
    pub target_field: String,
}

impl Default for CountdownParams {
    fn default() -> Self {
        CountdownParams {
            correct_score: 1.0,
            format_score: 0.1,
            no_answer_score: 0.0,
            use_numbers: NumberUse::ExactlyOnce,
            nums_field: "nums".into(),
            target_field: "target".into(),
        }
    }
}

/// Why a countdown answer scored what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    NoAnswer,
    /// Present but invalid or wrong.
    Wrong,
    Correct,
}

/// TinyZero's countdown scoring.
#[derive(Debug, Clone, Default)]
pub struct CountdownReward {
    pub params: CountdownParams,
}

impl CountdownReward {
    /// Judge a completion; `None` when the sample has no usable `nums`/`target`.
    pub fn verdict(&self, sample: &Sample, text: &str) -> Option<Verdict> {
        let nums = sample.get(&self.params.nums_field)?.as_array()?;
        let nums: Vec<BigInt> = nums.iter().map(json_int).collect::<Option<_>>()?;
        let target = json_int(sample.get(&self.params.target_field)?)?;
        let Some(eq) = last_answer_tag(text) else {
            return Some(Verdict::NoAnswer);
        };
        let eq = eq.trim();
        Some(if check(eq, &nums, &target, self.params.use_numbers) {
            Verdict::Correct
        } else {
            Verdict::Wrong
        })
    }
}

fn json_int(v: &Value) -> Option<BigInt> {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Some(i.into()),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => Some(BigInt::from(f as i64)),
            _ => None,
        },
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn check(eq: &str, nums: &[BigInt], target: &BigInt, mode: NumberUse) -> bool {
    if eq.is_empty() || eq.len() > MAX_EQUATION_LEN {
        return false;
    }
    if !eq
        .chars()
        .all(|c| c.is_ascii_digit() || "+-*/().".contains(c) || c.is_whitespace())
    {
        return false;
    }
    // The numbers used: every maximal digit run, as TinyZero's `re.findall(r"\d+")`.
    let mut used: Vec<BigInt> = Vec::new();
    for run in eq
        .split(|c: char| !c.is_ascii_digit())
        .filter(|r| !r.is_empty())
    {
        match run.parse() {
            Ok(n) => used.push(n),
            Err(_) => return false,
        }
    }
    let mut available: Vec<&BigInt> = nums.iter().collect();
    for n in &used {
        match available.iter().position(|a| *a == n) {
            Some(i) => {
                available.swap_remove(i);
            }
            None => return false,
        }
    }
    if mode == NumberUse::ExactlyOnce && !available.is_empty() {
        return false;
    }
    let mut p = Arith {
        b: eq.as_bytes(),
        i: 0,
        depth: 0,
    };
    match p.expr() {
        Some(v) => {
            p.skip_ws();
            p.i == p.b.len() && v == BigRational::from_integer(target.clone())
        }
        None => false,
    }
}

/// Exact value of an arithmetic expression (`+ - * /`, parentheses, decimal numbers), with the
/// countdown verifier's parser: the `calculator` tool. The error says what was wrong.
pub fn evaluate(expr: &str) -> Result<BigRational, String> {
    let expr = expr.trim();
    if expr.is_empty() {
        return Err("empty expression".into());
    }
    if expr.len() > MAX_EQUATION_LEN {
        return Err(format!(
            "expression longer than {MAX_EQUATION_LEN} characters"
        ));
    }
    if let Some(c) = expr
        .chars()
        .find(|c| !(c.is_ascii_digit() || "+-*/().".contains(*c) || c.is_whitespace()))
    {
        return Err(format!(
            "unexpected character `{c}` (only digits, + - * / and parentheses)"
        ));
    }
    let mut p = Arith {
        b: expr.as_bytes(),
        i: 0,
        depth: 0,
    };
    match p.expr() {
        Some(v) => {
            p.skip_ws();
            if p.i == p.b.len() {
                Ok(v)
            } else {
                Err(format!(
                    "cannot parse the expression after `{}`",
                    &expr[..p.i]
                ))
            }
        }
        None if division_by_zero(expr) => Err("division by zero".into()),
        None => Err("cannot parse the expression".into()),
    }
}

/// Whether `expr` parses once every division is made a multiplication (so its failure was a
/// division by zero, not a syntax error).
fn division_by_zero(expr: &str) -> bool {
    let times = expr.replace('/', "*");
    let mut p = Arith {
        b: times.as_bytes(),
        i: 0,
        depth: 0,
    };
    p.expr().is_some() && {
        p.skip_ws();
        p.i == p.b.len()
    }
}

/// An exact rational as text: `32`, `-7/2`.
pub fn format_rational(v: &BigRational) -> String {
    if v.is_integer() {
        v.numer().to_string()
    } else {
        format!("{}/{}", v.numer(), v.denom())
    }
}

/// Exact evaluation of `+ - * /` and parentheses over decimal numbers.
struct Arith<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl Arith<'_> {
    fn skip_ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.b.get(self.i).copied()
    }

    fn expr(&mut self) -> Option<BigRational> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        let mut acc = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.term()?;
            acc = if op == b'+' { acc + r } else { acc - r };
        }
        self.depth -= 1;
        Some(acc)
    }

    fn term(&mut self) -> Option<BigRational> {
        let mut acc = self.unary()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            let r = self.unary()?;
            if op == b'*' {
                acc *= r;
            } else if r.is_zero() {
                return None; // division by zero is just wrong
            } else {
                acc /= r;
            }
        }
        Some(acc)
    }

    fn unary(&mut self) -> Option<BigRational> {
        match self.peek()? {
            b'-' => {
                self.i += 1;
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return None;
                }
                let v = self.unary()?;
                self.depth -= 1;
                Some(-v)
            }
            b'+' => {
                self.i += 1;
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return None;
                }
                let v = self.unary();
                self.depth -= 1;
                v
            }
            b'(' => {
                self.i += 1;
                let v = self.expr()?;
                (self.peek()? == b')').then(|| {
                    self.i += 1;
                    v
                })
            }
            c if c.is_ascii_digit() || c == b'.' => {
                let start = self.i;
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.i += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.i]).ok()?;
                if s.matches('.').count() > 1 || s == "." {
                    return None;
                }
                crate::math::parse::decimal_to_rational(s)
            }
            _ => None,
        }
    }
}

impl Reward for CountdownReward {
    fn name(&self) -> &str {
        "countdown"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32> {
        let p = &self.params;
        Some(match self.verdict(sample, completion.text)? {
            Verdict::NoAnswer => p.no_answer_score,
            Verdict::Wrong => p.format_score,
            Verdict::Correct => p.correct_score,
        })
    }
}

pub(crate) fn build(
    params: &serde_json::Map<String, Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    let p: CountdownParams = parse_params("countdown", params)?;
    for (key, v) in [
        ("correct_score", p.correct_score),
        ("format_score", p.format_score),
        ("no_answer_score", p.no_answer_score),
    ] {
        if !v.is_finite() {
            return Err(bad_param("countdown", key, "must be a finite number"));
        }
    }
    Ok(Box::new(CountdownReward { params: p }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(nums: &[i64], target: i64, text: &str) -> Option<f32> {
        let s: Sample =
            serde_json::from_value(serde_json::json!({"nums": nums, "target": target})).ok()?;
        CountdownReward::default().score(&s, &Completion::new(text))
    }

    #[test]
    fn tinyzero_scores() {
        assert_eq!(
            score(
                &[93, 43, 1],
                51,
                "<think>..</think>\n<answer>(93-43)+1</answer>"
            ),
            Some(1.0)
        );
        assert_eq!(
            score(&[93, 43, 1], 51, "<answer>(93-43)+2</answer>"),
            Some(0.1)
        );
        assert_eq!(
            score(&[93, 43, 1], 51, "<answer>(93-43)</answer>"),
            Some(0.1)
        ); // 1 unused
        assert_eq!(
            score(&[93, 43, 1], 51, "<answer>93-43+1 = 51</answer>"),
            Some(0.1)
        ); // '=' not allowed
        assert_eq!(score(&[93, 43, 1], 51, "no answer"), Some(0.0));
        assert_eq!(
            score(&[4, 2, 2], 1, "<answer>4/(2-2)*2</answer>"),
            Some(0.1)
        ); // division by zero
        assert_eq!(score(&[6, 4, 3], 8, "<answer>6*4/3</answer>"), Some(1.0));
        assert_eq!(score(&[7, 3, 2], 5, "<answer>7/3*2</answer>"), Some(0.1)); // 14/3 exactly
        assert_eq!(
            score(&[1, 2], 3, "<answer>1+2</answer><answer>2*1</answer>"),
            Some(0.1)
        ); // last answer
        assert_eq!(
            CountdownReward::default()
                .score(&Sample::new(), &Completion::new("<answer>1</answer>")),
            None
        );
    }

    #[test]
    fn at_most_once() {
        let r = CountdownReward {
            params: CountdownParams {
                use_numbers: NumberUse::AtMostOnce,
                ..Default::default()
            },
        };
        let s: Sample =
            serde_json::from_value(serde_json::json!({"nums": [93, 43, 1], "target": 50})).unwrap();
        assert_eq!(
            r.score(&s, &Completion::new("<answer>93-43</answer>")),
            Some(1.0)
        );
        assert_eq!(
            r.score(&s, &Completion::new("<answer>93-43+1-1</answer>")),
            Some(0.1)
        );
    }
}
