//! `[lora]`: SFT and GRPO train adapters only (optimizer state for them alone), checkpoints
//! in PEFT's layout, exact resume, the reference is the base (adapters off), rollouts run the
//! adapted model (their log-probs equal training's recomputed ones), a PEFT adapter directory
//! continues, and the config's errors.

mod common;

use std::path::{Path, PathBuf};

use burn::module::Module;
use serde_json::Value;
use sobre_model::lora::{self, LoraConfig, LoraInit};
use sobre_model::{ForwardOptions, MoeModel, default_device, load_model};
use sobre_rollout::{Prompt, SamplingParams, ScoredBatch, completion_logprobs, generate};
use sobre_train::Config;
use sobre_train::pipeline::Summary;

use common::smoke;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sobre-model/tests/fixtures")
        .join(name)
}

const LORA: &[&str] = &[
    "lora.r=4",
    "lora.alpha=8",
    "lora.target_modules=[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]",
];

fn run(dir: &Path, sets: &[&str], resume: bool, stop_after: Option<usize>) -> Summary {
    common::run(
        &smoke(),
        "configs/smoke.toml",
        sets,
        dir,
        resume,
        stop_after,
    )
}

fn with_lora<'a>(sets: &[&'a str]) -> Vec<&'a str> {
    LORA.iter().copied().chain(sets.iter().copied()).collect()
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensor_names(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

/// SFT then GRPO with `[lora]` on the smoke config: checkpoints hold PEFT's adapter files and
/// no model weights, the optimizer keeps moments for the adapters only (A and B of q, k, v, o
/// in both layers: 16 tensors, 32 moments), the base (`RUN/base`) stays the initial model,
/// the adapters moved, the KL to the reference (the base: adapters off) is positive once they
/// have, and rollouts of the adapted model match training's log-probs (`logprob_mismatch` <
/// 1e-4 per token, every step).
#[test]
fn sft_and_grpo_train_only_the_adapters() {
    let d = tempfile::tempdir().unwrap();
    let s = run(
        d.path(),
        &with_lora(&["run.steps=3", "eval.at_end=true", "eval.n=4"]),
        false,
        None,
    );
    assert_eq!((s.sft_steps, s.grpo_steps), (2, 3));
    let last = s.last_checkpoint.clone().unwrap();
    for dir in [last.clone(), d.path().join("checkpoints/sft")] {
        assert!(
            dir.join("adapter_config.json").is_file(),
            "{}",
            dir.display()
        );
        assert!(dir.join("adapter_model.safetensors").is_file());
        assert!(!dir.join("model.safetensors").exists());
        assert!(!dir.join("config.json").exists());
        assert!(dir.join("tokenizer.json").is_file());
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("adapter_config.json")).unwrap())
            .unwrap();
    let base = d.path().join("base");
    assert_eq!(
        cfg["base_model_name_or_path"].as_str().unwrap(),
        std::fs::canonicalize(&base).unwrap().display().to_string()
    );
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    let adapters = tensor_names(&last.join("adapter_model.safetensors"));
    assert_eq!(adapters.len(), 16);
    assert!(
        adapters.contains(&"base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight".into())
    );
    let moments = tensor_names(&last.join("optimizer.safetensors"));
    assert_eq!(moments.len(), 32, "{moments:?}");
    assert!(moments.iter().all(|m| m.contains("lora")), "{moments:?}");
    // The base is the preset's init, untouched; the adapted model is not the base.
    let device = default_device();
    let base_model = load_model(&base, &device).unwrap();
    let adapted = load_model(&last, &device).unwrap();
    assert!(adapted.has_adapters());
    assert_eq!(
        sobre_model::io::hf_tensors(&adapted.clone().with_adapters_enabled(false)),
        sobre_model::io::hf_tensors(&base_model)
    );
    let b: f32 = lora::adapter_tensors(&adapted)
        .iter()
        .filter(|(n, _, _)| n.contains("lora_B"))
        .flat_map(|(_, _, v)| v.iter().map(|x| x.abs()))
        .fold(0.0, f32::max);
    assert!(b > 1e-4, "B did not move: {b}");
    let rows = metrics(d.path());
    let grpo: Vec<&Value> = rows.iter().filter(|r| r["stage"] == "grpo").collect();
    assert_eq!(grpo.len(), 3);
    for r in &grpo {
        assert!(r["kl"].as_f64().unwrap() > 0.0, "{r}");
        let mm = r["logprob_mismatch"].as_f64().unwrap();
        assert!(mm < 1e-4, "rollout vs training log-probs: {mm}");
        assert_eq!(r["skipped"], false);
    }
    for r in rows.iter().filter(|r| r["stage"] == "sft") {
        assert!(r["grad_norm"].as_f64().unwrap() > 0.0, "{r}");
    }
    // `eval.at_end` evaluated the SFT and final checkpoints (adapter directories, loaded on
    // their base through base_model_name_or_path).
    let fe: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("final_eval.json")).unwrap())
            .unwrap();
    let rows = fe["rows"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["sft", "final"], "{fe}");
    for r in rows {
        assert!(
            r["report"]["pass@1"].is_number() && r["note"].is_null(),
            "{r}"
        );
    }
}

