//! `sobre merge`: PEFT's committed adapter fixture (`qwen2_tiny_lora`) folded into its base
//! gives a plain HF model directory whose logits are PEFT's; `sobre logits` reads the adapter
//! directory itself the same way; a base of other shapes is refused naming the tensors.

mod common;

use common::{err_stderr, ok_stdout, root, sobre};
use serde_json::Value;

fn reference() -> (Vec<u32>, Vec<Vec<f64>>) {
    let p = root().join("crates/sobre-model/tests/fixtures/qwen2_tiny_lora/reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let c = &v["cases"][0];
    let ids = c["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = c["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    (ids, logits)
}

fn logits_diff(model: &str, ids: &[u32], want: &[Vec<f64>]) -> f64 {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let out = ok_stdout(&sobre(&[
        "logits",
        "--model",
        model,
        "--ids",
        &ids.join(","),
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    rows.iter()
        .zip(want)
        .flat_map(|(r, w)| {
            r.as_array()
                .unwrap()
                .iter()
                .zip(w)
                .map(|(a, b)| (a.as_f64().unwrap() - b).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn merge_writes_a_plain_model_with_peft_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = root().join("crates/sobre-model/tests/fixtures");
    let adapter = fixtures.join("qwen2_tiny_lora");
    let out = tmp.path().join("merged");
    let (ids, want) = reference();
    // The base from the adapter's base_model_name_or_path ("../qwen2_tiny", relative to it).
    ok_stdout(&sobre(&[
        "merge",
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());
    assert!(!out.join("adapter_config.json").exists());
    let d = logits_diff(out.to_str().unwrap(), &ids, &want);
    assert!(d <= 1e-4, "merged vs PEFT: {d}");
    let d = logits_diff(adapter.to_str().unwrap(), &ids, &want);
    assert!(d <= 1e-4, "adapter directory vs PEFT: {d}");
    // A base whose projections have other shapes (llama_tiny: v_proj 32 wide, not 16).
    let err = err_stderr(&sobre(&[
        "merge",
        "--model",
        fixtures.join("llama_tiny").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
    ]));
    assert!(
        err.contains("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
            && err.contains("expected [32, 4]"),
        "{err}"
    );
}
