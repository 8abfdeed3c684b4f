//! LoRA adapters on the model: the maths by hand, zero-initialised adapters changing nothing,
//! gradients reaching only the adapters, fused vs reference kernels, the host engine's merged
//! weights, merging, saving and loading in PEFT's layout, and the errors.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use sobre_model::lora::{self, LoraConfig, LoraInit};
use sobre_model::model::{LoraAdapter, Mlp, Proj};
use sobre_model::{
    Batch, ForwardOptions, InferenceModel, Kernels, MoeModel, default_device, load_model,
    save_model,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn t2(v: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// `max |a − b| / max |b|`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn cfg(r: usize, alpha: f64, targets: &[&str], init: LoraInit) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
        init,
    }
}

const ALL: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Two rows of different lengths, left-padded (so padding and masks take part).
fn batch(vocab: usize) -> Batch {
    let seq = |n: u32, salt: u32| -> Vec<u32> {
        (0..n)
            .map(|i| (i * 7 + salt * 13 + 3) % vocab as u32)
            .collect()
    };
    Batch::left_padded(&[seq(9, 1), seq(6, 2)], 0)
}

fn logits(model: &MoeModel, b: &Batch, kernels: Kernels) -> Vec<f32> {
    let opts = ForwardOptions {
        kernels,
        ..Default::default()
    };
    values(model.forward(b, None, opts).logits)
}

fn adapter(
    a: Vec<f32>,
    a_shape: [usize; 2],
    b: Vec<f32>,
    b_shape: [usize; 2],
    scale: f64,
) -> LoraAdapter {
    let d = default_device();
    LoraAdapter {
        a: Param::from_tensor(t2(a, a_shape, &d)),
        b: Param::from_tensor(t2(b, b_shape, &d)),
        scale,
        enabled: true,
        dropout: 0.0,
    }
}

/// `x·W + b + scale·(x·A)·B` on numbers small enough to do by hand, fused and reference:
/// x = [1, 2, 3], W = [[1, 0], [0, 1], [1, 1]] → xW = [4, 5]; b = [0.5, −0.5] → [4.5, 4.5];
/// A = [1, 0, −1]ᵀ → xA = −2; B = [0.5, 2] → (xA)B = [−1, −4]; scale = alpha/r = 2/1 → [−2, −8];
/// y = [2.5, −3.5]. The merged weight W + 2·A·B gives the same.
#[test]
fn adapter_math_by_hand() {
    let d = default_device();
    let proj = Proj {
        weight: Param::from_tensor(t2(vec![1., 0., 0., 1., 1., 1.], [3, 2], &d)),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.5f32, -0.5], [2]),
            &d,
        ))),
        lora: Some(adapter(
            vec![1., 0., -1.],
            [3, 1],
            vec![0.5, 2.],
            [1, 2],
            2.0,
        )),
    };
    let x = t2(vec![1., 2., 3.], [1, 3], &d);
    for fused in [true, false] {
        assert_eq!(values(proj.forward(x.clone(), fused)), vec![2.5, -3.5]);
    }
    // W + 2·A·B = [[2, 4], [0, 1], [0, −3]]
    assert_eq!(values(proj.merged_weight()), vec![2., 4., 0., 1., 0., -3.]);
    // rsLoRA: alpha/√r; plain: alpha/r.
    let mut c = cfg(4, 8.0, &["q_proj"], LoraInit::Default);
    assert_eq!(c.scale(), 2.0);
    c.use_rslora = true;
    assert_eq!(c.scale(), 4.0);

    // SwiGLU with a gate adapter and a down adapter, hidden 2, inter 1:
    // gate_up = [[1, 2], [0, 1]] (gate column, up column), x = [1, −1] → gate 1, up 1;
    // gate adapter A = [1, 0]ᵀ, B = [2], scale 1 → gate 1 + 2 = 3; act = silu(3)·1;
    // down = [[1, 2]], down adapter A = [1], B = [1, −1], scale 0.5 → y = act·[1.5, 1.5].
    let mlp = Mlp {
        gate_up: Param::from_tensor(t2(vec![1., 2., 0., 1.], [2, 2], &d)),
        down: Param::from_tensor(t2(vec![1., 2.], [1, 2], &d)),
        gate_lora: Some(adapter(vec![1., 0.], [2, 1], vec![2.], [1, 1], 1.0)),
        up_lora: None,
        down_lora: Some(adapter(vec![1.], [1, 1], vec![1., -1.], [1, 2], 0.5)),
    };
    let act = 3.0f64 / (1.0 + (-3.0f64).exp());
    let x = t2(vec![1., -1.], [1, 2], &d);
    for fused in [true, false] {
        let y = values(mlp.forward(x.clone(), fused));
        for v in y {
            assert!((v as f64 - 1.5 * act).abs() < 1e-6, "{v} vs {}", 1.5 * act);
        }
    }
    // Merged: gate_up [[3, 2], [0, 1]], down [[1.5, 1.5]].
    assert_eq!(values(mlp.merged_gate_up()), vec![3., 2., 0., 1.]);
    assert_eq!(values(mlp.merged_down()), vec![1.5, 1.5]);
}

