//! Between the config's `[data]`/`[tokenizer]`/`[template]` and token ids: samples, the
//! tokenizer, the template, and the deterministic order prompts are drawn in.

use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use sobre_data::tasks::{self, Split, TaskConfig};
use sobre_data::template::ChatTemplate;
use sobre_data::tokenizer::{TrainOptions, training_texts};
use sobre_data::{Sample, Template, Tokenizer};

use crate::{Config, TrainError};

/// The samples of a run.
#[derive(Debug, Clone)]
pub struct RunData {
    /// GRPO prompts.
    pub train: Vec<Sample>,
    /// Held-out problems.
    pub eval: Vec<Sample>,
    /// SFT demonstrations (samples with a `completion`).
    pub demos: Vec<Sample>,
}

fn data_err(what: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Data(format!("{what}: {e}"))
}

/// The task generator of `[data]`, if any.
pub fn task_config(cfg: &Config) -> Option<TaskConfig> {
    match cfg.data.task.as_deref() {
        Some("countdown") => Some(TaskConfig::Countdown(cfg.data.countdown.clone())),
        Some("arithmetic") => Some(TaskConfig::Arithmetic(cfg.data.arithmetic.clone())),
        _ => None,
    }
}

/// Load or generate the samples `[data]` describes.
pub fn load_data(cfg: &Config) -> Result<RunData, TrainError> {
    let seed = cfg.data.seed.unwrap_or(cfg.run.seed);
    let load = |d: &sobre_data::DatasetConfig| -> Result<Vec<Sample>, TrainError> {
        Ok(sobre_data::dataset::load(d)
            .map_err(|e| data_err(&d.path.display().to_string(), e))?
            .samples)
    };
    let (train, mut eval) = match (&cfg.data.dataset, task_config(cfg)) {
        (Some(d), _) => (load(d)?, vec![]),
        (None, Some(task)) => {
            let train = tasks::generate(&task, Split::Train, cfg.data.train_size, seed, true)
                .map_err(|e| data_err("task", e))?;
            let eval = if cfg.data.eval_size > 0 {
                tasks::generate(&task, Split::Eval, cfg.data.eval_size, seed, false)
                    .map_err(|e| data_err("task", e))?
            } else {
                vec![]
            };
            (train, eval)
        }
        (None, None) => {
            return Err(TrainError::Data(
                "no `[data] task` or `[data.dataset]`".into(),
            ));
        }
    };
    if let Some(d) = &cfg.data.eval_dataset {
        eval = load(d)?;
    }
    let demos = match &cfg.data.sft_dataset {
        Some(d) => load(d)?,
        None => train
            .iter()
            .filter(|s| s.completion.is_some())
            .cloned()
            .collect(),
    };
    if train.is_empty() {
        return Err(TrainError::Data("the training set is empty".into()));
    }
    if cfg.sft.steps > 0 && demos.iter().all(|s| s.completion.is_none()) {
        return Err(TrainError::Data(
            "`[sft] steps > 0` but no sample has a `completion` (set `[data.sft_dataset]`)".into(),
        ));
    }
    Ok(RunData {
        train,
        eval,
        demos: demos
            .into_iter()
            .filter(|s| s.completion.is_some())
            .collect(),
    })
}

/// The tokenizer: from `dir` (a checkpoint or model directory), or trained on the data.
pub fn build_tokenizer(
    cfg: &Config,
    data: &RunData,
    template: &Template,
    dir: Option<&Path>,
) -> Result<Tokenizer, TrainError> {
    if let Some(dir) = dir
        .or(cfg.tokenizer.path.as_deref())
        .or(cfg.model.path.as_deref())
    {
        return Tokenizer::from_dir(dir)
            .map_err(|e| data_err(&format!("tokenizer {}", dir.display()), e));
    }
    let mut texts = Vec::new();
    for s in data
        .train
        .iter()
        .chain(&data.demos)
        .take(cfg.tokenizer.train_samples.max(1))
    {
        texts.extend(training_texts(s, template).map_err(|e| data_err("template", e))?);
    }
    let opts = TrainOptions {
        vocab_size: cfg.tokenizer.vocab_size,
        min_frequency: cfg.tokenizer.min_frequency,
        ..Default::default()
    };
    Tokenizer::train(texts.iter(), &opts).map_err(|e| data_err("training the tokenizer", e))
}

