//! Rewards by name, built from `[[reward]]` tables, and their weighted combination.
//!
//! Like verl's registry of core algorithms: a fixed table maps each name to a builder that reads
//! that reward's own parameters (each a serde struct with `deny_unknown_fields`), so a typo in a
//! config is an error that names the reward and the key instead of a silently ignored setting.

use crate::{Completion, Reward, RewardError, Sample, Scores};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

type Builder = fn(&Map<String, Value>) -> Result<Box<dyn Reward>, RewardError>;

/// Every registered reward, in the order `reward_names` lists them.
const REGISTRY: &[(&str, Builder)] = &[
    ("accuracy", crate::accuracy::build),
    ("format", crate::format::build_format),
    ("tag_count", crate::format::build_tag_count),
    ("countdown", crate::countdown::build),
    ("exact_match", crate::matching::build_exact_match),
    ("regex_match", crate::matching::build_regex_match),
    ("length", crate::length::build_length),
    ("overlong", crate::length::build_overlong),
    ("repetition", crate::repetition::build),
    ("language_consistency", crate::language::build),
    ("code", crate::code::build),
    ("command", crate::command::build),
];

/// Check one reward's parameters without side effects: what [`build_reward`] would refuse,
/// except what only running shows (`code`'s interpreter in the sandbox, `command`'s program
/// starting). A config check runs this so that a run builds each reward once.
pub fn check_reward(name: &str, params: &Map<String, Value>) -> Result<(), RewardError> {
    match name {
        "code" => crate::code::check(params),
        "command" => crate::command::check(params),
        _ => build_reward(name, params).map(|_| ()),
    }
}

/// Names of all registered rewards.
pub fn reward_names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

/// Build one reward by name from its parameter table (everything in `[[reward]]` except `name`
/// and `weight`).
pub fn build_reward(
    name: &str,
    params: &Map<String, Value>,
) -> Result<Box<dyn Reward>, RewardError> {
    match REGISTRY.iter().find(|(n, _)| *n == name) {
        Some((_, build)) => build(params),
        None => Err(RewardError::UnknownReward {
            name: name.to_string(),
            valid: reward_names(),
        }),
    }
}

/// Deserialize a reward's parameters; on failure, find the key responsible so the error can
/// name it (serde's own type errors do not).
pub(crate) fn parse_params<T: DeserializeOwned>(
    reward: &str,
    params: &Map<String, Value>,
) -> Result<T, RewardError> {
    match serde_json::from_value::<T>(Value::Object(params.clone())) {
        Ok(p) => Ok(p),
        Err(err) => {
            let key = params
                .iter()
                .find(|(k, v)| {
                    let mut one = Map::new();
                    one.insert((*k).clone(), (*v).clone());
                    serde_json::from_value::<T>(Value::Object(one)).is_err()
                })
                .map_or_else(|| "?".to_string(), |(k, _)| k.clone());
            Err(RewardError::Param {
                reward: reward.to_string(),
                key,
                message: err.to_string(),
            })
        }
    }
}

