//! Held-out evaluation: K samples per problem → pass@1, unbiased pass@k, maj@k, the mean of
//! every reward, the strict-format rate and the mean completion length.
//!
//! `sobre eval` and the trainer's periodic evaluation both call [`evaluate`]; the figures are
//! computed from the per-sample records by [`EvalReport::from_samples`], a pure function the
//! tests check by hand.
//!
//! Definitions (where the literature leaves room, the choice is written here):
//! - **correct**: the sample's *correctness reward* scores ≥ 1.0 — its maximum with default
//!   parameters, and the same rule as the trainer's `accuracy` metric. The correctness reward is
//!   [`EvalOptions::correct_reward`], else `countdown`, `accuracy` or `code`, whichever the
//!   combined reward has (in that order), else the one the problems' fields call for (`nums` and
//!   `target` → `countdown`, code tests → `code`, otherwise `accuracy`), scored with default parameters even when the run does
//!   not weight it. A problem it does not apply to (`None`, e.g. `accuracy` without a gold
//!   answer) counts as not solved.
//! - **pass@1**: mean over problems of c/n (n = K samples, c correct) — the expected accuracy of
//!   one sample at this temperature.
//! - **pass@k** (k = K): Chen et al. (2021)'s unbiased estimator 1 − C(n−c, k)/C(n, k), averaged
//!   over problems; with k = n it is the share of problems with at least one correct sample.
//! - **maj@k**: a majority vote over the K final answers of a problem (see [`answer_key`]: the
//!   last `<answer>` / `\boxed{}` content, LaTeX-normalised, whitespace removed — for countdown
//!   the equation text, so `(1 + 2) * 3` and `(1+2)*3` are one vote); ties go to the answer seen
//!   first; samples without an answer do not vote. The problem counts as solved when the first
//!   sample giving the winning answer is correct (for countdown and math answers all samples
//!   with the same normalised answer get the same verdict). No answer at all: not solved.
//! - **format_rate**: share of samples the strict R1 `format` reward (`<think>\n…\n</think>\n
//!   <answer>\n…\n</answer>`, nothing after) scores 1, computed whatever the run's rewards are.
//! - **rewards**: mean of each component of the combined reward over the samples it applies to
//!   (`null` when it applies to none); **reward_mean**: mean of the weighted total.
//! - **mean_length**: mean completion length in tokens; **truncated_rate**: share of samples that
//!   stopped at `max_new_tokens`.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::prelude::Module;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sobre_data::tasks::{self, Split};
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::MoeModel;
use sobre_reward::{CombinedReward, Reward};
use sobre_rollout::{FinishReason, Prompt, SamplingParams};

use crate::data::{Detok, encode_prompt, reward_sample, task_config};
use crate::metrics::num;
use crate::{Config, TrainError};

/// How to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Completions per problem (K ≥ 1).
    pub samples: usize,
    /// 0 = greedy (then K > 1 repeats the same completion).
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub max_new_tokens: usize,
    /// Sampling seed; each (problem index, sample index) has its own stream, so results do not
    /// depend on `batch_problems`.
    pub seed: u64,
    /// Strings that end a completion (besides the tokenizer's eos).
    pub stop_strings: Vec<String>,
    /// The reward whose score ≥ 1 means "correct" (default: see the module docs).
    pub correct_reward: Option<String>,
    /// Problems per generation batch (0 = all at once); bounds the KV-cache memory.
    pub batch_problems: usize,
    /// Rollout engines decoding shares of each batch at once, a thread each
    /// (`SamplingParams::data_parallel_size`).
    pub data_parallel_size: usize,
    /// Tools the completions may call (the run's `[tools]`): evaluation sees the model as
    /// training rolled it out.
    pub tools: Option<sobre_reward::tools::ToolParams>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            samples: 1,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: 256,
            seed: 0,
            stop_strings: vec![],
            correct_reward: None,
            batch_problems: 64,
            data_parallel_size: 1,
            tools: None,
        }
    }
}

