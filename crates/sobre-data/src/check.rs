//! `sobre data check`: validate a dataset and summarise it (row counts, per-field statistics,
//! duplicates by canonical problem key).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

use crate::dataset::{DataError, DatasetConfig, Format, RawRows, map_row, type_name};
use crate::tasks::countdown::reachable;

/// Statistics of one top-level field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldStats {
    /// Rows that have the field.
    pub present: usize,
    /// How many rows hold each JSON type.
    pub types: BTreeMap<&'static str, usize>,
    /// Shortest and longest string (in characters) or array (in items).
    pub min_len: Option<usize>,
    pub max_len: Option<usize>,
    /// Smallest and largest number.
    pub min_value: Option<f64>,
    pub max_value: Option<f64>,
}

impl FieldStats {
    fn add(&mut self, v: &Value) {
        self.present += 1;
        *self.types.entry(type_name(v)).or_default() += 1;
        let len = match v {
            Value::String(s) => Some(s.chars().count()),
            Value::Array(a) => Some(a.len()),
            _ => None,
        };
        if let Some(len) = len {
            self.min_len = Some(self.min_len.map_or(len, |m| m.min(len)));
            self.max_len = Some(self.max_len.map_or(len, |m| m.max(len)));
        }
        if let Some(x) = v.as_f64() {
            self.min_value = Some(self.min_value.map_or(x, |m| m.min(x)));
            self.max_value = Some(self.max_value.map_or(x, |m| m.max(x)));
        }
    }
}

/// The result of checking a dataset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckReport {
    pub path: String,
    /// Rows read (valid or not).
    pub rows: usize,
    pub valid: usize,
    /// Invalid rows and why (all of them are counted; the first 20 are kept).
    pub invalid: usize,
    pub errors: Vec<String>,
    pub fields: BTreeMap<String, FieldStats>,
    /// Rows whose canonical key repeats an earlier row's.
    pub duplicates: usize,
    /// `countdown` (sorted nums + target) when rows have `nums` and `target`, else `prompt`.
    pub key_kind: &'static str,
    /// Countdown rows whose target no integer-step solution reaches (a warning, not an error:
    /// other generators may allow fractions).
    pub unsolvable: usize,
}

impl CheckReport {
    pub fn is_valid(&self) -> bool {
        self.invalid == 0
    }
}

/// Checks every row of a dataset with the mapping of `cfg` (its `on_bad_row` is ignored: every
/// bad row is reported). File-level failures (unreadable file) are `Err`.
pub fn check(cfg: &DatasetConfig) -> Result<CheckReport, DataError> {
    let format = cfg.format.unwrap_or_else(|| Format::from_path(&cfg.path));
    let mut report = CheckReport {
        path: cfg.path.display().to_string(),
        key_kind: "prompt",
        ..Default::default()
    };
    let mut keys = BTreeSet::new();
    for item in RawRows::open(&cfg.path, format)? {
        let (location, row) = match item {
            Ok(x) => x,
            Err(err) if err.location().is_some() => {
                report.rows += 1;
                report.invalid += 1;
                if report.errors.len() < 20 {
                    report.errors.push(err.to_string());
                }
                continue;
            }
            Err(err) => return Err(err),
        };
        report.rows += 1;
        if let Value::Object(map) = &row {
            for (k, v) in map {
                report.fields.entry(k.clone()).or_default().add(v);
            }
        }
        let sample = match map_row(cfg, &location, &row) {
            Ok(s) => s,
            Err(err) => {
                report.invalid += 1;
                if report.errors.len() < 20 {
                    report.errors.push(err.to_string());
                }
                continue;
            }
        };
        let has_countdown =
            sample.fields.contains_key("nums") || sample.fields.contains_key("target");
        let key = if has_countdown {
            report.key_kind = "countdown";
            match (sample.field_i64s("nums"), sample.field_i64("target")) {
                (Some(nums), Some(target)) if !nums.is_empty() => {
                    if nums.len() <= 6
                        && nums.iter().all(|&n| n > 0)
                        && !reachable(&nums).contains(&target)
                    {
                        report.unsolvable += 1;
                    }
                    let mut sorted = nums.clone();
                    sorted.sort_unstable();
                    format!("{sorted:?}:{target}")
                }
                _ => {
                    report.invalid += 1;
                    if report.errors.len() < 20 {
                        report.errors.push(format!(
                            "{location}: fields `nums`/`target`: expected a non-empty list of \
                             integers and an integer"
                        ));
                    }
                    continue;
                }
            }
        } else {
            format!(
                "{:?}|{:?}",
                sample.prompt.user_text(),
                sample.answer.as_deref()
            )
        };
        report.valid += 1;
        if !keys.insert(key) {
            report.duplicates += 1;
        }
    }
    Ok(report)
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file: {}", self.path)?;
        writeln!(
            f,
            "rows: {} (valid {}, invalid {})",
            self.rows, self.valid, self.invalid
        )?;
        writeln!(
            f,
            "duplicates: {} (by {} key)",
            self.duplicates, self.key_kind
        )?;
        if self.key_kind == "countdown" {
            writeln!(f, "unsolvable (integer steps): {}", self.unsolvable)?;
        }
        writeln!(f, "fields:")?;
        for (name, s) in &self.fields {
            let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
            write!(
                f,
                "  {name}: present {}, type {}",
                s.present,
                types.join(" ")
            )?;
            if let (Some(lo), Some(hi)) = (s.min_len, s.max_len) {
                write!(f, ", length {lo}..{hi}")?;
            }
            if let (Some(lo), Some(hi)) = (s.min_value, s.max_value) {
                write!(f, ", value {}..{}", num(lo), num(hi))?;
            }
            writeln!(f)?;
        }
        if !self.errors.is_empty() {
            writeln!(
                f,
                "errors (first {} of {}):",
                self.errors.len(),
                self.invalid
            )?;
            for e in &self.errors {
                writeln!(f, "  {e}")?;
            }
        }
        Ok(())
    }
}
