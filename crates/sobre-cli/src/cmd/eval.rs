//! `sobre eval`: pass@1, pass@k, maj@k, rewards, format rate and length of a model on held-out
//! problems (sobre_train::eval).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sobre_data::{DatasetConfig, Sample, Template};
use sobre_reward::CombinedReward;
use sobre_train::Config;
use sobre_train::compare::{Comparison, FINAL_EVAL_FILE};
use sobre_train::data::build_template;
use sobre_train::eval::{EvalOptions, EvalReport, EvalSample, evaluate, heldout_problems};

/// Evaluate a model on held-out problems: K samples each, every reward, pass@1/pass@k/maj@k.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("problems").required(true).args(["data", "config"])))]
#[command(after_help = "Examples:
  sobre eval --model runs/smoke --config configs/smoke.toml --n 50 --samples 4
  sobre eval --model runs/smoke/checkpoints/step-000004 --data datasets/countdown/eval.jsonl --n 100 --json
  sobre eval --model runs/smoke --config configs/smoke.toml --eval-seed 123 --samples 8 --temperature 0.7 --out runs/smoke/eval

--config: N held-out problems from the config's task generator (its eval split, which never shares
a problem with training; default seed: the config's data seed, so the set is the one training
evaluates on), with the config's template, rewards and [eval] settings.
--data: the problems of a JSONL/Parquet file; the template and rewards come from --template and
--rewards (default: countdown + format when the rows have nums/target, else accuracy + format,
weighted 1.0 and 0.1 as in training).

A sample is correct when the correctness reward (countdown or accuracy) scores >= 1. pass@1 is the
mean share of correct samples per problem; pass@k the unbiased estimator 1 - C(n-c,k)/C(n,k) with
k = --samples; maj@k a majority vote over the normalised final answers; format_rate the share of
samples in the strict R1 <think>/<answer> shape. --out DIR writes eval.json and samples.jsonl
(one line per sample: prompt, completion, answer, rewards, correct).

When --model is a run directory with a final_eval.json, its end-of-run comparison table follows
the report, with what the run cost and its cost per held-out pass@1 point gained over the SFT
checkpoint (or the first baseline).")]
pub struct Args {
    /// A model directory (HF layout with tokenizer.json), or a run directory (its newest checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    /// A directory with tokenizer.json (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Problems from a JSONL or Parquet file (TRL field names: prompt, answer, task fields).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Problems, template and rewards from a training config.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config value: section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "config")]
    pub set: Vec<String>,
    /// Seed of the generated held-out problems (default: the config's data seed).
    #[arg(long, requires = "config")]
    pub eval_seed: Option<u64>,
    /// Number of problems (default: the config's eval.n; with --data, every row).
    #[arg(long)]
    pub n: Option<usize>,
    /// Completions per problem (K, the k of pass@k and maj@k).
    #[arg(long, short = 'k', default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature; 0 is greedy (default: 0 for one sample, else the config's
    /// eval.temperature when > 0, else 1.0).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// 0 means off.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Default: the config's eval.max_new_tokens or rollout.max_new_tokens; 256 with --data.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling seed (default: the config's eval.seed or run.seed; 0 with --data).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompt template with --data: r1_zero, plain, or chat (the tokenizer's chat template).
    #[arg(long, default_value = "r1_zero", conflicts_with = "config")]
    pub template: String,
    /// Rewards with --data, comma-separated names (weight 1 each), e.g. countdown,format.
    #[arg(long, value_delimiter = ',', conflicts_with = "config")]
    pub rewards: Option<Vec<String>>,
    /// The reward whose score >= 1 means correct (default: countdown or accuracy).
    #[arg(long)]
    pub correct_reward: Option<String>,
    /// Problems generated per batch (bounds memory; results do not depend on it).
    #[arg(long, default_value_t = 64)]
    pub batch_problems: usize,
    /// Rollout engines decoding shares of each batch at once, a thread each (default: the
    /// config's rollout.data_parallel_size; 1 with --data).
    #[arg(long)]
    pub data_parallel_size: Option<usize>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write eval.json and samples.jsonl (every sample with its rewards) into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn load_rows(path: &Path, n: Option<usize>) -> anyhow::Result<Vec<Sample>> {
    let mut rows = sobre_data::dataset::load(&DatasetConfig::new(path))
        .with_context(|| format!("reading {}", path.display()))?
        .samples;
    if let Some(n) = n {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!("{} holds no problems", path.display());
    }
    Ok(rows)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = sobre_train::compare::resolve_model_dir(&args.model)?;
    if args.tokenizer.is_none() && !dir.join("tokenizer.json").exists() {
        bail!(
            "{} has no tokenizer.json: sobre eval needs the tokenizer the model was trained with \
             (a checkpoint directory has one; a run directory keeps it in tokenizer/). Pass --tokenizer DIR",
            dir.display()
        );
    }
    let (model, tok, dir) = sobre_train::compare::load_for_eval(&dir, args.tokenizer.as_deref())
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let tok_dir = args.tokenizer.clone().unwrap_or_else(|| dir.clone());
    let mut task = match (&args.config, &args.data) {
        (Some(path), _) => task_from_config(&args, path, &tok_dir)?,
        (None, Some(path)) => task_from_data(&args, path, &tok_dir)?,
        (None, None) => bail!("give --config FILE or --data FILE"),
    };
    apply_flags(&args, &mut task.opts)?;

    let output = evaluate(
        &model,
        &tok,
        &task.problems,
        &task.template,
        &task.rewards,
        &task.opts,
    )?;
    let mut json = serde_json::to_value(&output.report)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("model".into(), dir.display().to_string().into());
        obj.insert("problems_from".into(), task.source.clone().into());
    }
    if let Some(out) = &args.out {
        write_out(out, &json, &output.samples)?;
    }
    if args.json {
        println!("{json}");
        return Ok(());
    }
    print_report(&dir, &task.source, &output.report);
    print_run_comparison(&args.model);
    if let Some(out) = &args.out {
        println!(
            "wrote {} and {}",
            out.join("eval.json").display(),
            out.join("samples.jsonl").display()
        );
    }
    Ok(())
}

