//! What a run cost: wall time, CPU-seconds, tokens generated and trained, an estimate of the
//! floating-point operations, and energy — estimated from CPU time and measured by RAPL where the
//! machine exposes it.
//!
//! [`CostMeter`] is started when the run starts and read with [`CostMeter::snapshot`]; the
//! [`RunCost`] it gives is what `final_eval.json` (its `cost` object) and the end-of-run table
//! report ([`summary_lines`]). A resumed run starts its meter with [`CostMeter::resume_from`] so
//! the figures cover the whole run, not the last part of it.
//!
//! The FLOPs are counted from the model's shape ([`forward_flops_per_token`]), the usual
//! `2 × parameters` per token for the matrix products plus the attention scores, with a
//! backward pass costing twice a forward ([`TRAIN_FLOPS_FACTOR`]). The energy *estimate* is
//! `CPU-seconds × run.watts_per_core / 3600` Wh, as CodeCarbon estimates from a TDP when no power
//! meter can be read; the measured figure comes from the package counters of
//! `/sys/class/powercap` (Intel/AMD RAPL), which cover the whole socket (every process on it),
//! and is absent where those counters do not exist or cannot be read (they are root-only on
//! most kernels since 5.10).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sobre_model::ModelConfig;

/// Where the kernel exposes RAPL energy counters.
pub const POWERCAP_ROOT: &str = "/sys/class/powercap";

/// A training token costs this many forward passes' FLOPs: the forward pass and a backward pass
/// that costs two (the gradient with respect to the activations and to the weights).
pub const TRAIN_FLOPS_FACTOR: f64 = 3.0;

/// The cost of a run so far. Serialized as the `cost` object of `final_eval.json` and kept in
/// the trainer state so a resumed run carries the earlier part's cost forward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunCost {
    /// Elapsed real time of the run in seconds, every resumed part added up (time between the
    /// parts, when nothing ran, is not counted).
    pub wall_seconds: f64,
    /// CPU time of the trainer process in seconds: user + system time of all its threads
    /// (`getrusage(RUSAGE_SELF)`), every resumed part added up. 0 where the platform does not
    /// report it.
    pub cpu_seconds: f64,
    /// Completion tokens sampled during the run (rollouts; evaluations are not counted).
    pub tokens_generated: u64,
    /// Tokens that a training step ran forward and backward over (SFT sequences; GRPO prompts
    /// and completions of the policy update).
    pub tokens_trained: u64,
    /// An *estimate* of the floating-point operations of generation and training, counted from
    /// the model's shape ([`forward_flops_per_token`], [`TRAIN_FLOPS_FACTOR`]): what the model
    /// needs, not what the kernels executed (padding, recomputation and the optimizer are not
    /// in it).
    pub flops_estimate: f64,
    /// An *estimate* of the energy in watt-hours: `cpu_seconds × watts_per_core / 3600`, as
    /// CodeCarbon estimates from a TDP when it has no power meter. Each resumed part adds its own
    /// CPU time at the `watts_per_core` it ran with.
    pub energy_wh_estimate: f64,
    /// The watts per busy core the estimate was made with (`run.watts_per_core`; the last
    /// part's, for a resumed run).
    pub watts_per_core: f64,
    /// Energy in watt-hours measured by the RAPL package counters of `/sys/class/powercap` over
    /// the run: the whole of every CPU socket, other processes included. `None` where the
    /// counters do not exist or cannot be read, or when a part of a resumed run had none.
    pub energy_wh_rapl: Option<f64>,
}

impl RunCost {
    /// The cost of two parts of a run done one after the other (the stages of a staged run):
    /// sums, RAPL only when both parts had it, `self`'s `watts_per_core`.
    pub fn plus(&self, other: &RunCost) -> RunCost {
        RunCost {
            wall_seconds: self.wall_seconds + other.wall_seconds,
            cpu_seconds: self.cpu_seconds + other.cpu_seconds,
            tokens_generated: self.tokens_generated + other.tokens_generated,
            tokens_trained: self.tokens_trained + other.tokens_trained,
            flops_estimate: self.flops_estimate + other.flops_estimate,
            energy_wh_estimate: self.energy_wh_estimate + other.energy_wh_estimate,
            watts_per_core: self.watts_per_core,
            energy_wh_rapl: self
                .energy_wh_rapl
                .zip(other.energy_wh_rapl)
                .map(|(a, b)| a + b),
        }
    }
}

/// What a training step did, for the run's cost: tokens sampled, tokens run forward and
/// backward, and the estimated FLOPs of both (and of a reference forward, if any).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    pub tokens_generated: u64,
    pub tokens_trained: u64,
    pub flops: f64,
}

