//! Checkpoints: `checkpoints/<name>/` = an HF model directory (config.json, model.safetensors,
//! generation_config.json, tokenizer.json, tokenizer_config.json) + `optimizer.safetensors` +
//! `trainer_state.json`, written into a temporary sibling and renamed into place, so a process
//! killed at any moment leaves the previous checkpoint intact. `trainer_state.json` is written
//! last: a directory without it is incomplete and ignored on resume.
//!
//! Names: `step-NNNNNN` (GRPO, after step N), `sft` (end of the SFT stage), `sft-NNNNNN`
//! (inside the SFT stage, on Ctrl-C or `save_every`). Resume takes the newest by (stage, step).
//!
//! With `[lora]` a checkpoint holds the adapters instead of the model, as PEFT's
//! `save_pretrained` writes them (`adapter_config.json`, `adapter_model.safetensors`, whose
//! `base_model_name_or_path` names the frozen base), beside the same generation config,
//! tokenizer, optimizer state and trainer state; `sobre_model::load_model` reads such a
//! directory as base + adapters.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sobre_data::Tokenizer;
use sobre_model::{GenerationConfig, MoeModel};

use crate::TrainError;
use crate::optim::AdamW;

/// The stage a checkpoint was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Inside SFT.
    Sft,
    /// SFT finished; GRPO not started.
    SftDone,
    Grpo,
}

/// What besides weights and moments a resumed run needs to continue bit-for-bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    pub stage: Stage,
    /// Completed steps of the stage (SFT steps, or GRPO steps).
    pub step: usize,
    /// Completed SFT steps.
    pub sft_steps: usize,
    /// Data cursors: positions in the seeded sample orders (see `data::Order`).
    pub prompt_position: u64,
    pub demo_position: u64,
    /// The run seed every random stream is derived from, with (stage, step) counters.
    pub seed: u64,
    /// Non-finite steps in a row when saved.
    pub consecutive_nonfinite: usize,
    /// Seconds of training so far.
    pub elapsed_seconds: f64,
    /// The metrics line of the last step (for the resume message).
    pub last_metrics: Option<serde_json::Value>,
    /// What the run cost up to this checkpoint, so a resumed run reports the whole run's cost
    /// (absent from checkpoints written before sobre recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::cost::RunCost>,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The checkpoint directory name for a state.
pub fn name_for(state: &TrainerState) -> String {
    match state.stage {
        Stage::Sft => format!("sft-{:06}", state.step),
        Stage::SftDone => "sft".to_string(),
        Stage::Grpo => format!("step-{:06}", state.step),
    }
}

/// What a LoRA run saves its adapters with: their settings and the base model's directory
/// (written as `base_model_name_or_path`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRun {
    pub config: sobre_model::LoraConfig,
    pub base: String,
}

/// Write a checkpoint atomically into `root/<name>`; returns its path. Its
/// `generation_config.json` has the model's token ids and the sampling defaults of `generation`
/// (those of the model directory the run started from, if any). With `lora` the model's
/// adapters are written (PEFT's layout) instead of its weights.
pub fn save(
    root: &Path,
    model: &MoeModel,
    opt: &AdamW,
    tok: &Tokenizer,
    generation: &GenerationConfig,
    state: &TrainerState,
    lora: Option<&LoraRun>,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
    let name = name_for(state);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    match lora {
        Some(l) => sobre_model::lora::save_adapter(model, &l.config, &l.base, &tmp)?,
        None => sobre_model::save_model(model, &tmp, None)?,
    }
    generation.with_token_ids_of(&model.config).write(&tmp)?;
    tok.save(&tmp)
        .map_err(|e| TrainError::Checkpoint(format!("tokenizer: {e}")))?;
    opt.save(&tmp.join(OPTIMIZER_FILE))?;
    let text =
        serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let sp = tmp.join(STATE_FILE);
    std::fs::write(&sp, text + "\n").map_err(|e| TrainError::io(&sp, e))?;
    sobre_model::io::replace_dir(&tmp, &dir)?;
    Ok(dir)
}

/// Read a checkpoint's trainer state (None when the directory is incomplete).
pub fn read_state(dir: &Path) -> Option<TrainerState> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Complete checkpoints under `root`, oldest first by (stage, step).
pub fn list(root: &Path) -> Vec<(PathBuf, TrainerState)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut out: Vec<(PathBuf, TrainerState)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .filter_map(|p| read_state(&p).map(|s| (p, s)))
        .collect();
    out.sort_by_key(|a| (a.1.stage, a.1.step));
    out
}

/// The newest complete checkpoint.
pub fn latest(root: &Path) -> Option<(PathBuf, TrainerState)> {
    list(root).pop()
}

/// Remove all but the newest `keep` checkpoints of `stage` (the `sft` stage-end one is never
/// removed: it is the GRPO reference model).
pub fn prune(root: &Path, stage: Stage, keep: usize) -> Result<(), TrainError> {
    let of_stage: Vec<PathBuf> = list(root)
        .into_iter()
        .filter(|(_, s)| s.stage == stage && stage != Stage::SftDone)
        .map(|(p, _)| p)
        .collect();
    let n = of_stage.len().saturating_sub(keep);
    for p in &of_stage[..n] {
        std::fs::remove_dir_all(p).map_err(|e| TrainError::io(p, e))?;
    }
    Ok(())
}

/// Remove partial directories a killed process left behind.
pub fn clean_partials(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && (name.contains(".partial-") || name.contains(".tmp-")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
