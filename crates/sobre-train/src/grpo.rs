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
use sobre_model::{ForwardOptions, InferenceModel, ModelConfig, MoeModel, RouteTotals};
use sobre_reward::CombinedReward;
use sobre_rollout::{Completion, FinishReason, Prompt, SamplingParams, completion_logprobs_host};

use crate::TrainError;
use crate::advantages::{ScaleRewards, group_advantages, mean_std, zero_std_groups};
use crate::config::Config;
use crate::cost::{TRAIN_FLOPS_FACTOR, Work, sequence_forward_flops};
use crate::data::{Detok, Order, derive_seed, encode_prompt, reward_sample};
use crate::dist;
use crate::distill::{add_teacher_advantages, reverse_kl_sum};
use crate::kl::KlEstimator;
use crate::losses::{
    LossSettings, PolicyLossFn, PolicyLossInput, clip_fractions, host_log_ratios,
    is_sequence_level, policy_loss_fn, shard_weight,
};
use crate::metrics::{add_counts, add_shard_counts, expert_load, num, peak_rss_mib};
use crate::optim::{AdamW, apply_gradients, sharded_gradients};
use crate::parallel::{par_map, split_range};
use crate::score::{Layout, host, score};
use crate::tools::{calls_json, mask_responses, tool_metrics};

/// The frozen reference model, with its host copy where the host engine serves it (the CPU
/// backend): made once per run, since the reference never changes. With LoRA there is no
/// model of its own: the reference is the policy with its adapters switched off (its frozen
/// base, TRL's `disable_adapter()`), whose host copy is made per step like the rollout's.
pub struct Reference {
    /// The model as burn tensors, kept only where the host engine cannot serve it (other
    /// backends than flex); `None` also for the LoRA base (adapters off).
    model: Option<MoeModel>,
    /// The host engine's copy: on flex the only one, so the frozen weights are held once.
    host: Option<InferenceModel>,
    /// Its shape (`None`: the policy's, with adapters off).
    pub config: Option<ModelConfig>,
}

impl Reference {
    /// A frozen model, its weight matrices in `bf16` with `bf16` (`model.frozen_dtype`).
    ///
    /// # Errors
    /// `bf16` on a backend without the host engine (it is the one that stores `bf16`).
    pub fn new(model: MoeModel, bf16: bool) -> Result<Self, TrainError> {
        let config = Some(model.config.clone());
        match InferenceModel::for_model(&model) {
            Some(h) => Ok(Reference {
                model: None,
                host: Some(if bf16 { h.into_bf16() } else { h }),
                config,
            }),
            None if bf16 => Err(TrainError::Data(
                "model.frozen_dtype = \"bf16\" needs the cpu device (the host engine stores \
                 the frozen weights in bf16)"
                    .into(),
            )),
            None => Ok(Reference {
                model: Some(model),
                host: None,
                config,
            }),
        }
    }

