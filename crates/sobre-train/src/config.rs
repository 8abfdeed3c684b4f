//! The run configuration: one TOML file, every default in one place, validated before any work.
//!
//! Parsing goes in three passes so every error can point at something a user can fix:
//! 1. the file's own text through `toml`'s deserializer, so syntax errors, unknown keys and
//!    wrong types carry the file's line and column (an unknown key also gets the closest valid
//!    key of its section, by edit distance);
//! 2. `--set section.key=value` overrides applied to the parsed document (each value parsed as a
//!    TOML value, falling back to a string), then deserialised again; errors name the `--set`;
//! 3. [`Config::validate`] checks values (ranges, divisibility, registered names) and names the
//!    file, line and key, found by scanning the text for the key under its section header.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sobre_data::DatasetConfig;
use sobre_data::tasks::{ArithmeticConfig, CountdownConfig, FunctionsConfig};
use sobre_rollout::SamplingParams;

/// A configuration error, located where it can be.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {key}{msg}", key = key_prefix(.key))]
pub struct ConfigError {
    /// `file:line:col`, `file`, or `--set a.b=v`.
    pub origin: String,
    /// Dotted key (`grpo.group_size`), when known.
    pub key: Option<String>,
    pub msg: String,
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("`{k}`: ")).unwrap_or_default()
}

/// `[model]`: what to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct ModelSection {
    /// A built-in architecture (`tiny`, `small`, `w1`), initialised from `seed`. Its vocabulary
    /// is resized to the tokenizer's.
    pub preset: Option<String>,
    /// An HF model directory to start from (overrides `preset`).
    pub path: Option<PathBuf>,
    /// Initialisation seed of a preset (default: `run.seed`).
    pub seed: Option<u64>,
    /// Override the model's `router_aux_loss_coef` (Switch balance loss weight; 0 = off).
    pub router_aux_loss_coef: Option<f64>,
    /// Override the model's `aux_loss_free_bias` (DeepSeek-V3 bias balancing).
    pub aux_loss_free_bias: Option<bool>,
    /// Override the model's `bias_update_rate`.
    pub bias_update_rate: Option<f64>,
    /// Shape overrides of a preset, by their `config.json` names (as transformers'
    /// `from_config(..., **kwargs)`): a preset with `hidden_size = 256` is that preset made
    /// wider. Not allowed with `path` (a model directory's shape is its weights').
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    /// The dense MLP's width (dense layers and shared experts).
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    /// How the frozen models (the GRPO reference, the distillation teacher) store their
    /// weight matrices: `f32` (the default) or `bf16`, half the memory, computing in `f32`
    /// (the trained model and AdamW stay `f32`). The CPU (flex) device only.
    pub frozen_dtype: Option<String>,
}

impl ModelSection {
    /// `model.frozen_dtype = "bf16"`.
    pub fn frozen_bf16(&self) -> bool {
        self.frozen_dtype.as_deref() == Some("bf16")
    }

    /// The shape overrides that are set, as `(key, value)`.
    pub fn shape_overrides(&self) -> Vec<(&'static str, usize)> {
        [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    /// The preset (`tiny` when none is named) with the shape overrides applied, validated.
    pub fn preset_shape(&self) -> Result<sobre_model::ModelConfig, sobre_model::ModelError> {
        let mut mc = sobre_model::ModelConfig::preset(self.preset.as_deref().unwrap_or("tiny"))?;
        let m = self;
        for (field, v) in [
            (&mut mc.hidden_size, m.hidden_size),
            (&mut mc.num_hidden_layers, m.num_hidden_layers),
            (&mut mc.num_attention_heads, m.num_attention_heads),
            (&mut mc.num_key_value_heads, m.num_key_value_heads),
            (&mut mc.head_dim, m.head_dim),
            (&mut mc.intermediate_size, m.intermediate_size),
            (&mut mc.moe_intermediate_size, m.moe_intermediate_size),
            (&mut mc.num_experts, m.num_experts),
            (&mut mc.num_experts_per_tok, m.num_experts_per_tok),
        ] {
            if let Some(v) = v {
                *field = v;
            }
        }
        mc.validate("[model]")?;
        Ok(mc)
    }
}

/// `[tokenizer]`: load one, or train a byte-level BPE on the training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// A directory with `tokenizer.json` (default: the model directory when `model.path` is set,
    /// else a tokenizer is trained).
    pub path: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer (≥ 262).
    pub vocab_size: usize,
    pub min_frequency: u64,
    /// Training samples whose texts (rendered prompt, answer, demonstration) train it.
    pub train_samples: usize,
    /// Tokens a trained tokenizer keeps whole besides the R1 tags: a tool's markers, e.g.
    /// `["<calc>", "</calc>", "<result>", "</result>"]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub added_tokens: Vec<String>,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        TokenizerSection {
            path: None,
            vocab_size: 512,
            min_frequency: 2,
            train_samples: 2000,
            added_tokens: vec![],
        }
    }
}

/// `[data]`: prompts for GRPO, demonstrations for SFT, held-out problems for evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A task generator: `countdown`, `arithmetic` or `functions` (used when `dataset` is not set).
    pub task: Option<String>,
    /// Options of the countdown generator.
    pub countdown: CountdownConfig,
    /// Options of the arithmetic generator.
    pub arithmetic: ArithmeticConfig,
    /// Options of the functions generator (tiny programming problems for the `code` reward).
    pub functions: FunctionsConfig,
    /// Generated training problems. Without `sft_size` each carries its solver-written
    /// demonstration, and SFT trains on those same problems.
    pub train_size: usize,
    /// Generated SFT demonstrations, drawn from the train split apart from the `train_size` GRPO
    /// prompts, which then carry no solution (R1's recipe: scarce demonstrations, then RL on
    /// fresh problems with only the verifier). Unset: SFT uses the prompts' own solutions.
    pub sft_size: Option<usize>,
    /// Generated held-out problems.
    pub eval_size: usize,
    /// Generator seed (default: `run.seed`).
    pub seed: Option<u64>,
    /// A JSONL/Parquet training set instead of a generator.
    pub dataset: Option<DatasetConfig>,
    /// A held-out set for evaluation (default: the generator's eval split).
    pub eval_dataset: Option<DatasetConfig>,
    /// SFT demonstrations (rows with `completion`; default: the training rows that have one).
    pub sft_dataset: Option<DatasetConfig>,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            task: None,
            countdown: CountdownConfig::default(),
            arithmetic: ArithmeticConfig::default(),
            functions: FunctionsConfig::default(),
            train_size: 2000,
            sft_size: None,
            eval_size: 200,
            seed: None,
            dataset: None,
            eval_dataset: None,
            sft_dataset: None,
        }
    }
}

