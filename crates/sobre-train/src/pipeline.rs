//! A run: set-up, the SFT stage, the GRPO stage, checkpoints, resume, progress, Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use sobre_data::template::Template;
use sobre_data::tokenizer::SpecialTokens;
use sobre_model::{GenerationConfig, MoeModel, init_model, load_model};

use crate::checkpoint::{self, Stage, TrainerState};
use crate::config::Source;
use crate::data::{
    Order, align_token_ids, build_template, build_tokenizer, derive_seed, load_data, preset_config,
};
use crate::grpo::{GrpoContext, Reference, default_accuracy_reward, evaluate, grpo_step};
use crate::metrics::{JsonlWriter, add_shard_counts, expert_load, num, peak_rss_mib, summary_line};
use crate::optim::{AdamW, AdamWConfig, Schedule, apply_gradients, sharded_gradients};
use crate::parallel::split_range;
use crate::sft::{completion_tokens, next_batch, sft_forward, sft_loss};
use crate::{Config, TrainError};

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest complete checkpoint of the run directory.
    pub resume: bool,
    /// Run directory (overrides `run.out_dir`).
    pub out_dir: Option<PathBuf>,
    /// Set to stop after the current step (Ctrl-C); see [`install_ctrlc`].
    pub stop: Option<Arc<AtomicBool>>,
    /// Print summaries and a progress bar (default: `run.progress`).
    pub quiet: bool,
    /// Stop as Ctrl-C would (save, report interrupted) once this many GRPO steps are done.
    pub stop_after: Option<usize>,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub sft_steps: usize,
    pub grpo_steps: usize,
    /// Stopped early by the stop flag; resume with `--resume`.
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    pub last_metrics: Option<Value>,
    pub seconds: f64,
}

/// A flag set by Ctrl-C (SIGINT/SIGTERM). A second Ctrl-C exits at once.
pub fn install_ctrlc() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!(
                "\nsecond interrupt: exiting without saving (the previous checkpoint is intact)"
            );
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing the current step, then saving a checkpoint (Ctrl-C again to quit now)"
        );
    });
    flag
}

/// A configured run.
pub struct Pipeline {
    cfg: Config,
    source: Source,
    opts: RunOptions,
}

impl Pipeline {
    pub fn new(cfg: Config, source: Source, opts: RunOptions) -> Result<Self, TrainError> {
        Ok(Pipeline { cfg, source, opts })
    }

    pub fn run_dir(&self) -> PathBuf {
        self.opts
            .out_dir
            .clone()
            .unwrap_or_else(|| self.cfg.run.out_dir.clone())
    }