    /// The reference of a LoRA run: the policy's base (adapters off), sharing its tensors.
    pub fn adapters_off() -> Self {
        Reference {
            model: None,
            host: None,
            config: None,
        }
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
    /// The on-policy distillation teacher of `grpo.teacher` ([`crate::distill`]).
    pub teacher: Option<&'a Reference>,
    /// The tools completions may call (`[tools]`, [`crate::tools`]).
    pub tools: Option<&'a dyn sobre_rollout::Tools>,
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

/// What sampling and scoring leave: the `P × G` completions kept for the update (whole
/// groups, in prompt order) and what the rounds of dynamic sampling saw on the way.
struct Rollout {
    kept: Vec<Scored>,
    /// Groups scored over all rounds, and how many of them had zero reward variance.
    groups_seen: usize,
    zero_groups: usize,
    generated_tokens: usize,
    /// Estimated FLOPs of generating every completion sampled (prompt and completion).
    generation_flops: f64,
    rounds_used: usize,
}

/// The update's per-row inputs: `rewards[i]`, `advantages[i]`, `row_mask[i]` (0 for a row the
/// loss ignores: a truncated completion under `mask_truncated_completions`).
struct Advantages {
    rewards: Vec<f32>,
    advantages: Vec<f32>,
    row_mask: Vec<f32>,
}

/// The step's rows cut into mini-batches, and each mini-batch into one contiguous shard per
/// data-parallel replica; each shard pads to its own width.
struct Batches {
    /// `chunks[ci]`: the rows of mini-batch `ci`.
    chunks: Vec<Range<usize>>,
    /// `shards[ci][si]`: the rows of shard `si` of mini-batch `ci`.
    shards: Vec<Vec<Range<usize>>>,
    layouts: Vec<Vec<Layout>>,
    /// Tokens in the loss of each shard (its row mask applied).
    shard_tokens: Vec<Vec<f64>>,
}

/// A frozen model's (the reference's, the teacher's) log-probabilities of each shard's
/// completion tokens (`[rows · width]`, like its layout), `None` without that model or for a
/// shard with nothing to score.
type ReferenceLogprobs = Vec<Vec<Option<Vec<f32>>>>;

/// What one data-parallel shard of a mini-batch update reports: sums over its tokens, so the
/// mini-batch's figures are the same whatever the number of shards.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct ShardStats {
    /// Tokens in the loss (row mask applied).
    tokens: f64,
    /// Clipped-below and clipped-above tokens.
    clip_lo: f64,
    clip_hi: f64,
    /// Σ KL over the loss's tokens, when a reference is on.
    kl: Option<f64>,
    /// First pass only: Σ (sampled − teacher log-prob) over the loss's tokens, with a teacher.
    teacher_kl: Option<f64>,
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

/// What the updates of a step report, one entry per mini-batch update (the entropy, the
/// log-prob mismatch and the expert counts from the first pass only).
#[derive(Default)]
struct UpdateStats {
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
    kls: Vec<f64>,
    teacher_kls: Vec<f64>,
    entropies: Vec<f64>,
    mismatches: Vec<f64>,
    clip_lo: Vec<f64>,
    clip_hi: Vec<f64>,
    aux: Vec<f64>,
    expert_counts: Vec<Vec<u64>>,
    updates: usize,
    skipped: usize,
}

/// Seconds spent in each phase of a step.
struct Timings {
    rollout: f64,
    reference: f64,
    teacher: f64,
    policy: f64,
    step: f64,
}

/// The result of a step.
pub struct StepOutput {
    pub metrics: Map<String, Value>,
    pub samples: Vec<Value>,
    /// Every update of the step was skipped (non-finite).
    pub skipped: bool,
    /// Tokens and estimated FLOPs of the step, for the run's cost.
    pub work: Work,
}

/// The reward component used for accuracy / pass@1: `countdown` or `accuracy` when present.
pub fn default_accuracy_reward(cfg: &Config, rewards: &CombinedReward) -> Option<String> {
    if let Some(r) = &cfg.eval.reward {
        return Some(r.clone());
    }
    let names = rewards.names();
    ["countdown", "accuracy", "code"]
        .iter()
        .find(|n| names.contains(n))
        .map(|s| s.to_string())
}

/// Run one GRPO step (`step` is 0-based) and return the updated model: sample and score →
/// advantages → reference log-probabilities → policy update → metrics.
pub fn grpo_step(
    ctx: &GrpoContext<'_>,
    model: MoeModel,
    opt: &mut AdamW,
    order: &mut Order,
    cursor: &mut u64,
    step: usize,
    lr: f64,
) -> Result<(MoeModel, StepOutput), TrainError> {
    let t_step = Instant::now();
    let rollout = sample_and_score(ctx, &model, order, cursor, step)?;
    let time_rollout = t_step.elapsed().as_secs_f64();
    let adv = compute_advantages(ctx.cfg, &rollout.kept);
    let batches = plan_batches(ctx, &rollout.kept, &adv.row_mask);
    let work = step_work(ctx, &model.config, &rollout, &batches);
    let t_reference = Instant::now();
    let reference = ctx.reference.filter(|_| ctx.cfg.grpo.beta > 0.0);
    let ref_lp = frozen_logprobs(ctx, &model, &batches, reference);
    let time_reference = t_reference.elapsed().as_secs_f64();
    let t_teacher = Instant::now();
    let teacher_lp = frozen_logprobs(ctx, &model, &batches, ctx.teacher);
    let time_teacher = t_teacher.elapsed().as_secs_f64();
    let t_policy = Instant::now();
    let frozen = Frozen {
        reference: &ref_lp,
        teacher: &teacher_lp,
    };
    let (model, update) = update_policy(ctx, model, opt, lr, &rollout.kept, &adv, &batches, frozen);
    let timings = Timings {
        rollout: time_rollout,
        reference: time_reference,
        teacher: time_teacher,
        policy: t_policy.elapsed().as_secs_f64(),
        step: t_step.elapsed().as_secs_f64(),
    };
    let skipped = update.updates > 0 && update.skipped == update.updates;
    let metrics = step_metrics(ctx, step, lr, &rollout, &adv, &update, &timings);
    let samples = sample_lines(ctx, step, &rollout.kept, &adv.advantages);
    Ok((
        model,
        StepOutput {
            metrics,
            samples,
            skipped,
            work,
        },
    ))
}

/// The step's tokens and estimated FLOPs ([`crate::cost`]): every sampled sequence generated
/// once; each row of a mini-batch that is updated run forward and backward in each of the
/// `num_iterations` passes; and the reference's forward over every row when a KL term is on,
/// the teacher's when distilling.
fn step_work(
    ctx: &GrpoContext<'_>,
    mc: &sobre_model::ModelConfig,
    rollout: &Rollout,
    batches: &Batches,
) -> Work {
    let passes = ctx.cfg.grpo.num_iterations as u64;
    let (mut trained, mut trained_flops, mut all_flops) = (0u64, 0.0, 0.0);
    for (ci, rows) in batches.chunks.iter().enumerate() {
        let updated = batches.layouts[ci].iter().any(|l| l.max_completion > 0);
        for s in &rollout.kept[rows.clone()] {
            let len = s.prompt_ids.len() + s.completion.tokens.len();
            let flops = sequence_forward_flops(mc, len);
            all_flops += flops;
            if updated {
                trained += len as u64;
                trained_flops += flops;
            }
        }
    }
    let reference = ctx.reference.is_some() && ctx.cfg.grpo.beta > 0.0;
    // (The teacher's shape may differ from the policy's: its own FLOPs per row.)
    let teacher_flops: f64 = match ctx.teacher.and_then(|t| t.config.as_ref()) {
        Some(t) => rollout
            .kept
            .iter()
            .map(|s| sequence_forward_flops(t, s.prompt_ids.len() + s.completion.tokens.len()))
            .sum(),
        None => 0.0,
    };
    Work {
        tokens_generated: rollout.generated_tokens as u64,
        tokens_trained: passes * trained,
        flops: rollout.generation_flops
            + passes as f64 * TRAIN_FLOPS_FACTOR * trained_flops
            + if reference { all_flops } else { 0.0 }
            + teacher_flops,
    }
}

// ---- sample and score ----

/// Sample `G` completions for each of the next `P` prompts and score them; with DAPO's dynamic
/// sampling (`filter_zero_std_groups`), drop groups whose rewards all agree and sample again,
/// up to `max_resample_rounds` more rounds, until `P` groups are kept.
fn sample_and_score(
    ctx: &GrpoContext<'_>,
    model: &MoeModel,
    order: &mut Order,
    cursor: &mut u64,
    step: usize,
) -> Result<Rollout, TrainError> {
    let g = &ctx.cfg.grpo;
    let (p, gs) = (g.num_prompts, g.group_size);
    let policy = model.valid();
    let detok = Detok(ctx.tok);
    let mut out = Rollout {
        kept: Vec::new(),
        groups_seen: 0,
        zero_groups: 0,
        generated_tokens: 0,
        generation_flops: 0.0,
        rounds_used: 0,
    };
    let rounds = if g.filter_zero_std_groups {
        g.max_resample_rounds + 1
    } else {
        1
    };
    for round in 0..rounds {
        if out.kept.len() >= p * gs {
            break;
        }
        out.rounds_used += 1;
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
                ctx.cfg.run.seed ^ ctx.cfg.rollout.seed,
                &[1, step as u64, round as u64],
            ),
            data_parallel_size: ctx.cfg.run.data_parallel_size,
            ..ctx.cfg.rollout.clone()
        };
        let completions =
            dist::generate_all(&policy, &requests, gs, &params, Some(&detok), ctx.tools)?;
        out.generated_tokens += completions.iter().map(|c| c.tokens.len()).sum::<usize>();
        out.generation_flops += completions
            .iter()
            .map(|c| {
                let len = requests[c.prompt_index].ids.len() + c.tokens.len();
                sequence_forward_flops(&model.config, len)
            })
            .sum::<f64>();
        let scored = score_completions(ctx, &prompts, completions)?;
        let rewards: Vec<f32> = scored.iter().map(|s| s.reward).collect();
        let zero = zero_std_groups(&rewards, gs);
        out.groups_seen += zero.len();
        out.zero_groups += zero.iter().filter(|&&z| z).count();
        let mut groups = scored.into_iter();
        for &z in &zero {
            let group: Vec<Scored> = groups.by_ref().take(gs).collect();
            if (g.filter_zero_std_groups && z) || out.kept.len() >= p * gs {
                continue;
            }
            out.kept.extend(group);
        }
    }
    Ok(out)
}

