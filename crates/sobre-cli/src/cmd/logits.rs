//! `sobre logits`: the raw next-token logits a model gives, for comparing with other tools.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;
use sobre_model::{Batch, ForwardOptions};

#[derive(ClapArgs)]
#[command(
    after_help = "Example:\n  sobre logits --model crates/sobre-model/tests/fixtures/qwen3_moe_tiny --ids 3,17,99"
)]
pub struct Args {
    /// A model directory (HF layout: config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = sobre_model::default_device();
    let model = sobre_model::load_model(&args.model, &device)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let vocab = model.config.vocab_size;
    if let Some(bad) = args.ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!("--ids: token id {bad} is out of range for a vocabulary of {vocab}");
    }
    let out = model.forward(
        &Batch::left_padded(std::slice::from_ref(&args.ids), 0),
        None,
        ForwardOptions::default(),
    );
    let flat: Vec<f32> = out
        .logits
        .try_into_vec_as::<f32>()
        .context("reading logits back from the device")?;
    let rows: Vec<&[f32]> = flat.chunks_exact(vocab).collect();
    println!("{}", serde_json::json!({ "logits": rows }));
    Ok(())
}