impl EvalOptions {
    /// The `[eval]` section of a run (one sample per problem; truncation and stop strings from
    /// `[rollout]`).
    pub fn from_config(cfg: &Config) -> Self {
        EvalOptions {
            samples: 1,
            temperature: cfg.eval.temperature,
            top_p: cfg.rollout.top_p,
            top_k: cfg.rollout.top_k,
            min_p: cfg.rollout.min_p,
            max_new_tokens: cfg
                .eval
                .max_new_tokens
                .unwrap_or(cfg.rollout.max_new_tokens),
            seed: cfg.eval.seed.unwrap_or(cfg.run.seed),
            stop_strings: cfg.rollout.stop_strings.clone(),
            correct_reward: cfg.eval.reward.clone(),
            batch_problems: 64,
            data_parallel_size: cfg.run.data_parallel_size,
            tools: cfg.tools.clone(),
        }
    }
}

/// One evaluated completion (a line of `samples.jsonl` of `sobre eval --out`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    /// Index of the problem in the evaluated set.
    pub problem: usize,
    /// Index of the sample among the problem's K.
    pub sample: usize,
    /// The problem's prompt (user text, before the template).
    pub prompt: String,
    pub completion: String,
    /// The final answer extracted from the completion, as written.
    pub answer: Option<String>,
    /// Completion length in tokens.
    pub tokens: usize,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Weighted total of the combined reward.
    pub reward: f64,
    /// Each component of the combined reward (`null`: does not apply).
    pub rewards: BTreeMap<String, Option<f64>>,
    pub correct: bool,
    /// The strict R1 format reward is 1.
    pub format: bool,
}

/// The figures of one evaluation (`eval.json`; `sobre eval --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    #[serde(rename = "pass@1")]
    pub pass_at_1: f64,
    /// Unbiased pass@k with k = `samples`.
    #[serde(rename = "pass@k")]
    pub pass_at_k: f64,
    #[serde(rename = "maj@k")]
    pub maj_at_k: f64,
    /// The k of `pass@k` and `maj@k` (= `samples`).
    pub k: usize,
    pub format_rate: f64,
    /// Mean completion length in tokens.
    pub mean_length: f64,
    pub truncated_rate: f64,
    /// Mean weighted total reward.
    pub reward_mean: f64,
    /// Mean of each reward component over the samples it applies to.
    pub rewards: BTreeMap<String, Option<f64>>,
    /// The reward that decides correctness.
    pub correct_reward: String,
    pub n_problems: usize,
    /// Completions per problem (K).
    pub samples: usize,
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Wall time of the evaluation.
    pub seconds: f64,
}

/// The result of [`evaluate`]: the figures and every sample.
#[derive(Debug, Clone)]
pub struct EvalOutput {
    pub report: EvalReport,
    /// Problem-major: problem 0's K samples, then problem 1's, …
    pub samples: Vec<EvalSample>,
}

/// Chen et al. (2021)'s unbiased pass@k for one problem with `n` samples of which `c` are
/// correct: 1 − C(n−c, k)/C(n, k), computed as 1 − ∏_{i=n−c+1}^{n} (1 − k/i) (no overflow).
/// `k` is clamped to `1..=n`; `n = 0` gives 0.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let c = c.min(n);
    let k = k.clamp(1, n);
    if n - c < k {
        return 1.0;
    }
    let prod: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    1.0 - prod
}

/// The key an answer votes with in maj@k: LaTeX-normalised (`sobre_reward`'s math
/// normaliser: `$`, `\left`, spacing commands removed) with all whitespace removed.
pub fn answer_key(answer: &str) -> String {
    sobre_reward::math::parse::normalize(answer)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// The index of the sample whose answer wins the majority vote: the most frequent
/// [`answer_key`], ties to the answer seen first; `None` when no sample has an answer.
pub fn majority_vote(answers: &[Option<&str>]) -> Option<usize> {
    // key → (count, first index)
    let mut tally: Vec<(String, usize, usize)> = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        let Some(a) = a else { continue };
        let key = answer_key(a);
        if key.is_empty() {
            continue;
        }
        match tally.iter_mut().find(|(k, _, _)| *k == key) {
            Some(entry) => entry.1 += 1,
            None => tally.push((key, 1, i)),
        }
    }
    // Strictly greater keeps the earliest of equal counts (tally is in first-seen order).
    let mut best: Option<(usize, usize)> = None;
    for (_, count, first) in &tally {
        if best.is_none_or(|(c, _)| *count > c) {
            best = Some((*count, *first));
        }
    }
    best.map(|(_, i)| i)
}