/// Each completion's total reward and its components, from the verifiers of the run, scored
/// as one batch (so a verifier that runs programs runs them in parallel). A verifier that
/// cannot score (a `command` program that keeps crashing) stops the step with its error.
fn score_completions(
    ctx: &GrpoContext<'_>,
    prompts: &[(usize, Vec<u32>)],
    completions: Vec<Completion>,
) -> Result<Vec<Scored>, TrainError> {
    let max_tokens = ctx.cfg.rollout.max_new_tokens;
    let texts: Vec<String> = completions
        .iter()
        .map(|c| c.text.clone().unwrap_or_default())
        .collect();
    let samples: Vec<sobre_reward::Sample> = completions
        .iter()
        .map(|c| reward_sample(&ctx.train[prompts[c.prompt_index].0]))
        .collect();
    let items: Vec<(&sobre_reward::Sample, sobre_reward::Completion<'_>)> = completions
        .iter()
        .zip(&texts)
        .zip(&samples)
        .map(|((c, text), sample)| {
            let rc = sobre_reward::Completion {
                text,
                num_tokens: Some(c.tokens.len()),
                truncated: c.finish_reason == FinishReason::Length,
                max_tokens: Some(max_tokens),
            };
            (sample, rc)
        })
        .collect();
    let scores = ctx
        .rewards
        .score_batch(&items)
        .map_err(|e| TrainError::Reward(e.to_string()))?;
    drop(items);
    Ok(completions
        .into_iter()
        .zip(scores)
        .map(|(c, b)| {
            let (sample, ids) = &prompts[c.prompt_index];
            Scored {
                prompt_ids: ids.clone(),
                sample: *sample,
                completion: c,
                reward: b.total,
                components: b.components.into_iter().map(|(_, s)| s).collect(),
            }
        })
        .collect())
}

// ---- advantages, mini-batches, reference ----

/// Group-relative advantages of the kept rows (scaled as `scale_rewards` says) and the row
/// mask.
fn compute_advantages(cfg: &Config, kept: &[Scored]) -> Advantages {
    let g = &cfg.grpo;
    let rewards: Vec<f32> = kept.iter().map(|s| s.reward).collect();
    let scale = ScaleRewards::from_name(&g.scale_rewards).unwrap_or(ScaleRewards::Group);
    let advantages = if kept.is_empty() || g.teacher_only {
        // (Pure distillation: the teacher's per-token signal is the whole advantage.)
        vec![0.0; kept.len()]
    } else {
        group_advantages(&rewards, g.group_size, scale)
    };
    let row_mask = kept
        .iter()
        .map(|s| {
            let truncated = s.completion.finish_reason == FinishReason::Length;
            if g.mask_truncated_completions && truncated {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Advantages {
        rewards,
        advantages,
        row_mask,
    }
}

/// Cut the rows into mini-batches of `mini_batch_size` and each into `data_parallel_size`
/// shards, with each shard's padded layout and its count of loss tokens.
fn plan_batches(ctx: &GrpoContext<'_>, kept: &[Scored], row_mask: &[f32]) -> Batches {
    let cfg = ctx.cfg;
    let pad = ctx.tok.special().pad;
    let rows = kept.len();
    let mb = cfg.mini_batch().min(rows.max(1));
    let chunks: Vec<Range<usize>> = (0..rows)
        .step_by(mb.max(1))
        .map(|s| s..(s + mb).min(rows))
        .collect();
    let shards: Vec<Vec<Range<usize>>> = chunks
        .iter()
        .map(|r| split_range(r.clone(), dist::total_replicas(cfg.run.data_parallel_size)))
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
                    // Recomputed layers take no cache, so no shared prefix either.
                    let share = !cfg.grpo.gradient_checkpointing;
                    let mut layout = Layout::with_prefix_sharing(&pairs, pad, share);
                    if ctx.tools.is_some() {
                        let rows: Vec<&Completion> =
                            kept[r.clone()].iter().map(|s| &s.completion).collect();
                        mask_responses(&mut layout, &rows);
                    }
                    layout
                })
                .collect()
        })
        .collect();
    let shard_tokens = layouts
        .iter()
        .zip(&shards)
        .map(|(ls, ranges)| {
            ls.iter()
                .zip(ranges)
                .map(|(l, r)| masked_count(l, &row_mask[r.clone()]))
                .collect()
        })
        .collect();
    Batches {
        chunks,
        shards,
        layouts,
        shard_tokens,
    }
}

