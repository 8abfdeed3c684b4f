//! `sobre train`: run the SFT + GRPO pipeline a TOML config describes.

use std::path::PathBuf;

use anyhow::Context;
use sobre_train::pipeline::{Pipeline, RunOptions, install_ctrlc};
use sobre_train::{Config, dist};

/// Train a model with SFT then GRPO from one TOML config.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  sobre train --config configs/smoke.toml
  sobre train --config configs/smoke.toml --out runs/try1 --set grpo.beta=0 --set run.steps=10
  sobre train --config configs/smoke.toml --out runs/try1 --resume

The run directory holds config.toml (resolved), metrics.jsonl, samples.jsonl and
checkpoints/step-NNNNNN/ (HF model directory + optimizer + trainer state).
Ctrl-C finishes the current step, saves a checkpoint and prints the command that resumes.")]
pub struct Args {
    /// The run's TOML config.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config value: section.key=value (repeatable; value parsed as TOML).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Run directory (default: run.out_dir of the config).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many GRPO steps, save, and print the resume command (as Ctrl-C does).
    #[arg(long, value_name = "STEPS")]
    pub stop_after: Option<usize>,
    /// No progress bar or summaries.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (cfg, source) = Config::load(&args.config, &args.set)?;
    let world = dist::launch(&cfg.run.launcher)
        .map_err(|e| anyhow::anyhow!("run.launcher = {:?}: {e}", cfg.run.launcher))?;
    let stop = install_ctrlc();
    let opts = RunOptions {
        resume: args.resume,
        out_dir: args.out.clone(),
        stop: Some(stop),
        quiet: args.quiet,
        stop_after: args.stop_after,
    };
    let pipeline = Pipeline::new(cfg, source, opts)?;
    let run_dir = pipeline.run_dir();
    let result = pipeline
        .run()
        .with_context(|| format!("training run in {}", run_dir.display()));
    let summary = match result {
        Ok(s) => s,
        // The other ranks may be waiting for this one: end the whole job.
        Err(e) if dist::world().size() > 1 => {
            dist::fail(&format!("{e:#}"));
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if !dist::is_main() {
        return Ok(());
    }
    let ckpt = summary
        .last_checkpoint
        .as_ref()
        .map_or("none".to_string(), |p| p.display().to_string());
    if summary.interrupted {
        let ranks = dist::world().size();
        let launcher = if ranks > 1 {
            format!("mpirun -np {ranks} ")
        } else {
            String::new()
        };
        let mut cmd = format!(
            "{launcher}sobre train --config {} --out {} --resume",
            args.config.display(),
            summary.run_dir.display()
        );
        for s in &args.set {
            cmd.push_str(&format!(" --set {s}"));
        }
        eprintln!(
            "interrupted after {} SFT + {} GRPO steps; saved {ckpt}\nresume with:\n  {cmd}",
            summary.sft_steps, summary.grpo_steps
        );
        if args.stop_after.is_none() {
            world.finalize();
            std::process::exit(130);
        }
        return Ok(());
    }
    println!(
        "done: {} SFT + {} GRPO steps in {:.1}s → {} (last checkpoint {ckpt})",
        summary.sft_steps,
        summary.grpo_steps,
        summary.seconds,
        summary.run_dir.display()
    );
    Ok(())
}
