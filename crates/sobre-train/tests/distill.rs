//! On-policy distillation (`grpo.teacher`) on the tiny preset: a teacher identical to the
//! student gives no signal, a trained teacher pulls a fresh student towards it, and a teacher
//! with another tokenizer or settings without a teacher are errors naming the key.

mod common;

use std::path::Path;

use serde_json::Value;
use sobre_train::pipeline::Pipeline;

fn pipeline(dir: &Path, sets: &[String]) -> Result<Pipeline, sobre_train::TrainError> {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    common::pipeline(
        &common::smoke(),
        "configs/smoke.toml",
        &sets,
        dir,
        false,
        None,
    )
}

fn sets(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m["stage"] == "grpo")
        .collect()
}

/// The teacher: the smoke config's SFT checkpoint after 30 steps (same tokenizer as every
/// student below: same tokenizer settings, data and seed).
fn teacher(dir: &Path) -> String {
    pipeline(dir, &sets(&["sft.steps=150", "sft.lr=1e-2", "run.steps=0"]))
        .unwrap()
        .run()
        .unwrap();
    dir.join("checkpoints/sft").display().to_string()
}

#[test]
fn distillation_signal_vanishes_for_itself_and_pulls_a_fresh_student_to_the_teacher() {
    let t = tempfile::tempdir().unwrap();
    let teacher_dir = teacher(t.path());

    // Teacher = the student's own starting weights: at the first step the sampled tokens'
    // log-probabilities are the teacher's (host engine on both sides), so the reverse KL is 0
    // to float noise and the per-token advantages are the verifier's alone.
    let same = tempfile::tempdir().unwrap();
    pipeline(
        same.path(),
        &sets(&[
            &format!("model.path={teacher_dir}"),
            "sft.steps=0",
            "run.steps=1",
            &format!("grpo.teacher={teacher_dir}"),
        ]),
    )
    .unwrap()
    .run()
    .unwrap();
    let m = metrics(same.path());
    let rkl = m[0]["teacher/reverse_kl"].as_f64().unwrap();
    assert!(rkl.abs() < 1e-4, "self-distillation reverse KL {rkl}");
    assert!(m[0]["time_teacher"].as_f64().unwrap() >= 0.0);

    // A fresh student (random init, no SFT) taught by the trained teacher alone: the
    // verifier's advantage is off and the reverse KL on its own samples falls.
    let fresh = tempfile::tempdir().unwrap();
    pipeline(
        fresh.path(),
        &sets(&[
            "sft.steps=0",
            "run.steps=30",
            "grpo.beta=0",
            "optim.lr=1e-2",
            "optim.schedule=constant",
            &format!("grpo.teacher={teacher_dir}"),
            "grpo.teacher_only=true",
        ]),
    )
    .unwrap()
    .run()
    .unwrap();
    let m = metrics(fresh.path());
    assert_eq!(m.len(), 30);
    for line in &m {
        assert_eq!(line["advantage_mean"].as_f64(), Some(0.0));
        assert_eq!(line["advantage_abs_max"].as_f64(), Some(0.0));
    }
    let kl = |i: usize| m[i]["teacher/reverse_kl"].as_f64().unwrap();
    let first = (kl(0) + kl(1)) / 2.0;
    let last = (kl(28) + kl(29)) / 2.0;
    assert!(
        first > 1.0,
        "a random student should be far from the teacher: {first}"
    );
    assert!(
        last < 0.8 * first,
        "30 distillation steps should cut the reverse KL by at least 20%: {first} → {last}"
    );
}

#[test]
fn a_teacher_with_another_tokenizer_is_refused_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    pipeline(
        t.path(),
        &sets(&["tokenizer.vocab_size=300", "sft.steps=1", "run.steps=0"]),
    )
    .unwrap()
    .run()
    .unwrap();
    let other = t.path().join("checkpoints/sft").display().to_string();
    let s = tempfile::tempdir().unwrap();
    let err = pipeline(
        s.path(),
        &sets(&[
            "sft.steps=0",
            "run.steps=1",
            &format!("grpo.teacher={other}"),
        ]),
    )
    .unwrap()
    .run()
    .expect_err("a teacher with another tokenizer must be refused")
    .to_string();
    assert!(
        err.contains("grpo.teacher") && err.contains("does not share the student's tokenizer"),
        "{err}"
    );
}

#[test]
fn teacher_settings_are_checked_when_the_config_loads() {
    let d = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["grpo.teacher_coef=0.5"], "grpo.teacher_coef"),
        (&["grpo.teacher_only=true"], "grpo.teacher_only"),
        (&["grpo.teacher=/nonexistent/teacher"], "grpo.teacher"),
        (
            &[
                "grpo.teacher=.",
                "grpo.teacher_only=true",
                "grpo.filter_zero_std_groups=true",
            ],
            "grpo.filter_zero_std_groups",
        ),
    ];
    for (set, key) in cases {
        let err = pipeline(d.path(), &sets(set))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(key), "{set:?}: `{err}` should name {key}");
    }
}