/// A frozen model's log-probabilities of every shard's completions (the KL reference's when
/// `beta > 0`, the distillation teacher's), at the rollout temperature. It is never trained: on
/// the CPU it runs on the host engine, without autodiff. Rows with an empty completion cannot
/// be scored (no token to predict); they are masked. A LoRA reference
/// ([`Reference::adapters_off`]) is `policy` with its adapters off.
/// Where a frozen model's log-probabilities are computed.
#[derive(Clone, Copy)]
enum FrozenModel<'a> {
    Host(&'a InferenceModel),
    Tensors(&'a MoeModel),
}

fn frozen_logprobs(
    ctx: &GrpoContext<'_>,
    policy: &MoeModel,
    batches: &Batches,
    frozen: Option<&Reference>,
) -> ReferenceLogprobs {
    let temperature = ctx.cfg.rollout.temperature;
    let Some(r) = frozen else {
        return batches
            .layouts
            .iter()
            .map(|ls| vec![None; ls.len()])
            .collect();
    };
    let base;
    let base_host;
    let frozen = match (&r.host, &r.model) {
        (Some(h), _) => FrozenModel::Host(h),
        (None, Some(m)) => FrozenModel::Tensors(m),
        (None, None) => {
            base = policy.valid().with_adapters_enabled(false);
            base_host = InferenceModel::for_model(&base);
            match &base_host {
                Some(h) => FrozenModel::Host(h),
                None => FrozenModel::Tensors(&base),
            }
        }
    };
    batches
        .layouts
        .iter()
        .map(|ls| {
            // Only this rank's shards: the others' are read by the ranks that run them.
            let mine = dist::local_shards(ls.len());
            let all: Vec<(usize, &Layout)> = ls.iter().enumerate().collect();
            par_map(&all, |&(si, l)| {
                (mine.contains(&si) && l.max_completion > 0).then(|| match frozen {
                    FrozenModel::Host(h) => completion_logprobs_host(h, l, temperature),
                    FrozenModel::Tensors(m) => {
                        host(score(m, l, temperature, ForwardOptions::default(), false).logp)
                    }
                })
            })
        })
        .collect()
}

// ---- policy update ----

/// The frozen models' log-probabilities of a step's rows, by mini-batch and shard.
#[derive(Clone, Copy)]
struct Frozen<'a> {
    reference: &'a ReferenceLogprobs,
    teacher: &'a ReferenceLogprobs,
}

