//! sobre-model: the Mixture-of-Experts transformer sobre trains.
//!
//! This crate is the model and nothing else: its configuration (`config.json` as transformers
//! writes it for Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, Granite-MoE, the dense Qwen/Llama/Mistral
//! families and DeepSeek-V2/V3 with Multi-head Latent Attention, plus DeepSeek's routing options
//! as sobre keys; see README.md for what each family reads and what is refused), its layers and
//! forward pass (prefill, cached decode and training through one function), its host inference
//! engine, its router and balance statistics, its seeded
//! initialisation, reading and writing HF model directories, and LoRA adapters in PEFT's layout
//! (`lora`). Sampling lives in
//! `sobre-rollout`, losses and optimisers in `sobre-train`, tokenizers in `sobre-data`.
//!
//! Tensors are burn 0.22 tensors on whatever `Device` the caller picks; the default CPU backend
//! is burn's pure-Rust `flex`.

pub mod checkpoint;
pub mod config;
pub mod fused;
pub mod generation;
pub mod infer;
pub mod io;
pub mod lora;
mod matmul;
pub mod model;
pub mod rope;

use std::path::{Path, PathBuf};

pub use config::{Family, MlaConfig, ModelConfig, ScoringFunc, TopkMethod};
pub use generation::GenerationConfig;
pub use infer::{HostKvCache, InferenceModel, LatentForm};
pub use io::{init_model, load_model, load_model_with_config, save_model};
pub use lora::{LoraConfig, LoraInit};
pub use matmul::square_gemm_seconds;
pub use model::{
    AuxParts, Batch, ForwardOptions, GroupLimit, GroupScore, Kernels, KvCache, LogitsMode,
    LoraAdapter, ModelOutput, MoeImpl, MoeModel, RouteTotals, RouterStats, auto_chunk_rows,
    token_logprobs,
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
    /// A device this build cannot use, or a second choice of device.
    #[error("{0}")]
    Device(String),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

static DEVICE: std::sync::OnceLock<burn::prelude::Device> = std::sync::OnceLock::new();

/// The device sobre computes on: burn's pure-Rust `flex` CPU backend, unless the program chose
/// another with [`use_device`] before any work (the CLI's `--device`).
pub fn default_device() -> burn::prelude::Device {
    DEVICE
        .get()
        .cloned()
        .unwrap_or_else(burn::prelude::Device::flex)
}

/// The backends this build can run on, by the names [`device_by_name`] takes.
pub fn available_devices() -> Vec<&'static str> {
    let mut names = vec!["cpu"];
    if cfg!(feature = "tch") {
        names.extend(["tch", "tch-cuda"]);
    }
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    names
}

/// A device by name: `cpu` (or `flex`, the default build's only backend); with the cargo
/// feature `tch`, `tch` (libtorch on the CPU) and `tch-cuda[:N]`; with `cuda`, `cuda[:N]`
/// (burn's CubeCL CUDA backend). A name this build lacks is an error that says which feature
/// it needs.
pub fn device_by_name(name: &str) -> Result<burn::prelude::Device, ModelError> {
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| {
                ModelError::Device(format!("`{name}`: the device index `{i}` is not a number"))
            })?;
            (k, i)
        }
        None => (name, 0),
    };
    let missing = |feature: &str| {
        ModelError::Device(format!(
            "device `{name}` needs sobre built with the cargo feature `{feature}` (not in the \
             default build); this build has: {}",
            available_devices().join(", ")
        ))
    };
    // Which of these are used depends on the features built in.
    let _ = (index, &missing);
    if name.contains(':') && !matches!(kind, "tch-cuda" | "cuda") {
        return Err(ModelError::Device(format!(
            "`{name}`: only tch-cuda and cuda take a device index (`cuda:1`)"
        )));
    }
    match kind {
        "cpu" | "flex" => Ok(burn::prelude::Device::flex()),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        // burn 0.22 deprecates burn-tch; the issue asks for it as a baseline
        "tch" => Ok(burn::prelude::Device::libtorch()),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        "tch-cuda" => Ok(burn::prelude::Device::libtorch_cuda(index)),
        #[cfg(not(feature = "tch"))]
        "tch" | "tch-cuda" => Err(missing("tch")),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(burn::prelude::Device::cuda(index)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(missing("cuda")),
        other => Err(ModelError::Device(format!(
            "unknown device `{other}`; this build has: {}",
            available_devices().join(", ")
        ))),
    }
}

/// Makes `device` the one [`default_device`] returns for the rest of the process. Call it once,
/// before any work; a second call with another device is an error (tensors already made would
/// live on the first).
pub fn use_device(device: burn::prelude::Device) -> Result<(), ModelError> {
    if !fused::available(&device) {
        open_device(&device)?;
    }
    let chosen = DEVICE.get_or_init(|| device.clone());
    if *chosen != device {
        return Err(ModelError::Device(format!(
            "the device is already {chosen:?}; it is chosen once per process"
        )));
    }
    Ok(())
}

/// Runs one tiny op on `device`, so that a backend that cannot start (no GPU, no CUDA driver,
/// no libtorch) is a clear error now rather than a panic at the first real op: cubecl and
/// libtorch open their device lazily and panic when they cannot (cudarc: "Unable to
/// dynamically load the \"cuda\" shared library").
fn open_device(device: &burn::prelude::Device) -> Result<(), ModelError> {
    use std::sync::{Arc, Mutex};
    let message: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = message.clone();
    let previous = std::panic::take_hook();
    // Quiet while probing: the backend's panics (on its own threads too) become the error.
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".into());
        if let Ok(mut m) = seen.lock() {
            m.push(text);
        }
    }));
    let probe = device.clone();
    let ran = std::panic::catch_unwind(move || {
        burn::prelude::Tensor::<1>::zeros([1], &probe)
            .try_into_vec_as::<f32>()
            .map_err(|e| format!("{e:?}"))
    });
    std::panic::set_hook(previous);
    let why = match ran {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => message
            .lock()
            .map(|m| m.first().cloned().unwrap_or_default())
            .unwrap_or_default(),
    };
    Err(ModelError::Device(format!(
        "cannot open device {device:?}: {why}"
    )))
}
