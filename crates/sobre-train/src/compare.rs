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

use crate::cost::{RunCost, cost_per_point, summary_lines};
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
    /// What the run cost (wall and CPU time, tokens, FLOPs, energy), when the run recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<RunCost>,
}

/// The held-out pass@1 a run's final checkpoint gained over a baseline, in percentage points.
#[derive(Debug, Clone, PartialEq)]
pub struct PassAt1Gain {
    /// The baseline's label: `sft`, else the first other row with figures.
    pub baseline: String,
    pub baseline_pass_at_1: f64,
    /// The row compared: `final`.
    pub contender: String,
    pub contender_pass_at_1: f64,
    /// `100 × (contender − baseline)`: may be zero or negative.
    pub points: f64,
}

/// The model directory `dir` names: `dir` itself when it holds `config.json` (or is a LoRA
/// adapter directory, `adapter_config.json`: a LoRA run's checkpoint), else the newest
/// complete checkpoint of the run directory `dir`.
pub fn resolve_model_dir(dir: &Path) -> Result<PathBuf, TrainError> {
    if dir.join("config.json").exists() || sobre_model::lora::is_adapter_dir(dir) {
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
        cost: None,
    })
}

impl Comparison {
    /// The `final_eval.json` of the run directory `run_dir`; `None` when it has none.
    pub fn load(run_dir: &Path) -> Result<Option<Comparison>, TrainError> {
        let path = run_dir.join(FINAL_EVAL_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TrainError::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))
    }

    /// The pass@1 the `final` row gained over the baseline: the `sft` row, else the first
    /// other row with figures. `None` without a `final` row with figures or a baseline.
    pub fn pass_at_1_gain(&self) -> Option<PassAt1Gain> {
        fn with_report(r: &ComparisonRow) -> Option<(String, &EvalReport)> {
            r.report.as_ref().map(|e| (r.label.clone(), e))
        }
        let (contender, fin) = self
            .rows
            .iter()
            .filter(|r| r.label == "final")
            .find_map(with_report)?;
        let others = || self.rows.iter().filter(|r| r.label != "final");
        let (baseline, base) = others()
            .filter(|r| r.label == "sft")
            .find_map(with_report)
            .or_else(|| others().find_map(with_report))?;
        Some(PassAt1Gain {
            points: 100.0 * (fin.pass_at_1 - base.pass_at_1),
            baseline,
            baseline_pass_at_1: base.pass_at_1,
            contender,
            contender_pass_at_1: fin.pass_at_1,
        })
    }

    /// The lines printed under the table: the run's cost (see [`summary_lines`]) and its cost
    /// per held-out pass@1 point gained over the baseline ([`Comparison::pass_at_1_gain`]).
    /// Empty when the run recorded no cost.
    pub fn cost_lines(&self) -> Vec<String> {
        let Some(cost) = &self.cost else {
            return Vec::new();
        };
        let mut lines = summary_lines(cost);
        if let Some(g) = self.pass_at_1_gain() {
            lines.push(match cost_per_point(cost, g.points) {
                Some(per) => format!(
                    "cost per held-out point gained: {} over {} (the whole run's cost)",
                    per.describe("pass@1"),
                    g.baseline
                ),
                None => format!(
                    "cost per held-out point gained: no gain (pass@1 {:.1}% {} vs {:.1}% {})",
                    100.0 * g.contender_pass_at_1,
                    g.contender,
                    100.0 * g.baseline_pass_at_1,
                    g.baseline
                ),
            });
        }
        lines
    }

    /// The table as printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = format!("held-out evaluation: {}\n", self.problems);
        // As wide as the longest label (a staged run's rows are its stage names).
        let w = self
            .rows
            .iter()
            .map(|r| r.label.chars().count())
            .max()
            .unwrap_or(0)
            .max(10);
        out.push_str(&format!(
            "{:<w$} {:>7} {:>7} {:>7} {:>7} {:>7}  model\n",
            "", "pass@1", "pass@k", "maj@k", "format", "length"
        ));
        for r in &self.rows {
            match &r.report {
                Some(e) => out.push_str(&format!(
                    "{:<w$} {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>7.1}  {}\n",
                    r.label,
                    100.0 * e.pass_at_1,
                    100.0 * e.pass_at_k,
                    100.0 * e.maj_at_k,
                    100.0 * e.format_rate,
                    e.mean_length,
                    r.model.display()
                )),
                None => out.push_str(&format!(
                    "{:<w$} {:>7} {:>7} {:>7} {:>7} {:>7}  {}\n",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, pass_at_1: Option<f64>) -> ComparisonRow {
        ComparisonRow {
            label: label.into(),
            model: PathBuf::from(format!("runs/x/{label}")),
            report: pass_at_1.map(|p| EvalReport {
                pass_at_1: p,
                pass_at_k: p,
                maj_at_k: p,
                k: 1,
                format_rate: 1.0,
                mean_length: 10.0,
                truncated_rate: 0.0,
                reward_mean: p,
                rewards: Default::default(),
                correct_reward: "countdown".into(),
                n_problems: 10,
                samples: 1,
                temperature: 0.0,
                max_new_tokens: 16,
                seed: 0,
                seconds: 1.0,
            }),
            note: None,
        }
    }

    fn cost() -> RunCost {
        RunCost {
            wall_seconds: 100.0,
            cpu_seconds: 171.0,
            tokens_generated: 1000,
            tokens_trained: 2000,
            flops_estimate: 1e12,
            energy_wh_estimate: 171.0 * 10.0 / 3600.0,
            watts_per_core: 10.0,
            energy_wh_rapl: None,
        }
    }

    #[test]
    fn gain_over_sft_else_the_first_other_row() {
        let mut c = Comparison {
            problems: "p".into(),
            rows: vec![
                row("sft", Some(0.30)),
                row("final", Some(0.471)),
                row("twin", Some(0.1)),
            ],
            cost: Some(cost()),
        };
        let g = c.pass_at_1_gain().expect("a gain");
        assert_eq!(
            (g.baseline.as_str(), g.contender.as_str()),
            ("sft", "final")
        );
        assert!((g.points - 17.1).abs() < 1e-9);
        let lines = c.cost_lines();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("cost: 100.0 s wall, 171.0 CPU-s"),
            "{lines:?}"
        );
        assert_eq!(
            lines[2],
            "cost per held-out point gained: 10.0 CPU-s, 0.028 Wh (est.) per pass@1 point \
             (+17.1 points) over sft (the whole run's cost)"
        );
        // No SFT stage: the first baseline.
        c.rows.remove(0);
        let g = c.pass_at_1_gain().expect("a gain");
        assert_eq!(g.baseline, "twin");
        assert!((g.points - 37.1).abs() < 1e-9);
        c.rows[1].report.as_mut().expect("report").pass_at_1 = 0.5;
        assert_eq!(
            c.cost_lines()[2],
            "cost per held-out point gained: no gain (pass@1 47.1% final vs 50.0% twin)"
        );
        // A baseline that could not be evaluated gives nothing to divide by.
        c.rows[1].report = None;
        assert_eq!(c.pass_at_1_gain(), None);
        assert_eq!(c.cost_lines().len(), 2);
        c.cost = None;
        assert!(c.cost_lines().is_empty());
    }

    #[test]
    fn cost_round_trips_through_final_eval_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Comparison::load(dir.path()).expect("no file"), None);
        let c = Comparison {
            problems: "p".into(),
            rows: vec![row("final", Some(0.5))],
            cost: Some(cost()),
        };
        c.save(dir.path()).expect("save");
        assert_eq!(Comparison::load(dir.path()).expect("load"), Some(c.clone()));
        // A file written before the cost was recorded reads with `cost: None`.
        let old = serde_json::json!({"problems": "p", "rows": []});
        std::fs::write(dir.path().join(FINAL_EVAL_FILE), old.to_string()).expect("write");
        let back = Comparison::load(dir.path()).expect("load").expect("some");
        assert_eq!(back.cost, None);
        std::fs::write(dir.path().join(FINAL_EVAL_FILE), "{").expect("write");
        assert!(Comparison::load(dir.path()).is_err());
    }
}