/// What every shard's loss of one mini-batch, in one pass, reads.
struct MiniBatch<'a> {
    /// Index of the mini-batch, and the pass over the step's data (`0..num_iterations`).
    ci: usize,
    pass: usize,
    kept: &'a [Scored],
    adv: &'a Advantages,
    batches: &'a Batches,
    ref_lp: &'a [Option<Vec<f32>>],
    teacher_lp: &'a [Option<Vec<f32>>],
    teacher_coef: f32,
    settings: &'a LossSettings,
    loss: &'a str,
    loss_fn: PolicyLossFn,
    seq_level: bool,
    /// `num_iterations > 1`: the old log-probabilities are the rollout's, not this forward's.
    old_from_rollout: bool,
    aux_coef: f64,
    temperature: f32,
    /// `grpo.gradient_checkpointing`.
    recompute: bool,
    device: Device,
    /// Seed of the LoRA dropout masks of this update (`lora.dropout > 0`), per shard.
    dropout_seed: Option<u64>,
}

/// μ passes over the mini-batches, one optimizer step each (the shards' gradients summed).
#[allow(clippy::too_many_arguments)]
fn update_policy(
    ctx: &GrpoContext<'_>,
    mut model: MoeModel,
    opt: &mut AdamW,
    lr: f64,
    kept: &[Scored],
    adv: &Advantages,
    batches: &Batches,
    frozen: Frozen<'_>,
) -> (MoeModel, UpdateStats) {
    let (cfg, g) = (ctx.cfg, &ctx.cfg.grpo);
    let total_tokens: f64 = batches.shard_tokens.iter().flatten().sum();
    let settings = LossSettings {
        epsilon: g.epsilon,
        epsilon_high: cfg.epsilon_high(),
        beta: g.beta,
        kl: KlEstimator::from_name(&g.kl_estimator).unwrap_or(KlEstimator::K3),
        max_completion_length: cfg.rollout.max_new_tokens,
        dapo_normalizer: total_tokens / batches.chunks.len().max(1) as f64,
    };
    let aux_coef = g.aux_loss_coef.unwrap_or(model.config.router_aux_loss_coef);
    let mut stats = UpdateStats::default();
    for pass in 0..g.num_iterations {
        for ci in 0..batches.chunks.len() {
            if batches.layouts[ci].iter().all(|l| l.max_completion == 0) {
                continue;
            }
            let mb = MiniBatch {
                ci,
                pass,
                kept,
                adv,
                batches,
                ref_lp: &frozen.reference[ci],
                teacher_lp: &frozen.teacher[ci],
                teacher_coef: g.teacher_coef.unwrap_or(1.0) as f32,
                settings: &settings,
                loss: &g.loss,
                loss_fn: policy_loss_fn(&g.loss).unwrap_or(crate::losses::grpo),
                seq_level: is_sequence_level(&g.loss),
                old_from_rollout: g.num_iterations > 1,
                aux_coef,
                temperature: cfg.rollout.temperature,
                recompute: cfg.grpo.gradient_checkpointing,
                device: model.device(),
                // The optimizer's step counts every update of the run (and is checkpointed).
                dropout_seed: cfg
                    .lora
                    .as_ref()
                    .map(|_| derive_seed(cfg.run.seed, &[6, opt.step])),
            };
            model = minibatch_update(cfg, &mb, model, opt, lr, &mut stats);
        }
    }
    (model, stats)
}

