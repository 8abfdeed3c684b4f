//! DeepSeek-R1's pipeline in one run directory: `[[stage]]` tables run in order — `sft`,
//! `grpo`, `rejection_sampling`, and `sft` / `grpo` again.
//!
//! Each training stage is an ordinary run ([`Pipeline`]) of a config made from the top-level one
//! with the stage's own sections merged over it ([`stage_config`]), in `RUN_DIR/stages/<name>/`
//! (its metrics, samples and step checkpoints), starting from the previous stage's model. Its
//! last checkpoint is moved to `RUN_DIR/checkpoints/<name>/` when it ends; that directory
//! existing is what makes the stage done, so a run stopped anywhere resumes exactly: done stages
//! are skipped, the stage in progress resumes from its own newest checkpoint as any run does.
//! A `rejection_sampling` stage writes `RUN_DIR/stages/<name>/sft.jsonl` (atomically; its
//! existence marks it done) and the `sft` stage after it trains on that file unless it names its
//! own `[stage.data.sft_dataset]`.
//!
//! A config without `[[stage]]` is the two-stage pipeline it always was (`[sft]` then GRPO).
//! With stages, step counts belong to the stages (`[stage.sft] steps`, `[stage.run] steps`): a
//! top-level `sft.steps` or `run.steps` with `[[stage]]` is an error naming both. With `[lora]`
//! every stage trains the same adapters on the same frozen base: a stage continues the previous
//! stage's adapter directory (`lora.adapter`), and rejection sampling and the end-of-run table
//! load each stage's adapters on that base.

use std::path::{Path, PathBuf};

use crate::compare::{comparison_options, load_for_eval};
use crate::config::{ConfigError, Source, closest, find_key_line};
use crate::cost::{RunCost, summary_lines};
use crate::data::{build_template, derive_seed, load_data};
use crate::eval::EvalOptions;
use crate::grpo::default_accuracy_reward;
use crate::pipeline::{Pipeline, RunOptions, Summary};
use crate::rejection::{Keep, RejectionReport, rejection_sample, write_atomically};
use crate::{Config, TrainError, checkpoint, dist};

pub const KINDS: &[&str] = &["sft", "grpo", "rejection_sampling"];
/// Sections a stage may set (merged over the top-level ones).
const SECTIONS: &[&str] = &[
    "data", "sft", "rollout", "grpo", "optim", "run", "eval", "reward",
];
const REJECTION_KEYS: &[&str] = &["n", "k", "threshold", "shortest", "prompts"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Sft,
    Grpo,
    RejectionSampling,
}

/// The settings of a `rejection_sampling` stage.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectionStage {
    /// Completions sampled per prompt (default 4).
    pub n: usize,
    pub keep: Keep,
    /// Training prompts sampled from (default: all of them).
    pub prompts: Option<usize>,
}

/// One `[[stage]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub kind: StageKind,
    /// The stage's sections, merged over the top-level config.
    pub sections: toml::Table,
    pub rejection: Option<RejectionStage>,
}

/// The `n`-th (0-based) `[[stage]]` header's line in `text`.
fn stage_line(text: &str, n: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim().starts_with("[[stage]]"))
        .nth(n)
        .map(|(i, _)| i + 1)
}

/// The stages of `cfg`, checked: names unique and plain, kinds known, keys known, step counts
/// set where the stage trains, no top-level step counts.
pub fn plan(cfg: &Config, source: &Source) -> Result<Vec<StageSpec>, ConfigError> {
    let first = stage_line(&source.text, 0);
    for key in ["sft.steps", "run.steps"] {
        let overridden = source
            .overrides
            .iter()
            .any(|o| o.split('=').next().map(str::trim) == Some(key));
        let line = find_key_line(&source.text, key);
        if overridden || line.is_some() {
            let at = match line {
                Some(l) if !overridden => format!("line {l}"),
                _ => format!("--set {key}"),
            };
            return Err(ConfigError {
                origin: source.name.clone(),
                key: Some(key.into()),
                msg: format!(
                    "`{key}` ({at}) and `[[stage]]` tables (line {}) mix the two-stage form and the staged form: with stages each stage sets its own steps (`[stage.sft] steps`, `[stage.run] steps`)",
                    first.unwrap_or(0)
                ),
            });
        }
    }
    let mut out: Vec<StageSpec> = Vec::new();
    for (i, t) in cfg.stage.iter().enumerate() {
        let spec = stage_spec(cfg, source, i, t, &out)?;
        out.push(spec);
    }
    Ok(out)
}