/// A parameter error for a value that deserialized but is out of range.
pub(crate) fn bad_param(reward: &str, key: &str, message: impl Into<String>) -> RewardError {
    RewardError::Param {
        reward: reward.to_string(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// One `[[reward]]` table: `name`, `weight` (default 1.0) and the reward's own parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Map<String, Value>")]
pub struct RewardSpec {
    /// Registered name, e.g. `"accuracy"`.
    pub name: String,
    /// Weight in the combined total.
    pub weight: f32,
    /// The remaining keys of the table, handed to the reward's builder.
    pub params: Map<String, Value>,
}

impl RewardSpec {
    /// A spec with no parameters.
    pub fn new(name: impl Into<String>, weight: f32) -> Self {
        RewardSpec {
            name: name.into(),
            weight,
            params: Map::new(),
        }
    }
}

impl TryFrom<Map<String, Value>> for RewardSpec {
    type Error = String;

    fn try_from(mut table: Map<String, Value>) -> Result<Self, String> {
        let name = match table.remove("name") {
            Some(Value::String(s)) => s,
            Some(other) => return Err(format!("`name` must be a string, found {other}")),
            None => {
                return Err(format!(
                    "missing `name`; valid names are: {}",
                    reward_names().join(", ")
                ));
            }
        };
        let weight = match table.remove("weight") {
            None => 1.0,
            Some(Value::Number(n)) => n.as_f64().map_or(1.0, |w| w as f32),
            Some(other) => {
                return Err(format!(
                    "reward `{name}`: `weight` must be a number, found {other}"
                ));
            }
        };
        Ok(RewardSpec {
            name,
            weight,
            params: table,
        })
    }
}

/// The combined score of one completion, and every component for logging.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardBreakdown {
    /// Σ weight × reward score, with `None` scores counted as 0 (extra components of a reward,
    /// such as `command/a`, are logged here but not added: the reward's own score is their sum).
    pub total: f32,
    /// `(name, score)` in [`CombinedReward::names`] order; `None` where the reward does not apply.
    pub components: Vec<(String, Option<f32>)>,
}

/// One weighted reward and the names it is logged under.
struct Part {
    reward: Box<dyn Reward>,
    weight: f32,
    /// The reward's name, then `name/component` for each of its components.
    labels: Vec<String>,
}

/// A weighted sum of rewards, built from config.
pub struct CombinedReward {
    parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardsFile {
    #[serde(default)]
    reward: Vec<RewardSpec>,
}

/// Errors while scoring through the infallible [`CombinedReward::score`] go to stderr (the first
/// few); [`CombinedReward::score_batch`] returns them instead.
fn warn(e: &RewardError) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 10 {
        eprintln!("warning: {e} (scored as null)");
    }
}

impl CombinedReward {
    /// No rewards (a total of 0); add them with [`Self::add`].
    pub fn new() -> Self {
        CombinedReward { parts: Vec::new() }
    }

    /// Add a built reward with its weight.
    pub fn add(&mut self, reward: Box<dyn Reward>, weight: f32) {
        let mut labels = vec![reward.name().to_string()];
        labels.extend(
            reward
                .components()
                .iter()
                .map(|c| format!("{}/{c}", reward.name())),
        );
        self.parts.push(Part {
            reward,
            weight,
            labels,
        });
    }

    /// Build every spec; the first bad one is the error.
    pub fn from_specs(specs: &[RewardSpec]) -> Result<Self, RewardError> {
        let mut combined = CombinedReward::new();
        for s in specs {
            combined.add(build_reward(&s.name, &s.params)?, s.weight);
        }
        Ok(combined)
    }

    /// Build from TOML text holding `[[reward]]` tables (and nothing else).
    pub fn from_toml(text: &str) -> Result<Self, RewardError> {
        let file: RewardsFile =
            toml::from_str(text).map_err(|e| RewardError::Toml(e.to_string()))?;
        Self::from_specs(&file.reward)
    }

    /// Rewards given by name only (weight 1, default parameters), as the CLI's `--rewards a,b`.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, RewardError> {
        let specs: Vec<RewardSpec> = names
            .iter()
            .map(|n| RewardSpec::new(n.as_ref().trim(), 1.0))
            .collect();
        Self::from_specs(&specs)
    }

    /// Component names in order: each reward's name, followed by `name/component` for each
    /// component of a reward that reports several (`command` with `components = […]`).
    pub fn names(&self) -> Vec<&str> {
        self.parts
            .iter()
            .flat_map(|p| p.labels.iter().map(String::as_str))
            .collect()
    }

    fn push(part: &Part, scores: Scores, total: &mut f32, out: &mut Vec<(String, Option<f32>)>) {
        *total += part.weight * scores.value.unwrap_or(0.0);
        out.push((part.labels[0].clone(), scores.value));
        for (i, label) in part.labels[1..].iter().enumerate() {
            out.push((label.clone(), scores.components.get(i).copied().flatten()));
        }
    }

    /// Score one completion with every component. Never fails: a reward that fails (see
    /// [`Self::score_batch`]) scores `None`, with a warning on stderr.
    pub fn score(&self, sample: &Sample, completion: &Completion<'_>) -> RewardBreakdown {
        let mut total = 0.0f32;
        let mut components = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            let scores = if part.labels.len() == 1 {
                Scores::single(part.reward.score(sample, completion))
            } else {
                match part.reward.score_batch(&[(sample, *completion)]) {
                    Ok(mut v) if !v.is_empty() => v.swap_remove(0),
                    Ok(_) => Scores::default(),
                    Err(e) => {
                        warn(&e);
                        Scores::default()
                    }
                }
            };
            Self::push(part, scores, &mut total, &mut components);
        }
        RewardBreakdown { total, components }
    }

    /// Score a batch (a GRPO step's completions): each reward sees the whole batch, so those
    /// that run programs run them in parallel. The first reward failure is the error.
    pub fn score_batch(
        &self,
        items: &[(&Sample, Completion<'_>)],
    ) -> Result<Vec<RewardBreakdown>, RewardError> {
        let mut out: Vec<RewardBreakdown> = (0..items.len())
            .map(|_| RewardBreakdown {
                total: 0.0,
                components: Vec::with_capacity(self.parts.len()),
            })
            .collect();
        for part in &self.parts {
            let scores = part.reward.score_batch(items)?;
            if scores.len() != items.len() {
                return Err(RewardError::Runtime {
                    reward: part.labels[0].clone(),
                    message: format!("{} scores for {} completions", scores.len(), items.len()),
                });
            }
            for (b, s) in out.iter_mut().zip(scores) {
                Self::push(part, s, &mut b.total, &mut b.components);
            }
        }
        Ok(out)
    }

    /// [`Self::score_batch`] that never fails: a failing reward scores `None` for the whole
    /// batch, with a warning on stderr.
    pub fn score_batch_lossy(&self, items: &[(&Sample, Completion<'_>)]) -> Vec<RewardBreakdown> {
        let mut out: Vec<RewardBreakdown> = (0..items.len())
            .map(|_| RewardBreakdown {
                total: 0.0,
                components: Vec::with_capacity(self.parts.len()),
            })
            .collect();
        for part in &self.parts {
            let scores = match part.reward.score_batch(items) {
                Ok(s) if s.len() == items.len() => s,
                Ok(_) => vec![Scores::default(); items.len()],
                Err(e) => {
                    warn(&e);
                    vec![Scores::default(); items.len()]
                }
            };
            for (b, s) in out.iter_mut().zip(scores) {
                Self::push(part, s, &mut b.total, &mut b.components);
            }
        }
        out
    }
}

impl Default for CombinedReward {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CombinedReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|p| (p.reward.name(), p.weight)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_reward_and_key() {
        let e = CombinedReward::from_toml("[[reward]]\nname = \"acuracy\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("acuracy") && e.contains("accuracy, format"),
            "{e}"
        );
        let e = CombinedReward::from_toml("[[reward]]\nname = \"format\"\nmod = \"strict\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`format`") && e.contains("`mod`"), "{e}");
        let e = CombinedReward::from_toml("[[reward]]\nname = \"length\"\nmax_len = \"long\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`length`") && e.contains("`max_len`"), "{e}");
        let e = CombinedReward::from_toml("[[reward]]\nweight = 1.0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing `name`"), "{e}");
    }

    #[test]
    fn none_counts_as_zero() {
        let c = CombinedReward::from_names(&["format", "countdown"]).unwrap();
        let s = Sample::new();
        let b = c.score(
            &s,
            &Completion::new("<think>\na\n</think>\n<answer>\nb\n</answer>"),
        );
        assert_eq!(b.total, 1.0);
        assert_eq!(
            b.components,
            vec![("format".into(), Some(1.0)), ("countdown".into(), None)]
        );
    }
}
