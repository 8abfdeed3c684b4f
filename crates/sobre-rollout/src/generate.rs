//! The generation loop: shared prefill, batched decode, per-sequence randomness, and tool calls
//! that pause one sequence while the rest of the batch decodes ([`crate::tools`]).

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use sobre_model::{
    Batch, ForwardOptions, HostKvCache, InferenceModel, Kernels, KvCache, LogitsMode, MoeModel,
};

use crate::RolloutError;
use crate::parallel::{par_map, split_range};
use crate::sampling::{SamplingParams, sample};
use crate::tools::{ToolCallRecord, ToolResponse, ToolSettings, Tools};

/// One prompt to complete. `key` identifies it for seeding: the same key, sample index and
/// seed give the same completion whatever else is in the batch.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub key: u64,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// An eos / stop token was sampled, or a stop string appeared.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One sampled completion (serializable: the ranks of a multi-process run exchange them).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    /// Index of its prompt in the `prompts` slice.
    pub prompt_index: usize,
    /// Index within its group, `0..group_size`.
    pub sample_index: usize,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// The new tokens, including the stop token when one ended it.
    pub tokens: Vec<u32>,
    /// `log π(token | prefix)` for each new token under `softmax(logits / temperature)`; 0 for
    /// tokens a tool inserted.
    pub logprobs: Vec<f32>,
    /// Per token: `true` when the policy sampled it, `false` for a tool response's tokens
    /// (not the policy's actions: masked out of the loss, the KL and the entropy).
    pub sampled: Vec<bool>,
    /// The tool calls answered, in order (empty without tools).
    pub tool_calls: Vec<ToolCallRecord>,
    /// Decoded text of `tokens`, when a detokenizer was given.
    pub text: Option<String>,
    pub finish_reason: FinishReason,
}

/// Turns token ids into text, for stop strings and `Completion::text`. Implemented by the
/// data crate's tokenizer; rollouts do not depend on it. `Sync` because shards of a rollout
/// decode on their own threads.
pub trait Detokenizer: Sync {
    fn decode(&self, ids: &[u32]) -> String;
}

/// How the engine runs; the defaults are the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineMode {
    /// Prefill each prompt once and copy its cache to the group's samples.
    SharedPrefill,
    /// Prefill every sample's copy of the prompt separately (what engines without prefix
    /// sharing do). Same results; for benchmarks.
    SeparatePrefill,
    /// No KV cache: every step re-runs the whole sequence. The slow reference.
    NoCache,
}

/// What computes the forward passes of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKernels {
    /// [`InferenceModel`] (plain buffers, GEMM calls) where the model lives on the host CPU,
    /// burn tensor ops with the fused kernels elsewhere. The fast path.
    #[default]
    Host,
    /// burn tensor ops ([`MoeModel::forward`]) with these kernels, on any backend: the
    /// reference the host engine is tested against.
    Tensor(Kernels),
}

/// Where a sequence is in the tool loop.
enum ToolState {
    Sampling,
    /// Its call runs on a worker; `idle` more masked decode steps before taking the response.
    Paused {
        idle: usize,
        call: String,
        /// The response and the tool's own running time, seconds.
        response: mpsc::Receiver<(ToolResponse, f64)>,
    },
    /// Feeding a response, one token per decode step.
    Injecting(VecDeque<u32>),
}

/// A sequence being decoded.
struct Seq {
    prompt_index: usize,
    sample_index: usize,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    sampled: Vec<bool>,
    finish: Option<FinishReason>,
    /// Whether this row's next input (its last token) is in the text; `false` for the masked
    /// slot of an idle step while its tool runs.
    input_real: bool,
    tool: ToolState,
    /// `tokens[..scan_from]` end with the last tool response: not scanned for calls again.
    scan_from: usize,
    calls: Vec<ToolCallRecord>,
}

impl Seq {
    fn sampled_count(&self) -> usize {
        self.sampled.iter().filter(|&&s| s).count()
    }