/// The `i`-th `[[stage]]` table `t` as a spec, checked (its name against the `earlier` stages'),
/// its whole config validated.
fn stage_spec(
    cfg: &Config,
    source: &Source,
    i: usize,
    t: &toml::Table,
    earlier: &[StageSpec],
) -> Result<StageSpec, ConfigError> {
    let origin = match stage_line(&source.text, i) {
        Some(l) => format!("{}:{l}", source.name),
        None => source.name.clone(),
    };
    let err = |key: &str, msg: String| ConfigError {
        origin: origin.clone(),
        key: Some(format!("stage[{i}].{key}")),
        msg,
    };
    let name = match t.get("name") {
        Some(toml::Value::String(s))
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            s.clone()
        }
        Some(v) => {
            return Err(err(
                "name",
                format!("expected a name of letters, digits, `_` or `-`, found {v}"),
            ));
        }
        None => {
            return Err(err(
                "name",
                "every stage needs a `name` (its checkpoint is checkpoints/<name>/)".into(),
            ));
        }
    };
    if earlier.iter().any(|s| s.name == name) {
        return Err(err("name", format!("`{name}` names two stages")));
    }
    let kind = match t.get("kind").and_then(toml::Value::as_str) {
        Some("sft") => StageKind::Sft,
        Some("grpo") => StageKind::Grpo,
        Some("rejection_sampling") => StageKind::RejectionSampling,
        other => {
            let found = other.map_or("nothing".to_string(), |k| format!("`{k}`"));
            return Err(err(
                "kind",
                format!("expected one of {}, found {found}", KINDS.join(", ")),
            ));
        }
    };
    let mut sections = toml::Table::new();
    for (k, v) in t {
        if k == "name"
            || k == "kind"
            || (kind == StageKind::RejectionSampling && REJECTION_KEYS.contains(&k.as_str()))
        {
            continue;
        }
        if !SECTIONS.contains(&k.as_str()) {
            let mut valid: Vec<&str> = SECTIONS.to_vec();
            if kind == StageKind::RejectionSampling {
                valid.extend(REJECTION_KEYS);
            }
            let hint = closest(k, &valid)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            return Err(err(
                k,
                format!(
                    "unknown key for a `{}` stage{hint}; valid: {}",
                    KINDS[kind as usize],
                    valid.join(", ")
                ),
            ));
        }
        sections.insert(k.clone(), v.clone());
    }
    let rejection = match kind {
        StageKind::RejectionSampling => Some(rejection_settings(t).map_err(|(k, m)| err(k, m))?),
        _ => None,
    };
    let steps = |section: &str| {
        sections
            .get(section)
            .and_then(|s| s.get("steps"))
            .and_then(toml::Value::as_integer)
            .unwrap_or(0)
    };
    match kind {
        StageKind::Sft if steps("sft") < 1 => {
            return Err(err(
                "sft.steps",
                "an `sft` stage needs `[stage.sft] steps` ≥ 1".into(),
            ));
        }
        StageKind::Grpo if steps("run") < 1 => {
            return Err(err(
                "run.steps",
                "a `grpo` stage needs `[stage.run] steps` ≥ 1".into(),
            ));
        }
        StageKind::RejectionSampling if earlier.is_empty() && cfg.model.path.is_none() => {
            return Err(err(
                "kind",
                "a first stage that samples needs a model to sample from (`[model] path`)".into(),
            ));
        }
        _ => {}
    }
    let spec = StageSpec {
        name,
        kind,
        sections,
        rejection,
    };
    // Every stage's own settings are checked now, not when the stage starts.
    stage_config(cfg, &spec, None, None, Path::new("."))
        .and_then(|c| c.validate(&stage_source(source, &spec, &c)))
        .map_err(|e| ConfigError {
            origin: origin.clone(),
            key: e.key.map(|k| format!("stage[{i}].{k}")),
            msg: e.msg,
        })?;
    Ok(spec)
}

