//! `sobre data`: generate task datasets and check dataset files.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use sobre_data::dataset::{AnswerExtract, DatasetConfig, Format, write_jsonl};
use sobre_data::tasks::countdown::{DemoStyle, QuestionStyle};
use sobre_data::tasks::functions::Family;
use sobre_data::tasks::{
    self, ArithmeticConfig, CountdownConfig, FunctionsConfig, Split, TaskConfig,
};

#[derive(ClapArgs)]
#[command(after_help = "Examples:
  sobre data countdown --n 2000 --seed 1 --out data/countdown_train.jsonl
  sobre data countdown --n 500 --seed 2 --split eval --min-count 3 --max-count 3 --max-number 20 --out eval.jsonl
  sobre data countdown --n 1000 --seed 3 --demos --out sft_demos.jsonl
  sobre data arithmetic --n 1000 --seed 1 --max-digits 4 --ops +,* --out arith.jsonl
  sobre data functions --n 500 --seed 1 --demos --out functions.jsonl
  sobre data check datasets/countdown/train.jsonl
  sobre data check gsm8k/train.parquet --prompt-field question --answer-extract gsm8k")]
pub struct Args {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate countdown problems (TinyZero's task): numbers, a reachable target, a question.
    Countdown(CountdownArgs),
    /// Generate multi-digit +, -, * problems with their answers.
    Arithmetic(ArithmeticArgs),
    /// Generate tiny programming problems: infer f from f(1), f(2), f(3) and write it in Python,
    /// checked by hidden tests (the `code` reward's `test` + `entry_point` fields).
    Functions(FunctionsArgs),
    /// Validate a JSONL or Parquet dataset; print counts, field statistics and duplicates.
    Check(CheckArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Eval,
}

#[derive(ClapArgs)]
struct Common {
    /// Number of problems to write.
    #[arg(long)]
    n: usize,
    /// Random seed; the same seed and options give the same bytes on every machine.
    #[arg(long)]
    seed: u64,
    /// Which side of the fixed train/eval partition to draw from (they never share a problem).
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// Add a solver-written R1-format `completion` to each sample (cold-start SFT data).
    #[arg(long)]
    demos: bool,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(ClapArgs)]
#[command(
    after_help = "Example:\n  sobre data countdown --n 2000 --seed 1 --min-count 3 --max-count 3 --max-number 20 --out train.jsonl"
)]
struct CountdownArgs {
    #[command(flatten)]
    common: Common,
    /// Fewest numbers per problem.
    #[arg(long, default_value_t = CountdownConfig::default().min_count)]
    min_count: usize,
    /// Most numbers per problem (at most 6).
    #[arg(long, default_value_t = CountdownConfig::default().max_count)]
    max_count: usize,
    #[arg(long, default_value_t = CountdownConfig::default().min_number)]
    min_number: i64,
    #[arg(long, default_value_t = CountdownConfig::default().max_number)]
    max_number: i64,
    #[arg(long, default_value_t = CountdownConfig::default().min_target)]
    min_target: i64,
    #[arg(long, default_value_t = CountdownConfig::default().max_target)]
    max_target: i64,
    /// Question wording: tinyzero (TinyZero's instructions) or short (`Using the numbers [..], make T.`).
    #[arg(long, default_value = "tinyzero")]
    question: String,
    /// What a demonstration's <think> holds (with --demos): solution (the solver's steps) or
    /// search (up to --max-misses missed tries, one per line, then the solver's steps).
    #[arg(long, default_value = "solution")]
    demo: String,
    /// With --demo search: the most missed tries before the solution.
    #[arg(long, default_value_t = CountdownConfig::default().max_misses)]
    max_misses: usize,
    /// Write each step as an inline calculator call: `<calc>15 + 3</calc><result>18</result>`.
    #[arg(long)]
    calculator: bool,
}

#[derive(ClapArgs)]
#[command(
    after_help = "Example:\n  sobre data arithmetic --n 1000 --seed 1 --min-digits 2 --max-digits 4 --ops +,- --out arith.jsonl"
)]
struct ArithmeticArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = ArithmeticConfig::default().min_digits)]
    min_digits: u32,
    #[arg(long, default_value_t = ArithmeticConfig::default().max_digits)]
    max_digits: u32,
    /// Operators, comma-separated, from + - *.
    #[arg(long, default_value = "+,-,*")]
    ops: String,
    /// Allow a - b with a < b (negative answers).
    #[arg(long)]
    allow_negative: bool,
}

#[derive(ClapArgs)]
#[command(
    after_help = "Example:\n  sobre data functions --n 500 --seed 1 --families linear --max-slope 9 --out f.jsonl"
)]
struct FunctionsArgs {
    #[command(flatten)]
    common: Common,
    /// Families of hidden functions, comma-separated, from linear (a*x+b) and square (x*x+b).
    #[arg(long, default_value = "linear,square")]
    families: String,
    /// Largest slope of a linear function.
    #[arg(long, default_value_t = FunctionsConfig::default().max_slope)]
    max_slope: i64,
    #[arg(long, default_value_t = FunctionsConfig::default().min_offset, allow_hyphen_values = true)]
    min_offset: i64,
    #[arg(long, default_value_t = FunctionsConfig::default().max_offset, allow_hyphen_values = true)]
    max_offset: i64,
}

