//! Write a model directory with sobre, for checking it with transformers
//! (`scripts/check_hf.py`, `scripts/make_hf_fixtures.py`).
//!
//! ```text
//! cargo run --release -p sobre-model --example write_model -- preset tiny 7 0.5 OUT [SHARD_BYTES]
//! cargo run --release -p sobre-model --example write_model -- resave SRC OUT [SHARD_BYTES]
//! ```
//! `preset NAME SEED INIT_RANGE`: a preset initialised from SEED with `initializer_range` set to
//! INIT_RANGE. `resave SRC`: a model directory loaded and written back by sobre.

use std::path::PathBuf;
use std::process::ExitCode;

use sobre_model::{ModelConfig, default_device, init_model, load_model, save_model};

fn run(args: &[String]) -> Result<(), String> {
    let device = default_device();
    let shard = |i: usize| -> Result<Option<usize>, String> {
        args.get(i)
            .map(|s| s.parse().map_err(|e| format!("SHARD_BYTES `{s}`: {e}")))
            .transpose()
    };
    match args.first().map(String::as_str) {
        Some("preset") if args.len() >= 5 => {
            let mut cfg = ModelConfig::preset(&args[1]).map_err(|e| e.to_string())?;
            let seed: u64 = args[2].parse().map_err(|e| format!("SEED: {e}"))?;
            cfg.initializer_range = args[3].parse().map_err(|e| format!("INIT_RANGE: {e}"))?;
            let model = init_model(&cfg, seed, &device);
            save_model(&model, &PathBuf::from(&args[4]), shard(5)?).map_err(|e| e.to_string())
        }
        Some("resave") if args.len() >= 3 => {
            let model = load_model(&PathBuf::from(&args[1]), &device).map_err(|e| e.to_string())?;
            save_model(&model, &PathBuf::from(&args[2]), shard(3)?).map_err(|e| e.to_string())
        }
        _ => Err(
            "usage: write_model preset NAME SEED INIT_RANGE OUT [SHARD_BYTES]\n       \
                  write_model resave SRC OUT [SHARD_BYTES]"
                .into(),
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_model: {e}");
            ExitCode::FAILURE
        }
    }
}