/// `[template]`: how a sample's prompt becomes model text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSection {
    /// `r1_zero`, `plain`, or `chat` (the tokenizer's `tokenizer_config.json` chat template).
    pub name: String,
}

impl Default for TemplateSection {
    fn default() -> Self {
        TemplateSection {
            name: "r1_zero".into(),
        }
    }
}

/// `[sft]`: the optional cold-start stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftSection {
    /// Optimizer steps (0 = no SFT stage).
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate (the schedule and other AdamW settings come from `[optim]`).
    pub lr: f64,
    /// Warmup steps of the SFT stage.
    pub warmup_steps: usize,
    /// Longest prompt + completion in tokens; longer demonstrations are cut at the end.
    pub max_length: usize,
    /// Learning-rate schedule of the SFT stage: constant, linear or cosine (default:
    /// `optim.schedule`). Lets a run decay SFT to its end and keep GRPO's rate constant.
    pub schedule: Option<String>,
    /// Activation recomputation in SFT's forward and backward, as `grpo.gradient_checkpointing`.
    pub gradient_checkpointing: bool,
}

impl Default for SftSection {
    fn default() -> Self {
        SftSection {
            steps: 0,
            batch_size: 8,
            lr: 1e-4,
            warmup_steps: 0,
            max_length: 1024,
            schedule: None,
            gradient_checkpointing: false,
        }
    }
}

/// `[grpo]`: the RL stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Prompts per step (P).
    pub num_prompts: usize,
    /// Completions per prompt (G, ≥ 2).
    pub group_size: usize,
    /// Policy updates per generation batch (μ); > 1 uses the rollout's logprobs as old ones.
    pub num_iterations: usize,
    /// Completions per optimizer step (0 = all P·G); must divide P·G.
    pub mini_batch_size: usize,
    /// `grpo`, `bnpo`, `dr_grpo`, `dapo`, `gspo`.
    pub loss: String,
    /// Lower clip range: ratio ≥ 1 − epsilon.
    pub epsilon: f64,
    /// Upper clip range (clip-higher, DAPO); default: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// KL coefficient; 0 skips the reference model entirely.
    pub beta: f64,
    /// `k1`, `k2` or `k3`.
    pub kl_estimator: String,
    /// `group` (TRL default), `batch`, or `none` (Dr. GRPO).
    pub scale_rewards: String,
    /// Truncated completions (finish reason `length`) take no part in the loss.
    pub mask_truncated_completions: bool,
    /// Drop groups whose rewards all tie and draw more prompts (DAPO dynamic sampling).
    pub filter_zero_std_groups: bool,
    /// Extra rounds of P prompts drawn to fill the batch when filtering.
    pub max_resample_rounds: usize,
    /// Weight of the MoE balance loss (default: the model's `router_aux_loss_coef`).
    pub aux_loss_coef: Option<f64>,
    /// On-policy distillation: a model directory (same tokenizer as the policy) whose
    /// log-probabilities of the sampled tokens add `teacher_coef · (log π_teacher − log
    /// π_sampler)` to each token's advantage ([`crate::distill`]).
    pub teacher: Option<PathBuf>,
    /// Weight of the teacher's per-token signal (default 1).
    pub teacher_coef: Option<f64>,
    /// The teacher's signal alone, without the verifier's advantage (pure distillation).
    pub teacher_only: bool,
    /// Activation recomputation in the policy update (transformers' gradient checkpointing):
    /// each decoder layer keeps only its input and runs again in the backward. Peak activation
    /// memory drops to about one layer's, for a second forward's time; the prompt is then laid
    /// out once per completion (no shared-prefix cache in the update).
    pub gradient_checkpointing: bool,
}

impl Default for GrpoSection {
    fn default() -> Self {
        GrpoSection {
            num_prompts: 8,
            group_size: 8,
            num_iterations: 1,
            mini_batch_size: 0,
            loss: "grpo".into(),
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            kl_estimator: "k3".into(),
            scale_rewards: "group".into(),
            mask_truncated_completions: false,
            filter_zero_std_groups: false,
            max_resample_rounds: 3,
            aux_loss_coef: None,
            teacher: None,
            teacher_coef: None,
            teacher_only: false,
            gradient_checkpointing: false,
        }
    }
}

/// `[optim]`: AdamW and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    /// Decoupled weight decay; never applied to 1-D parameters (norms, biases).
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub warmup_steps: usize,
    /// `constant`, `linear` or `cosine` (after warmup).
    pub schedule: String,
    /// Final learning rate as a fraction of `lr` (linear, cosine).
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 1e-5,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_steps: 0,
            schedule: "constant".into(),
            min_lr_ratio: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// `[run]`: length, seed, where results go, how often to save and log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// GRPO steps.
    pub steps: usize,
    pub seed: u64,
    pub out_dir: PathBuf,
    /// Checkpoint every N GRPO steps (0 = only at the end).
    pub save_every: usize,
    /// Step checkpoints kept (the newest ones).
    pub keep_last: usize,
    /// One summary line every N steps.
    pub log_every: usize,
    /// Completions written to `samples.jsonl` per step.
    pub samples_per_step: usize,
    /// Threads of rayon's global pool (0 = all cores): tokenizer training. Not the tensor ops':
    /// sobre builds the CPU backend without its rayon feature, so each op runs on the thread
    /// that calls it, and `data_parallel_size` is what puts a run on more cores.
    pub threads: usize,
    /// Model replicas working at once on contiguous shards of every batch, one thread each:
    /// generation, the reference forward, and the policy's forward + backward, whose gradients
    /// are summed before the optimizer step (SFT and GRPO alike). The CPU backend runs each op
    /// on its calling thread (splitting ops across cores as well measured slower beside
    /// replicas, docs/PERF.md item 8), so this is how a run uses more than one core. Results depend on this value (each shard pads to its own length, and
    /// sums gradients in its own order), not on `threads` or the machine.
    pub data_parallel_size: usize,
    /// How the run's processes are started: `"auto"` (MPI's world when an MPI launcher
    /// started this process, else one process), `"mpi"` (MPI's world, or an error when this
    /// build lacks the `mpi` feature), `"local"` (one process, whatever the environment says).
    /// Each rank holds `data_parallel_size` replicas; a batch is cut into ranks × replicas
    /// shards (docs/SCALE.md).
    pub launcher: String,
    /// Non-finite losses or gradients in a row that stop the run.
    pub max_consecutive_nonfinite: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Also write every metrics.jsonl scalar as TensorBoard event files under `tensorboard/`
    /// in the run directory (`tensorboard --logdir runs/`).
    pub tensorboard: bool,
    /// Watts drawn per busy core, for the run's energy *estimate* (CPU-seconds × this), as
    /// CodeCarbon estimates from a TDP when no meter is available. Measured RAPL energy is
    /// reported beside it where `/sys/class/powercap` exists.
    pub watts_per_core: f64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            steps: 100,
            seed: 42,
            out_dir: PathBuf::from("runs/run"),
            save_every: 50,
            keep_last: 2,
            log_every: 1,
            samples_per_step: 2,
            threads: 0,
            data_parallel_size: 1,
            launcher: "auto".into(),
            max_consecutive_nonfinite: 3,
            progress: true,
            tensorboard: true,
            watts_per_core: 10.0,
        }
    }
}

