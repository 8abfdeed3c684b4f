//! The families beyond Qwen (Mixtral, OLMoE, DeepSeek-style routing) through the same model:
//! dispatch vs reference, cache vs full forward, save/load, re-saving every transformers fixture
//! unchanged, and the errors their configs give.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use serde_json::{Value, json};
use sobre_model::config::TopkMethod;
use sobre_model::{
    Batch, Family, ForwardOptions, InferenceModel, Kernels, KvCache, LogitsMode, ModelConfig,
    MoeImpl, MoeModel, ScoringFunc, default_device, init_model, load_model, save_model,
};

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

fn ids(n: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7 + salt * 13 + 3) % vocab as u32)
        .collect()
}

/// One config per family / routing arrangement, from the tiny preset, with weights large enough
/// that routing and attention are far from uniform.
fn family_configs() -> Vec<(&'static str, ModelConfig)> {
    let mut base = ModelConfig::preset("tiny").unwrap();
    base.initializer_range = 0.3;
    base.num_hidden_layers = 3;

    let mut mixtral = base.clone();
    mixtral.family = Family::Mixtral;
    mixtral.qk_norm = false;
    mixtral.norm_topk_prob = true;
    mixtral.num_experts = 5;
    mixtral.intermediate_size = mixtral.moe_intermediate_size;
    mixtral.router_jitter_noise = 0.01;

    let mut olmoe = base.clone();
    olmoe.family = Family::Olmoe;
    olmoe.norm_topk_prob = false;
    olmoe.clip_qkv = Some(1.0);
    olmoe.num_experts_per_tok = 3;
    olmoe.intermediate_size = olmoe.moe_intermediate_size;

    let mut v3 = base.clone();
    v3.num_experts = 8;
    v3.num_experts_per_tok = 3;
    v3.scoring_func = ScoringFunc::Sigmoid;
    v3.topk_method = TopkMethod::NoauxTc;
    v3.n_group = 4;
    v3.topk_group = 2;
    v3.aux_loss_free_bias = true;
    v3.routed_scaling_factor = 2.5;
    v3.n_shared_experts = 2;
    v3.shared_expert_intermediate_size = 2 * v3.moe_intermediate_size;
    v3.first_k_dense_replace = 1;

    let mut v2 = v3.clone();
    v2.scoring_func = ScoringFunc::Softmax;
    v2.topk_method = TopkMethod::GroupLimitedGreedy;
    v2.aux_loss_free_bias = false;
    v2.norm_topk_prob = false;
    v2.routed_scaling_factor = 1.5;
    v2.n_shared_experts = 1;
    v2.shared_expert_intermediate_size = v2.moe_intermediate_size;
    v2.first_k_dense_replace = 0;
    v2.moe_layer_freq = 2;

    vec![
        ("mixtral", mixtral),
        ("olmoe", olmoe),
        ("deepseek-v3 routing", v3),
        ("deepseek-v2 routing", v2),
    ]
}

fn built(cfg: &ModelConfig, seed: u64) -> MoeModel {
    cfg.validate("test").unwrap();
    let mut m = init_model(cfg, seed, &default_device());
    // A non-zero correction bias so it changes the choice.
    let sparse = (0..cfg.num_hidden_layers)
        .filter(|&i| cfg.is_sparse_layer(i))
        .count();
    let counts: Vec<Vec<u32>> = (0..sparse)
        .map(|l| {
            (0..cfg.num_experts as u32)
                .map(|e| (e * 5 + l as u32 * 3) % 7)
                .collect()
        })
        .collect();
    m.update_expert_bias(&counts, 0.05);
    m
}

#[test]
fn dispatch_equals_dense_reference_for_every_family() {
    for (name, cfg) in family_configs() {
        let m = built(&cfg, 3);
        let b = Batch::left_padded(
            &[
                ids(13, 5, cfg.vocab_size),
                ids(8, 6, cfg.vocab_size),
                ids(2, 7, cfg.vocab_size),
            ],
            0,
        );
        let opts = |moe| ForwardOptions {
            moe,
            aux_loss: true,
            ..Default::default()
        };
        let fast = m.forward(&b, None, opts(MoeImpl::Dispatch));
        let slow = m.forward(&b, None, opts(MoeImpl::DenseReference));
        let d = max_diff(&values(fast.logits), &values(slow.logits));
        assert!(d < 1e-5, "{name}: dispatch vs reference {d:e}");
        assert_eq!(fast.router.expert_counts, slow.router.expert_counts);
        let sparse = (0..cfg.num_hidden_layers)
            .filter(|&i| cfg.is_sparse_layer(i))
            .count();
        assert_eq!(fast.router.expert_counts.len(), sparse, "{name}");
        for layer in &fast.router.expert_counts {
            assert_eq!(
                layer.iter().sum::<u32>(),
                23 * cfg.num_experts_per_tok as u32
            );
        }
    }
}