/// PEFT's default init (B = 0) leaves every logit exactly as the base model's, on both kernel
/// sets; adapters switched off do too; a non-zero B (PEFT's `init_lora_weights=False`) moves
/// them. A is Kaiming-uniform(a = √5): within ±1/√in and spread over that range.
#[test]
fn zero_initialised_adapters_leave_the_logits_exactly() {
    let d = default_device();
    for name in ["qwen2_tiny", "qwen2_moe_tiny"] {
        let base = load_model(&fixture(name), &d).unwrap();
        let b = batch(base.config.vocab_size);
        let targets: Vec<&str> = lora::available_modules(&base);
        let adapted =
            lora::add_adapters(base.clone(), &cfg(4, 8.0, &targets, LoraInit::Default), 3).unwrap();
        assert!(adapted.has_adapters());
        for k in [Kernels::Fused, Kernels::Reference] {
            assert_eq!(
                logits(&adapted, &b, k),
                logits(&base, &b, k),
                "{name} {k:?}"
            );
        }
        let a = &adapted.layers[0].self_attn.q_proj.lora.as_ref().unwrap().a;
        let av = values(a.val());
        let bound = 1.0 / (base.config.hidden_size as f32).sqrt();
        let max = av.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(max <= bound && max > 0.9 * bound, "{max} vs {bound}");
        let random =
            lora::add_adapters(base.clone(), &cfg(4, 8.0, &targets, LoraInit::Random), 3).unwrap();
        let (lr, lb) = (
            logits(&random, &b, Kernels::Fused),
            logits(&base, &b, Kernels::Fused),
        );
        assert!(
            rel_diff(&lr, &lb) > 1e-3,
            "{name}: random adapters moved nothing"
        );
        let off = random.with_adapters_enabled(false);
        assert_eq!(logits(&off, &b, Kernels::Fused), lb, "{name}: adapters off");
    }
}

/// Paths of the parameters that received a gradient.
struct WithGrad<'a> {
    path: Vec<String>,
    grads: &'a burn::tensor::Gradients,
    with: Vec<(String, f32)>,
    without: Vec<String>,
}

impl ModuleVisitor for WithGrad<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let p = self.path.join(".");
        match param.val().grad(self.grads) {
            Some(g) => {
                let m = values(g).iter().fold(0.0f32, |m, x| m.max(x.abs()));
                self.with.push((p, m));
            }
            None => self.without.push(p),
        }
    }
}

/// With adapters on, a backward reaches the adapters' A and B (every one, non-zero) and no base
/// parameter: the base is frozen. MoE (shared expert) and MLA models alike.
#[test]
fn gradients_reach_only_the_adapters() {
    let device = default_device().autodiff();
    for name in ["qwen2_tiny", "qwen2_moe_tiny", "deepseek_v3_tiny"] {
        let base = load_model(&fixture(name), &device).unwrap();
        let targets = lora::available_modules(&base);
        let m = lora::add_adapters(base, &cfg(2, 4.0, &targets, LoraInit::Random), 5).unwrap();
        let n_adapters = lora::adapter_tensors(&m).len();
        let b = batch(m.config.vocab_size);
        let out = m.forward(&b, None, ForwardOptions::default());
        let grads = out.logits.powf_scalar(2.0).mean().backward();
        let mut v = WithGrad {
            path: vec![],
            grads: &grads,
            with: vec![],
            without: vec![],
        };
        m.visit(&mut v);
        assert_eq!(v.with.len(), n_adapters, "{name}: {:?}", v.with);
        for (p, g) in &v.with {
            assert!(
                p.contains("lora"),
                "{name}: base parameter {p} got a gradient"
            );
            assert!(*g > 0.0, "{name}: {p} got a zero gradient");
        }
        assert!(v.without.iter().all(|p| !p.contains("lora")));
        assert!(v.without.iter().any(|p| p.ends_with("embed_tokens")));
    }
}

