//! DeepSeek-V2 / V3 with Multi-head Latent Attention against transformers 5.24, on the committed
//! tiny checkpoints `fixtures/deepseek_v2_lite_tiny` (`q_lora_rank` null, YaRN with `mscale` /
//! `mscale_all_dim`, softmax greedy routing scaled by 1.5, one shared expert, a dense first layer)
//! and `fixtures/deepseek_v3_tiny` (`q_lora_rank` 16, `rope_interleave`, sigmoid `noaux_tc`
//! routing with `e_score_correction_bias`, two groups keep one): the config, the tensor forward
//! (expanded MLA, both kernels, with cache, padding and autodiff), the host engine (compressed
//! cache, absorbed and expanded), saving and parameter counts.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde_json::{Value, json};
use sobre_model::config::MlaConfig;
use sobre_model::{
    Batch, Family, ForwardOptions, InferenceModel, Kernels, KvCache, LatentForm, LogitsMode,
    ModelConfig, MoeModel, ScoringFunc, TopkMethod, default_device, load_model,
};

const FIXTURES: [&str; 2] = ["deepseek_v2_lite_tiny", "deepseek_v3_tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn config_of(v: &Value) -> Result<ModelConfig, String> {
    ModelConfig::from_json_str(&v.to_string(), "c/config.json").map_err(|e| e.to_string())
}

/// One reference case: token ids, logits at every position `[len · vocab]`, greedy tokens.
struct Case {
    ids: Vec<u32>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn cases(name: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            ids: ids(&c["ids"]),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter())
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
            greedy: ids(&c["greedy"]),
        })
        .collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(name: &str) -> MoeModel {
    load_model(&fixture(name), &default_device()).expect("fixture loads")
}

fn opts(kernels: Kernels) -> ForwardOptions {
    ForwardOptions {
        kernels,
        ..Default::default()
    }
}

fn one_row(ids: &[u32]) -> Batch {
    Batch::left_padded(&[ids.to_vec()], 0)
}

// ---- 1. config ----

#[test]
fn fixture_configs_read_every_mla_key() {
    let v2 = config_of(&fixture_json("deepseek_v2_lite_tiny")).unwrap();
    assert_eq!(v2.family, Family::DeepseekV2);
    assert_eq!(
        v2.mla,
        Some(MlaConfig {
            q_lora_rank: None,
            kv_lora_rank: 16,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 8,
            v_head_dim: 12,
            rope_interleave: true,
        })
    );
    assert_eq!(
        (v2.head_dim, v2.qk_head_dim(), v2.v_head_dim()),
        (8, 16, 12)
    );
    assert_eq!((v2.num_attention_heads, v2.num_key_value_heads), (4, 4));
    assert_eq!(
        (
            v2.num_experts,
            v2.num_experts_per_tok,
            v2.moe_intermediate_size
        ),
        (4, 2, 12)
    );
    assert_eq!(
        (v2.n_shared_experts, v2.shared_expert_intermediate_size),
        (1, 12)
    );
    assert!(!v2.shared_expert_gate && !v2.norm_topk_prob && !v2.aux_loss_free_bias);
    assert_eq!(
        (v2.scoring_func, v2.topk_method, v2.routed_scaling_factor),
        (ScoringFunc::Softmax, TopkMethod::Greedy, 1.5)
    );
    assert_eq!((v2.first_k_dense_replace, v2.intermediate_size), (1, 40));
    assert!(!v2.is_sparse_layer(0) && v2.is_sparse_layer(1));
    assert_eq!(v2.rope_theta, 5.0);
    assert_eq!(v2.rope_scaling.rope_type(), "yarn");
    // qk_head_dim^-0.5 · mscale² with mscale = 0.1 · 0.707 · ln 4 + 1.
    let m = 0.1 * 0.707 * 4f64.ln() + 1.0;
    assert!((v2.attention_scale() - m * m / 4.0).abs() < 1e-12);
    // The cos/sin factor: mscale / mscale_all_dim = 1.
    assert_eq!(v2.rope_frequencies().attention_factor, 1.0);
    assert_eq!(v2.rope_frequencies().inv_freq.len(), 4);
    assert_eq!(v2.unknown_keys, Vec::<String>::new());

    let v3 = config_of(&fixture_json("deepseek_v3_tiny")).unwrap();
    assert_eq!(v3.family, Family::DeepseekV3);
    assert_eq!(
        v3.mla,
        Some(MlaConfig {
            q_lora_rank: Some(16),
            kv_lora_rank: 16,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 8,
            v_head_dim: 8,
            rope_interleave: true,
        })
    );
    // No `topk_method` / `scoring_func` keys: the class's noaux_tc and sigmoid.
    assert_eq!(
        (v3.scoring_func, v3.topk_method),
        (ScoringFunc::Sigmoid, TopkMethod::NoauxTc)
    );
    assert!(v3.aux_loss_free_bias && v3.norm_topk_prob);
    assert_eq!(
        (v3.n_group, v3.topk_group, v3.routed_scaling_factor),
        (2, 1, 2.5)
    );
    assert_eq!((v3.num_nextn_predict_layers, v3.rope_theta), (0, 20.0));
    assert_eq!(v3.unknown_keys, Vec::<String>::new());
}