    /// Tokens that count towards `max_new_tokens`.
    fn counted(&self, tools: Option<&ToolSettings>) -> usize {
        match tools {
            Some(t) if !t.responses_count_as_new_tokens => self.sampled_count(),
            _ => self.tokens.len(),
        }
    }

    /// Whether the next step needs this row's logits (it samples); a paused or injecting row
    /// only feeds its cache.
    fn samples_next(&self) -> bool {
        matches!(self.tool, ToolState::Sampling)
    }
}

/// SplitMix64 finaliser: decorrelates nearby seeds and keys.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The random stream of sample `sample_index` of the prompt with `key`.
pub fn sequence_rng(seed: u64, key: u64, sample_index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        mix(mix(seed ^ 0x5eed) ^ key).wrapping_add(mix(sample_index as u64 + 1)),
    )
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Sample `group_size` completions for each prompt (no tools: [`generate_with_tools`]).
pub fn generate(
    model: &MoeModel,
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    detok: Option<&dyn Detokenizer>,
) -> Result<Vec<Completion>, RolloutError> {
    generate_with_tools(model, prompts, group_size, params, detok, None)
}

/// Sample `group_size` completions for each prompt, with `tools` answering the calls they make.
///
/// All live sequences decode as one batch; a finished sequence leaves the batch (its cache row
/// is dropped). Each sequence draws exactly one uniform from its own stream per token, so its
/// tokens do not depend on batch size, order or thread count. Completions come back ordered by
/// prompt, then sample index.
///
/// With `params.data_parallel_size = n > 1` the prompts are cut into `n` contiguous shards of
/// near-equal size, each decoded by its own engine on its own thread, and the completions are
/// joined back in prompt order: the same streams, so the same tokens unless a float sum moved
/// by the different padding crosses a sampling boundary.
///
/// On the CPU backend the forward passes run on the host engine ([`EngineKernels::Host`]; the
/// shards share one host copy of the weights), elsewhere on burn tensor ops.
pub fn generate_with_tools(
    model: &MoeModel,
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    detok: Option<&dyn Detokenizer>,
    tools: Option<&dyn Tools>,
) -> Result<Vec<Completion>, RolloutError> {
    let shards = params.data_parallel_size.min(prompts.len());
    // One host copy of the weights, shared by the shards' threads.
    let host = InferenceModel::for_model(model);
    let run = |prompts: &[Prompt]| {
        let mode = EngineMode::SharedPrefill;
        let engine = (host.as_ref(), Kernels::Fused);
        let io = Io { detok, tools };
        run_on(model, engine, prompts, group_size, params, io, mode)
    };
    if shards <= 1 {
        return run(prompts);
    }
    let bounds = split_range(0..prompts.len(), shards);
    let results = par_map(&bounds, |r| run(&prompts[r.clone()]));
    let mut out = Vec::with_capacity(prompts.len() * group_size);
    for (offset, shard) in bounds.into_iter().map(|r| r.start).zip(results) {
        for mut c in shard.map_err(|e| e.offset_prompt(offset))? {
            c.prompt_index += offset;
            out.push(c);
        }
    }
    Ok(out)
}

/// [`generate`] on one engine with an explicit mode and kernels (benchmarks and tests); no
/// data-parallel shards.
pub fn generate_with(
    model: &MoeModel,
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    detok: Option<&dyn Detokenizer>,
    mode: EngineMode,
    kernels: EngineKernels,
) -> Result<Vec<Completion>, RolloutError> {
    let io = Io { detok, tools: None };
    generate_on(model, prompts, group_size, params, io, mode, kernels)
}

/// What a rollout reads besides the model: the detokenizer (stop strings, texts, tool calls)
/// and the tools.
#[derive(Clone, Copy)]
pub struct Io<'a> {
    pub detok: Option<&'a dyn Detokenizer>,
    pub tools: Option<&'a dyn Tools>,
}

