//! `sobre bench`: throughput measurements. One subcommand per thing measured.

use clap::{Args as ClapArgs, Subcommand};
use sobre_reward::{CombinedReward, Completion};
use std::time::{Duration, Instant};

/// Measure throughput and print it as JSON.
#[derive(ClapArgs)]
#[command(after_help = "Examples:
  sobre bench rewards
  sobre bench rewards --seconds 5 --completions 5000")]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

/// What to measure.
#[derive(Subcommand)]
enum What {
    /// Evaluations per second of format + accuracy on ~500-character R1 completions, one thread.
    Rewards(RewardsArgs),
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Rewards(a) => rewards(a),
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
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
