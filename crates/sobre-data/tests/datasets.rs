//! Reading datasets: TRL defaults, field mappings, bad rows, Parquet.

use std::io::Write;
use std::path::{Path, PathBuf};

use sobre_data::dataset::{
    AnswerExtract, DataError, DatasetConfig, DatasetReader, Format, OnBadRow, Prompt, load,
};
use sobre_data::{Message, Sample};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn jsonl(dir: &tempfile::TempDir, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.path().join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    path
}

#[test]
fn trl_defaults_read_text_and_message_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let path = jsonl(
        &dir,
        "d.jsonl",
        &[
            r#"{"prompt": "What is 2 + 2?", "answer": "4"}"#,
            "",
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "answer": 7, "nums": [1, 2], "target": 3}"#,
        ],
    );
    let loaded = load(&DatasetConfig::new(&path)).unwrap();
    assert_eq!(loaded.skipped, 0);
    assert_eq!(loaded.samples.len(), 2);
    assert_eq!(
        loaded.samples[0].prompt,
        Prompt::Text("What is 2 + 2?".into())
    );
    assert_eq!(loaded.samples[0].answer.as_deref(), Some("4"));
    let s = &loaded.samples[1];
    assert_eq!(
        s.prompt,
        Prompt::Messages(vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into()
            },
            Message {
                role: "user".into(),
                content: "Hi".into()
            },
        ])
    );
    assert_eq!(s.prompt.user_text(), Some("Hi"));
    // Numbers become their JSON text.
    assert_eq!(s.answer.as_deref(), Some("7"));
    assert_eq!(s.field_i64s("nums"), Some(vec![1, 2]));
    assert_eq!(s.field_i64("target"), Some(3));
}

#[test]
fn bad_row_error_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = jsonl(
        &dir,
        "bad.jsonl",
        &[
            r#"{"prompt": "ok"}"#,
            r#"{"prompt": 5}"#,
            r#"{"prompt": "ok"}"#,
        ],
    );
    let err = load(&DatasetConfig::new(&path)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Field { .. }));
    assert!(
        msg.ends_with(
            "bad.jsonl:2: field `prompt`: expected a string or a list of {\"role\", \"content\"} messages, found int"
        ),
        "{msg}"
    );
}

#[test]
fn skip_mode_counts_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = jsonl(
        &dir,
        "mixed.jsonl",
        &[
            r#"{"prompt": "a"}"#,
            r#"{"question": "no prompt"}"#,
            "not json",
            r#"[1, 2]"#,
            r#"{"prompt": [{"role": "user"}]}"#,
            r#"{"prompt": "b", "answer": {"x": 1}}"#,
            r#"{"prompt": "c"}"#,
        ],
    );
    let mut cfg = DatasetConfig::new(&path);
    cfg.on_bad_row = OnBadRow::Skip;
    let mut reader = DatasetReader::open(&cfg).unwrap();
    let prompts: Vec<String> = reader
        .by_ref()
        .map(|s| s.unwrap().prompt.user_text().unwrap().to_string())
        .collect();
    assert_eq!(prompts, ["a", "c"]);
    assert_eq!(reader.skipped(), 5);
    let first = &reader.skipped_examples()[0];
    assert!(first.ends_with("mixed.jsonl:2: field `prompt`: expected a string or a list of {\"role\", \"content\"} messages, missing"), "{first}");
    assert!(
        reader.skipped_examples()[2].ends_with("mixed.jsonl:4: not a JSON object: found array")
    );
    assert!(reader.skipped_examples()[3].contains("field `prompt[0]`"));
}

#[test]
fn gsm8k_mapping_from_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let path = jsonl(
        &dir,
        "gsm.jsonl",
        &[r#"{"question": "Q?", "answer": "work\n#### 1,234"}"#],
    );
    let cfg: DatasetConfig = serde_json::from_value(serde_json::json!({
        "path": path, "prompt_field": "question", "answer_extract": "gsm8k"
    }))
    .unwrap();
    let s = &load(&cfg).unwrap().samples[0];
    assert_eq!(s.prompt, Prompt::Text("Q?".into()));
    assert_eq!(s.answer.as_deref(), Some("1234"));
    assert!(s.fields.is_empty());
}

