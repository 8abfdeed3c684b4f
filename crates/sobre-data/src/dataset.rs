//! Samples and the datasets they come from: JSONL or Parquet, read row by row, with TRL's field
//! names by default and a [`DatasetConfig`] mapping for other layouts (verl, GSM8K).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One chat message, as TRL's conversational datasets and HF chat templates have them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A sample's prompt: a plain string (TRL's "standard" format) or a list of messages (TRL's
/// "conversational" format). Templates decide how either becomes model text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

impl Prompt {
    /// The text a non-chat template wraps: the string itself, or the last user message.
    pub fn user_text(&self) -> Option<&str> {
        match self {
            Prompt::Text(text) => Some(text),
            Prompt::Messages(msgs) => msgs
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.as_str()),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Prompt::Text(text) => Value::String(text.clone()),
            Prompt::Messages(msgs) => Value::Array(
                msgs.iter()
                    .map(|m| {
                        let mut obj = serde_json::Map::new();
                        obj.insert("role".into(), Value::String(m.role.clone()));
                        obj.insert("content".into(), Value::String(m.content.clone()));
                        Value::Object(obj)
                    })
                    .collect(),
            ),
        }
    }
}

/// One training or evaluation example.
///
/// `fields` holds every other field a reward may need (`nums`, `target`, verl's `reward_model`
/// …), keyed by name in sorted order so that writing a sample is deterministic.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub prompt: Prompt,
    /// The reference answer, as text (numbers are written as JSON writes them).
    pub answer: Option<String>,
    /// A worked completion (SFT demonstrations).
    pub completion: Option<String>,
    pub fields: BTreeMap<String, Value>,
}

impl Sample {
    /// A task field as an integer, e.g. countdown's `target`.
    pub fn field_i64(&self, name: &str) -> Option<i64> {
        self.fields.get(name).and_then(Value::as_i64)
    }

    /// A task field as a list of integers, e.g. countdown's `nums`.
    pub fn field_i64s(&self, name: &str) -> Option<Vec<i64>> {
        self.fields
            .get(name)?
            .as_array()?
            .iter()
            .map(Value::as_i64)
            .collect()
    }

    /// One JSONL line (no newline) in a fixed field order: task fields (sorted by name), then
    /// `prompt`, `answer`, `completion`. Generators rely on this order for byte-identical files.
    pub fn to_json_line(&self) -> String {
        // serde_json::Map is a BTreeMap here (no `preserve_order`), which would sort `prompt`
        // among the task fields; building the line by hand keeps the order readable and fixed.
        let mut parts: Vec<String> = Vec::with_capacity(self.fields.len() + 3);
        let mut push = |key: &str, value: &Value| {
            let k = Value::String(key.to_string()).to_string();
            parts.push(format!("{k}:{value}"));
        };
        for (key, value) in &self.fields {
            push(key, value);
        }
        push("prompt", &self.prompt.to_json());
        if let Some(answer) = &self.answer {
            push("answer", &Value::String(answer.clone()));
        }
        if let Some(completion) = &self.completion {
            push("completion", &Value::String(completion.clone()));
        }
        format!("{{{}}}", parts.join(","))
    }
}

/// Samples as JSONL text, one per line, each line ending in `\n`.
pub fn to_jsonl(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        out.push_str(&s.to_json_line());
        out.push('\n');
    }
    out
}

/// Writes samples as JSONL to `path` (creating parent directories).
pub fn write_jsonl(samples: &[Sample], path: &Path) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file = File::create(path).map_err(io)?;
    file.write_all(to_jsonl(samples).as_bytes()).map_err(io)?;
    Ok(())
}

/// File format of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Parquet,
}

impl Format {
    /// `.parquet` is Parquet; everything else (`.jsonl`, `.json`, `.ndjson`) is JSONL.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("parquet") => Format::Parquet,
            _ => Format::Jsonl,
        }
    }
}

/// How to turn the answer field into the reference answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerExtract {
    /// Use the field as it is.
    #[default]
    None,
    /// GSM8K: the text after the last `####`, trimmed, with thousands separators removed.
    Gsm8k,
}

/// What to do with a row that does not fit the mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Stop with an error naming file, line (or row group) and field.
    #[default]
    Error,
    /// Skip the row; the reader counts skipped rows for the run's log.
    Skip,
}

/// Where a dataset comes from and how its fields map onto a [`Sample`]. Defaults are TRL's
/// names, so a TRL dataset needs only `path`.
///
/// ```toml
/// path = "data/gsm8k/train.parquet"
/// prompt_field = "question"
/// answer_extract = "gsm8k"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub path: PathBuf,
    /// `jsonl` or `parquet`; by default chosen from the file extension.
    #[serde(default)]
    pub format: Option<Format>,
    /// Dotted path of the prompt (a string or a list of `{role, content}` messages).
    #[serde(default = "default_prompt_field")]
    pub prompt_field: String,
    /// Dotted path of the reference answer (a string or number); absent answers are allowed.
    #[serde(default = "default_answer_field")]
    pub answer_field: String,
    /// Dotted path of a worked completion (SFT); absent completions are allowed.
    #[serde(default = "default_completion_field")]
    pub completion_field: String,
    /// Sample field name → dotted path in the row (`target = "reward_model.ground_truth.target"`).
    /// Mapped fields are required. Top-level fields not mapped and not the prompt/answer/
    /// completion are copied under their own names.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    #[serde(default)]
    pub answer_extract: AnswerExtract,
    #[serde(default)]
    pub on_bad_row: OnBadRow,
}