/// One optimizer step on one mini-batch: the shards' forwards and losses on their replicas,
/// the gradients summed, AdamW, and (first pass) DeepSeek-V3's expert-bias nudge.
fn minibatch_update(
    cfg: &Config,
    mb: &MiniBatch<'_>,
    model: MoeModel,
    opt: &mut AdamW,
    lr: f64,
    acc: &mut UpdateStats,
) -> MoeModel {
    let n_shards = mb.batches.shards[mb.ci].len();
    let (loss_value, grads, stats) = sharded_gradients(
        &model,
        n_shards,
        mb.aux_coef > 0.0,
        |m, si| mb.forward(m, si),
        |state, routes| mb.finish(state, routes),
    );
    // Mini-batch statistics from the shards' sums.
    let sum = |f: fn(&ShardStats) -> f64| stats.iter().map(f).sum::<f64>();
    let n_tok = sum(|s| s.tokens).max(1.0);
    acc.clip_lo.push(sum(|s| s.clip_lo) / n_tok);
    acc.clip_hi.push(sum(|s| s.clip_hi) / n_tok);
    if stats.iter().any(|s| s.kl.is_some()) {
        acc.kls.push(sum(|s| s.kl.unwrap_or(0.0)) / n_tok);
    }
    if stats.iter().any(|s| s.teacher_kl.is_some()) {
        acc.teacher_kls
            .push(sum(|s| s.teacher_kl.unwrap_or(0.0)) / n_tok);
    }
    if stats.iter().any(|s| s.aux.is_some()) {
        acc.aux.push(sum(|s| s.aux.unwrap_or(0.0)));
    }
    let mut batch_counts: Vec<Vec<u32>> = vec![];
    for s in &stats {
        add_shard_counts(&mut batch_counts, &s.expert_counts);
    }
    if mb.pass == 0 {
        let scored_tokens = sum(|s| s.scored_tokens).max(1.0);
        acc.entropies.push(sum(|s| s.entropy) / scored_tokens);
        acc.mismatches.push(sum(|s| s.mismatch) / scored_tokens);
        add_counts(&mut acc.expert_counts, &batch_counts);
    }
    let (mut model, outcome) = apply_gradients(model, grads, opt, lr, cfg.optim.max_grad_norm);
    acc.losses.push(loss_value);
    acc.grad_norms.push(outcome.grad_norm);
    acc.updates += 1;
    if outcome.skipped {
        acc.skipped += 1;
    } else if model.config.aux_loss_free_bias && mb.pass == 0 && cfg.lora.is_none() {
        // (With LoRA the whole base is frozen, the expert biases included.)
        // DeepSeek-V3's aux-loss-free balancing: nudge biases by this batch's load.
        let rate = model.config.bias_update_rate as f32;
        model.update_expert_bias(&batch_counts, rate);
    }
    model
}

impl MiniBatch<'_> {
    /// One shard's forward (its replica `model`), with its routing totals for the balance loss.
    fn forward(&self, model: &MoeModel, si: usize) -> (Option<ShardForward>, Option<RouteTotals>) {
        let (layout, range) = (
            &self.batches.layouts[self.ci][si],
            self.batches.shards[self.ci][si].clone(),
        );
        let m = layout.max_completion;
        if m == 0 {
            return (None, None);
        }
        let mut mask = layout.mask.clone();
        let mut adv = vec![0.0f32; layout.rows * m];
        let mut rollout_lp = vec![0.0f32; layout.rows * m];
        for (r, gi) in range.enumerate() {
            for i in 0..m {
                mask[r * m + i] *= self.adv.row_mask[gi];
                adv[r * m + i] = self.adv.advantages[gi];
            }
            for (i, &lp) in self.kept[gi].completion.logprobs.iter().enumerate().take(m) {
                rollout_lp[r * m + i] = lp;
            }
        }
        if let Some(t) = &self.teacher_lp[si] {
            add_teacher_advantages(&mut adv, t, &rollout_lp, &mask, self.teacher_coef);
        }
        let opts = ForwardOptions {
            aux_loss: self.aux_coef > 0.0,
            recompute_layers: self.recompute,
            ..Default::default()
        };
        let _dropout = self
            .dropout_seed
            .map(|s| sobre_model::lora::dropout_scope(derive_seed(s, &[si as u64])));
        let scored = score(model, layout, self.temperature, opts, self.pass == 0);
        let routes = scored.router.aux_parts.as_ref().map(|p| p.totals.clone());
        (Some((si, scored, mask, adv, rollout_lp)), routes)
    }

    /// Given the mini-batch's routing totals, a shard's loss (weighted into the mini-batch's)
    /// and its host statistics.
    fn finish(
        &self,
        state: Option<ShardForward>,
        routes: Option<&RouteTotals>,
    ) -> (Option<Tensor<1>>, ShardStats) {
        let Some((si, scored, mask, adv, rollout_lp)) = state else {
            return (None, ShardStats::default());
        };
        let (layout, range) = (
            &self.batches.layouts[self.ci][si],
            self.batches.shards[self.ci][si].clone(),
        );
        let logp_host = host(scored.logp.clone());
        let (old, old_host) = if self.old_from_rollout {
            (
                layout.tensor(rollout_lp.clone(), &self.device),
                rollout_lp.clone(),
            )
        } else {
            (scored.logp.clone().detach(), logp_host.clone())
        };
        let ref_lp = &self.ref_lp[si];
        let input = PolicyLossInput {
            logp: scored.logp.clone(),
            old_logp: old,
            ref_logp: ref_lp
                .as_ref()
                .map(|v| layout.tensor(v.clone(), &self.device)),
            advantages: layout.tensor(adv.clone(), &self.device),
            mask: layout.tensor(mask.clone(), &self.device),
        };
        let shard_tokens = &self.batches.shard_tokens[self.ci];
        let weight = shard_weight(
            self.loss,
            range.len(),
            self.batches.chunks[self.ci].len(),
            shard_tokens[si],
            shard_tokens.iter().sum(),
        );
        let mut loss = (self.loss_fn)(&input, self.settings);
        if weight != 1.0 {
            loss = loss * weight;
        }
        let mut st = ShardStats::default();
        if let (Some(parts), Some(batch)) = (&scored.router.aux_parts, routes)
            && self.aux_coef > 0.0
        {
            // This shard's share of the mini-batch's balance loss: the same loss as one
            // forward over the whole mini-batch.
            let aux = parts.loss_in(batch);
            st.aux = Some(host(aux.clone()).first().copied().unwrap_or(f32::NAN) as f64);
            loss = loss + aux * self.aux_coef;
        }
        self.shard_stats(
            &mut st,
            si,
            &scored,
            (&logp_host, &old_host),
            (&mask, &adv, &rollout_lp),
        );
        (Some(loss), st)
    }

    /// A shard's clipped fractions, KL, entropy and log-prob mismatch, summed over its tokens.
    fn shard_stats(
        &self,
        st: &mut ShardStats,
        si: usize,
        scored: &crate::score::Scored,
        (logp_host, old_host): (&[f32], &[f32]),
        (mask, adv, rollout_lp): (&[f32], &[f32], &[f32]),
    ) {
        let layout = &self.batches.layouts[self.ci][si];
        let (m, s) = (layout.max_completion, self.settings);
        let lr_host = host_log_ratios(logp_host, old_host, mask, m, self.seq_level);
        let (lo, hi) = clip_fractions(&lr_host, adv, mask, s.epsilon, s.epsilon_high);
        st.tokens = mask.iter().filter(|&&x| x > 0.0).count() as f64;
        (st.clip_lo, st.clip_hi) = (lo * st.tokens, hi * st.tokens);
        if let Some(rl) = &self.ref_lp[si] {
            st.kl = Some(
                logp_host
                    .iter()
                    .zip(rl)
                    .zip(mask)
                    .filter(|(_, m)| **m > 0.0)
                    .map(|((a, b), _)| s.kl.host(*a, *b) as f64)
                    .sum(),
            );
        }
        if let (Some(t), 0) = (&self.teacher_lp[si], self.pass) {
            st.teacher_kl = Some(reverse_kl_sum(t, rollout_lp, mask));
        }
        if self.pass == 0 {
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
                .zip(rollout_lp)
                .zip(&layout.mask)
                .filter(|(_, m)| **m > 0.0)
                .map(|((a, b), _)| (a - b).abs() as f64)
                .sum();
        }
        st.expert_counts = scored.router.expert_counts.clone();
    }
}

