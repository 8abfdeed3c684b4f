//! `sobre bench`: throughput measurements. One subcommand per thing measured.

use clap::{Args as ClapArgs, Subcommand};
use sobre_reward::{CombinedReward, Completion};
use std::time::{Duration, Instant};

/// Measure throughput and print it as JSON.
#[derive(ClapArgs)]
#[command(after_help = "Examples:
  sobre bench rewards
  sobre bench rewards --seconds 5 --completions 5000
  sobre bench rollout --preset w1
  sobre bench step --config configs/bench-w1.toml
  sobre bench step --config configs/bench-w1.toml --leak-check-steps 200")]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

/// What to measure.
#[derive(Subcommand)]
enum What {
    /// Evaluations per second of format + accuracy on ~500-character R1 completions, one thread;
    /// and executions per second of the `code` reward's programs, in the sandbox vs a plain
    /// subprocess without limits, plus a 64-completion batch through the `code` reward.
    Rewards(RewardsArgs),
    /// Completion tokens per second of the rollout engine on the `w1` preset: shared prefill on
    /// the host engine (the default) vs on burn tensor ops vs separate prefill vs a no-cache
    /// loop, measured in one run.
    Rollout(RolloutArgs),
    /// Seconds per GRPO step of a training config (issue 9's W1: `configs/bench-w1.toml`):
    /// median over timed steps after a warm-up, split into rollout, reference forward and
    /// policy update (with a separately timed forward / backward / optimizer breakdown),
    /// completion tokens per second, peak RSS, and an optional leak check.
    Step(StepArgs),
}

#[derive(ClapArgs)]
struct StepArgs {
    /// A `sobre train` config (its SFT, eval and checkpoint settings are ignored).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Override a config value (repeatable), as `sobre train --set`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps (the medians are over these).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Run this many steps in all and report the RSS growth from step --leak-check-from to the
    /// last, along the least-squares line through the per-step readings (0 = no leak check).
    #[arg(long, default_value_t = 0)]
    leak_check_steps: usize,
    #[arg(long, default_value_t = 10)]
    leak_check_from: usize,
    /// RSS growth (MiB) the leak check allows.
    #[arg(long, default_value_t = 16.0)]
    leak_bound_mib: f64,
    /// Rewrite every prompt to exactly this many tokens (0 = keep the config's prompts).
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Repetitions of the separately timed policy-update breakdown (0 = skip).
    #[arg(long, default_value_t = 3)]
    breakdown_reps: usize,
    /// Side of the square f32 GEMM timed for the machine's GFLOP/s ceiling (0 = skip).
    #[arg(long, default_value_t = 2048)]
    gemm_size: usize,
}

#[derive(ClapArgs)]
struct RolloutArgs {
    #[arg(long, default_value = "w1")]
    preset: String,
    /// A model directory (HF layout) instead of the preset, e.g. a DeepSeek (MLA) checkpoint.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave out the (slow) no-cache reference loop.
    #[arg(long)]
    skip_no_cache: bool,
}

#[derive(ClapArgs)]
struct RewardsArgs {
    /// Distinct completions generated (deterministically, from --seed).
    #[arg(long, default_value_t = 2000)]
    completions: usize,
    /// Seconds spent measuring each figure.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Seed of the completion generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave out the `code` reward's figures (they need python3).
    #[arg(long)]
    skip_code: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Rewards(a) => rewards(a),
        What::Rollout(a) => rollout(a),
        What::Step(a) => step(a),
    }
}

/// Evaluations per second of `rewards` over `data`, cycling until `budget` has passed.
fn evals_per_sec(
    rewards: &CombinedReward,
    data: &[(sobre_reward::Sample, String)],
    budget: Duration,
) -> (f64, f64) {
    let start = Instant::now();
    let (mut n, mut sum) = (0u64, 0.0f64);
    while start.elapsed() < budget {
        for (s, t) in data {
            sum += f64::from(rewards.score(s, &Completion::new(t)).total);
            n += 1;
        }
    }
    (
        n as f64 / start.elapsed().as_secs_f64(),
        sum / n.max(1) as f64,
    )
}

