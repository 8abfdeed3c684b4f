//! Export without Python: `scripts/make_hf_fixtures.py` had sobre write the `tiny` preset (seed 7,
//! `initializer_range` 0.5) and loaded it with transformers' `AutoModelForCausalLM`, recording
//! the config and tensors transformers loaded and the logits and greedy tokens it computed.
//! This test writes the same directory again and checks that it is the one transformers loaded
//! (same config.json, every tensor byte-identical by hash) and that sobre computes what
//! transformers computed from it.

use std::path::Path;

use serde_json::Value;
use sobre_model::{
    Batch, ForwardOptions, KvCache, LogitsMode, ModelConfig, default_device, init_model,
    load_model, save_model,
};

fn fnv1a64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sobre_export_tiny/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference.json")).expect("JSON")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn what_sobre_writes_is_what_transformers_loaded_and_computes_the_same() {
    let reference = reference();
    let device = default_device();
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.initializer_range = 0.5;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    save_model(&init_model(&cfg, 7, &device), &path, None).unwrap();

    // The same config.json transformers read.
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        ours, reference["config"],
        "config.json differs from the one transformers loaded"
    );

    // The same tensors, byte for byte.
    let bytes = std::fs::read(path.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want = reference["tensors"].as_object().unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names.iter().collect::<Vec<_>>(), want_names, "tensor names");
    for name in &names {
        let view = st.tensor(name).unwrap();
        let w = &want[name];
        assert_eq!(w["dtype"], "float32", "{name}");
        assert_eq!(
            view.shape(),
            w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect::<Vec<_>>(),
            "{name}: shape"
        );
        assert_eq!(
            fnv1a64(view.data()),
            w["fnv1a64"].as_str().unwrap(),
            "{name}: bytes"
        );
    }

    // The logits and greedy continuations transformers computed from those files.
    let model = load_model(&path, &device).unwrap();
    let mut worst = 0.0f32;
    for case in reference["cases"].as_array().unwrap() {
        let ids = u32s(&case["ids"]);
        let got = model
            .forward(
                &Batch::left_padded(std::slice::from_ref(&ids), 0),
                None,
                ForwardOptions::default(),
            )
            .logits
            .try_into_vec_as::<f32>()
            .unwrap();
        let want: Vec<f32> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }

        let greedy_want = u32s(&case["greedy"]);
        let mut cache = KvCache::new(&model.config, 1, ids.len() + greedy_want.len(), &device);
        let opts = ForwardOptions {
            logits: LogitsMode::Last,
            ..Default::default()
        };
        let mut out = model.forward(
            &Batch::left_padded(std::slice::from_ref(&ids), 0),
            Some(&mut cache),
            opts,
        );
        let mut tokens = vec![];
        for step in 0..greedy_want.len() {
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
                positions: vec![(ids.len() + step) as u32],
                attention_mask: vec![true],
            };
            out = model.forward(&b, Some(&mut cache), opts);
        }
        assert_eq!(tokens, greedy_want, "greedy continuation of {ids:?}");
    }
    eprintln!("sobre_export_tiny: max |logit − transformers| = {worst:e}");
    assert!(worst <= 1e-4, "max |logit − transformers| = {worst:e}");
}
