//! sobre-model: the Mixture-of-Experts transformer sobre trains.
//!
//! This crate is the model and nothing else: its configuration (`config.json` as transformers
//! writes it for Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE, plus DeepSeek's routing options as
//! sobre keys; see README.md for what each family reads and what is refused), its layers and forward pass (prefill, cached decode
//! and training through one function), its router and balance statistics, its seeded
//! initialisation, and reading and writing HF model directories. Sampling lives in
//! `sobre-rollout`, losses and optimisers in `sobre-train`, tokenizers in `sobre-data`.
//!
//! Tensors are burn 0.22 tensors on whatever `Device` the caller picks; the default CPU backend
//! is burn's pure-Rust `flex`.

pub mod config;
pub mod generation;
pub mod io;
pub mod model;

use std::path::{Path, PathBuf};

pub use config::{Family, ModelConfig, ScoringFunc, TopkMethod};
pub use generation::GenerationConfig;
pub use io::{init_model, load_model, load_model_with_config, save_model};
pub use model::{
    Batch, ForwardOptions, GroupLimit, GroupScore, KvCache, LogitsMode, ModelOutput, MoeImpl,
    MoeModel, RouterStats,
};

/// Everything that can go wrong reading or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A `config.json` (or preset) that cannot be used, with the key and what was expected.
    #[error("{origin}: {msg}")]
    Config { origin: String, msg: String },
    /// A weights file that cannot be read.
    #[error("{}: {msg}", file.display())]
    Weights { file: PathBuf, msg: String },
    /// Tensors missing, unexpected or of the wrong shape: all of them, one per line.
    #[error("{}: the checkpoint does not match the config:\n  {}", dir.display(), problems.join("\n  "))]
    Mismatch { dir: PathBuf, problems: Vec<String> },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The CPU device sobre uses by default: burn's pure-Rust `flex` backend.
pub fn default_device() -> burn::prelude::Device {
    burn::prelude::Device::flex()
}
