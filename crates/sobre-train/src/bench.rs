//! `sobre bench step`: seconds per GRPO step of a config (issue 9's workload W1 is
//! `configs/bench-w1.toml`), with the split the trainer measures, tokens per second, peak RSS,
//! an optional leak check, and a separately timed breakdown of the policy update at the step's
//! shape (forward, backward, gradients to the host, AdamW).
//!
//! The bench drives [`grpo_step`] directly, exactly as [`crate::pipeline`] does (same data,
//! tokenizer, template, rewards, reference model, AdamW and schedule), but with no run
//! directory, no checkpoints, no SFT stage and no evaluation: those are not part of a step.
//! Two things differ from `sobre train` on purpose, so that the workload has the fixed shape
//! the issue names:
//! - the model keeps its preset's vocabulary when the tokenizer has no more tokens than that
//!   (the trainer resizes it to the tokenizer's, which for a trained BPE can be a little smaller);
//! - with `prompt_tokens = Some(n)` every prompt is rewritten to exactly `n` tokens (the
//!   beginning of its own text, then `~` until it is long enough) under the `plain` template.
//!   The task fields are kept, so rewards are computed as in training.

use std::time::Instant;

use burn::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use sobre_data::{Prompt, Sample, Template, Tokenizer};
use sobre_model::{Batch, ForwardOptions, ModelConfig, MoeModel, init_model, load_model};

use crate::data::{
    Order, RunData, build_template, build_tokenizer, derive_seed, encode_prompt, load_data,
    preset_config,
};
use crate::grpo::{GrpoContext, Reference, default_accuracy_reward, grpo_step};
use crate::metrics::peak_rss_mib;
use crate::optim::{AdamW, AdamWConfig, Schedule, collect_grads, global_norm};
use crate::{Config, TrainError, cost};

/// How long to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Untimed steps first (allocation, thread-pool start-up).
    pub warmup: usize,
    /// Timed steps (medians are over these).
    pub steps: usize,
    /// Run this many steps in all (if more than `warmup + steps`) and fit a line to the
    /// resident set size after each step from `leak_check_from` on: its rise over those steps
    /// is the growth judged against the bound (the first-to-last difference is reported too).
    /// 0 = off.
    pub leak_check_steps: usize,
    /// First step of the leak check (1-based), after which RSS should be flat.
    pub leak_check_from: usize,
    /// Growth allowed by the leak check, MiB.
    pub leak_bound_mib: f64,
    /// Rewrite every prompt to exactly this many tokens (None: the config's prompts as they are).
    pub prompt_tokens: Option<usize>,
    /// Repetitions of the separate policy-update breakdown (0 = skip it).
    pub breakdown_reps: usize,
    /// Side of the square f32 GEMM timed for the machine's ceiling ([`gemm_peak`]; 0 = skip).
    pub gemm_size: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            warmup: 2,
            steps: 10,
            leak_check_steps: 0,
            leak_check_from: 10,
            leak_bound_mib: 16.0,
            prompt_tokens: Some(32),
            breakdown_reps: 3,
            gemm_size: 2048,
        }
    }
}

/// Median of the policy update's parts, measured separately on the step's shape.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyBreakdown {
    /// `[rows, seq]` of the training forward.
    pub rows: usize,
    pub seq: usize,
    /// Forward of the whole batch with autodiff (logits for every position).
    pub forward_s: f64,
    /// `loss.backward()` of `mean(logits)` (the loss `scripts/bench_torch.py` uses).
    pub backward_s: f64,
    /// Gradients read back to the host and their global norm (the trainer's clipping needs it).
    pub grads_to_host_s: f64,
    /// AdamW over every parameter (host arithmetic, weights written back).
    pub optimizer_s: f64,
}

