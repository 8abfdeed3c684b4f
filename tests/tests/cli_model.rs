//! `sobre inspect` and `sobre logits` through the binary.

mod common;

use common::{err_stderr, ok_stdout, sobre};

#[test]
fn inspect_w1_preset_reports_its_size() {
    let out = ok_stdout(&sobre(&["inspect", "--preset", "w1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // Counted by hand in sobre-model's tests/model.rs.
    assert_eq!(v["total_parameters"], 4_205_312);
    assert_eq!(v["active_parameters_per_token"], 1_846_016);
    assert_eq!(v["num_experts"], 8);
    assert_eq!(v["sparse_layers"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(v["weight_bytes_f32"], 4_205_312 * 4);
    let text = ok_stdout(&sobre(&["inspect", "--preset", "w1"]));
    assert!(
        text.contains("4.21M total, 1.85M active per token"),
        "{text}"
    );
}

/// Every family is reported as what it is: a dense model has no experts, an MLA model's cache
/// holds the compressed latent (kv_lora_rank 16 + qk_rope 8 floats × 2 layers × 4 bytes = 192)
/// against the expanded keys and values (2 layers × 4 heads × (16 + 12) × 4 = 896).
#[test]
fn inspect_reports_dense_and_mla_families() {
    let json = |dir: &str| -> serde_json::Value {
        let out = ok_stdout(&sobre(&["inspect", "--model", dir, "--json"]));
        serde_json::from_str(out.trim()).unwrap()
    };
    let v = json("crates/sobre-model/tests/fixtures/deepseek_v2_lite_tiny");
    assert_eq!(v["model_type"], "deepseek_v2");
    assert_eq!(
        (
            v["kv_cache_bytes_per_token"].as_u64(),
            v["expanded_kv_cache_bytes_per_token"].as_u64()
        ),
        (Some(192), Some(896))
    );
    assert_eq!(
        (v["qk_head_dim"].as_u64(), v["v_head_dim"].as_u64()),
        (Some(16), Some(12))
    );
    let v = json("crates/sobre-model/tests/fixtures/llama_tiny");
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["num_experts"], 0);
    assert_eq!(v["total_parameters"], v["active_parameters_per_token"]);
    // 2 layers × 2 (k and v) × 2 kv heads × head_dim 16 × 4 bytes.
    assert_eq!(v["kv_cache_bytes_per_token"], 512);
    let text = ok_stdout(&sobre(&[
        "inspect",
        "--model",
        "crates/sobre-model/tests/fixtures/deepseek_v2_lite_tiny",
    ]));
    assert!(
        text.contains("MLA, 4 heads") && text.contains("896 expanded (4.7×)"),
        "{text}"
    );
}

#[test]
fn logits_match_the_transformers_reference() {
    let dir = "crates/sobre-model/tests/fixtures/qwen3_moe_tiny";
    let out = ok_stdout(&sobre(&["logits", "--model", dir, "--ids", "17"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join(dir).join("reference.json")).unwrap(),
    )
    .unwrap();
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
    assert!(
        err.contains("no/such/dir") && err.contains("config.json"),
        "{err}"
    );
    let dir = "crates/sobre-model/tests/fixtures/qwen3_moe_tiny";
    let err = err_stderr(&sobre(&["logits", "--model", dir, "--ids", "1,999"]));
    assert!(
        err.contains("token id 999 is out of range for a vocabulary of 128"),
        "{err}"
    );
    let err = err_stderr(&sobre(&["inspect", "--preset", "huge"]));
    assert!(err.contains("unknown preset `huge`"), "{err}");
}

#[test]
fn generate_greedy_matches_transformers_and_json_lines_are_complete() {
    let dir = "crates/sobre-model/tests/fixtures/qwen2_moe_tiny";
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join(dir).join("reference.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"][1];
    let ids: Vec<String> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = ok_stdout(&sobre(&[
        "generate",
        "--model",
        dir,
        "--ids",
        &ids.join(","),
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--json",
    ]));
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["tokens"], case["greedy"]);
    assert_eq!(line["finish_reason"], "length");
    assert_eq!(line["logprobs"].as_array().unwrap().len(), 12);
    assert!(
        line["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.as_f64().unwrap() <= 0.0)
    );
    // Sampling: n completions, one JSON line each, reproducible by seed.
    let args = [
        "generate",
        "--model",
        dir,
        "--ids",
        "1,2,3",
        "-n",
        "3",
        "--max-new-tokens",
        "5",
        "--seed",
        "4",
        "--json",
    ];
    let a = ok_stdout(&sobre(&args));
    assert_eq!(a.lines().count(), 3);
    assert_eq!(a, ok_stdout(&sobre(&args)));
    let err = err_stderr(&sobre(&["generate", "--model", dir, "--prompt", "hi"]));
    assert!(err.contains("--prompt needs a tokenizer.json"), "{err}");
    let err = err_stderr(&sobre(&[
        "generate", "--model", dir, "--ids", "1", "--top-p", "0",
    ]));
    assert!(err.contains("top_p must be in (0, 1]"), "{err}");
}
