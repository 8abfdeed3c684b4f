//! `sobre plot` end to end: a synthetic metrics.jsonl → a PNG of the requested size; the panels
//! named; bad input gives errors that name the file and line. (Pixels per panel are checked by
//! sobre-plot's own tests, which decode the PNG.)

mod common;

use std::path::Path;

use common::{err_stderr, ok_stdout, sobre};

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

fn synthetic_metrics(dir: &Path) {
    let mut text = String::new();
    text.push_str("{\"stage\":\"sft\",\"step\":1,\"loss\":3.0}\n{\"stage\":\"sft\",\"step\":2,\"loss\":2.0}\n");
    for s in 1..=12 {
        let t = s as f64 / 12.0;
        text.push_str(&format!(
            "{{\"stage\":\"grpo\",\"step\":{s},\"reward_mean\":{},\"rewards/countdown/mean\":{},\"rewards/format/mean\":{},\"accuracy\":{},\"kl\":{},\"completion_length_mean\":{},\"entropy\":{},\"clip_fraction\":{},\"expert_imbalance\":{}{}}}\n",
            0.2 + t,
            0.1 + t / 2.0,
            t,
            t / 3.0,
            0.01 * t,
            30.0 - 5.0 * t,
            2.0 - t,
            0.05 * t,
            1.5 - 0.2 * t,
            if s % 4 == 0 { format!(",\"eval/pass@1\":{}", t / 4.0) } else { String::new() }
        ));
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn plot_writes_a_png_of_the_requested_size() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_metrics(tmp.path());
    let png = tmp.path().join("out/curves.png");
    let stdout = ok_stdout(&sobre(&[
        "plot",
        tmp.path().to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--width",
        "900",
        "--height",
        "640",
    ]));
    assert_eq!(png_size(&png), (900, 640));
    assert!(
        stdout.contains("8 panels from 14 metrics lines"),
        "{stdout}"
    );
    for title in [
        "Reward per function",
        "Accuracy",
        "KL",
        "Completion length",
        "Entropy",
        "Clip fraction",
        "Expert load imbalance",
        "SFT loss",
    ] {
        assert!(stdout.contains(title), "{title} missing: {stdout}");
    }
    // Default output: RUN_DIR/curves.png at 1500×1000.
    ok_stdout(&sobre(&["plot", tmp.path().to_str().unwrap()]));
    assert_eq!(png_size(&tmp.path().join("curves.png")), (1500, 1000));
}

#[test]
fn plot_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let err = err_stderr(&sobre(&["plot", dir]));
    assert!(err.contains("metrics.jsonl not found"), "{err}");
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"step\":1,\"kl\":0.5}\n{\"step\":2,\"kl\":0.4\n",
    )
    .unwrap();
    let err = err_stderr(&sobre(&["plot", dir]));
    assert!(err.contains("metrics.jsonl:2: not valid JSON"), "{err}");
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"step\":1,\"kl\":0.5}\n",
    )
    .unwrap();
    let err = err_stderr(&sobre(&["plot", dir, "--width", "10"]));
    assert!(err.contains("out of range"), "{err}");
    assert!(!tmp.path().join("curves.png").exists());
}