impl EvalReport {
    /// The figures of problem-major `samples` (K per problem, in problem order). The sampling
    /// fields (`temperature`, `max_new_tokens`, `seed`, `seconds`) are left at zero.
    pub fn from_samples(
        samples: &[EvalSample],
        k: usize,
        reward_names: &[&str],
        correct_reward: &str,
    ) -> EvalReport {
        let k = k.max(1);
        let n_problems = samples.len().div_ceil(k);
        let mean = |xs: &mut dyn Iterator<Item = f64>| {
            let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
            if n == 0 { f64::NAN } else { s / n as f64 }
        };
        let (mut p1, mut pk, mut maj) = (0.0, 0.0, 0.0);
        for group in samples.chunks(k) {
            let n = group.len();
            let c = group.iter().filter(|s| s.correct).count();
            p1 += c as f64 / n as f64;
            pk += pass_at_k(n, c, k);
            let answers: Vec<Option<&str>> = group.iter().map(|s| s.answer.as_deref()).collect();
            if majority_vote(&answers).is_some_and(|i| group[i].correct) {
                maj += 1.0;
            }
        }
        let per_problem = |x: f64| {
            if n_problems == 0 {
                f64::NAN
            } else {
                x / n_problems as f64
            }
        };
        let mut rewards = BTreeMap::new();
        for name in reward_names {
            let m = mean(
                &mut samples
                    .iter()
                    .filter_map(|s| s.rewards.get(*name).copied().flatten()),
            );
            rewards.insert(name.to_string(), m.is_finite().then_some(m));
        }
        EvalReport {
            pass_at_1: per_problem(p1),
            pass_at_k: per_problem(pk),
            maj_at_k: per_problem(maj),
            k,
            format_rate: mean(&mut samples.iter().map(|s| f64::from(u8::from(s.format)))),
            mean_length: mean(&mut samples.iter().map(|s| s.tokens as f64)),
            truncated_rate: mean(
                &mut samples
                    .iter()
                    .map(|s| f64::from(u8::from(s.finish_reason == "length"))),
            ),
            reward_mean: mean(&mut samples.iter().map(|s| s.reward)),
            rewards,
            correct_reward: correct_reward.to_string(),
            n_problems,
            samples: k,
            temperature: 0.0,
            max_new_tokens: 0,
            seed: 0,
            seconds: 0.0,
        }
    }

    /// The figures as metrics-line entries under `prefix` (`eval/pass@1`, `eval/pass@k`,
    /// `eval/maj@k`, `eval/format_rate`, `eval/mean_length`, `eval/truncated_rate`,
    /// `eval/reward_mean`, `eval/rewards/<name>`, `eval/n_problems`, `eval/samples`,
    /// `eval/seconds` with `prefix = "eval/"`), for the trainer's `metrics.jsonl`.
    pub fn to_metrics(&self, prefix: &str) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(format!("{prefix}{k}"), v);
        };
        put("pass@1", num(self.pass_at_1));
        put("pass@k", num(self.pass_at_k));
        put("maj@k", num(self.maj_at_k));
        put("k", Value::from(self.k));
        put("format_rate", num(self.format_rate));
        put("mean_length", num(self.mean_length));
        put("truncated_rate", num(self.truncated_rate));
        put("reward_mean", num(self.reward_mean));
        for (name, v) in &self.rewards {
            put(&format!("rewards/{name}"), v.map_or(Value::Null, num));
        }
        put("n_problems", Value::from(self.n_problems));
        put("samples", Value::from(self.samples));
        put("seconds", num(self.seconds));
        m
    }
}

/// The correctness reward for `rewards` and `problems` when none is named (see module docs).
pub fn default_correct_reward(rewards: &CombinedReward, problems: &[Sample]) -> String {
    let names = rewards.names();
    if let Some(n) = ["countdown", "accuracy", "code"]
        .iter()
        .find(|n| names.contains(n))
    {
        return n.to_string();
    }
    let has = |k: &str| problems.first().is_some_and(|s| s.fields.contains_key(k));
    if has("nums") && has("target") {
        "countdown"
    } else if has("input_output") || has("verification_info") || has("test_list") || has("test") {
        "code"
    } else {
        "accuracy"
    }
    .to_string()
}

