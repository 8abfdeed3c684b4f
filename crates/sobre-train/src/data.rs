//! Between the config's `[data]`/`[tokenizer]`/`[template]` and token ids: samples, the
//! tokenizer, the template, and the deterministic order prompts are drawn in.

use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use sobre_data::tasks::{self, Split, TaskConfig};
use sobre_data::template::ChatTemplate;
use sobre_data::tokenizer::SpecialTokens;
use sobre_data::tokenizer::{TrainOptions, training_texts};
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::{GenerationConfig, ModelConfig};

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
        Some("functions") => Some(TaskConfig::Functions(cfg.data.functions.clone())),
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
    let mut demos_from_task = None;
    let (train, mut eval) = match (&cfg.data.dataset, task_config(cfg)) {
        (Some(d), _) => (load(d)?, vec![]),
        (None, Some(task)) => {
            let sft_size = cfg.data.sft_size.unwrap_or(0);
            let mut train = tasks::generate(
                &task,
                Split::Train,
                sft_size + cfg.data.train_size,
                seed,
                true,
            )
            .map_err(|e| data_err("task", e))?;
            if sft_size > 0 {
                // Demonstrations first, then prompts that carry only what the verifier needs.
                let prompts = train.split_off(sft_size);
                demos_from_task = Some(train);
                train = prompts
                    .into_iter()
                    .map(|s| Sample {
                        completion: None,
                        ..s
                    })
                    .collect();
            }
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
    let demos = match (&cfg.data.sft_dataset, demos_from_task) {
        (Some(d), _) => load(d)?,
        (None, Some(demos)) => demos,
        (None, None) => train
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
    // Demonstrations first: they hold the completion text (tags, reasoning) that prompts lack.
    for s in data
        .demos
        .iter()
        .chain(&data.train)
        .take(cfg.tokenizer.train_samples.max(1))
    {
        texts.extend(training_texts(s, template).map_err(|e| data_err("template", e))?);
    }
    let opts = TrainOptions {
        vocab_size: cfg.tokenizer.vocab_size,
        min_frequency: cfg.tokenizer.min_frequency,
        added_tokens: cfg.tokenizer.added_tokens.clone(),
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

/// The `[model] preset`'s config with its shape overrides, the tokenizer's eos/pad ids and the
/// `[model]` overrides (router aux-loss coefficient, aux-loss-free bias and its rate) applied;
/// the caller sets the vocabulary size. Errors name an unknown preset or a bad shape.
pub fn preset_config(cfg: &Config, special: &SpecialTokens) -> Result<ModelConfig, TrainError> {
    let m = &cfg.model;
    let mut mc = m.preset_shape()?;
    mc.eos_token_id = vec![special.eos];
    mc.pad_token_id = Some(special.pad);
    if let Some(r) = m.router_aux_loss_coef {
        mc.router_aux_loss_coef = r;
    }
    if let Some(b) = m.aux_loss_free_bias {
        mc.aux_loss_free_bias = b;
    }
    if let Some(r) = m.bias_update_rate {
        mc.bias_update_rate = r;
    }
    Ok(mc)
}

/// Make a model's token ids those of the run's tokenizer, so the `config.json` and
/// `generation_config.json` of every checkpoint agree with its `tokenizer.json`:
/// `eos_token_id` = the tokenizer's eos first, then the model's own eos ids, then those of the
/// model directory's `generation_config.json` (HF chat models stop on several, e.g. Qwen's
/// `<|im_end|>` and `<|endoftext|>`; generation stops on every one of them);
/// `pad_token_id` = the tokenizer's pad (its eos when it has none, as the trainer pads with it);
/// `bos_token_id` = the tokenizer's bos, or the model's when the tokenizer names none (Qwen
/// tokenizers add no bos but their configs keep one).
pub fn align_token_ids(
    cfg: &mut ModelConfig,
    special: &SpecialTokens,
    generation: Option<&GenerationConfig>,
) {
    let mut eos = vec![special.eos];
    for &id in cfg
        .eos_token_id
        .iter()
        .chain(generation.map_or(&[][..], |g| &g.eos_token_id[..]))
    {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    cfg.eos_token_id = eos;
    cfg.pad_token_id = Some(special.pad);
    cfg.bos_token_id = special
        .bos
        .or(cfg.bos_token_id)
        .or(generation.and_then(|g| g.bos_token_id));
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
    use sobre_model::{Batch, ForwardOptions, load_model};

    fn chat_fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../sobre-model/tests/fixtures/qwen3_moe_chat_tiny")
    }

    fn chat_config() -> Config {
        let text = format!(
            "[model]\npath = {:?}\n[template]\nname = \"chat\"\n[data]\ntask = \"countdown\"\n",
            chat_fixture().display().to_string()
        );
        Config::parse(&text, "t.toml", &[]).unwrap().0
    }

    /// The HF chat fixture (scripts/make_hf_fixtures.py): sobre renders its countdown prompt with
    /// the model's own chat template to the text transformers' `apply_chat_template` gave, the
    /// training path (`encode_prompt`) encodes it to the same ids, and the model computes the same
    /// logits at the recorded positions.
    #[test]
    fn chat_fixture_prompt_ids_and_logits_match_transformers() {
        let dir = chat_fixture();
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let cfg = chat_config();
        let template = build_template(&cfg, None).unwrap();
        let data = RunData {
            train: vec![],
            eval: vec![],
            demos: vec![],
        };
        let tok = build_tokenizer(&cfg, &data, &template, None).unwrap();
        let sample = Sample {
            prompt: sobre_data::Prompt::Text(reference["prompt"].as_str().unwrap().to_string()),
            answer: None,
            completion: None,
            fields: Default::default(),
        };
        assert_eq!(
            template.render(&sample.prompt).unwrap(),
            reference["rendered"].as_str().unwrap()
        );
        let ids = encode_prompt(&tok, &template, &sample).unwrap();
        let want: Vec<u32> = reference["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want);
        assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
        assert_eq!(tok.vocab_size(), 322);
        assert_eq!(tok.special().eos, tok.token_to_id("<|im_end|>").unwrap());

        let model = load_model(&dir, &sobre_model::default_device()).unwrap();
        let out = model.forward(
            &Batch::left_padded(std::slice::from_ref(&ids), 0),
            None,
            ForwardOptions::default(),
        );
        let logits = out.logits.try_into_vec_as::<f32>().unwrap();
        let vocab = model.config.vocab_size;
        assert_eq!(logits.len(), ids.len() * vocab);
        let mut worst = 0.0f32;
        for (p, row) in reference["positions"]
            .as_array()
            .unwrap()
            .iter()
            .zip(reference["logits"].as_array().unwrap())
        {
            let p = p.as_u64().unwrap() as usize;
            for (j, w) in row.as_array().unwrap().iter().enumerate() {
                worst = worst.max((logits[p * vocab + j] - w.as_f64().unwrap() as f32).abs());
            }
        }
        assert!(worst < 1e-4, "max |logit − transformers| = {worst:e}");
    }

    /// Token ids of an HF model directory are made those of the run's tokenizer, keeping the
    /// model's and generation_config's other eos ids.
    #[test]
    fn align_token_ids_puts_the_tokenizer_first_and_keeps_hf_eos_ids() {
        let dir = chat_fixture();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let generation = GenerationConfig::from_dir(&dir).unwrap().unwrap();
        assert_eq!(generation.eos_token_id, vec![320, 0]);
        let mut mc = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(mc.eos_token_id, vec![320]);
        align_token_ids(&mut mc, tok.special(), Some(&generation));
        assert_eq!(mc.eos_token_id, vec![320, 0]);
        assert_eq!(mc.pad_token_id, Some(0));
        assert_eq!(mc.bos_token_id, Some(0));
        // A trained sobre tokenizer (eos 0, pad 1) on the same model: its ids come first.
        let trained = Tokenizer::train(
            ["Using the numbers [1, 2, 3] make 6"].iter(),
            &sobre_data::tokenizer::TrainOptions {
                vocab_size: 262,
                ..Default::default()
            },
        )
        .unwrap();
        let mut mc = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        align_token_ids(&mut mc, trained.special(), None);
        assert_eq!(mc.eos_token_id, vec![0, 320]);
        assert_eq!(mc.pad_token_id, Some(1));
    }

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