/// `[eval]`: held-out pass@1 every `eval_every` steps (greedy unless `temperature` > 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// 0 = no evaluation during training.
    pub eval_every: usize,
    /// Held-out problems per evaluation.
    pub n: usize,
    /// Sampling seed (default: `run.seed`).
    pub seed: Option<u64>,
    /// Completions written to `eval_samples.jsonl` per evaluation.
    pub samples: usize,
    pub temperature: f32,
    /// New tokens per completion (default: `rollout.max_new_tokens`).
    pub max_new_tokens: Option<usize>,
    /// Reward component whose score ≥ 1 counts as solved (default: `countdown` for the
    /// countdown task, else `accuracy`).
    pub reward: Option<String>,
    /// Completions per held-out problem (the k of `pass@k` and `maj@k`); `pass@1` is the mean
    /// correctness over them.
    pub samples_per_problem: usize,
    /// When the run finishes, evaluate the SFT checkpoint, the final checkpoint and every
    /// `[eval.compare]` model on the same `n` held-out problems, print a table and write
    /// `final_eval.json`.
    pub at_end: bool,
    /// Baselines for `at_end`: label = a run directory (its newest checkpoint) or a model
    /// directory, relative to the working directory. One that does not exist yet is a row that
    /// says so.
    pub compare: BTreeMap<String, PathBuf>,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            eval_every: 0,
            n: 100,
            seed: None,
            samples: 4,
            temperature: 0.0,
            max_new_tokens: None,
            reward: None,
            samples_per_problem: 1,
            at_end: false,
            compare: BTreeMap::new(),
        }
    }
}

/// `[lora]`: train low-rank adapters instead of the whole model (PEFT's `LoraConfig`; see the
/// README's config reference). Unset keys take PEFT's defaults, or with `adapter` the adapter
/// directory's own values (a key set here must then agree with it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank (PEFT default 8).
    pub r: Option<usize>,
    /// `lora_alpha` (PEFT default 8); the adapters' output is scaled by `alpha / r`.
    pub alpha: Option<f64>,
    /// `lora_dropout` (PEFT default 0): dropout on the adapters' input in training forwards.
    pub dropout: f64,
    /// PEFT module names (default `["q_proj", "v_proj"]`, PEFT's for Llama/Qwen).
    pub target_modules: Option<Vec<String>>,
    /// rsLoRA: scale `alpha / √r`.
    pub use_rslora: Option<bool>,
    /// `default` (A Kaiming-uniform, B zero), `gaussian`, `random` (B random too).
    pub init: Option<String>,
    /// A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to
    /// continue training, on the base model of `[model]`.
    pub adapter: Option<PathBuf>,
    /// How the frozen base's matrices are stored: `"f32"` (default) or `"bf16"` (half their
    /// memory; computation stays f32, and rollouts, the reference and training all read the
    /// same bf16 values, so their log-probabilities still agree).
    pub base_dtype: Option<String>,
}

impl LoraSection {
    /// Whether the frozen base is stored in bf16 (`base_dtype = "bf16"`).
    pub fn base_bf16(&self) -> bool {
        self.base_dtype.as_deref() == Some("bf16")
    }

    /// The adapter settings without `adapter`: each unset key at PEFT's default.
    pub fn resolve(&self) -> sobre_model::LoraConfig {
        sobre_model::LoraConfig {
            r: self.r.unwrap_or(8),
            alpha: self.alpha.unwrap_or(8.0),
            dropout: self.dropout,
            target_modules: self
                .target_modules
                .clone()
                .unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: self.use_rslora.unwrap_or(false),
            init: self
                .init
                .as_deref()
                .and_then(sobre_model::LoraInit::from_name)
                .unwrap_or(sobre_model::LoraInit::Default),
        }
    }

    /// Checks the keys set here against the settings of a loaded adapter: `(key, message)` of
    /// the first that disagrees.
    pub fn disagreement(&self, adapter: &sobre_model::LoraConfig) -> Option<(String, String)> {
        let differs = |key: &str, ours: String, theirs: String| {
            Some((
                format!("lora.{key}"),
                format!("is {ours} but the adapter's adapter_config.json has {theirs}"),
            ))
        };
        if let Some(r) = self.r
            && r != adapter.r
        {
            return differs("r", r.to_string(), adapter.r.to_string());
        }
        if let Some(a) = self.alpha
            && a != adapter.alpha
        {
            return differs("alpha", a.to_string(), adapter.alpha.to_string());
        }
        if let Some(t) = &self.target_modules {
            let (mut a, mut b) = (t.clone(), adapter.target_modules.clone());
            a.sort();
            b.sort();
            if a != b {
                return differs(
                    "target_modules",
                    format!("{t:?}"),
                    format!("{:?}", adapter.target_modules),
                );
            }
        }
        if let Some(u) = self.use_rslora
            && u != adapter.use_rslora
        {
            return differs("use_rslora", u.to_string(), adapter.use_rslora.to_string());
        }
        None
    }
}

/// A whole run. `[[reward]]` tables go to `sobre_reward::CombinedReward`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub model: ModelSection,
    pub tokenizer: TokenizerSection,
    pub data: DataSection,
    pub template: TemplateSection,
    pub sft: SftSection,
    pub rollout: SamplingParams,
    pub grpo: GrpoSection,
    pub optim: OptimSection,
    pub run: RunSection,
    pub eval: EvalSection,
    /// `[lora]`: train adapters on a frozen base (absent: train every parameter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    /// `[tools]`: tools the completions may call during rollouts and evaluation
    /// (`sobre_reward::tools`; absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<sobre_reward::tools::ToolParams>,
    /// `[[reward]] name = "…" weight = …` (default: R1's format + the task's accuracy reward).
    pub reward: Vec<toml::Table>,
    /// `[[stage]] name = "…" kind = "sft" | "grpo" | "rejection_sampling"`: R1's multi-stage
    /// pipeline (see `crate::stages`); absent: `[sft]` then GRPO.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stage: Vec<toml::Table>,
}

/// Where the configuration came from, for error messages and the resolved copy.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
    /// The overrides applied, as given.
    pub overrides: Vec<String>,
}