fn build_one(name: &str) -> Result<Box<dyn Reward>, TrainError> {
    sobre_reward::build_reward(name, &Map::new()).map_err(|e| TrainError::Data(e.to_string()))
}

/// Evaluate `model` on `problems`: K = `opts.samples` completions each, scored by `rewards`.
///
/// The prompts are rendered with `template` and encoded as the trainer encodes them; generation
/// stops at the tokenizer's eos, the model's eos ids, `opts.stop_strings` or
/// `opts.max_new_tokens`. `model` may be an autodiff model (the trainer's); it is used through
/// `valid()`.
pub fn evaluate(
    model: &MoeModel,
    tokenizer: &Tokenizer,
    problems: &[Sample],
    template: &Template,
    rewards: &CombinedReward,
    opts: &EvalOptions,
) -> Result<EvalOutput, TrainError> {
    let started = Instant::now();
    if problems.is_empty() {
        return Err(TrainError::Data("no problems to evaluate".into()));
    }
    if opts.samples == 0 {
        return Err(TrainError::Data(
            "samples per problem must be at least 1".into(),
        ));
    }
    let names: Vec<String> = rewards.names().iter().map(|s| s.to_string()).collect();
    let correct_name = opts
        .correct_reward
        .clone()
        .unwrap_or_else(|| default_correct_reward(rewards, problems));
    // Scored from the combined reward's component when it has one, else on its own.
    let correct_index = names.iter().position(|n| *n == correct_name);
    let correct_own = match correct_index {
        Some(_) => None,
        None => Some(build_one(&correct_name)?),
    };
    let strict_format = build_one("format")?;
    let params = SamplingParams {
        temperature: opts.temperature,
        top_k: opts.top_k,
        top_p: opts.top_p,
        min_p: opts.min_p,
        max_new_tokens: opts.max_new_tokens,
        stop_token_ids: vec![tokenizer.special().eos],
        stop_strings: opts.stop_strings.clone(),
        ignore_eos: false,
        seed: opts.seed,
        data_parallel_size: opts.data_parallel_size,
    };
    params.validate().map_err(TrainError::Data)?;
    let policy = model.valid();
    let detok = Detok(tokenizer);
    let tools = match &opts.tools {
        Some(t) => Some(crate::tools::ToolRunner::new(t, tokenizer)?),
        None => None,
    };
    let tools = tools.as_ref().map(|t| t as &dyn sobre_rollout::Tools);
    let chunk = if opts.batch_problems == 0 {
        problems.len()
    } else {
        opts.batch_problems
    };
    let mut out = Vec::with_capacity(problems.len() * opts.samples);
    for start in (0..problems.len()).step_by(chunk) {
        let end = (start + chunk).min(problems.len());
        let mut requests = Vec::with_capacity(end - start);
        for (i, s) in problems[start..end].iter().enumerate() {
            requests.push(Prompt {
                ids: encode_prompt(tokenizer, template, s)?,
                key: (start + i) as u64,
            });
        }
        let mut completions = crate::dist::generate_all(
            &policy,
            &requests,
            opts.samples,
            &params,
            Some(&detok),
            tools,
        )?;
        completions.sort_by_key(|c| (c.prompt_index, c.sample_index));
        // The chunk's completions are scored as one batch (verifiers that run programs run
        // them in parallel); a verifier that cannot score is an error, not a silent 0.
        let texts: Vec<String> = completions
            .iter()
            .map(|c| c.text.clone().unwrap_or_default())
            .collect();
        let samples: Vec<sobre_reward::Sample> = completions
            .iter()
            .map(|c| reward_sample(&problems[start + c.prompt_index]))
            .collect();
        let max_tokens = opts.max_new_tokens;
        fn completion_of<'t>(
            c: &sobre_rollout::Completion,
            text: &'t str,
            max_tokens: usize,
        ) -> sobre_reward::Completion<'t> {
            sobre_reward::Completion {
                text,
                num_tokens: Some(c.tokens.len()),
                truncated: c.finish_reason == FinishReason::Length,
                max_tokens: Some(max_tokens),
            }
        }
        let items: Vec<_> = completions
            .iter()
            .zip(&texts)
            .zip(&samples)
            .map(|((c, t), rs)| (rs, completion_of(c, t, max_tokens)))
            .collect();
        let scores = rewards
            .score_batch(&items)
            .map_err(|e| TrainError::Reward(e.to_string()))?;
        drop(items);
        for (((c, text), rs), b) in completions.into_iter().zip(texts).zip(&samples).zip(scores) {
            let problem = start + c.prompt_index;
            let s = &problems[problem];
            let rc = completion_of(&c, &text, max_tokens);
            let correct_score = match (&correct_own, correct_index) {
                (Some(r), _) => r.score(rs, &rc),
                (None, Some(i)) => b.components[i].1,
                (None, None) => None,
            };
            out.push(EvalSample {
                problem,
                sample: c.sample_index,
                prompt: s.prompt.user_text().unwrap_or("").to_string(),
                answer: sobre_reward::math::extract_answer(&text).map(str::to_string),
                completion: text.clone(),
                tokens: c.tokens.len(),
                finish_reason: c.finish_reason.as_str().to_string(),
                reward: b.total as f64,
                rewards: b
                    .components
                    .iter()
                    .map(|(n, v)| (n.clone(), v.map(f64::from)))
                    .collect(),
                correct: correct_score.is_some_and(|v| v >= 1.0),
                format: strict_format.score(rs, &rc) == Some(1.0),
            });
        }
    }
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut report = EvalReport::from_samples(&out, opts.samples, &name_refs, &correct_name);
    report.temperature = opts.temperature;
    report.max_new_tokens = opts.max_new_tokens;
    report.seed = opts.seed;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(EvalOutput {
        report,
        samples: out,
    })
}