/// Records a run's cost from its start; see the module documentation.
#[derive(Debug)]
pub struct CostMeter {
    started: Instant,
    cpu_at_start: Option<f64>,
    /// The earlier parts' cost, for a resumed run.
    previous: Option<RunCost>,
    tokens_generated: u64,
    tokens_trained: u64,
    flops: f64,
    rapl: Option<Mutex<Rapl>>,
}

impl CostMeter {
    /// Start measuring now (the start of a fresh run).
    pub fn start() -> Self {
        Self::with_powercap(None, Path::new(POWERCAP_ROOT))
    }

    /// Start measuring now, adding the cost of the earlier part(s) of a resumed run: the
    /// snapshots of this meter are `previous` plus what is spent from now on. (A checkpoint
    /// that kept no cost is better resumed with [`CostMeter::start`]: its figures then cover
    /// this part only.)
    pub fn resume_from(previous: RunCost) -> Self {
        Self::with_powercap(Some(previous), Path::new(POWERCAP_ROOT))
    }

    /// The RAPL counters read from `root` instead of [`POWERCAP_ROOT`] (for tests).
    fn with_powercap(previous: Option<RunCost>, root: &Path) -> Self {
        CostMeter {
            started: Instant::now(),
            cpu_at_start: process_cpu_seconds(),
            previous,
            tokens_generated: 0,
            tokens_trained: 0,
            flops: 0.0,
            rapl: Rapl::open(root).map(Mutex::new),
        }
    }

    /// Count what a step did (see [`Work`]).
    pub fn add(&mut self, work: &Work) {
        self.tokens_generated += work.tokens_generated;
        self.tokens_trained += work.tokens_trained;
        self.add_flops(work.flops);
    }

    /// Count `tokens` sampled (rollout completions).
    pub fn add_generated(&mut self, tokens: u64) {
        self.tokens_generated += tokens;
        self.poll_if_due();
    }

    /// Count `tokens` run forward and backward by a training step.
    pub fn add_trained(&mut self, tokens: u64) {
        self.tokens_trained += tokens;
        self.poll_if_due();
    }

    /// Count `flops` estimated floating-point operations (see [`forward_flops_per_token`] and
    /// [`sequence_forward_flops`]).
    pub fn add_flops(&mut self, flops: f64) {
        if flops.is_finite() && flops > 0.0 {
            self.flops += flops;
        }
        self.poll_if_due();
    }

    /// Read the RAPL counters now. A package counter wraps around after
    /// `max_energy_range_uj` (some minutes to an hour at full load); a wrap between two
    /// readings is accounted for, two are not, so a long stretch without any `add_*` call should
    /// call this now and then. The `add_*` methods call it at most once a second.
    pub fn poll(&self) {
        if let Some(r) = &self.rapl {
            r.lock().unwrap_or_else(|e| e.into_inner()).poll();
        }
    }

    fn poll_if_due(&self) {
        if let Some(r) = &self.rapl {
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            if r.last_poll.elapsed() >= Duration::from_secs(1) {
                r.poll();
            }
        }
    }

    /// The cost so far, the energy estimate made with `watts_per_core` for this part of the run.
    pub fn snapshot(&self, watts_per_core: f64) -> RunCost {
        let zero = RunCost::default();
        let p = self.previous.as_ref().unwrap_or(&zero);
        let cpu_now = match (self.cpu_at_start, process_cpu_seconds()) {
            (Some(a), Some(b)) => (b - a).max(0.0),
            _ => 0.0,
        };
        let rapl_now = self.rapl.as_ref().and_then(|r| {
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            r.poll();
            r.joules()
        });
        RunCost {
            wall_seconds: p.wall_seconds + self.started.elapsed().as_secs_f64(),
            cpu_seconds: p.cpu_seconds + cpu_now,
            tokens_generated: p.tokens_generated + self.tokens_generated,
            tokens_trained: p.tokens_trained + self.tokens_trained,
            flops_estimate: p.flops_estimate + self.flops,
            energy_wh_estimate: p.energy_wh_estimate + energy_estimate_wh(cpu_now, watts_per_core),
            watts_per_core,
            energy_wh_rapl: match (&self.previous, rapl_now) {
                (None, Some(j)) => Some(j / 3600.0),
                (Some(p), Some(j)) => p.energy_wh_rapl.map(|e| e + j / 3600.0),
                (_, None) => None,
            },
        }
    }
}

/// `cpu_seconds × watts_per_core / 3600`: the energy estimate in watt-hours.
pub fn energy_estimate_wh(cpu_seconds: f64, watts_per_core: f64) -> f64 {
    cpu_seconds * watts_per_core / 3600.0
}