/// Current resident set size (`VmRSS`), MiB.
pub fn rss_mib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The text of `s` cut or padded so that `encode_prompt` under the plain template gives
/// exactly `n` tokens.
fn fixed_length_prompt(
    tok: &Tokenizer,
    template: &Template,
    s: &Sample,
    n: usize,
) -> Result<String, TrainError> {
    let plain = Template::Plain;
    let render = |text: &str| -> Result<usize, TrainError> {
        let mut probe = s.clone();
        probe.prompt = Prompt::Text(text.to_string());
        Ok(encode_prompt(tok, &plain, &probe)?.len())
    };
    let full = template
        .render(&s.prompt)
        .map_err(|e| TrainError::Data(format!("template: {e}")))?;
    let mut text = full;
    // Cut whole characters from the end until it fits.
    while render(&text)? > n {
        let ids = tok
            .encode(&text)
            .map_err(|e| TrainError::Data(format!("tokenizer: {e}")))?;
        let keep = ids.len().saturating_sub(render(&text)? - n);
        let cut = tok
            .decode(&ids[..keep], false)
            .map_err(|e| TrainError::Data(format!("tokenizer: {e}")))?;
        text = if cut.len() < text.len() {
            cut
        } else {
            let mut t = text.clone();
            t.pop();
            t
        };
    }
    // `~` is not in the generated texts, so it is one byte-level token that merges with nothing.
    let mut guard = 0;
    while render(&text)? < n {
        text.push('~');
        guard += 1;
        if guard > 4 * n {
            break;
        }
    }
    if render(&text)? != n {
        return Err(TrainError::Data(format!(
            "could not make a prompt of exactly {n} tokens with this tokenizer"
        )));
    }
    Ok(text)
}

/// Run the benchmark; returns the report as JSON: set up, warm-up and timed GRPO steps, the
/// policy update part by part, the leak check, the report.
pub fn bench_step(cfg: &Config, opts: &BenchOptions) -> Result<Value, TrainError> {
    if cfg.run.threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.run.threads)
            .build_global();
    }
    let t_setup = Instant::now();
    let (data, template, tok, prompt_lens) = bench_inputs(cfg, opts)?;
    let rewards = cfg.build_rewards().map_err(TrainError::Data)?;
    let accuracy_reward = default_accuracy_reward(cfg, &rewards);
    let (mut model, reference) = bench_models(cfg, &tok)?;
    let mut opt = AdamW::new(AdamWConfig::from_config(cfg));
    let total_steps = (opts.warmup + opts.steps).max(opts.leak_check_steps);
    let sched = Schedule::grpo(cfg, total_steps);
    let ctx = GrpoContext {
        cfg,
        tok: &tok,
        template: &template,
        rewards: &rewards,
        train: &data.train,
        reference: reference.as_ref(),
        teacher: None,
        tools: None,
        accuracy_reward,
    };
    let setup_s = t_setup.elapsed().as_secs_f64();

    // ---- steps ----
    let mut order = Order::new(data.train.len(), derive_seed(cfg.run.seed, &[1]));
    let mut cursor = 0u64;
    let mut per_step: Vec<serde_json::Map<String, Value>> = Vec::new();
    let mut rss_after: Vec<f64> = Vec::new();
    for step in 0..total_steps {
        let lr = sched.lr_at(opt.step as usize);
        let (next, out) = grpo_step(&ctx, model, &mut opt, &mut order, &mut cursor, step, lr)?;
        model = next;
        per_step.push(out.metrics);
        rss_after.push(rss_mib().unwrap_or(f64::NAN));
    }
    let timed =
        &per_step[opts.warmup.min(per_step.len())..(opts.warmup + opts.steps).min(per_step.len())];

    // ---- the policy update, part by part, on the step's shape ----
    let rows = cfg.grpo.num_prompts * cfg.grpo.group_size;
    let seq = prompt_lens.iter().copied().max().unwrap_or(1) + cfg.rollout.max_new_tokens;
    let breakdown = (opts.breakdown_reps > 0).then(|| {
        policy_breakdown(
            &model,
            rows,
            seq,
            AdamWConfig::from_config(cfg),
            opts.breakdown_reps,
        )
    });
    let leak = (opts.leak_check_steps > 0).then(|| leak_report(opts, &rss_after));
    let threads = match cfg.run.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        t => t,
    };
    let gemm = (opts.gemm_size > 0).then(|| gemm_peak(opts.gemm_size, 5, threads));
    let measured = Measured {
        timed,
        prompt_lens: &prompt_lens,
        breakdown,
        gemm,
        leak,
        setup_s,
    };
    Ok(step_report(cfg, opts, &model, &tok, &measured))
}

