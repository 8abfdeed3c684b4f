//! What the fixture tests share: the committed transformers fixtures, their reference records,
//! greedy decoding with the KV cache, and fixtures with an edited config.json.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use serde_json::Value;
use sobre_model::{Batch, ForwardOptions, KvCache, LogitsMode, MoeModel};

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's `reference.json` (transformers' logits and greedy continuations).
pub fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json"))
        .expect("fixture reference.json");
    serde_json::from_str(&text).expect("reference.json is JSON")
}

/// The token ids under `key` of a reference case.
pub fn ids_of(case: &Value, key: &str) -> Vec<u32> {
    case[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy decoding with the KV cache, one token at a time.
pub fn greedy(model: &MoeModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let device = model.device();
    let mut cache = KvCache::new(&model.config, 1, prompt.len() + n, &device);
    let opts = ForwardOptions {
        logits: LogitsMode::Last,
        ..Default::default()
    };
    let mut out = model.forward(
        &Batch::left_padded(&[prompt.to_vec()], 0),
        Some(&mut cache),
        opts,
    );
    let mut tokens = Vec::new();
    for step in 0..n {
        let next = out
            .logits
            .clone()
            .argmax(2)
            .try_into_vec_as::<i64>()
            .unwrap()[0] as u32;
        tokens.push(next);
        let b = Batch {
            batch: 1,
            seq: 1,
            input_ids: vec![next],
            positions: vec![(prompt.len() + step) as u32],
            attention_mask: vec![true],
        };
        out = model.forward(&b, Some(&mut cache), opts);
    }
    tokens
}

/// A fixture's files with its `config.json` edited by `edit`, in a temporary directory.
pub fn edited_fixture(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    dir
}
