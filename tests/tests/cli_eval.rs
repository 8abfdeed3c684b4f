//! `sobre eval` end to end: a tiny model trained for one step by `sobre train`, evaluated on
//! held-out problems of its config and on a JSONL file; the JSON report's keys and ranges, the
//! `--out` files, batch independence, and clear errors.

mod common;

use std::path::{Path, PathBuf};

use common::{err_stderr, ok_stdout, root, sobre};
use serde_json::Value;

fn smoke() -> String {
    root().join("configs/smoke.toml").display().to_string()
}

/// A run directory with one SFT and one GRPO step of the smoke config (a few seconds).
fn tiny_run(tmp: &Path) -> PathBuf {
    let run = tmp.join("run");
    let out = sobre(&[
        "train",
        "--config",
        &smoke(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        "sft.steps=1",
        "--set",
        "run.steps=1",
    ]);
    ok_stdout(&out);
    run
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn unit(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number: {v}"));
    assert!((0.0..=1.0).contains(&x), "`{key}` = {x} is outside [0, 1]");
    x
}

#[test]
fn eval_reports_keys_ranges_and_writes_every_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    let out_dir = tmp.path().join("eval");
    let args = [
        "eval",
        "--model",
        run.to_str().unwrap(),
        "--config",
        &smoke(),
        "--n",
        "6",
        "--samples",
        "3",
        "--max-new-tokens",
        "12",
        "--json",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let stdout = ok_stdout(&sobre(&args));
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
    let p1 = unit(&report, "pass@1");
    let pk = unit(&report, "pass@k");
    unit(&report, "maj@k");
    unit(&report, "format_rate");
    unit(&report, "truncated_rate");
    assert!(pk >= p1, "pass@k {pk} < pass@1 {p1}");
    assert_eq!(report["n_problems"], 6);
    assert_eq!(report["samples"], 3);
    assert_eq!(report["k"], 3);
    assert_eq!(report["correct_reward"], "countdown");
    assert_eq!(
        report["temperature"].as_f64(),
        Some(1.0),
        "K > 1 samples at temperature 1 by default"
    );
    let len = report["mean_length"].as_f64().unwrap();
    assert!(len > 0.0 && len <= 12.0, "mean_length {len}");
    let rewards = report["rewards"].as_object().unwrap();
    for name in ["countdown", "format"] {
        let r = rewards[name].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{name} mean {r}");
    }
    assert!(
        report["model"].as_str().unwrap().contains("step-000001"),
        "the run's newest checkpoint"
    );

    // --out: eval.json is the report; samples.jsonl has one line per sample.
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(written, report);
    let samples = json_lines(&out_dir.join("samples.jsonl"));
    assert_eq!(samples.len(), 18, "6 problems × 3 samples");
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["problem"], i / 3);
        assert_eq!(s["sample"], i % 3);
        assert!(s["prompt"].as_str().unwrap().contains("Using the numbers"));
        assert!(
            s["completion"].is_string() && s["correct"].is_boolean() && s["format"].is_boolean()
        );
        assert!(s["rewards"].get("countdown").is_some() && s["rewards"].get("format").is_some());
        assert!(s["tokens"].as_u64().unwrap() <= 12);
    }
    // pass@1 is the mean of the per-sample verdicts (3 per problem).
    let correct = samples.iter().filter(|s| s["correct"] == true).count() as f64;
    assert!((p1 - correct / 18.0).abs() < 1e-9);

    // Results do not depend on how problems are batched.
    let out2 = tmp.path().join("eval2");
    let mut args2 = args.to_vec();
    let last = args2.len() - 1;
    args2[last] = out2.to_str().unwrap();
    args2.extend(["--batch-problems", "2"]);
    ok_stdout(&sobre(&args2));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("samples.jsonl")).unwrap(),
        std::fs::read_to_string(out2.join("samples.jsonl")).unwrap()
    );
    // Nor on how many replicas generate them (3 threads, shards of 2 problems).
    let out3 = tmp.path().join("eval3");
    let mut args3 = args.to_vec();
    args3[last] = out3.to_str().unwrap();
    args3.extend(["--data-parallel-size", "3"]);
    ok_stdout(&sobre(&args3));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("samples.jsonl")).unwrap(),
        std::fs::read_to_string(out3.join("samples.jsonl")).unwrap()
    );
    let mut zero = args.to_vec();
    zero.extend(["--data-parallel-size", "0"]);
    let e = err_stderr(&sobre(&zero));
    assert!(e.contains("--data-parallel-size must be at least 1"), "{e}");

    // A JSONL file: countdown fields → countdown + format rewards; greedy for one sample.
    let ckpt = run.join("checkpoints/step-000001");
    let data = root().join("datasets/countdown/eval.jsonl");
    let stdout = ok_stdout(&sobre(&[
        "eval",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--n",
        "4",
        "--max-new-tokens",
        "8",
        "--json",
    ]));
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["n_problems"], 4);
    assert_eq!(report["samples"], 1);
    assert_eq!(report["temperature"].as_f64(), Some(0.0));
    assert_eq!(report["pass@1"], report["pass@k"], "k = 1");
    let names: Vec<&String> = report["rewards"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["countdown", "format"]);

    // The human-readable report.
    let text = ok_stdout(&sobre(&[
        "eval",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--n",
        "2",
        "--max-new-tokens",
        "4",
    ]));
    for key in [
        "pass@1",
        "maj@1",
        "format_rate",
        "mean_length",
        "countdown >= 1",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }

    // Errors: a model directory without a tokenizer, a missing model, a missing data file.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(ckpt.join(f), bare.join(f)).unwrap();
    }
    let err = err_stderr(&sobre(&[
        "eval",
        "--model",
        bare.to_str().unwrap(),
        "--config",
        &smoke(),
    ]));
    assert!(
        err.contains("has no tokenizer.json") && err.contains("--tokenizer"),
        "{err}"
    );
    // … which --tokenizer fixes.
    ok_stdout(&sobre(&[
        "eval",
        "--model",
        bare.to_str().unwrap(),
        "--tokenizer",
        ckpt.to_str().unwrap(),
        "--config",
        &smoke(),
        "--n",
        "1",
        "--max-new-tokens",
        "2",
    ]));
    let err = err_stderr(&sobre(&[
        "eval",
        "--model",
        "no/such/model",
        "--config",
        &smoke(),
    ]));
    assert!(
        err.contains("no/such/model") && err.contains("does not exist"),
        "{err}"
    );
    let err = err_stderr(&sobre(&[
        "eval",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        "no/such.jsonl",
    ]));
    assert!(err.contains("no/such.jsonl"), "{err}");
    let err = err_stderr(&sobre(&["eval", "--model", ckpt.to_str().unwrap()]));
    assert!(err.contains("--config"), "{err}");
    let err = err_stderr(&sobre(&[
        "eval",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rewards",
        "countdwn",
    ]));
    assert!(err.contains("countdwn"), "{err}");
}

