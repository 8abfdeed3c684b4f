//! One GRPO step: sample P prompts × G completions → rewards → group-relative advantages →
//! μ passes of clipped policy-gradient updates over mini-batches (TRL's `GRPOTrainer`, verl's
//! actor update), with optional KL to a frozen reference and DAPO's dynamic sampling.
//!
//! Randomness: the prompts come from a seeded order at the saved cursor, and the sampling seed
//! of step s, round r is derived from (run seed, rollout seed, s, r), so a step is a pure
//! function of the weights, the optimizer state, the cursor and the step number.

use std::time::Instant;

use burn::prelude::*;
use serde_json::{Map, Value, json};
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::{ForwardOptions, MoeModel};
use sobre_reward::CombinedReward;
use sobre_rollout::{Completion, FinishReason, Prompt, SamplingParams, generate};

use crate::TrainError;
use crate::advantages::{ScaleRewards, group_advantages, mean_std, zero_std_groups};
use crate::config::Config;
use crate::data::{Detok, Order, derive_seed, encode_prompt, reward_sample};
use crate::kl::KlEstimator;
use crate::losses::{
    LossSettings, PolicyLossInput, clip_fractions, host_log_ratios, is_sequence_level,
    policy_loss_fn,
};
use crate::metrics::{add_counts, expert_load, num, peak_rss_mib};
use crate::optim::{AdamW, backward_and_step};
use crate::score::{Layout, host, score};

/// What a GRPO step needs besides the model and optimizer.
pub struct GrpoContext<'a> {
    pub cfg: &'a Config,
    pub tok: &'a Tokenizer,
    pub template: &'a Template,
    pub rewards: &'a CombinedReward,
    pub train: &'a [Sample],
    /// The frozen reference (non-autodiff), when `beta > 0`.
    pub reference: Option<&'a MoeModel>,
    /// Reward component that counts as "solved" for `accuracy`.
    pub accuracy_reward: Option<String>,
}

/// One scored completion.
struct Scored {
    prompt_ids: Vec<u32>,
    sample: usize,
    completion: Completion,
    reward: f32,
    components: Vec<Option<f32>>,
}

/// The result of a step.
pub struct StepOutput {
    pub metrics: Map<String, Value>,
    pub samples: Vec<Value>,
    /// Every update of the step was skipped (non-finite).
    pub skipped: bool,
}

/// The reward component used for accuracy / pass@1: `countdown` or `accuracy` when present.
pub fn default_accuracy_reward(cfg: &Config, rewards: &CombinedReward) -> Option<String> {
    if let Some(r) = &cfg.eval.reward {
        return Some(r.clone());
    }
    let names = rewards.names();
    ["countdown", "accuracy"]
        .iter()
        .find(|n| names.contains(n))
        .map(|s| s.to_string())
}

fn score_completions(
    ctx: &GrpoContext<'_>,
    prompts: &[(usize, Vec<u32>)],
    completions: Vec<Completion>,
    max_tokens: usize,
) -> Vec<Scored> {
    completions
        .into_iter()
        .map(|c| {
            let (sample, ids) = &prompts[c.prompt_index];
            let text = c.text.clone().unwrap_or_default();
            let rc = sobre_reward::Completion {
                text: &text,
                num_tokens: Some(c.tokens.len()),
                truncated: c.finish_reason == FinishReason::Length,
                max_tokens: Some(max_tokens),
            };
            let b = ctx.rewards.score(&reward_sample(&ctx.train[*sample]), &rc);
            Scored {
                prompt_ids: ids.clone(),
                sample: *sample,
                completion: c,
                reward: b.total,
                components: b.components.into_iter().map(|(_, s)| s).collect(),
            }
        })
        .collect()
}