/// The keys of every section, for "did you mean" on errors that do not list them.
pub const LOSSES: &[&str] = &["grpo", "bnpo", "dr_grpo", "dapo", "gspo"];
pub const KL_ESTIMATORS: &[&str] = &["k1", "k2", "k3"];
pub const SCALE_REWARDS: &[&str] = &["group", "batch", "none"];
pub const SCHEDULES: &[&str] = &["constant", "linear", "cosine"];
pub const TASKS: &[&str] = &["countdown", "arithmetic", "functions"];
pub const TEMPLATES: &[&str] = &["r1_zero", "plain", "chat"];

/// Levenshtein distance (small strings only).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The valid name closest to `name`, if it is close enough to be a typo.
pub fn closest<'a>(name: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (edit_distance(name, v), *v))
        .min()
        .filter(|(d, v)| *d <= (v.len().max(name.len()) / 2).max(2))
        .map(|(_, v)| v)
}

fn one_of(value: &str, valid: &[&str]) -> Result<(), String> {
    if valid.contains(&value) {
        return Ok(());
    }
    let hint = closest(value, valid)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default();
    Err(format!(
        "unknown value `{value}`{hint}; expected one of: {}",
        valid.join(", ")
    ))
}

/// Byte offset → 1-based (line, column).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |p| before.len() - p - 1)
        + 1;
    (line, col)
}

/// Improve serde's "unknown field `x`, expected one of `a`, `b`" with the closest key.
fn suggest(msg: &str) -> String {
    let Some(rest) = msg.split("unknown field `").nth(1) else {
        return msg.to_string();
    };
    let Some(bad) = rest.split('`').next() else {
        return msg.to_string();
    };
    let valid: Vec<&str> = rest
        .split('`')
        .skip(1)
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    match closest(bad, &valid) {
        Some(c) => format!("{} (did you mean `{c}`?)", msg.trim_end()),
        None => msg.to_string(),
    }
}

fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let loc = match e.span() {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            format!("{origin}:{l}:{c}")
        }
        None => origin.to_string(),
    };
    ConfigError {
        origin: loc,
        key: None,
        msg: suggest(e.message()),
    }
}

/// The line of `key` under `[section]` in `text` (1-based), scanning headers and `key =` lines.
pub fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            continue;
        }
        if current == section
            && let Some(rest) = t.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(i + 1);
        }
        // `section.key = v` written at the top level or in a parent table.
        let full = if current.is_empty() {
            dotted.to_string()
        } else {
            dotted
                .strip_prefix(&format!("{current}."))
                .unwrap_or("")
                .to_string()
        };
        if !full.is_empty()
            && full != key
            && let Some(rest) = t.strip_prefix(full.as_str())
            && rest.trim_start().starts_with('=')
        {
            return Some(i + 1);
        }
    }
    // A table named by the key itself (`[data.countdown]`).
    text.lines()
        .position(|l| {
            l.trim()
                .trim_start_matches('[')
                .split(']')
                .next()
                .map(str::trim)
                == Some(dotted)
                && l.trim().starts_with('[')
        })
        .map(|i| i + 1)
}