#[test]
fn group_limited_routing_only_uses_kept_groups() {
    let (_, cfg) = family_configs().remove(2);
    let m = built(&cfg, 8);
    let out = m.forward(
        &Batch::left_padded(&[vec![5]], 0),
        None,
        ForwardOptions::default(),
    );
    // One token, 3 experts from 2 groups of 2 (of 4 groups): at most 2 groups are used.
    for layer in &out.router.expert_counts {
        let groups: std::collections::BTreeSet<usize> = layer
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(e, _)| e / 2)
            .collect();
        assert!(groups.len() <= 2, "experts from groups {groups:?}");
    }
}

#[test]
fn cached_decode_equals_full_forward_for_every_family() {
    for (name, cfg) in family_configs() {
        let m = built(&cfg, 1);
        let seq = ids(9, 1, cfg.vocab_size);
        let full = values(
            m.forward(
                &Batch::left_padded(std::slice::from_ref(&seq), 0),
                None,
                ForwardOptions::default(),
            )
            .logits,
        );
        let v = cfg.vocab_size;
        let mut cache = KvCache::new(&cfg, 1, 9, &default_device());
        let opts = ForwardOptions {
            logits: LogitsMode::Last,
            ..Default::default()
        };
        let prefill = m.forward(
            &Batch::left_padded(&[seq[..4].to_vec()], 0),
            Some(&mut cache),
            opts,
        );
        let mut worst = max_diff(&values(prefill.logits), &full[3 * v..4 * v]);
        for (i, &tok) in seq.iter().enumerate().skip(4) {
            let b = Batch {
                batch: 1,
                seq: 1,
                input_ids: vec![tok],
                positions: vec![i as u32],
                attention_mask: vec![true],
            };
            let step = values(m.forward(&b, Some(&mut cache), opts).logits);
            worst = worst.max(max_diff(&step, &full[i * v..(i + 1) * v]));
        }
        assert!(worst < 1e-4, "{name}: cached vs full {worst:e}");
    }
}

/// Every projection bias of `m` set to small non-zero values (init makes them zero, which would
/// leave their handling untested).
fn with_nonzero_biases(mut m: MoeModel) -> MoeModel {
    for layer in &mut m.layers {
        let a = &mut layer.self_attn;
        for proj in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            if let Some(b) = &mut proj.bias {
                let n = b.val().dims()[0];
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.05)
                    .collect();
                let device = b.val().device();
                *b = Param::from_tensor(Tensor::from_data(TensorData::new(v, [n]), &device));
            }
        }
    }
    m
}

/// `width` more tokens for rows continuing prompts `rows` (of lengths `lens`) after `done`
/// tokens each: ids `(i · mul + done + add) mod vocab`, positions after each row's prompt.
fn continuation(
    rows: &[usize],
    lens: &[usize],
    width: usize,
    done: usize,
    (mul, add): (usize, usize),
    vocab: usize,
) -> Batch {
    let n = rows.len();
    Batch {
        batch: n,
        seq: width,
        input_ids: (0..n * width)
            .map(|i| ((i * mul + done + add) % vocab) as u32)
            .collect(),
        positions: rows
            .iter()
            .flat_map(|&r| (0..width).map(move |j| (lens[r] + done + j) as u32))
            .collect(),
        attention_mask: vec![true; n * width],
    }
}