/// The held-out problems of a run's config: `n` (default `eval.n`) problems of the task
/// generator's eval split from `seed` (default: the data seed, so the set is the one training
/// evaluates on), which never shares a problem with any training split; or, when the config
/// names `[data.eval_dataset]` and no `seed` is given, that file's first `n` rows.
pub fn heldout_problems(
    cfg: &Config,
    n: Option<usize>,
    seed: Option<u64>,
) -> Result<Vec<Sample>, TrainError> {
    let n = n.unwrap_or(cfg.eval.n);
    if n == 0 {
        return Err(TrainError::Data(
            "the number of problems must be at least 1".into(),
        ));
    }
    let task = task_config(cfg);
    if let Some(d) = &cfg.data.eval_dataset
        && (seed.is_none() || task.is_none())
    {
        let mut samples = sobre_data::dataset::load(d)
            .map_err(|e| TrainError::Data(format!("{}: {e}", d.path.display())))?
            .samples;
        samples.truncate(n);
        return Ok(samples);
    }
    let Some(task) = task else {
        return Err(TrainError::Data(
            "the config has no `[data] task` generator and no `[data.eval_dataset]` to draw held-out problems from (pass a JSONL file instead)".into(),
        ));
    };
    let seed = seed.unwrap_or(cfg.data.seed.unwrap_or(cfg.run.seed));
    tasks::generate(&task, Split::Eval, n, seed, false)
        .map_err(|e| TrainError::Data(format!("task: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(problem: usize, answer: Option<&str>, correct: bool, format: bool) -> EvalSample {
        let mut rewards = BTreeMap::new();
        rewards.insert(
            "countdown".to_string(),
            Some(if correct { 1.0 } else { 0.1 }),
        );
        rewards.insert("format".to_string(), Some(f64::from(u8::from(format))));
        EvalSample {
            problem,
            sample: 0,
            prompt: String::new(),
            completion: String::new(),
            answer: answer.map(str::to_string),
            tokens: 10,
            finish_reason: "stop".into(),
            reward: if correct { 1.0 } else { 0.1 },
            rewards,
            correct,
            format,
        }
    }

    #[test]
    fn pass_at_k_by_hand() {
        // 1 − C(3,2)/C(4,2) = 1 − 3/6.
        assert!((pass_at_k(4, 1, 2) - 0.5).abs() < 1e-12);
        // 1 − C(2,2)/C(4,2) = 1 − 1/6.
        assert!((pass_at_k(4, 2, 2) - 5.0 / 6.0).abs() < 1e-12);
        // k = 1 is c/n.
        assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
        // k = n: any correct.
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
        assert_eq!(pass_at_k(0, 0, 1), 0.0);
        // 1 − C(7,3)/C(10,3) = 1 − 35/120.
        assert!((pass_at_k(10, 3, 3) - (1.0 - 35.0 / 120.0)).abs() < 1e-12);
    }

    #[test]
    fn majority_vote_normalises_and_breaks_ties_by_first_seen() {
        let v = majority_vote(&[Some("1 + 2"), Some("3*1"), Some("1+2"), None]);
        assert_eq!(v, Some(0));
        // Tie 1–1: the first seen wins.
        assert_eq!(majority_vote(&[Some("b"), Some("a")]), Some(0));
        // Two votes for "a" beat the earlier single "b".
        assert_eq!(majority_vote(&[Some("b"), Some("a"), Some(" a ")]), Some(1));
        assert_eq!(majority_vote(&[None, None]), None);
        assert_eq!(majority_vote(&[None, Some("  ")]), None);
        assert_eq!(answer_key("$\\left( 1 + 2 \\right)$"), answer_key("(1+2)"));
    }

    #[test]
    fn report_figures_by_hand() {
        // Problem 0: 1 of 4 correct, majority answer "x" (wrong). Problem 1: 3 of 4 correct,
        // majority "(1+2)*3" (right). Problem 2: nothing correct, no answers.
        let samples = vec![
            s(0, Some("x"), false, true),
            s(0, Some("x"), false, true),
            s(0, Some("y"), true, false),
            s(0, None, false, false),
            s(1, Some("(1 + 2) * 3"), true, true),
            s(1, Some("(1+2)*3"), true, true),
            s(1, Some("9"), false, true),
            s(1, Some("3*(2+1)"), true, true),
            s(2, None, false, false),
            s(2, None, false, false),
            s(2, None, false, false),
            s(2, None, false, false),
        ];
        let r = EvalReport::from_samples(&samples, 4, &["countdown", "format"], "countdown");
        assert_eq!(r.n_problems, 3);
        assert_eq!(r.samples, 4);
        assert!((r.pass_at_1 - (0.25 + 0.75 + 0.0) / 3.0).abs() < 1e-12);
        assert!((r.pass_at_k - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.maj_at_k - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.format_rate - 6.0 / 12.0).abs() < 1e-12);
        assert_eq!(r.mean_length, 10.0);
        assert_eq!(r.truncated_rate, 0.0);
        let cd = r.rewards["countdown"].unwrap();
        assert!((cd - (4.0 * 1.0 + 8.0 * 0.1) / 12.0).abs() < 1e-9);
        assert_eq!(r.rewards["format"], Some(0.5));
        // JSON keys as documented.
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "pass@1",
            "pass@k",
            "maj@k",
            "format_rate",
            "mean_length",
            "rewards",
            "n_problems",
            "samples",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        let m = r.to_metrics("eval/");
        assert!(m.contains_key("eval/pass@1") && m.contains_key("eval/rewards/format"));
    }

    #[test]
    fn rewards_that_never_apply_are_null() {
        let mut a = s(0, Some("1"), true, true);
        a.rewards.insert("accuracy".into(), None);
        let r = EvalReport::from_samples(&[a], 1, &["accuracy", "countdown"], "countdown");
        assert_eq!(r.rewards["accuracy"], None);
        assert_eq!(r.pass_at_1, 1.0);
        assert_eq!(r.maj_at_k, 1.0);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["rewards"]["accuracy"].is_null());
    }

    #[test]
    fn heldout_problems_come_from_the_eval_split() {
        let (cfg, _) = Config::parse("[data]\ntask = \"countdown\"\n", "t", &[]).unwrap();
        let a = heldout_problems(&cfg, Some(5), Some(3)).unwrap();
        assert_eq!(a.len(), 5);
        // Deterministic, and the default seed gives the trainer's eval set prefix.
        assert_eq!(a, heldout_problems(&cfg, Some(5), Some(3)).unwrap());
        let run = crate::data::load_data(&cfg).unwrap();
        let b = heldout_problems(&cfg, Some(5), None).unwrap();
        assert_eq!(b[..], run.eval[..5]);
        // Never a training problem.
        for p in &b {
            assert!(!run.train.iter().any(|t| t.prompt == p.prompt));
        }
    }
}
