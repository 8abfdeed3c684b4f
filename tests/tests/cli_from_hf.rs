//! Starting from a Hugging Face model directory (`configs/from-hf.toml` on the committed
//! `qwen3_moe_chat_tiny` fixture: its own tokenizer, Qwen2.5 chat template and
//! generation_config.json): GRPO through the binary, the checkpoint it leaves as an HF directory,
//! `sobre generate` taking its defaults and eos ids from generation_config.json, and the errors
//! for broken model directories.

mod common;

use std::path::{Path, PathBuf};

use common::{err_stderr, ok_stdout, root, sobre};
use serde_json::Value;

fn fixture() -> PathBuf {
    root().join("crates/sobre-model/tests/fixtures/qwen3_moe_chat_tiny")
}

fn config() -> String {
    root().join("configs/from-hf.toml").display().to_string()
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// A copy of the fixture in `dir`, minus `skip`, with `edit` applied to each JSON file by name.
fn copy_fixture(dir: &Path, skip: &[&str], edit: &dyn Fn(&str, &mut Value)) -> PathBuf {
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if skip.contains(&name.as_str()) {
            continue;
        }
        if name.ends_with(".json") {
            let mut v = json(&p);
            edit(&name, &mut v);
            std::fs::write(dst.join(&name), serde_json::to_string_pretty(&v).unwrap()).unwrap();
        } else {
            std::fs::copy(&p, dst.join(&name)).unwrap();
        }
    }
    dst
}

fn ids_of(v: &Value) -> Vec<u64> {
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap()).collect(),
        x => vec![x.as_u64().unwrap()],
    }
}

#[test]
fn grpo_from_an_hf_model_dir_keeps_its_tokenizer_template_and_generation_config() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = sobre(&[
        "train",
        "--config",
        &config(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    let stdout = ok_stdout(&out);
    assert!(stdout.contains("done: 0 SFT + 4 GRPO steps"), "{stdout}");

    for f in [
        "config.toml",
        "metrics.jsonl",
        "samples.jsonl",
        "tokenizer/tokenizer.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let metrics = lines(&run.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 4);
    assert!(metrics.iter().all(|m| m["stage"] == "grpo"));
    assert!(
        !run.join("checkpoints/sft").exists(),
        "no SFT stage was configured"
    );

    // Prompts were rendered with the model's chat template (the Qwen2.5 one, system prompt
    // included) and the completions are decoded with its tokenizer.
    let samples = lines(&run.join("samples.jsonl"));
    assert_eq!(samples.len(), 4 * 2);
    for s in &samples {
        let p = s["prompt"].as_str().unwrap();
        assert!(
            p.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
                && p.contains("<|im_end|>\n<|im_start|>user\nUsing the numbers")
                && p.ends_with("<|im_end|>\n<|im_start|>assistant\n"),
            "{p}"
        );
        assert!(s["tokens"].as_u64().unwrap() <= 16);
    }

    // The final checkpoint is an HF model directory with the model's tokenizer and template.
    let ckpt = run.join("checkpoints/step-000004");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }
    let src_tc = json(&fixture().join("tokenizer_config.json"));
    let tc = json(&ckpt.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], src_tc["chat_template"]);
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|endoftext|>");
    // <|im_end|> = 320 (the tokenizer's eos) first, then the model's other eos <|endoftext|> = 0.
    let genc = json(&ckpt.join("generation_config.json"));
    assert_eq!(ids_of(&genc["eos_token_id"]), vec![320, 0]);
    assert_eq!(genc["pad_token_id"], 0);
    assert_eq!(genc["bos_token_id"], 0);
    // The source model's sampling defaults are carried over.
    assert_eq!(genc["do_sample"], true);
    assert!(
        (genc["temperature"].as_f64().unwrap() - 0.8).abs() < 1e-9,
        "{genc}"
    );
    assert!(
        (genc["top_p"].as_f64().unwrap() - 0.95).abs() < 1e-9,
        "{genc}"
    );
    assert_eq!(genc["top_k"], 20);
    let cfg = json(&ckpt.join("config.json"));
    assert_eq!(ids_of(&cfg["eos_token_id"]), vec![320, 0]);
    assert_eq!(cfg["pad_token_id"], 0);
    assert_eq!(cfg["vocab_size"], 322);
    assert_eq!(cfg["model_type"], "qwen3_moe");

    // It loads again, tokenizer and sampling defaults included.
    let ckpt_s = ckpt.to_str().unwrap();
    let out = sobre(&[
        "generate",
        "--model",
        ckpt_s,
        "--prompt",
        "Using the numbers [1, 2, 3]",
        "-n",
        "2",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    let stdout = ok_stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("generation_config.json: temperature 0.8, top_k 20, top_p 0.95"),
        "{stderr}"
    );
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let toks = r["tokens"].as_array().unwrap();
        assert!(!toks.is_empty() && toks.len() <= 6);
        assert!(toks.iter().all(|t| t.as_u64().unwrap() < 322));
        assert!(r["text"].is_string());
    }
}

/// The greedy continuation transformers recorded for the fixture's chat prompt.
fn reference_prompt_and_first_greedy_token() -> (String, u64) {
    let r = json(&fixture().join("reference.json"));
    let ids: Vec<String> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap().to_string())
        .collect();
    (ids.join(","), r["greedy"][0].as_u64().unwrap())
}

