//! `metrics.jsonl` and `samples.jsonl`: one JSON object per line, flushed every step, and the
//! one-line summaries printed every `log_every` steps. With
//! [`JsonlWriter::with_tensorboard`] the numeric scalars of each line also go to a TensorBoard
//! event file ([`crate::tensorboard`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::TrainError;
use crate::tensorboard::EventWriter;

/// Appends JSON lines to a file, and optionally their scalars to TensorBoard.
pub struct JsonlWriter {
    path: PathBuf,
    /// `None`: lines are dropped ([`JsonlWriter::discard`]).
    file: Option<File>,
    tensorboard: Option<EventWriter>,
}

impl JsonlWriter {
    /// Open for appending; lines whose `step` (in `stage`) is beyond `keep_until` are dropped
    /// first, so a resumed run does not repeat steps it redoes.
    pub fn open(path: &Path, keep_until: Option<(&str, usize)>) -> Result<Self, TrainError> {
        if let Some((stage, last)) = keep_until
            && let Ok(text) = std::fs::read_to_string(path)
        {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let Ok(v) = serde_json::from_str::<Value>(l) else {
                        return false;
                    };
                    let s = v.get("stage").and_then(Value::as_str).unwrap_or("");
                    let step = v.get("step").and_then(Value::as_u64).unwrap_or(0) as usize;
                    stage_rank(s) < stage_rank(stage) || (s == stage && step <= last)
                })
                .collect();
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            std::fs::write(path, body).map_err(|e| TrainError::io(path, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(JsonlWriter {
            path: path.to_path_buf(),
            file: Some(file),
            tensorboard: None,
        })
    }

    /// A writer that drops every line: a run's ranks other than 0, whose lines rank 0 writes.
    pub fn discard(path: &Path) -> Self {
        JsonlWriter {
            path: path.to_path_buf(),
            file: None,
            tensorboard: None,
        }
    }

    /// Also write every line's numeric scalars to a new TensorBoard event file in `dir`
    /// (created), so a run can be watched with `tensorboard --logdir runs/`.
    ///
    /// Each [`write`](Self::write) of an object then adds, after the JSON line, one scalar per
    /// key as tag `<stage>/<key>` (just `<key>` without a `"stage"` string) at step `"step"`
    /// (0 when absent or not an integer): numbers as f32, bools as 0/1, and a nested object's
    /// numbers and bools as `<stage>/<key>/<inner>` (one level). Strings, nulls (non-finite
    /// values), arrays (`expert_load`) and deeper objects are skipped; `stage` and `step`
    /// themselves are not written.
    pub fn with_tensorboard(mut self, dir: &Path) -> Result<Self, TrainError> {
        self.tensorboard = Some(EventWriter::create(dir)?);
        Ok(self)
    }

    pub fn write(&mut self, value: &Value) -> Result<(), TrainError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let line = serde_json::to_string(value).unwrap_or_default();
        writeln!(file, "{line}")
            .and_then(|_| file.flush())
            .map_err(|e| TrainError::io(&self.path, e))?;
        if let Some(tb) = &mut self.tensorboard {
            let (step, scalars) = tensorboard_scalars(value);
            for (tag, v) in scalars {
                tb.add_scalar(&tag, step, v)?;
            }
        }
        Ok(())
    }
}

/// The step and `(tag, value)` scalars of one metrics object, as
/// [`JsonlWriter::with_tensorboard`] describes; nothing for a non-object.
pub fn tensorboard_scalars(value: &Value) -> (i64, Vec<(String, f32)>) {
    let Some(m) = value.as_object() else {
        return (0, Vec::new());
    };
    let step = m.get("step").and_then(Value::as_i64).unwrap_or(0);
    let prefix = match m.get("stage").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => format!("{s}/"),
        _ => String::new(),
    };
    let scalar = |v: &Value| match v {
        Value::Number(n) => n.as_f64().map(|x| x as f32),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    };
    let mut out = Vec::new();
    for (k, v) in m {
        if k == "stage" || k == "step" {
            continue;
        }
        if let Some(x) = scalar(v) {
            out.push((format!("{prefix}{k}"), x));
        } else if let Value::Object(inner) = v {
            for (k2, v2) in inner {
                if let Some(x) = scalar(v2) {
                    out.push((format!("{prefix}{k}/{k2}"), x));
                }
            }
        }
    }
    (step, out)
}

