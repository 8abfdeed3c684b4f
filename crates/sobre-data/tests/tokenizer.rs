//! The trained byte-level BPE: special-token ids, digit splitting, exact round-trips on every
//! shipped sample, deterministic training, save/load.

use std::path::PathBuf;

use sobre_data::dataset::{DatasetConfig, load};
use sobre_data::shipped::shipped_files;
use sobre_data::template::Template;
use sobre_data::tokenizer::{TokenizerError, TrainOptions, training_texts};
use sobre_data::{Sample, Tokenizer};

fn shipped_samples() -> Vec<Sample> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    shipped_files()
        .iter()
        .flat_map(|f| load(&DatasetConfig::new(dir.join(f.path))).unwrap().samples)
        .collect()
}

fn trained(samples: &[Sample], vocab: usize) -> Tokenizer {
    let texts: Vec<String> = samples
        .iter()
        .flat_map(|s| training_texts(s, &Template::R1Zero).unwrap())
        .collect();
    let opts = TrainOptions {
        vocab_size: vocab,
        ..Default::default()
    };
    Tokenizer::train(texts.iter(), &opts).unwrap()
}

#[test]
fn trained_tokenizer_round_trips_every_shipped_sample() {
    let samples = shipped_samples();
    assert_eq!(samples.len(), 6000);
    let tok = trained(&samples, 1024);
    // `vocab_size` is a ceiling: once every word of this small, repetitive corpus is a single
    // token no pair is left to merge (digits never merge), so training stops at 485.
    assert_eq!(tok.vocab_size(), 485);

    let sp = tok.special();
    assert_eq!((sp.eos, sp.pad, sp.bos), (0, 1, None));
    assert_eq!(
        (sp.think_start, sp.think_end, sp.answer_start, sp.answer_end),
        (Some(2), Some(3), Some(4), Some(5))
    );
    assert_eq!(tok.id_to_token(0).as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|pad|>"));

    let mut total = 0usize;
    for s in &samples {
        let prompt = Template::R1Zero.render(&s.prompt).unwrap();
        for text in [Some(prompt), s.completion.clone(), s.answer.clone()]
            .into_iter()
            .flatten()
        {
            let ids = tok.encode(&text).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            total += ids.len();
        }
    }
    assert!(total > 0);

    // Demonstrations: tags are single tokens, digits are single tokens.
    let demo = "<think>\n15 + 3 = 18, 18 - 7 = 11\n</think>\n<answer>\n(15 + 3) - 7\n</answer>";
    let ids = tok.encode(demo).unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(*ids.last().unwrap(), 5);
    assert!(ids.contains(&3) && ids.contains(&4));
    let toks = tok.tokens("12345 + 678").unwrap();
    assert_eq!(toks, ["1", "2", "3", "4", "5", "Ġ+", "Ġ", "6", "7", "8"]);

    // eos/pad are special (dropped when skipping), the tags are not.
    let with_eos = [ids.clone(), vec![0, 1, 1]].concat();
    assert_eq!(tok.decode(&with_eos, true).unwrap(), demo);
    assert_eq!(
        tok.decode(&with_eos, false).unwrap(),
        format!("{demo}<|endoftext|><|pad|><|pad|>")
    );
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), [0]);

    // Text the training data never had still round-trips (byte fallback through the alphabet).
    for text in ["héllo wörld ✓ 🦀", "tab\there\r\nand  spaces  ", ""] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn training_is_deterministic_and_save_load_is_lossless() {
    let samples: Vec<Sample> = shipped_samples().into_iter().step_by(7).collect();
    let a = trained(&samples, 512);
    let b = trained(&samples, 512);
    assert_eq!(
        a.inner().to_string(false).unwrap(),
        b.inner().to_string(false).unwrap()
    );

    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path()).unwrap();
    let loaded = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(loaded.special(), a.special());
    assert_eq!(loaded.vocab_size(), a.vocab_size());
    assert!(a.vocab_size() <= 512);
    let text = Template::R1Zero.render(&samples[3].prompt).unwrap();
    assert_eq!(loaded.encode(&text).unwrap(), a.encode(&text).unwrap());

    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["eos_token"], "<|endoftext|>");
    assert_eq!(cfg["pad_token"], "<|pad|>");
    assert_eq!(cfg["bos_token"], serde_json::Value::Null);
    assert_eq!(cfg["clean_up_tokenization_spaces"], false);
    assert_eq!(cfg["added_tokens_decoder"]["2"]["content"], "<think>");
    assert_eq!(cfg["added_tokens_decoder"]["2"]["special"], false);
    assert_eq!(cfg["added_tokens_decoder"]["0"]["special"], true);
}