fn default_prompt_field() -> String {
    "prompt".into()
}
fn default_answer_field() -> String {
    "answer".into()
}
fn default_completion_field() -> String {
    "completion".into()
}

impl DatasetConfig {
    /// TRL defaults for a file.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DatasetConfig {
            path: path.into(),
            format: None,
            prompt_field: default_prompt_field(),
            answer_field: default_answer_field(),
            completion_field: default_completion_field(),
            fields: BTreeMap::new(),
            answer_extract: AnswerExtract::None,
            on_bad_row: OnBadRow::Error,
        }
    }

    fn format(&self) -> Format {
        self.format.unwrap_or_else(|| Format::from_path(&self.path))
    }
}

/// Where a row is: a JSONL line (1-based) or a Parquet row group and row within it (0-based,
/// as Parquet tools count them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Line {
        path: PathBuf,
        line: usize,
    },
    RowGroup {
        path: PathBuf,
        row_group: usize,
        row: usize,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line { path, line } => write!(f, "{}:{line}", path.display()),
            Location::RowGroup {
                path,
                row_group,
                row,
            } => write!(f, "{}: row group {row_group}, row {row}", path.display()),
        }
    }
}

/// Errors from reading or writing datasets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{location}: not a JSON object: {message}")]
    Json { location: Location, message: String },
    #[error("{location}: field `{field}`: expected {expected}")]
    Field {
        location: Location,
        field: String,
        expected: String,
    },
    #[error("{}: parquet: {message}", path.display())]
    Parquet { path: PathBuf, message: String },
}

impl DataError {
    /// The row's location, when the error is about one row (such a row can be skipped).
    pub fn location(&self) -> Option<&Location> {
        match self {
            DataError::Json { location, .. } | DataError::Field { location, .. } => Some(location),
            _ => None,
        }
    }
}

/// The rows of a file as raw JSON values with their locations, streamed: one line at a time
/// for JSONL, one row group at a time for Parquet.
pub struct RawRows {
    inner: RawInner,
}

enum RawInner {
    Jsonl {
        path: PathBuf,
        lines: std::io::Lines<BufReader<File>>,
        line: usize,
    },
    Parquet(crate::parquet::ParquetRows),
}

impl RawRows {
    pub fn open(path: &Path, format: Format) -> Result<RawRows, DataError> {
        let inner = match format {
            Format::Jsonl => {
                let file = File::open(path).map_err(|source| DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                RawInner::Jsonl {
                    path: path.to_path_buf(),
                    lines: BufReader::new(file).lines(),
                    line: 0,
                }
            }
            Format::Parquet => RawInner::Parquet(crate::parquet::ParquetRows::open(path)?),
        };
        Ok(RawRows { inner })
    }
}

impl Iterator for RawRows {
    /// A row that is not a JSON object is an `Err` with its location; reading can go on.
    type Item = Result<(Location, Value), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            RawInner::Jsonl { path, lines, line } => loop {
                let text = match lines.next()? {
                    Ok(text) => text,
                    Err(source) => {
                        return Some(Err(DataError::Io {
                            path: path.clone(),
                            source,
                        }));
                    }
                };
                *line += 1;
                // Blank lines (a trailing newline, hand-edited files) are not rows.
                if text.trim().is_empty() {
                    continue;
                }
                let location = Location::Line {
                    path: path.clone(),
                    line: *line,
                };
                return Some(match serde_json::from_str::<Value>(&text) {
                    Ok(value @ Value::Object(_)) => Ok((location, value)),
                    Ok(other) => Err(DataError::Json {
                        location,
                        message: format!("found {}", type_name(&other)),
                    }),
                    Err(err) => Err(DataError::Json {
                        location,
                        message: err.to_string(),
                    }),
                });
            },
            RawInner::Parquet(rows) => rows.next(),
        }
    }
}

/// JSON type names as error messages and `data check` print them.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "float",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Follows a dotted path (`reward_model.ground_truth`) into nested objects. A key that itself
/// contains the whole path is tried first, so flat columns named `a.b` still work.
pub fn lookup<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = row.get(path) {
        return Some(v);
    }
    let mut cur = row;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Maps one raw row onto a [`Sample`] according to `cfg`.