#[test]
fn config_rejects_unknown_keys() {
    let err = serde_json::from_value::<DatasetConfig>(serde_json::json!({
        "path": "x.jsonl", "promt_field": "q"
    }))
    .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `promt_field`"),
        "{err}"
    );
}

#[test]
fn verl_parquet_with_nested_ground_truth() {
    let mut cfg = DatasetConfig::new(fixture("verl_countdown.parquet"));
    assert_eq!(Format::from_path(&cfg.path), Format::Parquet);
    cfg.fields
        .insert("target".into(), "reward_model.ground_truth.target".into());
    cfg.fields
        .insert("nums".into(), "reward_model.ground_truth.numbers".into());
    let loaded = load(&cfg).unwrap();
    assert_eq!(loaded.samples.len(), 3);
    let s = &loaded.samples[2];
    assert_eq!(
        s.prompt,
        Prompt::Messages(vec![Message {
            role: "user".into(),
            content: "Using the numbers [4, 4, 8], create an equation that equals 24.".into()
        }])
    );
    assert_eq!(s.field_i64("target"), Some(24));
    assert_eq!(s.field_i64s("nums"), Some(vec![4, 4, 8]));
    assert_eq!(s.fields["data_source"], "countdown");
    assert_eq!(s.fields["extra_info"]["index"], 2);
}

#[test]
fn parquet_bad_row_names_row_group_and_field() {
    let mut cfg = DatasetConfig::new(fixture("verl_countdown.parquet"));
    cfg.fields
        .insert("target".into(), "reward_model.ground_truth.missing".into());
    let err = load(&cfg).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "verl_countdown.parquet: row group 0, row 0: field `reward_model.ground_truth.missing`: expected a value for `target`, missing"
        ),
        "{err}"
    );

    let mut cfg = DatasetConfig::new(fixture("gsm8k.parquet"));
    cfg.prompt_field = "question".into();
    cfg.answer_extract = AnswerExtract::Gsm8k;
    let err = load(&cfg).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "gsm8k.parquet: row group 0, row 2: field `answer`: expected a GSM8K answer ending in `#### <number>`"
        ),
        "{err}"
    );
    cfg.on_bad_row = OnBadRow::Skip;
    let loaded = load(&cfg).unwrap();
    assert_eq!(loaded.skipped, 1);
    let answers: Vec<_> = loaded
        .samples
        .iter()
        .map(|s| s.answer.clone().unwrap())
        .collect();
    assert_eq!(answers, ["7", "1234"]);
}

#[test]
fn parquet_second_row_group_location() {
    let mut cfg = DatasetConfig::new(fixture("verl_countdown.parquet"));
    cfg.answer_field = "data_source".into();
    cfg.prompt_field = "extra_info.index".into();
    let err = load(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("row group 0, row 0: field `extra_info.index`"),
        "{err}"
    );
    let mut reader = sobre_data::dataset::RawRows::open(&cfg.path, Format::Parquet).unwrap();
    let third = reader.nth(2).unwrap().unwrap().0.to_string();
    assert!(
        third.ends_with("verl_countdown.parquet: row group 1, row 0"),
        "{third}"
    );
}

#[test]
fn json_line_has_fixed_field_order() {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("target".to_string(), serde_json::json!(11));
    fields.insert("nums".to_string(), serde_json::json!([15, 3, 7]));
    let s = Sample {
        prompt: Prompt::Text("Q \"x\"".into()),
        answer: Some("11".into()),
        completion: Some("<think>\na\n</think>".into()),
        fields,
    };
    assert_eq!(
        s.to_json_line(),
        r#"{"nums":[15,3,7],"target":11,"prompt":"Q \"x\"","answer":"11","completion":"<think>\na\n</think>"}"#
    );
}