#[derive(ClapArgs)]
struct CheckArgs {
    /// A .jsonl or .parquet file.
    file: PathBuf,
    /// Field holding the prompt (dotted path for nested fields).
    #[arg(long, default_value = "prompt")]
    prompt_field: String,
    /// Field holding the reference answer.
    #[arg(long, default_value = "answer")]
    answer_field: String,
    /// `gsm8k`: the answer is the text after `####`.
    #[arg(long)]
    answer_extract: Option<String>,
    /// Force the format instead of guessing it from the extension: jsonl or parquet.
    #[arg(long)]
    format: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Countdown(a) => {
            let cfg = CountdownConfig {
                min_count: a.min_count,
                max_count: a.max_count,
                min_number: a.min_number,
                max_number: a.max_number,
                min_target: a.min_target,
                max_target: a.max_target,
                question: match a.question.as_str() {
                    "tinyzero" => QuestionStyle::TinyZero,
                    "short" => QuestionStyle::Short,
                    other => anyhow::bail!(
                        "--question: unknown style `{other}`; expected tinyzero or short"
                    ),
                },
                demo: match a.demo.as_str() {
                    "solution" => DemoStyle::Solution,
                    "search" => DemoStyle::Search,
                    other => anyhow::bail!(
                        "--demo: unknown style `{other}`; expected solution or search"
                    ),
                },
                max_misses: a.max_misses,
                calculator: a.calculator,
            };
            generate(TaskConfig::Countdown(cfg), &a.common)
        }
        DataCommand::Arithmetic(a) => {
            let ops = a
                .ops
                .split(',')
                .map(|s| {
                    let s = s.trim();
                    let mut chars = s.chars();
                    match (chars.next(), chars.next()) {
                        (Some(c), None) => Ok(c),
                        _ => anyhow::bail!(
                            "--ops: `{s}` is not a single operator; expected e.g. `+,-,*`"
                        ),
                    }
                })
                .collect::<anyhow::Result<Vec<char>>>()?;
            let cfg = ArithmeticConfig {
                min_digits: a.min_digits,
                max_digits: a.max_digits,
                ops,
                allow_negative: a.allow_negative,
            };
            generate(TaskConfig::Arithmetic(cfg), &a.common)
        }
        DataCommand::Functions(a) => {
            let families = a
                .families
                .split(',')
                .map(|s| match s.trim() {
                    "linear" => Ok(Family::Linear),
                    "square" => Ok(Family::Square),
                    other => anyhow::bail!(
                        "--families: unknown family `{other}`; expected linear or square"
                    ),
                })
                .collect::<anyhow::Result<Vec<Family>>>()?;
            let cfg = FunctionsConfig {
                families,
                max_slope: a.max_slope,
                min_offset: a.min_offset,
                max_offset: a.max_offset,
            };
            generate(TaskConfig::Functions(cfg), &a.common)
        }
        DataCommand::Check(a) => check(a),
    }
}

fn generate(task: TaskConfig, c: &Common) -> anyhow::Result<()> {
    let split = match c.split {
        SplitArg::Train => Split::Train,
        SplitArg::Eval => Split::Eval,
    };
    let samples = tasks::generate(&task, split, c.n, c.seed, c.demos)?;
    write_jsonl(&samples, &c.out).with_context(|| format!("writing {}", c.out.display()))?;
    let name = match task {
        TaskConfig::Countdown(_) => "countdown",
        TaskConfig::Arithmetic(_) => "arithmetic",
        TaskConfig::Functions(_) => "functions",
    };
    let split_name = match split {
        Split::Train => "train",
        Split::Eval => "eval",
    };
    println!(
        "wrote {} {name} {split_name} samples{} (seed {}) to {}",
        samples.len(),
        if c.demos { " with demonstrations" } else { "" },
        c.seed,
        c.out.display()
    );
    Ok(())
}

fn check(a: CheckArgs) -> anyhow::Result<()> {
    let mut cfg = DatasetConfig::new(&a.file);
    cfg.prompt_field = a.prompt_field;
    cfg.answer_field = a.answer_field;
    cfg.answer_extract = match a.answer_extract.as_deref() {
        None | Some("none") => AnswerExtract::None,
        Some("gsm8k") => AnswerExtract::Gsm8k,
        Some(other) => {
            anyhow::bail!("--answer-extract: unknown `{other}`; expected `gsm8k` or `none`")
        }
    };
    cfg.format = match a.format.as_deref() {
        None => None,
        Some("jsonl") => Some(Format::Jsonl),
        Some("parquet") => Some(Format::Parquet),
        Some(other) => anyhow::bail!("--format: unknown `{other}`; expected `jsonl` or `parquet`"),
    };
    let report = sobre_data::check::check(&cfg)?;
    print!("{report}");
    if !report.is_valid() {
        anyhow::bail!(
            "{}: {} of {} rows are invalid",
            a.file.display(),
            report.invalid,
            report.rows
        );
    }
    Ok(())
}