/// User + system CPU time of this process (all threads), in seconds.
#[cfg(unix)]
fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: `getrusage` only writes the struct it is given, which is a valid, zeroed
    // `rusage` that lives for the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

#[cfg(not(unix))]
fn process_cpu_seconds() -> Option<f64> {
    None
}

/// The RAPL package zones and the energy counted since the meter started.
#[derive(Debug)]
struct Rapl {
    zones: Vec<Zone>,
    last_poll: Instant,
    /// A counter could not be read after the start: the total is unknown from then on.
    failed: bool,
}

#[derive(Debug)]
struct Zone {
    energy_file: PathBuf,
    /// The counter's largest value; it goes back to 0 after it.
    max_range_uj: u64,
    last_uj: u64,
    total_uj: u128,
}

impl Rapl {
    /// The top-level package zones under `root` whose counters can be read; `None` if there are
    /// none (no RAPL, no permission, not Linux).
    fn open(root: &Path) -> Option<Self> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_package_zone(n))
            .collect();
        names.sort();
        let mut zones = Vec::new();
        for name in names {
            let dir = root.join(&name);
            // psys (a platform zone beside the packages on some laptops) covers the packages
            // too: adding it would count them twice.
            if read_trimmed(&dir.join("name")).is_some_and(|n| n == "psys") {
                continue;
            }
            let energy_file = dir.join("energy_uj");
            let (Some(now), Some(max)) = (
                read_u64(&energy_file),
                read_u64(&dir.join("max_energy_range_uj")),
            ) else {
                continue;
            };
            zones.push(Zone {
                energy_file,
                max_range_uj: max,
                last_uj: now,
                total_uj: 0,
            });
        }
        (!zones.is_empty()).then(|| Rapl {
            zones,
            last_poll: Instant::now(),
            failed: false,
        })
    }

    fn poll(&mut self) {
        self.last_poll = Instant::now();
        if self.failed {
            return;
        }
        for z in &mut self.zones {
            let reading = read_u64(&z.energy_file)
                .and_then(|now| Some((now, counter_delta(z.last_uj, now, z.max_range_uj)?)));
            let Some((now, delta)) = reading else {
                self.failed = true;
                return;
            };
            z.total_uj += u128::from(delta);
            z.last_uj = now;
        }
    }

    /// Joules counted since the start, all packages together; `None` once a reading failed.
    fn joules(&self) -> Option<f64> {
        let uj: u128 = self.zones.iter().map(|z| z.total_uj).sum();
        (!self.failed).then(|| uj as f64 / 1e6)
    }
}

/// Microjoules spent between two readings of a counter that goes back to 0 after `max`
/// (`max_energy_range_uj`): `now - last`, or `max - last + now` when it wrapped. `None` when a
/// reading is above `max` (not a counter of this range).
fn counter_delta(last: u64, now: u64, max: u64) -> Option<u64> {
    if now >= last {
        Some(now - last)
    } else if last <= max {
        Some(max - last + now)
    } else {
        None
    }
}

/// `intel-rapl:0`, `amd-rapl:1`: a top-level zone (a socket's package). Subzones
/// (`intel-rapl:0:0`, the cores, uncore or DRAM inside the package) are part of it, and
/// `intel-rapl-mmio:0` is a second interface to the same package counter.
fn is_package_zone(name: &str) -> bool {
    let Some((prefix, index)) = name.split_once(':') else {
        return false;
    };
    !prefix.is_empty()
        && !prefix.ends_with("-mmio")
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trimmed(path)?.parse().ok()
}

/// Parameters a token is multiplied with in the forward pass — the matrix products: q/k/v/o
/// projections, the router, the top-k routed experts, the shared expert(s) and their gate, the
/// dense SwiGLU of the layers that are dense (`mlp_only_layers`, `first_k_dense_replace`,
/// `decoder_sparse_step`, `moe_layer_freq`; [`ModelConfig::is_sparse_layer`]), and the LM head
/// (the embedding matrix when tied).
///
/// It is the model crate's active parameter count ([`ModelConfig::count_parameters`], what
/// `sobre inspect` prints) less what no matrix product uses: the RMSNorm weights, the q/k norms,
/// the biases, and the input embedding, a lookup (kept when tied, as it is the LM head too).
pub fn matmul_params_per_token(cfg: &ModelConfig) -> u64 {
    let (_, active) = cfg.count_parameters();
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut per_layer = 2 * h; // input and post-attention RMSNorm
    if cfg.qk_norm {
        per_layer += if cfg.qk_norm_over_projection() {
            (nq + nkv) * d
        } else {
            2 * d
        };
    }
    if cfg.attention_bias {
        per_layer += nq * d + 2 * nkv * d;
    }
    if cfg.o_proj_bias {
        per_layer += h;
    }
    if let Some(m) = &cfg.mla {
        // MLA's latent RMSNorms (kv_a_layernorm, and q_a_layernorm with a q_lora_rank).
        per_layer += m.kv_lora_rank + m.q_lora_rank.unwrap_or(0);
    }
    let mut not_matmul = cfg.num_hidden_layers * per_layer + h; // + the final norm
    if !cfg.tie_word_embeddings {
        not_matmul += cfg.vocab_size * h;
    }
    active.saturating_sub(not_matmul) as u64
}