fn rejection_settings(t: &toml::Table) -> Result<RejectionStage, (&'static str, String)> {
    let uint = |key: &'static str, default: usize| match t.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(v)) if *v >= 1 => Ok(*v as usize),
        Some(v) => Err((key, format!("expected an integer ≥ 1, found {v}"))),
    };
    let threshold = match t.get("threshold") {
        None => None,
        Some(toml::Value::Float(v)) if v.is_finite() => Some(*v),
        Some(toml::Value::Integer(v)) => Some(*v as f64),
        Some(v) => {
            return Err((
                "threshold",
                format!(
                    "expected a number (the weighted reward a completion must reach), found {v}"
                ),
            ));
        }
    };
    let shortest = match t.get("shortest") {
        None => true,
        Some(toml::Value::Boolean(b)) => *b,
        Some(v) => return Err(("shortest", format!("expected true or false, found {v}"))),
    };
    Ok(RejectionStage {
        n: uint("n", 4)?,
        keep: Keep {
            threshold,
            k: uint("k", 1)?,
            shortest,
        },
        prompts: t.get("prompts").map(|_| uint("prompts", 1)).transpose()?,
    })
}

/// Merge `over` into `base`: tables recursively, anything else (arrays included) replaced.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The config stage `spec` runs with: the top-level `cfg` (without its stages) with the stage's
/// sections over it; a training stage runs its own steps only (an `sft` stage no GRPO steps, a
/// `grpo` stage no SFT steps) and no end-of-run table (the staged run has one). `model`: the
/// previous stage's checkpoint to start from (its tokenizer with it); `sft_data`: the file of
/// the rejection-sampling stage before an `sft` stage.
pub fn stage_config(
    cfg: &Config,
    spec: &StageSpec,
    model: Option<&Path>,
    sft_data: Option<&Path>,
    out_dir: &Path,
) -> Result<Config, ConfigError> {
    let err = |msg: String| ConfigError {
        origin: format!("[[stage]] {}", spec.name),
        key: None,
        msg,
    };
    let mut doc = toml::Table::try_from(cfg).map_err(|e| err(e.to_string()))?;
    doc.remove("stage");
    merge(&mut doc, &spec.sections);
    let set = |doc: &mut toml::Table, section: &str, key: &str, v: toml::Value| {
        if let toml::Value::Table(t) = doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            t.insert(key.into(), v);
        }
    };
    match spec.kind {
        StageKind::Sft => set(&mut doc, "run", "steps", toml::Value::Integer(0)),
        StageKind::Grpo | StageKind::RejectionSampling => {
            set(&mut doc, "sft", "steps", toml::Value::Integer(0))
        }
    }
    set(&mut doc, "eval", "at_end", toml::Value::Boolean(false));
    set(
        &mut doc,
        "run",
        "out_dir",
        toml::Value::String(out_dir.display().to_string()),
    );
    if let Some(m) = model {
        if cfg.lora.is_some() {
            continue_adapter(&mut doc, cfg, m).map_err(err)?;
        } else {
            start_from(&mut doc, m);
        }
    }
    let stage_names_sft_data = spec
        .sections
        .get("data")
        .and_then(|d| d.get("sft_dataset"))
        .is_some();
    if let (Some(path), StageKind::Sft, false) = (sft_data, spec.kind, stage_names_sft_data) {
        let data = doc
            .entry("data")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(d) = data {
            d.remove("sft_size");
            let dataset = toml::Value::try_from(sobre_data::DatasetConfig::new(path))
                .map_err(|e| err(e.to_string()))?;
            d.insert("sft_dataset".into(), dataset);
        }
    }
    let text = toml::to_string(&doc).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| err(e.message().to_string()))
}

