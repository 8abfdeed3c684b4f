//! LoRA adapters (Hu et al. 2021) in the layout PEFT reads and writes.
//!
//! An adapter is data on the projection it adapts ([`Proj::lora`], and the dense [`Mlp`]'s
//! `gate_lora` / `up_lora` / `down_lora`): the projection computes `x·W + b + scale·(x·A)·B`,
//! PEFT's `base_layer(x) + lora_B(lora_A(x)) * scaling`. Adding adapters freezes every base
//! parameter (no gradient, so no optimizer state): only `a` and `b` train. Adapters can be
//! switched off ([`MoeModel::with_adapters_enabled`], PEFT's `disable_adapter()`), which is how
//! GRPO gets its reference model without a second copy, and folded into the weights
//! ([`merge_adapters`], PEFT's `merge_and_unload`), which is what the host inference engine
//! and `sobre merge` do.
//!
//! On disk: `adapter_config.json` (PEFT's `LoraConfig` keys) and `adapter_model.safetensors`
//! with PEFT's names, `base_model.model.<HF module>.lora_A.weight` `[r, in]` and
//! `….lora_B.weight` `[out, r]`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.
//! lora_A.weight`. A directory PEFT's `save_pretrained` wrote loads here ([`load_adapter`]),
//! and one written here loads in `PeftModel.from_pretrained`.
//!
//! Target modules are PEFT's names: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
//! `up_proj`, `down_proj`, and on Multi-head Latent Attention (DeepSeek) `q_proj` (no
//! `q_lora_rank`) or `q_a_proj` / `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`. As
//! in PEFT, a name adapts every module of that name: `gate_proj` adapts the dense layers' MLPs
//! and the shared experts (`mlp.shared_expert.gate_proj`, `mlp.shared_experts.gate_proj`).
//! Routed experts (transformers 5 stacks them into parameters that PEFT's `target_modules`
//! does not reach either) are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::ModelError;
use crate::model::{Attention, Ffn, LoraAdapter, Mlp, MoeModel, Proj, to_vec_f32};

/// The file names of an adapter directory (PEFT's `CONFIG_NAME`, `SAFETENSORS_WEIGHTS_NAME`).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The PEFT prefix of every adapter tensor of a causal LM (`PeftModelForCausalLM` →
/// `LoraModel` → the transformers model).
const PREFIX: &str = "base_model.model.";

/// Every module name an adapter can target.
pub const TARGET_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
];

/// Names of routed-expert and router modules, refused with their own message.
const ROUTED: &[&str] = &[
    "w1",
    "w2",
    "w3",
    "experts",
    "gate",
    "router",
    "input_linear",
    "output_linear",
    "gate_up_proj",
    "shared_expert_gate",
];

/// How the adapter matrices start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default (`True`): A Kaiming-uniform with `a = √5` (as `nn.Linear`, i.e.
    /// U(−1/√in, 1/√in)), B zero, so the adapted model starts as the base.
    Default,
    /// PEFT's `"gaussian"`: A ~ N(0, (1/r)²), B zero.
    Gaussian,
    /// PEFT's `False`: A and B both as `nn.Linear` initialises them (B: U(−1/√r, 1/√r)); the
    /// adapter changes the model from the start (tests, debugging).
    Random,
}

impl LoraInit {
    pub const NAMES: &'static [&'static str] = &["default", "gaussian", "random"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "default" => Some(LoraInit::Default),
            "gaussian" => Some(LoraInit::Gaussian),
            "random" => Some(LoraInit::Random),
            _ => None,
        }
    }

    /// PEFT's `init_lora_weights` value.
    fn peft_value(self) -> Value {
        match self {
            LoraInit::Default => json!(true),
            LoraInit::Gaussian => json!("gaussian"),
            LoraInit::Random => json!(false),
        }
    }
}

/// What an adapter set is: rank, scaling, where it goes and how it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`: active only inside a training forward ([`dropout_scope`]).
    pub dropout: f64,
    /// PEFT module names ([`TARGET_MODULES`]).
    pub target_modules: Vec<String>,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    pub init: LoraInit,
}

