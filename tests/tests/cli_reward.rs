//! `sobre reward` and `sobre bench rewards` through the binary.

mod common;

use common::{err_stderr, ok_stdout, sobre, sobre_in};

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn scores_each_line_with_null_where_not_applicable() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "in.jsonl",
        concat!(
            r#"{"completion": "<think>\nhalf\n</think>\n<answer>\n0.5\n</answer>", "answer": "\\frac{1}{2}"}"#,
            "\n\n",
            r#"{"completion": "<answer>(93-43)+1</answer>", "nums": [93, 43, 1], "target": 51}"#,
            "\n",
        ),
    );
    let out = ok_stdout(&sobre_in(
        dir.path(),
        &[
            "reward",
            "--rewards",
            "accuracy,format,countdown",
            "--input",
            &input,
        ],
    ));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0]["rewards"],
        serde_json::json!({"accuracy": 1.0, "format": 1.0, "countdown": null})
    );
    assert_eq!(rows[0]["total"], 2.0);
    assert_eq!(
        rows[1]["rewards"],
        serde_json::json!({"accuracy": null, "format": 0.0, "countdown": 1.0})
    );
    assert_eq!(rows[1]["total"], 1.0);
}

#[test]
fn malformed_line_is_an_error_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "bad.jsonl",
        "{\"completion\": \"\\\\boxed{1}\", \"answer\": \"1\"}\n{\"answer\": \"2\"}\nnot json\n",
    );
    let err = err_stderr(&sobre(&[
        "reward",
        "--rewards",
        "accuracy",
        "--input",
        &input,
    ]));
    assert!(
        err.contains("bad.jsonl:2") && err.contains("completion"),
        "{err}"
    );

    let out_path = dir.path().join("out.jsonl");
    let out = sobre(&[
        "reward",
        "--rewards",
        "accuracy",
        "--input",
        &input,
        "--skip-bad",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("skipped 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(written.lines().count(), 1);

    let err = err_stderr(&sobre(&[
        "reward",
        "--rewards",
        "acuracy",
        "--input",
        &input,
    ]));
    assert!(
        err.contains("unknown reward `acuracy`") && err.contains("accuracy"),
        "{err}"
    );
}

#[test]
fn config_file_sets_weights_and_params() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "rewards.toml",
        "[[reward]]\nname = \"accuracy\"\nweight = 2.0\n\n[[reward]]\nname = \"format\"\nweight = 0.5\nmode = \"lenient\"\n",
    );
    let input = write(
        dir.path(),
        "in.jsonl",
        r#"{"completion": "<think>x</think><answer>7</answer>", "answer": 7}"#,
    );
    let out = ok_stdout(&sobre(&["reward", "--config", &config, "--input", &input]));
    let row: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(row["total"], 2.5);
}

#[test]
fn bench_rewards_reports_json() {
    let out = ok_stdout(&sobre(&[
        "bench",
        "rewards",
        "--seconds",
        "0.2",
        "--completions",
        "200",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["evals_per_sec"].as_f64().unwrap() > 0.0);
    assert!(v["baseline_evals_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(v["threads"], 1);
}