#[test]
fn vocab_smaller_than_the_byte_alphabet_is_an_error() {
    let err = Tokenizer::train(
        ["a b c"].iter(),
        &TrainOptions {
            vocab_size: 100,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        TokenizerError::VocabTooSmall { got: 100, min: 262 }
    ));
}

#[test]
fn missing_tokenizer_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// `SOBRE_TOKENIZER_OUT=DIR cargo test -p sobre-data --test tokenizer export` saves the
/// tokenizer trained on the shipped data to DIR with `parity.json` (texts and the ids this
/// crate gives them), for `scripts/check_tokenizer.py DIR` to compare with transformers.
#[test]
fn export_for_transformers_check() {
    let Some(out) = std::env::var_os("SOBRE_TOKENIZER_OUT") else {
        return;
    };
    let out = PathBuf::from(out);
    let samples = shipped_samples();
    let tok = trained(&samples, 1024);
    tok.save(&out).unwrap();
    let mut texts: Vec<String> = samples
        .iter()
        .step_by(50)
        .flat_map(|s| {
            let mut v = vec![Template::R1Zero.render(&s.prompt).unwrap()];
            v.extend(s.completion.clone());
            v
        })
        .collect();
    texts.extend(
        [
            "héllo wörld ✓ 🦀",
            "tab\there\r\nand  spaces  ",
            "12345 + 678<|endoftext|>",
            "",
        ]
        .map(String::from),
    );
    let cases: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| serde_json::json!({"text": t, "ids": tok.encode(t).unwrap()}))
        .collect();
    std::fs::write(
        out.join("parity.json"),
        serde_json::to_string_pretty(&cases).unwrap(),
    )
    .unwrap();
}

/// `added_tokens` stay whole: a text where a tool's markers always touch (`</calc><result>`)
/// still tokenizes with each marker a token of its own, and decoding keeps them.
#[test]
fn added_tokens_are_never_merged_with_their_neighbours() {
    let texts: Vec<String> = (0..200)
        .map(|i| format!("<calc>{i} + 3</calc><result>{}</result>, ok", i + 3))
        .collect();
    let markers: Vec<String> = ["<calc>", "</calc>", "<result>", "</result>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let opts = TrainOptions {
        vocab_size: 400,
        added_tokens: markers.clone(),
        ..Default::default()
    };
    let tok = Tokenizer::train(texts.iter(), &opts).unwrap();
    let pieces = tok.tokens("x</calc><result>18</result>").unwrap();
    assert_eq!(pieces[1..3], ["</calc>", "<result>"], "{pieces:?}");
    assert_eq!(pieces.last().unwrap(), "</result>");
    for m in &markers {
        assert_eq!(tok.encode(m).unwrap().len(), 1, "{m}");
    }
    let ids = tok.encode("<calc>8 * 4</calc><result>32</result>").unwrap();
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "<calc>8 * 4</calc><result>32</result>"
    );
    // An added token that already exists is refused.
    let dup = TrainOptions {
        added_tokens: vec!["<think>".into()],
        ..opts
    };
    assert!(Tokenizer::train(texts.iter(), &dup).is_err());
}