impl LoraConfig {
    /// The factor on `(x·A)·B`: `alpha / r`, or `alpha / √r` with rsLoRA (PEFT's `scaling`).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks values that need no model; `origin` names where they came from. Each error names
    /// the key and the value.
    pub fn validate(&self, origin: &str) -> Result<(), ModelError> {
        let bad = |msg: String| {
            Err(ModelError::Config {
                origin: origin.to_string(),
                msg,
            })
        };
        if self.r == 0 {
            return bad("`r` = 0: the rank of a LoRA adapter must be at least 1".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(format!(
                "`lora_alpha` = {}: must be a finite number > 0",
                self.alpha
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad(format!(
                "`lora_dropout` = {}: must be in [0, 1)",
                self.dropout
            ));
        }
        if self.target_modules.is_empty() {
            return bad("`target_modules` is empty: name at least one module (e.g. q_proj)".into());
        }
        let mut seen = BTreeSet::new();
        for t in &self.target_modules {
            check_target_name(t).or_else(bad)?;
            if !seen.insert(t) {
                return bad(format!("`target_modules`: `{t}` is listed twice"));
            }
        }
        Ok(())
    }

    /// `adapter_config.json` as PEFT writes it (the keys PEFT's `LoraConfig` reads back; those
    /// sobre has no use for at their PEFT defaults).
    pub fn to_peft_json(&self, base_model_name_or_path: &str) -> Value {
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": self.init.peft_value(),
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_modules,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Reads PEFT's `adapter_config.json`: the LoRA settings and `base_model_name_or_path`.
    /// PEFT options that change the maths in ways sobre does not compute (DoRA, per-layer
    /// ranks, biases, `fan_in_fan_out`, …) are refused by name; options without effect on a
    /// loaded adapter are ignored.
    pub fn from_peft_json(v: &Value, origin: &str) -> Result<(Self, Option<String>), ModelError> {
        let bad = |msg: String| ModelError::Config {
            origin: origin.to_string(),
            msg,
        };
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "`peft_type` = {}: only LORA adapters are supported",
                    other.map_or("missing".into(), |s| format!("\"{s}\""))
                )));
            }
        }
        if let Some(t) = get("task_type").and_then(Value::as_str)
            && t != "CAUSAL_LM"
        {
            return Err(bad(format!(
                "`task_type` = \"{t}\": only CAUSAL_LM adapters are supported"
            )));
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`r` is missing or not a whole number".into()))?
            as usize;
        let alpha = match get("lora_alpha") {
            None => 8.0,
            Some(a) => a
                .as_f64()
                .ok_or_else(|| bad(format!("`lora_alpha` = {a}: not a number")))?,
        };
        let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let target_modules = match get("target_modules") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("`target_modules`: {t} is not a string")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::String(s)) => {
                return Err(bad(format!(
                    "`target_modules` = \"{s}\": a regular expression (or \"all-linear\"); sobre \
                     reads a list of module names"
                )));
            }
            _ => return Err(bad("`target_modules` is missing".into())),
        };
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if flag(k) {
                return Err(bad(format!("`{k}` = true is not supported")));
            }
        }
        if let Some(b) = get("bias").and_then(Value::as_str)
            && b != "none"
        {
            return Err(bad(format!(
                "`bias` = \"{b}\": only \"none\" is supported (no trained biases)"
            )));
        }
        for k in [
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "layers_to_transform",
            "layer_replication",
            "target_parameters",
            "trainable_token_indices",
            "exclude_modules",
        ] {
            let empty = match get(k) {
                None => true,
                Some(Value::Object(m)) => m.is_empty(),
                Some(Value::Array(a)) => a.is_empty(),
                Some(_) => false,
            };
            if !empty {
                return Err(bad(format!(
                    "`{k}` = {}: not supported (sobre adapts every layer alike)",
                    get(k).map(Value::to_string).unwrap_or_default()
                )));
            }
        }
        let init = match get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            // Other initialisations (pissa, olora, loftq, …) only matter when an adapter is
            // created; a saved one is read as its tensors.
            Some(_) => LoraInit::Default,
        };
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora: flag("use_rslora"),
            init,
        };
        cfg.validate(origin)?;
        let base = get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((cfg, base))
    }
}

/// Is `name` a module an adapter can target? Routed experts and routers get their own message.
pub fn check_target_name(name: &str) -> Result<(), String> {
    if TARGET_MODULES.contains(&name) {
        return Ok(());
    }
    if ROUTED.contains(&name) {
        return Err(format!(
            "`target_modules`: `{name}` is a router or routed-expert module; LoRA on MoE routed \
             experts (and routers) is not supported yet. Supported: {}",
            TARGET_MODULES.join(", ")
        ));
    }
    Err(format!(
        "`target_modules`: unknown module `{name}`; supported: {}",
        TARGET_MODULES.join(", ")
    ))
}

