//! `sobre train` end to end: the smoke config through the binary, the run directory it leaves,
//! the metrics keys, config errors, and exact resume.

mod common;

use common::{err_stderr, ok_stdout, root, sobre};
use serde_json::Value;

fn smoke() -> String {
    root().join("configs/smoke.toml").display().to_string()
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn smoke_run_leaves_a_run_directory_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let out = sobre(&[
        "train",
        "--config",
        &smoke(),
        "--out",
        straight.to_str().unwrap(),
        "--quiet",
    ]);
    let stdout = ok_stdout(&out);
    assert!(stdout.contains("done: 2 SFT + 4 GRPO steps"), "{stdout}");

    // The run directory.
    for f in [
        "config.toml",
        "metrics.jsonl",
        "samples.jsonl",
        "tokenizer/tokenizer.json",
    ] {
        assert!(straight.join(f).exists(), "missing {f}");
    }
    let resolved = std::fs::read_to_string(straight.join("config.toml")).unwrap();
    assert!(
        resolved.contains("[grpo]")
            && resolved.contains("group_size = 4")
            && resolved.contains("kl_estimator")
    );
    for c in ["sft", "step-000002", "step-000004"] {
        let d = straight.join("checkpoints").join(c);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(d.join(f).exists(), "missing {c}/{f}");
        }
    }

    // Metrics: 2 SFT lines then 4 GRPO lines with every key.
    let metrics = lines(&straight.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 6);
    assert_eq!(metrics.iter().filter(|m| m["stage"] == "sft").count(), 2);
    let last = &metrics[5];
    for key in [
        "step",
        "reward_mean",
        "reward_std",
        "rewards/countdown/mean",
        "rewards/format/mean",
        "accuracy",
        "advantage_mean",
        "advantage_std",
        "loss",
        "kl",
        "clip_fraction",
        "entropy",
        "completion_length_mean",
        "completion_length_max",
        "truncated_fraction",
        "zero_std_fraction",
        "grad_norm",
        "lr",
        "logprob_mismatch",
        "expert_load",
        "expert_imbalance",
        "time_rollout",
        "time_reference",
        "time_policy",
        "tokens_per_second",
        "peak_rss_mib",
        "skipped",
    ] {
        assert!(
            last.get(key).is_some(),
            "metrics.jsonl lacks `{key}`: {last}"
        );
    }
    assert_eq!(last["step"], 4);
    assert!(last["loss"].as_f64().unwrap().is_finite());
    let samples = lines(&straight.join("samples.jsonl"));
    assert_eq!(samples.len(), 8, "2 samples × 4 steps");
    assert!(samples[0].get("completion").is_some() && samples[0].get("reward").is_some());

    // Stop after 2 steps, then resume to the end: same final weights as the straight run.
    let resumed = tmp.path().join("resumed");
    let r = resumed.to_str().unwrap();
    let out = sobre(&[
        "train",
        "--config",
        &smoke(),
        "--out",
        r,
        "--quiet",
        "--stop-after",
        "2",
    ]);
    ok_stdout(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--resume"),
        "the resume command is printed: {err}"
    );
    assert!(!resumed.join("checkpoints/step-000004").exists());
    // Without --resume a run directory with checkpoints is refused.
    let refused = err_stderr(&sobre(&[
        "train",
        "--config",
        &smoke(),
        "--out",
        r,
        "--quiet",
    ]));
    assert!(refused.contains("--resume"), "{refused}");
    ok_stdout(&sobre(&[
        "train",
        "--config",
        &smoke(),
        "--out",
        r,
        "--quiet",
        "--resume",
    ]));
    let a = std::fs::read(straight.join("checkpoints/step-000004/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("checkpoints/step-000004/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the straight run");
    assert_eq!(lines(&resumed.join("metrics.jsonl")).len(), 6);
}

#[test]
fn config_errors_name_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[data]\ntask = \"countdown\"\n\n[grpo]\ngroup_sise = 4\n",
    )
    .unwrap();
    let err = err_stderr(&sobre(&["train", "--config", cfg.to_str().unwrap()]));
    assert!(
        err.contains("bad.toml:5:1") && err.contains("did you mean `group_size`?"),
        "{err}"
    );
    std::fs::write(&cfg, "[data]\ntask = \"countdown\"\n\n[grpo]\nnum_prompts = 3\ngroup_size = 4\nmini_batch_size = 5\n").unwrap();
    let err = err_stderr(&sobre(&["train", "--config", cfg.to_str().unwrap()]));
    assert!(
        err.contains("bad.toml:7") && err.contains("grpo.mini_batch_size"),
        "{err}"
    );
    let err = err_stderr(&sobre(&[
        "train",
        "--config",
        &smoke(),
        "--set",
        "grpo.loss=\"ppo\"",
    ]));
    assert!(
        err.contains("--set grpo.loss") && err.contains("grpo"),
        "{err}"
    );
    let err = err_stderr(&sobre(&["train", "--config", &smoke(), "--device", "cuda"]));
    assert!(err.contains("feature"), "{err}");
}