/// Parse a `--set a.b.c=value` into the document.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let err = |msg: String| ConfigError {
        origin: format!("--set {spec}"),
        key: None,
        msg,
    };
    let (path, raw) = spec
        .split_once('=')
        .ok_or_else(|| err("expected section.key=value".into()))?;
    let path = path.trim();
    let parts: Vec<&str> = path.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(err(
            "expected section.key=value (e.g. grpo.beta=0.04)".into()
        ));
    }
    let value: toml::Value = match format!("v = {}", raw.trim()).parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(err(format!("`{p}` is not a table"))),
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl Config {
    /// Read, override and validate a config file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<(Config, Source), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: path.display().to_string(),
            key: None,
            msg: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// [`Config::load`] on text; `name` is used in error messages.
    pub fn parse(
        text: &str,
        name: &str,
        overrides: &[String],
    ) -> Result<(Config, Source), ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| toml_error(name, text, &e))?;
        if !overrides.is_empty() {
            let mut doc: toml::Table =
                toml::from_str(text).map_err(|e| toml_error(name, text, &e))?;
            for o in overrides {
                apply_override(&mut doc, o)?;
                let t = toml::to_string(&doc).map_err(|e| ConfigError {
                    origin: format!("--set {o}"),
                    key: None,
                    msg: e.to_string(),
                })?;
                cfg = toml::from_str(&t).map_err(|e| ConfigError {
                    origin: format!("--set {o}"),
                    key: None,
                    msg: suggest(e.message()),
                })?;
            }
        }
        let source = Source {
            name: name.to_string(),
            text: text.to_string(),
            overrides: overrides.to_vec(),
        };
        cfg.validate(&source)?;
        Ok((cfg, source))
    }

    /// The config as TOML with every default filled in (`config.toml` of a run).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The reward specs of `[[reward]]`, or the default pair for the task.
    pub fn reward_specs(&self) -> Vec<toml::Table> {
        if !self.reward.is_empty() {
            return self.reward.clone();
        }
        let task_reward = match self.data.task.as_deref() {
            Some("countdown") => "countdown",
            Some("functions") => "code",
            _ => "accuracy",
        };
        let spec = |name: &str, w: f64| {
            let mut t = toml::Table::new();
            t.insert("name".into(), toml::Value::String(name.into()));
            t.insert("weight".into(), toml::Value::Float(w));
            t
        };
        vec![spec(task_reward, 1.0), spec("format", 0.1)]
    }

    /// Build the combined reward. Errors name the table (`[[reward]] #2`), the reward and the
    /// key. Rewards that run programs check them now: `code` that its interpreter runs in the
    /// sandbox, `command` that its program starts.
    pub fn build_rewards(&self) -> Result<sobre_reward::CombinedReward, String> {
        let mut combined = sobre_reward::CombinedReward::new();
        for (at, spec) in self.parsed_reward_specs()? {
            let reward = sobre_reward::build_reward(&spec.name, &spec.params).map_err(at)?;
            combined.add(reward, spec.weight);
        }
        Ok(combined)
    }

    /// What [`Config::build_rewards`] checks, without starting programs (the run does that
    /// once): names, parameters, and that interpreters and verifier programs exist.
    pub fn check_rewards(&self) -> Result<(), String> {
        for (at, spec) in self.parsed_reward_specs()? {
            sobre_reward::check_reward(&spec.name, &spec.params).map_err(at)?;
        }
        Ok(())
    }

    /// Each `[[reward]]` table as a spec, with a function that prefixes an error with the table.
    #[allow(clippy::type_complexity)]
    fn parsed_reward_specs(
        &self,
    ) -> Result<
        Vec<(
            impl Fn(sobre_reward::RewardError) -> String,
            sobre_reward::RewardSpec,
        )>,
        String,
    > {
        let mut out = Vec::new();
        for (i, t) in self.reward_specs().iter().enumerate() {
            let at = move |e: &dyn std::fmt::Display| format!("[[reward]] #{}: {e}", i + 1);
            let v = serde_json::to_value(t).map_err(|e| at(&e))?;
            let spec: sobre_reward::RewardSpec = serde_json::from_value(v).map_err(|e| at(&e))?;
            out.push((move |e: sobre_reward::RewardError| at(&e), spec));
        }
        Ok(out)
    }

    /// The upper clip range.
    pub fn epsilon_high(&self) -> f64 {
        self.grpo.epsilon_high.unwrap_or(self.grpo.epsilon)
    }

    /// Completions per optimizer step.
    pub fn mini_batch(&self) -> usize {
        let total = self.grpo.num_prompts * self.grpo.group_size;
        if self.grpo.mini_batch_size == 0 {
            total
        } else {
            self.grpo.mini_batch_size
        }
    }

    /// The on-policy distillation checks of [`Config::validate`]: the teacher is a model
    /// directory (or a run directory with checkpoints), its settings are used only with it, and
    /// `teacher_only` leaves nothing for dynamic sampling to filter on. (That its tokenizer is
    /// the student's is checked when the GRPO stage loads it, once the student's is known.)
    fn validate_teacher(
        &self,
        fail: &dyn Fn(&str, String) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let g = &self.grpo;
        let Some(dir) = &g.teacher else {
            for (key, set) in [
                ("grpo.teacher_coef", g.teacher_coef.is_some()),
                ("grpo.teacher_only", g.teacher_only),
            ] {
                if set {
                    return fail(
                        key,
                        "has no effect without `grpo.teacher` (a model directory)".into(),
                    );
                }
            }
            return Ok(());
        };
        if let Some(c) = g.teacher_coef
            && !(c > 0.0 && c.is_finite())
        {
            return fail(
                "grpo.teacher_coef",
                format!("must be a finite number > 0, found {c}"),
            );
        }
        if g.teacher_only && g.filter_zero_std_groups {
            return fail(
                "grpo.filter_zero_std_groups",
                "cannot be used with `grpo.teacher_only`: without the verifier's advantage a \
                 group's reward spread carries no signal to filter on"
                    .into(),
            );
        }
        if let Err(e) = crate::compare::resolve_model_dir(dir) {
            return fail("grpo.teacher", e.to_string());
        }
        Ok(())
    }

    /// The `[lora]` checks of [`Config::validate`]: values, module names, and that the model
    /// of `[model]` has every target module (read from its config, before any work).
    fn validate_lora(
        &self,
        l: &LoraSection,
        fail: &dyn Fn(&str, String) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        if l.r == Some(0) {
            return fail(
                "lora.r",
                "must be at least 1 (the adapters' rank), found 0".into(),
            );
        }
        if let Some(a) = l.alpha
            && !(a.is_finite() && a > 0.0)
        {
            return fail(
                "lora.alpha",
                format!("must be a finite number > 0, found {a}"),
            );
        }
        if !(l.dropout.is_finite() && (0.0..1.0).contains(&l.dropout)) {
            return fail(
                "lora.dropout",
                format!("must be in [0, 1), found {}", l.dropout),
            );
        }
        if let Some(init) = &l.init
            && let Err(m) = one_of(init, sobre_model::LoraInit::NAMES)
        {
            return fail("lora.init", m);
        }
        if let Some(d) = &l.base_dtype
            && let Err(m) = one_of(d, &["f32", "bf16"])
        {
            return fail("lora.base_dtype", m);
        }
        if let Some(t) = &l.target_modules {
            if t.is_empty() {
                return fail(
                    "lora.target_modules",
                    "is empty: name at least one module (e.g. [\"q_proj\", \"v_proj\"])".into(),
                );
            }
            for (i, name) in t.iter().enumerate() {
                if let Err(m) = sobre_model::lora::check_target_name(name) {
                    let m = m.trim_start_matches("`target_modules`: ").to_string();
                    return fail("lora.target_modules", m);
                }
                if t[..i].contains(name) {
                    return fail("lora.target_modules", format!("`{name}` is listed twice"));
                }
            }
        }
        let resolved = match &l.adapter {
            Some(dir) => {
                if !sobre_model::lora::is_adapter_dir(dir) {
                    return fail(
                        "lora.adapter",
                        format!(
                            "{} is not a LoRA adapter directory (no adapter_config.json)",
                            dir.display()
                        ),
                    );
                }
                let c = match sobre_model::lora::read_adapter_config(dir) {
                    Ok((c, _)) => c,
                    Err(e) => return fail("lora.adapter", e.to_string()),
                };
                if let Some((key, msg)) = l.disagreement(&c) {
                    return fail(&key, msg);
                }
                c
            }
            None => l.resolve(),
        };
        let model = match &self.model.path {
            Some(p) => sobre_model::ModelConfig::from_file(&p.join("config.json")).ok(),
            None => self.model.preset_shape().ok(),
        };
        if let Some(mc) = model {
            let have = sobre_model::lora::available_modules_for_config(&mc);
            let key = if l.adapter.is_some() {
                "lora.adapter"
            } else {
                "lora.target_modules"
            };
            if let Some(t) = resolved
                .target_modules
                .iter()
                .find(|t| !have.contains(&t.as_str()))
            {
                let why = if ["gate_proj", "up_proj", "down_proj"].contains(&t.as_str()) {
                    " (it has no dense MLP or shared expert; LoRA on routed experts is not \
                     supported yet)"
                } else {
                    ""
                };
                return fail(
                    key,
                    format!(
                        "this {} model has no `{t}`{why}; its modules are: {}",
                        mc.family.model_type(),
                        have.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    /// Every value check, section by section, each naming its key; the first failure is the
    /// error, located in the file (the `--set` that gave the value, or the file's line).
    pub fn validate(&self, source: &Source) -> Result<(), ConfigError> {
        let fail = |key: &str, msg: String| {
            let overridden = source
                .overrides
                .iter()
                .rev()
                .find(|o| o.split('=').next().map(str::trim) == Some(key));
            let origin = match (overridden, find_key_line(&source.text, key)) {
                (Some(o), _) => format!("--set {o}"),
                (None, Some(l)) => format!("{}:{l}", source.name),
                (None, None) => source.name.clone(),
            };
            Err(ConfigError {
                origin,
                key: Some(key.to_string()),
                msg,
            })
        };
        self.check_model(&fail)?;
        self.check_data(&fail)?;
        self.check_training(&fail)?;
        self.check_optim_lora_run(&fail)?;
        self.check_eval(&fail)?;
        // [[reward]]
        if let Err(m) = self.check_rewards() {
            return fail("reward", m);
        }
        // [[stage]]: each stage's own config is checked as a whole config.
        if !self.stage.is_empty() {
            crate::stages::plan(self, source)?;
        }
        Ok(())
    }

    /// The `[model]` checks of [`Config::validate`].
    fn check_model(&self, fail: &Fail<'_>) -> Result<(), ConfigError> {
        // [model]
        if let Some(d) = &self.model.frozen_dtype
            && d != "f32"
            && d != "bf16"
        {
            return fail(
                "model.frozen_dtype",
                format!("`{d}` is not a storage type: expected \"f32\" or \"bf16\""),
            );
        }
        if let Some(p) = &self.model.preset
            && let Err(e) = sobre_model::ModelConfig::preset(p)
        {
            return fail("model.preset", e.to_string());
        }
        let shape = self.model.shape_overrides();
        if let Some((key, _)) = shape.first() {
            if self.model.path.is_some() {
                return fail(
                    &format!("model.{key}"),
                    "shape overrides apply to a preset; a model directory's shape is that of its \
                     weights (edit its config.json instead)"
                        .into(),
                );
            }
            if let Err(e) = self.model.preset_shape() {
                return fail(&format!("model.{key}"), e.to_string());
            }
        }
        if let Some(r) = self.model.router_aux_loss_coef {
            nonneg(fail, "model.router_aux_loss_coef", r)?;
        }
        if let Some(r) = self.model.bias_update_rate {
            nonneg(fail, "model.bias_update_rate", r)?;
        }
        if let Some(p) = &self.model.path
            && !p.join("config.json").exists()
        {
            return fail(
                "model.path",
                format!("{} is not a model directory (no config.json)", p.display()),
            );
        }
        if let Some(p) = &self.model.path {
            // Read the model directory's configs now, so a bad key fails before any work with
            // the file and key named (loading the weights checks the tensors later).
            if let Err(e) = sobre_model::ModelConfig::from_file(&p.join("config.json")) {
                return fail("model.path", e.to_string());
            }
            if let Err(e) = sobre_model::GenerationConfig::from_dir(p) {
                return fail("model.path", e.to_string());
            }
            if self.tokenizer.path.is_none() && !p.join("tokenizer.json").exists() {
                return fail(
                    "model.path",
                    format!(
                        "{} has no tokenizer.json: set `[tokenizer] path` to a directory with the \
                         model's tokenizer.json (and tokenizer_config.json)",
                        p.display()
                    ),
                );
            }
        }
        if let Some(p) = &self.tokenizer.path
            && !p.join("tokenizer.json").exists()
        {
            return fail(
                "tokenizer.path",
                format!("{} has no tokenizer.json", p.display()),
            );
        }
        Ok(())
    }

    /// The `[tokenizer]`, `[data]` and `[template]` checks of [`Config::validate`].
    fn check_data(&self, fail: &Fail<'_>) -> Result<(), ConfigError> {
        // [tokenizer]
        if self.tokenizer.path.is_none()
            && self.model.path.is_none()
            && self.tokenizer.vocab_size < 262
        {
            return fail(
                "tokenizer.vocab_size",
                format!(
                    "must be at least 262 (256 bytes + special tokens), found {}",
                    self.tokenizer.vocab_size
                ),
            );
        }
        // [data]
        match (&self.data.task, &self.data.dataset) {
            (None, None) => {
                return fail(
                    "data.task",
                    "set `task` (countdown, arithmetic or functions) or a `[data.dataset]` path"
                        .into(),
                );
            }
            (Some(t), _) => {
                if let Err(m) = one_of(t, TASKS) {
                    return fail("data.task", m);
                }
                let r = match t.as_str() {
                    "countdown" => self.data.countdown.validate().map_err(|e| e.to_string()),
                    "functions" => self.data.functions.validate().map_err(|e| e.to_string()),
                    _ => self.data.arithmetic.validate().map_err(|e| e.to_string()),
                };
                if let Err(m) = r {
                    return fail(&format!("data.{t}"), m);
                }
                if self.data.train_size == 0 {
                    return fail("data.train_size", "must be at least 1".into());
                }
                if self.data.sft_size == Some(0) {
                    return fail(
                        "data.sft_size",
                        "must be at least 1 (leave it out to train SFT on the prompts' own solutions)"
                            .into(),
                    );
                }
                if self.data.sft_size.is_some() && self.data.sft_dataset.is_some() {
                    return fail(
                        "data.sft_size",
                        "set either `sft_size` (generated demonstrations) or `[data.sft_dataset]`, not both"
                            .into(),
                    );
                }
            }
            (None, Some(_)) => {
                if self.data.sft_size.is_some() {
                    return fail(
                        "data.sft_size",
                        "generates demonstrations, so it needs `task`; with `[data.dataset]` use `[data.sft_dataset]`"
                            .into(),
                    );
                }
            }
        }
        for (key, d) in [
            ("data.dataset.path", &self.data.dataset),
            ("data.eval_dataset.path", &self.data.eval_dataset),
            ("data.sft_dataset.path", &self.data.sft_dataset),
        ] {
            if let Some(d) = d
                && !d.path.exists()
            {
                return fail(key, format!("{} does not exist", d.path.display()));
            }
        }
        // [template]
        if let Err(m) = one_of(&self.template.name, TEMPLATES) {
            return fail("template.name", m);
        }
        Ok(())
    }

    /// The `[sft]`, `[rollout]` and `[grpo]` checks of [`Config::validate`].
    fn check_training(&self, fail: &Fail<'_>) -> Result<(), ConfigError> {
        // [sft]
        if self.sft.steps > 0 {
            if self.sft.batch_size == 0 {
                return fail("sft.batch_size", "must be at least 1".into());
            }
            pos(fail, "sft.lr", self.sft.lr)?;
            if self.sft.max_length < 2 {
                return fail("sft.max_length", "must be at least 2".into());
            }
        }
        // [rollout]
        if let Err(m) = self.rollout.validate() {
            let key = m.split_whitespace().next().unwrap_or("temperature");
            return fail(&format!("rollout.{key}"), m);
        }
        // [grpo]
        let g = &self.grpo;
        if g.num_prompts == 0 {
            return fail("grpo.num_prompts", "must be at least 1".into());
        }
        if g.group_size < 2 {
            return fail(
                "grpo.group_size",
                format!(
                    "must be at least 2 (advantages compare completions of a prompt), found {}",
                    g.group_size
                ),
            );
        }
        if g.num_iterations == 0 {
            return fail("grpo.num_iterations", "must be at least 1".into());
        }
        let total = g.num_prompts * g.group_size;
        if g.mini_batch_size > 0 && !total.is_multiple_of(g.mini_batch_size) {
            return fail(
                "grpo.mini_batch_size",
                format!(
                    "must divide num_prompts × group_size = {} × {} = {total}, found {}",
                    g.num_prompts, g.group_size, g.mini_batch_size
                ),
            );
        }
        if let Err(m) = one_of(&g.loss, LOSSES) {
            return fail("grpo.loss", m);
        }
        pos(fail, "grpo.epsilon", g.epsilon)?;
        if let Some(h) = g.epsilon_high {
            pos(fail, "grpo.epsilon_high", h)?;
        }
        nonneg(fail, "grpo.beta", g.beta)?;
        if let Err(m) = one_of(&g.kl_estimator, KL_ESTIMATORS) {
            return fail("grpo.kl_estimator", m);
        }
        if let Err(m) = one_of(&g.scale_rewards, SCALE_REWARDS) {
            return fail("grpo.scale_rewards", m);
        }
        if let Some(a) = g.aux_loss_coef {
            nonneg(fail, "grpo.aux_loss_coef", a)?;
        }
        self.validate_teacher(&fail)?;
        if let Some(t) = &self.tools
            && let Err(e) = sobre_reward::tools::ToolBox::new(t.clone())
        {
            return fail(&format!("tools.{}", e.key), e.msg);
        }
        Ok(())
    }

    /// The `[optim]`, `[lora]` and `[run]` checks of [`Config::validate`].
    fn check_optim_lora_run(&self, fail: &Fail<'_>) -> Result<(), ConfigError> {
        // [optim]
        let o = &self.optim;
        pos(fail, "optim.lr", o.lr)?;
        nonneg(fail, "optim.weight_decay", o.weight_decay)?;
        for b in o.betas {
            if !(0.0..1.0).contains(&b) {
                return fail(
                    "optim.betas",
                    format!("each beta must be in [0, 1), found {b}"),
                );
            }
        }
        pos(fail, "optim.eps", o.eps)?;
        if let Some(sched) = &self.sft.schedule
            && let Err(m) = one_of(sched, SCHEDULES)
        {
            return fail("sft.schedule", m);
        }
        if let Err(m) = one_of(&o.schedule, SCHEDULES) {
            return fail("optim.schedule", m);
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return fail(
                "optim.min_lr_ratio",
                format!("must be in [0, 1], found {}", o.min_lr_ratio),
            );
        }
        nonneg(fail, "optim.max_grad_norm", o.max_grad_norm)?;
        // [lora]
        if let Some(l) = &self.lora {
            self.validate_lora(l, fail)?;
        }
        // [run]
        if self.run.keep_last == 0 {
            return fail("run.keep_last", "must be at least 1".into());
        }
        if self.run.data_parallel_size == 0 {
            return fail("run.data_parallel_size", "must be at least 1".into());
        }
        if !["auto", "local", "mpi"].contains(&self.run.launcher.as_str()) {
            return fail(
                "run.launcher",
                format!(
                    "must be \"auto\", \"local\" or \"mpi\", got {:?}",
                    self.run.launcher
                ),
            );
        }
        if self.run.max_consecutive_nonfinite == 0 {
            return fail("run.max_consecutive_nonfinite", "must be at least 1".into());
        }
        if !(self.run.watts_per_core.is_finite() && self.run.watts_per_core >= 0.0) {
            return fail(
                "run.watts_per_core",
                format!(
                    "must be a finite number >= 0, got {}",
                    self.run.watts_per_core
                ),
            );
        }
        Ok(())
    }

    /// The `[eval]` checks of [`Config::validate`].
    fn check_eval(&self, fail: &Fail<'_>) -> Result<(), ConfigError> {
        // [eval]
        if (self.eval.eval_every > 0 || self.eval.at_end) && self.eval.n == 0 {
            return fail(
                "eval.n",
                "must be at least 1 when eval_every > 0 or at_end = true".into(),
            );
        }
        if self.eval.samples_per_problem == 0 {
            return fail("eval.samples_per_problem", "must be at least 1".into());
        }
        if let Some(label) = self
            .eval
            .compare
            .keys()
            .find(|l| *l == "sft" || *l == "final")
        {
            return fail(
                &format!("eval.compare.{label}"),
                "`sft` and `final` are this run's own rows; name the baseline otherwise (e.g. `control`)"
                    .into(),
            );
        }
        if !self.eval.compare.is_empty() && !self.eval.at_end {
            return fail(
                "eval.compare",
                "baselines are evaluated at the end of the run: set `at_end = true`".into(),
            );
        }
        if !(self.eval.temperature >= 0.0 && self.eval.temperature.is_finite()) {
            return fail(
                "eval.temperature",
                format!(
                    "must be a finite number ≥ 0, found {}",
                    self.eval.temperature
                ),
            );
        }
        Ok(())
    }
}

/// How a check reports a bad value: the key and what is wrong, located by [`Config::validate`].
type Fail<'a> = dyn Fn(&str, String) -> Result<(), ConfigError> + 'a;

/// `v` must be a finite number > 0.
fn pos(fail: &Fail<'_>, key: &str, v: f64) -> Result<(), ConfigError> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        fail(key, format!("must be a finite number > 0, found {v}"))
    }
}

/// `v` must be a finite number ≥ 0.
fn nonneg(fail: &Fail<'_>, key: &str, v: f64) -> Result<(), ConfigError> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        fail(key, format!("must be a finite number ≥ 0, found {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_with_a_task() {
        let (cfg, _) = Config::parse("[data]\ntask = \"countdown\"\n", "t.toml", &[]).unwrap();
        assert_eq!(cfg.grpo.group_size, 8);
        // The resolved config round-trips.
        let (again, _) = Config::parse(&cfg.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_key_names_line_and_suggests() {
        let text = "[data]\ntask = \"countdown\"\n\n[grpo]\ngroup_size = 4\nepsilonn = 0.2\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:6:1"), "{e}");
        assert!(e.contains("unknown field `epsilonn`"), "{e}");
        assert!(e.contains("did you mean `epsilon`?"), "{e}");
    }

    #[test]
    fn bad_value_names_file_line_and_key() {
        let text = "[data]\ntask = \"countdown\"\n[grpo]\nnum_prompts = 3\ngroup_size = 1\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("run.toml:5: `grpo.group_size`: must be at least 2"),
            "{e}"
        );
        let text = "[data]\ntask = \"countdown\"\n[grpo]\nnum_prompts = 3\ngroup_size = 4\nmini_batch_size = 5\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("run.toml:6: `grpo.mini_batch_size`: must divide"),
            "{e}"
        );
        let text = "[data]\ntask = \"countdown\"\n[run]\ndata_parallel_size = 0\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("run.toml:4: `run.data_parallel_size`: must be at least 1"),
            "{e}"
        );
        let text =
            "[data]\ntask = \"countdown\"\n[model]\npreset = \"tiny\"\nfrozen_dtype = \"fp16\"\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "run.toml:5: `model.frozen_dtype`: `fp16` is not a storage type: expected \"f32\" or \"bf16\""
            ),
            "{e}"
        );
        // Replicas are a run setting, not a sampling one: `[rollout]` does not take them.
        let text = "[data]\ntask = \"countdown\"\n[rollout]\ndata_parallel_size = 2\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `data_parallel_size`"), "{e}");
        let text = "[data]\ntask = \"countdown\"\n[grpo]\nloss = \"gpro\"\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `grpo`"), "{e}");
    }

    #[test]
    fn overrides_apply_and_are_named_in_errors() {
        let text = "[data]\ntask = \"countdown\"\n";
        let (cfg, _) = Config::parse(
            text,
            "t",
            &["grpo.beta=0.04".into(), "run.out_dir=/tmp/x".into()],
        )
        .unwrap();
        assert_eq!(cfg.grpo.beta, 0.04);
        assert_eq!(cfg.run.out_dir, PathBuf::from("/tmp/x"));
        let e = Config::parse(text, "t", &["grpo.group_size=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--set grpo.group_size=1"), "{e}");
        let e = Config::parse(text, "t", &["grpo.bta=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `beta`"), "{e}");
    }

    #[test]
    fn model_shape_overrides_widen_a_preset_and_errors_name_the_key() {
        let text = "[data]\ntask = \"countdown\"\n[model]\npreset = \"small\"\nhidden_size = 256\nmoe_intermediate_size = 192\n";
        let (cfg, _) = Config::parse(text, "run.toml", &[]).unwrap();
        let mc = cfg.model.preset_shape().unwrap();
        let small = sobre_model::ModelConfig::preset("small").unwrap();
        assert_eq!((mc.hidden_size, mc.moe_intermediate_size), (256, 192));
        // Everything else is the preset's.
        assert_eq!(
            (
                mc.num_hidden_layers,
                mc.num_experts,
                mc.head_dim,
                mc.intermediate_size
            ),
            (
                small.num_hidden_layers,
                small.num_experts,
                small.head_dim,
                small.intermediate_size
            )
        );
        assert_eq!(
            cfg.model.shape_overrides(),
            vec![("hidden_size", 256), ("moe_intermediate_size", 192)]
        );
        // An impossible shape names the key on its line.
        let text =
            "[data]\ntask = \"countdown\"\n[model]\npreset = \"small\"\nnum_experts_per_tok = 9\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("run.toml:5: `model.num_experts_per_tok`"),
            "{e}"
        );
        assert!(e.contains("must be in 1..=8"), "{e}");
        let e = Config::parse(
            "[data]\ntask = \"countdown\"\n",
            "t",
            &["model.num_attention_heads=3".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of `num_key_value_heads`"), "{e}");
        // A model directory's shape is its weights'.
        let dir = tempfile::tempdir().unwrap();
        let mc = sobre_model::ModelConfig::preset("tiny").unwrap();
        std::fs::write(dir.path().join("config.json"), mc.to_json().to_string()).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        let text = format!(
            "[data]\ntask = \"countdown\"\n[model]\npath = {:?}\nhidden_size = 64\n",
            dir.path().display().to_string()
        );
        let e = Config::parse(&text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`model.hidden_size`"), "{e}");
        assert!(e.contains("shape overrides apply to a preset"), "{e}");
    }

    #[test]
    fn bad_reward_is_an_error() {
        let text = "[data]\ntask = \"countdown\"\n[[reward]]\nname = \"acuracy\"\n";
        let e = Config::parse(text, "t", &[]).unwrap_err().to_string();
        assert!(e.contains("reward"), "{e}");
    }

    #[test]
    fn code_and_command_reward_errors_name_the_key() {
        let base = "[data]\ntask = \"countdown\"\n[[reward]]\nname = \"format\"\n[[reward]]\n";
        let e = Config::parse(
            &format!("{base}name = \"code\"\ntimeout_s = \"long\"\n"),
            "t",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("[[reward]] #2") && e.contains("`code`") && e.contains("`timeout_s`"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{base}name = \"code\"\ninterpreter = [\"no-such-python\"]\n"),
            "t",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`interpreter`") && e.contains("no-such-python"),
            "{e}"
        );
        let e = Config::parse(&format!("{base}name = \"command\"\n"), "t", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[[reward]] #2") && e.contains("parameter `command`"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{base}name = \"command\"\ncommand = [\"/no/such/verifier\"]\n"),
            "t",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/no/such/verifier") && e.contains("not found"),
            "{e}"
        );
    }

    #[test]
    fn code_and_command_rewards_build_from_config() {
        if sobre_reward::sandbox::resolve_program("python3").is_none() {
            eprintln!("skipped: python3 not found");
            return;
        }
        let verifier = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/verifier.py");
        let text = format!(
            "[data]\ntask = \"countdown\"\n[[reward]]\nname = \"code\"\ntimeout_s = 2.0\nmemory_mb = 512\n\
             all_or_nothing = true\nmax_concurrency = 4\n[[reward]]\nname = \"command\"\nweight = 0.5\n\
             command = [\"python3\", {verifier:?}]\ncomponents = [\"correct\", \"short\"]\n"
        );
        let (cfg, _) = Config::parse(&text, "t", &[]).unwrap();
        let rewards = cfg.build_rewards().unwrap();
        assert_eq!(
            rewards.names(),
            vec!["code", "command", "command/correct", "command/short"]
        );
        let mut s = sobre_reward::Sample::new();
        s.insert("answer".into(), "7".into());
        s.insert(
            "input_output".into(),
            serde_json::json!({"inputs": ["3 4\n"], "outputs": ["7\n"]}),
        );
        let text = "```python\nprint(sum(map(int, input().split())))\n```\n<answer>7</answer>";
        let out = rewards
            .score_batch(&[(&s, sobre_reward::Completion::new(text))])
            .unwrap();
        assert_eq!(out[0].total, 1.0 + 0.5 * 1.1);
    }

    #[test]
    fn closest_is_edit_distance() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(closest("cosin", SCHEDULES), Some("cosine"));
        assert_eq!(closest("zzzzzzzzzz", SCHEDULES), None);
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn generator_option_errors_point_at_their_table() {
        let text = "[data]\ntask = \"countdown\"\n\n[data.countdown]\nmin_count = 9\n";
        let e = Config::parse(text, "run.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:4: `data.countdown`"), "{e}");
    }
}