/// What to evaluate on and how: the problems, their template and rewards, the options, and a
/// line saying where the problems came from.
struct EvalTask {
    problems: Vec<Sample>,
    template: Template,
    rewards: CombinedReward,
    opts: EvalOptions,
    source: String,
}

/// The held-out problems, template, rewards and eval options of the run config at `path`.
fn task_from_config(args: &Args, path: &Path, tok_dir: &Path) -> anyhow::Result<EvalTask> {
    let (cfg, _) = Config::load(path, &args.set)?;
    let problems = heldout_problems(&cfg, args.n, args.eval_seed)?;
    let template = build_template(&cfg, Some(tok_dir))?;
    let rewards = cfg
        .build_rewards()
        .map_err(|e| anyhow::anyhow!("{}: [[reward]]: {e}", path.display()))?;
    let mut opts = EvalOptions::from_config(&cfg);
    if opts.correct_reward.is_none() {
        opts.correct_reward = sobre_train::grpo::default_accuracy_reward(&cfg, &rewards);
    }
    let cfg_temp = cfg.eval.temperature;
    if args.temperature.is_none() {
        opts.temperature = match args.samples {
            1 => cfg_temp,
            _ if cfg_temp > 0.0 => cfg_temp,
            _ => 1.0,
        };
    }
    let source = match (cfg.data.task.as_deref(), args.eval_seed) {
        (Some(task), seed) if cfg.data.eval_dataset.is_none() || seed.is_some() => format!(
            "{} held-out {task} problems (seed {}) of {}",
            problems.len(),
            seed.unwrap_or(cfg.data.seed.unwrap_or(cfg.run.seed)),
            path.display()
        ),
        _ => format!(
            "{} problems of the eval_dataset of {}",
            problems.len(),
            path.display()
        ),
    };
    Ok(EvalTask {
        problems,
        template,
        rewards,
        opts,
        source,
    })
}