/// After a run with its end-of-run evaluation, `sobre eval --model RUN_DIR` prints that table,
/// what the run cost and the cost per held-out point gained over the SFT checkpoint.
#[test]
fn eval_of_a_run_directory_prints_its_cost_per_point_gained() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let train = sobre(&[
        "train",
        "--config",
        &smoke(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        "run.steps=2",
        "--set",
        "eval.at_end=true",
        "--set",
        "eval.n=4",
    ]);
    ok_stdout(&train);
    let fe: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final_eval.json")).unwrap())
            .unwrap();
    let cost = &fe["cost"];
    for key in [
        "wall_seconds",
        "cpu_seconds",
        "flops_estimate",
        "energy_wh_estimate",
    ] {
        assert!(cost[key].as_f64().unwrap() > 0.0, "{key}: {cost}");
    }
    assert!(cost["tokens_generated"].as_u64().unwrap() > 0, "{cost}");
    let stdout = ok_stdout(&sobre(&[
        "eval",
        "--model",
        run.to_str().unwrap(),
        "--config",
        &smoke(),
        "--n",
        "4",
    ]));
    assert!(
        stdout.contains("end-of-run comparison of this run"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cost: ") && stdout.contains("CPU-s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cost per held-out point gained: "),
        "{stdout}"
    );
}
