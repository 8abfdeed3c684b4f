//! One GRPO step: sample P prompts × G completions → rewards → group-relative advantages →
//! μ passes of clipped policy-gradient updates over mini-batches (TRL's `GRPOTrainer`, verl's
//! actor update), with optional KL to a frozen reference and DAPO's dynamic sampling.
//!
//! Randomness: the prompts come from a seeded order at the saved cursor, and the sampling seed
//! of step s, round r is derived from (run seed, rollout seed, s, r), so a step is a pure
//! function of the weights, the optimizer state, the cursor and the step number.

use std::ops::Range;
use std::time::Instant;

use burn::prelude::*;
use serde_json::{Map, Value, json};
use sobre_data::{Sample, Template, Tokenizer};
use sobre_model::{ForwardOptions, InferenceModel, MoeModel, RouteTotals};
use sobre_reward::CombinedReward;
use sobre_rollout::{
    Completion, FinishReason, Prompt, SamplingParams, completion_logprobs_host, generate,
};

use crate::TrainError;
use crate::advantages::{ScaleRewards, group_advantages, mean_std, zero_std_groups};
use crate::config::Config;
use crate::data::{Detok, Order, derive_seed, encode_prompt, reward_sample};
use crate::kl::KlEstimator;
use crate::losses::{
    LossSettings, PolicyLossInput, clip_fractions, host_log_ratios, is_sequence_level,
    policy_loss_fn, shard_weight,
};
use crate::metrics::{add_counts, add_shard_counts, expert_load, num, peak_rss_mib};
use crate::optim::{AdamW, apply_gradients, sharded_gradients};
use crate::parallel::{par_map, split_range};
use crate::score::{Layout, host, score};

/// The frozen reference model, with its host copy where the host engine serves it (the CPU
/// backend): made once per run, since the reference never changes.
pub struct Reference {
    pub model: MoeModel,
    host: Option<InferenceModel>,
}

impl Reference {
    pub fn new(model: MoeModel) -> Self {
        let host = InferenceModel::for_model(&model);
        Reference { model, host }
    }
}

/// What a GRPO step needs besides the model and optimizer.
pub struct GrpoContext<'a> {
    pub cfg: &'a Config,
    pub tok: &'a Tokenizer,
    pub template: &'a Template,
    pub rewards: &'a CombinedReward,
    pub train: &'a [Sample],
    /// The frozen reference (non-autodiff), when `beta > 0`.
    pub reference: Option<&'a Reference>,
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

/// What one data-parallel shard of a mini-batch update reports: sums over its tokens, so the
/// mini-batch's figures are the same whatever the number of shards.
#[derive(Default)]
struct ShardStats {
    /// Tokens in the loss (row mask applied).
    tokens: f64,
    /// Clipped-below and clipped-above tokens.
    clip_lo: f64,
    clip_hi: f64,
    /// Σ KL over the loss's tokens, when a reference is on.
    kl: Option<f64>,
    /// The shard's share of the mini-batch's router balance loss.
    aux: Option<f64>,
    /// First pass only: scored tokens, Σ entropy, Σ |logp − rollout logp|.
    scored_tokens: f64,
    entropy: f64,
    mismatch: f64,
    expert_counts: Vec<Vec<u32>>,
}