/// Run one GRPO step (`step` is 0-based) and return the updated model.
pub fn grpo_step(
    ctx: &GrpoContext<'_>,
    mut model: MoeModel,
    opt: &mut AdamW,
    order: &mut Order,
    cursor: &mut u64,
    step: usize,
    lr: f64,
) -> Result<(MoeModel, StepOutput), TrainError> {
    let cfg = ctx.cfg;
    let g = &cfg.grpo;
    let (p, gs) = (g.num_prompts, g.group_size);
    let pad = ctx.tok.special().pad;
    let t_step = Instant::now();

    // ---- rollout (with DAPO dynamic sampling when filtering) ----
    let t0 = Instant::now();
    let policy = model.valid();
    let detok = Detok(ctx.tok);
    let mut kept: Vec<Scored> = Vec::new();
    let mut all_rewards: Vec<f32> = Vec::new();
    let mut groups_seen = 0usize;
    let mut zero_groups = 0usize;
    let mut generated_tokens = 0usize;
    let rounds = if g.filter_zero_std_groups {
        g.max_resample_rounds + 1
    } else {
        1
    };
    let mut rounds_used = 0;
    for round in 0..rounds {
        if kept.len() >= p * gs {
            break;
        }
        rounds_used += 1;
        let mut prompts = Vec::with_capacity(p);
        let mut requests = Vec::with_capacity(p);
        for _ in 0..p {
            let idx = order.index(*cursor);
            let ids = encode_prompt(ctx.tok, ctx.template, &ctx.train[idx])?;
            requests.push(Prompt {
                ids: ids.clone(),
                key: *cursor,
            });
            prompts.push((idx, ids));
            *cursor += 1;
        }
        let params = SamplingParams {
            seed: derive_seed(
                cfg.run.seed ^ cfg.rollout.seed,
                &[1, step as u64, round as u64],
            ),
            ..cfg.rollout.clone()
        };
        let completions = generate(&policy, &requests, gs, &params, Some(&detok))?;
        generated_tokens += completions.iter().map(|c| c.tokens.len()).sum::<usize>();
        let scored = score_completions(ctx, &prompts, completions, cfg.rollout.max_new_tokens);
        let rewards: Vec<f32> = scored.iter().map(|s| s.reward).collect();
        let zero = zero_std_groups(&rewards, gs);
        groups_seen += zero.len();
        zero_groups += zero.iter().filter(|&&z| z).count();
        all_rewards.extend(&rewards);
        for (gi, group) in scored
            .into_iter()
            .collect::<Vec<_>>()
            .chunks(gs)
            .enumerate()
        {
            if (g.filter_zero_std_groups && zero[gi]) || kept.len() >= p * gs {
                continue;
            }
            kept.extend(group.iter().map(|s| Scored {
                prompt_ids: s.prompt_ids.clone(),
                sample: s.sample,
                completion: s.completion.clone(),
                reward: s.reward,
                components: s.components.clone(),
            }));
        }
    }
    drop(policy);
    let time_rollout = t0.elapsed().as_secs_f64();

    // ---- advantages ----
    let rewards: Vec<f32> = kept.iter().map(|s| s.reward).collect();
    let scale = ScaleRewards::from_name(&g.scale_rewards).unwrap_or(ScaleRewards::Group);
    let advantages = if kept.is_empty() {
        vec![]
    } else {
        group_advantages(&rewards, gs, scale)
    };
    let rows = kept.len();
    let row_mask: Vec<f32> = kept
        .iter()
        .map(|s| {
            if g.mask_truncated_completions && s.completion.finish_reason == FinishReason::Length {
                0.0
            } else {
                1.0
            }
        })
        .collect();

    // ---- mini-batches, reference logprobs ----
    let mb = cfg.mini_batch().min(rows.max(1));
    let chunks: Vec<std::ops::Range<usize>> = (0..rows)
        .step_by(mb.max(1))
        .map(|s| s..(s + mb).min(rows))
        .collect();
    let layouts: Vec<Layout> = chunks
        .iter()
        .map(|r| {
            let pairs: Vec<(&[u32], &[u32])> = kept[r.clone()]
                .iter()
                .map(|s| (s.prompt_ids.as_slice(), s.completion.tokens.as_slice()))
                .collect();
            Layout::new(&pairs, pad)
        })
        .collect();
    // Rows with an empty completion cannot be scored (no token to predict); they are masked.
    let t1 = Instant::now();
    let kl_est = KlEstimator::from_name(&g.kl_estimator).unwrap_or(KlEstimator::K3);
    let temperature = cfg.rollout.temperature;
    let ref_lp: Vec<Option<Vec<f32>>> = layouts
        .iter()
        .map(|l| match ctx.reference {
            Some(r) if g.beta > 0.0 && l.max_completion > 0 => Some(host(
                score(r, l, temperature, ForwardOptions::default(), false).logp,
            )),
            _ => None,
        })
        .collect();
    let time_reference = t1.elapsed().as_secs_f64();

    // ---- policy updates ----
    let t2 = Instant::now();
    let loss_fn = policy_loss_fn(&g.loss).unwrap_or(crate::losses::grpo);
    let seq_level = is_sequence_level(&g.loss);
    let total_tokens: f64 = layouts
        .iter()
        .enumerate()
        .map(|(ci, l)| masked_count(l, &row_mask[chunks[ci].clone()]))
        .sum();
    let settings = LossSettings {
        epsilon: g.epsilon,
        epsilon_high: cfg.epsilon_high(),
        beta: g.beta,
        kl: kl_est,
        max_completion_length: cfg.rollout.max_new_tokens,
        dapo_normalizer: total_tokens / chunks.len().max(1) as f64,
    };
    let aux_coef = g.aux_loss_coef.unwrap_or(model.config.router_aux_loss_coef);
    let bias_update = model.config.aux_loss_free_bias;
    let bias_rate = model.config.bias_update_rate as f32;
    let device = model.device();
    let (mut losses, mut norms, mut kls, mut ents, mut mism) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut clip_lo, mut clip_hi, mut aux_vals) = (vec![], vec![], vec![]);
    let mut counts: Vec<Vec<u64>> = vec![];
    let (mut updates, mut skipped) = (0usize, 0usize);
    for it in 0..g.num_iterations {
        for (ci, layout) in layouts.iter().enumerate() {
            if layout.max_completion == 0 {
                continue;
            }
            let range = chunks[ci].clone();
            let m = layout.max_completion;
            let mut mask = layout.mask.clone();
            let mut adv = vec![0.0f32; layout.rows * m];
            let mut rollout_lp = vec![0.0f32; layout.rows * m];
            for (r, gi) in range.clone().enumerate() {
                for i in 0..m {
                    mask[r * m + i] *= row_mask[gi];
                    adv[r * m + i] = advantages[gi];
                }
                for (i, &lp) in kept[gi].completion.logprobs.iter().enumerate().take(m) {
                    rollout_lp[r * m + i] = lp;
                }
            }
            let opts = ForwardOptions {
                aux_loss: aux_coef > 0.0,
                ..Default::default()
            };
            let scored = score(&model, layout, temperature, opts, it == 0);
            let logp_host = host(scored.logp.clone());
            let old = if g.num_iterations > 1 {
                layout.tensor(rollout_lp.clone(), &device)
            } else {
                scored.logp.clone().detach()
            };
            let old_host = if g.num_iterations > 1 {
                rollout_lp.clone()
            } else {
                logp_host.clone()
            };
            let input = PolicyLossInput {
                logp: scored.logp.clone(),
                old_logp: old,
                ref_logp: ref_lp[ci]
                    .as_ref()
                    .map(|v| layout.tensor(v.clone(), &device)),
                advantages: layout.tensor(adv.clone(), &device),
                mask: layout.tensor(mask.clone(), &device),
            };
            let mut loss = loss_fn(&input, &settings);
            if let Some(aux) = &scored.router.aux_loss
                && aux_coef > 0.0
            {
                aux_vals.push(host(aux.clone()).first().copied().unwrap_or(f32::NAN) as f64);
                loss = loss + aux.clone() * aux_coef;
            }
            let loss_value = host(loss.clone()).first().copied().unwrap_or(f32::NAN) as f64;
            // Host statistics of this mini-batch.
            let n_tok = mask.iter().filter(|&&x| x > 0.0).count().max(1) as f64;
            let lr_host = host_log_ratios(&logp_host, &old_host, &mask, m, seq_level);
            let (lo, hi) = clip_fractions(
                &lr_host,
                &adv,
                &mask,
                settings.epsilon,
                settings.epsilon_high,
            );
            clip_lo.push(lo);
            clip_hi.push(hi);
            if let Some(rl) = &ref_lp[ci] {
                let k: f64 = logp_host
                    .iter()
                    .zip(rl)
                    .zip(&mask)
                    .filter(|(_, m)| **m > 0.0)
                    .map(|((a, b), _)| kl_est.host(*a, *b) as f64)
                    .sum();
                kls.push(k / n_tok);
            }
            if it == 0 {
                let e: f64 = scored
                    .entropy
                    .iter()
                    .zip(&layout.mask)
                    .filter(|(_, m)| **m > 0.0)
                    .map(|(e, _)| *e as f64)
                    .sum();
                ents.push(e / layout.mask.iter().filter(|&&x| x > 0.0).count().max(1) as f64);
                let d: f64 = logp_host
                    .iter()
                    .zip(&rollout_lp)
                    .zip(&layout.mask)
                    .filter(|(_, m)| **m > 0.0)
                    .map(|((a, b), _)| (a - b).abs() as f64)
                    .sum();
                mism.push(d / layout.mask.iter().filter(|&&x| x > 0.0).count().max(1) as f64);
                add_counts(&mut counts, &scored.router.expert_counts);
            }
            let batch_counts = scored.router.expert_counts.clone();
            drop(input);
            drop(scored);
            let (next, outcome) = backward_and_step(model, loss, opt, lr, cfg.optim.max_grad_norm);
            model = next;
            losses.push(loss_value);
            norms.push(outcome.grad_norm);
            updates += 1;
            if outcome.skipped {
                skipped += 1;
            } else if bias_update && it == 0 {
                // DeepSeek-V3's aux-loss-free balancing: nudge biases by this batch's load.
                model.update_expert_bias(&batch_counts, bias_rate);
            }
        }
    }
    let time_policy = t2.elapsed().as_secs_f64();

    // ---- metrics ----
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let mut mt = Map::new();
    mt.insert("stage".into(), json!("grpo"));
    mt.insert("step".into(), json!(step + 1));
    let (rm, rs) = mean_std(&rewards);
    mt.insert("reward_mean".into(), num(rm as f64));
    mt.insert("reward_std".into(), num(rs as f64));
    for (ci, name) in ctx.rewards.names().iter().enumerate() {
        let vals: Vec<f32> = kept.iter().filter_map(|s| s.components[ci]).collect();
        let (m, s) = mean_std(&vals);
        mt.insert(
            format!("rewards/{name}/mean"),
            if vals.is_empty() {
                Value::Null
            } else {
                num(m as f64)
            },
        );
        mt.insert(
            format!("rewards/{name}/std"),
            if vals.is_empty() {
                Value::Null
            } else {
                num(s as f64)
            },
        );
    }
    let acc = ctx.accuracy_reward.as_ref().and_then(|name| {
        let ci = ctx.rewards.names().iter().position(|n| n == name)?;
        Some(
            kept.iter()
                .filter(|s| s.components[ci].unwrap_or(0.0) >= 1.0)
                .count() as f64
                / rows.max(1) as f64,
        )
    });
    mt.insert("accuracy".into(), acc.map_or(Value::Null, num));
    let (am, asd) = mean_std(&advantages);
    mt.insert("advantage_mean".into(), num(am as f64));
    mt.insert("advantage_std".into(), num(asd as f64));
    mt.insert(
        "advantage_abs_max".into(),
        num(advantages.iter().fold(0.0f32, |a, &b| a.max(b.abs())) as f64),
    );
    mt.insert("loss".into(), num(mean(&losses)));
    mt.insert(
        "kl".into(),
        if kls.is_empty() {
            Value::Null
        } else {
            num(mean(&kls))
        },
    );
    mt.insert("clip_fraction".into(), num(mean(&clip_lo) + mean(&clip_hi)));
    mt.insert("clip_fraction_low".into(), num(mean(&clip_lo)));
    mt.insert("clip_fraction_high".into(), num(mean(&clip_hi)));
    mt.insert("entropy".into(), num(mean(&ents)));
    let lens: Vec<f64> = kept
        .iter()
        .map(|s| s.completion.tokens.len() as f64)
        .collect();
    mt.insert("completion_length_mean".into(), num(mean(&lens)));
    mt.insert(
        "completion_length_max".into(),
        num(lens.iter().cloned().fold(0.0, f64::max)),
    );
    let trunc = kept
        .iter()
        .filter(|s| s.completion.finish_reason == FinishReason::Length)
        .count();
    mt.insert(
        "truncated_fraction".into(),
        num(trunc as f64 / rows.max(1) as f64),
    );
    mt.insert(
        "zero_std_fraction".into(),
        num(zero_groups as f64 / groups_seen.max(1) as f64),
    );
    mt.insert("num_groups".into(), json!(rows / gs));
    mt.insert("resample_rounds".into(), json!(rounds_used));
    mt.insert(
        "grad_norm".into(),
        num(mean(
            &norms
                .iter()
                .cloned()
                .filter(|x| x.is_finite())
                .collect::<Vec<_>>(),
        )),
    );
    mt.insert("lr".into(), num(lr));
    mt.insert("logprob_mismatch".into(), num(mean(&mism)));
    let (loads, imbalance) = expert_load(&counts);
    mt.insert("expert_load".into(), json!(loads));
    mt.insert(
        "expert_imbalance".into(),
        imbalance.map_or(Value::Null, num),
    );
    mt.insert(
        "aux_loss".into(),
        if aux_vals.is_empty() {
            Value::Null
        } else {
            num(mean(&aux_vals))
        },
    );
    mt.insert("updates".into(), json!(updates));
    mt.insert("skipped_updates".into(), json!(skipped));
    let all_skipped = updates > 0 && skipped == updates;
    mt.insert("skipped".into(), json!(all_skipped));
    mt.insert("time_rollout".into(), num(time_rollout));
    mt.insert("time_reference".into(), num(time_reference));
    mt.insert("time_policy".into(), num(time_policy));
    let time_step = t_step.elapsed().as_secs_f64();
    mt.insert("time_step".into(), num(time_step));
    mt.insert(
        "rollout_tokens_per_second".into(),
        num(generated_tokens as f64 / time_rollout.max(1e-9)),
    );
    mt.insert(
        "tokens_per_second".into(),
        num(generated_tokens as f64 / time_step.max(1e-9)),
    );
    mt.insert(
        "peak_rss_mib".into(),
        peak_rss_mib().map_or(Value::Null, num),
    );
    let _ = all_rewards;

    let samples = kept
        .iter()
        .zip(&advantages)
        .take(cfg.run.samples_per_step)
        .map(|(s, a)| {
            // The prompt as the model saw it (rendered by the run's template, as TRL logs it).
            let prompt = &ctx.train[s.sample].prompt;
            let prompt_text = ctx
                .template
                .render(prompt)
                .unwrap_or_else(|_| prompt.user_text().unwrap_or("").to_string());
            let comps: Map<String, Value> = ctx
                .rewards
                .names()
                .iter()
                .zip(&s.components)
                .map(|(n, c)| (n.to_string(), c.map_or(Value::Null, |x| num(x as f64))))
                .collect();
            json!({
                "stage": "grpo",
                "step": step + 1,
                "prompt": prompt_text,
                "completion": s.completion.text.clone().unwrap_or_default(),
                "reward": num(s.reward as f64),
                "rewards": comps,
                "advantage": num(*a as f64),
                "finish_reason": s.completion.finish_reason.as_str(),
                "tokens": s.completion.tokens.len(),
            })
        })
        .collect();
    Ok((
        model,
        StepOutput {
            metrics: mt,
            samples,
            skipped: all_skipped,
        },
    ))
}

