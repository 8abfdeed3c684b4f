//! Logits and greedy continuations against transformers, on the committed tiny checkpoints made
//! by `scripts/make_hf_fixtures.py` (one per family; see that script for what each exercises).

mod common;

use common::{edited_fixture, fixture, greedy, reference};
use serde_json::Value;
use sobre_model::{Batch, ForwardOptions, MoeModel, default_device, load_model};

fn logits_of(model: &MoeModel, ids: &[u32]) -> Vec<f32> {
    let out = model.forward(
        &Batch::left_padded(&[ids.to_vec()], 0),
        None,
        ForwardOptions::default(),
    );
    out.logits.try_into_vec_as::<f32>().expect("f32 logits")
}

/// Max |a − b| over every position and vocab entry, asserted ≤ `tol`; returns it.
fn check_logits(model: &MoeModel, reference: &Value, tol: f32) -> f32 {
    let worst = max_logit_diff(model, reference);
    assert!(
        worst <= tol,
        "max |logit − transformers| = {worst:e} > {tol:e}"
    );
    worst
}

fn max_logit_diff(model: &MoeModel, reference: &Value) -> f32 {
    let mut worst = 0.0f32;
    for case in reference["cases"].as_array().expect("cases") {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<f32> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        let got = logits_of(model, &ids);
        assert_eq!(got.len(), want.len(), "logit count for {ids:?}");
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
        // The fixtures are not near-uniform: the test would be weak if they were.
        let spread = want.iter().cloned().fold(f32::MIN, f32::max)
            - want.iter().cloned().fold(f32::MAX, f32::min);
        assert!(
            spread > 1.0,
            "reference logits too flat to be a meaningful test: spread {spread}"
        );
    }
    worst
}

fn check_family(name: &str) {
    let device = default_device();
    let model = load_model(&fixture(name), &device).expect("fixture loads");
    let reference = reference(name);
    let worst = check_logits(&model, &reference, 1e-4);
    eprintln!("{name}: max |logit − transformers| = {worst:e}");
    for case in reference["cases"].as_array().unwrap() {
        // transformers' DeepSeek MoE blocks compute no auxiliary loss: nothing to compare.
        if case["aux_loss"].is_null() {
            continue;
        }
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let opts = ForwardOptions {
            aux_loss: true,
            ..Default::default()
        };
        let out = model.forward(
            &Batch::left_padded(std::slice::from_ref(&ids), 0),
            None,
            opts,
        );
        let aux = out
            .router
            .aux_loss
            .expect("aux loss requested")
            .into_scalar::<f32>();
        let want = case["aux_loss"].as_f64().unwrap() as f32;
        assert!(
            (aux - want).abs() < 1e-5,
            "aux loss {aux} vs transformers {want} for {ids:?}"
        );
    }
    for case in reference["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<u32> = case["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            greedy(&model, &ids, want.len()),
            want,
            "greedy continuation of {ids:?}"
        );
    }
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_family("qwen3_moe_tiny");
}

#[test]
fn qwen2_moe_sharded_tied_matches_transformers() {
    check_family("qwen2_moe_tiny");
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral_tiny");
}

#[test]
fn olmoe_matches_transformers() {
    check_family("olmoe_tiny");
}

/// DeepSeek-V3 routing (sigmoid scores, `e_score_correction_bias`, group-limited `noaux_tc`
/// selection, renormalised weights × `routed_scaling_factor`, shared experts, first layer dense)
/// against transformers' own `DeepseekV3MoE` blocks inside a Qwen3-MoE model.
#[test]
fn deepseek_v3_routing_matches_transformers() {
    check_family("deepseek_v3_routing_tiny");
}

/// DeepSeek-V2 routing (softmax, `group_limited_greedy` with groups scored by their best
/// expert, no renormalisation, `routed_scaling_factor`, one shared expert) against
/// transformers' `DeepseekV2Moe` blocks.
#[test]
fn deepseek_v2_routing_matches_transformers() {
    check_family("deepseek_v2_routing_tiny");
}

/// transformers 4.x spells `rope_theta` at the top level and Qwen3-MoE's expert count
/// `num_experts`; the same weights must give the same logits under those spellings.
#[test]
fn transformers_4x_config_spellings_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("qwen3_moe_tiny");
    for f in ["model.safetensors", "reference.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let obj = cfg.as_object_mut().unwrap();
    let theta = obj.remove("rope_parameters").unwrap()["rope_theta"].clone();
    obj.insert("rope_theta".into(), theta);
    obj.insert("rope_scaling".into(), Value::Null);
    let experts = obj.remove("num_local_experts").unwrap();
    obj.insert("num_experts".into(), experts);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let model = load_model(dir.path(), &default_device()).expect("4.x spelling loads");
    check_logits(&model, &reference("qwen3_moe_tiny"), 1e-4);
}

/// Each family-specific option changes the fixture's logits by far more than the tolerance, so
/// the parity tests above would catch it being ignored or computed wrongly.
#[test]
fn the_fixtures_exercise_their_options() {
    let device = default_device();
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, &str, Edit)> = vec![
        (
            "olmoe_tiny",
            "clip_qkv",
            Box::new(|c| {
                c.insert("clip_qkv".into(), Value::Null);
            }),
        ),
        (
            "olmoe_tiny",
            "norm_topk_prob",
            Box::new(|c| {
                c.insert("norm_topk_prob".into(), Value::Bool(true));
            }),
        ),
        (
            "deepseek_v3_routing_tiny",
            "group limit",
            Box::new(|c| {
                c.insert("topk_group".into(), 4.into());
            }),
        ),
        (
            "deepseek_v3_routing_tiny",
            "group scores (top-2 sum → max)",
            Box::new(|c| {
                c.insert("topk_method".into(), "group_limited_greedy".into());
            }),
        ),
        (
            "deepseek_v3_routing_tiny",
            "routed_scaling_factor",
            Box::new(|c| {
                c.insert("routed_scaling_factor".into(), 1.0.into());
            }),
        ),
        (
            "deepseek_v2_routing_tiny",
            "group limit",
            Box::new(|c| {
                c.insert("topk_method".into(), "greedy".into());
            }),
        ),
    ];
    for (name, what, edit) in cases {
        let dir = edited_fixture(name, edit);
        let model = load_model(dir.path(), &device).expect("edited fixture loads");
        let diff = max_logit_diff(&model, &reference(name));
        assert!(
            diff > 1e-2,
            "{name}: changing {what} moved the logits by only {diff:e}"
        );
    }
}
