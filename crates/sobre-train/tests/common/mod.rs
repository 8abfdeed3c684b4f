//! What the whole-run tests share: the smoke config and a run of a config text.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;

use sobre_train::Config;
use sobre_train::pipeline::{Pipeline, RunOptions, Summary};

/// configs/smoke.toml's text.
pub fn smoke() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml");
    std::fs::read_to_string(p).expect("configs/smoke.toml")
}

/// The pipeline of config `text` (named `name` in errors) with `--set` overrides `sets`, run
/// quietly into `dir`.
pub fn pipeline(
    text: &str,
    name: &str,
    sets: &[&str],
    dir: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<Pipeline, sobre_train::TrainError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (cfg, src) = Config::parse(text, name, &sets)?;
    let opts = RunOptions {
        resume,
        out_dir: Some(dir.to_path_buf()),
        stop: None,
        quiet: true,
        stop_after,
    };
    Pipeline::new(cfg, src, opts)
}

/// [`pipeline`], run to its end (or `stop_after`); panics on an error.
pub fn run(
    text: &str,
    name: &str,
    sets: &[&str],
    dir: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> Summary {
    pipeline(text, name, sets, dir, resume, stop_after)
        .unwrap()
        .run()
        .unwrap()
}