/// Absent keys take the defaults of transformers' `DeepseekV2Config` / `DeepseekV3Config`.
#[test]
fn absent_keys_take_the_class_defaults() {
    let v3 = config_of(&json!({"model_type": "deepseek_v3"})).unwrap();
    let mla = v3.mla.clone().unwrap();
    assert_eq!(
        (
            mla.q_lora_rank,
            mla.kv_lora_rank,
            mla.qk_nope_head_dim,
            mla.qk_rope_head_dim,
            mla.v_head_dim,
            mla.rope_interleave
        ),
        (Some(1536), 512, 128, 64, 128, true)
    );
    assert_eq!(
        (
            v3.vocab_size,
            v3.hidden_size,
            v3.intermediate_size,
            v3.num_hidden_layers,
            v3.num_attention_heads,
            v3.num_key_value_heads,
            v3.max_position_embeddings,
        ),
        (129280, 7168, 18432, 61, 128, 128, 4096)
    );
    assert_eq!(
        (
            v3.num_experts,
            v3.num_experts_per_tok,
            v3.moe_intermediate_size,
            v3.n_shared_experts,
            v3.n_group,
            v3.topk_group,
            v3.first_k_dense_replace,
            v3.num_nextn_predict_layers,
        ),
        (256, 8, 2048, 1, 8, 4, 3, 1)
    );
    assert_eq!(
        (v3.routed_scaling_factor, v3.norm_topk_prob, v3.head_dim),
        (2.5, true, 64)
    );
    assert_eq!(
        (v3.bos_token_id, v3.eos_token_id.clone()),
        (Some(0), vec![1])
    );
    // DeepSeek-V3 (671B): 37B active, as DeepSeek reports (the MTP module excluded).
    let (total, active) = v3.count_parameters();
    assert!((671e9..672e9).contains(&(total as f64)), "total {total}");
    assert!((37e9..38e9).contains(&(active as f64)), "active {active}");

    // V2's class needs `num_experts_per_tok` (its default None fails in the router).
    let err = config_of(&json!({"model_type": "deepseek_v2"})).unwrap_err();
    assert!(
        err.contains("missing required key `num_experts_per_tok`"),
        "{err}"
    );
    let v2 = config_of(&json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6})).unwrap();
    let mla = v2.mla.clone().unwrap();
    assert_eq!((mla.q_lora_rank, mla.rope_interleave), (Some(1536), true));
    assert_eq!(
        (
            v2.num_experts,
            v2.n_shared_experts,
            v2.moe_intermediate_size,
            v2.first_k_dense_replace,
            v2.routed_scaling_factor,
            v2.norm_topk_prob,
            v2.scoring_func,
            v2.topk_method,
            v2.max_position_embeddings,
        ),
        (
            64,
            2,
            1407,
            0,
            1.0,
            false,
            ScoringFunc::Softmax,
            TopkMethod::Greedy,
            2048
        )
    );
    assert_eq!((v2.bos_token_id, v2.eos_token_id), (Some(1), vec![2]));
}