fn rewards(a: RewardsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.completions > 0, "--completions must be positive");
    let data = sobre_reward::bench::realistic_completions(a.completions, a.seed);
    let mean_chars =
        data.iter().map(|(_, t)| t.chars().count()).sum::<usize>() as f64 / data.len() as f64;
    let budget = Duration::from_secs_f64(a.seconds.max(0.1));
    let both = CombinedReward::from_names(&["format", "accuracy"])?;
    let format_only = CombinedReward::from_names(&["format"])?;
    let (baseline, _) = evals_per_sec(&format_only, &data, budget);
    let (eps, mean_total) = evals_per_sec(&both, &data, budget);
    let code = if a.skip_code {
        serde_json::json!({"skipped": "--skip-code"})
    } else {
        sobre_reward::bench::code_executions(budget)
            .unwrap_or_else(|why| serde_json::json!({ "skipped": why }))
    };
    let report = serde_json::json!({
        "benchmark": "rewards",
        "rewards": ["format", "accuracy"],
        "threads": 1,
        "completions": data.len(),
        "mean_chars": (mean_chars * 10.0).round() / 10.0,
        "mean_total": (mean_total * 1000.0).round() / 1000.0,
        "evals_per_sec": eps.round(),
        "baseline": "format only",
        "baseline_evals_per_sec": baseline.round(),
        "ratio_to_baseline": (eps / baseline * 1000.0).round() / 1000.0,
        "target_evals_per_sec": 100_000,
        "code": code,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn rollout(a: RolloutArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use sobre_rollout::bench::{RolloutWorkload, bench_rollout};
    use sobre_rollout::{EngineKernels, EngineMode};
    let device = sobre_model::default_device();
    let model = match &a.model {
        Some(dir) => sobre_model::load_model(dir, &device)
            .with_context(|| format!("loading the model in {}", dir.display()))?,
        None => {
            let cfg = sobre_model::ModelConfig::preset(&a.preset)?;
            sobre_model::init_model(&cfg, a.seed, &device)
        }
    };
    let mc = &model.config;
    // What the KV cache holds per token (all layers, f32) against every head's key and value:
    // the same for standard attention, MLA's compressed latent otherwise.
    let kv_cache = serde_json::json!({
        "bytes_per_token": mc.kv_bytes_per_token(),
        "expanded_bytes_per_token": mc.expanded_kv_bytes_per_token(),
        "expanded_over_held": (mc.expanded_kv_bytes_per_token() as f64 / mc.kv_bytes_per_token() as f64 * 100.0).round() / 100.0,
    });
    let w = RolloutWorkload {
        prompts: a.prompts,
        group_size: a.group_size,
        new_tokens: a.new_tokens,
        prompt_len: a.prompt_len,
        seed: a.seed,
    };
    anyhow::ensure!(
        w.prompts > 0 && w.group_size > 0 && w.new_tokens > 0 && w.prompt_len > 0,
        "all sizes must be positive"
    );
    let host = EngineKernels::Host;
    let mut modes = vec![
        (EngineMode::SharedPrefill, host),
        (
            EngineMode::SharedPrefill,
            EngineKernels::Tensor(sobre_model::Kernels::Fused),
        ),
        (EngineMode::SeparatePrefill, host),
    ];
    if !a.skip_no_cache {
        modes.push((EngineMode::NoCache, host));
    }
    // Warm-up: one short run so allocation and thread-pool start-up are not timed.
    let warm = RolloutWorkload {
        new_tokens: 2,
        ..w.clone()
    };
    bench_rollout(&model, &warm, &modes[..2])?;
    let figures = bench_rollout(&model, &w, &modes)?;
    let base = figures[0].tokens_per_sec;
    let report = serde_json::json!({
        "benchmark": "rollout",
        "preset": if a.model.is_some() { serde_json::Value::Null } else { a.preset.clone().into() },
        "model": a.model.as_ref().map(|d| d.display().to_string()),
        "model_type": mc.family.model_type(),
        "kv_cache": kv_cache,
        "workload": w,
        "threads_available": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "figures": figures,
        "speedup_of_shared_prefill": figures.iter().map(|f| (f.mode.clone(), (base / f.tokens_per_sec * 100.0).round() / 100.0)).collect::<std::collections::BTreeMap<_, _>>(),
        "peak_rss_mib": peak_rss_mib(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    let (cfg, _source) = sobre_train::Config::load(&a.config, &a.set)?;
    let opts = sobre_train::bench::BenchOptions {
        warmup: a.warmup,
        steps: a.steps,
        leak_check_steps: a.leak_check_steps,
        leak_check_from: a.leak_check_from,
        leak_bound_mib: a.leak_bound_mib,
        prompt_tokens: (a.prompt_tokens > 0).then_some(a.prompt_tokens),
        breakdown_reps: a.breakdown_reps,
        gemm_size: a.gemm_size,
    };
    anyhow::ensure!(a.steps > 0, "--steps must be positive");
    // Under `mpirun` the step runs on every rank (docs/SCALE.md); rank 0 reports.
    let _world = sobre_train::dist::launch(&cfg.run.launcher)
        .map_err(|e| anyhow::anyhow!("run.launcher = {:?}: {e}", cfg.run.launcher))?;
    let mut report = sobre_train::bench::bench_step(&cfg, &opts)?;
    if !sobre_train::dist::is_main() {
        return Ok(());
    }
    report["ranks"] = serde_json::json!(sobre_train::dist::world().size());
    report["config"] = serde_json::json!(a.config.display().to_string());
    report["overrides"] = serde_json::json!(a.set);
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}