/// The benchmark's data, template and tokenizer, its prompts made `--prompt-tokens` long when
/// asked, and the token lengths of the first 64 prompts.
fn bench_inputs(
    cfg: &Config,
    opts: &BenchOptions,
) -> Result<(RunData, Template, Tokenizer, Vec<usize>), TrainError> {
    let mut data = load_data(cfg)?;
    let mut template = build_template(cfg, None)?;
    let tok = build_tokenizer(cfg, &data, &template, None)?;
    if let Some(n) = opts.prompt_tokens {
        for s in data.train.iter_mut() {
            let text = fixed_length_prompt(&tok, &template, s, n)?;
            s.prompt = Prompt::Text(text);
        }
        template = Template::Plain;
    }
    let prompt_lens: Vec<usize> = data
        .train
        .iter()
        .take(64)
        .map(|s| encode_prompt(&tok, &template, s).map(|v| v.len()))
        .collect::<Result<_, _>>()?;
    Ok((data, template, tok, prompt_lens))
}

/// The policy (autodiff) and, when `beta > 0`, the frozen reference: as the pipeline's
/// `initial_model`, keeping the preset's vocabulary.
fn bench_models(
    cfg: &Config,
    tok: &Tokenizer,
) -> Result<(MoeModel, Option<Reference>), TrainError> {
    let special = tok.special().clone();
    let make = |device: &Device| -> Result<MoeModel, TrainError> {
        let m = &cfg.model;
        Ok(match &m.path {
            Some(p) => load_model(p, device)?,
            None => {
                let mut mc = preset_config(cfg, &special)?;
                mc.vocab_size = mc.vocab_size.max(tok.vocab_size());
                init_model(&mc, m.seed.unwrap_or(cfg.run.seed), device)
            }
        })
    };
    let model = make(&sobre_model::default_device().autodiff())?;
    if model.config.vocab_size < tok.vocab_size() {
        return Err(TrainError::Data(format!(
            "the tokenizer has {} tokens but the model only {}",
            tok.vocab_size(),
            model.config.vocab_size
        )));
    }
    // With `[lora]`: fresh adapters (seeded like the pipeline's), the base frozen, and the
    // reference the policy with adapters off.
    if let Some(l) = &cfg.lora {
        let c = match &l.adapter {
            Some(dir) => sobre_model::lora::read_adapter_config(dir)?.0,
            None => l.resolve(),
        };
        let seed = crate::data::derive_seed(cfg.run.seed, &[5]);
        let mut model = sobre_model::lora::add_adapters(model, &c, seed)?;
        if l.base_bf16() {
            model = sobre_model::lora::store_base_bf16(model);
        }
        let reference = (cfg.grpo.beta > 0.0).then(Reference::adapters_off);
        return Ok((model, reference));
    }
    let reference = if cfg.grpo.beta > 0.0 {
        Some(Reference::new(
            make(&sobre_model::default_device())?,
            cfg.model.frozen_bf16(),
        )?)
    } else {
        None
    };
    Ok((model, reference))
}

/// RSS after each step, from step `leak_check_from`: its trend against the bound.
fn leak_report(opts: &BenchOptions, rss_after: &[f64]) -> Value {
    let from = opts.leak_check_from.clamp(1, rss_after.len());
    let a = rss_after[from - 1];
    let b = *rss_after.last().unwrap_or(&f64::NAN);
    // A leak is a trend: allocator high-water moves RSS up and down by tens of MiB from
    // one step to the next, so the first-to-last difference alone misreads noise.
    let trend = rss_trend_mib(&rss_after[from - 1..]);
    json!({
        "steps": rss_after.len(),
        "from_step": from,
        "rss_mib_at_from": round(a, 1),
        "rss_mib_at_end": round(b, 1),
        "endpoint_growth_mib": round(b - a, 1),
        "growth_mib": round(trend, 1),
        "bound_mib": opts.leak_bound_mib,
        "within_bound": trend <= opts.leak_bound_mib,
        "rss_mib_every_10_steps": rss_after.iter().step_by(10).map(|x| round(*x, 1)).collect::<Vec<_>>(),
    })
}