/// A full fine-tune's next stage starts from the previous stage's model `m` and its tokenizer;
/// the preset's shape no longer applies.
fn start_from(doc: &mut toml::Table, m: &Path) {
    // The previous stage's model and its tokenizer; the preset's shape no longer applies.
    let keep = [
        "router_aux_loss_coef",
        "aux_loss_free_bias",
        "bias_update_rate",
    ];
    let mut section = toml::Table::new();
    if let Some(toml::Value::Table(old)) = doc.get("model") {
        for k in keep {
            if let Some(v) = old.get(k) {
                section.insert(k.into(), v.clone());
            }
        }
    }
    section.insert("path".into(), toml::Value::String(m.display().to_string()));
    doc.insert("model".into(), toml::Value::Table(section));
    doc.remove("tokenizer");
}

/// A LoRA run's next stage continues the previous stage's adapters (`lora.adapter = m`) on the
/// same frozen base: `[model] path` as configured, or for a preset the base the first stage
/// wrote (named by the adapter's `base_model_name_or_path`), with its tokenizer.
fn continue_adapter(doc: &mut toml::Table, cfg: &Config, m: &Path) -> Result<(), String> {
    if let Some(toml::Value::Table(l)) = doc.get_mut("lora") {
        l.insert(
            "adapter".into(),
            toml::Value::String(m.display().to_string()),
        );
    }
    if cfg.model.path.is_some() {
        return Ok(());
    }
    let (_, base) = sobre_model::lora::read_adapter_config(m).map_err(|e| e.to_string())?;
    let dir = sobre_model::lora::resolve_base(m, base.as_deref()).ok_or_else(|| {
        format!(
            "the adapter of the previous stage ({}) names no base model directory",
            m.display()
        )
    })?;
    start_from(doc, &dir);
    Ok(())
}

/// `RUN_DIR/metrics.jsonl`: the finished training stages' `metrics.jsonl` lines in order, each
/// with `"pipeline_stage": <name>` added, rewritten atomically after each stage, so one file
/// shows the whole pipeline (each stage's own file stays in `stages/<name>/`).
fn gather_metrics(run_dir: &Path, trained: &[(String, PathBuf)]) -> Result<(), TrainError> {
    let mut out = String::new();
    for (name, _) in trained {
        let file = run_dir.join("stages").join(name).join("metrics.jsonl");
        let text = std::fs::read_to_string(&file).map_err(|e| TrainError::io(&file, e))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                TrainError::Data(format!("{}: a line that is not JSON: {e}", file.display()))
            })?;
            if let Some(m) = v.as_object_mut() {
                m.insert("pipeline_stage".into(), serde_json::json!(name));
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
    }
    let path = run_dir.join("metrics.jsonl");
    let tmp = run_dir.join("metrics.jsonl.partial");
    std::fs::write(&tmp, out).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))
}

fn stage_source(source: &Source, spec: &StageSpec, cfg: &Config) -> Source {
    Source {
        name: format!("{} [[stage]] {}", source.name, spec.name),
        text: cfg.to_toml(),
        overrides: vec![],
    }
}

