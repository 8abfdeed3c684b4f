//! `generation_config.json`: the token ids generation stops on and the sampling defaults a
//! Hugging Face model directory ships with (transformers' `GenerationConfig`).
//!
//! Only the keys sobre uses are read; every other key (`transformers_version`,
//! `repetition_penalty`, …) is ignored. `null` counts as absent, as transformers treats it.
//! A present key of the wrong type is an error naming the file and the key.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::{ModelConfig, ModelError};

/// The file name in a model directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// What sobre reads from (and writes to) `generation_config.json`. `None` = not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// One id or a list in the file; empty when absent.
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `false` means greedy decoding (transformers' default when the key is absent; sobre keeps
    /// its own default then, see `sobre generate --help`).
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// 0 = off.
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Token ids of a model config (what [`crate::save_model`] writes when nothing else is known).
    pub fn from_model_config(cfg: &ModelConfig) -> Self {
        GenerationConfig {
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id.clone(),
            pad_token_id: cfg.pad_token_id,
            ..Default::default()
        }
    }

    /// Reads `dir/generation_config.json`; `Ok(None)` when the directory has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::from_json_str(&text, &path.display().to_string()).map(Some)
    }

    /// Parses the JSON text of a `generation_config.json`; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Config {
            origin: origin.to_string(),
            msg,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("expected a JSON object".into()));
        };
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());
        let id = |key: &str, v: &Value| -> Result<u32, ModelError> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    err(format!(
                        "`{key}` must be a token id (an integer ≥ 0), found {v}"
                    ))
                })
        };
        let opt_id = |key: &str| get(key).map(|v| id(key, v)).transpose();
        let float = |key: &str| -> Result<Option<f64>, ModelError> {
            get(key)
                .map(|v| {
                    v.as_f64()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(|| err(format!("`{key}` must be a number ≥ 0, found {v}")))
                })
                .transpose()
        };
        let count = |key: &str| -> Result<Option<usize>, ModelError> {
            get(key)
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| err(format!("`{key}` must be an integer ≥ 0, found {v}")))
                })
                .transpose()
        };
        let eos_token_id = match get("eos_token_id") {
            None => vec![],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| id("eos_token_id", v))
                .collect::<Result<_, _>>()?,
            Some(v) => vec![id("eos_token_id", v)?],
        };
        let do_sample = get("do_sample")
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| err(format!("`do_sample` must be true or false, found {v}")))
            })
            .transpose()?;
        let top_p = float("top_p")?;
        if let Some(p) = top_p
            && p > 1.0
        {
            return Err(err(format!("`top_p` must be in [0, 1], found {p}")));
        }
        let min_p = float("min_p")?;
        if let Some(p) = min_p
            && p > 1.0
        {
            return Err(err(format!("`min_p` must be in [0, 1], found {p}")));
        }
        Ok(GenerationConfig {
            bos_token_id: opt_id("bos_token_id")?,
            eos_token_id,
            pad_token_id: opt_id("pad_token_id")?,
            do_sample,
            temperature: float("temperature")?,
            top_p,
            top_k: count("top_k")?,
            min_p,
            max_new_tokens: count("max_new_tokens")?,
        })
    }

    /// The JSON transformers reads: token ids always (null when unset, `eos_token_id` a list),
    /// sampling keys only when set.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("bos_token_id".into(), json!(self.bos_token_id));
        m.insert("eos_token_id".into(), json!(self.eos_token_id));
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
        if let Some(v) = self.do_sample {
            m.insert("do_sample".into(), json!(v));
        }
        if let Some(v) = self.temperature {
            m.insert("temperature".into(), json!(v));
        }
        if let Some(v) = self.top_p {
            m.insert("top_p".into(), json!(v));
        }
        if let Some(v) = self.top_k {
            m.insert("top_k".into(), json!(v));
        }
        if let Some(v) = self.min_p {
            m.insert("min_p".into(), json!(v));
        }
        if let Some(v) = self.max_new_tokens {
            m.insert("max_new_tokens".into(), json!(v));
        }
        Value::Object(m)
    }

    /// Writes `dir/generation_config.json`.
    pub fn write(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
    }

    /// The same sampling defaults with the token ids of `cfg`.
    pub fn with_token_ids_of(&self, cfg: &ModelConfig) -> Self {
        GenerationConfig {
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id.clone(),
            pad_token_id: cfg.pad_token_id,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_keys_ignores_others_and_treats_null_as_absent() {
        let g = GenerationConfig::from_json_str(
            r#"{"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": null,
                "do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "repetition_penalty": 1.05, "transformers_version": "4.37.0"}"#,
            "g.json",
        )
        .unwrap();
        assert_eq!(g.bos_token_id, Some(151643));
        assert_eq!(g.eos_token_id, vec![151645, 151643]);
        assert_eq!(g.pad_token_id, None);
        assert_eq!(g.do_sample, Some(true));
        assert!((g.temperature.unwrap() - 0.7).abs() < 1e-6);
        assert!((g.top_p.unwrap() - 0.8).abs() < 1e-6);
        assert_eq!(g.top_k, Some(20));
        assert_eq!(g.min_p, None);
        assert_eq!(g.max_new_tokens, None);
        let one = GenerationConfig::from_json_str(r#"{"eos_token_id": 2}"#, "g.json").unwrap();
        assert_eq!(one.eos_token_id, vec![2]);
    }

    #[test]
    fn bad_types_name_the_file_and_key() {
        for (text, key) in [
            (r#"{"eos_token_id": "</s>"}"#, "`eos_token_id`"),
            (r#"{"eos_token_id": [1, -2]}"#, "`eos_token_id`"),
            (r#"{"temperature": "hot"}"#, "`temperature`"),
            (r#"{"top_p": 1.5}"#, "`top_p`"),
            (r#"{"top_k": 2.5}"#, "`top_k`"),
            (r#"{"do_sample": "yes"}"#, "`do_sample`"),
            (r#"{"pad_token_id": 1.5}"#, "`pad_token_id`"),
        ] {
            let e = GenerationConfig::from_json_str(text, "m/generation_config.json")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("m/generation_config.json: "), "{e}");
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = GenerationConfig::from_json_str("[1]", "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.json") && e.contains("object"), "{e}");
    }

    #[test]
    fn round_trips_through_json() {
        let g = GenerationConfig {
            bos_token_id: None,
            eos_token_id: vec![3, 0],
            pad_token_id: Some(0),
            do_sample: Some(false),
            temperature: Some(0.5),
            top_p: None,
            top_k: Some(4),
            min_p: None,
            max_new_tokens: Some(9),
        };
        let text = serde_json::to_string(&g.to_json()).unwrap();
        assert_eq!(GenerationConfig::from_json_str(&text, "t").unwrap(), g);
    }
}