/// The host inference engine (the rollouts' fast path) against the tensor forward with the
/// reference kernels, for every family's options plus Qwen2-MoE's biases and gated shared
/// expert and Qwen3-MoE with tied embeddings and a dense layer: prefill of a left-padded batch
/// (a one-token prompt gives padding queries with no key), rows reordered and duplicated as a
/// group's samples are, a two-token step, then one-token decode steps.
#[test]
fn host_inference_agrees_with_the_model() {
    let mut configs = family_configs();
    let mut qwen2 = ModelConfig::preset("tiny").unwrap();
    qwen2.family = Family::Qwen2Moe;
    qwen2.initializer_range = 0.3;
    qwen2.num_hidden_layers = 2;
    qwen2.qk_norm = false;
    qwen2.attention_bias = true;
    qwen2.shared_expert_intermediate_size = 8;
    qwen2.shared_expert_gate = true;
    let mut qwen3 = ModelConfig::preset("tiny").unwrap();
    qwen3.initializer_range = 0.3;
    qwen3.num_hidden_layers = 3;
    qwen3.mlp_only_layers = vec![1];
    qwen3.tie_word_embeddings = true;
    configs.extend([("qwen2-moe", qwen2), ("qwen3-moe", qwen3)]);
    for (name, cfg) in configs {
        let m = with_nonzero_biases(built(&cfg, 21));
        let host = InferenceModel::new(&m);
        let v = cfg.vocab_size;
        let opts = ForwardOptions {
            logits: LogitsMode::Last,
            kernels: Kernels::Reference,
            ..Default::default()
        };
        let prompts = [ids(7, 1, v), ids(3, 2, v), ids(1, 3, v)];
        let lens = prompts.each_ref().map(|p| p.len());
        let capacity = 7 + 2 + 3;
        let mut cache = KvCache::new(&cfg, 3, capacity, &default_device());
        let mut host_cache = host.new_cache(3, capacity);
        let mut worst = 0.0f32;
        let mut compare = |want: Vec<f32>, got: Vec<f32>| {
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{name}: non-finite logits"
            );
            let scale = want.iter().fold(1.0f32, |s, x| s.max(x.abs()));
            worst = worst.max(max_diff(&want, &got) / scale);
        };
        let prefill = Batch::left_padded(&prompts, 0);
        compare(
            values(m.forward(&prefill, Some(&mut cache), opts).logits),
            host.forward_last(&prefill, &mut host_cache),
        );
        let rows = [2, 0, 0, 1];
        let mut cache = cache.select_rows(&rows);
        let mut host_cache = host_cache.select_rows(&rows);
        assert_eq!((host_cache.batch(), host_cache.len()), (4, 7));
        let mut done = 0;
        for width in [2, 1, 1, 1] {
            let b = continuation(&rows, &lens, width, done, (5, 1), v);
            compare(
                values(m.forward(&b, Some(&mut cache), opts).logits),
                host.forward_last(&b, &mut host_cache),
            );
            done += width;
        }
        assert_eq!(host_cache.len(), capacity);
        assert!(worst < 1e-5, "{name}: host vs tensor forward {worst:e}");
    }
}

/// Rows that continue a shared prefix (`HostKvCache::share_prefix`: the prompts' keys kept
/// once, attention over them merged with each row's own by the softmax normalisers) give the
/// logits of rows holding copies of the prefix (`select_rows`), for every family: prompts of
/// different lengths (left padding, a one-token prompt), rows in an order where one prefix's
/// rows are not all adjacent, a two-token step (the causal path), rows dropped midway as
/// finished samples are, then one-token steps. Relative 1e-5: only the summation order of
/// the softmax differs.
#[test]
fn shared_prefix_cache_agrees_with_copied_rows() {
    for (name, cfg) in family_configs() {
        let m = with_nonzero_biases(built(&cfg, 33));
        let host = InferenceModel::new(&m);
        let v = cfg.vocab_size;
        let prompts = [ids(7, 4, v), ids(3, 5, v), ids(1, 6, v)];
        let lens = prompts.each_ref().map(|p| p.len());
        let new_tokens = 5;
        let mut prefill_cache = host.new_cache(3, 7 + new_tokens);
        host.forward_last(&Batch::left_padded(&prompts, 0), &mut prefill_cache);
        let mut rows = vec![1, 1, 0, 2, 2, 0];
        let mut copied = prefill_cache.select_rows(&rows);
        let mut shared = prefill_cache.share_prefix(&rows, new_tokens);
        assert_eq!((shared.batch(), shared.len()), (6, 7), "{name}");
        let mut done = 0;
        let mut worst = 0.0f32;
        for width in [2, 1, 1, 1] {
            if done == 3 {
                // Rows 1 and 4 finish.
                let keep = [0, 2, 3, 5];
                copied = copied.select_rows(&keep);
                shared = shared.select_rows(&keep);
                rows = keep.iter().map(|&k| rows[k]).collect();
            }
            let b = continuation(&rows, &lens, width, done, (7, 2), v);
            let want = host.forward_last(&b, &mut copied);
            let got = host.forward_last(&b, &mut shared);
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{name}: non-finite logits"
            );
            let scale = want.iter().fold(1.0f32, |s, x| s.max(x.abs()));
            worst = worst.max(max_diff(&want, &got) / scale);
            done += width;
        }
        assert_eq!((shared.batch(), shared.len()), (4, 7 + done), "{name}");
        assert!(
            worst < 1e-5,
            "{name}: shared prefix vs copied rows {worst:e}"
        );
    }
}