/// Adapter gradients of `logits · c` (a fixed cotangent) by PEFT name, and the logits.
fn adapter_grads(m: &MoeModel, b: &Batch, kernels: Kernels) -> (Vec<f32>, Vec<Vec<f32>>) {
    let opts = ForwardOptions {
        kernels,
        ..Default::default()
    };
    let y = m.forward(b, None, opts).logits;
    let n = y.shape().num_elements();
    let c: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let c = Tensor::<3>::from_data(TensorData::new(c, y.dims()), &y.device());
    let grads = (y.clone() * c).sum().backward();
    let mut v = WithGrad {
        path: vec![],
        grads: &grads,
        with: vec![],
        without: vec![],
    };
    m.visit(&mut v);
    let mut g = Vec::new();
    struct Collect<'a>(&'a burn::tensor::Gradients, &'a mut Vec<Vec<f32>>);
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.0) {
                self.1.push(values(g));
            }
        }
    }
    m.visit(&mut Collect(&grads, &mut g));
    (values(y), g)
}

/// The fused kernels and the reference compositions agree with adapters on every projection:
/// logits within 1e-5 and each adapter gradient within 1e-4 (relative to its largest entry).
#[test]
fn fused_and_reference_kernels_agree_with_adapters() {
    let device = default_device().autodiff();
    for name in ["qwen2_tiny", "qwen2_moe_tiny", "deepseek_v3_tiny"] {
        let base = load_model(&fixture(name), &device).unwrap();
        let targets = lora::available_modules(&base);
        let m = lora::add_adapters(base, &cfg(3, 6.0, &targets, LoraInit::Random), 9).unwrap();
        let b = batch(m.config.vocab_size);
        let (yf, gf) = adapter_grads(&m, &b, Kernels::Fused);
        let (yr, gr) = adapter_grads(&m, &b, Kernels::Reference);
        assert!(rel_diff(&yf, &yr) <= 1e-5, "{name}: {}", rel_diff(&yf, &yr));
        assert_eq!(gf.len(), gr.len());
        assert_eq!(gf.len(), lora::adapter_tensors(&m).len());
        for (i, (a, r)) in gf.iter().zip(&gr).enumerate() {
            let d = rel_diff(a, r);
            assert!(d <= 1e-4, "{name}: gradient {i} differs by {d:e}");
        }
    }
}

/// The host engine folds the adapters into its weights: its logits equal the tensor
/// forward's within 1e-5 (relative) on a dense model, an MoE with a shared expert and MLA
/// (q_a/q_b, kv_a, kv_b reordered and split by the engine).
#[test]
fn host_engine_runs_the_adapted_model() {
    let d = default_device();
    for name in [
        "qwen2_tiny",
        "qwen2_moe_tiny",
        "deepseek_v3_tiny",
        "deepseek_v2_lite_tiny",
    ] {
        let base = load_model(&fixture(name), &d).unwrap();
        let targets = lora::available_modules(&base);
        let m =
            lora::add_adapters(base.clone(), &cfg(4, 8.0, &targets, LoraInit::Random), 11).unwrap();
        let b = batch(m.config.vocab_size);
        let positions: Vec<usize> = (0..b.batch * b.seq).collect();
        let host = InferenceModel::new(&m).forward_positions(&b, &positions);
        let tensor = logits(&m, &b, Kernels::Fused);
        let diff = rel_diff(&host, &tensor);
        assert!(diff <= 1e-5, "{name}: host vs tensor {diff:e}");
        let plain = logits(&base, &b, Kernels::Fused);
        assert!(
            rel_diff(&tensor, &plain) > 1e-3,
            "{name}: adapters without effect"
        );
        // Off, the host engine is the base model's.
        let off = InferenceModel::new(&m.clone().with_adapters_enabled(false))
            .forward_positions(&b, &positions);
        assert!(rel_diff(&off, &plain) <= 1e-5, "{name}: off");
    }
}