/// The problems of the data file at `path`, with `--template` and `--rewards` (countdown's
/// rewards when its rows have `nums` and `target`).
fn task_from_data(args: &Args, path: &Path, tok_dir: &Path) -> anyhow::Result<EvalTask> {
    let problems = load_rows(path, args.n)?;
    let mut cfg = Config::default();
    cfg.template.name = args.template.clone();
    let template = build_template(&cfg, Some(tok_dir))?;
    let rewards = match &args.rewards {
        Some(names) => CombinedReward::from_names(names).context("--rewards")?,
        None => {
            let f = &problems[0].fields;
            if f.contains_key("nums") && f.contains_key("target") {
                cfg.data.task = Some("countdown".into());
            }
            cfg.build_rewards().map_err(anyhow::Error::msg)?
        }
    };
    let mut opts = EvalOptions::default();
    if args.temperature.is_none() && args.samples > 1 {
        opts.temperature = 1.0;
    }
    let source = format!("{} problems of {}", problems.len(), path.display());
    Ok(EvalTask {
        problems,
        template,
        rewards,
        opts,
        source,
    })
}

/// The sampling flags over the task's options, checked.
fn apply_flags(args: &Args, opts: &mut EvalOptions) -> anyhow::Result<()> {
    opts.samples = args.samples;
    if let Some(t) = args.temperature {
        opts.temperature = t;
    }
    if let Some(p) = args.top_p {
        opts.top_p = p;
    }
    if let Some(k) = args.top_k {
        opts.top_k = k;
    }
    if let Some(m) = args.max_new_tokens {
        opts.max_new_tokens = m;
    }
    if let Some(s) = args.seed {
        opts.seed = s;
    }
    if let Some(r) = &args.correct_reward {
        sobre_reward::build_reward(r, &Default::default()).context("--correct-reward")?;
        opts.correct_reward = Some(r.clone());
    }
    opts.batch_problems = args.batch_problems;
    if let Some(n) = args.data_parallel_size {
        opts.data_parallel_size = n;
    }
    if opts.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if opts.data_parallel_size == 0 {
        bail!("--data-parallel-size must be at least 1");
    }
    if opts.samples > 1 && opts.temperature == 0.0 {
        eprintln!(
            "note: greedy decoding (temperature 0) makes all {} samples of a problem identical",
            opts.samples
        );
    }
    Ok(())
}

/// `--out DIR`: eval.json and samples.jsonl.
fn write_out(out: &Path, json: &serde_json::Value, samples: &[EvalSample]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let p = out.join("eval.json");
    std::fs::write(&p, serde_json::to_string_pretty(json)? + "\n")
        .with_context(|| format!("writing {}", p.display()))?;
    let p = out.join("samples.jsonl");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
    );
    for s in samples {
        writeln!(f, "{}", serde_json::to_string(s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    f.flush()
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// The report as printed.
fn print_report(dir: &Path, source: &str, r: &EvalReport) {
    let k = r.k;
    let f = |v: f64| {
        if v.is_finite() {
            format!("{v:.4}")
        } else {
            "n/a".into()
        }
    };
    println!("model      {}", dir.display());
    println!("problems   {source}");
    println!(
        "sampling   {} per problem, temperature {}, max_new_tokens {}, seed {} ({:.1}s)",
        r.samples, r.temperature, r.max_new_tokens, r.seed, r.seconds
    );
    println!("correct    {} >= 1", r.correct_reward);
    println!("pass@1       {}", f(r.pass_at_1));
    println!("pass@{k:<8}{}", f(r.pass_at_k));
    println!("maj@{k:<9}{}", f(r.maj_at_k));
    println!("format_rate  {}", f(r.format_rate));
    println!(
        "mean_length  {:.1} tokens (truncated {:.1}%)",
        r.mean_length,
        100.0 * r.truncated_rate
    );
    println!("reward_mean  {}", f(r.reward_mean));
    for (name, v) in &r.rewards {
        println!("  {name:<11}{}", v.map_or("n/a (never applies)".into(), f));
    }
}

/// The end-of-run comparison of the run directory `run_dir` (its final_eval.json), with the
/// run's cost and cost per point gained; nothing when there is none.
fn print_run_comparison(run_dir: &Path) {
    match Comparison::load(run_dir) {
        Ok(Some(cmp)) => {
            println!();
            println!(
                "end-of-run comparison of this run ({}):",
                run_dir.join(FINAL_EVAL_FILE).display()
            );
            print!("{}", cmp.table());
            for line in cmp.cost_lines() {
                println!("{line}");
            }
        }
        Ok(None) => {}
        Err(e) => eprintln!("note: the run's comparison is not shown: {e}"),
    }
}