/// Estimated FLOPs of the forward pass for one token that attends to `context_len` positions
/// (itself included): `2 × matmul_params_per_token` (a multiply and an add per weight) plus the
/// attention scores and the weighted sum of values, `2 × 2 × n_heads × head_dim × context_len`
/// per layer. For a token at position `i` (from 0) of a causal sequence, `context_len = i + 1`;
/// see [`sequence_forward_flops`] for a whole sequence.
pub fn forward_flops_per_token(cfg: &ModelConfig, context_len: usize) -> f64 {
    2.0 * matmul_params_per_token(cfg) as f64 + attention_flops(cfg, context_len as f64)
}

/// Estimated FLOPs of a training step for one token: [`TRAIN_FLOPS_FACTOR`] × the forward pass
/// (forward + backward).
pub fn training_flops_per_token(cfg: &ModelConfig, context_len: usize) -> f64 {
    TRAIN_FLOPS_FACTOR * forward_flops_per_token(cfg, context_len)
}

/// Estimated forward FLOPs of a causal sequence of `len` tokens: [`forward_flops_per_token`]
/// summed over positions, the token at position `i` attending to `i + 1`. It is the cost of one
/// forward over the sequence, and also of generating it with a KV cache (prefill + decode: each
/// token is computed once, attending to those before it). Training on it costs
/// [`TRAIN_FLOPS_FACTOR`] times this.
pub fn sequence_forward_flops(cfg: &ModelConfig, len: usize) -> f64 {
    let n = len as f64;
    // Σ_{i=1..n} i = n(n+1)/2 positions attended to in all.
    2.0 * matmul_params_per_token(cfg) as f64 * n + attention_flops(cfg, n * (n + 1.0) / 2.0)
}

/// Estimated forward FLOPs of a GRPO batch as sobre computes it: `groups` prompts of
/// `prompt_len` tokens with `group_size` completions of `completion_len` each, the LM head at
/// the completion positions only (only their log-probabilities are used), each prompt computed
/// once per group when `share_prefix` (the layouts' prefix sharing) and once per row otherwise.
/// The policy update costs [`TRAIN_FLOPS_FACTOR`] times this per iteration; the reference
/// forward and (to within the prompts' last positions) the rollout cost it once.
pub fn grpo_batch_forward_flops(
    cfg: &ModelConfig,
    prompt_len: usize,
    completion_len: usize,
    groups: usize,
    group_size: usize,
    share_prefix: bool,
) -> f64 {
    let head = 2.0 * (cfg.vocab_size * cfg.hidden_size) as f64;
    let trunk = |context: usize| forward_flops_per_token(cfg, context) - head;
    let prompt: f64 = (1..=prompt_len).map(trunk).sum();
    let completion: f64 = (prompt_len + 1..=prompt_len + completion_len)
        .map(|c| trunk(c) + head)
        .sum();
    let prompts = if share_prefix {
        groups
    } else {
        groups * group_size
    };
    prompt * prompts as f64 + completion * (groups * group_size) as f64
}

/// `2 × n_heads × (qk_head_dim + v_head_dim) × context` per layer: q·k for every score, then
/// the score-weighted sum of the values (`2 × 2 × n_heads × head_dim` when the widths agree;
/// MLA's keys and values have their own).
fn attention_flops(cfg: &ModelConfig, context: f64) -> f64 {
    let widths = cfg.qk_head_dim() + cfg.v_head_dim();
    2.0 * (cfg.num_attention_heads * widths * cfg.num_hidden_layers) as f64 * context
}

