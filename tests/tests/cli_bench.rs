//! `sobre bench step` end to end on a tiny override of the W1 config: the JSON report has its
//! keys, the phases add up to no more than the step, prompts have the asked length, and the
//! leak check reports. (No timing is asserted: figures depend on the machine.)

mod common;

use common::{ok_stdout, root, sobre};
use serde_json::Value;

#[test]
fn bench_step_reports_phases_tokens_rss_and_a_leak_check() {
    let cfg = root().join("configs/bench-w1.toml").display().to_string();
    let out = sobre(&[
        "bench",
        "step",
        "--config",
        &cfg,
        "--set",
        "model.preset=tiny",
        "--set",
        "grpo.num_prompts=2",
        "--set",
        "grpo.group_size=2",
        "--set",
        "rollout.max_new_tokens=6",
        "--set",
        "data.train_size=40",
        "--set",
        "tokenizer.train_samples=40",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--prompt-tokens",
        "12",
        "--breakdown-reps",
        "1",
        "--gemm-size",
        "64",
        "--leak-check-steps",
        "4",
        "--leak-check-from",
        "2",
        "--leak-bound-mib",
        "1000",
    ]);
    let stdout = ok_stdout(&out);
    let r: Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(r["benchmark"], "grpo_step");
    assert_eq!(r["timed_steps"], 2);
    assert_eq!(r["model"]["preset"], "tiny");
    assert_eq!(r["workload"]["prompts"], 2);
    assert_eq!(
        r["workload"]["prompt_tokens_seen"],
        serde_json::json!([12, 12])
    );
    // ignore_eos: every completion has exactly max_new_tokens tokens.
    assert_eq!(r["completion_tokens_per_step"].as_f64(), Some(24.0));
    let f = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {stdout}"))
    };
    let step = f("median_step_s");
    let phases = f("median_rollout_s") + f("median_reference_s") + f("median_policy_s");
    assert!(
        step > 0.0 && phases <= step * 1.05 + 0.01,
        "phases {phases} > step {step}"
    );
    assert!(
        f("median_reference_s") > 0.0,
        "beta > 0: the reference forward runs"
    );
    assert!(f("completion_tokens_per_second") > 0.0);
    assert!(f("peak_rss_mib") > 0.0);
    let b = &r["policy_breakdown"];
    for k in ["forward_s", "backward_s", "grads_to_host_s", "optimizer_s"] {
        assert!(
            b[k].as_f64().is_some_and(|x| x >= 0.0),
            "policy_breakdown.{k}: {b}"
        );
    }
    assert_eq!(b["rows"], 4);
    assert_eq!(b["seq"], 18);
    let leak = &r["leak_check"];
    assert_eq!(leak["steps"], 4);
    assert_eq!(leak["from_step"], 2);
    assert!(leak["growth_mib"].as_f64().is_some());
    assert_eq!(leak["within_bound"], true);
    assert_eq!(r["steps_s"].as_array().map(Vec::len), Some(2));
    let g = &r["gflops"];
    for k in ["policy_update", "reference_forward", "rollout"] {
        assert!(g[k].as_f64().is_some_and(|x| x > 0.0), "gflops.{k}: {g}");
    }
    assert!(g["policy_update_tflop"].as_f64().is_some());
    assert_eq!(g["gemm_peak"]["shape"], serde_json::json!([64, 64, 64]));
    for k in ["gemm_rows_per_thread", "backend_matmul"] {
        let best = g["gemm_peak"][k]["best_gflops"].as_f64();
        assert!(best.is_some_and(|x| x > 0.0), "gemm_peak.{k}: {g}");
    }
}
