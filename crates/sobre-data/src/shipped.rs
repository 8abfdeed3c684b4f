//! The datasets shipped in `datasets/`: how each file is generated. `datasets/README.md` lists
//! the same commands with their SHA-256, and a test regenerates every file through
//! [`crate::tasks::generate`] (the function `sobre data` calls) and compares.

use crate::tasks::{ArithmeticConfig, CountdownConfig, Split, TaskConfig};

/// One shipped file and the generator call that makes it.
#[derive(Clone, Debug)]
pub struct ShippedFile {
    /// Path relative to `datasets/`.
    pub path: &'static str,
    pub task: TaskConfig,
    pub split: Split,
    pub n: usize,
    pub seed: u64,
    pub demos: bool,
    /// The `sobre` command that writes it (run from the repository root).
    pub command: &'static str,
}

/// The countdown setting of the CPU demo: 3 numbers in 1..=20, targets in 1..=99.
pub fn demo_countdown() -> CountdownConfig {
    CountdownConfig {
        min_count: 3,
        max_count: 3,
        min_number: 1,
        max_number: 20,
        min_target: 1,
        max_target: 99,
        ..CountdownConfig::default()
    }
}

/// Every shipped file.
pub fn shipped_files() -> Vec<ShippedFile> {
    let cd = TaskConfig::Countdown(demo_countdown());
    let ar = TaskConfig::Arithmetic(ArithmeticConfig::default());
    vec![
        ShippedFile {
            path: "countdown/train.jsonl",
            task: cd.clone(),
            split: Split::Train,
            n: 2000,
            seed: 1,
            demos: false,
            command: "sobre data countdown --n 2000 --seed 1 --split train --min-count 3 --max-count 3 --max-number 20 --out datasets/countdown/train.jsonl",
        },
        ShippedFile {
            path: "countdown/eval.jsonl",
            task: cd.clone(),
            split: Split::Eval,
            n: 500,
            seed: 2,
            demos: false,
            command: "sobre data countdown --n 500 --seed 2 --split eval --min-count 3 --max-count 3 --max-number 20 --out datasets/countdown/eval.jsonl",
        },
        ShippedFile {
            path: "countdown/sft_demos.jsonl",
            task: cd,
            split: Split::Train,
            n: 1000,
            seed: 3,
            demos: true,
            command: "sobre data countdown --n 1000 --seed 3 --split train --min-count 3 --max-count 3 --max-number 20 --demos --out datasets/countdown/sft_demos.jsonl",
        },
        ShippedFile {
            path: "arithmetic/train.jsonl",
            task: ar.clone(),
            split: Split::Train,
            n: 2000,
            seed: 1,
            demos: false,
            command: "sobre data arithmetic --n 2000 --seed 1 --split train --out datasets/arithmetic/train.jsonl",
        },
        ShippedFile {
            path: "arithmetic/eval.jsonl",
            task: ar,
            split: Split::Eval,
            n: 500,
            seed: 2,
            demos: false,
            command: "sobre data arithmetic --n 500 --seed 2 --split eval --out datasets/arithmetic/eval.jsonl",
        },
    ]
}

impl ShippedFile {
    /// The file's exact bytes.
    pub fn generate(&self) -> Result<String, crate::tasks::TaskError> {
        let samples =
            crate::tasks::generate(&self.task, self.split, self.n, self.seed, self.demos)?;
        Ok(crate::dataset::to_jsonl(&samples))
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