/// What the benchmark measured, for [`step_report`].
struct Measured<'a> {
    /// The metrics lines of the timed steps (after the warm-up).
    timed: &'a [serde_json::Map<String, Value>],
    prompt_lens: &'a [usize],
    breakdown: Option<PolicyBreakdown>,
    /// [`gemm_peak`]'s report.
    gemm: Option<Value>,
    leak: Option<Value>,
    setup_s: f64,
}

/// The report: the model and workload, medians of the timed steps' phases, the breakdown and
/// the leak check.
fn step_report(
    cfg: &Config,
    opts: &BenchOptions,
    model: &MoeModel,
    tok: &Tokenizer,
    r: &Measured<'_>,
) -> Value {
    let get = |m: &serde_json::Map<String, Value>, k: &str| {
        m.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
    };
    let col = |k: &str| r.timed.iter().map(|m| get(m, k)).collect::<Vec<f64>>();
    let step_s = col("time_step");
    let phases = Phases {
        rollout: median(&col("time_rollout")),
        reference: median(&col("time_reference")),
        policy: median(&col("time_policy")),
    };
    let other_s: Vec<f64> = r
        .timed
        .iter()
        .map(|m| {
            get(m, "time_step")
                - get(m, "time_rollout")
                - get(m, "time_reference")
                - get(m, "time_policy")
        })
        .collect();
    let rows = (cfg.grpo.num_prompts * cfg.grpo.group_size) as f64;
    let completion_tokens: Vec<f64> = col("completion_length_mean")
        .iter()
        .map(|l| l * rows)
        .collect();
    let mc = &model.config;
    let med_step = median(&step_s);
    let med_tokens = median(&completion_tokens);
    let prompt_lens = r.prompt_lens;
    // With `[lora]`: the adapters' size (what trains, and what a checkpoint holds).
    let lora = cfg.lora.as_ref().map(|l| {
        let tensors = sobre_model::lora::adapter_tensors(model);
        let n: usize = tensors.iter().map(|(_, _, v)| v.len()).sum();
        let c = l.resolve();
        json!({
            "r": tensors.first().map(|(_, s, _)| s[0]).unwrap_or(c.r),
            "target_modules": c.target_modules,
            "adapter_tensors": tensors.len(),
            "trainable_parameters": n,
            "adapter_bytes_f32": 4 * n,
            "base_dtype": if l.base_bf16() { "bf16" } else { "f32" },
        })
    });
    json!({
        "benchmark": "grpo_step",
        "lora": lora,
        "device": format!("{:?}", sobre_model::default_device()),
        "model": {
            "preset": cfg.model.preset,
            "path": cfg.model.path,
            "vocab_size": mc.vocab_size,
            "hidden_size": mc.hidden_size,
            "num_hidden_layers": mc.num_hidden_layers,
            "num_experts": mc.num_experts,
            "num_experts_per_tok": mc.num_experts_per_tok,
            "tokenizer_vocab_size": tok.vocab_size(),
        },
        "workload": {
            "prompts": cfg.grpo.num_prompts,
            "group_size": cfg.grpo.group_size,
            "prompt_tokens": opts.prompt_tokens,
            "prompt_tokens_seen": [prompt_lens.iter().min(), prompt_lens.iter().max()],
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "ignore_eos": cfg.rollout.ignore_eos,
            "temperature": cfg.rollout.temperature,
            "num_iterations": cfg.grpo.num_iterations,
            "mini_batch_size": cfg.mini_batch(),
            "beta": cfg.grpo.beta,
            "loss": cfg.grpo.loss,
            "threads": cfg.run.threads,
        },
        "warmup_steps": opts.warmup,
        "timed_steps": r.timed.len(),
        "median_step_s": round(med_step, 4),
        "median_rollout_s": round(phases.rollout, 4),
        "median_reference_s": round(phases.reference, 4),
        "median_policy_s": round(phases.policy, 4),
        "median_other_s": round(median(&other_s), 4),
        "phases_note": "rollout includes reward scoring; policy = training forward + loss + backward + gradients to host + clipping + AdamW (the trainer times them together; policy_breakdown splits them, measured separately on the same shape); other = advantages, layouts, metrics",
        "completion_tokens_per_step": med_tokens,
        "completion_tokens_per_second": round(med_tokens / med_step, 1),
        "policy_breakdown": r.breakdown,
        "gflops": gflops_report(cfg, mc, r, &phases, med_tokens / rows),
        "peak_rss_mib": peak_rss_mib().map(|x| round(x, 1)),
        "leak_check": r.leak,
        "steps_s": step_s.iter().map(|x| round(*x, 4)).collect::<Vec<_>>(),
        "setup_s": round(r.setup_s, 3),
        "threads_available": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// Median seconds of a timed step's phases.
struct Phases {
    rollout: f64,
    reference: f64,
    policy: f64,
}

/// Achieved GFLOP/s of each phase (the model's FLOPs for the work sobre does,
/// [`cost::grpo_batch_forward_flops`], over the phase's median time) next to the GEMM ceiling.
fn gflops_report(
    cfg: &Config,
    mc: &ModelConfig,
    r: &Measured<'_>,
    phases: &Phases,
    completion_len: f64,
) -> Value {
    let prompt_len = median(&r.prompt_lens.iter().map(|&l| l as f64).collect::<Vec<_>>());
    let (groups, group_size) = (cfg.grpo.num_prompts, cfg.grpo.group_size);
    let (p, c) = (prompt_len.round() as usize, completion_len.round() as usize);
    // The trainer's layouts share each group's prompt unless layers are recomputed.
    let update_shares = !cfg.grpo.gradient_checkpointing;
    let update = cost::TRAIN_FLOPS_FACTOR
        * cfg.grpo.num_iterations as f64
        * cost::grpo_batch_forward_flops(mc, p, c, groups, group_size, update_shares);
    let once = cost::grpo_batch_forward_flops(mc, p, c, groups, group_size, true);
    let rate = |flops: f64, s: f64| round(flops / s / 1e9, 1);
    json!({
        "note": "estimated from the model's shape for the tokens each phase computes (prompts once per group where shared, the LM head at completion positions); the update's time includes gradients to host and AdamW, and recomputed layers' second forward is not counted",
        "policy_update_tflop": round(update / 1e12, 3),
        "policy_update": rate(update, phases.policy),
        "reference_forward": (cfg.grpo.beta > 0.0).then(|| rate(once, phases.reference)),
        "rollout": rate(once, phases.rollout),
        "gemm_peak": r.gemm.clone(),
    })
}

/// The best a plain f32 GEMM reaches here, `[n, n] × [n, n]`, two ways on the benchmark's
/// threads: straight through `gemm` split by rows, one single-threaded call per thread (as the
/// replicas run sobre's fused kernels and host engine), and through the backend's matmul
/// (flex: `gemm` with its own threading). Best and median of `reps` after one warm-up.
fn gemm_peak(n: usize, reps: usize, threads: usize) -> Value {
    let flops = 2.0 * (n as f64).powi(3);
    let summary = |times: &[f64]| {
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        json!({
            "best_gflops": round(flops / best / 1e9, 1),
            "median_gflops": round(flops / median(times) / 1e9, 1),
        })
    };
    // The direct one first: rayon's workers spin for a while after the backend's matmul and
    // would take a core from it.
    let direct = summary(&sobre_model::square_gemm_seconds(n, reps, threads));
    let device = sobre_model::default_device();
    let uniform = burn::tensor::Distribution::Uniform(-1.0, 1.0);
    let a = Tensor::<2>::random([n, n], uniform, &device);
    let b = Tensor::<2>::random([n, n], uniform, &device);
    let mut backend = vec![];
    for _ in 0..reps + 1 {
        let t = Instant::now();
        let c = a.clone().matmul(b.clone());
        // Reading one value forces a lazy backend to finish.
        let _ = c.slice([0..1, 0..1]).try_into_vec_as::<f32>();
        backend.push(t.elapsed().as_secs_f64());
    }
    json!({
        "shape": [n, n, n],
        "threads": threads,
        "gemm_rows_per_thread": direct,
        "backend_matmul": summary(&backend[1..]),
    })
}

/// Time forward, backward, gradient read-back and AdamW separately on a `[rows, seq]` batch
/// (loss `mean(logits)`, as `scripts/bench_torch.py`), on a copy of `model`.
fn policy_breakdown(
    model: &MoeModel,
    rows: usize,
    seq: usize,
    adamw: AdamWConfig,
    reps: usize,
) -> PolicyBreakdown {
    let vocab = model.config.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..seq)
                .map(|i| ((r * 31 + i * 7) as u32) % vocab)
                .collect()
        })
        .collect();
    let batch = Batch::right_padded(&seqs, 0);
    let mut opt = AdamW::new(adamw);
    let mut m = model.clone();
    let (mut f, mut b, mut g, mut o) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps + 1 {
        let t = Instant::now();
        let out = m.forward(&batch, None, ForwardOptions::default());
        let loss = out.logits.mean();
        // Reading the loss forces the (lazy) forward to finish before the clock stops.
        let _ = loss.clone().try_into_vec_as::<f32>();
        let t1 = Instant::now();
        let mut grads = loss.backward();
        let t2 = Instant::now();
        let host = collect_grads(&m, &mut grads);
        drop(grads);
        let _norm = global_norm(&host);
        let t3 = Instant::now();
        m = opt.step(m, host, 1e-5, 1.0);
        let t4 = Instant::now();
        f.push((t1 - t).as_secs_f64());
        b.push((t2 - t1).as_secs_f64());
        g.push((t3 - t2).as_secs_f64());
        o.push((t4 - t3).as_secs_f64());
    }
    // The first repetition is warm-up.
    PolicyBreakdown {
        rows,
        seq,
        forward_s: round(median(&f[1..]), 4),
        backward_s: round(median(&b[1..]), 4),
        grads_to_host_s: round(median(&g[1..]), 4),
        optimizer_s: round(median(&o[1..]), 4),
    }
}

