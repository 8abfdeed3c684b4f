//! Rotary position embeddings and their context-extension variants, as transformers computes
//! them (`modeling_rope_utils.py`): the frequencies `inv_freq` of the `head_dim / 2` rotation
//! pairs and the factor cos and sin are multiplied by (YaRN's `attention_factor`).
//!
//! `default` RoPE rotates pair `i` by `position · θ^(−2i/d)`. The scaled variants change those
//! frequencies so a model trained on `original_max_position_embeddings` positions reads longer
//! sequences: `linear` divides every frequency by `factor` (position interpolation); `llama3`
//! divides only the low frequencies, leaves the high ones, and blends the band between;
//! `yarn` blends interpolated and extrapolated frequencies over a ramp between the correction
//! dimensions of `beta_fast` and `beta_slow`, and scales the attention logits through cos and
//! sin by `attention_factor` (from `mscale` / `mscale_all_dim` as DeepSeek sets them).

use serde_json::{Map, Value, json};

/// How the rotary frequencies are scaled (`rope_scaling` in transformers 4.x, `rope_parameters`
/// in 5.x, whose `rope_type` names the variant).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type = "default"`.
    None,
    /// `rope_type = "linear"`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `rope_type = "llama3"`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// `rope_type = "yarn"`.
    Yarn(Yarn),
}

/// YaRN's parameters as the config gives them (absent keys keep transformers' defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    /// `None`: `max_position_embeddings / original_max_position_embeddings`, as transformers
    /// computes it when the key is absent.
    pub factor: Option<f64>,
    /// The pretraining context; `None` = `max_position_embeddings` (transformers'
    /// `standardize_rope_params`).
    pub original_max_position_embeddings: Option<usize>,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// DeepSeek's `mscale` and `mscale_all_dim` (0 = absent).
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// An explicit `attention_factor`, overriding the one from `mscale`.
    pub attention_factor: Option<f64>,
    /// Round the correction range outward to whole dimensions (transformers' `truncate`).
    pub truncate: bool,
}

/// The frequencies of the rotation pairs and the factor on cos and sin.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    /// `[rotary_dim / 2]`
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