/// The run's cost as lines for the end-of-run table, e.g.
///
/// ```text
/// cost: 482.1 s wall, 931.0 CPU-s, 1.23 M tokens generated, 980 k trained, 3.40 TFLOP (est.)
/// energy: 2.6 Wh (est.: CPU-s × 10 W/core), RAPL: n/a
/// ```
pub fn summary_lines(cost: &RunCost) -> Vec<String> {
    let rapl = match cost.energy_wh_rapl {
        Some(wh) => format!("{} Wh measured", short(wh)),
        None => "n/a".to_string(),
    };
    vec![
        format!(
            "cost: {:.1} s wall, {:.1} CPU-s, {} tokens generated, {} trained, {} (est.)",
            cost.wall_seconds,
            cost.cpu_seconds,
            si(cost.tokens_generated as f64, ""),
            si(cost.tokens_trained as f64, ""),
            si(cost.flops_estimate, "FLOP"),
        ),
        format!(
            "energy: {} Wh (est.: CPU-s × {} W/core), RAPL: {rapl}",
            short(cost.energy_wh_estimate),
            short(cost.watts_per_core)
        ),
    ]
}

/// The run's cost divided by the held-out points it gained (percentage points of a metric, e.g.
/// pass@1 from 30.0% to 47.1% is 17.1 points).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostPerPoint {
    /// The points gained (> 0).
    pub gain_points: f64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    /// Estimated watt-hours per point (see [`RunCost::energy_wh_estimate`]).
    pub energy_wh_estimate: f64,
    /// Measured (RAPL) watt-hours per point, where measured.
    pub energy_wh_rapl: Option<f64>,
    pub flops_estimate: f64,
    pub tokens_generated: f64,
    pub tokens_trained: f64,
}

/// `cost / gain_points`, figure by figure; `None` when nothing was gained (`gain_points <= 0`
/// or not a number).
pub fn cost_per_point(cost: &RunCost, gain_points: f64) -> Option<CostPerPoint> {
    if !(gain_points.is_finite() && gain_points > 0.0) {
        return None;
    }
    let per = |v: f64| v / gain_points;
    Some(CostPerPoint {
        gain_points,
        wall_seconds: per(cost.wall_seconds),
        cpu_seconds: per(cost.cpu_seconds),
        energy_wh_estimate: per(cost.energy_wh_estimate),
        energy_wh_rapl: cost.energy_wh_rapl.map(per),
        flops_estimate: per(cost.flops_estimate),
        tokens_generated: per(cost.tokens_generated as f64),
        tokens_trained: per(cost.tokens_trained as f64),
    })
}

impl CostPerPoint {
    /// One line, e.g. `12.3 CPU-s, 0.030 Wh (est.) per pass@1 point (+17.1 points)` for
    /// `metric = "pass@1"`.
    pub fn describe(&self, metric: &str) -> String {
        let rapl = self
            .energy_wh_rapl
            .map(|wh| format!(", {} Wh measured", short(wh)))
            .unwrap_or_default();
        format!(
            "{} CPU-s, {} Wh (est.){rapl} per {metric} point (+{:.1} points)",
            short(self.cpu_seconds),
            short(self.energy_wh_estimate),
            self.gain_points
        )
    }
}

/// `value` to three significant digits with an SI prefix before `unit`: `1.23 M`, `980 k`,
/// `3.40 TFLOP`, `812 FLOP` (no prefix below a thousand).
fn si(value: f64, unit: &str) -> String {
    const PREFIXES: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut v = value;
    let mut i = 0;
    while v.abs() >= 999.5 && i + 1 < PREFIXES.len() {
        v /= 1000.0;
        i += 1;
    }
    let num = if i == 0 {
        short(v)
    } else if v.abs() >= 99.95 {
        format!("{v:.0}")
    } else if v.abs() >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let sep = if i == 0 && unit.is_empty() { "" } else { " " };
    format!("{num}{sep}{}{unit}", PREFIXES[i])
}

