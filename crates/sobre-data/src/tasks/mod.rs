//! Task generators: problems with checkable answers, made deterministically from a seed.
//!
//! Determinism: problems come from `ChaCha8Rng::seed_from_u64(seed)` with the split as the
//! ChaCha stream number, drawn with a rejection sampler written here (so the numbers do not
//! depend on `rand`'s distribution code), and nothing written goes through a hash map or a
//! float. The same arguments give the same bytes on every machine.
//!
//! Train/eval disjointness: every problem has a canonical key (countdown: sorted numbers and
//! target; arithmetic: operands, commutative ones sorted, and operator; functions: family and
//! coefficients). The SHA-256 of the key
//! puts the problem in the eval split when its first 8 bytes, as a big-endian integer, are
//! ≡ 0 (mod 10) — a fixed tenth of the problem space — and in the train split otherwise.
//! A generator draws problems and keeps those of the split asked for, so a train set and an
//! eval set never share a problem whatever seeds and sizes made them. Within a split, repeated
//! keys are dropped.

pub mod arithmetic;
pub mod countdown;
pub mod functions;

use std::collections::BTreeSet;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataset::Sample;

pub use arithmetic::ArithmeticConfig;
pub use countdown::CountdownConfig;
pub use functions::FunctionsConfig;

/// Which side of the train/eval partition a problem is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    /// The split a canonical problem key belongs to (see the module docs).
    pub fn of_key(key: &str) -> Split {
        let digest = Sha256::digest(key.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        if u64::from_be_bytes(first) % 10 == 0 {
            Split::Eval
        } else {
            Split::Train
        }
    }

    fn stream(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Eval => 2,
        }
    }
}

/// A generator and its options; `task = "countdown"`, `"arithmetic"` or `"functions"` in TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum TaskConfig {
    Countdown(CountdownConfig),
    Arithmetic(ArithmeticConfig),
    Functions(FunctionsConfig),
}

/// Errors from task generation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("invalid {task} option: {message}")]
    Config { task: &'static str, message: String },
    #[error(
        "{task}: found only {found} distinct {split:?} problems of the {wanted} asked for after \
         {attempts} draws; widen the number or target ranges"
    )]
    Exhausted {
        task: &'static str,
        split: Split,
        wanted: usize,
        found: usize,
        attempts: u64,
    },
}

/// The seeded random source generators draw from.
pub struct TaskRng(ChaCha8Rng);

impl TaskRng {
    pub fn new(seed: u64, split: Split) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(split.stream());
        TaskRng(rng)
    }

    /// Uniform in `lo..=hi` (requires `lo <= hi`), by rejection so every value is equally
    /// likely and the result depends only on the ChaCha output words.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let n = (hi as i128 - lo as i128 + 1) as u128;
        if n > u64::MAX as u128 {
            return self.0.next_u64() as i64;
        }
        let n = n as u64;
        let reject = (u64::MAX % n + 1) % n; // 2^64 mod n
        loop {
            let x = self.0.next_u64();
            if reject == 0 || x <= u64::MAX - reject {
                return (lo as i128 + (x % n) as i128) as i64;
            }
        }
    }
}

/// A generated problem: its sample, and the canonical key used for splits and duplicates.
pub trait Problem {
    fn key(&self) -> String;
    fn to_sample(&self, with_demo: bool) -> Sample;
}

/// Draws problems with `draw` until `n` distinct ones of `split` are found.
pub(crate) fn collect<P: Problem>(
    task: &'static str,
    split: Split,
    n: usize,
    seed: u64,
    mut draw: impl FnMut(&mut TaskRng) -> Option<P>,
) -> Result<Vec<P>, TaskError> {
    let mut rng = TaskRng::new(seed, split);
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    // Enough draws for sparse eval splits (1 in 10) and retries; a small problem space
    // ends in an error rather than a hang.
    let max_attempts = 200 * n as u64 + 10_000;
    let mut attempts = 0;
    while out.len() < n {
        if attempts >= max_attempts {
            return Err(TaskError::Exhausted {
                task,
                split,
                wanted: n,
                found: out.len(),
                attempts,
            });
        }
        attempts += 1;
        let Some(problem) = draw(&mut rng) else {
            continue;
        };
        let key = problem.key();
        if Split::of_key(&key) == split && seen.insert(key) {
            out.push(problem);
        }
    }
    Ok(out)
}

/// Generates `n` samples of a task's `split` from `seed`; with `demos`, each sample carries a
/// solver-written R1-format `completion`. This is what `sobre data <task>` writes.
pub fn generate(
    task: &TaskConfig,
    split: Split,
    n: usize,
    seed: u64,
    demos: bool,
) -> Result<Vec<Sample>, TaskError> {
    match task {
        TaskConfig::Countdown(cfg) => Ok(countdown::generate(cfg, split, n, seed)?
            .iter()
            .map(|p| p.to_sample(demos))
            .collect()),
        TaskConfig::Arithmetic(cfg) => Ok(arithmetic::generate(cfg, split, n, seed)?
            .iter()
            .map(|p| p.to_sample(demos))
            .collect()),
        TaskConfig::Functions(cfg) => Ok(functions::generate(cfg, split, n, seed)?
            .iter()
            .map(|p| p.to_sample(demos))
            .collect()),
    }
}

/// The R1 format every demonstration uses, one line per part, as open-r1's strict format
/// reward expects: `<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>`.
pub fn r1_completion(reasoning: &str, answer: &str) -> String {
    format!("<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>")
}