/// A shard's forward, kept for its loss: shard index, scores, and its `[rows · tokens]` loss
/// mask, advantages and rollout log-probabilities.
type ShardForward = (usize, crate::score::Scored, Vec<f32>, Vec<f32>, Vec<f32>);

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
            data_parallel_size: cfg.run.data_parallel_size,
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

    // ---- mini-batches, their data-parallel shards, reference logprobs ----
    let mb = cfg.mini_batch().min(rows.max(1));
    let chunks: Vec<Range<usize>> = (0..rows)
        .step_by(mb.max(1))
        .map(|s| s..(s + mb).min(rows))
        .collect();
    // shards[ci]: the row ranges of mini-batch ci, one per replica; each pads to its own width.
    let shards: Vec<Vec<Range<usize>>> = chunks
        .iter()
        .map(|r| split_range(r.clone(), cfg.run.data_parallel_size))
        .collect();
    let layouts: Vec<Vec<Layout>> = shards
        .iter()
        .map(|ranges| {
            ranges
                .iter()
                .map(|r| {
                    let pairs: Vec<(&[u32], &[u32])> = kept[r.clone()]
                        .iter()
                        .map(|s| (s.prompt_ids.as_slice(), s.completion.tokens.as_slice()))
                        .collect();
                    Layout::new(&pairs, pad)
                })
                .collect()
        })
        .collect();
    // Rows with an empty completion cannot be scored (no token to predict); they are masked.
    let t1 = Instant::now();
    let kl_est = KlEstimator::from_name(&g.kl_estimator).unwrap_or(KlEstimator::K3);
    let temperature = cfg.rollout.temperature;
    // The reference is never trained: on the CPU it runs on the host engine, without autodiff.
    let reference = ctx.reference.filter(|_| g.beta > 0.0);
    let ref_lp: Vec<Vec<Option<Vec<f32>>>> = layouts
        .iter()
        .map(|ls| match reference {
            Some(r) => par_map(ls, |l| {
                (l.max_completion > 0).then(|| match &r.host {
                    Some(h) => completion_logprobs_host(h, l, temperature),
                    None => {
                        host(score(&r.model, l, temperature, ForwardOptions::default(), false).logp)
                    }
                })
            }),
            None => vec![None; ls.len()],
        })
        .collect();
    let time_reference = t1.elapsed().as_secs_f64();

    // ---- policy updates ----
    let t2 = Instant::now();
    let loss_fn = policy_loss_fn(&g.loss).unwrap_or(crate::losses::grpo);
    let seq_level = is_sequence_level(&g.loss);
    // Masked tokens of each shard (the row mask applied).
    let shard_tokens: Vec<Vec<f64>> = layouts
        .iter()
        .zip(&shards)
        .map(|(ls, ranges)| {
            ls.iter()
                .zip(ranges)
                .map(|(l, r)| masked_count(l, &row_mask[r.clone()]))
                .collect()
        })
        .collect();
    let total_tokens: f64 = shard_tokens.iter().flatten().sum();
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
        for (ci, chunk) in chunks.iter().enumerate() {
            if layouts[ci].iter().all(|l| l.max_completion == 0) {
                continue;
            }
            let mb_tokens: f64 = shard_tokens[ci].iter().sum();
            // One shard's forward; then, given the mini-batch's routing totals, its loss
            // (weighted into the mini-batch's) and its host statistics.
            let forward = |model: &MoeModel, si: usize| {
                let (layout, range) = (&layouts[ci][si], shards[ci][si].clone());
                let m = layout.max_completion;
                if m == 0 {
                    return (None, None);
                }
                let mut mask = layout.mask.clone();
                let mut adv = vec![0.0f32; layout.rows * m];
                let mut rollout_lp = vec![0.0f32; layout.rows * m];
                for (r, gi) in range.enumerate() {
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
                let scored = score(model, layout, temperature, opts, it == 0);
                let routes = scored.router.aux_parts.as_ref().map(|p| p.totals.clone());
                (Some((si, scored, mask, adv, rollout_lp)), routes)
            };
            let finish = |state: Option<ShardForward>, routes: Option<&RouteTotals>| {
                let Some((si, scored, mask, adv, rollout_lp)) = state else {
                    return (None, ShardStats::default());
                };
                let (layout, range) = (&layouts[ci][si], shards[ci][si].clone());
                let m = layout.max_completion;
                let logp_host = host(scored.logp.clone());
                let (old, old_host) = if g.num_iterations > 1 {
                    (
                        layout.tensor(rollout_lp.clone(), &device),
                        rollout_lp.clone(),
                    )
                } else {
                    (scored.logp.clone().detach(), logp_host.clone())
                };
                let input = PolicyLossInput {
                    logp: scored.logp.clone(),
                    old_logp: old,
                    ref_logp: ref_lp[ci][si]
                        .as_ref()
                        .map(|v| layout.tensor(v.clone(), &device)),
                    advantages: layout.tensor(adv.clone(), &device),
                    mask: layout.tensor(mask.clone(), &device),
                };
                let weight = shard_weight(
                    &g.loss,
                    range.len(),
                    chunk.len(),
                    shard_tokens[ci][si],
                    mb_tokens,
                );
                let mut loss = loss_fn(&input, &settings);
                if weight != 1.0 {
                    loss = loss * weight;
                }
                let mut st = ShardStats::default();
                if let (Some(parts), Some(batch)) = (&scored.router.aux_parts, routes)
                    && aux_coef > 0.0
                {
                    // This shard's share of the mini-batch's balance loss: the same loss as
                    // one forward over the whole mini-batch.
                    let aux = parts.loss_in(batch);
                    st.aux = Some(host(aux.clone()).first().copied().unwrap_or(f32::NAN) as f64);
                    loss = loss + aux * aux_coef;
                }
                let lr_host = host_log_ratios(&logp_host, &old_host, &mask, m, seq_level);
                let (lo, hi) = clip_fractions(
                    &lr_host,
                    &adv,
                    &mask,
                    settings.epsilon,
                    settings.epsilon_high,
                );
                st.tokens = mask.iter().filter(|&&x| x > 0.0).count() as f64;
                (st.clip_lo, st.clip_hi) = (lo * st.tokens, hi * st.tokens);
                if let Some(rl) = &ref_lp[ci][si] {
                    st.kl = Some(
                        logp_host
                            .iter()
                            .zip(rl)
                            .zip(&mask)
                            .filter(|(_, m)| **m > 0.0)
                            .map(|((a, b), _)| kl_est.host(*a, *b) as f64)
                            .sum(),
                    );
                }
                if it == 0 {
                    st.scored_tokens = layout.mask.iter().filter(|&&x| x > 0.0).count() as f64;
                    st.entropy = scored
                        .entropy
                        .iter()
                        .zip(&layout.mask)
                        .filter(|(_, m)| **m > 0.0)
                        .map(|(e, _)| *e as f64)
                        .sum();
                    st.mismatch = logp_host
                        .iter()
                        .zip(&rollout_lp)
                        .zip(&layout.mask)
                        .filter(|(_, m)| **m > 0.0)
                        .map(|((a, b), _)| (a - b).abs() as f64)
                        .sum();
                }
                st.expert_counts = scored.router.expert_counts.clone();
                (Some(loss), st)
            };
            let (loss_value, grads, stats) =
                sharded_gradients(&model, shards[ci].len(), aux_coef > 0.0, forward, finish);
            // Mini-batch statistics from the shards' sums.
            let sum = |f: fn(&ShardStats) -> f64| stats.iter().map(f).sum::<f64>();
            let n_tok = sum(|s| s.tokens).max(1.0);
            clip_lo.push(sum(|s| s.clip_lo) / n_tok);
            clip_hi.push(sum(|s| s.clip_hi) / n_tok);
            if stats.iter().any(|s| s.kl.is_some()) {
                kls.push(sum(|s| s.kl.unwrap_or(0.0)) / n_tok);
            }
            if stats.iter().any(|s| s.aux.is_some()) {
                aux_vals.push(sum(|s| s.aux.unwrap_or(0.0)));
            }
            let mut batch_counts: Vec<Vec<u32>> = vec![];
            for s in &stats {
                add_shard_counts(&mut batch_counts, &s.expert_counts);
            }
            if it == 0 {
                let scored_tokens = sum(|s| s.scored_tokens).max(1.0);
                ents.push(sum(|s| s.entropy) / scored_tokens);
                mism.push(sum(|s| s.mismatch) / scored_tokens);
                add_counts(&mut counts, &batch_counts);
            }
            let (next, outcome) = apply_gradients(model, grads, opt, lr, cfg.optim.max_grad_norm);
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
