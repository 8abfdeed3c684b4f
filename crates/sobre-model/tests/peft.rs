//! LoRA adapters against PEFT: the committed fixture `qwen2_tiny_lora` (made by
//! `scripts/make_peft_fixture.py` with PEFT's `get_peft_model` + `save_pretrained` on
//! `qwen2_tiny`: r 4, lora_alpha 6, rsLoRA, all seven projections, non-zero random A and B)
//! loads in sobre with PEFT's logits; and an adapter sobre writes is what PEFT reads (written
//! to `$SOBRE_PEFT_OUT` when set, for `make_peft_fixture.py --check`).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sobre_model::lora::{self, LoraConfig, LoraInit};
use sobre_model::{
    Batch, ForwardOptions, InferenceModel, Kernels, MoeModel, default_device, load_model,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cases(dir: &Path) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let logits = c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect();
            (ids, logits)
        })
        .collect()
}

fn logits(m: &MoeModel, ids: &[u32], kernels: Kernels) -> Vec<f32> {
    let opts = ForwardOptions {
        kernels,
        ..Default::default()
    };
    let b = Batch::left_padded(&[ids.to_vec()], 0);
    m.forward(&b, None, opts)
        .logits
        .try_into_vec_as::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// PEFT's adapter directory loads onto the base (found through its relative
/// `base_model_name_or_path`) and gives PEFT's logits within 1e-4 at every position of every
/// sequence: fused and reference kernels, the host engine (adapters merged), and the merged
/// model. The adapter matters: without it the logits are more than 1 away.
#[test]
fn a_peft_adapter_gives_peft_logits() {
    let d = default_device();
    let dir = fixture("qwen2_tiny_lora");
    let (cfg, base_name) = lora::read_adapter_config(&dir).unwrap();
    assert_eq!((cfg.r, cfg.alpha, cfg.use_rslora), (4, 6.0, true));
    assert_eq!(cfg.scale(), 3.0);
    assert_eq!(base_name.as_deref(), Some("../qwen2_tiny"));
    let m = load_model(&dir, &d).unwrap();
    assert_eq!(lora::adapter_tensors(&m).len(), 2 * 2 * 7);
    let base = load_model(&fixture("qwen2_tiny"), &d).unwrap();
    let host = InferenceModel::new(&m);
    let merged = lora::merge_adapters(m.clone());
    let mut worst = [0.0f32; 4];
    let mut moved = 0.0f32;
    for (ids, want) in cases(&dir) {
        let want: Vec<f32> = want.concat();
        let got = [
            logits(&m, &ids, Kernels::Fused),
            logits(&m, &ids, Kernels::Reference),
            host.forward_positions(
                &Batch::left_padded(std::slice::from_ref(&ids), 0),
                &(0..ids.len()).collect::<Vec<_>>(),
            ),
            logits(&merged, &ids, Kernels::Fused),
        ];
        for (w, g) in worst.iter_mut().zip(&got) {
            *w = w.max(max_diff(g, &want));
        }
        moved = moved.max(max_diff(&logits(&base, &ids, Kernels::Fused), &want));
    }
    eprintln!(
        "max |sobre − PEFT| (fused, reference, host, merged): {worst:?}; adapter moves {moved}"
    );
    for w in worst {
        assert!(w <= 1e-4, "{worst:?}");
    }
    assert!(moved > 1.0, "{moved}");
}

/// An adapter sobre creates and saves (r 2, lora_alpha 5, no rsLoRA, random A and B from
/// sobre's own seeded init) reloads bit for bit; with `SOBRE_PEFT_OUT=DIR` it is written
/// there with sobre's logits (`sobre_logits.json`) for `make_peft_fixture.py --check DIR`.
#[test]
fn a_sobre_adapter_for_peft() {
    let d = default_device();
    let base_dir = fixture("qwen2_tiny");
    let base = load_model(&base_dir, &d).unwrap();
    let c = LoraConfig {
        r: 2,
        alpha: 5.0,
        dropout: 0.0,
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        use_rslora: false,
        init: LoraInit::Random,
    };
    let m = lora::add_adapters(base.clone(), &c, 99).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var_os("SOBRE_PEFT_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("adapter"));
    let base_abs = std::fs::canonicalize(&base_dir).unwrap();
    lora::save_adapter(&m, &c, &base_abs.display().to_string(), &out).unwrap();
    let seqs: Vec<Vec<u32>> = cases(&base_dir).into_iter().map(|(ids, _)| ids).collect();
    let vocab = m.config.vocab_size;
    let records: Vec<Value> = seqs
        .iter()
        .map(|ids| {
            let l = logits(&m, ids, Kernels::Fused);
            let rows: Vec<&[f32]> = l.chunks_exact(vocab).collect();
            json!({"ids": ids, "logits": rows})
        })
        .collect();
    std::fs::write(
        out.join("sobre_logits.json"),
        json!({ "cases": records }).to_string(),
    )
    .unwrap();
    let back = load_model(&out, &d).unwrap();
    assert_eq!(lora::adapter_map(&back), lora::adapter_map(&m));
    for ids in &seqs {
        assert_eq!(
            logits(&back, ids, Kernels::Fused),
            logits(&m, ids, Kernels::Fused)
        );
    }
    // The file holds PEFT's names and layout only.
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 * 2 * 7);
    let a = st
        .tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[2, 40]);
    let b = st
        .tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[16, 2]);
}