pub fn map_row(cfg: &DatasetConfig, location: &Location, row: &Value) -> Result<Sample, DataError> {
    let field_err = |field: &str, expected: String| DataError::Field {
        location: location.clone(),
        field: field.to_string(),
        expected,
    };
    let found = |v: Option<&Value>| match v {
        None => "missing".to_string(),
        Some(v) => format!("found {}", type_name(v)),
    };

    let prompt_value = lookup(row, &cfg.prompt_field);
    let prompt = match prompt_value {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) => {
            let mut msgs = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let role = item.get("role").and_then(Value::as_str);
                let content = item.get("content").and_then(Value::as_str);
                match (role, content) {
                    (Some(role), Some(content)) => msgs.push(Message {
                        role: role.to_string(),
                        content: content.to_string(),
                    }),
                    _ => {
                        return Err(field_err(
                            &format!("{}[{i}]", cfg.prompt_field),
                            "an object with string `role` and `content`".into(),
                        ));
                    }
                }
            }
            Prompt::Messages(msgs)
        }
        other => {
            return Err(field_err(
                &cfg.prompt_field,
                format!(
                    "a string or a list of {{\"role\", \"content\"}} messages, {}",
                    found(other)
                ),
            ));
        }
    };

    let answer = match lookup(row, &cfg.answer_field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        other => {
            return Err(field_err(
                &cfg.answer_field,
                format!("a string or a number, {}", found(other)),
            ));
        }
    };
    let answer = match (answer, cfg.answer_extract) {
        (Some(a), AnswerExtract::Gsm8k) => match gsm8k_answer(&a) {
            Some(x) => Some(x),
            None => {
                return Err(field_err(
                    &cfg.answer_field,
                    "a GSM8K answer ending in `#### <number>`".into(),
                ));
            }
        },
        (a, _) => a,
    };

    let completion = match lookup(row, &cfg.completion_field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        other => {
            return Err(field_err(
                &cfg.completion_field,
                format!("a string, {}", found(other)),
            ));
        }
    };

    let mut fields = BTreeMap::new();
    if let Value::Object(map) = row {
        let consumed = [&cfg.prompt_field, &cfg.answer_field, &cfg.completion_field];
        for (key, value) in map {
            if !consumed.contains(&key) && !cfg.fields.contains_key(key) {
                fields.insert(key.clone(), value.clone());
            }
        }
    }
    for (name, path) in &cfg.fields {
        match lookup(row, path) {
            Some(v) => {
                fields.insert(name.clone(), v.clone());
            }
            None => return Err(field_err(path, format!("a value for `{name}`, missing"))),
        }
    }

    Ok(Sample {
        prompt,
        answer,
        completion,
        fields,
    })
}

/// The text after the last `####`, trimmed, without thousands separators (`#### 1,234` → `1234`).
pub fn gsm8k_answer(text: &str) -> Option<String> {
    let (_, tail) = text.rsplit_once("####")?;
    let ans: String = tail.trim().chars().filter(|c| *c != ',').collect();
    if ans.is_empty() { None } else { Some(ans) }
}

/// Streams the samples of a dataset. With `on_bad_row = "skip"` bad rows are dropped and
/// counted ([`DatasetReader::skipped`]); otherwise the first bad row is an `Err`.
pub struct DatasetReader {
    cfg: DatasetConfig,
    rows: RawRows,
    skipped: usize,
    first_skipped: Vec<String>,
}

impl DatasetReader {
    pub fn open(cfg: &DatasetConfig) -> Result<DatasetReader, DataError> {
        Ok(DatasetReader {
            rows: RawRows::open(&cfg.path, cfg.format())?,
            cfg: cfg.clone(),
            skipped: 0,
            first_skipped: Vec::new(),
        })
    }

    /// Rows skipped so far (only with `on_bad_row = "skip"`).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The messages of the first few skipped rows, for the run's log.
    pub fn skipped_examples(&self) -> &[String] {
        &self.first_skipped
    }
}

impl Iterator for DatasetReader {
    type Item = Result<Sample, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let result = match self.rows.next()? {
                Ok((loc, row)) => map_row(&self.cfg, &loc, &row),
                Err(err) => Err(err),
            };
            match result {
                Err(err) if self.cfg.on_bad_row == OnBadRow::Skip && err.location().is_some() => {
                    self.skipped += 1;
                    if self.first_skipped.len() < 5 {
                        self.first_skipped.push(err.to_string());
                    }
                }
                other => return Some(other),
            }
        }
    }
}

/// A whole dataset in memory, with the number of skipped rows.
#[derive(Debug)]
pub struct Loaded {
    pub samples: Vec<Sample>,
    pub skipped: usize,
}

/// Reads every sample of a dataset.
pub fn load(cfg: &DatasetConfig) -> Result<Loaded, DataError> {
    let mut reader = DatasetReader::open(cfg)?;
    let mut samples = Vec::new();
    for sample in reader.by_ref() {
        samples.push(sample?);
    }
    Ok(Loaded {
        samples,
        skipped: reader.skipped(),
    })
}
