//! `sobre tokenizer`: train a byte-level BPE on datasets, or encode text with a tokenizer.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use sobre_data::Tokenizer;
use sobre_data::dataset::{DatasetConfig, DatasetReader};
use sobre_data::template::Template;
use sobre_data::tokenizer::{TrainOptions, training_texts};

#[derive(ClapArgs)]
#[command(after_help = "Examples:
  sobre tokenizer train --data datasets/countdown/train.jsonl datasets/countdown/sft_demos.jsonl --vocab-size 1024 --out runs/tok
  sobre tokenizer encode --tokenizer runs/tok --text \"<think>\\n15 + 3 = 18\\n</think>\"")]
pub struct Args {
    #[command(subcommand)]
    command: TokenizerCommand,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE (Qwen2-style, digits split) and save tokenizer.json + tokenizer_config.json.
    Train(TrainArgs),
    /// Print the token ids and tokens of a text as JSON.
    Encode(EncodeArgs),
}

#[derive(ClapArgs)]
struct TrainArgs {
    /// Dataset files (JSONL or Parquet, TRL field names): prompts, answers and completions are used.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Largest vocabulary, 6 added tokens included (at least 262); training stops earlier when
    /// no pair repeats.
    #[arg(long, default_value_t = 1024)]
    vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Template prompts are rendered with before training: r1_zero or plain.
    #[arg(long, default_value = "r1_zero")]
    template: String,
    /// model_max_length written to tokenizer_config.json.
    #[arg(long, default_value_t = 2048)]
    model_max_length: usize,
    /// More tokens kept whole (comma-separated), e.g. a tool's markers: `<calc>,</calc>`.
    #[arg(long, value_delimiter = ',')]
    added_tokens: Vec<String>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(ClapArgs)]
struct EncodeArgs {
    /// Directory with tokenizer.json (and tokenizer_config.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Text to encode (no BOS/EOS is added).
    #[arg(long)]
    text: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        TokenizerCommand::Train(a) => train(a),
        TokenizerCommand::Encode(a) => encode(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let template = Template::from_name(&a.template)?;
    let mut texts = Vec::new();
    for path in &a.data {
        for sample in DatasetReader::open(&DatasetConfig::new(path))? {
            let sample = sample?;
            texts.extend(training_texts(&sample, &template)?);
        }
    }
    let opts = TrainOptions {
        vocab_size: a.vocab_size,
        min_frequency: a.min_frequency,
        model_max_length: a.model_max_length,
        added_tokens: a.added_tokens.clone(),
    };
    let tok = Tokenizer::train(texts.iter(), &opts)?;
    tok.save(&a.out)
        .with_context(|| format!("saving the tokenizer to {}", a.out.display()))?;
    let sp = tok.special();
    println!(
        "trained byte-level BPE: vocab {} (asked for at most {}) from {} texts in {} files -> {}",
        tok.vocab_size(),
        a.vocab_size,
        texts.len(),
        a.data.len(),
        a.out.display()
    );
    println!(
        "special ids: eos {} pad {} <think> {} </think> {} <answer> {} </answer> {}",
        sp.eos,
        sp.pad,
        opt(sp.think_start),
        opt(sp.think_end),
        opt(sp.answer_start),
        opt(sp.answer_end)
    );
    Ok(())
}

fn opt(id: Option<u32>) -> String {
    id.map_or("-".into(), |i| i.to_string())
}

fn encode(a: EncodeArgs) -> anyhow::Result<()> {
    let tok = Tokenizer::from_dir(&a.tokenizer)
        .with_context(|| format!("loading the tokenizer in {}", a.tokenizer.display()))?;
    let ids = tok.encode(&a.text)?;
    let tokens = tok.tokens(&a.text)?;
    println!(
        "{}",
        serde_json::json!({ "ids": ids, "tokens": tokens, "count": ids.len() })
    );
    Ok(())
}