/// A short, readable number: one decimal from 1 up, two significant digits below, `0` for 0.
fn short(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    if v.abs() >= 1.0 {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            return format!("{v:.0}");
        }
        return format!("{v:.1}");
    }
    let decimals = (1 - v.abs().log10().floor() as i32).clamp(1, 12) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::preset("tiny").expect("tiny preset")
    }

    #[test]
    fn tiny_flops_match_a_hand_count() {
        // tiny: vocab 64, hidden 32, 2 layers, 4 heads of 8, 2 kv heads, 4 experts top-2 of
        // width 16, untied, every layer sparse.
        // attention: q 32·32 + k,v 2·32·16 + o 32·32 = 3072; router 4·32 = 128;
        // experts 2 · 3·32·16 = 3072 → 6272 a layer, 12544 for two; LM head 64·32 = 2048.
        let cfg = tiny();
        assert_eq!(matmul_params_per_token(&cfg), 14_592);
        // 2 · 14592 + 2 layers · 2·2·4·8 · 100 = 29184 + 25600.
        assert_eq!(forward_flops_per_token(&cfg, 100), 54_784.0);
        assert_eq!(training_flops_per_token(&cfg, 100), 3.0 * 54_784.0);
        // Three tokens attend to 1 + 2 + 3 = 6 positions: 3 · 29184 + 256 · 6.
        assert_eq!(sequence_forward_flops(&cfg, 3), 87_552.0 + 1_536.0);
        let by_token: f64 = (1..=3).map(|c| forward_flops_per_token(&cfg, c)).sum();
        assert_eq!(sequence_forward_flops(&cfg, 3), by_token);
    }

    #[test]
    fn a_grpo_batch_counts_its_prompt_once_per_group_when_shared() {
        // tiny: trunk 2 · (14592 − LM head 2048) = 25088 a token, + 256 per position attended
        // to; the head 2 · 2048 = 4096 at completion positions only.
        // Prompt of 2 (contexts 1, 2): 2 · 25088 + 256 · 3 = 50944.
        // A completion of 1 (context 3): 25088 + 768 + 4096 = 29952, for each of 2 rows.
        let cfg = tiny();
        assert_eq!(
            grpo_batch_forward_flops(&cfg, 2, 1, 1, 2, true),
            50_944.0 + 2.0 * 29_952.0
        );
        assert_eq!(
            grpo_batch_forward_flops(&cfg, 2, 1, 1, 2, false),
            2.0 * 50_944.0 + 2.0 * 29_952.0
        );
        // Three groups cost three times one.
        assert_eq!(
            grpo_batch_forward_flops(&cfg, 5, 7, 3, 4, true),
            3.0 * grpo_batch_forward_flops(&cfg, 5, 7, 1, 4, true)
        );
    }

    #[test]
    fn dense_layers_shared_experts_biases_and_tied_head() {
        let mut cfg = tiny();
        cfg.first_k_dense_replace = 1; // layer 0 dense: 3·32·64 = 6144
        cfg.shared_expert_intermediate_size = 16; // 3·32·16 = 1536 on the sparse layer
        cfg.shared_expert_gate = true; // a 32 → 1 matmul
        cfg.attention_bias = true; // biases are adds, not matmuls
        cfg.o_proj_bias = true;
        cfg.tie_word_embeddings = true; // the head is the embedding: still 64·32
        let attn = 3072;
        let dense = 6144;
        let sparse = 128 + 1536 + 32 + 3072;
        assert_eq!(
            matmul_params_per_token(&cfg),
            (2 * attn + dense + sparse + 2048) as u64
        );
        cfg.mlp_only_layers = vec![1]; // both dense now
        assert_eq!(
            matmul_params_per_token(&cfg),
            (2 * attn + 2 * dense + 2048) as u64
        );
    }

    /// MLA: queries and keys 16 wide (8 nope + 8 rope), values 12, so a score and a weighted
    /// value cost 2 × 4 heads × (16 + 12) × 2 layers = 448 FLOPs per position attended to; the
    /// latent norm (kv_lora_rank 16) is no matmul.
    #[test]
    fn mla_attention_uses_its_own_key_and_value_widths() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../sobre-model/tests/fixtures/deepseek_v2_lite_tiny/config.json");
        let cfg = ModelConfig::from_file(&path).unwrap();
        let (_, active) = cfg.count_parameters();
        // Norms: 2 layers × (2 × hidden 32 + kv_a_layernorm 16) + the final 32; the untied
        // input embedding 128 × 32 is a lookup.
        let matmul = active as u64 - (2 * (64 + 16) + 32) - 128 * 32;
        assert_eq!(matmul_params_per_token(&cfg), matmul);
        let f = forward_flops_per_token(&cfg, 10);
        assert_eq!(f, 2.0 * matmul as f64 + 448.0 * 10.0);
    }

    #[test]
    fn small_preset_is_counted_with_its_tied_head() {
        // small: vocab 1024, hidden 128, 4 layers, 4 heads of 32, 2 kv heads, 8 experts top-2 of
        // width 96, tied.
        let cfg = ModelConfig::preset("small").expect("small preset");
        let attn = 128 * 128 + 2 * 128 * 64 + 128 * 128;
        let layer = attn + 8 * 128 + 2 * 3 * 128 * 96;
        assert_eq!(
            matmul_params_per_token(&cfg),
            (4 * layer + 1024 * 128) as u64
        );
    }

    #[test]
    fn rapl_zone_names() {
        assert!(is_package_zone("intel-rapl:0"));
        assert!(is_package_zone("intel-rapl:1"));
        assert!(is_package_zone("amd-rapl:0"));
        assert!(!is_package_zone("intel-rapl:0:0"));
        assert!(!is_package_zone("intel-rapl"));
        assert!(!is_package_zone("intel-rapl-mmio:0"));
        assert!(!is_package_zone("intel-rapl:x"));
    }

    #[test]
    fn counter_wraps_at_its_range() {
        assert_eq!(counter_delta(100, 250, 1000), Some(150));
        assert_eq!(counter_delta(900, 50, 1000), Some(150));
        assert_eq!(counter_delta(1200, 50, 1000), None);
    }

    fn zone(root: &Path, name: &str, zone_name: &str, energy: u64, max: u64) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("zone dir");
        std::fs::write(d.join("name"), format!("{zone_name}\n")).expect("name");
        std::fs::write(d.join("energy_uj"), format!("{energy}\n")).expect("energy");
        std::fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).expect("max");
    }

    #[test]
    fn rapl_sums_packages_only_and_handles_a_wrap() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        zone(r, "intel-rapl:0", "package-0", 1_000_000, 10_000_000);
        zone(r, "intel-rapl:1", "package-1", 9_000_000, 10_000_000);
        zone(r, "intel-rapl:0:0", "core", 5, 10_000_000); // a subzone: ignored
        zone(r, "intel-rapl:2", "psys", 5, 10_000_000); // the platform: ignored
        std::fs::create_dir_all(r.join("intel-rapl")).expect("control type dir");
        let mut meter = CostMeter::with_powercap(None, r);
        // Package 0 spends 2 J; package 1 wraps: 1 J to its range, then 0.5 J.
        std::fs::write(r.join("intel-rapl:0/energy_uj"), "3000000\n").expect("write");
        std::fs::write(r.join("intel-rapl:1/energy_uj"), "500000\n").expect("write");
        std::fs::write(r.join("intel-rapl:0:0/energy_uj"), "9999999\n").expect("write");
        meter.poll();
        meter.add_generated(10);
        meter.add_trained(25);
        meter.add_flops(1e9);
        let c = meter.snapshot(10.0);
        assert_eq!(c.energy_wh_rapl, Some(3.5 / 3600.0));
        assert_eq!((c.tokens_generated, c.tokens_trained), (10, 25));
        assert_eq!(c.flops_estimate, 1e9);
        assert_eq!(c.watts_per_core, 10.0);
        assert!(c.wall_seconds >= 0.0 && c.cpu_seconds >= 0.0);
        // Snapshots do not count the same energy twice.
        assert_eq!(meter.snapshot(10.0).energy_wh_rapl, Some(3.5 / 3600.0));
        // A counter that becomes unreadable makes the measurement unknown, not an error.
        std::fs::remove_file(r.join("intel-rapl:0/energy_uj")).expect("remove");
        assert_eq!(meter.snapshot(10.0).energy_wh_rapl, None);
    }

    #[test]
    fn no_powercap_is_none() {
        let root = tempfile::tempdir().expect("tempdir");
        let missing = root.path().join("nowhere");
        let m = CostMeter::with_powercap(None, &missing);
        assert_eq!(m.snapshot(10.0).energy_wh_rapl, None);
        let empty = CostMeter::with_powercap(None, root.path());
        assert_eq!(empty.snapshot(10.0).energy_wh_rapl, None);
    }

    #[test]
    fn cpu_time_and_estimate() {
        let m = CostMeter::with_powercap(None, Path::new("/nonexistent"));
        // Burn some CPU so the process clock moves.
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let c = m.snapshot(36.0);
        if cfg!(unix) {
            assert!(c.cpu_seconds > 0.0, "{c:?}");
        }
        assert!((c.energy_wh_estimate - c.cpu_seconds * 36.0 / 3600.0).abs() < 1e-12);
        assert_eq!(energy_estimate_wh(931.0, 10.0), 9310.0 / 3600.0);
    }

    #[test]
    fn resume_carries_the_earlier_cost() {
        let before = RunCost {
            wall_seconds: 100.0,
            cpu_seconds: 180.0,
            tokens_generated: 1000,
            tokens_trained: 3000,
            flops_estimate: 5e12,
            energy_wh_estimate: 0.5,
            watts_per_core: 10.0,
            energy_wh_rapl: Some(2.0),
        };
        let text = serde_json::to_string(&before).expect("serialize");
        let back: RunCost = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, before);
        let mut m = CostMeter::with_powercap(Some(back), Path::new("/nonexistent"));
        m.add_generated(5);
        m.add_trained(7);
        m.add_flops(1e12);
        let c = m.snapshot(20.0);
        assert!(c.wall_seconds >= 100.0 && c.cpu_seconds >= 180.0);
        assert_eq!((c.tokens_generated, c.tokens_trained), (1005, 3007));
        assert_eq!(c.flops_estimate, 6e12);
        assert!(
            (c.energy_wh_estimate - (0.5 + (c.cpu_seconds - 180.0) * 20.0 / 3600.0)).abs() < 1e-9
        );
        assert_eq!(c.watts_per_core, 20.0);
        // This part has no counters: the total energy is no longer known.
        assert_eq!(c.energy_wh_rapl, None);
        // Missing keys read as zero (a cost object from an older or partial file).
        let partial: RunCost = serde_json::from_str(r#"{"cpu_seconds": 2.5}"#).expect("partial");
        assert_eq!(partial.cpu_seconds, 2.5);
        assert_eq!(partial.energy_wh_rapl, None);
    }

    #[test]
    fn resume_adds_measured_energy_when_both_parts_have_it() {
        let root = tempfile::tempdir().expect("tempdir");
        zone(root.path(), "intel-rapl:0", "package-0", 0, 9_000_000_000);
        let before = |wh| RunCost {
            energy_wh_rapl: wh,
            wall_seconds: 1.0,
            ..RunCost::default()
        };
        let m = CostMeter::with_powercap(Some(before(Some(1.0))), root.path());
        let unknown = CostMeter::with_powercap(Some(before(None)), root.path());
        // 3600 J = 1 Wh on top of the earlier 1 Wh.
        std::fs::write(root.path().join("intel-rapl:0/energy_uj"), "3600000000\n").expect("write");
        assert_eq!(m.snapshot(10.0).energy_wh_rapl, Some(2.0));
        // The earlier part was not measured: neither is the whole.
        assert_eq!(unknown.snapshot(10.0).energy_wh_rapl, None);
    }

    #[test]
    fn summary_and_cost_per_point() {
        let cost = RunCost {
            wall_seconds: 482.14,
            cpu_seconds: 931.0,
            tokens_generated: 1_234_000,
            tokens_trained: 980_000,
            flops_estimate: 3.4e12,
            energy_wh_estimate: energy_estimate_wh(931.0, 10.0),
            watts_per_core: 10.0,
            energy_wh_rapl: None,
        };
        assert_eq!(
            summary_lines(&cost),
            [
                "cost: 482.1 s wall, 931.0 CPU-s, 1.23 M tokens generated, 980 k trained, 3.40 TFLOP (est.)",
                "energy: 2.6 Wh (est.: CPU-s × 10 W/core), RAPL: n/a",
            ]
        );
        let measured = RunCost {
            energy_wh_rapl: Some(3.0625),
            tokens_generated: 812,
            ..cost.clone()
        };
        assert_eq!(
            summary_lines(&measured)[1],
            "energy: 2.6 Wh (est.: CPU-s × 10 W/core), RAPL: 3.1 Wh measured"
        );
        assert!(summary_lines(&measured)[0].contains(" 812 tokens generated"));

        let p = cost_per_point(&cost, 20.0).expect("a gain");
        assert_eq!(p.cpu_seconds, 46.55);
        assert_eq!(p.wall_seconds, 482.14 / 20.0);
        assert_eq!(p.tokens_generated, 61_700.0);
        assert!((p.energy_wh_estimate - 9310.0 / 3600.0 / 20.0).abs() < 1e-15);
        assert_eq!(p.energy_wh_rapl, None);
        assert_eq!(
            p.describe("pass@1"),
            "46.5 CPU-s, 0.13 Wh (est.) per pass@1 point (+20.0 points)"
        );
        let q = cost_per_point(&measured, 0.5).expect("a gain");
        assert_eq!(q.energy_wh_rapl, Some(3.0625 * 2.0));
        assert_eq!(
            cost_per_point(&cost, 15_000.0)
                .expect("a gain")
                .describe("pass@1"),
            "0.062 CPU-s, 0.00017 Wh (est.) per pass@1 point (+15000.0 points)"
        );
        assert_eq!(cost_per_point(&cost, 0.0), None);
        assert_eq!(cost_per_point(&cost, -3.0), None);
        assert_eq!(cost_per_point(&cost, f64::NAN), None);
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(10.0), "10");
        assert_eq!(short(2.586), "2.6");
        assert_eq!(short(0.03), "0.030");
        assert_eq!(short(0.000123), "0.00012");
        assert_eq!(si(1_234_000.0, ""), "1.23 M");
        assert_eq!(si(980_000.0, ""), "980 k");
        assert_eq!(si(12_345.0, ""), "12.3 k");
        assert_eq!(si(999_999.0, ""), "1.00 M");
        assert_eq!(si(812.0, ""), "812");
        assert_eq!(si(3.4e12, "FLOP"), "3.40 TFLOP");
        assert_eq!(si(812.0, "FLOP"), "812 FLOP");
        assert_eq!(si(0.0, "FLOP"), "0 FLOP");
    }
}
