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

use sobre_data::Tokenizer;
use sobre_reward::CombinedReward;

use crate::checkpoint::{self, LoraRun, Stage, TrainerState};
use crate::config::Source;
use crate::cost::{
    CostMeter, RunCost, TRAIN_FLOPS_FACTOR, Work, sequence_forward_flops, summary_lines,
};
use crate::data::{
    Order, RunData, align_token_ids, build_template, build_tokenizer, derive_seed, load_data,
    preset_config,
};
use crate::grpo::{GrpoContext, Reference, default_accuracy_reward, evaluate, grpo_step};
use crate::metrics::{JsonlWriter, add_shard_counts, expert_load, num, peak_rss_mib, summary_line};
use crate::optim::{AdamW, AdamWConfig, Schedule, apply_gradients, sharded_gradients};
use crate::parallel::split_range;
use crate::sft::{completion_tokens, next_batch, sft_forward, sft_loss};
use crate::{Config, TrainError, dist};

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
    /// What the run cost, every resumed part added up.
    pub cost: RunCost,
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
    pub fn new(cfg: Config, source: Source, mut opts: RunOptions) -> Result<Self, TrainError> {
        // Rank 0 speaks for the run.
        opts.quiet |= !dist::is_main();
        Ok(Pipeline { cfg, source, opts })
    }

    pub fn run_dir(&self) -> PathBuf {
        self.opts
            .out_dir
            .clone()
            .unwrap_or_else(|| self.cfg.run.out_dir.clone())
    }

    /// The stop flag, agreed by every rank (a Ctrl-C that reached some of them stops all at
    /// the same step).
    fn stopped(&self) -> bool {
        let mine = self
            .opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst));
        dist::any(mine)
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

    /// Run the pipeline to the end (or until the stop flag is set): set up → SFT stage → GRPO
    /// stage → final evaluation; with `[[stage]]` tables, those stages ([`crate::stages`]).
    pub fn run(self) -> Result<Summary, TrainError> {
        if !self.cfg.stage.is_empty() {
            return crate::stages::run(&self.cfg, &self.source, &self.opts);
        }
        let (inp, mut pr, model, mut state) = self.set_up()?;
        let model = if state.stage == Stage::Sft {
            match self.sft_stage(&inp, &mut pr, model, &mut state)? {
                StageEnd::Done(m) => m,
                StageEnd::Interrupted => return Ok(self.summary(&inp, &mut pr, &state, true)),
            }
        } else {
            model
        };
        match self.grpo_stage(&inp, &mut pr, model, &mut state)? {
            StageEnd::Done(m) => drop(m),
            StageEnd::Interrupted => return Ok(self.summary(&inp, &mut pr, &state, true)),
        }
        self.final_evaluation(&inp, &mut pr)?;
        Ok(self.summary(&inp, &mut pr, &state, false))
    }

    // ---- set up ----

    /// The run directory, the data, the tokenizer and the rewards; the model and trainer state
    /// (fresh or resumed); the metrics and samples logs.
    fn set_up(&self) -> Result<(Inputs, Progress, MoeModel, TrainerState), TrainError> {
        let started = Instant::now();
        let (run_dir, resume_from) = self.prepare_run_dir()?;
        let ckpt_root = run_dir.join("checkpoints");
        let tok_dir = resume_from.as_ref().map(|(p, _)| p.clone());
        let (data, template, tok) = self.load_text(&run_dir, tok_dir.as_deref())?;
        let cfg = &self.cfg;
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
        let device = sobre_model::default_device().autodiff();
        let (model, state, lora) = match &resume_from {
            Some((dir, st)) if cfg.lora.is_some() => {
                // The frozen base as the run began (`[model]`), the checkpoint's adapters on it.
                if !sobre_model::lora::is_adapter_dir(dir) {
                    return Err(TrainError::Checkpoint(format!(
                        "{} holds a whole model, not LoRA adapters, but the config has [lora]:                          resume with the config the run started with",
                        dir.display()
                    )));
                }
                let base =
                    self.initial_model(tok.vocab_size(), &special, generation.as_ref(), &device)?;
                let (mut model, config) = sobre_model::lora::load_adapter(base, dir)?;
                align_token_ids(&mut model.config, &special, generation.as_ref());
                let base = self.lora_base_name(&run_dir);
                (model, st.clone(), Some(LoraRun { config, base }))
            }
            Some((dir, st)) => {
                if !dir.join("config.json").exists() && sobre_model::lora::is_adapter_dir(dir) {
                    return Err(TrainError::Checkpoint(format!(
                        "{} holds LoRA adapters but the config has no [lora]: resume with the                          config the run started with",
                        dir.display()
                    )));
                }
                let mut model = load_model(dir, &device)?;
                align_token_ids(&mut model.config, &special, generation.as_ref());
                (model, st.clone(), None)
            }
            None => {
                let model =
                    self.initial_model(tok.vocab_size(), &special, generation.as_ref(), &device)?;
                let (model, lora) = self.with_adapters(model, &run_dir, &tok)?;
                (model, self.fresh_state(), lora)
            }
        };
        // `lora.base_dtype = "bf16"`: the frozen base in half the memory (adapters stay f32).
        let model = match &cfg.lora {
            Some(l) if l.base_bf16() => sobre_model::lora::store_base_bf16(model),
            _ => model,
        };
        let pr = self.open_logs(&run_dir, resume_from.is_some(), &state, started)?;
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
        let inp = Inputs {
            aux_coef: cfg
                .grpo
                .aux_loss_coef
                .unwrap_or(model.config.router_aux_loss_coef),
            style: ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
            generation: generation.unwrap_or_default(),
            run_dir,
            ckpt_root,
            resume_from,
            data,
            template,
            tok,
            rewards,
            accuracy_reward,
            special,
            lora,
        };
        Ok((inp, pr, model, state))
    }

    /// The base model of a LoRA run as `base_model_name_or_path`: `[model] path`, or for a
    /// preset the copy in `RUN_DIR/base`, as an absolute path.
    fn lora_base_name(&self, run_dir: &Path) -> String {
        let dir = match &self.cfg.model.path {
            Some(p) => p.clone(),
            None => run_dir.join("base"),
        };
        std::fs::canonicalize(&dir)
            .unwrap_or(dir)
            .display()
            .to_string()
    }

    /// With `[lora]`: the adapters on `model` (fresh, seeded by the run seed, or `[lora]
    /// adapter`'s) and its base frozen; a preset base is first written to `RUN_DIR/base` (an HF
    /// model directory with the tokenizer) for the checkpoints to name.
    fn with_adapters(
        &self,
        model: MoeModel,
        run_dir: &Path,
        tok: &Tokenizer,
    ) -> Result<(MoeModel, Option<LoraRun>), TrainError> {
        let Some(l) = &self.cfg.lora else {
            return Ok((model, None));
        };
        if self.cfg.model.path.is_none() && dist::is_main() {
            let dir = run_dir.join("base");
            sobre_model::save_model(&model, &dir, None)?;
            tok.save(&dir)
                .map_err(|e| TrainError::Checkpoint(format!("tokenizer: {e}")))?;
        }
        let (model, config) = match &l.adapter {
            Some(dir) => sobre_model::lora::load_adapter(model, dir)?,
            None => {
                let c = l.resolve();
                let seed = derive_seed(self.cfg.run.seed, &[5]);
                (sobre_model::lora::add_adapters(model, &c, seed)?, c)
            }
        };
        let base = self.lora_base_name(run_dir);
        Ok((model, Some(LoraRun { config, base })))
    }

    /// Create the run directory, refuse to overwrite another run's checkpoints, pick the
    /// checkpoint to resume from, and write the resolved `config.toml`.
    fn prepare_run_dir(&self) -> Result<(PathBuf, Option<(PathBuf, TrainerState)>), TrainError> {
        let cfg = &self.cfg;
        let run_dir = self.run_dir();
        let ckpt_root = run_dir.join("checkpoints");
        std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
        if dist::is_main() {
            checkpoint::clean_partials(&ckpt_root);
        }
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
        let resolved = resolved_config(cfg, &self.source);
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
        if dist::is_main() {
            std::fs::write(&cfg_path, resolved).map_err(|e| TrainError::io(&cfg_path, e))?;
        }
        Ok((run_dir, resume_from))
    }

    /// The data, the prompt template and the tokenizer (the checkpoint's, on resume), the
    /// tokenizer saved into the run directory.
    fn load_text(
        &self,
        run_dir: &Path,
        tok_dir: Option<&Path>,
    ) -> Result<(RunData, Template, Tokenizer), TrainError> {
        let data = load_data(&self.cfg)?;
        let template = build_template(&self.cfg, tok_dir)?;
        let mut tok = build_tokenizer(&self.cfg, &data, &template, tok_dir)?;
        // A chat template read from chat_template.jinja is not in the tokenizer's config: put it
        // there so every checkpoint's tokenizer_config.json carries the template it was run with.
        if let Template::Chat(chat) = &template
            && tok.chat_template().is_none()
        {
            tok.set_chat_template(Some(chat.source()));
        }
        if dist::is_main() {
            tok.save(&run_dir.join("tokenizer"))
                .map_err(|e| TrainError::Checkpoint(format!("tokenizer: {e}")))?;
        }
        Ok((data, template, tok))
    }

    /// The trainer state of a run that starts from scratch.
    fn fresh_state(&self) -> TrainerState {
        TrainerState {
            format: 1,
            stage: if self.cfg.sft.steps > 0 {
                Stage::Sft
            } else {
                Stage::SftDone
            },
            step: 0,
            sft_steps: 0,
            prompt_position: 0,
            demo_position: 0,
            seed: self.cfg.run.seed,
            consecutive_nonfinite: 0,
            elapsed_seconds: 0.0,
            last_metrics: None,
            cost: None,
        }
    }

    /// metrics.jsonl and samples.jsonl (cut back to the checkpoint resumed from, whose later
    /// lines the resumed run writes again), and the cost meter (carrying the checkpoint's cost).
    fn open_logs(
        &self,
        run_dir: &Path,
        resumed: bool,
        state: &TrainerState,
        started: Instant,
    ) -> Result<Progress, TrainError> {
        let keep = if !resumed {
            ("sft", 0)
        } else {
            match state.stage {
                Stage::Grpo => ("grpo", state.step),
                Stage::SftDone => ("sft", state.sft_steps),
                Stage::Sft => ("sft", state.step),
            }
        };
        let (metrics_path, samples_path) =
            (run_dir.join("metrics.jsonl"), run_dir.join("samples.jsonl"));
        let (metrics, samples) = if dist::is_main() {
            let mut metrics = JsonlWriter::open(&metrics_path, Some(keep))?;
            if self.cfg.run.tensorboard {
                metrics = metrics.with_tensorboard(&run_dir.join("tensorboard"))?;
            }
            (metrics, JsonlWriter::open(&samples_path, Some(keep))?)
        } else {
            (
                JsonlWriter::discard(&metrics_path),
                JsonlWriter::discard(&samples_path),
            )
        };
        let meter = match &state.cost {
            Some(c) if resumed => CostMeter::resume_from(c.clone()),
            _ => CostMeter::start(),
        };
        Ok(Progress {
            metrics,
            samples,
            meter,
            started,
            elapsed_before: state.elapsed_seconds,
            last_ckpt: None,
        })
    }

    fn progress_bar(
        &self,
        inp: &Inputs,
        prefix: &'static str,
        len: usize,
        pos: usize,
    ) -> ProgressBar {
        let pb = if self.opts.quiet || !self.cfg.run.progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(len as u64)
        };
        pb.set_style(inp.style.clone());
        pb.set_prefix(prefix);
        pb.set_position(pos as u64);
        pb
    }

    /// Save a checkpoint of `state` (its time and cost so far recorded in it). Rank 0 writes it;
    /// every rank returns once it is complete (the others may read it next: the reference, the
    /// final evaluation).
    fn save(
        &self,
        inp: &Inputs,
        pr: &mut Progress,
        model: &MoeModel,
        opt: &AdamW,
        state: &mut TrainerState,
    ) -> Result<PathBuf, TrainError> {
        state.elapsed_seconds = pr.elapsed_before + pr.started.elapsed().as_secs_f64();
        state.cost = Some(pr.meter.snapshot(self.cfg.run.watts_per_core));
        dist::written_by_main(|| {
            let (tok, generation, lora) = (&inp.tok, &inp.generation, inp.lora.as_ref());
            checkpoint::save(&inp.ckpt_root, model, opt, tok, generation, state, lora).map(drop)
        })?;
        let dir = inp.ckpt_root.join(checkpoint::name_for(state));
        pr.last_ckpt = Some(dir.clone());
        Ok(dir)
    }

    /// The optimizer of `stage`: its moments from the checkpoint resumed from when that was
    /// taken in the same stage, else fresh.
    fn optimizer_for(
        &self,
        inp: &Inputs,
        stage: Stage,
        model: &MoeModel,
    ) -> Result<AdamW, TrainError> {
        let config = AdamWConfig::from_config(&self.cfg);
        Ok(match &inp.resume_from {
            Some((dir, st)) if st.stage == stage => {
                AdamW::load_for(config, &dir.join(checkpoint::OPTIMIZER_FILE), model)?
            }
            _ => AdamW::new(config),
        })
    }

    // ---- SFT stage ----

    /// SFT steps until `sft.steps`, saving every `run.save_every`; then the `sft` checkpoint.
    fn sft_stage(
        &self,
        inp: &Inputs,
        pr: &mut Progress,
        mut model: MoeModel,
        state: &mut TrainerState,
    ) -> Result<StageEnd, TrainError> {
        let cfg = &self.cfg;
        let mut opt = self.optimizer_for(inp, Stage::Sft, &model)?;
        let sched = Schedule::sft(cfg);
        let mut order = Order::new(inp.data.demos.len(), derive_seed(cfg.run.seed, &[0]));
        let pb = self.progress_bar(inp, "sft", cfg.sft.steps, state.step);
        while state.step < cfg.sft.steps {
            if self.stopped() {
                pb.abandon();
                self.save(inp, pr, &model, &opt, state)?;
                return Ok(StageEnd::Interrupted);
            }
            let lr = sched.lr_at(state.step);
            let (next, m, nll) = self.sft_step(inp, pr, model, &mut opt, &mut order, state, lr)?;
            model = next;
            pr.metrics.write(&Value::Object(m.clone()))?;
            state.last_metrics = Some(Value::Object(m.clone()));
            pb.set_position(state.step as u64);
            pb.set_message(format!("loss {nll:.4}"));
            if cfg.run.log_every > 0 && state.step.is_multiple_of(cfg.run.log_every) {
                self.say(&pb, &summary_line(&m));
            }
            self.check_nonfinite(state, pr.last_ckpt.as_deref())?;
            if cfg.run.save_every > 0
                && state.step.is_multiple_of(cfg.run.save_every)
                && state.step < cfg.sft.steps
            {
                self.save(inp, pr, &model, &opt, state)?;
                prune(&inp.ckpt_root, Stage::Sft, cfg.run.keep_last)?;
            }
        }
        pb.finish_and_clear();
        state.stage = Stage::SftDone;
        state.step = 0;
        self.save(inp, pr, &model, &opt, state)?;
        prune(&inp.ckpt_root, Stage::Sft, 0)?;
        self.say(
            &pb,
            &format!(
                "sft done: {} steps → {}",
                state.sft_steps,
                inp.ckpt_root.join("sft").display()
            ),
        );
        Ok(StageEnd::Done(model))
    }

    /// One SFT step: the next batch of demonstrations, the sharded forward and backward of the
    /// completion NLL (+ balance loss), one optimizer step. Returns the model, the metrics line
    /// and the loss; advances `state` (data cursor, step, non-finite count).
    #[allow(clippy::too_many_arguments)]
    fn sft_step(
        &self,
        inp: &Inputs,
        pr: &mut Progress,
        model: MoeModel,
        opt: &mut AdamW,
        order: &mut Order,
        state: &mut TrainerState,
        lr: f64,
    ) -> Result<(MoeModel, Map<String, Value>, f64), TrainError> {
        let (cfg, aux_coef, pad) = (&self.cfg, inp.aux_coef, inp.special.pad);
        let t = Instant::now();
        let mut pos = state.demo_position;
        let batch = next_batch(
            &inp.tok,
            &inp.template,
            &inp.data.demos,
            order,
            &mut pos,
            cfg.sft.batch_size,
            cfg.sft.max_length,
            cfg.tools.as_ref().map(|t| t.response_markers()),
        )?;
        pr.meter.add(&sft_work(&model.config, &batch));
        let batch_tokens = completion_tokens(&batch);
        let replicas = crate::dist::total_replicas(cfg.run.data_parallel_size);
        let ranges = split_range(0..batch.len(), replicas);
        let (_, grads, shards) = sharded_gradients(
            &model,
            ranges.len(),
            aux_coef > 0.0,
            |m, si| {
                let rows = &batch[ranges[si].clone()];
                let _dropout = cfg.lora.as_ref().map(|_| {
                    let seed = derive_seed(cfg.run.seed, &[7, state.step as u64, si as u64]);
                    sobre_model::lora::dropout_scope(seed)
                });
                let recompute = cfg.sft.gradient_checkpointing;
                let scored = sft_forward(m, rows, pad, aux_coef > 0.0, recompute);
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
        let (mut model, out) = apply_gradients(model, grads, opt, lr, cfg.optim.max_grad_norm);
        // With LoRA the whole base is frozen, DeepSeek-V3's expert biases included.
        if !out.skipped && model.config.aux_loss_free_bias && cfg.lora.is_none() {
            let rate = model.config.bias_update_rate as f32;
            model.update_expert_bias(&expert_counts, rate);
        }
        state.demo_position = pos;
        state.step += 1;
        state.sft_steps = state.step;
        state.consecutive_nonfinite = if out.skipped {
            state.consecutive_nonfinite + 1
        } else {
            0
        };
        let m = sft_metrics(state.step, nll, tokens, lr, &out, &expert_counts, t);
        Ok((model, m, nll))
    }

    // ---- GRPO stage ----

    /// GRPO steps until `run.steps` (held-out evaluation every `eval.eval_every`), saving every
    /// `run.save_every` and at the end.
    fn grpo_stage(
        &self,
        inp: &Inputs,
        pr: &mut Progress,
        mut model: MoeModel,
        state: &mut TrainerState,
    ) -> Result<StageEnd, TrainError> {
        let cfg = &self.cfg;
        let reference = self.reference(inp)?;
        let teacher = match &cfg.grpo.teacher {
            Some(dir) => Some(crate::distill::load_teacher(
                dir,
                &inp.tok,
                cfg.model.frozen_bf16(),
                &self.source.name,
            )?),
            None => None,
        };
        let tools = match &cfg.tools {
            Some(t) => Some(crate::tools::ToolRunner::new(t, &inp.tok)?),
            None => None,
        };
        let mut opt = self.optimizer_for(inp, Stage::Grpo, &model)?;
        if state.stage == Stage::SftDone {
            state.stage = Stage::Grpo;
            state.step = 0;
        }
        let sched = Schedule::grpo(cfg, cfg.run.steps);
        let ctx = GrpoContext {
            cfg,
            tok: &inp.tok,
            template: &inp.template,
            rewards: &inp.rewards,
            train: &inp.data.train,
            reference: reference.as_ref(),
            teacher: teacher.as_ref(),
            tools: tools.as_ref().map(|t| t as &dyn sobre_rollout::Tools),
            accuracy_reward: inp.accuracy_reward.clone(),
        };
        let mut order = Order::new(inp.data.train.len(), derive_seed(cfg.run.seed, &[1]));
        let pb = self.progress_bar(inp, "grpo", cfg.run.steps, state.step);
        let mut saved_at = state.step;
        while state.step < cfg.run.steps {
            if self.stopped() || self.opts.stop_after.is_some_and(|n| state.step >= n) {
                pb.abandon();
                if saved_at != state.step || pr.last_ckpt.is_none() {
                    self.save(inp, pr, &model, &opt, state)?;
                }
                return Ok(StageEnd::Interrupted);
            }
            // The optimizer's own step counter drives the schedule, so mini-batch updates decay it.
            let lr = sched.lr_at(opt.step as usize);
            let mut cursor = state.prompt_position;
            let (next, out) = grpo_step(
                &ctx,
                model,
                &mut opt,
                &mut order,
                &mut cursor,
                state.step,
                lr,
            )
            .map_err(|e| with_last_checkpoint(e, pr.last_ckpt.as_deref()))?;
            model = next;
            state.prompt_position = cursor;
            state.step += 1;
            state.consecutive_nonfinite = if out.skipped {
                state.consecutive_nonfinite + 1
            } else {
                0
            };
            pr.meter.add(&out.work);
            let mut m = out.metrics;
            self.periodic_eval(inp, pr, &model, state.step, &mut m)?;
            pr.metrics.write(&Value::Object(m.clone()))?;
            for s in &out.samples {
                pr.samples.write(s)?;
            }
            state.last_metrics = Some(Value::Object(m.clone()));
            pb.set_position(state.step as u64);
            let reward = m.get("reward_mean").and_then(Value::as_f64);
            pb.set_message(format!("reward {:.3}", reward.unwrap_or(f64::NAN)));
            if cfg.run.log_every > 0 && state.step.is_multiple_of(cfg.run.log_every) {
                self.say(&pb, &summary_line(&m));
            }
            self.check_nonfinite(state, pr.last_ckpt.as_deref())?;
            let last = state.step == cfg.run.steps;
            if (cfg.run.save_every > 0 && state.step.is_multiple_of(cfg.run.save_every)) || last {
                self.save(inp, pr, &model, &opt, state)?;
                saved_at = state.step;
                prune(&inp.ckpt_root, Stage::Grpo, cfg.run.keep_last)?;
            }
        }
        pb.finish_and_clear();
        if pr.last_ckpt.is_none() || saved_at != state.step {
            self.save(inp, pr, &model, &opt, state)?;
        }
        Ok(StageEnd::Done(model))
    }

    /// The frozen KL reference when `grpo.beta > 0`: the SFT checkpoint, else the initial model;
    /// with LoRA the policy itself with its adapters off (the base model, as TRL's
    /// `disable_adapter()`), no copy.
    fn reference(&self, inp: &Inputs) -> Result<Option<Reference>, TrainError> {
        if self.cfg.grpo.beta <= 0.0 {
            return Ok(None);
        }
        if inp.lora.is_some() {
            return Ok(Some(Reference::adapters_off()));
        }
        let plain = sobre_model::default_device();
        let sft_dir = inp.ckpt_root.join("sft");
        let model = if checkpoint::read_state(&sft_dir).is_some() {
            load_model(&sft_dir, &plain)?
        } else {
            let vocab = inp.tok.vocab_size();
            self.initial_model(vocab, &inp.special, Some(&inp.generation), &plain)?
        };
        Ok(Some(Reference::new(model, self.cfg.model.frozen_bf16())?))
    }

    /// Held-out pass@1 after GRPO step `step` when `eval.eval_every` says so: its keys added to
    /// the step's metrics line `m`, its samples to samples.jsonl.
    fn periodic_eval(
        &self,
        inp: &Inputs,
        pr: &mut Progress,
        model: &MoeModel,
        step: usize,
        m: &mut Map<String, Value>,
    ) -> Result<(), TrainError> {
        let cfg = &self.cfg;
        if cfg.eval.eval_every == 0
            || !step.is_multiple_of(cfg.eval.eval_every)
            || inp.data.eval.is_empty()
        {
            return Ok(());
        }
        let (em, es) = evaluate(
            cfg,
            model,
            &inp.tok,
            &inp.template,
            &inp.rewards,
            &inp.data.eval,
            inp.accuracy_reward.as_deref(),
            step,
        )?;
        for (k, v) in em {
            if k != "stage" && k != "step" {
                m.insert(k, v);
            }
        }
        for s in es {
            pr.samples.write(&s)?;
        }
        Ok(())
    }

    // ---- final evaluation ----

    /// With `eval.at_end`, the held-out comparison of the final checkpoint against the SFT
    /// checkpoint and `eval.compare`, written to final_eval.json with the run's cost (which
    /// includes this evaluation); the table and the cost printed.
    fn final_evaluation(&self, inp: &Inputs, pr: &mut Progress) -> Result<(), TrainError> {
        let cfg = &self.cfg;
        let lines = match (&pr.last_ckpt, cfg.eval.at_end) {
            (Some(last), true) => {
                let sft_dir = inp.ckpt_root.join("sft");
                let mut contenders = Vec::new();
                if checkpoint::read_state(&sft_dir).is_some() && *last != sft_dir {
                    contenders.push(("sft".to_string(), sft_dir));
                }
                contenders.push(("final".to_string(), last.clone()));
                contenders.extend(cfg.eval.compare.clone());
                let opts = crate::compare::comparison_options(cfg, inp.accuracy_reward.clone());
                let mut comparison =
                    crate::compare::compare(cfg, &contenders, &inp.template, &inp.rewards, &opts)?;
                comparison.cost = Some(pr.meter.snapshot(cfg.run.watts_per_core));
                if !dist::is_main() {
                    return Ok(());
                }
                let path = comparison.save(&inp.run_dir)?;
                let mut text = comparison.table();
                for line in comparison.cost_lines() {
                    text.push_str(&line);
                    text.push('\n');
                }
                format!("{text}(written to {})", path.display())
            }
            _ => summary_lines(&pr.meter.snapshot(cfg.run.watts_per_core)).join("\n"),
        };
        if !self.opts.quiet {
            eprintln!("{lines}");
        }
        Ok(())
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
        inp: &Inputs,
        pr: &mut Progress,
        state: &TrainerState,
        interrupted: bool,
    ) -> Summary {
        Summary {
            run_dir: inp.run_dir.clone(),
            sft_steps: state.sft_steps,
            grpo_steps: if state.stage == Stage::Grpo {
                state.step
            } else {
                0
            },
            interrupted,
            last_checkpoint: pr.last_ckpt.clone(),
            last_metrics: state.last_metrics.clone(),
            seconds: pr.elapsed_before + pr.started.elapsed().as_secs_f64(),
            cost: pr.meter.snapshot(self.cfg.run.watts_per_core),
        }
    }
}

/// [`checkpoint::prune`] on rank 0 (the one that writes checkpoints).
fn prune(root: &Path, stage: Stage, keep_last: usize) -> Result<(), TrainError> {
    if dist::is_main() {
        checkpoint::prune(root, stage, keep_last)?;
    }
    Ok(())
}

/// A run directory's `config.toml`: where the config came from (file and `--set`s), then every
/// value resolved.
pub(crate) fn resolved_config(cfg: &Config, source: &Source) -> String {
    let mut text = format!("# Resolved from {}", source.name);
    for o in &source.overrides {
        text.push_str(&format!(" --set {o}"));
    }
    text.push_str("\n\n");
    text.push_str(&cfg.to_toml());
    text
}

/// A reward that cannot score ends the run: its error then names the checkpoint to resume from
/// once the verifier is fixed.
fn with_last_checkpoint(e: TrainError, last: Option<&Path>) -> TrainError {
    match e {
        TrainError::Reward(msg) => TrainError::Reward(format!(
            "{msg}\nthe run stopped; last good checkpoint: {}",
            last.map_or("none".to_string(), |p| p.display().to_string())
        )),
        e => e,
    }
}

/// What every stage of a run reads, made once by [`Pipeline::set_up`].
struct Inputs {
    run_dir: PathBuf,
    ckpt_root: PathBuf,
    /// The checkpoint resumed from, and its state.
    resume_from: Option<(PathBuf, TrainerState)>,
    data: RunData,
    template: Template,
    tok: Tokenizer,
    rewards: CombinedReward,
    accuracy_reward: Option<String>,
    special: SpecialTokens,
    /// The starting point's generation_config.json (or the default), saved with every
    /// checkpoint.
    generation: GenerationConfig,
    /// The balance loss coefficient: `grpo.aux_loss_coef`, else the model's.
    aux_coef: f64,
    /// With `[lora]`: the adapters' settings and base, for the checkpoints.
    lora: Option<LoraRun>,
    style: ProgressStyle,
}

/// What the stages write to as the run goes: the logs, the cost meter, the clock and the
/// newest checkpoint.
struct Progress {
    metrics: JsonlWriter,
    samples: JsonlWriter,
    meter: CostMeter,
    started: Instant,
    /// Training seconds of the earlier parts of a resumed run.
    elapsed_before: f64,
    last_ckpt: Option<PathBuf>,
}

/// Where a stage left the run: finished (with the model), or stopped by the stop flag after
/// saving.
#[allow(clippy::large_enum_variant)] // made once per stage and moved straight out
enum StageEnd {
    Done(MoeModel),
    Interrupted,
}

/// What an SFT step ran: its sequences forward and backward.
fn sft_work(mc: &sobre_model::ModelConfig, batch: &[crate::sft::Pair]) -> Work {
    let lens = batch.iter().map(|(p, c, _)| p.len() + c.len());
    Work {
        tokens_generated: 0,
        tokens_trained: lens.clone().map(|l| l as u64).sum(),
        flops: lens
            .map(|l| TRAIN_FLOPS_FACTOR * sequence_forward_flops(mc, l))
            .sum(),
    }
}

/// The metrics line of SFT step `step` (1-based), begun at `started`.
fn sft_metrics(
    step: usize,
    nll: f64,
    tokens: usize,
    lr: f64,
    out: &crate::optim::UpdateOutcome,
    expert_counts: &[Vec<u32>],
    started: Instant,
) -> Map<String, Value> {
    let counts: Vec<Vec<u64>> = expert_counts
        .iter()
        .map(|l| l.iter().map(|&c| c as u64).collect())
        .collect();
    let (loads, imb) = expert_load(&counts);
    let secs = started.elapsed().as_secs_f64();
    let mut m = Map::new();
    m.insert("stage".into(), json!("sft"));
    m.insert("step".into(), json!(step));
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
    m
}
