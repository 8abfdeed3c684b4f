//! The dense families (`qwen2`, `qwen3`, `llama`, `mistral`), RoPE scaling (`yarn`, `llama3`,
//! `linear`) and Granite MoE against transformers, on the tiny checkpoints
//! `scripts/make_hf_fixtures.py` makes: logits at every position of sequences longer than the
//! scaled fixtures' original context, greedy continuations with the KV cache, the host engine
//! (the rollouts' fast path) against the same logits, and each option shown to matter.

mod common;

use std::path::Path;

use common::{edited_fixture, fixture, greedy, ids_of, reference};
use serde_json::Value;
use sobre_model::{
    Batch, ForwardOptions, InferenceModel, Kernels, MoeImpl, MoeModel, default_device, load_model,
};

fn want_logits(case: &Value) -> Vec<f32> {
    case["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect()
}

/// Max |sobre − transformers| over every position of every case, by the burn model (fused
/// kernels and dispatched experts, and the reference compositions with every expert on every
/// token: the worse of the two) and by the host engine; and the longest case's length.
fn logit_diffs(model: &MoeModel, reference: &Value) -> (f32, f32, usize) {
    let host = InferenceModel::new(model);
    let slow = ForwardOptions {
        kernels: Kernels::Reference,
        moe: MoeImpl::DenseReference,
        ..Default::default()
    };
    let (mut burn, mut hosted, mut longest) = (0.0f32, 0.0f32, 0);
    for case in reference["cases"].as_array().unwrap() {
        let ids = ids_of(case, "ids");
        longest = longest.max(ids.len());
        let want = want_logits(case);
        let batch = Batch::left_padded(std::slice::from_ref(&ids), 0);
        let run = |opts| {
            model
                .forward(&batch, None, opts)
                .logits
                .try_into_vec_as::<f32>()
                .unwrap()
        };
        let (fast, reference) = (run(ForwardOptions::default()), run(slow));
        let positions: Vec<usize> = (0..ids.len()).collect();
        let got_host = host.forward_positions(&batch, &positions);
        assert_eq!(
            (fast.len(), reference.len(), got_host.len()),
            (want.len(), want.len(), want.len())
        );
        for (((f, r), h), w) in fast.iter().zip(&reference).zip(&got_host).zip(&want) {
            burn = burn.max((f - w).abs()).max((r - w).abs());
            hosted = hosted.max((h - w).abs());
        }
    }
    (burn, hosted, longest)
}

fn check(name: &str, min_len: usize) -> MoeModel {
    let model = load_model(&fixture(name), &default_device()).expect("fixture loads");
    let reference = reference(name);
    let (burn, host, longest) = logit_diffs(&model, &reference);
    eprintln!("{name}: max |logit − transformers| = {burn:e} (burn), {host:e} (host engine)");
    assert!(burn <= 1e-4, "{name}: burn model off by {burn:e}");
    assert!(host <= 1e-4, "{name}: host engine off by {host:e}");
    assert!(
        longest >= min_len,
        "{name}: longest case {longest} < {min_len}"
    );
    for case in reference["cases"].as_array().unwrap() {
        let (ids, want) = (ids_of(case, "ids"), ids_of(case, "greedy"));
        assert_eq!(
            greedy(&model, &ids, want.len()),
            want,
            "{name}: greedy of {ids:?}"
        );
    }
    model
}

#[test]
fn qwen2_matches_transformers() {
    let m = check("qwen2_tiny", 40);
    assert!(m.config.attention_bias && !m.config.o_proj_bias);
    assert_eq!(m.config.num_experts, 0);
}

/// YaRN over a 16-token original context, read at 40 positions.
#[test]
fn qwen2_yarn_matches_transformers() {
    let m = check("qwen2_yarn_tiny", 40);
    assert_eq!(m.config.rope_scaling.rope_type(), "yarn");
}

#[test]
fn qwen3_matches_transformers() {
    let m = check("qwen3_tiny", 8);
    assert!(m.config.qk_norm && m.config.attention_bias && m.config.o_proj_bias);
    assert_eq!(m.config.head_dim, 16);
}

/// llama3 RoPE (all three frequency bands) over a 32-token original context, at 40 positions;
/// Llama-3's list of eos ids.
#[test]
fn llama_llama3_rope_matches_transformers() {
    let m = check("llama_tiny", 40);
    assert_eq!(m.config.rope_scaling.rope_type(), "llama3");
    assert_eq!(m.config.eos_token_id, vec![1, 2]);
}

#[test]
fn mistral_matches_transformers() {
    check("mistral_tiny", 8);
}

/// Granite MoE: the four multipliers, the stacked expert tensors and the top-k softmax router.
#[test]
fn granitemoe_matches_transformers() {
    let m = check("granitemoe_tiny", 8);
    assert_eq!(
        (
            m.config.embedding_multiplier,
            m.config.residual_multiplier,
            m.config.logits_scaling,
            m.config.attention_scale()
        ),
        (12.0, 0.3, 4.0, 0.1)
    );
}

/// Each option changes its fixture's logits by far more than the tolerance, so the tests above
/// would catch it ignored or computed wrongly.
#[test]
fn the_fixtures_exercise_their_options() {
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let set = |k: &'static str, v: Value| -> Edit {
        Box::new(move |c| {
            c.insert(k.into(), v.clone());
        })
    };
    let default_rope = |theta: f64| -> Edit {
        Box::new(move |c| {
            c.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "default", "rope_theta": theta}),
            );
        })
    };
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("qwen2_yarn_tiny", "yarn", default_rope(20.0)),
        ("llama_tiny", "llama3 rope", default_rope(500.0)),
        (
            "granitemoe_tiny",
            "embedding_multiplier",
            set("embedding_multiplier", 1.0.into()),
        ),
        (
            "granitemoe_tiny",
            "attention_multiplier",
            set("attention_multiplier", 1.0.into()),
        ),
        (
            "granitemoe_tiny",
            "residual_multiplier",
            set("residual_multiplier", 1.0.into()),
        ),
        (
            "granitemoe_tiny",
            "logits_scaling",
            set("logits_scaling", 1.0.into()),
        ),
    ];
    for (name, what, edit) in cases {
        let dir = edited_fixture(name, edit);
        let model = load_model(dir.path(), &default_device()).expect("edited fixture loads");
        let (diff, _, _) = logit_diffs(&model, &reference(name));
        assert!(
            diff > 1e-2,
            "{name}: changing {what} moved the logits by only {diff:e}"
        );
    }
}