/// Without SFT the adapters start at B = 0, so the first GRPO step's policy is the base and its
/// KL to the reference (the same model with adapters off) is 0 to float noise; after one
/// update it is not.
#[test]
fn the_reference_is_the_base_with_adapters_off() {
    let d = tempfile::tempdir().unwrap();
    run(
        d.path(),
        &with_lora(&["run.steps=2", "sft.steps=0"]),
        false,
        None,
    );
    let rows = metrics(d.path());
    let kl: Vec<f64> = rows.iter().map(|r| r["kl"].as_f64().unwrap()).collect();
    assert_eq!(kl.len(), 2);
    assert!(kl[0].abs() < 1e-9, "step 1 KL {}", kl[0]);
    assert!(kl[1] > 1e-9, "step 2 KL {}", kl[1]);
}

/// 6 straight GRPO steps equal 3 + resume + 3 bit for bit with `[lora]` (adapters and optimizer
/// state), with KL, two mini-batches, μ = 2, two data-parallel replicas and the balance loss.
#[test]
fn lora_resume_is_exact() {
    let sets = with_lora(&[
        "run.steps=6",
        "run.save_every=3",
        "grpo.mini_batch_size=8",
        "grpo.num_iterations=2",
        "run.data_parallel_size=2",
        "grpo.aux_loss_coef=0.01",
    ]);
    let a = tempfile::tempdir().unwrap();
    assert_eq!(run(a.path(), &sets, false, None).grpo_steps, 6);
    let b = tempfile::tempdir().unwrap();
    let first = run(b.path(), &sets, false, Some(3));
    assert!(first.interrupted && first.grpo_steps == 3);
    assert_eq!(run(b.path(), &sets, true, None).grpo_steps, 6);
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let fa = std::fs::read(a.path().join("checkpoints/step-000006").join(f)).unwrap();
        let fb = std::fs::read(b.path().join("checkpoints/step-000006").join(f)).unwrap();
        assert!(fa == fb, "{f} differs after resume");
    }
    let sft = std::fs::read(a.path().join("checkpoints/sft/adapter_model.safetensors")).unwrap();
    let end = std::fs::read(
        a.path()
            .join("checkpoints/step-000006/adapter_model.safetensors"),
    )
    .unwrap();
    assert!(sft != end, "GRPO did not move the adapters");
}

