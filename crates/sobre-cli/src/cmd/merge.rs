//! `sobre merge`: fold a LoRA adapter into its base model and write a plain HF model directory
//! (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
#[command(
    after_help = "Example:\n  sobre merge --model runs/r1/base --adapter runs/r1/checkpoints/step-000100 --out merged\n\n\
                  The adapter directory is PEFT's layout (adapter_config.json + \
                  adapter_model.safetensors), as sobre's LoRA checkpoints and PEFT's \
                  save_pretrained write it."
)]
pub struct Args {
    /// The base model directory (HF layout). Default: the adapter's `base_model_name_or_path`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The LoRA adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged model (config.json, model.safetensors, generation_config.json,
    /// and the tokenizer files of the adapter or base directory).
    #[arg(long)]
    out: PathBuf,
    /// Split the weights into shards above this many bytes.
    #[arg(long)]
    max_shard_bytes: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = sobre_model::default_device();
    let base_dir = match &args.model {
        Some(m) => m.clone(),
        None => {
            let (_, base) = sobre_model::lora::read_adapter_config(&args.adapter)?;
            sobre_model::lora::resolve_base(&args.adapter, base.as_deref()).with_context(|| {
                format!(
                    "{}: its base_model_name_or_path ({}) is not a model directory; pass --model",
                    args.adapter.display(),
                    base.unwrap_or_else(|| "missing".into())
                )
            })?
        }
    };
    let base = sobre_model::load_model(&base_dir, &device)
        .with_context(|| format!("loading the base model in {}", base_dir.display()))?;
    let (adapted, cfg) = sobre_model::lora::load_adapter(base, &args.adapter)
        .with_context(|| format!("loading the adapter in {}", args.adapter.display()))?;
    let merged = sobre_model::lora::merge_adapters(adapted);
    sobre_model::save_model(&merged, &args.out, args.max_shard_bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    // The tokenizer (and chat template) travel with the model: the adapter's, else the base's.
    let mut copied = Vec::new();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        let from = [&args.adapter, &base_dir]
            .into_iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file());
        if let Some(from) = from {
            std::fs::copy(&from, args.out.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
            copied.push(name);
        }
    }
    // The adapter directory's generation_config.json (a sobre checkpoint's carries the run's
    // token ids) over the one written from the base's config.
    let generation = args.adapter.join("generation_config.json");
    if generation.is_file() {
        std::fs::copy(&generation, args.out.join("generation_config.json"))
            .with_context(|| format!("copying {}", generation.display()))?;
    }
    eprintln!(
        "merged {} adapters (r {}, alpha {}, {}) of {} into {} → {}{}",
        cfg.target_modules.len(),
        cfg.r,
        cfg.alpha,
        cfg.target_modules.join(", "),
        args.adapter.display(),
        base_dir.display(),
        args.out.display(),
        if copied.is_empty() {
            String::new()
        } else {
            format!(" (with {})", copied.join(", "))
        }
    );
    Ok(())
}