fn stage_rank(s: &str) -> u8 {
    match s {
        "sft" => 0,
        "grpo" => 1,
        "eval" => 1,
        _ => 2,
    }
}

/// Peak resident set size in MiB (`VmHWM` of `/proc/self/status`; None off Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Per-expert load of each sparse layer as fractions, and the mean over layers of
/// max load / mean load (1 = perfectly balanced).
pub fn expert_load(counts: &[Vec<u64>]) -> (Vec<Vec<f64>>, Option<f64>) {
    let mut loads = Vec::new();
    let mut imb = Vec::new();
    for layer in counts {
        let total: u64 = layer.iter().sum();
        if total == 0 || layer.is_empty() {
            continue;
        }
        let frac: Vec<f64> = layer.iter().map(|&c| c as f64 / total as f64).collect();
        let mean = 1.0 / layer.len() as f64;
        imb.push(frac.iter().cloned().fold(0.0, f64::max) / mean);
        loads.push(frac);
    }
    let imbalance = (!imb.is_empty()).then(|| imb.iter().sum::<f64>() / imb.len() as f64);
    (loads, imbalance)
}

/// Add one data-parallel shard's `[layer][expert]` routing counts into `acc` (empty at first).
pub fn add_shard_counts(acc: &mut Vec<Vec<u32>>, counts: &[Vec<u32>]) {
    if acc.is_empty() {
        *acc = counts.to_vec();
        return;
    }
    for (a, c) in acc.iter_mut().zip(counts) {
        for (x, &y) in a.iter_mut().zip(c) {
            *x += y;
        }
    }
}

/// Add `counts` (`[layer][expert]`) into `acc`.
pub fn add_counts(acc: &mut Vec<Vec<u64>>, counts: &[Vec<u32>]) {
    if acc.len() < counts.len() {
        acc.resize(counts.len(), vec![]);
    }
    for (a, c) in acc.iter_mut().zip(counts) {
        if a.len() < c.len() {
            a.resize(c.len(), 0);
        }
        for (x, &y) in a.iter_mut().zip(c) {
            *x += y as u64;
        }
    }
}