fn masked_count(l: &Layout, row_mask: &[f32]) -> f64 {
    let m = l.max_completion;
    (0..l.rows)
        .map(|r| l.mask[r * m..(r + 1) * m].iter().sum::<f32>() as f64 * row_mask[r] as f64)
        .sum()
}

// ---- metrics ----

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn num_or_null(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

/// The step's `metrics.jsonl` line (TRL's names where it has them).
fn step_metrics(
    ctx: &GrpoContext<'_>,
    step: usize,
    lr: f64,
    rollout: &Rollout,
    adv: &Advantages,
    up: &UpdateStats,
    t: &Timings,
) -> Map<String, Value> {
    let mut mt = Map::new();
    mt.insert("stage".into(), json!("grpo"));
    mt.insert("step".into(), json!(step + 1));
    reward_metrics(&mut mt, ctx, &rollout.kept, adv);
    loss_metrics(&mut mt, up);
    rollout_metrics(&mut mt, ctx.cfg.grpo.group_size, rollout);
    if ctx.tools.is_some() {
        let completions: Vec<&Completion> = rollout.kept.iter().map(|s| &s.completion).collect();
        tool_metrics(&mut mt, &completions);
    }
    optimizer_metrics(&mut mt, up, lr);
    mt.insert("updates".into(), json!(up.updates));
    mt.insert("skipped_updates".into(), json!(up.skipped));
    let all_skipped = up.updates > 0 && up.skipped == up.updates;
    mt.insert("skipped".into(), json!(all_skipped));
    mt.insert("time_rollout".into(), num(t.rollout));
    mt.insert("time_reference".into(), num(t.reference));
    if ctx.teacher.is_some() {
        mt.insert("time_teacher".into(), num(t.teacher));
    }
    mt.insert("time_policy".into(), num(t.policy));
    mt.insert("time_step".into(), num(t.step));
    let generated = rollout.generated_tokens as f64;
    mt.insert(
        "rollout_tokens_per_second".into(),
        num(generated / t.rollout.max(1e-9)),
    );
    mt.insert(
        "tokens_per_second".into(),
        num(generated / t.step.max(1e-9)),
    );
    mt.insert("peak_rss_mib".into(), num_or_null(peak_rss_mib()));
    mt
}

/// Rewards (total and per component), accuracy and advantages. (The metric functions insert
/// their keys in the order the line has always had.)
fn reward_metrics(
    mt: &mut Map<String, Value>,
    ctx: &GrpoContext<'_>,
    kept: &[Scored],
    adv: &Advantages,
) {
    let (rm, rs) = mean_std(&adv.rewards);
    mt.insert("reward_mean".into(), num(rm as f64));
    mt.insert("reward_std".into(), num(rs as f64));
    for (ci, name) in ctx.rewards.names().iter().enumerate() {
        let vals: Vec<f32> = kept.iter().filter_map(|s| s.components[ci]).collect();
        let (m, s) = mean_std(&vals);
        let some = !vals.is_empty();
        mt.insert(
            format!("rewards/{name}/mean"),
            num_or_null(some.then_some(m as f64)),
        );
        mt.insert(
            format!("rewards/{name}/std"),
            num_or_null(some.then_some(s as f64)),
        );
    }
    let acc = ctx.accuracy_reward.as_ref().and_then(|name| {
        let ci = ctx.rewards.names().iter().position(|n| n == name)?;
        let solved = kept
            .iter()
            .filter(|s| s.components[ci].unwrap_or(0.0) >= 1.0)
            .count();
        Some(solved as f64 / kept.len().max(1) as f64)
    });
    mt.insert("accuracy".into(), num_or_null(acc));
    let (am, asd) = mean_std(&adv.advantages);
    mt.insert("advantage_mean".into(), num(am as f64));
    mt.insert("advantage_std".into(), num(asd as f64));
    let abs_max = adv.advantages.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    mt.insert("advantage_abs_max".into(), num(abs_max as f64));
}

/// The update's loss, KL, clipped fractions and entropy.
fn loss_metrics(mt: &mut Map<String, Value>, up: &UpdateStats) {
    mt.insert("loss".into(), num(mean(&up.losses)));
    mt.insert(
        "kl".into(),
        num_or_null((!up.kls.is_empty()).then(|| mean(&up.kls))),
    );
    if !up.teacher_kls.is_empty() {
        mt.insert("teacher/reverse_kl".into(), num(mean(&up.teacher_kls)));
    }
    let (lo, hi) = (mean(&up.clip_lo), mean(&up.clip_hi));
    mt.insert("clip_fraction".into(), num(lo + hi));
    mt.insert("clip_fraction_low".into(), num(lo));
    mt.insert("clip_fraction_high".into(), num(hi));
    mt.insert("entropy".into(), num(mean(&up.entropies)));
}

/// Gradient norm (of the finite ones), lr, rollout/training log-prob mismatch, expert load
/// and balance loss.
fn optimizer_metrics(mt: &mut Map<String, Value>, up: &UpdateStats, lr: f64) {
    let finite: Vec<f64> = up
        .grad_norms
        .iter()
        .cloned()
        .filter(|x| x.is_finite())
        .collect();
    mt.insert("grad_norm".into(), num(mean(&finite)));
    mt.insert("lr".into(), num(lr));
    mt.insert("logprob_mismatch".into(), num(mean(&up.mismatches)));
    let (loads, imbalance) = expert_load(&up.expert_counts);
    mt.insert("expert_load".into(), json!(loads));
    mt.insert("expert_imbalance".into(), num_or_null(imbalance));
    mt.insert(
        "aux_loss".into(),
        num_or_null((!up.aux.is_empty()).then(|| mean(&up.aux))),
    );
}

/// Completion lengths, truncation and dynamic sampling's figures.
fn rollout_metrics(mt: &mut Map<String, Value>, gs: usize, rollout: &Rollout) {
    let kept = &rollout.kept;
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
        num(trunc as f64 / kept.len().max(1) as f64),
    );
    mt.insert(
        "zero_std_fraction".into(),
        num(rollout.zero_groups as f64 / rollout.groups_seen.max(1) as f64),
    );
    mt.insert("num_groups".into(), json!(kept.len() / gs));
    mt.insert("resample_rounds".into(), json!(rollout.rounds_used));
}

/// The first `samples_per_step` completions as `samples.jsonl` lines.
fn sample_lines(
    ctx: &GrpoContext<'_>,
    step: usize,
    kept: &[Scored],
    advantages: &[f32],
) -> Vec<Value> {
    kept.iter()
        .zip(advantages)
        .take(ctx.cfg.run.samples_per_step)
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
            let mut line = json!({
                "stage": "grpo",
                "step": step + 1,
                "prompt": prompt_text,
                "completion": s.completion.text.clone().unwrap_or_default(),
                "reward": num(s.reward as f64),
                "rewards": comps,
                "advantage": num(*a as f64),
                "finish_reason": s.completion.finish_reason.as_str(),
                "tokens": s.completion.tokens.len(),
            });
            if ctx.tools.is_some()
                && let Some(m) = line.as_object_mut()
            {
                m.insert("tool_calls".into(), calls_json(&s.completion));
            }
            line
        })
        .collect()
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
