//! `sobre`: the command-line front-end. It parses arguments and delegates to the library crates;
//! no training, sampling or scoring logic lives here.

mod alloc;
mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sobre",
    version,
    about = "Train small reasoning MoE models with GRPO and checkable rewards"
)]
struct Cli {
    /// Where to compute: cpu (burn's flex backend, the default build's only one); tch,
    /// tch-cuda[:N] with the `tch` feature; cuda[:N] with the `cuda` feature.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's size: total and active parameters, layers, experts, weight memory.
    Inspect(cmd::inspect::Args),
    /// Print the logits a model gives for a sequence of token ids, as JSON.
    Logits(cmd::logits::Args),
    /// Score completions in a JSONL file with rule-based rewards (accuracy, format, countdown, …).
    Reward(cmd::reward::Args),
    /// Measure throughput (rewards per second, …) and print it as JSON.
    Bench(cmd::bench::Args),
    /// Generate task datasets (countdown, arithmetic) and check dataset files.
    Data(cmd::data::Args),
    /// Train a byte-level BPE tokenizer or encode text with one.
    Tokenizer(cmd::tokenizer::Args),
    /// Sample completions from a model directory.
    Generate(cmd::generate::Args),
    /// Train with SFT then GRPO from a TOML config (checkpoints, resume, metrics).
    Train(cmd::train::Args),
    /// Evaluate a model on held-out problems: pass@1, pass@k, maj@k, rewards, format rate.
    Eval(cmd::eval::Args),
    /// Draw a run's training curves (rewards, accuracy, KL, length, entropy, …) into a PNG.
    Plot(cmd::plot::Args),
    /// Fold a LoRA adapter (PEFT layout) into its base model and write a plain HF model.
    Merge(cmd::merge::Args),
    // --- further commands: one line each, the code in cmd/<name>.rs ---
}

fn main() -> std::process::ExitCode {
    alloc::tune();
    let cli = Cli::parse();
    let chosen = sobre_model::device_by_name(&cli.device).and_then(sobre_model::use_device);
    if let Err(err) = chosen {
        eprintln!("error: --device: {err}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Reward(args) => cmd::reward::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Data(args) => cmd::data::run(args),
        Command::Tokenizer(args) => cmd::tokenizer::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Plot(args) => cmd::plot::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        // --- dispatch: one line per command ---
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}