#[test]
fn every_family_saves_and_loads_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (name, cfg) in family_configs() {
        let m = built(&cfg, 5);
        let b = Batch::left_padded(&[ids(6, 11, cfg.vocab_size)], 0);
        let before = values(m.forward(&b, None, ForwardOptions::default()).logits);
        let path = dir.path().join(name.replace(' ', "_"));
        save_model(&m, &path, Some(10_000)).unwrap();
        let loaded = load_model(&path, &default_device()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            loaded.config, cfg,
            "{name}: config changed across save/load"
        );
        let after = values(loaded.forward(&b, None, ForwardOptions::default()).logits);
        assert_eq!(before, after, "{name}: logits changed across save/load");
        let (total, _) = cfg.count_parameters();
        // e_score_correction_bias is a buffer (never trained by gradient), not a parameter.
        let saved: usize = sobre_model::io::hf_tensors(&loaded)
            .iter()
            .filter(|(n, _, _)| !n.ends_with("e_score_correction_bias"))
            .map(|(_, _, v)| v.len())
            .sum();
        assert_eq!(total, saved, "{name}: parameter count");
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Every tensor of a model directory, by name: (dtype, shape, raw bytes).
fn raw_tensors(dir: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (n, v) in st.tensors() {
            out.insert(
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            );
        }
    }
    out
}

/// Export: sobre re-saving a checkpoint transformers wrote gives back the same tensors, byte for
/// byte under the same names, and a config.json whose keys agree with transformers' own — so
/// what sobre writes for every family is what transformers reads. (`scripts/check_hf.py` runs
/// transformers on such directories; `export_fixture.rs` checks one without Python.)
#[test]
fn resaving_every_fixture_gives_back_its_tensors_and_config() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "qwen3_moe_tiny",
        "qwen2_moe_tiny",
        "mixtral_tiny",
        "olmoe_tiny",
        "deepseek_v3_routing_tiny",
        "deepseek_v2_routing_tiny",
    ] {
        let src = fixture(name);
        let m = load_model(&src, &default_device()).unwrap();
        let out = dir.path().join(name);
        save_model(&m, &out, None).unwrap();
        let (a, b) = (raw_tensors(&src), raw_tensors(&out));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        for (k, va) in &a {
            assert!(va == &b[k], "{name}: tensor `{k}` differs after re-saving");
        }
        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        let (orig, ours) = (read(&src), read(&out));
        for (k, v) in orig.as_object().unwrap() {
            let Some(w) = ours.get(k) else { continue };
            // transformers writes `head_dim: null` for "hidden / heads"; sobre writes the value.
            if k == "head_dim" && v.is_null() {
                continue;
            }
            if k == "transformers_version" {
                continue;
            }
            let same = match (v.as_f64(), w.as_f64()) {
                (Some(x), Some(y)) => x == y,
                _ => v == w,
            };
            assert!(
                same,
                "{name}: config key `{k}`: transformers {v}, sobre {w}"
            );
        }
        // Keys transformers' class reads that sobre must write.
        for k in [
            "model_type",
            "architectures",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_experts_per_tok",
            "rms_norm_eps",
            "rope_parameters",
            "tie_word_embeddings",
        ] {
            assert!(ours.get(k).is_some(), "{name}: sobre did not write `{k}`");
        }
    }
}

fn config_err(cfg: &Value) -> String {
    ModelConfig::from_json_str(&cfg.to_string(), "m/config.json")
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string())
}

fn fixture_config(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
        .unwrap()
}