/// A DeepSeek-V2-Lite and a DeepSeek-V3 config.json as published (transformers 4.x spellings:
/// `rope_scaling`, DeepSeek's own `scoring_func`, `moe_layer_freq`, `aux_loss_alpha`, …) read,
/// with the keys nobody computes reported as unknown.
#[test]
fn published_configs_read() {
    let lite = json!({"architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false,
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
        "pretraining_tp": 1, "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
        "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
        "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "seq_aux": true, "tie_word_embeddings": false,
        "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128,
        "vocab_size": 102400});
    let c = config_of(&lite).unwrap();
    assert_eq!(c.unknown_keys, vec!["aux_loss_alpha", "seq_aux"]);
    // DeepSeek reports 15.7B parameters (and 2.4B active, without the embeddings it seems);
    // counting every tensor, and the embedding and head as active:
    assert_eq!(c.count_parameters(), (15_706_484_224, 2_661_150_208));
    let v3 = json!({"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false,
        "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32,
        "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": false,
        "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3", "use_cache": true, "v_head_dim": 128,
        "vocab_size": 129280});
    let c = config_of(&v3).unwrap();
    assert_eq!(c.unknown_keys, vec!["ep_size"]);
    assert_eq!(c.num_nextn_predict_layers, 1);
    // The scale: 192^-0.5 · (0.1 · ln 40 + 1)².
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((c.attention_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
}

/// What transformers' classes would compute differently (or not at all) is refused, naming the
/// key and the value.
#[test]
fn what_cannot_be_computed_is_refused() {
    let v2 = fixture_json("deepseek_v2_lite_tiny");
    let v3 = fixture_json("deepseek_v3_tiny");
    let with = |base: &Value, k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    for (cfg, want) in [
        (
            with(&v2, "norm_topk_prob", json!(true)),
            "unsupported `norm_topk_prob` = true for \"deepseek_v2\"",
        ),
        (
            with(&v2, "scoring_func", json!("sigmoid")),
            "unsupported `scoring_func` \"sigmoid\" for \"deepseek_v2\"",
        ),
        (
            with(&v2, "topk_method", json!("noaux_tc")),
            "unsupported `topk_method` \"noaux_tc\" for \"deepseek_v2\"",
        ),
        (
            with(&v2, "topk_method", json!("random")),
            "unsupported `topk_method` \"random\"",
        ),
        (
            with(&v3, "topk_method", json!("greedy")),
            "unsupported `topk_method` \"greedy\" for \"deepseek_v3\"",
        ),
        (
            with(&v3, "scoring_func", json!("softmax")),
            "unsupported `scoring_func` \"softmax\" for \"deepseek_v3\"",
        ),
        (
            with(&v3, "num_key_value_heads", json!(2)),
            "unsupported `num_key_value_heads` = 2 for \"deepseek_v3\"",
        ),
        (
            with(&v3, "qk_rope_head_dim", json!(7)),
            "`qk_rope_head_dim` must be even for RoPE, found 7",
        ),
        (
            with(&v3, "qk_rope_head_dim", json!(0)),
            "`qk_rope_head_dim` must be at least 1, found 0",
        ),
        (
            with(&v3, "kv_lora_rank", json!(0)),
            "`kv_lora_rank` must be at least 1 for \"deepseek_v3\", found 0",
        ),
        (
            with(&v3, "q_lora_rank", json!(-3)),
            "`q_lora_rank` must be a non-negative integer, found -3",
        ),
        (
            with(&v3, "hidden_act", json!("gelu")),
            "unsupported `hidden_act` \"gelu\"",
        ),
        (
            with(&v2, "mlp_bias", json!(true)),
            "unsupported `mlp_bias` = true",
        ),
        (
            with(&v3, "aux_loss_free_bias", json!(false)),
            "`aux_loss_free_bias` must be true",
        ),
        (
            with(&v3, "n_group", json!(3)),
            "`n_group` (3) must divide `num_experts` (4)",
        ),
        (
            with(&v2, "qk_norm", json!(true)),
            "`qk_norm` and `clip_qkv` are not part of \"deepseek_v2\" attention",
        ),
        (
            with(
                &with(&v2, "topk_method", json!("group_limited_greedy")),
                "n_group",
                Value::Null,
            ),
            "`n_group` is required for `topk_method` \"group_limited_greedy\"",
        ),
        (
            with(
                &v3,
                "rope_parameters",
                json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10.0}),
            ),
            "unsupported `rope_parameters.rope_type` \"dynamic\"",
        ),
    ] {
        let err = config_err(&cfg);
        assert!(
            err.starts_with("c/config.json: ") && err.contains(want),
            "want `{want}` in: {err}"
        );
    }
}

fn config_err(cfg: &Value) -> String {
    match config_of(cfg) {
        Ok(_) => panic!("expected an error for {cfg}"),
        Err(e) => e,
    }
}

/// `to_json` writes every key back: the config reads back equal, and the keys transformers'
/// class reads keep the file's values.
#[test]
fn config_round_trips_through_to_json() {
    for name in FIXTURES {
        let original = fixture_json(name);
        let cfg = config_of(&original).unwrap();
        let written = cfg.to_json();
        let again = config_of(&written).unwrap();
        assert_eq!(again, cfg, "{name}");
        for (k, v) in original.as_object().unwrap() {
            if matches!(
                k.as_str(),
                "transformers_version"
                    | "use_cache"
                    | "output_router_logits"
                    | "attention_dropout"
                    | "pretraining_tp"
            ) {
                continue;
            }
            let w = &written[k];
            let same = w == v || (w.as_f64().is_some() && w.as_f64() == v.as_f64());
            let rope = k == "rope_parameters"
                && v.as_object().unwrap().iter().all(|(rk, rv)| {
                    let wv = &w[rk];
                    wv == rv || wv.as_f64() == rv.as_f64()
                });
            assert!(same || rope, "{name}: `{k}` written as {w}, was {v}");
        }
    }
}

// ---- 2. the tensor forward ----

