//! `sobre inspect`: what a model is, without running it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;
use sobre_model::ModelConfig;

#[derive(ClapArgs)]
#[command(
    after_help = "Examples:\n  sobre inspect --preset small\n  sobre inspect --model runs/demo/checkpoints/step-000100 --json"
)]
pub struct Args {
    /// A model directory (HF layout: config.json + safetensors), or a run directory (its
    /// newest checkpoint).
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    model: Option<PathBuf>,
    /// A built-in preset: tiny, small or w1.
    #[arg(long)]
    preset: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (cfg, source) = match (&args.model, &args.preset) {
        (Some(dir), _) => {
            // A run directory names its newest checkpoint, as in `sobre eval`.
            let dir = &sobre_train::compare::resolve_model_dir(dir)?;
            let path = dir.join("config.json");
            let cfg = ModelConfig::from_file(&path)
                .with_context(|| format!("reading the model in {}", dir.display()))?;
            (cfg, dir.display().to_string())
        }
        (None, Some(name)) => (ModelConfig::preset(name)?, format!("preset {name}")),
        (None, None) => anyhow::bail!("give --model DIR or --preset NAME"),
    };
    for key in &cfg.unknown_keys {
        eprintln!("warning: {source}: config key `{key}` is not known to sobre and has no effect");
    }
    let (total, active) = cfg.count_parameters();
    let sparse: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|&i| cfg.is_sparse_layer(i))
        .collect();
    let weight_bytes = total * 4;
    if args.json {
        let v = serde_json::json!({
            "source": source,
            "model_type": cfg.family.model_type(),
            "total_parameters": total,
            "active_parameters_per_token": active,
            "num_hidden_layers": cfg.num_hidden_layers,
            "sparse_layers": sparse,
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "qk_head_dim": cfg.qk_head_dim(),
            "v_head_dim": cfg.v_head_dim(),
            "kv_cache_bytes_per_token": cfg.kv_bytes_per_token(),
            "expanded_kv_cache_bytes_per_token": cfg.expanded_kv_bytes_per_token(),
            "weight_bytes_f32": weight_bytes,
        });
        println!("{v}");
    } else {
        println!("model               {source} ({})", cfg.family.model_type());
        println!(
            "parameters          {} total, {} active per token",
            human(total),
            human(active)
        );
        println!(
            "layers              {} ({} sparse: {:?})",
            cfg.num_hidden_layers,
            sparse.len(),
            sparse
        );
        if cfg.num_experts == 0 {
            println!("experts             none (dense)");
        } else {
            println!(
                "experts             {} routed, top-{}{}",
                cfg.num_experts,
                cfg.num_experts_per_tok,
                if cfg.shared_expert_intermediate_size > 0 {
                    " + shared expert"
                } else {
                    ""
                }
            );
        }
        match &cfg.mla {
            Some(m) => println!(
                "attention           MLA, {} heads: q/k {} ({} nope + {} rope), v {}, kv_lora_rank {}, q_lora_rank {}",
                cfg.num_attention_heads,
                m.qk_head_dim(),
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim,
                m.kv_lora_rank,
                m.q_lora_rank.map_or("none".to_string(), |r| r.to_string())
            ),
            None => println!(
                "attention           {} heads / {} kv heads, head_dim {}",
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            ),
        }
        let (held, expanded) = (cfg.kv_bytes_per_token(), cfg.expanded_kv_bytes_per_token());
        if held == expanded {
            println!("kv cache            {held} bytes per token (f32, all layers)");
        } else {
            println!(
                "kv cache            {held} bytes per token (f32, all layers; compressed latent), {expanded} expanded ({:.1}×)",
                expanded as f64 / held as f64
            );
        }
        println!(
            "hidden / vocab      {} / {}",
            cfg.hidden_size, cfg.vocab_size
        );
        println!(
            "weight memory       {:.2} MiB in f32",
            weight_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