#[test]
fn generate_takes_defaults_and_eos_ids_from_generation_config() {
    let (ids, first) = reference_prompt_and_first_greedy_token();
    let fixture = fixture();
    let model = fixture.to_str().unwrap();
    let run = |model: &str, extra: &[&str]| -> Vec<Value> {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--ids",
            &ids,
            "--max-new-tokens",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        ok_stdout(&sobre(&args))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Greedy on the fixture as is: transformers' greedy continuation, to the length limit
    // (its eos ids 320 and 0 are not sampled).
    let greedy = run(model, &["--temperature", "0"]);
    assert_eq!(greedy[0]["tokens"][0].as_u64(), Some(first));
    assert_eq!(greedy[0]["finish_reason"], "length");

    // generation_config.json saying `do_sample: false` makes the default greedy, and its eos ids
    // stop generation: with the greedy token as an eos id, generation stops after it.
    let tmp = tempfile::tempdir().unwrap();
    let edited = copy_fixture(tmp.path(), &[], &|name, v| {
        if name == "generation_config.json" {
            v["do_sample"] = Value::Bool(false);
            v["eos_token_id"] = serde_json::json!([first]);
        }
    });
    let stopped = run(edited.to_str().unwrap(), &[]);
    assert_eq!(stopped[0]["tokens"], serde_json::json!([first]));
    assert_eq!(stopped[0]["finish_reason"], "stop");
    // A flag given on the command line wins over the file.
    let sampled = run(
        edited.to_str().unwrap(),
        &[
            "--temperature",
            "1.5",
            "--seed",
            "3",
            "-n",
            "4",
            "--ignore-eos",
        ],
    );
    assert!(
        sampled
            .iter()
            .all(|s| s["tokens"].as_array().unwrap().len() == 8)
    );
    assert!(
        sampled
            .iter()
            .any(|s| s["tokens"][0].as_u64() != Some(first)),
        "temperature 1.5 should not be greedy"
    );

    // A generation_config.json with a bad value: the file and key are named.
    let tmp2 = tempfile::tempdir().unwrap();
    let bad = copy_fixture(tmp2.path(), &[], &|name, v| {
        if name == "generation_config.json" {
            v["temperature"] = Value::String("hot".into());
        }
    });
    let err = err_stderr(&sobre(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--ids",
        "1,2",
    ]));
    assert!(
        err.contains("generation_config.json") && err.contains("`temperature`"),
        "{err}"
    );
}

#[test]
fn broken_hf_model_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |model: &Path| {
        let set = format!("model.path={}", model.display());
        let out_dir = tmp.path().join("run");
        err_stderr(&sobre(&[
            "train",
            "--config",
            &config(),
            "--out",
            out_dir.to_str().unwrap(),
            "--quiet",
            "--set",
            &set,
        ]))
    };

    // config.json with a value of the wrong type.
    let d = tempfile::tempdir().unwrap();
    let bad_cfg = copy_fixture(d.path(), &[], &|name, v| {
        if name == "config.json" {
            v["hidden_size"] = Value::String("big".into());
        }
    });
    let err = train(&bad_cfg);
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    assert!(err.contains("model.path"), "{err}");

    // An unknown model_type.
    let d = tempfile::tempdir().unwrap();
    let unknown = copy_fixture(d.path(), &[], &|name, v| {
        if name == "config.json" {
            v["model_type"] = Value::String("gpt2".into());
        }
    });
    let err = train(&unknown);
    assert!(err.contains("config.json") && err.contains("gpt2"), "{err}");

    // generation_config.json with a bad eos id.
    let d = tempfile::tempdir().unwrap();
    let bad_gen = copy_fixture(d.path(), &[], &|name, v| {
        if name == "generation_config.json" {
            v["eos_token_id"] = Value::String("<|im_end|>".into());
        }
    });
    let err = train(&bad_gen);
    assert!(
        err.contains("generation_config.json") && err.contains("`eos_token_id`"),
        "{err}"
    );

    // No tokenizer in the model directory and no `[tokenizer] path`.
    let d = tempfile::tempdir().unwrap();
    let no_tok = copy_fixture(
        d.path(),
        &["tokenizer.json", "tokenizer_config.json"],
        &|_, _| {},
    );
    let err = train(&no_tok);
    assert!(
        err.contains("has no tokenizer.json") && err.contains("[tokenizer] path"),
        "{err}"
    );
    // … which `[tokenizer] path` fixes.
    let out_dir = tmp.path().join("ok");
    let out = sobre(&[
        "train",
        "--config",
        &config(),
        "--out",
        out_dir.to_str().unwrap(),
        "--quiet",
        "--set",
        &format!("model.path={}", no_tok.display()),
        "--set",
        &format!("tokenizer.path={}", fixture().display()),
        "--set",
        "run.steps=1",
    ]);
    ok_stdout(&out);

    // Weights that do not match config.json: the tensor is named.
    let d = tempfile::tempdir().unwrap();
    let wrong = copy_fixture(d.path(), &[], &|name, v| {
        if name == "config.json" {
            v["moe_intermediate_size"] = serde_json::json!(24);
        }
    });
    let err = train(&wrong);
    assert!(
        err.contains("does not match") && err.contains("experts"),
        "{err}"
    );
}
