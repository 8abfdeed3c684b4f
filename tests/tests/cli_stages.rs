//! R1's staged pipeline and distillation traces through the binary: `sobre train` on a
//! `[[stage]]` config keeps every stage's checkpoint, `sobre generate --config … --keep`
//! writes SFT rows from a checkpoint, and a config mixing the two forms is refused naming both.

mod common;

use common::{err_stderr, ok_stdout, sobre_in};
use serde_json::Value;

#[test]
fn a_staged_run_and_traces_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("staged.toml"),
        common::staged(common::R1_STAGES),
    )
    .unwrap();
    let out = ok_stdout(&sobre_in(
        dir.path(),
        &[
            "train",
            "--config",
            "staged.toml",
            "--out",
            "run",
            "--quiet",
        ],
    ));
    assert!(out.contains("done: 3 SFT + 2 GRPO steps"), "{out}");
    for name in ["cold_start", "rl", "sft_again"] {
        let state = dir
            .path()
            .join("run/checkpoints")
            .join(name)
            .join("trainer_state.json");
        assert!(state.exists(), "{}", state.display());
    }
    // k = 1 (default): one completion for each of the 4 prompts (threshold 0 passes all).
    let rs = std::fs::read_to_string(dir.path().join("run/stages/rs/sft.jsonl")).unwrap();
    assert_eq!(rs.lines().count(), 4, "{rs}");

    // Traces from the RL checkpoint: 3 problems × 2 samples, all passing, distinct per problem.
    let out = sobre_in(
        dir.path(),
        &[
            "generate",
            "--model",
            "run/checkpoints/rl",
            "--config",
            "staged.toml",
            "-n",
            "2",
            "--limit",
            "3",
            "--min-reward",
            "0",
            "--out",
            "traces.jsonl",
        ],
    );
    ok_stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("of 6 completions") && stderr.contains("of 3 problems"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(dir.path().join("traces.jsonl")).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!((3..=6).contains(&rows.len()), "{text}");
    for r in &rows {
        assert!(
            r["nums"].is_array() && r["prompt"].is_string() && r["completion"].is_string(),
            "{r}"
        );
    }
    // `--keep correct` keeps only what the countdown reward scores 1: check each with `sobre reward`.
    let out = sobre_in(
        dir.path(),
        &[
            "generate",
            "--model",
            "run/checkpoints/rl",
            "--config",
            "staged.toml",
            "-n",
            "2",
            "--limit",
            "8",
            "--keep",
            "correct",
            "--out",
            "correct.jsonl",
        ],
    );
    ok_stdout(&out);
    let kept = std::fs::read_to_string(dir.path().join("correct.jsonl")).unwrap();
    if !kept.trim().is_empty() {
        let scored = ok_stdout(&sobre_in(
            dir.path(),
            &[
                "reward",
                "--config",
                "staged.toml",
                "--input",
                "correct.jsonl",
            ],
        ));
        for line in scored.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["rewards"]["countdown"], 1.0, "{line}");
        }
    }
}

#[test]
fn mixing_the_two_forms_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::staged(common::R1_STAGES).replacen("[sft]\n", "[sft]\nsteps = 3\n", 1);
    std::fs::write(dir.path().join("mixed.toml"), text).unwrap();
    let e = err_stderr(&sobre_in(dir.path(), &["train", "--config", "mixed.toml"]));
    assert!(e.contains("sft.steps") && e.contains("[[stage]]"), "{e}");
}
