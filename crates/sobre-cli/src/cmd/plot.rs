//! `sobre plot`: a run's training curves as one PNG (sobre-plot).

use std::path::PathBuf;

use anyhow::Context;
use sobre_plot::{PlotOptions, plot_run};

/// Draw a run's curves (rewards per function, accuracy and eval pass@1, KL, completion length,
/// entropy, clip fraction, expert load imbalance, SFT loss) into a PNG.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  sobre plot runs/smoke                          # writes runs/smoke/curves.png
  sobre plot runs/smoke --out smoke.png --width 1800 --height 1200
  sobre plot runs/smoke/metrics.jsonl --title 'countdown, tiny preset'

Reads RUN_DIR/metrics.jsonl (written by `sobre train`) and draws one small panel per metric
family that has values; metrics a run does not log are left out, not drawn as zero. Text is
rendered with an embedded font, so no system fonts are needed.")]
pub struct Args {
    /// A run directory (with metrics.jsonl), or a metrics.jsonl file.
    pub run_dir: PathBuf,
    /// The PNG to write (default: RUN_DIR/curves.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1500)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 1000)]
    pub height: u32,
    /// Title above the panels (default: "sobre run: <directory name>").
    #[arg(long)]
    pub title: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let out = args.out.clone().unwrap_or_else(|| {
        let dir = if args.run_dir.is_file() {
            args.run_dir.parent().map(PathBuf::from).unwrap_or_default()
        } else {
            args.run_dir.clone()
        };
        dir.join("curves.png")
    });
    let opts = PlotOptions {
        width: args.width,
        height: args.height,
        title: args.title.clone(),
    };
    let summary = plot_run(&args.run_dir, &out, &opts)
        .with_context(|| format!("plotting {}", args.run_dir.display()))?;
    println!(
        "wrote {} ({}x{}, {} panels from {} metrics lines: {})",
        summary.out.display(),
        summary.width,
        summary.height,
        summary.panels.len(),
        summary.metrics_lines,
        summary.panels.join(", ")
    );
    Ok(())
}