/// `lora.dropout > 0`: SFT and GRPO with dropped adapter inputs resume bit for bit (the masks
/// are seeded by the run seed and the update), move the adapters differently from dropout 0,
/// and are written to adapter_config.json as PEFT's `lora_dropout`.
#[test]
fn lora_dropout_is_deterministic_and_resumes_exactly() {
    let sets = with_lora(&[
        "lora.dropout=0.3",
        "run.steps=4",
        "run.save_every=2",
        "run.data_parallel_size=2",
    ]);
    let a = tempfile::tempdir().unwrap();
    run(a.path(), &sets, false, None);
    let b = tempfile::tempdir().unwrap();
    assert!(run(b.path(), &sets, false, Some(2)).interrupted);
    run(b.path(), &sets, true, None);
    let file = |d: &Path, ck: &str| {
        std::fs::read(
            d.join("checkpoints")
                .join(ck)
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert!(file(a.path(), "step-000004") == file(b.path(), "step-000004"));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(a.path().join("checkpoints/step-000004/adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["lora_dropout"].as_f64(), Some(0.3));
    let plain = tempfile::tempdir().unwrap();
    run(
        plain.path(),
        &with_lora(&[
            "run.steps=4",
            "run.save_every=2",
            "run.data_parallel_size=2",
        ]),
        false,
        None,
    );
    assert!(
        file(a.path(), "sft") != file(plain.path(), "sft"),
        "dropout changed nothing in SFT"
    );
    assert!(file(a.path(), "step-000004") != file(plain.path(), "step-000004"));
}

fn random_adapters(model: MoeModel, targets: &[&str]) -> MoeModel {
    let c = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
        init: LoraInit::Random,
    };
    lora::add_adapters(model, &c, 21).unwrap()
}

/// The rollout engine (host engine, adapters merged into its weights) records the log-probs
/// that training's forward (adapters unmerged, autodiff) recomputes, within 1e-4 per token, on
/// a dense model with adapters on all seven projections and on the MoE tiny preset.
#[test]
fn rollout_logprobs_equal_the_training_forward_with_lora() {
    let device = default_device().autodiff();
    let dense = random_adapters(
        load_model(&fixture("qwen2_tiny"), &device).unwrap(),
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    let mut c = sobre_model::ModelConfig::preset("tiny").unwrap();
    c.initializer_range = 0.25;
    let moe = random_adapters(
        sobre_model::init_model(&c, 2, &device),
        &["q_proj", "k_proj", "v_proj", "o_proj"],
    );
    // Also with the base stored in bf16 (`lora.base_dtype`): rollouts and training read the
    // same bf16 values.
    let narrow = [
        lora::store_base_bf16(dense.clone()),
        lora::store_base_bf16(moe.clone()),
    ];
    for m in [dense, moe].into_iter().chain(narrow) {
        let prompts = vec![
            Prompt {
                ids: vec![3, 4, 5, 6, 7],
                key: 0,
            },
            Prompt {
                ids: vec![10, 11],
                key: 1,
            },
        ];
        for t in [1.0f32, 0.7] {
            let params = SamplingParams {
                temperature: t,
                max_new_tokens: 9,
                seed: 3,
                ..Default::default()
            };
            let out = generate(&m.valid(), &prompts, 2, &params, None).unwrap();
            let pairs: Vec<(&[u32], &[u32])> = out
                .iter()
                .map(|c| (prompts[c.prompt_index].ids.as_slice(), c.tokens.as_slice()))
                .collect();
            let scored = ScoredBatch::new(&pairs, 0);
            let (lp, _) = completion_logprobs(&m, &scored, t, ForwardOptions::default());
            let lp: Vec<f32> = lp.try_into_vec_as::<f32>().unwrap();
            let width = scored.max_completion;
            let mut worst = 0.0f32;
            for (r, c) in out.iter().enumerate() {
                for (i, &x) in c.logprobs.iter().enumerate() {
                    worst = worst.max((x - lp[r * width + i]).abs());
                }
            }
            assert!(worst < 1e-4, "t={t}: rollout vs training {worst}");
            // And the adapters matter: the base model's log-probs of the same tokens differ.
            let base = m.clone().with_adapters_enabled(false);
            let (lb, _) = completion_logprobs(&base, &scored, t, ForwardOptions::default());
            let lb: Vec<f32> = lb.try_into_vec_as::<f32>().unwrap();
            let moved = lp
                .iter()
                .zip(&lb)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(moved > 1e-3, "t={t}: the adapters change nothing ({moved})");
        }
    }
}

/// `lora.base_dtype = "bf16"` through a run: SFT and GRPO train the adapters (B moves, no
/// skipped step), rollouts match training's log-probs (`logprob_mismatch` < 1e-4), the KL to
/// the base is positive once the adapters moved, and the run resumes bit for bit.
#[test]
fn a_bf16_base_trains_the_adapters_and_resumes_exactly() {
    let sets = with_lora(&[
        "run.steps=3",
        "lora.base_dtype=\"bf16\"",
        "run.save_every=1",
    ]);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = run(a.path(), &sets, false, None);
    let rows = metrics(a.path());
    let grpo: Vec<&Value> = rows.iter().filter(|r| r["stage"] == "grpo").collect();
    assert_eq!(grpo.len(), 3);
    for r in &grpo {
        let mm = r["logprob_mismatch"].as_f64().unwrap();
        assert!(mm < 1e-4, "rollout vs training log-probs: {mm}");
        assert!(r["kl"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["skipped"], false);
    }
    let last = whole.last_checkpoint.unwrap();
    let adapted = load_model(&last, &default_device()).unwrap();
    let moved: f32 = lora::adapter_tensors(&adapted)
        .iter()
        .filter(|(n, _, _)| n.contains("lora_B"))
        .flat_map(|(_, _, v)| v.iter().map(|x| x.abs()))
        .fold(0.0, f32::max);
    assert!(moved > 1e-4, "B did not move: {moved}");
    run(b.path(), &sets, false, Some(1));
    let resumed = run(b.path(), &sets, true, None);
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&last), bytes(&resumed.last_checkpoint.unwrap()));
}

/// `[lora] adapter = DIR`: a run continues the adapters of a PEFT directory (here a previous
/// run's checkpoint, on that run's base): its first GRPO step already has a positive KL (the
/// loaded adapters are not zero) and its adapters end elsewhere.
#[test]
fn a_peft_adapter_directory_continues() {
    let a = tempfile::tempdir().unwrap();
    let first = run(a.path(), &with_lora(&["run.steps=2"]), false, None);
    let ckpt = first.last_checkpoint.unwrap();
    let b = tempfile::tempdir().unwrap();
    let base = format!("model.path=\"{}\"", a.path().join("base").display());
    let tok = format!("tokenizer.path=\"{}\"", a.path().join("base").display());
    let adapter = format!("lora.adapter=\"{}\"", ckpt.display());
    let second = run(
        b.path(),
        &[
            base.as_str(),
            tok.as_str(),
            adapter.as_str(),
            "sft.steps=0",
            "run.steps=1",
        ],
        false,
        None,
    );
    let rows = metrics(b.path());
    assert!(rows[0]["kl"].as_f64().unwrap() > 1e-9, "{}", rows[0]);
    let cont = second.last_checkpoint.unwrap();
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(cont.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(c["r"], 4);
    let w0 = std::fs::read(ckpt.join("adapter_model.safetensors")).unwrap();
    let w1 = std::fs::read(cont.join("adapter_model.safetensors")).unwrap();
    assert!(w0 != w1);
    // A key set in [lora] that disagrees with the adapter's config is an error naming it.
    let sets: Vec<String> = [adapter.as_str(), "lora.r=8"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let err = Config::parse(&smoke(), "configs/smoke.toml", &sets).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("lora.r"), "{err}");
    assert!(
        err.to_string()
            .contains("is 8 but the adapter's adapter_config.json has 4"),
        "{err}"
    );
}

/// Config errors name the key and the value: r = 0, alpha ≤ 0, dropout outside [0, 1), an
/// unknown module, a routed-expert module, a module the model lacks (the tiny preset's layers
/// are all sparse: no gate_proj), an unknown init, a missing adapter directory.
#[test]
fn lora_config_errors_name_key_and_value() {
    for (set, key, text) in [
        ("lora.r=0", "lora.r", "found 0"),
        ("lora.alpha=-1", "lora.alpha", "found -1"),
        (
            "lora.dropout=1.0",
            "lora.dropout",
            "must be in [0, 1), found 1",
        ),
        (
            "lora.target_modules=[\"qproj\"]",
            "lora.target_modules",
            "unknown module `qproj`",
        ),
        (
            "lora.target_modules=[\"w1\"]",
            "lora.target_modules",
            "routed-expert",
        ),
        (
            "lora.target_modules=[\"q_proj\", \"gate_proj\"]",
            "lora.target_modules",
            "this qwen3_moe model has no `gate_proj` (it has no dense MLP",
        ),
        ("lora.target_modules=[]", "lora.target_modules", "is empty"),
        (
            "lora.init=\"kaiming\"",
            "lora.init",
            "unknown value `kaiming`",
        ),
        (
            "lora.base_dtype=\"fp16\"",
            "lora.base_dtype",
            "unknown value `fp16`",
        ),
        (
            "lora.adapter=\"/nonexistent/adapter\"",
            "lora.adapter",
            "not a LoRA adapter directory",
        ),
    ] {
        let err = Config::parse(&smoke(), "configs/smoke.toml", &[set.to_string()]).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{set}: {err}");
        assert!(err.to_string().contains(text), "{set}: {err}");
        assert!(
            err.to_string().contains(&format!("--set {set}")),
            "{set}: {err}"
        );
    }
    // A [lora] table in the file: the error points at its line.
    let text = format!("{}\n[lora]\nr = 0\n", smoke());
    let err = Config::parse(&text, "t.toml", &[]).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("lora.r"));
    assert!(err.origin.starts_with("t.toml:"), "{err}");
    // Without [lora] the resolved config is unchanged (no lora table written).
    let (cfg, _) = Config::parse(&smoke(), "configs/smoke.toml", &[]).unwrap();
    assert!(!cfg.to_toml().contains("[lora]"));
}

/// configs/r1-tiny-lora.toml is r1-tiny's GRPO stage with adapters: the same data, template,
/// rollouts, rewards, GRPO and evaluation, from r1-tiny's SFT checkpoint, no SFT of its own.
/// (Compared as TOML: loading it needs that checkpoint.)
#[test]
fn the_lora_learning_check_is_r1_tiny_grpo_with_adapters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let read = |f: &str| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(root.join(f)).unwrap()).unwrap()
    };
    let (tiny, lora) = (read("r1-tiny.toml"), read("r1-tiny-lora.toml"));
    for section in ["data", "template", "rollout", "reward", "grpo"] {
        assert_eq!(tiny.get(section), lora.get(section), "[{section}]");
    }
    let table = |t: &toml::Table, s: &str| t[s].as_table().unwrap().clone();
    let without = |mut t: toml::Table, keys: &[&str]| {
        for k in keys {
            t.remove(*k);
        }
        t
    };
    assert_eq!(
        without(table(&tiny, "run"), &["out_dir"]),
        without(table(&lora, "run"), &["out_dir"])
    );
    assert_eq!(
        without(table(&tiny, "optim"), &["lr"]),
        without(table(&lora, "optim"), &["lr"])
    );
    assert_eq!(
        without(table(&tiny, "eval"), &["compare"]),
        without(table(&lora, "eval"), &["compare"])
    );
    assert_eq!(lora["sft"]["steps"].as_integer(), Some(0));
    assert_eq!(
        lora["model"]["path"].as_str(),
        Some("runs/r1-tiny/checkpoints/sft")
    );
    assert_eq!(lora["lora"]["r"].as_integer(), Some(16));
}
