//! Countdown, as TinyZero trains it: given 3–4 numbers and a target, write an equation with
//! `+ - * /` that uses each number exactly once and equals the target.
//!
//! Generation: draw how many numbers and the numbers, list every target in range that the
//! solver can reach, and pick one uniformly; so every problem is solvable by construction.
//! The solver keeps to what the Countdown game allows on paper: intermediate results are
//! positive integers (subtraction takes the smaller from the larger, division only when exact).
//! Checkers such as TinyZero's accept any expression that evaluates to the target, so this
//! only restricts which targets are *offered*, never which answers count.
//!
//! Demonstration format (short, for small models with 64–128 token completions):
//!
//! ```text
//! <think>
//! 15 + 3 = 18, 18 - 7 = 11
//! </think>
//! <answer>
//! (15 + 3) - 7
//! </answer>
//! ```
//!
//! The reasoning is the solver's steps in order, `a op b = c` separated by `, `; the answer is
//! one expression over the original numbers where every compound operand is parenthesised.
//!
//! With `demo = "search"` the reasoning is a search trace instead (Stream-of-Search style): up
//! to `max_misses` tries that end away from the target, one per line, then the solver's path:
//!
//! ```text
//! <think>
//! 15 + 7 = 22, 22 - 3 = 19
//! 15 - 7 = 8, 8 + 3 = 11
//! </think>
//! ```
//!
//! Why: when every demonstrated path ends on the target, a small model learns to write the
//! target as the last result whatever the arithmetic ("8 * 4 = 35, 15 + 35 = 47"), so its
//! reasoning never informs its answer. Misses show results that are *not* the target, which
//! the model can only reproduce by computing them, and a pattern (try, compare, try again)
//! whose success a verifier rewards. The misses of a problem are drawn from a random source
//! seeded by its key, so a problem's trace is the same in every run.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use sha2::{Digest, Sha256};

use super::{Problem, Split, TaskError, TaskRng, collect, r1_completion};
use crate::dataset::{Prompt, Sample};

/// Options of the countdown generator. Defaults follow TinyZero's Countdown-Tasks-3to4
/// (3–4 numbers in 1..=99, targets in 1..=99).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CountdownConfig {
    /// Fewest numbers in a problem (≥ 2).
    pub min_count: usize,
    /// Most numbers in a problem (≤ 6; the solver enumerates every expression).
    pub max_count: usize,
    /// Smallest number (≥ 1).
    pub min_number: i64,
    pub max_number: i64,
    /// Smallest target (≥ 1).
    pub min_target: i64,
    pub max_target: i64,
    /// How the question is worded: `tinyzero` (default) or `short`.
    pub question: QuestionStyle,
    /// What a demonstration's `<think>` holds: `solution` (default) or `search`.
    pub demo: DemoStyle,
    /// With `demo = "search"`: the most missed tries before the solution (each problem draws
    /// 0..=max_misses uniformly).
    pub max_misses: usize,
    /// Demonstrations compute each step with the inline calculator tool (`[tools] format =
    /// "inline"` with its default markers): `<calc>15 + 3</calc><result>18</result>` where the
    /// plain form writes `15 + 3 = 18`. In a rollout the tool inserts the `<result>` part.
    pub calculator: bool,
}

/// What a countdown demonstration's reasoning shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DemoStyle {
    /// The solver's steps to the target: `15 + 3 = 18, 18 - 7 = 11`.
    #[default]
    Solution,
    /// A search trace: random complete tries that miss the target, one per line, then the
    /// solver's steps (see the module docs).
    Search,
}

/// The wording of a countdown question.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuestionStyle {
    /// TinyZero's `make_prefix` text (~60 words, with the tag instructions).
    #[default]
    TinyZero,
    /// `Using the numbers [3, 7, 15], make 11.` For models trained from scratch, where the
    /// format is taught by demonstrations rather than instructions and every prompt token costs
    /// (a short prompt is ~4x cheaper to train on than TinyZero's with the R1-Zero template).
    Short,
}