/// Run `cfg`'s stages in order in the run directory (see the module docs).
pub fn run(cfg: &Config, source: &Source, opts: &RunOptions) -> Result<Summary, TrainError> {
    let stages = plan(cfg, source)?;
    let run_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| cfg.run.out_dir.clone());
    let ckpt_root = run_dir.join("checkpoints");
    prepare(cfg, source, &run_dir, opts.resume)?;
    let mut total = Summary {
        run_dir: run_dir.clone(),
        sft_steps: 0,
        grpo_steps: 0,
        interrupted: false,
        last_checkpoint: None,
        last_metrics: None,
        seconds: 0.0,
        cost: RunCost::default(),
    };
    let mut model = cfg.model.path.clone();
    let mut sft_data: Option<PathBuf> = None;
    let mut trained: Vec<(String, PathBuf)> = Vec::new();
    for (i, spec) in stages.iter().enumerate() {
        let stage_dir = run_dir.join("stages").join(&spec.name);
        let c = stage_config(cfg, spec, model.as_deref(), sft_data.as_deref(), &stage_dir)?;
        c.validate(&stage_source(source, spec, &c))?;
        if !opts.quiet {
            eprintln!(
                "stage {}/{} `{}` ({})",
                i + 1,
                stages.len(),
                spec.name,
                KINDS[spec.kind as usize]
            );
        }
        if let Some(rs) = &spec.rejection {
            let file = stage_dir.join("sft.jsonl");
            let report = match read_report(&stage_dir).filter(|_| file.exists()) {
                Some(r) => r,
                None => {
                    let from = model.as_deref().ok_or_else(|| {
                        TrainError::Data(format!(
                            "stage `{}` has no model to sample from",
                            spec.name
                        ))
                    })?;
                    rejection_stage(&c, rs, i, from, &stage_dir, opts.quiet)?
                }
            };
            total.cost.wall_seconds += report.seconds;
            total.seconds += report.seconds;
            sft_data = Some(file);
            continue;
        }
        let done = ckpt_root.join(&spec.name);
        if checkpoint::read_state(&done).is_none() {
            let sub = run_training_stage(c, source, spec, &stage_dir, &done, opts)?;
            if sub.interrupted {
                add(&mut total, &sub);
                total.interrupted = true;
                return Ok(total);
            }
        }
        let state = checkpoint::read_state(&done).ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "stage `{}` ended without its checkpoint {}",
                spec.name,
                done.display()
            ))
        })?;
        total.sft_steps += if spec.kind == StageKind::Sft {
            state.sft_steps
        } else {
            0
        };
        total.grpo_steps += if spec.kind == StageKind::Grpo {
            state.step
        } else {
            0
        };
        if let Some(cost) = &state.cost {
            total.cost = cost.plus(&total.cost);
        }
        total.seconds += state.elapsed_seconds;
        total.last_metrics = state.last_metrics.clone();
        total.last_checkpoint = Some(done.clone());
        trained.push((spec.name.clone(), done.clone()));
        if dist::is_main() {
            gather_metrics(&run_dir, &trained)?;
        }
        model = Some(done);
        sft_data = None;
    }
    final_table(cfg, &run_dir, &trained, &total.cost, opts.quiet)?;
    Ok(total)
}

/// The run directory of a staged run: refuse another run's, write the resolved config.
fn prepare(cfg: &Config, source: &Source, run_dir: &Path, resume: bool) -> Result<(), TrainError> {
    std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    let started = run_dir.join("stages").exists()
        || !checkpoint::list(&run_dir.join("checkpoints")).is_empty();
    if started && !resume {
        return Err(TrainError::Checkpoint(format!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            run_dir.display()
        )));
    }
    if !dist::is_main() {
        return Ok(());
    }
    let path = run_dir.join("config.toml");
    let text = crate::pipeline::resolved_config(cfg, source);
    std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))
}

