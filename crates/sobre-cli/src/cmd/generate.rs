//! `sobre generate`: sample completions from a model directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;
use sobre_data::Tokenizer;
use sobre_model::GenerationConfig;
use sobre_rollout::{Detokenizer, Prompt, SamplingParams};

#[derive(ClapArgs)]
#[command(after_help = "Examples:\n  \
  sobre generate --model runs/r1-tiny/checkpoints/step-000200 --prompt 'Using the numbers [3, 5, 7] …' -n 4 --json\n  \
  sobre generate --model crates/sobre-model/tests/fixtures/qwen3_moe_tiny --ids 1,5,9 --temperature 0 --max-new-tokens 8\n  \
  sobre generate --model runs/r1-tiny/checkpoints/step-000200 --config configs/r1-tiny.toml -n 8 --keep correct --out traces.jsonl\n  \
  sobre generate --model TEACHER --data problems.jsonl --config configs/r1-tiny.toml -n 4 --keep correct --k 1 --out traces.jsonl\n\n\
With --data or --config: distillation / rejection-sampling data. Each problem's prompt is rendered\n\
with the config's template, N completions are sampled and scored with its rewards, and the kept\n\
ones (distinct per problem, at most --k, the shortest with --shortest) are written to --out as\n\
JSONL SFT rows (the problem's fields, prompt, answer, completion) that `[data.sft_dataset]` reads.")]
pub struct Args {
    /// A model directory (HF layout). Its tokenizer.json, if present, encodes --prompt and decodes
    /// the output; its generation_config.json, if present, gives the eos ids generation stops on
    /// and the defaults of the sampling flags below that are not given.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs a tokenizer in the model directory). Used as is: no template is applied.
    #[arg(long, conflicts_with = "ids", required_unless_present_any = ["ids", "data", "config"])]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Completions to sample.
    #[arg(short = 'n', long = "num-samples", default_value_t = 1)]
    n: usize,
    /// [default: generation_config's max_new_tokens, else 128]
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 means greedy. [default: generation_config's temperature (0 when it says
    /// `do_sample: false`), else 1]
    #[arg(long)]
    temperature: Option<f32>,
    /// 0 means off. [default: generation_config's top_k, else 0]
    #[arg(long)]
    top_k: Option<usize>,
    /// [default: generation_config's top_p, else 1]
    #[arg(long)]
    top_p: Option<f32>,
    /// [default: generation_config's min_p, else 0]
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop only at --max-new-tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// One JSON object per completion: tokens, text, logprobs, finish_reason.
    #[arg(long)]
    json: bool,
    /// Problems to sample for (JSONL/Parquet with a `prompt` field, mapped by the config's
    /// `[data.dataset]` when it has one). Without it, `--config`'s training problems.
    #[arg(long, conflicts_with_all = ["prompt", "ids"])]
    data: Option<PathBuf>,
    /// A run config: the template, rewards and sampling settings of `--data` problems.
    #[arg(long, conflicts_with_all = ["prompt", "ids"])]
    config: Option<PathBuf>,
    /// Override a value of --config: section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "config")]
    set: Vec<String>,
    /// Which completions to write: `all` (distinct ones) or `correct` (the correctness reward
    /// scores ≥ 1, as in evaluation).
    #[arg(long, value_parser = ["all", "correct"], default_value = "all")]
    keep: String,
    /// Keep completions whose weighted total reward is ≥ this instead (overrides --keep).
    #[arg(long)]
    min_reward: Option<f64>,
    /// At most this many kept per problem [default: -n].
    #[arg(long)]
    k: Option<usize>,
    /// Keep the shortest passing completions rather than the first sampled.
    #[arg(long)]
    shortest: bool,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// The JSONL file the kept completions go to (needed with --data / --config).
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Detok<'a>(&'a Tokenizer);

impl Detokenizer for Detok<'_> {
    fn decode(&self, ids: &[u32]) -> String {
        // Decoding ids the tokenizer itself produced cannot fail short of a corrupt vocabulary;
        // an empty string then is visible in the output rather than a crash mid-generation.
        self.0.decode(ids, true).unwrap_or_default()
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.data.is_some() || args.config.is_some() {
        return traces(&args);
    }
    let device = sobre_model::default_device();
    let model = sobre_model::load_model(&args.model, &device)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let tokenizer = if args.model.join("tokenizer.json").exists() {
        Some(
            Tokenizer::from_dir(&args.model)
                .with_context(|| format!("loading the tokenizer in {}", args.model.display()))?,
        )
    } else {
        None
    };
    let ids = match (&args.prompt, &args.ids) {
        (Some(text), _) => {
            let tok = tokenizer.as_ref().with_context(|| {
                format!(
                    "--prompt needs a tokenizer.json in {}; pass --ids instead",
                    args.model.display()
                )
            })?;
            tok.encode(text).context("encoding --prompt")?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => anyhow::bail!("give --prompt TEXT or --ids 1,2,3"),
    };
    let generation = GenerationConfig::from_dir(&args.model)?.unwrap_or_default();
    // Stop on the generation config's eos ids and the tokenizer's (the model config's own eos ids
    // are added by the rollout engine).
    let mut stop_token_ids = generation.eos_token_id.clone();
    if let Some(t) = &tokenizer
        && !stop_token_ids.contains(&t.special().eos)
    {
        stop_token_ids.push(t.special().eos);
    }
    // Flags given win; then generation_config.json (`do_sample: false` = greedy, as
    // transformers); then sobre's defaults.
    let temperature = args.temperature.unwrap_or(match generation.do_sample {
        Some(false) => 0.0,
        _ => generation.temperature.map_or(1.0, |t| t as f32),
    });
    let params = SamplingParams {
        temperature,
        top_k: args.top_k.or(generation.top_k).unwrap_or(0),
        top_p: args
            .top_p
            .or(generation.top_p.map(|p| p as f32))
            .unwrap_or(1.0),
        min_p: args
            .min_p
            .or(generation.min_p.map(|p| p as f32))
            .unwrap_or(0.0),
        max_new_tokens: args
            .max_new_tokens
            .or(generation.max_new_tokens)
            .unwrap_or(128),
        stop_token_ids,
        stop_strings: vec![],
        ignore_eos: args.ignore_eos,
        seed: args.seed,
        // One prompt: nothing to shard.
        data_parallel_size: 1,
    };
    let from_file: Vec<String> = [
        (
            "temperature",
            args.temperature.is_none()
                && (generation.temperature.is_some() || generation.do_sample == Some(false)),
            format!("{}", params.temperature),
        ),
        (
            "top_k",
            args.top_k.is_none() && generation.top_k.is_some(),
            params.top_k.to_string(),
        ),
        (
            "top_p",
            args.top_p.is_none() && generation.top_p.is_some(),
            format!("{}", params.top_p),
        ),
        (
            "min_p",
            args.min_p.is_none() && generation.min_p.is_some(),
            format!("{}", params.min_p),
        ),
        (
            "max_new_tokens",
            args.max_new_tokens.is_none() && generation.max_new_tokens.is_some(),
            params.max_new_tokens.to_string(),
        ),
    ]
    .into_iter()
    .filter(|(_, used, _)| *used)
    .map(|(k, _, v)| format!("{k} {v}"))
    .collect();
    if !from_file.is_empty() {
        eprintln!(
            "sampling defaults from {}: {}",
            args.model.join("generation_config.json").display(),
            from_file.join(", ")
        );
    }
    let detok = tokenizer.as_ref().map(Detok);
    let completions = sobre_rollout::generate(
        &model,
        &[Prompt { ids, key: 0 }],
        args.n,
        &params,
        detok.as_ref().map(|d| d as &dyn Detokenizer),
    )?;
    for c in completions {
        if args.json {
            let v = serde_json::json!({
                "tokens": c.tokens,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason.as_str(),
            });
            println!("{v}");
        } else {
            match &c.text {
                Some(t) => println!(
                    "--- sample {} ({}) ---\n{t}",
                    c.sample_index,
                    c.finish_reason.as_str()
                ),
                None => println!(
                    "--- sample {} ({}) ---\n{}",
                    c.sample_index,
                    c.finish_reason.as_str(),
                    c.tokens
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
    }
    Ok(())
}

/// `--data` / `--config`: sample, score, keep, write (sobre_train::rejection).
fn traces(args: &Args) -> anyhow::Result<()> {
    use sobre_train::Config;
    use sobre_train::rejection::{Keep, rejection_sample, write_atomically};
    let out = args
        .out
        .as_ref()
        .context("--data / --config write traces: give --out FILE.jsonl")?;
    let (model, tok, dir) = sobre_train::compare::load_for_eval(&args.model, None)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let cfg = match &args.config {
        Some(p) => Config::load(p, &args.set)?.0,
        None => Config::default(),
    };
    let mut problems = match &args.data {
        Some(path) => {
            let mut d = cfg
                .data
                .dataset
                .clone()
                .unwrap_or_else(|| sobre_data::DatasetConfig::new(path));
            d.path = path.clone();
            sobre_data::dataset::load(&d)
                .with_context(|| format!("reading {}", path.display()))?
                .samples
        }
        None => sobre_train::data::load_data(&cfg)?.train,
    };
    if let Some(n) = args.limit {
        problems.truncate(n);
    }
    anyhow::ensure!(!problems.is_empty(), "no problems to sample for");
    let mut cfg = cfg;
    if args.config.is_none() {
        // No config: countdown's rewards when the rows are countdown problems (as `sobre eval`).
        let f = &problems[0].fields;
        if f.contains_key("nums") && f.contains_key("target") {
            cfg.data.task = Some("countdown".into());
        }
    }
    let template = sobre_train::data::build_template(&cfg, Some(&dir))?;
    let rewards = cfg.build_rewards().map_err(anyhow::Error::msg)?;
    let mut opts = sobre_train::eval::EvalOptions::from_config(&cfg);
    opts.samples = args.n;
    opts.temperature = args.temperature.unwrap_or(cfg.rollout.temperature);
    opts.max_new_tokens = args.max_new_tokens.unwrap_or(cfg.rollout.max_new_tokens);
    opts.seed = args.seed;
    if let Some(p) = args.top_p {
        opts.top_p = p;
    }
    if let Some(k) = args.top_k {
        opts.top_k = k;
    }
    if opts.correct_reward.is_none() {
        opts.correct_reward = sobre_train::grpo::default_accuracy_reward(&cfg, &rewards);
    }
    let keep = Keep {
        threshold: match (args.min_reward, args.keep.as_str()) {
            (Some(t), _) => Some(t),
            (None, "correct") => None,
            _ => Some(f64::NEG_INFINITY),
        },
        k: args.k.unwrap_or(args.n).max(1),
        shortest: args.shortest,
    };
    let (kept, report) =
        rejection_sample(&model, &tok, &problems, &template, &rewards, &opts, &keep)?;
    write_atomically(&kept, out)?;
    eprintln!("{}", report.line(out));
    Ok(())
}
