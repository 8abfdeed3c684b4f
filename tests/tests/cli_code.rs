//! The code and command rewards through the binary: `sobre data functions` writes problems whose
//! demonstrations pass their own hidden tests in the sandbox (and broken ones fail), the example
//! verifier scores through `sobre reward`, and `sobre train` runs GRPO on the functions task with
//! the `code` reward. Skipped (with a printed reason) where `python3` is absent.

mod common;

use common::{ok_stdout, root, sobre_in};
use serde_json::Value;

fn python3() -> bool {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: python3 not found");
    }
    found
}

fn rows(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn functions_demonstrations_pass_their_tests_and_broken_ones_fail() {
    if !python3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = ok_stdout(&sobre_in(
        dir.path(),
        &[
            "data",
            "functions",
            "--n",
            "6",
            "--seed",
            "3",
            "--demos",
            "--out",
            "f.jsonl",
        ],
    ));
    assert!(out.contains("wrote 6 functions train samples"), "{out}");
    let problems = rows(&std::fs::read_to_string(dir.path().join("f.jsonl")).unwrap());
    assert_eq!(problems.len(), 6);
    // Each problem twice: its demonstration, then the same code with the constant moved by one.
    let mut input = String::new();
    for p in &problems {
        assert_eq!(p["entry_point"], "f");
        let demo = p["completion"].as_str().unwrap().to_string();
        let broken = demo.replace("\n```\n</answer>", "+1\n```\n</answer>");
        assert_ne!(demo, broken);
        for completion in [demo, broken] {
            let mut row = p.clone();
            row["completion"] = Value::from(completion);
            input.push_str(&row.to_string());
            input.push('\n');
        }
    }
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(
        dir.path().join("code.toml"),
        "[[reward]]\nname = \"code\"\nall_or_nothing = true\ntimeout_s = 5.0\n",
    )
    .unwrap();
    let out = ok_stdout(&sobre_in(
        dir.path(),
        &["reward", "--config", "code.toml", "--input", "in.jsonl"],
    ));
    let scores: Vec<f64> = rows(&out)
        .iter()
        .map(|r| r["rewards"]["code"].as_f64().expect("a code score"))
        .collect();
    assert_eq!(scores, [1.0, 0.0].repeat(6), "{out}");
}

#[test]
fn the_example_verifier_scores_through_sobre_reward() {
    if !python3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let verifier = root().join("examples/verifier.py");
    std::fs::write(
        dir.path().join("cmd.toml"),
        format!(
            "[[reward]]\nname = \"command\"\ncommand = [\"python3\", {:?}]\ncomponents = [\"correct\", \"short\"]\n",
            verifier.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("in.jsonl"),
        concat!(
            r#"{"completion": "<think>x</think><answer>42</answer>", "answer": "42"}"#,
            "\n",
            r#"{"completion": "<think>x</think><answer>41</answer>", "answer": "42"}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = ok_stdout(&sobre_in(
        dir.path(),
        &["reward", "--config", "cmd.toml", "--input", "in.jsonl"],
    ));
    let r = rows(&out);
    assert_eq!(r.len(), 2, "{out}");
    // Each component the program returns is logged under `command/<name>`.
    assert_eq!(r[0]["rewards"]["command/correct"], 1.0, "{out}");
    assert_eq!(r[1]["rewards"]["command/correct"], 0.0, "{out}");
    let short = r[0]["rewards"]["command/short"].as_f64().unwrap();
    assert!((short - 0.1).abs() < 1e-6, "{out}");
    let total = r[0]["total"].as_f64().unwrap();
    assert!((total - 1.1).abs() < 1e-6, "{out}");
}

#[test]
fn grpo_trains_on_the_functions_task_through_the_code_reward() {
    if !python3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = concat!(
        "[model]\npreset = \"tiny\"\n",
        "[tokenizer]\nvocab_size = 300\ntrain_samples = 100\n",
        "[data]\ntask = \"functions\"\nsft_size = 32\ntrain_size = 32\neval_size = 4\n",
        "[template]\nname = \"plain\"\n",
        "[sft]\nsteps = 2\nbatch_size = 4\nmax_length = 96\n",
        "[rollout]\nmax_new_tokens = 16\n",
        "[[reward]]\nname = \"code\"\nall_or_nothing = true\ntimeout_s = 5.0\n",
        "[grpo]\nnum_prompts = 2\ngroup_size = 4\n",
        "[run]\nsteps = 2\nseed = 3\nlog_every = 1\nsave_every = 2\n",
        "[eval]\neval_every = 0\nn = 4\nsamples_per_problem = 2\nat_end = true\n",
    );
    std::fs::write(dir.path().join("code.toml"), cfg).unwrap();
    let out = ok_stdout(&sobre_in(
        dir.path(),
        &["train", "--config", "code.toml", "--out", "run", "--quiet"],
    ));
    assert!(out.contains("done: 2 SFT + 2 GRPO steps"), "{out}");
    let metrics = rows(&std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap());
    let grpo: Vec<&Value> = metrics.iter().filter(|m| m["stage"] != "sft").collect();
    assert_eq!(grpo.len(), 2);
    for m in grpo {
        let code = m["rewards/code/mean"].as_f64().expect("rewards/code/mean");
        assert!((0.0..=1.0).contains(&code), "{m}");
        // Every completion was run: the code reward applies to each one.
        assert_eq!(m["reward_mean"].as_f64(), Some(code), "{m}");
    }
    let eval: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/final_eval.json")).unwrap(),
    )
    .unwrap();
    let rows_ = eval["rows"].as_array().expect("rows");
    assert!(!rows_.is_empty(), "{eval}");
    for row in rows_ {
        assert_eq!(row["report"]["correct_reward"], "code", "{eval}");
        assert_eq!(row["report"]["n_problems"], 4, "{eval}");
    }
}