/// One training stage as a run of its own in `stage_dir` (resumed when it has checkpoints), its
/// last checkpoint then moved to `checkpoints/<name>/`.
fn run_training_stage(
    c: Config,
    source: &Source,
    spec: &StageSpec,
    stage_dir: &Path,
    done: &Path,
    opts: &RunOptions,
) -> Result<Summary, TrainError> {
    let sub_ckpts = stage_dir.join("checkpoints");
    if dist::is_main() {
        checkpoint::clean_partials(&sub_ckpts);
    }
    let finished = checkpoint::latest(&sub_ckpts).filter(|(_, st)| match spec.kind {
        StageKind::Sft => st.stage == checkpoint::Stage::SftDone,
        _ => st.stage == checkpoint::Stage::Grpo && st.step >= c.run.steps,
    });
    let (last, sub) = match finished {
        // Ended, but stopped before its checkpoint was moved.
        Some((dir, _)) => (dir, None),
        None => {
            let sub_opts = RunOptions {
                resume: !checkpoint::list(&sub_ckpts).is_empty(),
                out_dir: Some(stage_dir.to_path_buf()),
                ..opts.clone()
            };
            let src = stage_source(source, spec, &c);
            let summary = Pipeline::new(c, src, sub_opts)?.run()?;
            if summary.interrupted {
                return Ok(summary);
            }
            let last = summary.last_checkpoint.clone().ok_or_else(|| {
                TrainError::Checkpoint(format!("stage `{}` wrote no checkpoint", spec.name))
            })?;
            (last, Some(summary))
        }
    };
    // Every rank reads the stage's checkpoint next.
    dist::written_by_main(|| {
        if let Some(root) = done.parent() {
            std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        }
        // One rename: the stage is done exactly when its checkpoint is in place.
        std::fs::rename(&last, done).map_err(|e| TrainError::io(done, e))
    })?;
    Ok(sub.unwrap_or(Summary {
        run_dir: stage_dir.to_path_buf(),
        sft_steps: 0,
        grpo_steps: 0,
        interrupted: false,
        last_checkpoint: Some(done.to_path_buf()),
        last_metrics: None,
        seconds: 0.0,
        cost: RunCost::default(),
    }))
}

fn add(total: &mut Summary, sub: &Summary) {
    total.sft_steps += sub.sft_steps;
    total.grpo_steps += sub.grpo_steps;
    total.seconds += sub.seconds;
    total.cost = sub.cost.plus(&total.cost);
    total.last_checkpoint = sub.last_checkpoint.clone();
    total.last_metrics = sub.last_metrics.clone();
}

const REPORT_FILE: &str = "rejection.json";

fn read_report(stage_dir: &Path) -> Option<RejectionReport> {
    serde_json::from_str(&std::fs::read_to_string(stage_dir.join(REPORT_FILE)).ok()?).ok()
}

/// Sample from `model_dir`, keep, write `sft.jsonl` (last: it marks the stage done) after
/// `rejection.json`.
fn rejection_stage(
    c: &Config,
    rs: &RejectionStage,
    index: usize,
    model_dir: &Path,
    stage_dir: &Path,
    quiet: bool,
) -> Result<RejectionReport, TrainError> {
    let (model, tok, dir) = load_for_eval(model_dir, None)?;
    let template = build_template(c, Some(&dir))?;
    let rewards = c.build_rewards().map_err(TrainError::Data)?;
    let mut problems = load_data(c)?.train;
    if let Some(p) = rs.prompts {
        problems.truncate(p);
    }
    let mut opts = EvalOptions::from_config(c);
    opts.samples = rs.n;
    // Sampled as the rollouts are, not as the held-out evaluation is.
    opts.temperature = c.rollout.temperature;
    opts.max_new_tokens = c.rollout.max_new_tokens;
    opts.seed = derive_seed(c.run.seed, &[7, index as u64]);
    if opts.correct_reward.is_none() {
        opts.correct_reward = default_accuracy_reward(c, &rewards);
    }
    let (kept, report) = rejection_sample(
        &model, &tok, &problems, &template, &rewards, &opts, &rs.keep,
    )?;
    if kept.is_empty() {
        return Err(TrainError::Data(format!(
            "rejection sampling kept none of {} completions of {} prompts: nothing to train on (raise `n`, lower `threshold`, or train the model before longer)",
            report.sampled, report.prompts
        )));
    }
    // The next stage trains on the file on every rank.
    dist::written_by_main(|| {
        std::fs::create_dir_all(stage_dir).map_err(|e| TrainError::io(stage_dir, e))?;
        let path = stage_dir.join(REPORT_FILE);
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| TrainError::Data(e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| TrainError::io(&path, e))?;
        write_atomically(&kept, &stage_dir.join("sft.jsonl"))
    })?;
    if !quiet {
        eprintln!(
            "rejection sampling: {}",
            report.line(&stage_dir.join("sft.jsonl"))
        );
    }
    Ok(report)
}