/// [`generate_with`] with tools.
pub fn generate_on(
    model: &MoeModel,
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    io: Io<'_>,
    mode: EngineMode,
    kernels: EngineKernels,
) -> Result<Vec<Completion>, RolloutError> {
    let (host, k) = match kernels {
        EngineKernels::Host => (InferenceModel::for_model(model), Kernels::Fused),
        EngineKernels::Tensor(k) => (None, k),
    };
    run_on(
        model,
        (host.as_ref(), k),
        prompts,
        group_size,
        params,
        io,
        mode,
    )
}

/// [`run_engine`] on the host engine when there is one, else on tensor ops with these kernels.
fn run_on(
    model: &MoeModel,
    (host, kernels): (Option<&InferenceModel>, Kernels),
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    io: Io<'_>,
    mode: EngineMode,
) -> Result<Vec<Completion>, RolloutError> {
    match host {
        Some(h) => run_engine(model, h, prompts, group_size, params, io, mode),
        None => {
            let engine = TensorEngine(model, kernels);
            run_engine(model, engine, prompts, group_size, params, io, mode)
        }
    }
}

/// What runs a rollout's forward passes: the host engine or burn tensor ops.
trait Engine: Copy {
    type Cache;
    fn new_cache(self, batch: usize, capacity: usize) -> Self::Cache;
    /// Logits of each row's last column, `[batch, vocab]` row-major.
    fn logits_last(self, batch: &Batch, cache: Option<&mut Self::Cache>) -> Vec<f32>;
    fn select_rows(cache: &Self::Cache, rows: &[usize]) -> Self::Cache;
    /// A cache whose row `i` continues row `prefix_of_row[i]` of `cache` with room for
    /// `new_tokens` more: [`HostKvCache::share_prefix`] on the host, copies elsewhere.
    fn continue_rows(cache: Self::Cache, prefix_of_row: &[usize], new_tokens: usize)
    -> Self::Cache;
}

impl Engine for &InferenceModel {
    type Cache = HostKvCache;

    fn new_cache(self, batch: usize, capacity: usize) -> HostKvCache {
        InferenceModel::new_cache(self, batch, capacity)
    }

    fn logits_last(self, batch: &Batch, cache: Option<&mut HostKvCache>) -> Vec<f32> {
        match cache {
            Some(c) => self.forward_last(batch, c),
            None => self.forward_last(batch, &mut self.new_cache(batch.batch, batch.seq)),
        }
    }

    fn select_rows(cache: &HostKvCache, rows: &[usize]) -> HostKvCache {
        cache.select_rows(rows)
    }

    fn continue_rows(
        cache: HostKvCache,
        prefix_of_row: &[usize],
        new_tokens: usize,
    ) -> HostKvCache {
        cache.share_prefix(prefix_of_row, new_tokens)
    }
}

/// [`MoeModel::forward`] with these kernels.
#[derive(Clone, Copy)]
struct TensorEngine<'a>(&'a MoeModel, Kernels);

impl Engine for TensorEngine<'_> {
    type Cache = KvCache;

    fn new_cache(self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(&self.0.config, batch, capacity, &self.0.device())
    }

    fn logits_last(self, batch: &Batch, cache: Option<&mut KvCache>) -> Vec<f32> {
        let opts = ForwardOptions {
            logits: LogitsMode::Last,
            kernels: self.1,
            ..Default::default()
        };
        let out = self.0.forward(batch, cache, opts);
        out.logits.try_into_vec_as::<f32>().unwrap_or_default()
    }

    fn select_rows(cache: &KvCache, rows: &[usize]) -> KvCache {
        cache.select_rows(rows)
    }

    fn continue_rows(cache: KvCache, prefix_of_row: &[usize], _new_tokens: usize) -> KvCache {
        cache.select_rows(prefix_of_row)
    }
}

