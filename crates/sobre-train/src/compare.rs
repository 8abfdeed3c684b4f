//! The end-of-run comparison (`[eval] at_end`): the SFT checkpoint, the final checkpoint and
//! any named baselines (`[eval.compare]`, e.g. the SFT-only control run) evaluated on the same
//! held-out problems with the same sampling, printed as one table and kept as
//! `final_eval.json` in the run directory.
//!
//! It answers the question a sceptical reader of an RL run asks — did RL add anything over the
//! cold start, and over spending the same time on more imitation? — without a second command.
//! A baseline that is not there (its run not done yet) is a row that says so, not an error: the
//! hours of training before it are not lost to a missing directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sobre_data::{Template, Tokenizer};
use sobre_model::MoeModel;
use sobre_reward::CombinedReward;

use crate::data::align_token_ids;
use crate::eval::{EvalOptions, EvalReport, evaluate, heldout_problems};
use crate::{Config, TrainError, checkpoint};

/// File the comparison is written to, in the run directory.
pub const FINAL_EVAL_FILE: &str = "final_eval.json";

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    /// `sft`, `final`, or a `[eval.compare]` label.
    pub label: String,
    /// The model directory evaluated (or the path that was looked for).
    pub model: PathBuf,
    /// The figures; `None` when the model could not be evaluated (see `note`).
    pub report: Option<EvalReport>,
    pub note: Option<String>,
}

/// The comparison and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Where the problems came from, e.g. `300 held-out countdown problems (seed 1)`.
    pub problems: String,
    pub rows: Vec<ComparisonRow>,
}

/// The model directory `dir` names: `dir` itself when it holds `config.json`, else the newest
/// complete checkpoint of the run directory `dir`.
pub fn resolve_model_dir(dir: &Path) -> Result<PathBuf, TrainError> {
    if dir.join("config.json").exists() {
        return Ok(dir.to_path_buf());
    }
    if let Some((ckpt, _)) = checkpoint::latest(&dir.join("checkpoints")) {
        return Ok(ckpt);
    }
    if !dir.exists() {
        return Err(TrainError::Checkpoint(format!(
            "{} does not exist",
            dir.display()
        )));
    }
    Err(TrainError::Checkpoint(format!(
        "{} is neither a model directory (no config.json) nor a run directory with complete checkpoints",
        dir.display()
    )))
}

/// A model and its tokenizer for evaluation, on the inference device: the model of `dir` (see
/// [`resolve_model_dir`]), the tokenizer of `tokenizer_dir` (default: the model directory), and
/// the eos ids of the tokenizer, `config.json` and `generation_config.json`, so generation stops
/// where training's did.
pub fn load_for_eval(
    dir: &Path,
    tokenizer_dir: Option<&Path>,
) -> Result<(MoeModel, Tokenizer, PathBuf), TrainError> {
    let dir = resolve_model_dir(dir)?;
    let tok_dir = tokenizer_dir.unwrap_or(&dir);
    if !tok_dir.join("tokenizer.json").exists() {
        return Err(TrainError::Data(format!(
            "{} has no tokenizer.json: evaluation needs the tokenizer the model was trained with \
             (a checkpoint directory has one; a run directory keeps it in tokenizer/)",
            tok_dir.display()
        )));
    }
    let tok = Tokenizer::from_dir(tok_dir)
        .map_err(|e| TrainError::Data(format!("tokenizer in {}: {e}", tok_dir.display())))?;
    let device = sobre_model::default_device();
    let mut model = sobre_model::load_model(&dir, &device)?;
    let generation = sobre_model::GenerationConfig::from_dir(&dir)?;
    align_token_ids(&mut model.config, tok.special(), generation.as_ref());
    if tok.vocab_size() > model.config.vocab_size {
        return Err(TrainError::Data(format!(
            "the tokenizer in {} has {} tokens but the model in {} only {}: they do not belong together",
            tok_dir.display(),
            tok.vocab_size(),
            dir.display(),
            model.config.vocab_size
        )));
    }
    Ok((model, tok, dir))
}

/// The options of the end-of-run comparison: `[eval]`'s, with `samples_per_problem` samples.
pub fn comparison_options(cfg: &Config, correct_reward: Option<String>) -> EvalOptions {
    let mut opts = EvalOptions::from_config(cfg);
    opts.samples = cfg.eval.samples_per_problem;
    if opts.correct_reward.is_none() {
        opts.correct_reward = correct_reward;
    }
    opts
}

/// Evaluate each `(label, dir)` on `eval.n` held-out problems of `cfg`. A directory that cannot
/// be loaded gives a row with a note instead of figures.
pub fn compare(
    cfg: &Config,
    contenders: &[(String, PathBuf)],
    template: &Template,
    rewards: &CombinedReward,
    opts: &EvalOptions,
) -> Result<Comparison, TrainError> {
    let problems = heldout_problems(cfg, None, None)?;
    let mut rows = Vec::with_capacity(contenders.len());
    for (label, dir) in contenders {
        let row = match load_for_eval(dir, None) {
            Ok((model, tok, resolved)) => ComparisonRow {
                label: label.clone(),
                model: resolved,
                report: Some(evaluate(&model, &tok, &problems, template, rewards, opts)?.report),
                note: None,
            },
            Err(e) => ComparisonRow {
                label: label.clone(),
                model: dir.clone(),
                report: None,
                note: Some(e.to_string()),
            },
        };
        rows.push(row);
    }
    let task = cfg.data.task.as_deref().unwrap_or("eval_dataset");
    Ok(Comparison {
        problems: format!(
            "{} held-out {task} problems (data seed {}), {} samples each at temperature {}",
            problems.len(),
            cfg.data.seed.unwrap_or(cfg.run.seed),
            opts.samples,
            opts.temperature
        ),
        rows,
    })
}

impl Comparison {
    /// The table as printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = format!("held-out evaluation: {}\n", self.problems);
        out.push_str(&format!(
            "{:<10} {:>7} {:>7} {:>7} {:>7} {:>7}  model\n",
            "", "pass@1", "pass@k", "maj@k", "format", "length"
        ));
        for r in &self.rows {
            match &r.report {
                Some(e) => out.push_str(&format!(
                    "{:<10} {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>7.1}  {}\n",
                    r.label,
                    100.0 * e.pass_at_1,
                    100.0 * e.pass_at_k,
                    100.0 * e.maj_at_k,
                    100.0 * e.format_rate,
                    e.mean_length,
                    r.model.display()
                )),
                None => out.push_str(&format!(
                    "{:<10} {:>7} {:>7} {:>7} {:>7} {:>7}  {}\n",
                    r.label,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    r.note.as_deref().unwrap_or("not evaluated")
                )),
            }
        }
        out
    }

    /// Write `final_eval.json` into `run_dir` (atomically: a reader never sees half a file).
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf, TrainError> {
        let path = run_dir.join(FINAL_EVAL_FILE);
        let tmp = run_dir.join(format!("{FINAL_EVAL_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TrainError::Data(format!("final_eval.json: {e}")))?;
        std::fs::write(&tmp, text + "\n").map_err(|e| TrainError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))?;
        Ok(path)
    }
}