/// Logits at every position of every reference sequence (a 40-token one among them) within
/// 1e-4 of transformers, with the fused kernels and with the reference compositions.
#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        for kernels in [Kernels::Fused, Kernels::Reference] {
            let mut worst = 0.0f32;
            for case in cases(name) {
                let out = model.forward(&one_row(&case.ids), None, opts(kernels));
                let got = values(out.logits);
                assert_eq!(got.len(), case.logits.len());
                worst = worst.max(max_diff(&got, &case.logits));
                let spread = case.logits.iter().cloned().fold(f32::MIN, f32::max)
                    - case.logits.iter().cloned().fold(f32::MAX, f32::min);
                assert!(spread > 1.0, "reference logits too flat: {spread}");
            }
            eprintln!("{name} {kernels:?}: max |logit − transformers| = {worst:e}");
            assert!(worst <= 1e-4, "{name} {kernels:?}: {worst:e}");
        }
    }
}

/// Greedy decoding through the [`KvCache`] (prefill, then one token at a time) gives
/// transformers' 12-token continuations.
#[test]
fn greedy_continuations_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        for case in cases(name) {
            let n = case.greedy.len();
            let mut cache = KvCache::new(&model.config, 1, case.ids.len() + n, &model.device());
            let o = ForwardOptions {
                logits: LogitsMode::Last,
                ..Default::default()
            };
            let mut out = model.forward(&one_row(&case.ids), Some(&mut cache), o);
            let mut got = Vec::new();
            for step in 0..n {
                let next = out
                    .logits
                    .clone()
                    .argmax(2)
                    .try_into_vec_as::<i64>()
                    .unwrap()[0] as u32;
                got.push(next);
                let b = Batch {
                    batch: 1,
                    seq: 1,
                    input_ids: vec![next],
                    positions: vec![(case.ids.len() + step) as u32],
                    attention_mask: vec![true],
                };
                out = model.forward(&b, Some(&mut cache), o);
            }
            assert_eq!(got, case.greedy, "{name}: greedy from {:?}", case.ids);
        }
    }
}

/// Two left-padded rows of different lengths: prefill of 5 columns, then one column at a time
/// through the cache, equal to the full forward at every real position, and the full padded
/// forward equal to each row alone (the padding is inert).
#[test]
fn cached_decode_and_padding_equal_the_full_forward() {
    for name in FIXTURES {
        let model = load(name);
        let all = cases(name);
        let seqs = vec![all[0].ids[..11].to_vec(), all[1].ids.clone()];
        let batch = Batch::left_padded(&seqs, 0);
        let s = batch.seq;
        for kernels in [Kernels::Fused, Kernels::Reference] {
            let full = values(model.forward(&batch, None, opts(kernels)).logits);
            let v = model.config.vocab_size;
            // Each row alone.
            for (r, seq) in seqs.iter().enumerate() {
                let alone = values(model.forward(&one_row(seq), None, opts(kernels)).logits);
                let pad = s - seq.len();
                let row = &full[(r * s + pad) * v..(r + 1) * s * v];
                let d = max_diff(row, &alone);
                assert!(d < 1e-5, "{name}: padded row {r} vs alone {d:e}");
            }
            let mut cache = KvCache::new(&model.config, 2, s, &model.device());
            assert_eq!(cache.bytes(), 2 * s * model.config.kv_bytes_per_token());
            let cols = |lo: usize, hi: usize| {
                let pick = |x: &[u32]| -> Vec<u32> {
                    (0..2)
                        .flat_map(|r| x[r * s + lo..r * s + hi].to_vec())
                        .collect()
                };
                Batch {
                    batch: 2,
                    seq: hi - lo,
                    input_ids: pick(&batch.input_ids),
                    positions: pick(&batch.positions),
                    attention_mask: (0..2)
                        .flat_map(|r| batch.attention_mask[r * s + lo..r * s + hi].to_vec())
                        .collect(),
                }
            };
            let mut got = values(
                model
                    .forward(&cols(0, 5), Some(&mut cache), opts(kernels))
                    .logits,
            );
            for c in 5..s {
                let step = values(
                    model
                        .forward(&cols(c, c + 1), Some(&mut cache), opts(kernels))
                        .logits,
                );
                got.extend(step);
            }
            // `got` is [column-chunk][row][…]: reorder to [row][column].
            let mut worst = 0.0f32;
            for r in 0..2 {
                for c in 0..s {
                    if !batch.attention_mask[r * s + c] {
                        continue;
                    }
                    let at = if c < 5 {
                        (r * 5 + c) * v
                    } else {
                        (2 * 5 + (c - 5) * 2 + r) * v
                    };
                    let want = &full[(r * s + c) * v..(r * s + c + 1) * v];
                    worst = worst.max(max_diff(&got[at..at + v], want));
                }
            }
            assert!(worst < 1e-5, "{name} {kernels:?}: cached vs full {worst:e}");
        }
    }
}

