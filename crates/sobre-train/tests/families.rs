//! SFT then GRPO from a Hugging Face checkpoint of every family sobre reads beyond the MoE
//! presets (`qwen2`, `qwen3`, `llama`, `mistral`, `granitemoe`, `deepseek_v2` / `deepseek_v3`
//! with MLA, and YaRN RoPE), on the tiny
//! transformers fixtures of sobre-model: the run trains (finite losses, weights move), and its
//! checkpoint is the same family again, loading back with the config it started from.
//!
//! The fixtures have a 128-token vocabulary and no tokenizer, so the test writes a
//! character-level one (printable ASCII and newline, `<|endoftext|>` as eos and pad).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sobre_model::{ModelConfig, default_device, load_model};
use sobre_train::Config;
use sobre_train::pipeline::{Pipeline, RunOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sobre-model/tests/fixtures")
        .join(name)
}

/// A character-level tokenizer directory: 97 tokens.
fn char_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    let chars = std::iter::once('\n').chain((32u8..127).map(char::from));
    for (i, c) in chars.enumerate() {
        vocab.insert(c.to_string(), json!(i + 1));
    }
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn config(model: &Path, tokenizer: &Path) -> String {
    format!(
        r#"
[model]
path = "{}"

[tokenizer]
path = "{}"

[data]
task = "countdown"
train_size = 40
eval_size = 4

[data.countdown]
min_count = 3
max_count = 3
max_number = 20
max_target = 20

[template]
name = "r1_zero"

[sft]
steps = 2
batch_size = 2
lr = 1e-3
max_length = 256

[rollout]
temperature = 1.0
max_new_tokens = 12

[[reward]]
name = "countdown"
weight = 1.0

[[reward]]
name = "format"
weight = 0.5

[grpo]
num_prompts = 2
group_size = 4
beta = 0.04

[optim]
lr = 1e-3

[run]
steps = 2
seed = 3
save_every = 0
progress = false

[eval]
at_end = false
"#,
        model.display(),
        tokenizer.display()
    )
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_family_trains_sft_then_grpo_and_stays_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tokenizer");
    char_tokenizer(&tok);
    for name in [
        "qwen2_tiny",
        "qwen2_yarn_tiny",
        "qwen3_tiny",
        "llama_tiny",
        "mistral_tiny",
        "granitemoe_tiny",
        "deepseek_v2_lite_tiny",
        "deepseek_v3_tiny",
    ] {
        let text = config(&fixture(name), &tok);
        let (cfg, src) = Config::parse(&text, "families.toml", &[]).unwrap();
        let out = tmp.path().join(name);
        let opts = RunOptions {
            out_dir: Some(out.clone()),
            quiet: true,
            ..RunOptions::default()
        };
        let summary = Pipeline::new(cfg, src, opts)
            .unwrap()
            .run()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((summary.sft_steps, summary.grpo_steps), (2, 2), "{name}");
        let rows = metrics(&out);
        assert_eq!(rows.len(), 4, "{name}: {rows:?}");
        for r in &rows {
            let loss = r["loss"].as_f64().unwrap_or(f64::NAN);
            assert!(loss.is_finite(), "{name}: {r}");
            assert_eq!(r["skipped"], json!(false), "{name}: {r}");
        }
        // SFT moved the weights (its loss is an NLL over a 97-token tokenizer: ≥ 0).
        assert!(rows[0]["grad_norm"].as_f64().unwrap() > 0.0, "{name}");
        let before = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let last = summary.last_checkpoint.clone().unwrap();
        let after = load_model(&last, &default_device()).unwrap();
        assert_eq!(after.config.family, before.family, "{name}");
        assert_eq!(after.config.rope_scaling, before.rope_scaling, "{name}");
        assert_eq!(
            (
                after.config.num_experts,
                after.config.hidden_size,
                after.config.embedding_multiplier
            ),
            (
                before.num_experts,
                before.hidden_size,
                before.embedding_multiplier
            ),
            "{name}"
        );
        let w0 = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
        let w1 = std::fs::read(last.join("model.safetensors")).unwrap();
        assert!(
            w0 != w1,
            "{name}: the checkpoint's weights equal the fixture's"
        );
    }
}
