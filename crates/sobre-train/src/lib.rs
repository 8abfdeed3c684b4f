//! sobre-train: the trainer. One TOML config runs a pipeline — an optional SFT stage (cold
//! start, as DeepSeek-R1) then GRPO — and leaves a run directory with the resolved config,
//! per-step metrics, sample completions and atomic, exactly resumable checkpoints.
//!
//! The maths are small pure functions with hand-checked tests: [`advantages`] (group / batch /
//! no scaling), [`losses`] (grpo, bnpo, dr_grpo, dapo, gspo; clip-higher), [`kl`] (k1, k2, k3),
//! [`optim`] (AdamW without decay on norms and biases, warmup + constant/linear/cosine,
//! global-norm clipping). [`grpo`] and [`sft`] are the steps; [`pipeline`] is the run: stages,
//! checkpoints, resume, progress bar, Ctrl-C.
//!
//! Not here: the model ([`sobre_model`]), sampling ([`sobre_rollout`]), rewards
//! ([`sobre_reward`]), datasets, templates and tokenizers ([`sobre_data`]), argument parsing
//! (the `sobre` binary).
//!
//! ```ignore
//! use sobre_train::{Config, pipeline::{Pipeline, RunOptions}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (cfg, source) = Config::load("configs/smoke.toml".as_ref(), &["run.steps=2".into()])?;
//! let summary = Pipeline::new(cfg, source, RunOptions::default())?.run()?;
//! println!("{}", summary.run_dir.display());
//! # Ok(()) }
//! ```

pub mod advantages;
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod cost;
pub mod data;
pub mod dist;
pub mod distill;
pub mod eval;
pub mod grpo;
pub mod kl;
pub mod losses;
pub mod metrics;
pub mod optim;
/// Batch shards on threads: the rollout crate's helpers, shared by the trainer.
pub use sobre_rollout::parallel;
pub mod pipeline;
pub mod rejection;
pub mod score;
pub mod sft;
pub mod stages;
pub mod tensorboard;
pub mod tools;

use std::path::{Path, PathBuf};

pub use config::{Config, ConfigError};

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model: {0}")]
    Model(#[from] sobre_model::ModelError),
    #[error("data: {0}")]
    Data(String),
    #[error("rollout: {0}")]
    Rollout(#[from] sobre_rollout::RolloutError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Too many non-finite losses or gradients in a row.
    #[error("{0}")]
    NonFinite(String),
    /// A reward could not score (a verifier program that keeps failing, …).
    #[error("reward: {0}")]
    Reward(String),
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