fn run_engine<E: Engine>(
    model: &MoeModel,
    engine: E,
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    io: Io<'_>,
    mode: EngineMode,
) -> Result<Vec<Completion>, RolloutError> {
    params.validate().map_err(RolloutError::Params)?;
    if group_size == 0 {
        return Err(RolloutError::Params("group_size must be at least 1".into()));
    }
    if io.detok.is_none() {
        let needs = match (params.stop_strings.is_empty(), io.tools.is_some()) {
            (false, _) => Some("stop_strings need"),
            (true, true) => Some("tools need"),
            (true, false) => None,
        };
        if let Some(what) = needs {
            return Err(RolloutError::Params(format!(
                "{what} a tokenizer to decode completions"
            )));
        }
    }
    let vocab = model.config.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(RolloutError::Prompt {
                index: i,
                msg: "is empty".into(),
            });
        }
        if let Some(bad) = p.ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(RolloutError::Prompt {
                index: i,
                msg: format!("has token id {bad}, outside the vocabulary of {vocab}"),
            });
        }
    }
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    let mut stop_ids: Vec<u32> = params.stop_token_ids.clone();
    stop_ids.extend(&model.config.eos_token_id);
    if params.ignore_eos {
        stop_ids.clear();
    }

    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .flat_map(|(pi, p)| {
            (0..group_size).map(move |g| Seq {
                prompt_index: pi,
                sample_index: g,
                rng: sequence_rng(params.seed, p.key, g),
                tokens: vec![],
                logprobs: vec![],
                sampled: vec![],
                finish: None,
                input_real: true,
                tool: ToolState::Sampling,
                scan_from: 0,
                calls: vec![],
            })
        })
        .collect();

    // Tool workers run inside this scope, so they never outlive the rollout.
    std::thread::scope(|scope| {
        let spawn = |call: String| {
            let (tx, rx) = mpsc::channel();
            if let Some(t) = io.tools {
                scope.spawn(move || {
                    // A worker that panics drops `tx`: the engine reads that as a failed call.
                    let start = Instant::now();
                    let r = t.respond(&call);
                    let _ = tx.send((r, start.elapsed().as_secs_f64()));
                });
            }
            rx
        };
        let rules = StepRules {
            params,
            stop_ids: &stop_ids,
            io,
            tools: io.tools.map(|t| t.settings()),
        };
        let step = |seq: &mut Seq, logits: &[f32]| advance(seq, logits, &rules, &spawn);
        let extra = rules.tools.map_or(0, |t| {
            t.max_calls * (t.overlap_steps + t.max_response_tokens)
        });
        match mode {
            EngineMode::NoCache => decode_without_cache(engine, prompts, &mut seqs, vocab, &step),
            EngineMode::SharedPrefill | EngineMode::SeparatePrefill => decode_with_cache(
                engine,
                prompts,
                &mut seqs,
                group_size,
                params.max_new_tokens + extra,
                vocab,
                mode,
                &step,
            ),
        }
    });

    Ok(seqs
        .into_iter()
        .map(|s| Completion {
            prompt_index: s.prompt_index,
            sample_index: s.sample_index,
            prompt_tokens: prompts[s.prompt_index].ids.len(),
            text: io.detok.map(|d| d.decode(&s.tokens)),
            tokens: s.tokens,
            logprobs: s.logprobs,
            sampled: s.sampled,
            tool_calls: s.calls,
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

/// What [`advance`] checks after each token.
struct StepRules<'a> {
    params: &'a SamplingParams,
    stop_ids: &'a [u32],
    io: Io<'a>,
    /// The tools' limits, read once per rollout.
    tools: Option<ToolSettings>,
}

/// One decode step of one sequence, given its row's logits (meaningful only when it samples):
/// idle while its tool runs, feed the next response token, or sample; then the stop rules, and
/// whether the sampled text just closed a tool call (which pauses the sequence).
fn advance(
    seq: &mut Seq,
    logits: &[f32],
    rules: &StepRules<'_>,
    spawn: &dyn Fn(String) -> mpsc::Receiver<(ToolResponse, f64)>,
) {
    let settings = rules.tools;
    if let ToolState::Paused { idle, .. } = &mut seq.tool
        && *idle > 0
    {
        *idle -= 1;
        seq.input_real = false;
        return;
    }
    if let ToolState::Paused { .. } = seq.tool {
        take_response(seq, settings.as_ref(), rules.io.detok);
        if seq.finish.is_some() {
            return;
        }
    }
    seq.input_real = true;
    if let ToolState::Injecting(queue) = &mut seq.tool {
        if let Some(t) = queue.pop_front() {
            if queue.is_empty() {
                seq.tool = ToolState::Sampling;
                seq.scan_from = seq.tokens.len() + 1;
            }
            seq.tokens.push(t);
            seq.logprobs.push(0.0);
            seq.sampled.push(false);
            if seq.counted(settings.as_ref()) >= rules.params.max_new_tokens {
                seq.finish = Some(FinishReason::Length);
            }
            return;
        }
        seq.tool = ToolState::Sampling;
    }
    let u = uniform(&mut seq.rng);
    let (tok, lp) = sample(logits, rules.params, u);
    seq.tokens.push(tok);
    seq.logprobs.push(lp);
    seq.sampled.push(true);
    let params = rules.params;
    if rules.stop_ids.contains(&tok) {
        seq.finish = Some(FinishReason::Stop);
        return;
    }
    let detok = rules.io.detok;
    if let Some(d) = detok.filter(|_| !params.stop_strings.is_empty()) {
        let text = d.decode(&seq.tokens);
        if params
            .stop_strings
            .iter()
            .any(|s| text.contains(s.as_str()))
        {
            seq.finish = Some(FinishReason::Stop);
            return;
        }
    }
    if seq.counted(settings.as_ref()) >= params.max_new_tokens {
        seq.finish = Some(FinishReason::Length);
        return;
    }
    if let (Some(tools), Some(d), Some(s)) = (rules.io.tools, detok, settings)
        && seq.calls.len() < s.max_calls
        && let Some(call) = tools.closed_call(&d.decode(&seq.tokens[seq.scan_from..]))
    {
        seq.tool = ToolState::Paused {
            idle: s.overlap_steps,
            response: spawn(call.clone()),
            call,
        };
    }
}

/// A paused sequence's idle steps are over: take its tool's response (waiting if the tool is
/// still running) and start feeding it. An empty response ends the completion (`stop`): no
/// token can follow a call without one.
fn take_response(seq: &mut Seq, settings: Option<&ToolSettings>, detok: Option<&dyn Detokenizer>) {
    let ToolState::Paused { call, response, .. } =
        std::mem::replace(&mut seq.tool, ToolState::Sampling)
    else {
        return;
    };
    let (r, seconds) = response.recv().unwrap_or_else(|_| {
        let crashed = ToolResponse {
            ids: vec![],
            text: "the tool crashed".into(),
            error: true,
        };
        (crashed, 0.0)
    });
    let limit = settings.map_or(usize::MAX, |s| s.max_response_tokens);
    let cut = r.ids.len() > limit;
    let ids: Vec<u32> = r.ids.into_iter().take(limit).collect();
    // The record shows what was inserted: a cut response as its kept tokens' text.
    let response = match detok {
        Some(d) if cut => d.decode(&ids),
        _ => r.text,
    };
    seq.calls.push(ToolCallRecord {
        call,
        response,
        error: r.error,
        seconds,
        response_start: seq.tokens.len(),
        response_tokens: ids.len(),
    });
    if ids.is_empty() {
        seq.finish = Some(FinishReason::Stop);
    } else {
        seq.tool = ToolState::Injecting(ids.into());
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_with_cache<E: Engine>(
    engine: E,
    prompts: &[Prompt],
    seqs: &mut [Seq],
    group_size: usize,
    new_tokens: usize,
    vocab: usize,
    mode: EngineMode,
    step: &dyn Fn(&mut Seq, &[f32]),
) {
    let max_prompt = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let capacity = max_prompt + new_tokens;

    // Prefill: one row per prompt (shared) or one per sample (separate).
    let prefill_rows: Vec<Vec<u32>> = match mode {
        EngineMode::SharedPrefill => prompts.iter().map(|p| p.ids.clone()).collect(),
        _ => seqs
            .iter()
            .map(|s| prompts[s.prompt_index].ids.clone())
            .collect(),
    };
    let mut cache = engine.new_cache(prefill_rows.len(), capacity);
    let logits = engine.logits_last(&Batch::left_padded(&prefill_rows, 0), Some(&mut cache));
    for (i, seq) in seqs.iter_mut().enumerate() {
        let row = if mode == EngineMode::SharedPrefill {
            seq.prompt_index
        } else {
            i
        };
        step(seq, &logits[row * vocab..(row + 1) * vocab]);
    }
    // Row r of the cache serves `live[r]`; start with the group copies of each prompt's row.
    let mut live: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].finish.is_none())
        .collect();
    let rows: Vec<usize> = live
        .iter()
        .map(|&i| {
            if mode == EngineMode::SharedPrefill {
                i / group_size
            } else {
                i
            }
        })
        .collect();
    cache = match mode {
        // The prompts' rows are kept once and each sample continues its prompt's.
        EngineMode::SharedPrefill => E::continue_rows(cache, &rows, new_tokens),
        _ => E::select_rows(&cache, &rows),
    };

    while !live.is_empty() {
        // Every live row feeds one slot per step, so the cache rows stay in step: a paused
        // row's slot is masked (attention skips it), and its real tokens keep consecutive
        // positions.
        let batch = Batch {
            batch: live.len(),
            seq: 1,
            input_ids: live
                .iter()
                .map(|&i| *seqs[i].tokens.last().unwrap_or(&0))
                .collect(),
            positions: live
                .iter()
                .map(|&i| {
                    (prompts[seqs[i].prompt_index].ids.len() + seqs[i].tokens.len() - 1) as u32
                })
                .collect(),
            attention_mask: live.iter().map(|&i| seqs[i].input_real).collect(),
        };
        let logits = engine.logits_last(&batch, Some(&mut cache));
        for (r, &i) in live.iter().enumerate() {
            step(&mut seqs[i], &logits[r * vocab..(r + 1) * vocab]);
        }
        let keep: Vec<usize> = (0..live.len())
            .filter(|&r| seqs[live[r]].finish.is_none())
            .collect();
        if keep.len() < live.len() {
            live = keep.iter().map(|&r| live[r]).collect();
            if !live.is_empty() {
                cache = E::select_rows(&cache, &keep);
            }
        }
    }
}

/// The reference: every step runs the full prompt + completion of each sampling sequence (a
/// paused or injecting one needs no forward).
fn decode_without_cache<E: Engine>(
    engine: E,
    prompts: &[Prompt],
    seqs: &mut [Seq],
    vocab: usize,
    step: &dyn Fn(&mut Seq, &[f32]),
) {
    loop {
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].finish.is_none())
            .collect();
        if live.is_empty() {
            break;
        }
        let waiting: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| !seqs[i].samples_next())
            .collect();
        for i in waiting {
            step(&mut seqs[i], &[]);
        }
        let sampling: Vec<usize> = live
            .into_iter()
            .filter(|&i| seqs[i].samples_next() && seqs[i].finish.is_none())
            .collect();
        if sampling.is_empty() {
            continue;
        }
        let rows: Vec<Vec<u32>> = sampling
            .iter()
            .map(|&i| {
                let mut r = prompts[seqs[i].prompt_index].ids.clone();
                r.extend(&seqs[i].tokens);
                r
            })
            .collect();
        let logits = engine.logits_last(&Batch::left_padded(&rows, 0), None);
        for (r, &i) in sampling.iter().enumerate() {
            step(&mut seqs[i], &logits[r * vocab..(r + 1) * vocab]);
        }
    }
}