/// What sobre cannot compute is an error naming the key, never a silent default.
#[test]
fn unsupported_keys_are_errors_that_name_them() {
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("llama_tiny", "mlp_bias", true.into(), "`mlp_bias`"),
        (
            "llama_tiny",
            "partial_rotary_factor",
            0.5.into(),
            "`partial_rotary_factor`",
        ),
        (
            "llama_tiny",
            "rope_parameters",
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}),
            "`rope_parameters.rope_type` \"dynamic\"",
        ),
        (
            "llama_tiny",
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "beta": 1}),
            "`rope_parameters.beta`",
        ),
        (
            "qwen2_tiny",
            "use_sliding_window",
            true.into(),
            "`use_sliding_window`",
        ),
        (
            "mistral_tiny",
            "sliding_window",
            4.into(),
            "`sliding_window` = 4",
        ),
        (
            "mistral_tiny",
            "attention_bias",
            true.into(),
            "`attention_bias` = true",
        ),
        (
            "granitemoe_tiny",
            "logits_scaling",
            0.0.into(),
            "`logits_scaling`",
        ),
    ];
    for (name, key, value, needle) in cases {
        let dir = edited_fixture(name, |c| {
            c.insert(key.into(), value.clone());
        });
        let err = match load_model(dir.path(), &default_device()) {
            Ok(_) => panic!("{name}: {key} = {value} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{name}: {key}: {err}");
        assert!(
            err.contains("config.json"),
            "{name}: the error names the file: {err}"
        );
    }
    // A key sobre does not know is kept for the caller to warn about.
    let dir = edited_fixture("qwen3_tiny", |c| {
        c.insert("frobnicate".into(), 1.into());
    });
    let m = load_model(dir.path(), &default_device()).unwrap();
    assert_eq!(m.config.unknown_keys, vec!["frobnicate".to_string()]);
}

/// sobre writes each family back so that it loads again with the same config and weights.
#[test]
fn save_and_reload_keeps_family_and_logits() {
    for name in [
        "qwen2_tiny",
        "qwen3_tiny",
        "llama_tiny",
        "mistral_tiny",
        "granitemoe_tiny",
        "qwen2_yarn_tiny",
    ] {
        let model = load_model(&fixture(name), &default_device()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        sobre_model::save_model(&model, &out, None).unwrap();
        let again = load_model(&out, &default_device()).unwrap();
        let mut a = model.config.clone();
        let mut b = again.config.clone();
        a.unknown_keys.clear();
        b.unknown_keys.clear();
        assert_eq!(a, b, "{name}: config round trip");
        assert!(
            again.config.unknown_keys.is_empty(),
            "{name}: {:?}",
            again.config.unknown_keys
        );
        let (diff, _, _) = logit_diffs(&again, &reference(name));
        assert!(diff <= 1e-4, "{name}: reloaded model off by {diff:e}");
        // The tensors sobre writes are the ones transformers wrote for this family, name for
        // name and shape for shape, so `from_pretrained` finds nothing missing or unexpected
        // (checked against transformers itself by scripts/check_hf_families.sh).
        assert_eq!(
            tensor_shapes(&out.join("model.safetensors")),
            tensor_shapes(&fixture(name).join("model.safetensors")),
            "{name}: tensor names and shapes"
        );
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let original: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written["model_type"], original["model_type"], "{name}");
        assert_eq!(
            written["architectures"], original["architectures"],
            "{name}"
        );
    }
}

/// Every tensor's name and shape in a safetensors file (from its JSON header).
fn tensor_shapes(path: &Path) -> std::collections::BTreeMap<String, Vec<u64>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap());
            (k.clone(), shape.collect())
        })
        .collect()
}

/// Elements of every tensor in a fixture's `model.safetensors` (from its JSON header).
fn tensor_elements(name: &str) -> usize {
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .product::<usize>()
        })
        .sum()
}

/// The parameter count `sobre inspect` prints is the checkpoint's: every tensor of the file,
/// and, for Granite, the active count leaves out the experts a token skips.
#[test]
fn parameter_counts_equal_the_checkpoints() {
    for name in [
        "qwen2_tiny",
        "qwen2_yarn_tiny",
        "qwen3_tiny",
        "llama_tiny",
        "mistral_tiny",
        "granitemoe_tiny",
    ] {
        let cfg = load_model(&fixture(name), &default_device())
            .unwrap()
            .config;
        let (total, active) = cfg.count_parameters();
        assert_eq!(total, tensor_elements(name), "{name}");
        if cfg.num_experts == 0 {
            assert_eq!(active, total, "{name}");
        } else {
            // Granite: 2 layers × (4 − 2) skipped experts × 3 × hidden 32 × width 16.
            assert_eq!(total - active, 2 * 2 * 3 * 32 * 16, "{name}");
        }
    }
}