/// Growth over a series of per-step RSS readings (MiB) along its least-squares line: the
/// slope times the steps it spans. 0 for fewer than two readings.
pub fn rss_trend_mib(series: &[f64]) -> f64 {
    let n = series.len();
    if n < 2 {
        return 0.0;
    }
    let mean_x = (n - 1) as f64 / 2.0;
    let mean_y = series.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in series.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    sxy / sxx * (n - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_trend_reads_a_leak_and_not_noise() {
        // 0.5 MiB per step over 190 steps, with ±40 MiB of alternating noise: 95 MiB.
        let leak: Vec<f64> = (0..191)
            .map(|i| 600.0 + 0.5 * i as f64 + if i % 2 == 0 { 40.0 } else { -40.0 })
            .collect();
        assert!(
            (rss_trend_mib(&leak) - 95.0).abs() < 1.0,
            "{}",
            rss_trend_mib(&leak)
        );
        // Flat with the same noise (and a high first reading): ~0, where the end points say −80.
        let flat: Vec<f64> = (0..191)
            .map(|i| 600.0 + if i % 2 == 0 { 40.0 } else { -40.0 })
            .collect();
        assert!(rss_trend_mib(&flat).abs() < 1.0, "{}", rss_trend_mib(&flat));
        assert_eq!(rss_trend_mib(&[700.0]), 0.0);
    }
}