/// One projection of an attention block or dense MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Q,
    K,
    V,
    O,
    QA,
    Gate,
    Up,
    Down,
}

/// Where an adapter can go: a layer, and in it an attention projection or a part of its dense
/// MLP or shared expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    layer: usize,
    part: Part,
}

/// A projection that can carry an adapter.
#[derive(Debug, Clone)]
pub struct Site {
    /// The PEFT module name (`q_proj`, `kv_b_proj`, …).
    pub module: &'static str,
    /// The HF module path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
    loc: Loc,
}

impl Site {
    /// PEFT's tensor names of this site's A and B.
    pub fn keys(&self) -> [String; 2] {
        [
            format!("{PREFIX}{}.lora_A.weight", self.path),
            format!("{PREFIX}{}.lora_B.weight", self.path),
        ]
    }
}

/// Every projection of `model` an adapter can go on, in layer order: the attention
/// projections, and the dense MLP's or the shared expert's gate, up and down.
pub fn sites(model: &MoeModel) -> Vec<Site> {
    let (moe, shared) = crate::io::ffn_module_names(&model.config);
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        let a = &layer.self_attn;
        let attn = format!("model.layers.{i}.self_attn");
        let mut push = |module: &'static str, path: String, dims: [usize; 2], part: Part| {
            out.push(Site {
                module,
                path,
                in_features: dims[0],
                out_features: dims[1],
                loc: Loc { layer: i, part },
            })
        };
        let dims = |p: &Proj| p.weight.val().dims();
        let names: [(&'static str, Part, &Proj); 4] = match &a.latent {
            None => [
                ("q_proj", Part::Q, &a.q_proj),
                ("k_proj", Part::K, &a.k_proj),
                ("v_proj", Part::V, &a.v_proj),
                ("o_proj", Part::O, &a.o_proj),
            ],
            Some(lat) => [
                (
                    if lat.q_a_proj.is_some() {
                        "q_b_proj"
                    } else {
                        "q_proj"
                    },
                    Part::Q,
                    &a.q_proj,
                ),
                ("kv_a_proj_with_mqa", Part::K, &a.k_proj),
                ("kv_b_proj", Part::V, &a.v_proj),
                ("o_proj", Part::O, &a.o_proj),
            ],
        };
        if let Some(qa) = a.latent.as_ref().and_then(|l| l.q_a_proj.as_ref()) {
            push("q_a_proj", format!("{attn}.q_a_proj"), dims(qa), Part::QA);
        }
        for (n, part, p) in names {
            push(n, format!("{attn}.{n}"), dims(p), part);
        }
        let mlp = match &layer.mlp {
            Ffn::Dense(m) => Some((m, format!("model.layers.{i}.mlp"))),
            Ffn::Sparse(b) => b
                .shared_expert
                .as_ref()
                .map(|m| (m, format!("model.layers.{i}.{moe}.{shared}"))),
        };
        if let Some((m, prefix)) = mlp {
            let [hidden, two_i] = m.gate_up.val().dims();
            let inter = two_i / 2;
            for (n, part, d) in [
                ("gate_proj", Part::Gate, [hidden, inter]),
                ("up_proj", Part::Up, [hidden, inter]),
                ("down_proj", Part::Down, [inter, hidden]),
            ] {
                push(n, format!("{prefix}.{n}"), d, part);
            }
        }
    }
    out
}

/// The distinct module names of [`sites`], in the order they first appear.
pub fn available_modules(model: &MoeModel) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for s in sites(model) {
        if !out.contains(&s.module) {
            out.push(s.module);
        }
    }
    out
}