/// A training step's backward through MLA reaches every latent projection with finite,
/// non-zero gradients (both kernels, and they agree).
#[test]
fn backward_reaches_the_latent_projections() {
    for name in FIXTURES {
        let device = default_device().autodiff();
        let model = load_model(&fixture(name), &device).unwrap();
        let all = cases(name);
        let batch = Batch::right_padded(&[all[0].ids.clone(), all[1].ids.clone()], 0);
        let run = |kernels: Kernels| {
            let out = model.forward(&batch, None, opts(kernels));
            let grads = out.logits.square().mean().backward();
            let attn = &model.layers[1].self_attn;
            let lat = attn.latent.as_ref().expect("an MLA layer");
            let mut named = vec![
                (
                    "kv_b_proj",
                    values(attn.v_proj.weight.val().grad(&grads).unwrap()),
                ),
                (
                    "kv_a_proj_with_mqa",
                    values(attn.k_proj.weight.val().grad(&grads).unwrap()),
                ),
                (
                    "kv_a_layernorm",
                    values(lat.kv_a_layernorm.weight.val().grad(&grads).unwrap()),
                ),
                (
                    "o_proj",
                    values(attn.o_proj.weight.val().grad(&grads).unwrap()),
                ),
                (
                    "q_proj / q_b_proj",
                    values(attn.q_proj.weight.val().grad(&grads).unwrap()),
                ),
            ];
            if let Some(a) = &lat.q_a_proj {
                named.push(("q_a_proj", values(a.weight.val().grad(&grads).unwrap())));
                let n = lat.q_a_layernorm.as_ref().unwrap();
                named.push((
                    "q_a_layernorm",
                    values(n.weight.val().grad(&grads).unwrap()),
                ));
            }
            named
        };
        let fused = run(Kernels::Fused);
        let reference = run(Kernels::Reference);
        if name == "deepseek_v3_tiny" {
            assert_eq!(fused.len(), 7, "q_a_proj and q_a_layernorm are trained");
        }
        for ((n, g), (_, r)) in fused.iter().zip(&reference) {
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{name} {n}: non-finite gradient"
            );
            let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 1e-6, "{name} {n}: gradient norm {norm:e}");
            let scale = r.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
            let d = max_diff(g, r) / scale;
            assert!(
                d < 1e-4,
                "{name} {n}: fused vs reference gradients differ by {d:e}"
            );
        }
    }
}

/// The fixtures are not vacuous: undoing any one of MLA's options moves the logits by more
/// than 1e-2 (the interleaved RoPE layout, the `mscale²` in the softmax scale, YaRN's
/// frequencies).
#[test]
fn the_fixtures_exercise_mla_options() {
    type Mutation = fn(&mut MoeModel);
    let mutations: [(&str, Mutation); 3] = [
        ("rope_interleave off", |m| {
            for l in &mut m.layers {
                l.self_attn.latent.as_mut().unwrap().rope_interleave = false;
            }
        }),
        ("no mscale² in the softmax scale", |m| {
            let qk = m.config.qk_head_dim() as f64;
            for l in &mut m.layers {
                l.self_attn.softmax_scale = 1.0 / qk.sqrt();
            }
        }),
        ("default RoPE frequencies", |m| {
            m.config.rope_scaling = sobre_model::config::RopeScaling::None;
        }),
    ];
    for name in FIXTURES {
        let case = &cases(name)[3];
        assert_eq!(case.ids.len(), 40);
        for (what, mutate) in mutations {
            let mut model = load(name);
            mutate(&mut model);
            let got = values(
                model
                    .forward(&one_row(&case.ids), None, opts(Kernels::Fused))
                    .logits,
            );
            let d = max_diff(&got, &case.logits);
            assert!(d > 1e-2, "{name}: {what} moves the logits only {d:e}");
        }
    }
}

// ---- 3. the host engine ----

fn forms() -> [LatentForm; 2] {
    [LatentForm::Absorbed, LatentForm::Expanded]
}

