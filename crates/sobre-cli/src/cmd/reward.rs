//! `sobre reward`: score completions in a JSONL file with rule-based rewards.

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use serde_json::{Map, Value};
use sobre_reward::{CombinedReward, Completion};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

/// Score completions with rule-based rewards.
///
/// Each input line is a JSON object with `completion` (the generated text) plus the sample's
/// fields (`answer`, `nums`, `target`, …; optionally `num_tokens`, `truncated`, `max_tokens`).
/// Each output line is `{"rewards": {"accuracy": 1.0, "format": 0.0}, "total": 1.0}`, with `null`
/// where a reward does not apply (it counts as 0 in the total). Blank lines are ignored.
/// Lines are scored in batches of --batch, so rewards that run programs (`code`, `command`) run
/// them in parallel; a reward that fails (a verifier that keeps crashing) stops the command.
#[derive(ClapArgs)]
#[command(after_help = "Examples:
  sobre reward --rewards accuracy,format --input rollouts.jsonl
  sobre reward --rewards countdown --input cd.jsonl --out scores.jsonl --skip-bad
  sobre reward --config rewards.toml --input rollouts.jsonl   # [[reward]] name/weight/params
  sobre reward --rewards code --input apps_rollouts.jsonl     # runs ```python blocks in the sandbox

  # rewards.toml for a verifier program of your own (see examples/verifier.py):
  #   [[reward]]
  #   name = \"command\"
  #   command = [\"python3\", \"examples/verifier.py\"]
  #   components = [\"correct\", \"short\"]

Reward names: accuracy, format, tag_count, countdown, exact_match, regex_match, length, overlong, repetition, code, command")]
pub struct Args {
    /// Comma-separated reward names, each with weight 1 and default parameters.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    rewards: Vec<String>,
    /// A TOML file of `[[reward]]` tables (name, weight, parameters) instead of --rewards.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input JSONL file.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip malformed lines (counted on stderr) instead of stopping at the first one.
    #[arg(long)]
    skip_bad: bool,
    /// Lines scored together (programs of `code` and `command` run in parallel within a batch).
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rewards = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            CombinedReward::from_toml(&text).with_context(|| format!("{}", path.display()))?
        }
        None => CombinedReward::from_names(&args.rewards).context("--rewards")?,
    };
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let name = args.input.display();
    let batch = args.batch.max(1);
    let mut skipped = 0usize;
    // (line number, row) of the lines not yet scored.
    let mut pending: Vec<(usize, Map<String, Value>)> = Vec::with_capacity(batch);
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let lineno = i + 1;
        let bytes = line.with_context(|| format!("reading {name}"))?;
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| format!("not valid UTF-8 ({e})"))
            .and_then(|text| {
                if text.trim().is_empty() {
                    Ok(None)
                } else {
                    parse_line(text).map(Some)
                }
            });
        match parsed {
            Ok(Some(row)) => pending.push((lineno, row)),
            Ok(None) => {}
            Err(_) if args.skip_bad => skipped += 1,
            Err(why) => bail!("{name}:{lineno}: {why}"),
        }
        if pending.len() >= batch {
            score_rows(&rewards, &pending, &mut out, &name.to_string())?;
            pending.clear();
        }
    }
    score_rows(&rewards, &pending, &mut out, &name.to_string())?;
    out.flush()?;
    if args.skip_bad {
        eprintln!("skipped {skipped} malformed line(s) of {name}");
    }
    Ok(())
}

/// Score a batch of rows and write one output line each.
fn score_rows(
    rewards: &CombinedReward,
    rows: &[(usize, Map<String, Value>)],
    out: &mut dyn Write,
    name: &str,
) -> anyhow::Result<()> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(());
    };
    let items: Vec<(&Map<String, Value>, Completion<'_>)> =
        rows.iter().map(|(_, r)| (r, completion_of(r))).collect();
    let scored = rewards
        .score_batch(&items)
        .with_context(|| format!("{name}:{}-{}", first.0, last.0))?;
    for b in scored {
        let components: Map<String, Value> = b
            .components
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    v.and_then(|x| serde_json::Number::from_f64(f64::from(x)))
                        .map_or(Value::Null, Value::Number),
                )
            })
            .collect();
        let record = serde_json::json!({ "rewards": components, "total": b.total });
        writeln!(out, "{record}")?;
    }
    Ok(())
}

/// A line must be a JSON object with a string `completion`.
fn parse_line(text: &str) -> Result<Map<String, Value>, String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("expected a JSON object: {e}"))?;
    let Value::Object(map) = v else {
        return Err("expected a JSON object, found another JSON value".into());
    };
    match map.get("completion") {
        Some(Value::String(_)) => Ok(map),
        Some(_) => Err("expected `completion` to be a string".into()),
        None => Err("expected a `completion` field".into()),
    }
}

fn completion_of(row: &Map<String, Value>) -> Completion<'_> {
    Completion {
        text: row
            .get("completion")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        num_tokens: row
            .get("num_tokens")
            .and_then(Value::as_u64)
            .map(|n| n as usize),
        truncated: row
            .get("truncated")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tokens: row
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map(|n| n as usize),
    }
}