/// The module names a model of config `cfg` has for adapters (what [`available_modules`]
/// gives for the model itself), without building it: for checking a `[lora]` section before
/// any work.
pub fn available_modules_for_config(cfg: &crate::ModelConfig) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = match &cfg.mla {
        None => vec!["q_proj", "k_proj", "v_proj", "o_proj"],
        Some(m) if m.q_lora_rank.is_some() => {
            vec![
                "q_a_proj",
                "q_b_proj",
                "kv_a_proj_with_mqa",
                "kv_b_proj",
                "o_proj",
            ]
        }
        Some(_) => vec!["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    };
    let dense = (0..cfg.num_hidden_layers).any(|i| !cfg.is_sparse_layer(i));
    if dense || cfg.shared_expert_intermediate_size > 0 {
        out.extend(["gate_proj", "up_proj", "down_proj"]);
    }
    out
}

/// The sites `targets` name. Each target must name at least one: the error names the target
/// and lists what the model has.
pub fn target_sites(
    model: &MoeModel,
    targets: &[String],
    origin: &str,
) -> Result<Vec<Site>, ModelError> {
    let all = sites(model);
    for t in targets {
        check_target_name(t).map_err(|msg| ModelError::Config {
            origin: origin.to_string(),
            msg,
        })?;
        if !all.iter().any(|s| s.module == t) {
            let why = match t.as_str() {
                "gate_proj" | "up_proj" | "down_proj" => {
                    " (it has no dense MLP or shared expert; LoRA on routed experts is not \
                     supported yet)"
                }
                _ => "",
            };
            return Err(ModelError::Config {
                origin: origin.to_string(),
                msg: format!(
                    "`target_modules`: this {} model has no `{t}`{why}; its modules are: {}",
                    model.config.family.model_type(),
                    available_modules(model).join(", ")
                ),
            });
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| targets.iter().any(|t| t == s.module))
        .collect())
}

fn attn_proj(a: &mut Attention, part: Part) -> Option<&mut Proj> {
    match part {
        Part::Q => Some(&mut a.q_proj),
        Part::K => Some(&mut a.k_proj),
        Part::V => Some(&mut a.v_proj),
        Part::O => Some(&mut a.o_proj),
        Part::QA => a.latent.as_mut().and_then(|l| l.q_a_proj.as_mut()),
        _ => None,
    }
}

fn mlp_of(model: &mut MoeModel, layer: usize) -> Option<&mut Mlp> {
    match &mut model.layers[layer].mlp {
        Ffn::Dense(m) => Some(m),
        Ffn::Sparse(b) => b.shared_expert.as_mut(),
    }
}

/// The adapter slot at `loc`.
fn slot_mut(model: &mut MoeModel, loc: Loc) -> Option<&mut Option<LoraAdapter>> {
    match loc.part {
        Part::Gate => mlp_of(model, loc.layer).map(|m| &mut m.gate_lora),
        Part::Up => mlp_of(model, loc.layer).map(|m| &mut m.up_lora),
        Part::Down => mlp_of(model, loc.layer).map(|m| &mut m.down_lora),
        p => attn_proj(&mut model.layers[loc.layer].self_attn, p).map(|p| &mut p.lora),
    }
}

fn slot(model: &MoeModel, loc: Loc) -> Option<&LoraAdapter> {
    let layer = &model.layers[loc.layer];
    let mlp = match &layer.mlp {
        Ffn::Dense(m) => Some(m),
        Ffn::Sparse(b) => b.shared_expert.as_ref(),
    };
    let a = &layer.self_attn;
    match loc.part {
        Part::Gate => mlp.and_then(|m| m.gate_lora.as_ref()),
        Part::Up => mlp.and_then(|m| m.up_lora.as_ref()),
        Part::Down => mlp.and_then(|m| m.down_lora.as_ref()),
        Part::Q => a.q_proj.lora.as_ref(),
        Part::K => a.k_proj.lora.as_ref(),
        Part::V => a.v_proj.lora.as_ref(),
        Part::O => a.o_proj.lora.as_ref(),
        Part::QA => a
            .latent
            .as_ref()
            .and_then(|l| l.q_a_proj.as_ref())
            .and_then(|p| p.lora.as_ref()),
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// `n` values of U(−bound, bound) from the stream of (`seed`, `name`).
fn uniform(seed: u64, name: &str, n: usize, bound: f64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name));
    (0..n)
        .map(|_| {
            let u = ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect()
}

/// `n` values of N(0, std²) from the stream of (`seed`, `name`) (Box–Muller).
fn normal(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name));
    let mut unit = || ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (u1, u2) = (unit(), unit());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((std * r * a.cos()) as f32);
        if out.len() < n {
            out.push((std * r * a.sin()) as f32);
        }
    }
    out
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// An adapter from PEFT-layout values: `a_peft: [r, in]`, `b_peft: [out, r]`.
fn adapter_from_peft(
    a_peft: &[f32],
    b_peft: &[f32],
    site: &Site,
    (r, scale, dropout): (usize, f64, f64),
    device: &Device,
) -> LoraAdapter {
    let (inp, out) = (site.in_features, site.out_features);
    let a = transpose(a_peft, r, inp); // [in, r]
    let b = transpose(b_peft, out, r); // [r, out]
    LoraAdapter {
        a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [inp, r]), device)),
        b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [r, out]), device)),
        scale,
        enabled: true,
        dropout,
    }
}