/// YaRN's `get_mscale`: `0.1 · mscale · ln(scale) + 1` above a scale of 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// The `rope_type` string.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn(_) => "yarn",
        }
    }

    /// The YaRN factor: `factor`, else `max_position_embeddings / original` (transformers 5's
    /// `_compute_yarn_parameters`).
    pub(crate) fn yarn_factor(y: &Yarn, max_position_embeddings: usize) -> f64 {
        let original = y
            .original_max_position_embeddings
            .unwrap_or(max_position_embeddings);
        y.factor
            .unwrap_or(max_position_embeddings as f64 / original as f64)
    }

    /// The frequencies for a rotary dimension `dim` (even) and base `theta`, for a model whose
    /// config says `max_position_embeddings`.
    pub fn frequencies(
        &self,
        dim: usize,
        theta: f64,
        max_position_embeddings: usize,
    ) -> RopeFrequencies {
        // Computed in f32 as torch does (`base ** (arange(0, dim, 2).float() / dim)`), so the
        // tables agree with transformers' to the last bit where they can.
        let base = theta as f32;
        let pos_freqs: Vec<f32> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let plain: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        match self {
            RopeScaling::None => RopeFrequencies {
                inv_freq: plain,
                attention_factor: 1.0,
            },
            RopeScaling::Linear { factor } => RopeFrequencies {
                inv_freq: plain.iter().map(|f| f / *factor as f32).collect(),
                attention_factor: 1.0,
            },
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old = *original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                let inv_freq = plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                RopeFrequencies {
                    inv_freq,
                    attention_factor: 1.0,
                }
            }
            RopeScaling::Yarn(y) => {
                let factor = Self::yarn_factor(y, max_position_embeddings);
                let original = y
                    .original_max_position_embeddings
                    .unwrap_or(max_position_embeddings) as f64;
                let attention_factor = y.attention_factor.unwrap_or_else(|| {
                    if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                        yarn_get_mscale(factor, y.mscale)
                            / yarn_get_mscale(factor, y.mscale_all_dim)
                    } else {
                        yarn_get_mscale(factor, 1.0)
                    }
                });
                let correction_dim = |rotations: f64| {
                    dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) =
                    (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
                if y.truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let (low, high) = (low as f32, high as f32);
                let inv_freq = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (factor as f32 * p);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        interpolation * (1.0 - keep) + extrapolation * keep
                    })
                    .collect();
                RopeFrequencies {
                    inv_freq,
                    attention_factor: attention_factor as f32,
                }
            }
        }
    }

    /// Read a `rope_scaling` / `rope_parameters` object (`key` names it in errors). Returns the
    /// scaling and the `rope_theta` it holds, if any. Every sub-key is honoured or an error.
    pub fn from_json(
        key: &str,
        obj: &Map<String, Value>,
    ) -> Result<(RopeScaling, Option<f64>), String> {
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| -> Result<Option<f64>, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("`{key}.{k}` must be a number, found {v}")),
            }
        };
        let need = |k: &str| -> Result<f64, String> {
            num(k)?.ok_or_else(|| format!("`{key}.{k}` is required for rope_type \"{kind}\""))
        };
        let positive = |k: &str, v: f64| -> Result<f64, String> {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(format!("`{key}.{k}` must be a positive number, found {v}"))
            }
        };
        let theta = num("rope_theta")?;
        let (scaling, allowed): (RopeScaling, &[&str]) = match kind {
            "default" => (RopeScaling::None, &[]),
            "linear" => (
                RopeScaling::Linear {
                    factor: positive("factor", need("factor")?)?,
                },
                &["factor"],
            ),
            "llama3" => {
                let low = positive("low_freq_factor", need("low_freq_factor")?)?;
                let high = positive("high_freq_factor", need("high_freq_factor")?)?;
                if high <= low {
                    return Err(format!(
                        "`{key}.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})"
                    ));
                }
                let orig = need("original_max_position_embeddings")?;
                (
                    RopeScaling::Llama3 {
                        factor: positive("factor", need("factor")?)?,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: positive(
                            "original_max_position_embeddings",
                            orig,
                        )? as usize,
                    },
                    &[
                        "factor",
                        "low_freq_factor",
                        "high_freq_factor",
                        "original_max_position_embeddings",
                    ],
                )
            }
            "yarn" => {
                let truncate = match obj.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return Err(format!("`{key}.truncate` must be a boolean, found {v}"));
                    }
                };
                let orig = num("original_max_position_embeddings")?
                    .map(|v| positive("original_max_position_embeddings", v).map(|v| v as usize))
                    .transpose()?;
                (
                    RopeScaling::Yarn(Yarn {
                        factor: num("factor")?.map(|f| positive("factor", f)).transpose()?,
                        original_max_position_embeddings: orig,
                        beta_fast: num("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                        beta_slow: num("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                        mscale: num("mscale")?.unwrap_or(0.0),
                        mscale_all_dim: num("mscale_all_dim")?.unwrap_or(0.0),
                        attention_factor: num("attention_factor")?,
                        truncate,
                    }),
                    &[
                        "factor",
                        "original_max_position_embeddings",
                        "beta_fast",
                        "beta_slow",
                        "mscale",
                        "mscale_all_dim",
                        "attention_factor",
                        "truncate",
                    ],
                )
            }
            other => {
                return Err(format!(
                    "unsupported `{key}.rope_type` \"{other}\"; sobre computes \"default\", \
                     \"linear\", \"llama3\" and \"yarn\""
                ));
            }
        };
        for sub in obj.keys() {
            let s = sub.as_str();
            if !matches!(s, "rope_type" | "type" | "rope_theta") && !allowed.contains(&s) {
                return Err(format!(
                    "unsupported key `{key}.{sub}` for rope_type \"{kind}\""
                ));
            }
        }
        Ok((scaling, theta))
    }

    /// The `rope_parameters` object (transformers 5.x) with `rope_theta`; the same object
    /// without the theta is 4.x's `rope_scaling` (`None` for default RoPE).
    pub fn to_json(&self, theta: f64) -> (Value, Value) {
        let mut m = Map::new();
        m.insert("rope_type".into(), json!(self.rope_type()));
        match self {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                m.insert("factor".into(), json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                m.insert("factor".into(), json!(factor));
                m.insert("low_freq_factor".into(), json!(low_freq_factor));
                m.insert("high_freq_factor".into(), json!(high_freq_factor));
                m.insert(
                    "original_max_position_embeddings".into(),
                    json!(original_max_position_embeddings),
                );
            }
            RopeScaling::Yarn(y) => {
                if let Some(f) = y.factor {
                    m.insert("factor".into(), json!(f));
                }
                if let Some(o) = y.original_max_position_embeddings {
                    m.insert("original_max_position_embeddings".into(), json!(o));
                }
                m.insert("beta_fast".into(), json!(y.beta_fast));
                m.insert("beta_slow".into(), json!(y.beta_slow));
                if y.mscale != 0.0 {
                    m.insert("mscale".into(), json!(y.mscale));
                }
                if y.mscale_all_dim != 0.0 {
                    m.insert("mscale_all_dim".into(), json!(y.mscale_all_dim));
                }
                if let Some(a) = y.attention_factor {
                    m.insert("attention_factor".into(), json!(a));
                }
                if !y.truncate {
                    m.insert("truncate".into(), json!(false));
                }
            }
        }
        let scaling = match self {
            RopeScaling::None => Value::Null,
            _ => {
                let mut s = m.clone();
                s.insert("type".into(), json!(self.rope_type()));
                Value::Object(s)
            }
        };
        m.insert("rope_theta".into(), json!(theta));
        (Value::Object(m), scaling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(((*x as f64) - y).abs() <= tol * y.abs(), "[{i}] {x} vs {y}");
        }
    }

    #[test]
    fn default_and_linear() {
        let f = RopeScaling::None.frequencies(8, 10000.0, 128);
        close(&f.inv_freq, &[1.0, 0.1, 0.01, 0.001], 1e-6);
        let f = RopeScaling::Linear { factor: 2.0 }.frequencies(8, 10000.0, 128);
        close(&f.inv_freq, &[0.5, 0.05, 0.005, 0.0005], 1e-6);
        assert_eq!(f.attention_factor, 1.0);
    }

    #[test]
    fn llama3_bands() {
        // theta 10000, dim 8: wavelengths 2π, 62.8, 628, 6283. Original context 64, low 1,
        // high 4: high band (< 16) kept, low band (> 64) divided by 8, 62.8 smoothed.
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let f = s.frequencies(8, 10000.0, 1024);
        let wavelen = 2.0 * std::f64::consts::PI / 0.1;
        let smooth = (64.0 / wavelen - 1.0) / 3.0;
        let mid = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        close(&f.inv_freq, &[1.0, mid, 0.01 / 8.0, 0.001 / 8.0], 1e-5);
    }

    #[test]
    fn yarn_ramp_and_mscale() {
        // dim 8, theta 10000, original 16, factor 4: correction dims of β_fast 32 and β_slow 1
        // are 8·ln(16/(32·2π))/(2 ln 10⁴) < 0 → 0 and 8·ln(16/2π)/(2 ln 10⁴) = 0.41 → 1.
        let y = Yarn {
            factor: Some(4.0),
            original_max_position_embeddings: None,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.0,
            mscale_all_dim: 0.0,
            attention_factor: None,
            truncate: true,
        };
        let f = RopeScaling::Yarn(y.clone()).frequencies(8, 10000.0, 16);
        // ramp = clamp((i − 0)/(1 − 0)): pair 0 extrapolated, pairs ≥ 1 interpolated.
        close(
            &f.inv_freq,
            &[1.0, 0.1 / 4.0, 0.01 / 4.0, 0.001 / 4.0],
            1e-6,
        );
        assert!((f.attention_factor as f64 - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
        // DeepSeek: mscale = mscale_all_dim → a factor of 1; without `factor`, it is
        // max_position / original = 64 / 16.
        let ds = Yarn {
            mscale: 0.707,
            mscale_all_dim: 0.707,
            original_max_position_embeddings: Some(16),
            factor: None,
            ..y
        };
        let f = RopeScaling::Yarn(ds).frequencies(8, 10000.0, 64);
        assert_eq!(f.attention_factor, 1.0);
        close(
            &f.inv_freq,
            &[1.0, 0.1 / 4.0, 0.01 / 4.0, 0.001 / 4.0],
            1e-6,
        );
    }

    #[test]
    fn parse_and_write_back() {
        let obj = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 5e5});
        let (s, theta) =
            RopeScaling::from_json("rope_parameters", obj.as_object().unwrap()).unwrap();
        assert_eq!(theta, Some(5e5));
        let (params, scaling) = s.to_json(5e5);
        assert_eq!(params, obj);
        assert_eq!(scaling["type"], "llama3");
        let (again, _) =
            RopeScaling::from_json("rope_scaling", scaling.as_object().unwrap()).unwrap();
        assert_eq!(again, s);
        let bad = json!({"rope_type": "dynamic", "factor": 2.0});
        let e = RopeScaling::from_json("rope_scaling", bad.as_object().unwrap()).unwrap_err();
        assert!(e.contains("`rope_scaling.rope_type` \"dynamic\""), "{e}");
        let bad = json!({"rope_type": "linear", "factor": 2.0, "foo": 1});
        let e = RopeScaling::from_json("rope_scaling", bad.as_object().unwrap()).unwrap_err();
        assert!(e.contains("`rope_scaling.foo`"), "{e}");
        let bad = json!({"rope_type": "llama3", "factor": 8.0});
        let e = RopeScaling::from_json("rope_scaling", bad.as_object().unwrap()).unwrap_err();
        assert!(
            e.contains("`rope_scaling.low_freq_factor` is required"),
            "{e}"
        );
    }
}