impl Default for CountdownConfig {
    fn default() -> Self {
        CountdownConfig {
            min_count: 3,
            max_count: 4,
            min_number: 1,
            max_number: 99,
            min_target: 1,
            max_target: 99,
            question: QuestionStyle::TinyZero,
            demo: DemoStyle::Solution,
            max_misses: 2,
            calculator: false,
        }
    }
}

impl CountdownConfig {
    pub fn validate(&self) -> Result<(), TaskError> {
        let bad = |message: String| {
            Err(TaskError::Config {
                task: "countdown",
                message,
            })
        };
        if self.min_count < 2 || self.max_count > 6 || self.min_count > self.max_count {
            return bad(format!(
                "count range {}..={} must lie within 2..=6 and not be empty",
                self.min_count, self.max_count
            ));
        }
        if self.min_number < 1 || self.min_number > self.max_number || self.max_number > 1_000_000 {
            return bad(format!(
                "number range {}..={} must lie within 1..=1000000 and not be empty",
                self.min_number, self.max_number
            ));
        }
        if self.min_target < 1 || self.min_target > self.max_target {
            return bad(format!(
                "target range {}..={} must start at 1 or more and not be empty",
                self.min_target, self.max_target
            ));
        }
        if self.max_misses > 8 {
            return bad(format!(
                "max_misses = {} is more than 8; every miss costs a line of completion",
                self.max_misses
            ));
        }
        Ok(())
    }
}

/// One countdown problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountdownProblem {
    /// The numbers in the order the prompt lists them.
    pub nums: Vec<i64>,
    pub target: i64,
    pub style: QuestionStyle,
    /// The demonstration style and, for `Search`, the most misses.
    pub demo: DemoStyle,
    pub max_misses: usize,
    /// Steps written as calculator calls (see [`CountdownConfig::calculator`]).
    pub calculator: bool,
}

/// One solver step: `a op b = result`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub a: i64,
    pub op: char,
    pub b: i64,
    pub result: i64,
}

/// A solution: the steps in order and the equivalent expression over the original numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Solution {
    pub steps: Vec<Step>,
    pub expression: String,
}