thread_local! {
    /// The dropout stream of the training forward running on this thread, if any.
    static DROPOUT: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> =
        const { std::cell::RefCell::new(None) };
}

/// While the guard lives, LoRA adapters with `dropout > 0` drop their inputs, drawing their
/// masks from one stream seeded by `seed` (on this thread only: a data-parallel replica's
/// forward runs on its own thread). The adapters of a forward draw in the order the forward
/// calls them, which is fixed, so a seed gives the same masks every time: training with
/// dropout stays deterministic and resumes exactly when the caller derives `seed` from the run
/// seed and the step.
pub fn dropout_scope(seed: u64) -> DropoutScope {
    use rand_chacha::rand_core::SeedableRng;
    DROPOUT.with(|d| *d.borrow_mut() = Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed)));
    DropoutScope(())
}

/// Ends the dropout of [`dropout_scope`] when dropped.
pub struct DropoutScope(());

impl Drop for DropoutScope {
    fn drop(&mut self) {
        DROPOUT.with(|d| *d.borrow_mut() = None);
    }
}

/// Inside a [`dropout_scope`] and with `p > 0`: the next `[rows, cols]` inverted-dropout mask
/// of this thread's stream (each entry `1 / (1 − p)` with probability `1 − p`, else 0).
pub fn dropout_mask([rows, cols]: [usize; 2], p: f64) -> Option<TensorData> {
    use rand_chacha::rand_core::Rng;
    if p <= 0.0 {
        return None;
    }
    DROPOUT.with(|d| {
        let mut d = d.borrow_mut();
        let rng = d.as_mut()?;
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                if u < p { 0.0 } else { keep }
            })
            .collect();
        Some(TensorData::new(mask, [rows, cols]))
    })
}

/// `model` with freshly initialised adapters on the projections `cfg.target_modules` names
/// (values seeded by `seed` and each tensor's PEFT name, so the same on every machine), its
/// base parameters frozen. Errors name the target module that does not fit the model.
pub fn add_adapters(
    mut model: MoeModel,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<MoeModel, ModelError> {
    let origin = "[lora]";
    cfg.validate(origin)?;
    let targets = target_sites(&model, &cfg.target_modules, origin)?;
    let device = model.device();
    let (r, scale) = (cfg.r, cfg.scale());
    for site in &targets {
        let [ka, kb] = site.keys();
        let (inp, out) = (site.in_features, site.out_features);
        let a = match cfg.init {
            LoraInit::Default | LoraInit::Random => {
                uniform(seed, &ka, r * inp, 1.0 / (inp as f64).sqrt())
            }
            LoraInit::Gaussian => normal(seed, &ka, r * inp, 1.0 / r as f64),
        };
        let b = match cfg.init {
            LoraInit::Random => uniform(seed, &kb, out * r, 1.0 / (r as f64).sqrt()),
            _ => vec![0.0; out * r],
        };
        let adapter = adapter_from_peft(&a, &b, site, (r, scale, cfg.dropout), &device);
        if let Some(s) = slot_mut(&mut model, site.loc) {
            *s = Some(adapter);
        }
    }
    Ok(freeze_base(model))
}

/// What [`OnBase`] does to each base parameter.
#[derive(Clone, Copy)]
enum BaseAction {
    Freeze,
    /// Store the matrices (two or more dimensions) in this dtype.
    Cast(burn::tensor::DType),
}

/// Applies a [`BaseAction`] to every parameter outside the adapters (under a `…lora` field).
struct OnBase(Vec<String>, BaseAction);

impl ModuleMapper for OnBase {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.0.iter().any(|s| s.ends_with("lora")) {
            return param;
        }
        match self.1 {
            BaseAction::Freeze => param.set_require_grad(false),
            BaseAction::Cast(_) if D < 2 => param,
            BaseAction::Cast(dtype) => param.map(|t| t.cast(dtype)),
        }
    }
}