/// The host engine in both forms against transformers: logits at every position of every
/// reference sequence within 1e-4, and greedy decoding through its compressed cache giving
/// transformers' continuations.
#[test]
fn host_engine_matches_transformers() {
    for name in FIXTURES {
        let model = load(name);
        let v = model.config.vocab_size;
        for form in forms() {
            let im = InferenceModel::with_latent_form(&model, form);
            let mut worst = 0.0f32;
            for case in cases(name) {
                let n = case.ids.len();
                let got = im.forward_positions(&one_row(&case.ids), &(0..n).collect::<Vec<_>>());
                worst = worst.max(max_diff(&got, &case.logits));
                let mut cache = im.new_cache(1, n + case.greedy.len());
                let mut logits = im.forward_last(&one_row(&case.ids), &mut cache);
                let mut tokens = Vec::new();
                for step in 0..case.greedy.len() {
                    let next = argmax(&logits[..v]);
                    tokens.push(next);
                    let b = Batch {
                        batch: 1,
                        seq: 1,
                        input_ids: vec![next],
                        positions: vec![(n + step) as u32],
                        attention_mask: vec![true],
                    };
                    logits = im.forward_last(&b, &mut cache);
                }
                assert_eq!(
                    tokens, case.greedy,
                    "{name} {form:?}: greedy from {:?}",
                    case.ids
                );
            }
            eprintln!("{name} host {form:?}: max |logit − transformers| = {worst:e}");
            assert!(worst <= 1e-4, "{name} {form:?}: {worst:e}");
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// A rollout's pattern through the host engine, in both forms: two left-padded prompts
/// prefilled, three rows continuing them from a shared prefix (`share_prefix`), a two-token
/// step, a row dropped (`select_rows`), then single tokens. Every step's logits agree between
/// the absorbed and the expanded form and with the tensor forward over the whole sequence.
#[test]
fn absorbed_and_expanded_forms_agree_with_the_tensor_forward() {
    for name in FIXTURES {
        let model = load(name);
        let v = model.config.vocab_size;
        let all = cases(name);
        let prompts = vec![all[0].ids[..9].to_vec(), all[1].ids.clone()];
        let of_row = [0usize, 0, 1];
        let tokens: Vec<Vec<u32>> = (0..3)
            .map(|r| (0..5).map(|k| ((r * 37 + k * 11 + 5) % v) as u32).collect())
            .collect();
        // Steps: (rows still decoding, how many tokens this step).
        let steps: [(&[usize], usize); 4] =
            [(&[0, 1, 2], 2), (&[0, 1, 2], 1), (&[0, 2], 1), (&[0, 2], 1)];
        let run = |form: LatentForm| -> Vec<Vec<f32>> {
            let im = InferenceModel::with_latent_form(&model, form);
            let batch = Batch::left_padded(&prompts, 0);
            let mut cache = im.new_cache(2, batch.seq);
            let mut out = vec![im.forward_last(&batch, &mut cache)];
            let mut cache = cache.share_prefix(&of_row, 5);
            let mut done = 0;
            let mut live: Vec<usize> = vec![0, 1, 2];
            for (rows, n) in steps {
                if rows.len() < live.len() {
                    let keep: Vec<usize> = rows
                        .iter()
                        .map(|r| live.iter().position(|l| l == r).unwrap())
                        .collect();
                    cache = cache.select_rows(&keep);
                    live = rows.to_vec();
                }
                let mut b = Batch {
                    batch: rows.len(),
                    seq: n,
                    input_ids: vec![],
                    positions: vec![],
                    attention_mask: vec![true; rows.len() * n],
                };
                for &r in rows {
                    let start = prompts[of_row[r]].len() + done;
                    b.input_ids.extend_from_slice(&tokens[r][done..done + n]);
                    b.positions.extend((start..start + n).map(|p| p as u32));
                }
                out.push(im.forward_last(&b, &mut cache));
                done += n;
            }
            out
        };
        let absorbed = run(LatentForm::Absorbed);
        let expanded = run(LatentForm::Expanded);
        // The tensor forward of each whole sequence, at the last position of each step.
        let last_logits = |seq: &[u32]| -> Vec<f32> {
            let l = values(
                model
                    .forward(&one_row(seq), None, opts(Kernels::Reference))
                    .logits,
            );
            l[l.len() - v..].to_vec()
        };
        let mut want = vec![
            prompts
                .iter()
                .flat_map(|p| last_logits(p))
                .collect::<Vec<_>>(),
        ];
        let mut done = 0;
        for (rows, n) in steps {
            done += n;
            want.push(
                rows.iter()
                    .flat_map(|&r| {
                        let mut seq = prompts[of_row[r]].clone();
                        seq.extend_from_slice(&tokens[r][..done]);
                        last_logits(&seq)
                    })
                    .collect(),
            );
        }
        let (mut forms_diff, mut tensor_diff) = (0.0f32, 0.0f32);
        for ((a, e), w) in absorbed.iter().zip(&expanded).zip(&want) {
            forms_diff = forms_diff.max(max_diff(a, e));
            tensor_diff = tensor_diff.max(max_diff(a, w)).max(max_diff(e, w));
        }
        eprintln!(
            "{name}: absorbed vs expanded {forms_diff:e}, host vs tensor forward {tensor_diff:e}"
        );
        assert!(
            forms_diff <= 1e-4,
            "{name}: absorbed vs expanded {forms_diff:e}"
        );
        assert!(
            tensor_diff <= 1e-4,
            "{name}: host vs tensor forward {tensor_diff:e}"
        );
    }
}

/// Cache bytes per token, exactly: compressed `layers · (kv_lora_rank + qk_rope_head_dim) · 4`
/// for MLA (what both caches allocate), against the expanded `layers · heads · (qk_head_dim +
/// v_head_dim) · 4`, and standard attention's `layers · 2 · kv_heads · head_dim · 4`.
#[test]
fn cache_bytes_per_token() {
    // (fixture, compressed, expanded): 2 layers · (16 + 8) · 4 = 192;
    // V2: 2 · 4 heads · (16 + 12) · 4 = 896; V3: 2 · 4 · (16 + 8) · 4 = 768.
    // Qwen3-MoE (standard): 3 layers · 2 · 2 kv heads · 16 · 4 = 768.
    for (name, compressed, expanded) in [
        ("deepseek_v2_lite_tiny", 192, 896),
        ("deepseek_v3_tiny", 192, 768),
        ("qwen3_moe_tiny", 768, 768),
    ] {
        let model = load(name);
        let cfg = &model.config;
        assert_eq!(cfg.kv_bytes_per_token(), compressed, "{name}");
        assert_eq!(cfg.expanded_kv_bytes_per_token(), expanded, "{name}");
        let im = InferenceModel::new(&model);
        assert_eq!(im.kv_bytes_per_token(), compressed, "{name}");
        // What the caches really allocate: 3 rows of 10 tokens.
        assert_eq!(im.new_cache(3, 10).bytes(), 30 * compressed, "{name}");
        let cache = KvCache::new(cfg, 3, 10, &model.device());
        assert_eq!(cache.bytes(), 30 * compressed, "{name}");
    }
    // DeepSeek-V3 (61 layers, 128 heads of 192 + 128): 140 544 bytes a token compressed,
    // 9 994 240 expanded.
    let v3 = config_of(&json!({"model_type": "deepseek_v3"})).unwrap();
    assert_eq!(v3.kv_bytes_per_token(), 61 * 576 * 4);
    assert_eq!(v3.expanded_kv_bytes_per_token(), 61 * 128 * 320 * 4);
}

// ---- 4. saving ----

/// The fixture's tensors `(name, shape, f32 values)`, read from its safetensors file.
fn fixture_tensors(name: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Saving writes back exactly the tensors transformers wrote (names, shapes, values), and a
/// saved model (single file or shards) reloads with the same config and the same logits.
#[test]
fn save_and_reload_keep_config_tensors_and_logits() {
    for name in FIXTURES {
        let model = load(name);
        let mut written = sobre_model::io::hf_tensors(&model);
        written.sort_by(|a, b| a.0.cmp(&b.0));
        let original = fixture_tensors(name);
        let names = |t: &[(String, Vec<usize>, Vec<f32>)]| {
            t.iter()
                .map(|(n, s, _)| (n.clone(), s.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&written), names(&original), "{name}");
        for ((n, _, a), (_, _, b)) in written.iter().zip(&original) {
            assert!(a == b, "{name}: tensor {n} changed");
        }
        let ids = &cases(name)[3].ids;
        let logits = values(
            model
                .forward(&one_row(ids), None, opts(Kernels::Fused))
                .logits,
        );
        let dir = tempfile::tempdir().unwrap();
        for (sub, shard) in [("single", None), ("sharded", Some(20_000))] {
            let path = dir.path().join(sub);
            sobre_model::save_model(&model, &path, shard).unwrap();
            assert_eq!(
                path.join("model.safetensors.index.json").exists(),
                shard.is_some()
            );
            let again = load_model(&path, &default_device()).expect("a saved model reloads");
            assert_eq!(again.config, model.config, "{name} {sub}");
            let got = values(
                again
                    .forward(&one_row(ids), None, opts(Kernels::Fused))
                    .logits,
            );
            assert!(got == logits, "{name} {sub}: logits changed after a reload");
        }
    }
}

/// A randomly initialised MLA model (both query layouts) builds every tensor, runs, and
/// survives a save → reload; an MTP layer's tensors in a checkpoint are skipped.
#[test]
fn random_mla_models_save_and_reload() {
    for name in FIXTURES {
        let cfg = config_of(&fixture_json(name)).unwrap();
        let model = sobre_model::init_model(&cfg, 5, &default_device());
        let ids = &cases(name)[0].ids;
        let logits = values(
            model
                .forward(&one_row(ids), None, opts(Kernels::Fused))
                .logits,
        );
        assert!(logits.iter().all(|x| x.is_finite()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        sobre_model::save_model(&model, &path, None).unwrap();
        let again = load_model(&path, &default_device()).unwrap();
        let got = values(
            again
                .forward(&one_row(ids), None, opts(Kernels::Fused))
                .logits,
        );
        assert!(got == logits, "{name}");
    }
    // DeepSeek-V3's checkpoints carry `num_nextn_predict_layers` MTP layers after the decoder.
    let mut tensors = fixture_tensors("deepseek_v3_tiny");
    tensors.push((
        "model.layers.2.eh_proj.weight".into(),
        vec![2, 3],
        vec![0.5; 6],
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mtp");
    std::fs::create_dir(&path).unwrap();
    let mut cfg = fixture_json("deepseek_v3_tiny");
    std::fs::write(path.join("config.json"), cfg.to_string()).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<_> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path.join("model.safetensors")).unwrap();
    let err = match load_model(&path, &default_device()) {
        Ok(_) => panic!("an unexpected tensor without MTP layers"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("unexpected tensor `model.layers.2.eh_proj.weight`"),
        "{err}"
    );
    cfg["num_nextn_predict_layers"] = json!(1);
    std::fs::write(path.join("config.json"), cfg.to_string()).unwrap();
    load_model(&path, &default_device()).expect("the MTP layer's tensors are skipped");
}

// ---- 5. parameter counts ----

/// `count_parameters` against the checkpoints: the total is the sum of every tensor's elements
/// (DeepSeek-V3's `e_score_correction_bias` excepted: a buffer, not a parameter), as burn counts
/// the module's parameters; active leaves out the routed experts a token skips (2 of 4 here).
#[test]
fn parameter_counts_are_the_checkpoint_sizes() {
    // V2: 29 376 elements; routed experts 4 · 3 · 32 · 12 = 4 608, half of them skipped.
    // V3: 26 852 elements, 4 of them the bias buffer; the same experts.
    for (name, total, active) in [
        ("deepseek_v2_lite_tiny", 29_376, 29_376 - 2_304),
        ("deepseek_v3_tiny", 26_848, 26_848 - 2_304),
    ] {
        let tensors = fixture_tensors(name);
        let elements: usize = tensors
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        let buffers: usize = tensors
            .iter()
            .filter(|(n, _, _)| n.ends_with("e_score_correction_bias"))
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        assert_eq!(elements - buffers, total, "{name}");
        let model = load(name);
        assert_eq!(model.config.count_parameters(), (total, active), "{name}");
        assert_eq!(model.num_params(), total, "{name}");
    }
}

/// GRPO's scoring path: completions continuing shared prompts, each prompt computed once
/// (`forward_positions_shared`, through the cache and `select_rows`), equal to one forward of
/// the concatenated rows, on the tensor forward (both kernels, with autodiff) and the host
/// engine.
#[test]
fn shared_prefix_scoring_equals_the_concatenated_rows() {
    for name in FIXTURES {
        let device = default_device().autodiff();
        let model = load_model(&fixture(name), &device).unwrap();
        let v = model.config.vocab_size;
        let all = cases(name);
        let prompts = vec![all[0].ids[..9].to_vec(), all[1].ids.clone()];
        let of_row = [1usize, 0, 1];
        let completions: Vec<Vec<u32>> = (0..3)
            .map(|r| (0..4).map(|k| ((r * 29 + k * 13 + 7) % v) as u32).collect())
            .collect();
        let prefixes = Batch::left_padded(&prompts, 0);
        let mut suffixes = Batch::right_padded(&completions, 0);
        for (r, &p) in of_row.iter().enumerate() {
            for k in 0..4 {
                suffixes.positions[r * 4 + k] = (prompts[p].len() + k) as u32;
            }
        }
        let positions: Vec<usize> = (0..12).collect();
        let rows: Vec<Vec<u32>> = of_row
            .iter()
            .zip(&completions)
            .map(|(&p, c)| [prompts[p].clone(), c.clone()].concat())
            .collect();
        let whole = Batch::left_padded(&rows, 0);
        let whole_positions: Vec<usize> = (0..3)
            .flat_map(|r| (0..4).map(move |k| r * whole.seq + whole.seq - 4 + k))
            .collect();
        for kernels in [Kernels::Fused, Kernels::Reference] {
            let (shared, _) = model.forward_positions_shared(
                &prefixes,
                &of_row,
                &suffixes,
                &positions,
                opts(kernels),
            );
            let (want, _) = model.forward_positions(&whole, &whole_positions, opts(kernels));
            let grads = shared.clone().square().mean().backward();
            let g = values(
                model.layers[0]
                    .self_attn
                    .v_proj
                    .weight
                    .val()
                    .grad(&grads)
                    .unwrap(),
            );
            assert!(g.iter().any(|x| *x != 0.0) && g.iter().all(|x| x.is_finite()));
            let (shared, want) = (values(shared), values(want));
            let d = max_diff(&shared, &want);
            assert!(
                d < 1e-5,
                "{name} {kernels:?}: shared prefix vs whole rows {d:e}"
            );
            let im = InferenceModel::new(&model);
            let host = im.forward_positions_shared(&prefixes, &of_row, &suffixes, &positions);
            let d = max_diff(&host, &want);
            assert!(d < 1e-4, "{name}: host shared prefix vs whole rows {d:e}");
        }
    }
}