/// A number for JSON: non-finite values become `null`.
pub fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// The one-line summary of a metrics object.
pub fn summary_line(m: &Map<String, Value>) -> String {
    let f = |k: &str| m.get(k).and_then(Value::as_f64);
    let mut parts = vec![format!(
        "{} {}",
        m.get("stage").and_then(Value::as_str).unwrap_or(""),
        m.get("step").and_then(Value::as_u64).unwrap_or(0)
    )];
    for (k, label) in [
        ("reward_mean", "reward"),
        ("accuracy", "acc"),
        ("loss", "loss"),
        ("kl", "kl"),
        ("entropy", "ent"),
        ("completion_length_mean", "len"),
        ("grad_norm", "gnorm"),
        ("lr", "lr"),
        ("time_step", "s"),
    ] {
        if let Some(v) = f(k) {
            parts.push(if k == "lr" {
                format!("{label} {v:.2e}")
            } else {
                format!("{label} {v:.4}")
            });
        }
    }
    if m.get("skipped").and_then(Value::as_bool) == Some(true) {
        parts.push("SKIPPED (non-finite)".into());
    }
    parts.join(" · ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_imbalance_by_hand() {
        // [3, 1] → fractions .75/.25, max/mean = 1.5; [2, 2] → 1.0; mean 1.25.
        let (loads, imb) = expert_load(&[vec![3, 1], vec![2, 2]]);
        assert_eq!(loads[0], vec![0.75, 0.25]);
        assert!((imb.unwrap() - 1.25).abs() < 1e-12);
    }

    #[test]
    fn resume_truncates_later_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        std::fs::write(&p, "{\"stage\":\"sft\",\"step\":2}\n{\"stage\":\"grpo\",\"step\":1}\n{\"stage\":\"grpo\",\"step\":2}\n").unwrap();
        let mut w = JsonlWriter::open(&p, Some(("grpo", 1))).unwrap();
        w.write(&serde_json::json!({"stage": "grpo", "step": 2}))
            .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn tensorboard_gets_the_scalars_of_each_line() {
        // SOBRE_TB_TEST_DIR=/some/dir keeps the run directory there (metrics.jsonl +
        // tensorboard/), for `scripts/check_tensorboard.py DIR/run`.
        let (_tmp, run) = match std::env::var_os("SOBRE_TB_TEST_DIR") {
            Some(d) => {
                let run = PathBuf::from(d).join("run");
                let _ = std::fs::remove_dir_all(&run);
                std::fs::create_dir_all(&run).unwrap();
                (None, run)
            }
            None => {
                let t = tempfile::tempdir().unwrap();
                let run = t.path().to_path_buf();
                (Some(t), run)
            }
        };
        let p = run.join("metrics.jsonl");
        let mut w = JsonlWriter::open(&p, None)
            .unwrap()
            .with_tensorboard(&run.join("tensorboard"))
            .unwrap();
        let lines = [
            serde_json::json!({"stage": "sft", "step": 1, "loss": 3.25, "lr": 1e-3,
                "tokens": 1234, "skipped": false, "expert_load": [[0.5, 0.5]]}),
            serde_json::json!({"stage": "grpo", "step": 3, "reward_mean": 0.4375,
                "rewards/format/mean": 0.0, "kl": null, "note": "text", "skipped": true,
                "timing": {"rollout": 1.5, "label": "x", "deep": {"a": 1}}}),
            serde_json::json!({"loss": 7}),
        ];
        for l in &lines {
            w.write(l).unwrap();
        }
        drop(w);
        // The JSON lines are unchanged.
        let text = std::fs::read_to_string(&p).unwrap();
        let back: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, lines);

        let files: Vec<_> = std::fs::read_dir(run.join("tensorboard"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1);
        let events = crate::tensorboard::read_events(&files[0].as_ref().unwrap().path()).unwrap();
        let got: Vec<(String, i64, f32)> = events[1..]
            .iter()
            .map(|e| {
                let v = &e.summary.as_ref().unwrap().value[0];
                (v.tag.clone(), e.step, v.simple_value.unwrap())
            })
            .collect();
        let mut got_sorted = got.clone();
        got_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let want = vec![
            ("grpo/reward_mean".to_string(), 3, 0.4375f32),
            ("grpo/rewards/format/mean".into(), 3, 0.0),
            ("grpo/skipped".into(), 3, 1.0),
            ("grpo/timing/rollout".into(), 3, 1.5),
            ("loss".into(), 0, 7.0),
            ("sft/loss".into(), 1, 3.25),
            ("sft/lr".into(), 1, 1e-3),
            ("sft/skipped".into(), 1, 0.0),
            ("sft/tokens".into(), 1, 1234.0),
        ];
        assert_eq!(got_sorted, want);
        // Written in line order: the sft line's scalars first.
        assert!(
            got[..4]
                .iter()
                .all(|(t, s, _)| t.starts_with("sft/") && *s == 1)
        );
        assert!(!got.iter().any(|(t, _, _)| t.contains("note")
            || t.contains("kl")
            || t.contains("stage")
            || t.ends_with("/step")
            || t.contains("label")
            || t.contains("deep")
            || t.contains("expert_load")));
    }
}