/// Every base parameter frozen (no gradient, so no optimizer state); adapter parameters
/// (under a `…lora` field) untouched.
pub fn freeze_base(model: MoeModel) -> MoeModel {
    model.map(&mut OnBase(vec![], BaseAction::Freeze))
}

/// The frozen base's matrices (every parameter of two or more dimensions outside the adapters:
/// projections, experts, embeddings, the LM head) stored in `dtype`; norm weights, biases and
/// the adapters untouched. [`store_base_bf16`] is the use; a test widens such a base back to
/// `f32` to compare against.
pub fn cast_base(model: MoeModel, dtype: burn::tensor::DType) -> MoeModel {
    model.map(&mut OnBase(vec![], BaseAction::Cast(dtype)))
}

/// The frozen base's matrices stored in `bf16` ([`cast_base`]), half their memory
/// (`lora.base_dtype = "bf16"`, as QLoRA-style recipes keep the base in 16 bits). Norm weights
/// and biases stay `f32`, and computation stays `f32`: the fused kernels widen a weight while
/// they use it, the host engine keeps it in `bf16` panels. Call after the adapters are on and
/// the base frozen: a base weight in `bf16` never receives a gradient.
pub fn store_base_bf16(model: MoeModel) -> MoeModel {
    cast_base(model, burn::tensor::DType::BF16)
}

/// The adapters of `model` in PEFT's layout: `(name, shape, row-major values)`, A `[r, in]`
/// then B `[out, r]` for each adapted projection, in layer order.
pub fn adapter_tensors(model: &MoeModel) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for site in sites(model) {
        let Some(l) = slot(model, site.loc) else {
            continue;
        };
        let [ka, kb] = site.keys();
        let r = l.rank();
        let (inp, o) = (site.in_features, site.out_features);
        out.push((ka, vec![r, inp], transpose(&to_vec_f32(l.a.val()), inp, r)));
        out.push((kb, vec![o, r], transpose(&to_vec_f32(l.b.val()), r, o)));
    }
    out
}

impl MoeModel {
    /// Does any projection carry an adapter?
    pub fn has_adapters(&self) -> bool {
        sites(self).iter().any(|s| slot(self, s.loc).is_some())
    }

    /// The model with every adapter switched on or off (off: the base model's outputs,
    /// sharing its tensors: no copy).
    pub fn with_adapters_enabled(mut self, enabled: bool) -> Self {
        for s in sites(&self) {
            if let Some(Some(l)) = slot_mut(&mut self, s.loc) {
                l.enabled = enabled;
            }
        }
        self
    }
}

/// Every enabled adapter folded into its weight (`W ← W + scale·A·B`, PEFT's
/// `merge_and_unload`) and removed; disabled adapters are removed unmerged. The result is a
/// plain model, detached from any graph.
pub fn merge_adapters(mut model: MoeModel) -> MoeModel {
    let detached = |t: Tensor<2>| Param::from_tensor(t.detach());
    for layer in &mut model.layers {
        let a = &mut layer.self_attn;
        let mut projs = vec![&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
        if let Some(qa) = a.latent.as_mut().and_then(|l| l.q_a_proj.as_mut()) {
            projs.push(qa);
        }
        for p in projs {
            if p.lora.is_some() {
                p.weight = detached(p.merged_weight());
                p.lora = None;
            }
        }
        let mlp = match &mut layer.mlp {
            Ffn::Dense(m) => Some(m),
            Ffn::Sparse(b) => b.shared_expert.as_mut(),
        };
        if let Some(m) = mlp
            && (m.gate_lora.is_some() || m.up_lora.is_some() || m.down_lora.is_some())
        {
            m.gate_up = detached(m.merged_gate_up());
            m.down = detached(m.merged_down());
            m.gate_lora = None;
            m.up_lora = None;
            m.down_lora = None;
        }
    }
    model
}

/// Write `adapter_config.json` and `adapter_model.safetensors` for `model`'s adapters into
/// `dir` (created if needed). `base` is written as `base_model_name_or_path`.
pub fn save_adapter(
    model: &MoeModel,
    cfg: &LoraConfig,
    base: &str,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&cfg.to_peft_json(base)).unwrap_or_default();
    std::fs::write(&cfg_path, text + "\n").map_err(|e| ModelError::io(&cfg_path, e))?;
    let tensors = adapter_tensors(model);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let path = dir.join(ADAPTER_WEIGHTS);
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Weights {
            file: path.clone(),
            msg: e.to_string(),
        })?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| ModelError::Weights {
        file: path.clone(),
        msg: e.to_string(),
    })
}