fn masked_count(l: &Layout, row_mask: &[f32]) -> f64 {
    let m = l.max_completion;
    (0..l.rows)
        .map(|r| l.mask[r * m..(r + 1) * m].iter().sum::<f32>() as f64 * row_mask[r] as f64)
        .sum()
}

#[allow(clippy::too_many_arguments)]
/// The evaluation a run does every `eval.eval_every` steps: [`crate::eval::evaluate`] on the
/// first `eval.n` held-out problems with the `[eval]` options (`samples_per_problem` samples,
/// greedy unless `eval.temperature` > 0). Returns the metrics (`eval/pass@1`, `eval/maj@k`,
/// `eval/format_rate`, …) and the first `eval.samples` completions as `samples.jsonl` lines.
pub fn evaluate(
    cfg: &Config,
    model: &MoeModel,
    tok: &Tokenizer,
    template: &Template,
    rewards: &CombinedReward,
    eval: &[Sample],
    accuracy_reward: Option<&str>,
    step: usize,
) -> Result<(Map<String, Value>, Vec<Value>), TrainError> {
    let n = cfg.eval.n.min(eval.len());
    let opts = crate::compare::comparison_options(cfg, accuracy_reward.map(str::to_string));
    let out = crate::eval::evaluate(model, tok, &eval[..n], template, rewards, &opts)?;
    let samples = out
        .samples
        .iter()
        .take(cfg.eval.samples)
        .map(|s| {
            json!({"stage": "eval", "step": step, "prompt": s.prompt, "completion": s.completion,
                   "reward": num(s.reward), "rewards": s.rewards, "solved": s.correct})
        })
        .collect();
    Ok((out.report.to_metrics("eval/"), samples))
}