/// Steps as a demonstration writes them: `15 + 3 = 18, 18 - 7 = 11`, or with the calculator
/// `<calc>15 + 3</calc><result>18</result>, <calc>18 - 7</calc><result>11</result>`.
fn write_steps(steps: &[Step], calculator: bool) -> String {
    steps
        .iter()
        .map(|s| {
            if calculator {
                format!(
                    "<calc>{} {} {}</calc><result>{}</result>",
                    s.a, s.op, s.b, s.result
                )
            } else {
                format!("{} {} {} = {}", s.a, s.op, s.b, s.result)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Solution {
    /// The steps as the demonstration writes them: `15 + 3 = 18, 18 - 7 = 11`.
    pub fn reasoning(&self) -> String {
        write_steps(&self.steps, false)
    }

    /// The full R1-format demonstration.
    pub fn demonstration(&self) -> String {
        r1_completion(&self.reasoning(), &self.expression)
    }
}

impl CountdownProblem {
    /// A problem worded TinyZero's way.
    pub fn new(nums: Vec<i64>, target: i64) -> Self {
        CountdownProblem {
            nums,
            target,
            style: QuestionStyle::TinyZero,
            demo: DemoStyle::Solution,
            max_misses: 0,
            calculator: false,
        }
    }

    /// The demonstration in the problem's [`DemoStyle`], if the target is reachable.
    pub fn demonstration(&self) -> Option<String> {
        let solution = self.solve()?;
        let calc = self.calculator;
        if self.demo == DemoStyle::Solution {
            let reasoning = write_steps(&solution.steps, calc);
            return Some(r1_completion(&reasoning, &solution.expression));
        }
        let mut lines: Vec<String> = self
            .misses(&solution)
            .iter()
            .map(|m| write_steps(m, calc))
            .collect();
        lines.push(write_steps(&solution.steps, calc));
        Some(r1_completion(&lines.join("\n"), &solution.expression))
    }

    /// The missed tries of a search trace: 0..=max_misses distinct random complete reductions
    /// (each step a random pair and a random operation the solver allows) whose result is not
    /// the target, none equal to the solver's path. Seeded by the problem's key.
    fn misses(&self, solution: &Solution) -> Vec<Vec<Step>> {
        let digest = Sha256::digest(self.key().as_bytes());
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest[..8]);
        let mut rng = TaskRng::new(u64::from_le_bytes(seed), Split::Train);
        let want = rng.range(0, self.max_misses as i64) as usize;
        let mut out: Vec<Vec<Step>> = Vec::with_capacity(want);
        // A few problems have almost every reduction on the target; give up rather than loop.
        for _ in 0..32 * (want + 1) {
            if out.len() == want {
                break;
            }
            let Some((steps, value)) = random_reduction(&self.nums, &mut rng) else {
                continue;
            };
            if value != self.target && steps != solution.steps && !out.contains(&steps) {
                out.push(steps);
            }
        }
        out
    }

    /// The question text in the problem's [`QuestionStyle`] (TinyZero's is its `make_prefix`
    /// without the surrounding template).
    pub fn question(&self) -> String {
        let nums: Vec<String> = self.nums.iter().map(i64::to_string).collect();
        if self.style == QuestionStyle::Short {
            return format!(
                "Using the numbers [{}], make {}.",
                nums.join(", "),
                self.target
            );
        }
        format!(
            "Using the numbers [{}], create an equation that equals {}. You can use basic \
             arithmetic operations (+, -, *, /) and each number can only be used once. Show your \
             work in <think> </think> tags. And return the final answer in <answer> </answer> \
             tags, for example <answer> (1 + 2) / 3 </answer>.",
            nums.join(", "),
            self.target
        )
    }

    /// The first solution in the solver's fixed search order, if the target is reachable.
    pub fn solve(&self) -> Option<Solution> {
        let items: Vec<Item> = self
            .nums
            .iter()
            .map(|&n| Item {
                value: n,
                expr: n.to_string(),
                atom: true,
            })
            .collect();
        let mut steps = Vec::new();
        search(&items, self.target, &mut steps)
    }
}

impl Problem for CountdownProblem {
    /// `countdown:<sorted numbers>:<target>`, e.g. `countdown:3,7,15:11`.
    fn key(&self) -> String {
        let mut sorted = self.nums.clone();
        sorted.sort_unstable();
        let nums: Vec<String> = sorted.iter().map(i64::to_string).collect();
        format!("countdown:{}:{}", nums.join(","), self.target)
    }

    fn to_sample(&self, with_demo: bool) -> Sample {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "nums".to_string(),
            Value::Array(self.nums.iter().map(|&n| Value::from(n)).collect()),
        );
        fields.insert("target".to_string(), Value::from(self.target));
        Sample {
            prompt: Prompt::Text(self.question()),
            answer: None,
            // Generated problems are solvable by construction; `solve` cannot miss.
            completion: if with_demo {
                self.demonstration()
            } else {
                None
            },
            fields,
        }
    }
}

/// The positive-integer results of combining `a` and `b` (any order), with the operator and
/// the operands in the order they are written: larger first for `-` and `/`.
fn combine(a: i64, b: i64) -> impl Iterator<Item = (i64, char, i64, i64)> {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    let add = a.checked_add(b).map(|r| (a, '+', b, r));
    let sub = (hi > lo).then(|| (hi, '-', lo, hi - lo));
    let mul = a.checked_mul(b).map(|r| (a, '*', b, r));
    let div = (lo > 0 && hi % lo == 0).then(|| (hi, '/', lo, hi / lo));
    [add, sub, mul, div].into_iter().flatten()
}

/// One complete reduction of `nums` by random steps: pick two items and one of the results
/// [`combine`] allows, replace them by it, until one value is left. Returns the steps and that
/// value, or `None` if a pair allows no operation (only on i64 overflow).
fn random_reduction(nums: &[i64], rng: &mut TaskRng) -> Option<(Vec<Step>, i64)> {
    let mut items = nums.to_vec();
    let mut steps = Vec::with_capacity(nums.len().saturating_sub(1));
    while items.len() > 1 {
        let i = rng.range(0, items.len() as i64 - 1) as usize;
        let mut j = rng.range(0, items.len() as i64 - 2) as usize;
        if j >= i {
            j += 1;
        }
        let options: Vec<_> = combine(items[i], items[j]).collect();
        if options.is_empty() {
            return None;
        }
        let (a, op, b, result) = options[rng.range(0, options.len() as i64 - 1) as usize];
        items.remove(i.max(j));
        items.remove(i.min(j));
        items.push(result);
        steps.push(Step { a, op, b, result });
    }
    Some((steps, *items.first()?))
}

/// Every value reachable using all of `nums` exactly once.
pub fn reachable(nums: &[i64]) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    reach(nums, &mut out);
    out
}

fn reach(nums: &[i64], out: &mut BTreeSet<i64>) {
    if nums.len() == 1 {
        out.insert(nums[0]);
        return;
    }
    for i in 0..nums.len() {
        for j in (i + 1)..nums.len() {
            let (a, b) = (nums[i], nums[j]);
            for (_, _, _, r) in combine(a, b) {
                let mut next: Vec<i64> = Vec::with_capacity(nums.len() - 1);
                next.extend(
                    nums.iter()
                        .enumerate()
                        .filter(|(k, _)| *k != i && *k != j)
                        .map(|(_, v)| *v),
                );
                next.push(r);
                reach(&next, out);
            }
        }
    }
}

#[derive(Clone)]
struct Item {
    value: i64,
    expr: String,
    atom: bool,
}

fn wrap(item: &Item) -> String {
    if item.atom {
        item.expr.clone()
    } else {
        format!("({})", item.expr)
    }
}

fn search(items: &[Item], target: i64, steps: &mut Vec<Step>) -> Option<Solution> {
    if items.len() == 1 {
        return (items[0].value == target).then(|| Solution {
            steps: steps.clone(),
            expression: items[0].expr.clone(),
        });
    }
    for i in 0..items.len() {
        for j in (i + 1)..items.len() {
            for (x, op, y, r) in combine(items[i].value, items[j].value) {
                // Write the operands in the order `combine` chose: as given for + and *,
                // larger first for - and / (`combine` puts the larger first on a tie too).
                let (left, right) = if op == '+' || op == '*' || items[i].value >= items[j].value {
                    (&items[i], &items[j])
                } else {
                    (&items[j], &items[i])
                };
                let combined = Item {
                    value: r,
                    expr: format!("{} {op} {}", wrap(left), wrap(right)),
                    atom: false,
                };
                let mut next: Vec<Item> = items
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| *k != i && *k != j)
                    .map(|(_, it)| it.clone())
                    .collect();
                next.push(combined);
                steps.push(Step {
                    a: x,
                    op,
                    b: y,
                    result: r,
                });
                if let Some(sol) = search(&next, target, steps) {
                    return Some(sol);
                }
                steps.pop();
            }
        }
    }
    None
}

fn draw(cfg: &CountdownConfig, rng: &mut TaskRng) -> Option<CountdownProblem> {
    let count = rng.range(cfg.min_count as i64, cfg.max_count as i64) as usize;
    let nums: Vec<i64> = (0..count)
        .map(|_| rng.range(cfg.min_number, cfg.max_number))
        .collect();
    let targets: Vec<i64> = reachable(&nums)
        .range(cfg.min_target..=cfg.max_target)
        .copied()
        .collect();
    if targets.is_empty() {
        return None;
    }
    let target = targets[rng.range(0, targets.len() as i64 - 1) as usize];
    Some(CountdownProblem {
        nums,
        target,
        style: cfg.question,
        demo: cfg.demo,
        max_misses: cfg.max_misses,
        calculator: cfg.calculator,
    })
}

/// `n` distinct countdown problems of `split` from `seed`.
pub fn generate(
    cfg: &CountdownConfig,
    split: Split,
    n: usize,
    seed: u64,
) -> Result<Vec<CountdownProblem>, TaskError> {
    cfg.validate()?;
    collect("countdown", split, n, seed, |rng| draw(cfg, rng))
}