/// Is `dir` an adapter directory (it has `adapter_config.json`)?
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// The LoRA settings and `base_model_name_or_path` of an adapter directory.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>), ModelError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let origin = path.display().to_string();
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        origin: origin.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    LoraConfig::from_peft_json(&v, &origin)
}

/// `model` with the adapters of the adapter directory `dir` attached (its base parameters
/// frozen), and their settings. Every problem is reported together: a target module the model
/// lacks, missing tensors, tensors whose shapes do not fit the base model's projections
/// (naming the tensor, its shape and the one expected), unexpected tensors.
pub fn load_adapter(mut model: MoeModel, dir: &Path) -> Result<(MoeModel, LoraConfig), ModelError> {
    let (cfg, _) = read_adapter_config(dir)?;
    let origin = dir.join(ADAPTER_CONFIG).display().to_string();
    let targets = target_sites(&model, &cfg.target_modules, &origin)?;
    let file = dir.join(ADAPTER_WEIGHTS);
    if !file.is_file() {
        return Err(ModelError::Weights {
            file,
            msg: "missing: an adapter directory holds adapter_model.safetensors".into(),
        });
    }
    let mut src = crate::io::FileSource::open(std::slice::from_ref(&file), None)?;
    let (r, scale, device) = (cfg.r, cfg.scale(), model.device());
    let mut adapters = Vec::with_capacity(targets.len());
    for site in &targets {
        let [ka, kb] = site.keys();
        let (inp, out) = (site.in_features, site.out_features);
        let a = src.tensor(&ka, &[r, inp]);
        let b = src.tensor(&kb, &[out, r]);
        adapters.push((
            site.loc,
            adapter_from_peft(&a, &b, site, (r, scale, cfg.dropout), &device),
        ));
    }
    let mut problems = src.take_problems();
    for name in src.untaken() {
        problems.push(format!(
            "unexpected tensor `{name}` in {ADAPTER_WEIGHTS} (not an adapter of the \
             target_modules {:?} on this model)",
            cfg.target_modules
        ));
    }
    if !problems.is_empty() {
        return Err(ModelError::Mismatch {
            dir: dir.to_path_buf(),
            problems,
        });
    }
    for (loc, adapter) in adapters {
        if let Some(s) = slot_mut(&mut model, loc) {
            *s = Some(adapter);
        }
    }
    Ok((freeze_base(model), cfg))
}

/// Where the base model of an adapter directory is: `base_model_name_or_path` as written
/// (absolute, or relative to the working directory, as PEFT reads it), else relative to the
/// adapter directory; for a sobre run's checkpoint (`RUN/checkpoints/NAME`) whose run was
/// moved, `RUN/base`.
pub fn resolve_base(dir: &Path, base: Option<&str>) -> Option<PathBuf> {
    let is_model = |p: &Path| p.join("config.json").is_file();
    if let Some(b) = base.filter(|b| !b.is_empty()) {
        let p = PathBuf::from(b);
        if is_model(&p) {
            return Some(p);
        }
        let rel = dir.join(&p);
        if is_model(&rel) {
            return Some(rel);
        }
    }
    let run_base = dir.parent()?.parent()?.join("base");
    is_model(&run_base).then_some(run_base)
}

/// Load an adapter directory with its base model (found by [`resolve_base`]).
pub fn load_adapted(dir: &Path, device: &Device) -> Result<MoeModel, ModelError> {
    let (_, base) = read_adapter_config(dir)?;
    let Some(base_dir) = resolve_base(dir, base.as_deref()) else {
        return Err(ModelError::Config {
            origin: dir.join(ADAPTER_CONFIG).display().to_string(),
            msg: format!(
                "`base_model_name_or_path` = {}: no model directory (with config.json) there",
                base.map_or("missing".into(), |b| format!("\"{b}\""))
            ),
        });
    };
    let model = crate::io::load_model(&base_dir, device)?;
    load_adapter(model, dir).map(|(m, _)| m)
}

/// The adapters' values by PEFT name (for comparing two models' adapters).
pub fn adapter_map(model: &MoeModel) -> BTreeMap<String, Vec<f32>> {
    adapter_tensors(model)
        .into_iter()
        .map(|(n, _, v)| (n, v))
        .collect()
}