#[test]
fn refused_options_name_the_key_and_value() {
    let mixtral = fixture_config("mixtral_tiny");
    let olmoe = fixture_config("olmoe_tiny");
    let ds = fixture_config("deepseek_v3_routing_tiny");
    let with = |base: &Value, key: &str, v: Value| {
        let mut c = base.clone();
        c[key] = v;
        c
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(&mixtral, "model_type", json!("gpt2")),
            "unsupported `model_type` \"gpt2\"; sobre reads \"qwen3_moe\", \"qwen2_moe\", \"mixtral\", \"olmoe\", \"granitemoe\", \"qwen2\", \"qwen3\", \"llama\", \"mistral\"",
        ),
        (
            with(&mixtral, "sliding_window", json!(128)),
            "unsupported `sliding_window` = 128 (< `max_position_embeddings` = 256)",
        ),
        (
            with(&mixtral, "norm_topk_prob", json!(false)),
            "unsupported `norm_topk_prob` = false for \"mixtral\"",
        ),
        (
            with(&mixtral, "attention_bias", json!(true)),
            "unsupported `attention_bias` = true for \"mixtral\"",
        ),
        (
            with(&olmoe, "head_dim", json!(16)),
            "`num_attention_heads · head_dim` (4 · 16) must equal `hidden_size` (32)",
        ),
        (
            with(&olmoe, "clip_qkv", json!("big")),
            "`clip_qkv` must be null or a number, found \"big\"",
        ),
        (
            with(&ds, "topk_method", json!("random")),
            "unsupported `topk_method` \"random\"",
        ),
        (
            with(&ds, "n_group", json!(3)),
            "`n_group` (3) must divide `num_experts` (8)",
        ),
        (
            with(&ds, "topk_group", json!(5)),
            "`topk_group` must be in 1..=4 (`n_group`), found 5",
        ),
        (
            with(&ds, "topk_group", json!(1)),
            "`num_experts_per_tok` (3) exceeds the 2 experts in `topk_group` (1) groups of 2",
        ),
        (
            with(&with(&ds, "n_group", json!(8)), "topk_group", json!(4)),
            "each of the `n_group` (8) groups needs at least 2 experts",
        ),
        (
            with(&ds, "shared_expert_intermediate_size", json!(7)),
            "`shared_expert_intermediate_size` (7) disagrees with `n_shared_experts`",
        ),
        (with(&ds, "first_k_dense_replace", json!(3)), ""),
    ];
    for (cfg, want) in cases {
        let err = config_err(&cfg);
        if want.is_empty() {
            // All layers dense is a valid (if MoE-less) model.
            assert_eq!(err, "", "{cfg}");
            continue;
        }
        assert!(
            err.starts_with("m/config.json: ") && err.contains(want),
            "want `{want}` in: {err}"
        );
    }
    // Mixtral / OLMoE have no dense layers to make.
    let mut m = ModelConfig::from_json_str(&mixtral.to_string(), "m").unwrap();
    m.first_k_dense_replace = 1;
    let err = m.validate("v").unwrap_err().to_string();
    assert!(err.contains("\"mixtral\" has no dense layers"), "{err}");
}

/// DeepSeek configs (here a Qwen3-MoE config relabelled, with DeepSeek-V3's published MLA and
/// routing values) read with Multi-head Latent Attention (`tests/mla.rs` has the rest). A
/// grouped-query `num_key_value_heads`, which MLA has no place for, is refused by name.
#[test]
fn deepseek_configs_read_their_mla_keys() {
    for (model_type, extra) in [
        (
            "deepseek_v3",
            json!({"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                   "qk_nope_head_dim": 128, "v_head_dim": 128, "n_routed_experts": 256,
                   "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc"}),
        ),
        (
            "deepseek_v2",
            json!({"q_lora_rank": null, "kv_lora_rank": 512, "norm_topk_prob": false}),
        ),
    ] {
        let mut cfg = fixture_config("qwen3_moe_tiny");
        cfg["model_type"] = json!(model_type);
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        // `num_local_experts` is V3's alias of `n_routed_experts`: two values are ambiguous.
        let err = config_err(&cfg);
        if model_type == "deepseek_v3" {
            assert!(
                err.contains("`n_routed_experts` and its alias `num_local_experts` disagree"),
                "{err}"
            );
        }
        cfg.as_object_mut().unwrap().remove("num_local_experts");
        let err = config_err(&cfg);
        assert!(
            err.contains(&format!(
                "unsupported `num_key_value_heads` = 2 for \"{model_type}\""
            )),
            "{err}"
        );
        cfg["num_key_value_heads"] = json!(4);
        let c = ModelConfig::from_json_str(&cfg.to_string(), "m").unwrap();
        let mla = c.mla.clone().expect("MLA");
        assert_eq!(mla.kv_lora_rank, 512);
        let v3 = model_type == "deepseek_v3";
        assert_eq!(mla.q_lora_rank, v3.then_some(1536));
        assert_eq!(c.head_dim, mla.qk_rope_head_dim);
        // Qwen's layer keys mean nothing to DeepSeek's classes.
        assert!(c.unknown_keys.contains(&"mlp_only_layers".to_string()));
    }
}