    fn stopped(&self) -> bool {
        self.opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst))
    }

    fn say(&self, pb: &ProgressBar, line: &str) {
        if !self.opts.quiet {
            if pb.is_hidden() {
                eprintln!("{line}")
            } else {
                pb.println(line)
            }
        }
    }

    /// The initial model (preset or model directory) on `device`, its token ids set from the
    /// tokenizer (and the model directory's `generation_config.json`, see [`align_token_ids`]).
    fn initial_model(
        &self,
        vocab: usize,
        special: &SpecialTokens,
        generation: Option<&GenerationConfig>,
        device: &burn::prelude::Device,
    ) -> Result<MoeModel, TrainError> {
        let m = &self.cfg.model;
        let mut model = match &m.path {
            Some(p) => load_model(p, device)?,
            None => {
                let mut mc = preset_config(&self.cfg, special)?;
                mc.vocab_size = vocab;
                init_model(&mc, m.seed.unwrap_or(self.cfg.run.seed), device)
            }
        };
        if m.path.is_some() {
            if let Some(r) = m.router_aux_loss_coef {
                model.config.router_aux_loss_coef = r;
            }
            if let Some(r) = m.bias_update_rate {
                model.config.bias_update_rate = r;
            }
        }
        align_token_ids(&mut model.config, special, generation);
        if model.config.vocab_size < vocab {
            return Err(TrainError::Data(format!(
                "the tokenizer has {vocab} tokens but the model only {}",
                model.config.vocab_size
            )));
        }
        Ok(model)
    }

    /// Run the pipeline to the end (or until the stop flag is set).
    pub fn run(self) -> Result<Summary, TrainError> {
        let started = Instant::now();
        let cfg = &self.cfg;
        let run_dir = self.run_dir();
        let ckpt_root = run_dir.join("checkpoints");
        std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
        checkpoint::clean_partials(&ckpt_root);
        let resume_from = if self.opts.resume {
            checkpoint::latest(&ckpt_root)
        } else {
            None
        };
        if !self.opts.resume && !checkpoint::list(&ckpt_root).is_empty() {
            return Err(TrainError::Checkpoint(format!(
                "{} already holds checkpoints: pass --resume to continue that run, or choose another --out",
                run_dir.display()
            )));
        }
        if cfg.run.threads > 0 {
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(cfg.run.threads)
                .build_global();
        }
        let cfg_path = run_dir.join("config.toml");
        let mut resolved = format!("# Resolved from {}", self.source.name);
        for o in &self.source.overrides {
            resolved.push_str(&format!(" --set {o}"));
        }
        resolved.push_str("\n\n");
        resolved.push_str(&cfg.to_toml());
        if self.opts.resume
            && let Ok(previous) = std::fs::read_to_string(&cfg_path)
            && previous.split_once("\n\n").map(|(_, body)| body) != Some(cfg.to_toml().as_str())
        {
            eprintln!(
                "warning: the resolved config differs from the one this run started with ({}); \
                 the resumed run will not be bit-identical to an uninterrupted one",
                cfg_path.display()
            );
        }
        std::fs::write(&cfg_path, resolved).map_err(|e| TrainError::io(&cfg_path, e))?;

        // ---- data, template, tokenizer ----
        let data = load_data(cfg)?;
        let tok_dir = resume_from.as_ref().map(|(p, _)| p.clone());
        let template = build_template(cfg, tok_dir.as_deref())?;
        let mut tok = build_tokenizer(cfg, &data, &template, tok_dir.as_deref())?;
        // A chat template read from chat_template.jinja is not in the tokenizer's config: put it
        // there so every checkpoint's tokenizer_config.json carries the template it was run with.
        if let Template::Chat(chat) = &template
            && tok.chat_template().is_none()
        {
            tok.set_chat_template(Some(chat.source()));
        }
        tok.save(&run_dir.join("tokenizer"))
            .map_err(|e| TrainError::Checkpoint(format!("tokenizer: {e}")))?;
        let rewards = cfg.build_rewards().map_err(TrainError::Data)?;
        let accuracy_reward = default_accuracy_reward(cfg, &rewards);
        let special = tok.special().clone();
        // generation_config.json of the starting point (the checkpoint resumed from, or
        // `[model] path`): its eos ids stop generation, and its sampling defaults are carried
        // into every checkpoint's generation_config.json.
        let source_dir = tok_dir.as_deref().or(cfg.model.path.as_deref());
        let generation = match source_dir {
            Some(d) => GenerationConfig::from_dir(d)?,
            None => None,
        };

        // ---- model and state ----
        let device = sobre_model::default_device().autodiff();
        let (mut model, mut state) = match &resume_from {
            Some((dir, st)) => {
                let mut model = load_model(dir, &device)?;
                align_token_ids(&mut model.config, &special, generation.as_ref());
                (model, st.clone())
            }
            None => {
                let model =
                    self.initial_model(tok.vocab_size(), &special, generation.as_ref(), &device)?;
                let st = TrainerState {
                    format: 1,
                    stage: if cfg.sft.steps > 0 {
                        Stage::Sft
                    } else {
                        Stage::SftDone
                    },
                    step: 0,
                    sft_steps: 0,
                    prompt_position: 0,
                    demo_position: 0,
                    seed: cfg.run.seed,
                    consecutive_nonfinite: 0,
                    elapsed_seconds: 0.0,
                    last_metrics: None,
                };
                (model, st)
            }
        };
        let elapsed_before = state.elapsed_seconds;
        let mut last_ckpt = resume_from.as_ref().map(|(p, _)| p.clone());
        let keep = match state.stage {
            Stage::Grpo => Some(("grpo", state.step)),
            Stage::SftDone => Some(("sft", state.sft_steps)),
            Stage::Sft => Some(("sft", state.step)),
        };
        let mut metrics = JsonlWriter::open(
            &run_dir.join("metrics.jsonl"),
            if resume_from.is_some() {
                keep
            } else {
                Some(("sft", 0))
            },
        )?;
        let mut samples = JsonlWriter::open(
            &run_dir.join("samples.jsonl"),
            if resume_from.is_some() {
                keep
            } else {
                Some(("sft", 0))
            },
        )?;
        if let Some((dir, st)) = &resume_from
            && !self.opts.quiet
        {
            eprintln!(
                "resuming from {} ({:?} step {})",
                dir.display(),
                st.stage,
                st.step
            );
        }
        let aux_coef = cfg
            .grpo
            .aux_loss_coef
            .unwrap_or(model.config.router_aux_loss_coef);
        let style =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        let generation = generation.unwrap_or_default();
        let save = |model: &MoeModel, opt: &AdamW, st: &TrainerState| {
            checkpoint::save(&ckpt_root, model, opt, &tok, &generation, st)
        };

        // ---- SFT ----
        if state.stage == Stage::Sft {
            let mut opt = match &resume_from {
                Some((dir, st)) if st.stage == Stage::Sft => AdamW::load_for(
                    AdamWConfig::from_config(cfg),
                    &dir.join(checkpoint::OPTIMIZER_FILE),
                    &model,
                )?,
                _ => AdamW::new(AdamWConfig::from_config(cfg)),
            };
            let sched = Schedule::sft(cfg);
            let mut order = Order::new(data.demos.len(), derive_seed(cfg.run.seed, &[0]));
            let pb = if self.opts.quiet || !cfg.run.progress {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(cfg.sft.steps as u64)
            };
            pb.set_style(style.clone());
            pb.set_prefix("sft");
            pb.set_position(state.step as u64);
            while state.step < cfg.sft.steps {
                if self.stopped() {
                    pb.abandon();
                    let dir = save(&model, &opt, &state)?;
                    return Ok(self.summary(
                        run_dir,
                        &state,
                        true,
                        Some(dir),
                        started,
                        elapsed_before,
                    ));
                }
                let t = Instant::now();
                let step = state.step;
                let lr = sched.lr_at(step);
                let mut pos = state.demo_position;
                let batch = next_batch(
                    &tok,
                    &template,
                    &data.demos,
                    &mut order,
                    &mut pos,
                    cfg.sft.batch_size,
                    cfg.sft.max_length,
                )?;
                let batch_tokens = completion_tokens(&batch);
                let ranges = split_range(0..batch.len(), cfg.run.data_parallel_size);
                let (_, grads, shards) = sharded_gradients(
                    &model,
                    ranges.len(),
                    aux_coef > 0.0,
                    |m, si| {
                        let rows = &batch[ranges[si].clone()];
                        let scored = sft_forward(m, rows, special.pad, aux_coef > 0.0);
                        let routes = scored.router.aux_parts.as_ref().map(|p| p.totals.clone());
                        ((scored, completion_tokens(rows)), routes)
                    },
                    |(scored, tokens), routes| {
                        let (loss, nll) = sft_loss(&scored, batch_tokens, aux_coef, routes);
                        (Some(loss), (nll, tokens, scored.router.expert_counts))
                    },
                );
                let nll: f64 = shards.iter().map(|s| s.0).sum();
                let tokens: usize = shards.iter().map(|s| s.1).sum();
                let mut expert_counts: Vec<Vec<u32>> = vec![];
                for (_, _, c) in &shards {
                    add_shard_counts(&mut expert_counts, c);
                }
                let (next, out) =
                    apply_gradients(model, grads, &mut opt, lr, cfg.optim.max_grad_norm);
                model = next;
                if !out.skipped && model.config.aux_loss_free_bias {
                    let rate = model.config.bias_update_rate as f32;
                    model.update_expert_bias(&expert_counts, rate);
                }
                state.demo_position = pos;
                state.step += 1;
                state.sft_steps = state.step;
                let counts: Vec<Vec<u64>> = expert_counts
                    .iter()
                    .map(|l| l.iter().map(|&c| c as u64).collect())
                    .collect();
                let (loads, imb) = expert_load(&counts);
                let secs = t.elapsed().as_secs_f64();
                let mut m = Map::new();
                m.insert("stage".into(), json!("sft"));
                m.insert("step".into(), json!(state.step));
                m.insert("loss".into(), num(nll));
                m.insert("grad_norm".into(), num(out.grad_norm));
                m.insert("lr".into(), num(lr));
                m.insert("tokens".into(), json!(tokens));
                m.insert(
                    "tokens_per_second".into(),
                    num(tokens as f64 / secs.max(1e-9)),
                );
                m.insert("expert_load".into(), json!(loads));
                m.insert("expert_imbalance".into(), imb.map_or(Value::Null, num));
                m.insert("skipped".into(), json!(out.skipped));
                m.insert("time_step".into(), num(secs));
                m.insert(
                    "peak_rss_mib".into(),
                    peak_rss_mib().map_or(Value::Null, num),
                );
                metrics.write(&Value::Object(m.clone()))?;
                state.consecutive_nonfinite = if out.skipped {
                    state.consecutive_nonfinite + 1
                } else {
                    0
                };
                state.last_metrics = Some(Value::Object(m.clone()));
                pb.set_position(state.step as u64);
                pb.set_message(format!("loss {nll:.4}"));
                if cfg.run.log_every > 0 && state.step % cfg.run.log_every == 0 {
                    self.say(&pb, &summary_line(&m));
                }
                self.check_nonfinite(&state, last_ckpt.as_deref())?;
                if cfg.run.save_every > 0
                    && state.step % cfg.run.save_every == 0
                    && state.step < cfg.sft.steps
                {
                    last_ckpt = Some(save(&model, &opt, &state)?);
                    checkpoint::prune(&ckpt_root, Stage::Sft, cfg.run.keep_last)?;
                }
            }
            pb.finish_and_clear();
            state.stage = Stage::SftDone;
            state.step = 0;
            last_ckpt = Some(save(&model, &opt, &state)?);
            checkpoint::prune(&ckpt_root, Stage::Sft, 0)?;
            self.say(
                &pb,
                &format!(
                    "sft done: {} steps → {}",
                    state.sft_steps,
                    ckpt_root.join("sft").display()
                ),
            );
        }

        // ---- GRPO ----
        let reference = if cfg.grpo.beta > 0.0 {
            let plain = sobre_model::default_device();
            let sft_dir = ckpt_root.join("sft");
            Some(Reference::new(
                if checkpoint::read_state(&sft_dir).is_some() {
                    load_model(&sft_dir, &plain)?
                } else {
                    self.initial_model(tok.vocab_size(), &special, Some(&generation), &plain)?
                },
            ))
        } else {
            None
        };
        let mut opt = match &resume_from {
            Some((dir, st)) if st.stage == Stage::Grpo => AdamW::load_for(
                AdamWConfig::from_config(cfg),
                &dir.join(checkpoint::OPTIMIZER_FILE),
                &model,
            )?,
            _ => AdamW::new(AdamWConfig::from_config(cfg)),
        };
        if state.stage == Stage::SftDone {
            state.stage = Stage::Grpo;
            state.step = 0;
        }
        let sched = Schedule::grpo(cfg, cfg.run.steps);
        let ctx = GrpoContext {
            cfg,
            tok: &tok,
            template: &template,
            rewards: &rewards,
            train: &data.train,
            reference: reference.as_ref(),
            accuracy_reward: accuracy_reward.clone(),
        };
        let mut order = Order::new(data.train.len(), derive_seed(cfg.run.seed, &[1]));
        let pb = if self.opts.quiet || !cfg.run.progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(cfg.run.steps as u64)
        };
        pb.set_style(style);
        pb.set_prefix("grpo");
        pb.set_position(state.step as u64);
        let mut saved_at = state.step;
        while state.step < cfg.run.steps {
            if self.stopped() || self.opts.stop_after.is_some_and(|n| state.step >= n) {
                pb.abandon();
                if saved_at != state.step || last_ckpt.is_none() {
                    last_ckpt = Some(save(&model, &opt, &state)?);
                }
                return Ok(self.summary(run_dir, &state, true, last_ckpt, started, elapsed_before));
            }
            let step = state.step;
            // The optimizer's own step counter drives the schedule, so mini-batch updates decay it.
            let lr = sched.lr_at(opt.step as usize);
            let mut cursor = state.prompt_position;
            let (next, out) = grpo_step(&ctx, model, &mut opt, &mut order, &mut cursor, step, lr)?;
            model = next;
            state.prompt_position = cursor;
            state.step += 1;
            state.consecutive_nonfinite = if out.skipped {
                state.consecutive_nonfinite + 1
            } else {
                0
            };
            let mut m = out.metrics;
            if cfg.eval.eval_every > 0
                && state.step % cfg.eval.eval_every == 0
                && !data.eval.is_empty()
            {
                let (em, es) = evaluate(
                    cfg,
                    &model,
                    &tok,
                    &template,
                    &rewards,
                    &data.eval,
                    accuracy_reward.as_deref(),
                    state.step,
                )?;
                for (k, v) in em {
                    if k != "stage" && k != "step" {
                        m.insert(k, v);
                    }
                }
                for s in es {
                    samples.write(&s)?;
                }
            }
            metrics.write(&Value::Object(m.clone()))?;
            for s in &out.samples {
                samples.write(s)?;
            }
            state.last_metrics = Some(Value::Object(m.clone()));
            pb.set_position(state.step as u64);
            pb.set_message(format!(
                "reward {:.3}",
                m.get("reward_mean")
                    .and_then(Value::as_f64)
                    .unwrap_or(f64::NAN)
            ));
            if cfg.run.log_every > 0 && state.step % cfg.run.log_every == 0 {
                self.say(&pb, &summary_line(&m));
            }
            self.check_nonfinite(&state, last_ckpt.as_deref())?;
            let last = state.step == cfg.run.steps;
            if (cfg.run.save_every > 0 && state.step % cfg.run.save_every == 0) || last {
                state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
                last_ckpt = Some(save(&model, &opt, &state)?);
                saved_at = state.step;
                checkpoint::prune(&ckpt_root, Stage::Grpo, cfg.run.keep_last)?;
            }
        }
        pb.finish_and_clear();
        if last_ckpt.is_none() || saved_at != state.step {
            last_ckpt = Some(save(&model, &opt, &state)?);
        }
        if cfg.eval.at_end
            && let Some(last) = &last_ckpt
        {
            drop(model);
            let sft_dir = ckpt_root.join("sft");
            let mut contenders = Vec::new();
            if checkpoint::read_state(&sft_dir).is_some() && *last != sft_dir {
                contenders.push(("sft".to_string(), sft_dir));
            }
            contenders.push(("final".to_string(), last.clone()));
            contenders.extend(cfg.eval.compare.clone());
            let opts = crate::compare::comparison_options(cfg, accuracy_reward.clone());
            let comparison = crate::compare::compare(cfg, &contenders, &template, &rewards, &opts)?;
            let path = comparison.save(&run_dir)?;
            if !self.opts.quiet {
                eprintln!("{}(written to {})", comparison.table(), path.display());
            }
        }
        Ok(self.summary(run_dir, &state, false, last_ckpt, started, elapsed_before))
    }

    fn check_nonfinite(&self, state: &TrainerState, last: Option<&Path>) -> Result<(), TrainError> {
        if state.consecutive_nonfinite >= self.cfg.run.max_consecutive_nonfinite {
            return Err(TrainError::NonFinite(format!(
                "{} steps in a row had a non-finite loss or gradient (updates skipped); stopping. Last good checkpoint: {}. \
                 Lower optim.lr or optim.max_grad_norm and resume.",
                state.consecutive_nonfinite,
                last.map_or("none".to_string(), |p| p.display().to_string())
            )));
        }
        Ok(())
    }

    fn summary(
        &self,
        run_dir: PathBuf,
        state: &TrainerState,
        interrupted: bool,
        last: Option<PathBuf>,
        started: Instant,
        before: f64,
    ) -> Summary {
        Summary {
            run_dir,
            sft_steps: state.sft_steps,
            grpo_steps: if state.stage == Stage::Grpo {
                state.step
            } else {
                0
            },
            interrupted,
            last_checkpoint: last,
            last_metrics: state.last_metrics.clone(),
            seconds: before + started.elapsed().as_secs_f64(),
        }
    }
}