/// Merging folds the adapters into the weights (same logits within 1e-5, no adapters left,
/// saved as a plain model that reloads to those logits); saving a model that still carries
/// adapters as a plain model is refused.
#[test]
fn merge_folds_adapters_into_a_plain_model() {
    let d = default_device();
    let base = load_model(&fixture("qwen2_tiny"), &d).unwrap();
    let m = lora::add_adapters(base, &cfg(4, 8.0, ALL, LoraInit::Random), 13).unwrap();
    let b = batch(m.config.vocab_size);
    let want = logits(&m, &b, Kernels::Fused);
    let dir = tempfile::tempdir().unwrap();
    let err = save_model(&m, &dir.path().join("x"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("LoRA adapters"), "{err}");
    let merged = lora::merge_adapters(m);
    assert!(!merged.has_adapters());
    assert!(rel_diff(&logits(&merged, &b, Kernels::Fused), &want) <= 1e-5);
    save_model(&merged, &dir.path().join("merged"), None).unwrap();
    let back = load_model(&dir.path().join("merged"), &d).unwrap();
    assert!(rel_diff(&logits(&back, &b, Kernels::Fused), &want) <= 1e-5);
}

/// An adapter saved in PEFT's layout loads back onto the base bit for bit (the same tensors,
/// the same logits), by `load_adapter` and by `load_model` on the adapter directory (base
/// found through `base_model_name_or_path`); PEFT's names and shapes, `adapter_config.json`'s
/// keys.
#[test]
fn saved_adapters_reload_exactly() {
    let d = default_device();
    let base_dir = fixture("qwen2_moe_tiny");
    let base = load_model(&base_dir, &d).unwrap();
    let c = LoraConfig {
        use_rslora: true,
        ..cfg(
            4,
            16.0,
            &["q_proj", "v_proj", "gate_proj", "down_proj"],
            LoraInit::Random,
        )
    };
    let m = lora::add_adapters(base.clone(), &c, 17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("adapter");
    lora::save_adapter(&m, &c, &base_dir.display().to_string(), &ad).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["lora_alpha"], 16.0);
    assert_eq!(cfg_json["use_rslora"], true);
    assert_eq!(cfg_json["bias"], "none");
    assert_eq!(cfg_json["fan_in_fan_out"], false);
    let tensors = lora::adapter_tensors(&m);
    let names: Vec<&str> = tensors.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(
        names
            .contains(&"base_model.model.model.layers.3.mlp.shared_expert.down_proj.lora_B.weight")
    );
    let shape = |n: &str| tensors.iter().find(|(m, _, _)| m == n).unwrap().1.clone();
    assert_eq!(
        shape("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"),
        vec![8, 4]
    );
    assert_eq!(
        shape("base_model.model.model.layers.1.mlp.shared_expert.gate_proj.lora_A.weight"),
        vec![4, 32]
    );
    // 4 layers × (q, v, shared gate, shared down) × (A, B)
    assert_eq!(tensors.len(), 32);
    let (back, back_cfg) = lora::load_adapter(base.clone(), &ad).unwrap();
    assert_eq!(back_cfg, c);
    assert_eq!(lora::adapter_map(&back), lora::adapter_map(&m));
    let b = batch(m.config.vocab_size);
    let want = logits(&m, &b, Kernels::Fused);
    assert_eq!(logits(&back, &b, Kernels::Fused), want);
    let auto = load_model(&ad, &d).unwrap();
    assert_eq!(logits(&auto, &b, Kernels::Fused), want);
}

/// Errors name the key and the value: r = 0, a target module the model does not have (with
/// the ones it has), routed experts, an adapter whose shapes do not match the base, an
/// adapter with a tensor for a module it does not target.
#[test]
fn lora_errors_name_key_and_value() {
    let d = default_device();
    let qwen = load_model(&fixture("qwen2_tiny"), &d).unwrap();
    let err = lora::add_adapters(
        qwen.clone(),
        &cfg(0, 8.0, &["q_proj"], LoraInit::Default),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`r` = 0"), "{err}");
    let v3 = load_model(&fixture("deepseek_v3_tiny"), &d).unwrap();
    let err = lora::add_adapters(v3, &cfg(2, 8.0, &["k_proj"], LoraInit::Default), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has no `k_proj`") && err.contains("kv_a_proj_with_mqa, kv_b_proj"),
        "{err}"
    );
    let mixtral = load_model(&fixture("mixtral_tiny"), &d).unwrap();
    let err = lora::add_adapters(
        mixtral.clone(),
        &cfg(2, 8.0, &["gate_proj"], LoraInit::Default),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("has no `gate_proj`") && err.contains("routed experts"),
        "{err}"
    );
    let err = lora::add_adapters(mixtral, &cfg(2, 8.0, &["w1"], LoraInit::Default), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`w1`") && err.contains("routed-expert"),
        "{err}"
    );
    let err = lora::add_adapters(qwen.clone(), &cfg(2, 8.0, &["qproj"], LoraInit::Default), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown module `qproj`"), "{err}");

    // An adapter made for qwen2_tiny (head_dim 8, 2 KV heads: v_proj out 16) on llama_tiny
    // (head_dim 16: v_proj out 32).
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(2, 4.0, &["v_proj"], LoraInit::Random);
    let m = lora::add_adapters(qwen.clone(), &c, 1).unwrap();
    lora::save_adapter(&m, &c, "qwen2_tiny", dir.path()).unwrap();
    let llama = load_model(&fixture("llama_tiny"), &d).unwrap();
    let err = lora::load_adapter(llama, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
            && err.contains("has shape [16, 2], expected [32, 2]"),
        "{err}"
    );
    // A config that targets fewer modules than the file holds.
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let err = lora::load_adapter(qwen.clone(), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "missing tensor `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`"
        ) && err.contains(
            "unexpected tensor `base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight`"
        ),
        "{err}"
    );
    v["r"] = serde_json::json!(0);
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let err = lora::load_adapter(qwen.clone(), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("`r` = 0"),
        "{err}"
    );
    v["r"] = serde_json::json!(2);
    v["use_dora"] = serde_json::json!(true);
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let err = lora::load_adapter(qwen, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`use_dora` = true"), "{err}");
}

/// The target modules read from a config (for checking `[lora]` before any work) are those the
/// built model has, for every fixture family and the presets.
#[test]
fn modules_from_the_config_are_the_models() {
    let d = default_device();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if !p.join("config.json").is_file() {
            continue;
        }
        // (Some fixtures exist to be refused, e.g. llama_linear_tiny's `mlp_bias`.)
        let Ok(m) = load_model(&p, &d) else {
            continue;
        };
        assert_eq!(
            lora::available_modules_for_config(&m.config),
            lora::available_modules(&m),
            "{}",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 15, "{n} fixtures");
    for preset in ["tiny", "small", "w1"] {
        let c = sobre_model::ModelConfig::preset(preset).unwrap();
        let m = sobre_model::init_model(&c, 0, &d);
        assert_eq!(
            lora::available_modules_for_config(&c),
            vec!["q_proj", "k_proj", "v_proj", "o_proj"]
        );
        assert_eq!(
            lora::available_modules(&m),
            vec!["q_proj", "k_proj", "v_proj", "o_proj"]
        );
    }
}

/// LoRA dropout: inactive outside a training forward's scope; inside it the adapter computes
/// `scale · ((x ⊙ M) · A) · B` with `M` the scope's next inverted-dropout mask (entries 0 or
/// `1 / (1 − p)`, about `p` of them 0), the same for the same seed.
#[test]
fn lora_dropout_masks_the_adapter_input_inside_a_scope_only() {
    let d = default_device();
    let mut ad = adapter(
        (0..8).map(|i| 0.1 * i as f32 - 0.3).collect(),
        [4, 2],
        (0..6).map(|i| 0.2 - 0.05 * i as f32).collect(),
        [2, 3],
        2.0,
    );
    ad.dropout = 0.5;
    let x = t2((0..12).map(|i| 0.25 * i as f32 - 1.0).collect(), [3, 4], &d);
    let vec = |t: Tensor<2>| t.try_into_vec_as::<f32>().unwrap();
    let plain = {
        let mut off = ad.clone();
        off.dropout = 0.0;
        off
    };
    assert_eq!(
        vec(ad.delta(x.clone(), false)),
        vec(plain.delta(x.clone(), false))
    );
    let (masked, mask) = {
        let _s = sobre_model::lora::dropout_scope(9);
        let out = vec(ad.delta(x.clone(), false));
        drop(_s);
        let _s = sobre_model::lora::dropout_scope(9);
        let m = sobre_model::lora::dropout_mask([3, 4], 0.5).unwrap();
        (out, Tensor::<2>::from_data(m, &d))
    };
    let want = vec(plain.delta(x.clone() * mask.clone(), false));
    for (a, b) in masked.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{masked:?} vs {want:?}");
    }
    let m = vec(mask);
    assert!(m.iter().all(|&v| v == 0.0 || v == 2.0), "{m:?}");
    assert!(
        masked != vec(plain.delta(x, false)),
        "the mask dropped nothing"
    );
    // About p of a large mask is zero.
    let _s = sobre_model::lora::dropout_scope(3);
    let big = sobre_model::lora::dropout_mask([100, 100], 0.5)
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap();
    let zeros = big.iter().filter(|&&v| v == 0.0).count();
    assert!((4_700..=5_300).contains(&zeros), "{zeros}");
}

/// A copy of `m` whose base matrices hold their bf16-rounded values, still in f32.
fn rounded_base(m: &MoeModel) -> MoeModel {
    lora::cast_base(lora::store_base_bf16(m.clone()), burn::tensor::DType::F32)
}

/// `lora.base_dtype = "bf16"`: the base matrices are stored in bf16 and used in f32. The fused
/// kernels (logits and adapter gradients), the reference compositions and the host engine all
/// compute exactly what the f32 model with bf16-rounded weights computes (1e-5 relative: the
/// same values, the same f32 arithmetic), only adapters get gradients, and against the f32
/// base the logits move by no more than bf16's rounding allows (≤ 2e-2 relative here).
#[test]
fn a_bf16_base_computes_what_its_rounded_f32_base_computes() {
    let device = default_device().autodiff();
    for name in ["qwen2_tiny", "qwen2_moe_tiny", "deepseek_v3_tiny"] {
        let base = load_model(&fixture(name), &device).unwrap();
        let targets = lora::available_modules(&base);
        let m = lora::add_adapters(base, &cfg(3, 6.0, &targets, LoraInit::Random), 9).unwrap();
        let narrow = lora::store_base_bf16(m.clone());
        let mut dtypes = Vec::new();
        struct Dtypes<'a>(&'a mut Vec<(usize, burn::tensor::DType)>);
        impl ModuleVisitor for Dtypes<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push((D, param.val().dtype()));
            }
        }
        narrow.visit(&mut Dtypes(&mut dtypes));
        let n_bf16 = dtypes
            .iter()
            .filter(|(_, t)| *t == burn::tensor::DType::BF16)
            .count();
        assert!(n_bf16 > 0, "{name}: nothing stored in bf16");
        assert!(
            dtypes
                .iter()
                .all(|(d, t)| *d >= 2 || *t == burn::tensor::DType::F32),
            "{name}: a norm or bias left f32"
        );
        let rounded = rounded_base(&m);
        let b = batch(m.config.vocab_size);
        let (yn, gn) = adapter_grads(&narrow, &b, Kernels::Fused);
        let (yr, gr) = adapter_grads(&rounded, &b, Kernels::Fused);
        assert!(rel_diff(&yn, &yr) <= 1e-5, "{name}: {}", rel_diff(&yn, &yr));
        assert_eq!(
            gn.len(),
            lora::adapter_tensors(&m).len(),
            "{name}: only adapters"
        );
        for (i, (a, r)) in gn.iter().zip(&gr).enumerate() {
            let d = rel_diff(a, r);
            assert!(d <= 1e-5, "{name}: gradient {i} differs by {d:e}");
        }
        let (yt, _) = adapter_grads(&narrow, &b, Kernels::Reference);
        assert!(
            rel_diff(&yt, &yr) <= 1e-5,
            "{name}: reference {}",
            rel_diff(&yt, &yr)
        );
        let (yf, _) = adapter_grads(&m, &b, Kernels::Fused);
        let moved = rel_diff(&yn, &yf);
        assert!(
            moved > 0.0 && moved <= 2e-2,
            "{name}: bf16 moved logits by {moved:e}"
        );
        let host_model = narrow.valid();
        let positions: Vec<usize> = (0..b.batch * b.seq).collect();
        let host = InferenceModel::new(&host_model).forward_positions(&b, &positions);
        assert!(
            rel_diff(&host, &yr) <= 1e-5,
            "{name}: host {}",
            rel_diff(&host, &yr)
        );
    }
}