#[test]
fn mixtral_windows_at_least_the_context_are_full_attention() {
    let mut cfg = fixture_config("mixtral_tiny");
    cfg["sliding_window"] = json!(256);
    let c = ModelConfig::from_json_str(&cfg.to_string(), "m").unwrap();
    assert_eq!(c.family, Family::Mixtral);
    assert!(c.norm_topk_prob && !c.qk_norm && !c.attention_bias);
    assert_eq!(
        (c.num_experts, c.moe_intermediate_size, c.head_dim),
        (5, 20, 8)
    );
    // transformers' Mixtral default RoPE base when the key is absent.
    cfg.as_object_mut().unwrap().remove("rope_parameters");
    let c = ModelConfig::from_json_str(&cfg.to_string(), "m").unwrap();
    assert_eq!(c.rope_theta, 1e6);
    // router_jitter_noise is training-time noise in transformers: accepted, kept, never applied.
    cfg["router_jitter_noise"] = json!(0.1);
    let c = ModelConfig::from_json_str(&cfg.to_string(), "m").unwrap();
    assert_eq!(c.router_jitter_noise, 0.1);
    assert_eq!(c.to_json()["router_jitter_noise"], json!(0.1));
}

/// Sharded checkpoints: an index that disagrees with its shards is reported with the file names,
/// all problems together.
#[test]
fn sharded_index_problems_name_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    let src = fixture("qwen2_moe_tiny");
    std::fs::create_dir(&path).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, path.join(p.file_name().unwrap())).unwrap();
    }
    let index_path = path.join("model.safetensors.index.json");
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    map.insert(
        "model.norm.weight".into(),
        json!("model-00001-of-00003.safetensors"),
    );
    map.insert(
        "model.ghost.weight".into(),
        json!("model-00002-of-00003.safetensors"),
    );
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = match load_model(&path, &default_device()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    for needle in [
        "the index lists tensor `model.norm.weight` in model-00001-of-00003.safetensors, but it is in model-00003-of-00003.safetensors",
        "the index lists tensor `model.ghost.weight` in model-00002-of-00003.safetensors, which does not hold it",
    ] {
        assert!(err.contains(needle), "want `{needle}` in:\n{err}");
    }
}

/// A frozen model's weight matrices in bf16 (`InferenceModel::into_bf16`, the reference and
/// teacher under `model.frozen_dtype = "bf16"`): its log-probabilities of a batch of
/// completions move off the f32 engine's by a measured amount, nonzero (the weights are
/// really rounded) and within the bound the docs state: on average at most 0.03 nats a token,
/// and at most 0.5 at any token, for every family. Observed (these models' weights are 15
/// times a real initialisation's, which makes them touchier): mean 0.009–0.022, max 0.03 where
/// routing holds and 0.35–0.41 for DeepSeek's group-limited routing, where the rounding flips
/// an expert choice of some token. Also checks the chunked host log-probabilities against the
/// whole logits.
#[test]
fn bf16_frozen_weights_move_log_probs_by_a_bounded_amount() {
    let mut report = vec![];
    for (name, cfg) in family_configs() {
        let m = with_nonzero_biases(built(&cfg, 23));
        let v = cfg.vocab_size;
        let f32_engine = InferenceModel::new(&m);
        let batch = Batch::right_padded(&[ids(9, 4, v), ids(9, 5, v), ids(9, 6, v)], 0);
        let positions: Vec<usize> = (0..27).collect();
        let targets: Vec<usize> = (0..27).map(|i| (i * 13 + 5) % v).collect();
        let full = f32_engine.token_logprobs(&batch, &positions, &targets, 1.0);
        let logits = f32_engine.forward_positions(&batch, &positions);
        let whole = sobre_model::fused::token_logprobs_host(&logits, v, &targets, 1.0);
        assert!(
            max_diff(&full, &whole) <= 1e-6,
            "{name}: chunked host log-probs"
        );
        let half = InferenceModel::new(&m).into_bf16();
        let low = half.token_logprobs(&batch, &positions, &targets, 1.0);
        let worst = max_diff(&full, &low);
        let mean = full
            .iter()
            .zip(&low)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / 27.0;
        report.push(format!("{name}: max {worst:.2e}, mean {mean:.2e}"));
        assert!(worst > 0.0, "{name}: bf16 changed nothing");
        assert!(
            worst <= 0.5 && mean <= 0.03,
            "{name}: {}",
            report.join("; ")
        );
    }
    eprintln!("bf16 log-prob shifts: {}", report.join("; "));
}
