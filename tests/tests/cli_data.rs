//! `sobre data` and `sobre tokenizer` through the binary: generate → check → train → encode.

mod common;

use common::{err_stderr, ok_stdout, sobre, sobre_in};

#[test]
fn generate_check_train_encode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let out = ok_stdout(&sobre_in(
        d,
        &[
            "data",
            "countdown",
            "--n",
            "50",
            "--seed",
            "1",
            "--min-count",
            "3",
            "--max-count",
            "3",
            "--max-number",
            "20",
            "--demos",
            "--out",
            "cd.jsonl",
        ],
    ));
    assert_eq!(
        out.trim(),
        "wrote 50 countdown train samples with demonstrations (seed 1) to cd.jsonl"
    );
    let text = std::fs::read_to_string(d.join("cd.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    // Same problem as the first row of datasets/countdown/sft_demos.jsonl's generator (seed 1).
    assert_eq!(first["nums"], serde_json::json!([15, 11, 8]));
    assert_eq!(first["target"], 4);
    assert_eq!(
        first["completion"],
        "<think>\n15 - 11 = 4, 8 - 4 = 4\n</think>\n<answer>\n8 - (15 - 11)\n</answer>"
    );

    let out = ok_stdout(&sobre_in(d, &["data", "check", "cd.jsonl"]));
    assert!(out.contains("rows: 50 (valid 50, invalid 0)"), "{out}");
    assert!(out.contains("duplicates: 0 (by countdown key)"), "{out}");
    assert!(out.contains("unsolvable (integer steps): 0"), "{out}");
    assert!(
        out.contains("  nums: present 50, type array×50, length 3..3"),
        "{out}"
    );

    ok_stdout(&sobre_in(
        d,
        &[
            "data",
            "arithmetic",
            "--n",
            "30",
            "--seed",
            "2",
            "--ops",
            "+,*",
            "--out",
            "ar.jsonl",
        ],
    ));
    let out = ok_stdout(&sobre_in(d, &["data", "check", "ar.jsonl"]));
    assert!(out.contains("rows: 30 (valid 30, invalid 0)"), "{out}");
    assert!(out.contains("duplicates: 0 (by prompt key)"), "{out}");

    let out = ok_stdout(&sobre_in(
        d,
        &[
            "tokenizer",
            "train",
            "--data",
            "cd.jsonl",
            "ar.jsonl",
            "--vocab-size",
            "400",
            "--out",
            "tok",
        ],
    ));
    assert!(out.contains("from 160 texts in 2 files -> tok"), "{out}");
    assert!(
        out.contains("special ids: eos 0 pad 1 <think> 2 </think> 3 <answer> 4 </answer> 5"),
        "{out}"
    );
    assert!(
        d.join("tok/tokenizer.json").is_file() && d.join("tok/tokenizer_config.json").is_file()
    );

    let out = ok_stdout(&sobre_in(
        d,
        &[
            "tokenizer",
            "encode",
            "--tokenizer",
            "tok",
            "--text",
            "<think>\n12 + 3</think>",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tokens: Vec<&str> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens[0], "<think>");
    assert_eq!(*tokens.last().unwrap(), "</think>");
    // Digits are always single tokens.
    assert!(
        tokens.contains(&"1") && tokens.contains(&"2") && tokens.contains(&"3"),
        "{tokens:?}"
    );
    assert_eq!(v["ids"][0], 2);
    assert_eq!(v["count"], v["ids"].as_array().unwrap().len());
}

#[test]
fn check_reports_invalid_rows_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"prompt\": \"a\"}\n{\"prompt\": \"a\"}\n{\"answer\": \"1\"}\nnot json\n",
    )
    .unwrap();
    let out = sobre_in(dir.path(), &["data", "check", "bad.jsonl"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = err_stderr(&out);
    assert!(stdout.contains("rows: 4 (valid 2, invalid 2)"), "{stdout}");
    assert!(stdout.contains("duplicates: 1 (by prompt key)"), "{stdout}");
    assert!(
        stdout.contains("bad.jsonl:3: field `prompt`: expected a string or a list"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bad.jsonl:4: not a JSON object"),
        "{stdout}"
    );
    assert!(
        stderr.contains("bad.jsonl: 2 of 4 rows are invalid"),
        "{stderr}"
    );
}

#[test]
fn shipped_datasets_pass_check() {
    for f in [
        "datasets/countdown/train.jsonl",
        "datasets/countdown/eval.jsonl",
        "datasets/arithmetic/train.jsonl",
    ] {
        let out = ok_stdout(&sobre(&["data", "check", f]));
        assert!(
            out.contains("invalid 0)") && out.contains("duplicates: 0"),
            "{f}: {out}"
        );
    }
}

#[test]
fn help_has_examples() {
    let out = ok_stdout(&sobre(&["data", "--help"]));
    assert!(
        out.contains("Examples:") && out.contains("sobre data countdown --n 2000"),
        "{out}"
    );
    let out = ok_stdout(&sobre(&["tokenizer", "--help"]));
    assert!(out.contains("sobre tokenizer train --data"), "{out}");
    let err = err_stderr(&sobre(&[
        "data",
        "countdown",
        "--n",
        "5",
        "--seed",
        "1",
        "--min-count",
        "9",
        "--out",
        "/tmp/x.jsonl",
    ]));
    assert!(
        err.contains("invalid countdown option: count range 9..=4"),
        "{err}"
    );
}
