//! `sobre inspect` and `sobre logits` through the binary.

mod common;

use common::{err_stderr, ok_stdout, sobre};

#[test]
fn inspect_w1_preset_reports_its_size() {
    let out = ok_stdout(&sobre(&["inspect", "--preset", "w1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // Counted by hand in sobre-model's tests/model.rs.
    assert_eq!(v["total_parameters"], 3_704_064);
    assert_eq!(v["active_parameters_per_token"], 1_345_792);
    assert_eq!(v["num_experts"], 8);
    assert_eq!(v["sparse_layers"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(v["weight_bytes_f32"], 3_704_064 * 4);
    let text = ok_stdout(&sobre(&["inspect", "--preset", "w1"]));
    assert!(text.contains("3.70M total, 1.35M active per token"), "{text}");
}

#[test]
fn logits_match_the_transformers_reference() {
    let dir = "crates/sobre-model/tests/fixtures/qwen3_moe_tiny";
    let out = ok_stdout(&sobre(&["logits", "--model", dir, "--ids", "17"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::root().join(dir).join("reference.json")).unwrap()).unwrap();
    // The third reference case is the single token 17.
    let want = reference["cases"][2]["logits"][0].as_array().unwrap();
    let got = rows[0].as_array().unwrap();
    assert_eq!(got.len(), 128);
    for (g, w) in got.iter().zip(want) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4);
    }
}

#[test]
fn bad_model_directory_and_ids_are_clear_errors() {
    let err = err_stderr(&sobre(&["logits", "--model", "no/such/dir", "--ids", "1"]));
    assert!(err.contains("no/such/dir") && err.contains("config.json"), "{err}");
    let dir = "crates/sobre-model/tests/fixtures/qwen3_moe_tiny";
    let err = err_stderr(&sobre(&["logits", "--model", dir, "--ids", "1,999"]));
    assert!(err.contains("token id 999 is out of range for a vocabulary of 128"), "{err}");
    let err = err_stderr(&sobre(&["inspect", "--preset", "huge"]));
    assert!(err.contains("unknown preset `huge`"), "{err}");
}