/// The prompt template of `[template]`.
pub fn build_template(cfg: &Config, tokenizer_dir: Option<&Path>) -> Result<Template, TrainError> {
    if cfg.template.name == "chat" {
        let dir = tokenizer_dir
            .or(cfg.tokenizer.path.as_deref())
            .or(cfg.model.path.as_deref())
            .ok_or_else(|| {
                TrainError::Data(
                    "template `chat` needs a tokenizer directory with tokenizer_config.json".into(),
                )
            })?;
        let chat = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))
            .map_err(|e| data_err("chat template", e))?
            .ok_or_else(|| {
                TrainError::Data(format!(
                    "{}: no chat_template",
                    dir.join("tokenizer_config.json").display()
                ))
            })?;
        return Ok(Template::Chat(std::sync::Arc::new(chat)));
    }
    Template::from_name(&cfg.template.name).map_err(|e| data_err("template", e))
}

/// Prompt token ids of a sample.
pub fn encode_prompt(
    tok: &Tokenizer,
    template: &Template,
    s: &Sample,
) -> Result<Vec<u32>, TrainError> {
    let text = template
        .render(&s.prompt)
        .map_err(|e| data_err("template", e))?;
    let mut ids = tok.special().bos.map(|b| vec![b]).unwrap_or_default();
    ids.extend(tok.encode(&text).map_err(|e| data_err("tokenizer", e))?);
    if ids.is_empty() {
        return Err(TrainError::Data("a prompt encodes to no tokens".into()));
    }
    Ok(ids)
}

/// A sample as the rewards see it: its task fields plus `answer` and `prompt`.
pub fn reward_sample(s: &Sample) -> sobre_reward::Sample {
    let mut m = serde_json::Map::new();
    for (k, v) in &s.fields {
        m.insert(k.clone(), v.clone());
    }
    if let Some(a) = &s.answer {
        m.insert("answer".into(), serde_json::Value::String(a.clone()));
    }
    if let Some(p) = s.prompt.user_text() {
        m.insert("prompt".into(), serde_json::Value::String(p.to_string()));
    }
    m
}

/// Decodes completions for the rollout engine (stop strings, texts).
pub struct Detok<'a>(pub &'a Tokenizer);

impl sobre_rollout::Detokenizer for Detok<'_> {
    fn decode(&self, ids: &[u32]) -> String {
        self.0.decode(ids, true).unwrap_or_default()
    }
}

/// SplitMix64 finaliser, to derive independent seeds from (seed, counters).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed derived from a base seed and a list of counters.
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix(seed), |acc, &p| mix(acc ^ mix(p)))
}

/// Which sample comes at position `pos` of an endless stream over `n` samples: each epoch is a
/// fresh permutation drawn from `(seed, epoch)`, so the order is a pure function of the position
/// and a resumed run continues it from the cursor saved in its checkpoint.
#[derive(Debug, Clone)]
pub struct Order {
    n: usize,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Order {
    pub fn new(n: usize, seed: u64) -> Self {
        Order {
            n,
            seed,
            epoch: None,
        }
    }

    pub fn index(&mut self, pos: u64) -> usize {
        let n = self.n.max(1);
        let epoch = (pos / n as u64) as usize;
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, &[epoch as u64]));
            for i in (1..n).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                perm.swap(i, j);
            }
            self.epoch = Some((epoch, perm));
        }
        self.epoch
            .as_ref()
            .map_or(0, |(_, p)| p[(pos % n as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_permutation_per_epoch_and_pure() {
        let mut o = Order::new(5, 7);
        let first: Vec<usize> = (0..5).map(|p| o.index(p)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        let mut fresh = Order::new(5, 7);
        assert_eq!(fresh.index(3), first[3]);
        assert_eq!(o.index(2), first[2]);
    }
}