/// With `eval.at_end`: every training stage's checkpoint (and `eval.compare`) on the held-out
/// problems, a row per stage, in `final_eval.json`.
fn final_table(
    cfg: &Config,
    run_dir: &Path,
    trained: &[(String, PathBuf)],
    cost: &RunCost,
    quiet: bool,
) -> Result<(), TrainError> {
    if !cfg.eval.at_end || trained.is_empty() {
        if !quiet {
            eprintln!("{}", summary_lines(cost).join("\n"));
        }
        return Ok(());
    }
    let rewards = cfg.build_rewards().map_err(TrainError::Data)?;
    let template = build_template(cfg, Some(&trained[0].1))?;
    let mut contenders = trained.to_vec();
    contenders.extend(cfg.eval.compare.clone());
    let opts = comparison_options(cfg, default_accuracy_reward(cfg, &rewards));
    let mut comparison = crate::compare::compare(cfg, &contenders, &template, &rewards, &opts)?;
    comparison.cost = Some(cost.clone());
    if !dist::is_main() {
        return Ok(());
    }
    let path = comparison.save(run_dir)?;
    if !quiet {
        eprintln!("{}(written to {})", comparison.table(), path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[model]\npreset = \"tiny\"\n[data]\ntask = \"countdown\"\n[sft]\nlr = 1e-3\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "r.toml", &[]).map(|(c, _)| c)
    }

    fn staged(stages: &str) -> String {
        format!("{BASE}{stages}")
    }

    const FOUR: &str = "[[stage]]\nname = \"cold\"\nkind = \"sft\"\n[stage.sft]\nsteps = 3\nlr = 5e-4\n\
        [[stage]]\nname = \"rl\"\nkind = \"grpo\"\n[stage.run]\nsteps = 4\n\
        [[stage]]\nname = \"rs\"\nkind = \"rejection_sampling\"\nn = 8\nk = 2\nthreshold = 0.5\n\
        [[stage]]\nname = \"sft2\"\nkind = \"sft\"\n[stage.sft]\nsteps = 2\n";

    #[test]
    fn stages_parse_with_their_settings() {
        let text = staged(FOUR);
        let cfg = parse(&text).unwrap();
        let (_, src) = Config::parse(&text, "r.toml", &[]).unwrap();
        let p = plan(&cfg, &src).unwrap();
        let kinds: Vec<_> = p.iter().map(|s| (s.name.as_str(), s.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                ("cold", StageKind::Sft),
                ("rl", StageKind::Grpo),
                ("rs", StageKind::RejectionSampling),
                ("sft2", StageKind::Sft)
            ]
        );
        let rs = p[2].rejection.as_ref().unwrap();
        assert_eq!(
            (
                rs.n,
                rs.keep.k,
                rs.keep.threshold,
                rs.keep.shortest,
                rs.prompts
            ),
            (8, 2, Some(0.5), true, None)
        );
        // The stage's sections over the top level; its own steps only.
        let cold = stage_config(&cfg, &p[0], None, None, Path::new("out/cold")).unwrap();
        assert_eq!(
            (
                cold.sft.steps,
                cold.sft.lr,
                cold.run.steps,
                cold.eval.at_end
            ),
            (3, 5e-4, 0, false)
        );
        assert_eq!(cold.model.preset.as_deref(), Some("tiny"));
        assert_eq!(cold.run.out_dir, Path::new("out/cold"));
        let rl = stage_config(
            &cfg,
            &p[1],
            Some(Path::new("run/checkpoints/cold")),
            None,
            Path::new("o"),
        )
        .unwrap();
        assert_eq!((rl.sft.steps, rl.run.steps, rl.sft.lr), (0, 4, 1e-3));
        assert_eq!(
            rl.model.path.as_deref(),
            Some(Path::new("run/checkpoints/cold"))
        );
        assert_eq!(rl.model.preset, None);
        // After rejection sampling, SFT trains on its file.
        let s2 = stage_config(
            &cfg,
            &p[3],
            Some(Path::new("m")),
            Some(Path::new("run/stages/rs/sft.jsonl")),
            Path::new("o"),
        )
        .unwrap();
        assert_eq!(
            s2.data.sft_dataset.as_ref().map(|d| d.path.clone()),
            Some(PathBuf::from("run/stages/rs/sft.jsonl"))
        );
        assert_eq!(s2.data.sft_size, None);
    }

    #[test]
    fn mixing_the_two_forms_is_an_error_naming_both() {
        let text = format!(
            "[model]\npreset = \"tiny\"\n[data]\ntask = \"countdown\"\n[sft]\nsteps = 5\n{FOUR}"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("sft.steps")
                && e.contains("line 6")
                && e.contains("[[stage]]")
                && e.contains("line 7"),
            "{e}"
        );
        let e = Config::parse(&staged(FOUR), "r.toml", &["run.steps=3".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.steps") && e.contains("--set") && e.contains("[[stage]]"),
            "{e}"
        );
    }

    #[test]
    fn bad_stages_are_named() {
        let cases = [
            (
                "[[stage]]\nkind = \"sft\"\n[stage.sft]\nsteps = 1\n",
                "stage[0].name",
            ),
            ("[[stage]]\nname = \"a\"\nkind = \"rl\"\n", "stage[0].kind"),
            (
                "[[stage]]\nname = \"a\"\nkind = \"sft\"\n",
                "stage[0].sft.steps",
            ),
            (
                "[[stage]]\nname = \"a\"\nkind = \"grpo\"\n[stage.run]\nsteps = 1\n[[stage]]\nname = \"a\"\nkind = \"grpo\"\n[stage.run]\nsteps = 1\n",
                "stage[1].name",
            ),
            (
                "[[stage]]\nname = \"a\"\nkind = \"grpo\"\n[stage.rollot]\ntemperature = 1.0\n[stage.run]\nsteps = 1\n",
                "stage[0].rollot",
            ),
            (
                "[[stage]]\nname = \"a\"\nkind = \"rejection_sampling\"\n",
                "stage[0].kind",
            ),
            (
                "[[stage]]\nname = \"a\"\nkind = \"grpo\"\n[stage.run]\nsteps = 1\n[[stage]]\nname = \"b\"\nkind = \"rejection_sampling\"\nk = 0\n",
                "stage[1].k",
            ),
            // A stage's own settings are checked as a whole config's.
            (
                "[[stage]]\nname = \"a\"\nkind = \"grpo\"\n[stage.run]\nsteps = 1\n[stage.grpo]\ngroup_size = 1\n",
                "stage[0].grpo.group_size",
            ),
        ];
        for (stages, key) in cases {
            let e = parse(&staged(stages)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{stages}: {e}");
        }
        let e = parse(&staged(
            "[[stage]]\nname = \"a\"\nkind = \"grpo\"\n[stage.rollot]\nx = 1\n",
        ))
        .unwrap_err();
        assert!(e.msg.contains("did you mean `rollout`"), "{e}");
        // The error points at the stage's table.
        let e = parse(&staged("[[stage]]\nname = \"a\"\nkind = \"rl\"\n")).unwrap_err();
        assert_eq!(e.origin, "r.toml:7");
    }
}
