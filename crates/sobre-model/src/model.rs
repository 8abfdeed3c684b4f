//! The decoder of every family sobre reads (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3
//! with Multi-head Latent Attention, …), in one file: the families differ only in options of
//! these layers and in tensor names (which live in `io.rs`).
//!
//! Embedding → N × [RMSNorm → attention → residual → RMSNorm → FFN → residual] → RMSNorm → head.
//! The FFN of a layer is a dense SwiGLU or a sparse MoE block (`ModelConfig::is_sparse_layer`).
//!
//! Layout: burn's matmul wants `x · W` with `W: [in, out]`, so every projection is held
//! transposed relative to HF's `[out, in]` (the I/O code transposes), and each SwiGLU keeps its
//! gate and up projections side by side in one `[in, 2 · inter]` matrix so one matmul serves
//! both. Experts of a layer are stacked into `[num_experts, …]` tensors.
//!
//! One forward serves training (no cache), prefill and cached decode: the caller passes the new
//! tokens, their positions, which of them are real (padding), and optionally a [`KvCache`].
//! Token ids, positions and masks are host data, because the rollout engine and trainer hold
//! them on the host anyway and the router's top-k choice is made on the host (see `MoeBlock`).

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::{log_softmax, sigmoid, silu, softmax};

use crate::config::{ModelConfig, ScoringFunc, TopkMethod};
use crate::fused;
use crate::rope::RopeFrequencies;

/// Masked attention scores. `-inf`, not a large finite negative: `exp` of a huge finite negative
/// takes libm's underflow path (errno and all), which was 3% of the W1 benchmark's profile, while
/// `exp(-inf)` is an early return; both give exactly 0. A query row with every key masked (a
/// padding query in a left-padded batch) would give NaN, so it keeps its own column unmasked and
/// is zeroed afterwards (see `AttnContext`).
const MASKED: f32 = f32::NEG_INFINITY;

/// Which implementation computes the experts of a sparse layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MoeImpl {
    /// Tokens grouped by expert, one matmul per expert over its tokens only.
    #[default]
    Dispatch,
    /// Every expert on every token, combined with a dense `[tokens, experts]` weight matrix.
    /// The slow reference the dispatch path is tested against.
    DenseReference,
}

/// Which implementation computes RMSNorm, SwiGLU's activation, RoPE, the attention softmax and the
/// routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels of [`fused`] (one op and one backward each) where the backend has them
    /// (`flex`), the reference elsewhere.
    #[default]
    Fused,
    /// Compositions of burn tensor ops, on every backend: the slow reference the fused kernels
    /// are tested against.
    Reference,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsMode {
    /// Every position: training and scoring.
    #[default]
    All,
    /// Only the last column: prefill and decode, where only the next token matters.
    Last,
}

/// Options of one forward call.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub moe: MoeImpl,
    pub logits: LogitsMode,
    pub kernels: Kernels,
    /// Build the differentiable auxiliary balance loss (training only).
    pub aux_loss: bool,
    /// Rows of the LM head's logits alive at once in [`MoeModel::token_scores`] (the fused
    /// path); 0 picks [`auto_chunk_rows`].
    pub logits_chunk_rows: usize,
    /// Activation recomputation (gradient checkpointing): each decoder layer keeps only its
    /// input for the backward, which runs the layer's forward again (`crate::checkpoint`).
    /// Applies to autodiff forwards with the fused kernels and no KV cache; elsewhere ignored.
    pub recompute_layers: bool,
}

/// Floats of logits per chunk that [`MoeModel::token_scores`] aims at when
/// `logits_chunk_rows` is 0: 16 MiB, a few L2-sized GEMM panels' worth and small next to
/// the weights of any model with a vocabulary large enough for the logits to matter.
pub const AUTO_CHUNK_FLOATS: usize = 1 << 22;

/// The chunk of rows [`MoeModel::token_scores`] uses by default for a vocabulary: 16 MiB of
/// logits, at least 16 rows.
pub fn auto_chunk_rows(vocab: usize) -> usize {
    (AUTO_CHUNK_FLOATS / vocab.max(1)).max(16)
}

/// The tokens of one forward call, as host data.
///
/// # Shapes
/// `input_ids`, `positions`, `attention_mask`: `[batch, seq]`, row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    /// RoPE position of each token: counts from each sequence's first real token.
    pub positions: Vec<u32>,
    /// `true` for real tokens, `false` for padding (HF's `attention_mask`).
    pub attention_mask: Vec<bool>,
}

impl Batch {
    /// Left-pad sequences of unequal length into one batch (padding first, so every row ends in
    /// the same column and decoding appends to all rows at once).
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32) -> Self {
        Self::padded(seqs, pad_id, true)
    }

    /// Right-pad sequences (padding last), the usual layout for training batches.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32) -> Self {
        Self::padded(seqs, pad_id, false)
    }

    /// # Panics
    /// If a vector does not hold `batch · seq` entries (a bug of the caller, not input).
    pub(crate) fn assert_shapes(&self) {
        let n = self.batch * self.seq;
        assert_eq!(self.input_ids.len(), n, "input_ids must hold batch·seq ids");
        assert_eq!(
            self.positions.len(),
            n,
            "positions must hold batch·seq entries"
        );
        assert_eq!(
            self.attention_mask.len(),
            n,
            "attention_mask must hold batch·seq entries"
        );
    }

    fn padded(seqs: &[Vec<u32>], pad_id: u32, left: bool) -> Self {
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut b = Batch {
            batch: seqs.len(),
            seq,
            input_ids: Vec::with_capacity(seqs.len() * seq),
            positions: Vec::with_capacity(seqs.len() * seq),
            attention_mask: Vec::with_capacity(seqs.len() * seq),
        };
        for s in seqs {
            let pad = seq - s.len();
            // One row: (padding, real tokens) in the chosen order.
            let mut push = |real: bool| {
                if real {
                    b.input_ids.extend(s.iter().copied());
                    b.positions.extend(0..s.len() as u32);
                    b.attention_mask.extend(std::iter::repeat_n(true, s.len()));
                } else {
                    b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
                    b.positions.extend(std::iter::repeat_n(0, pad));
                    b.attention_mask.extend(std::iter::repeat_n(false, pad));
                }
            };
            push(!left);
            push(left);
        }
        b
    }
}

/// Per-layer keys and values of past tokens, allocated once at full capacity and written in
/// place, plus which past columns hold real tokens.
///
/// An MLA model (DeepSeek) caches the compressed form, as transformers does: per token and
/// layer the normalised latent and the rotated `k_pe` (`kv_lora_rank + qk_rope_head_dim`
/// floats, [`ModelConfig::kv_bytes_per_token`]), expanded into every head's keys and values
/// through `kv_b_proj` at each forward.
///
/// # Shapes
/// keys, values: `[batch, num_key_value_heads, capacity, head_dim]`; MLA: keys
/// `[batch, 1, capacity, kv_lora_rank + qk_rope_head_dim]` and no values.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Tensor<4>>,
    /// Empty for MLA, whose keys hold the whole latent.
    values: Vec<Tensor<4>>,
    /// `[batch, capacity]`: column j of row b holds a real token.
    key_valid: Vec<bool>,
    batch: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `batch` rows of up to `capacity` tokens each.
    pub fn new(config: &ModelConfig, batch: usize, capacity: usize, device: &Device) -> Self {
        let layers = config.num_hidden_layers;
        let (shape, value_layers) = match &config.mla {
            Some(m) => ([batch, 1, capacity, m.latent_dim()], 0),
            None => (
                [batch, config.num_key_value_heads, capacity, config.head_dim],
                layers,
            ),
        };
        KvCache {
            keys: (0..layers).map(|_| Tensor::zeros(shape, device)).collect(),
            values: (0..value_layers)
                .map(|_| Tensor::zeros(shape, device))
                .collect(),
            key_valid: vec![false; batch * capacity],
            batch,
            capacity,
            len: 0,
        }
    }

    /// Tokens held per row (real or padding).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Bytes the cache's tensors hold (f32): `batch · capacity ·`
    /// [`ModelConfig::kv_bytes_per_token`].
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.shape().num_elements() * 4)
            .sum()
    }

    /// A cache whose row i is this cache's row `rows[i]`: duplicates a shared prompt prefill
    /// into its group's samples, or drops finished sequences from the batch.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let Some(device) = self.keys.first().map(Tensor::device) else {
            return self.clone();
        };
        let idx = int_tensor_1d(rows.iter().map(|&r| r as i64).collect(), &device);
        let mut key_valid = Vec::with_capacity(rows.len() * self.capacity);
        for &r in rows {
            key_valid
                .extend_from_slice(&self.key_valid[r * self.capacity..(r + 1) * self.capacity]);
        }
        // Rows selected as a 2-D `[batch, heads·capacity·head_dim]` tensor: burn-flex's select
        // backward (a scatter-add) has a row-copy loop for 2-D tensors but visits a 4-D one
        // element by element, dividing to find each index (6.6% of the W1 policy update).
        let select = |t: &Tensor<4>| {
            let [b, h, c, d] = t.dims();
            t.clone()
                .reshape([b, h * c * d])
                .select(0, idx.clone())
                .reshape([rows.len(), h, c, d])
        };
        KvCache {
            keys: self.keys.iter().map(select).collect(),
            values: self.values.iter().map(select).collect(),
            key_valid,
            batch: rows.len(),
            capacity: self.capacity,
            len: self.len,
        }
    }
}

/// Router statistics of one forward call, for logging and for the balance loss.
#[derive(Debug, Clone)]
pub struct RouterStats {
    /// `[sparse layer][expert]`: real tokens routed to each expert (each token counts k times).
    pub expert_counts: Vec<Vec<u32>>,
    /// Switch-style auxiliary balance loss, computed as transformers'
    /// `load_balancing_loss_func` does (over all sparse layers, padding excluded), unscaled by
    /// `router_aux_loss_coef`. `[1]`; present when `ForwardOptions::aux_loss` is set.
    pub aux_loss: Option<Tensor<1>>,
    /// The pieces `aux_loss` is made of, present with it: data-parallel replicas combine
    /// their shards' routing totals into the whole batch's balance loss.
    pub aux_parts: Option<AuxParts>,
}

impl RouterStats {
    /// The statistics of two forward calls over disjoint tokens, as if made by one.
    fn merge(self, other: RouterStats) -> RouterStats {
        let mut expert_counts = self.expert_counts;
        for (mine, theirs) in expert_counts.iter_mut().zip(&other.expert_counts) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        let aux_parts = match (self.aux_parts, other.aux_parts) {
            (Some(a), Some(b)) => {
                let mut totals = a.totals;
                totals.add(&b.totals);
                Some(AuxParts {
                    totals,
                    prob_sum: a.prob_sum + b.prob_sum,
                })
            }
            (a, b) => a.or(b),
        };
        RouterStats {
            expert_counts,
            aux_loss: aux_parts.as_ref().map(|p| p.loss_in(&p.totals)),
            aux_parts,
        }
    }
}

/// Routing totals over real tokens and sparse layers (no gradient).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTotals {
    /// `[experts]`: tokens routed to each expert (each token counts k times).
    pub tokens_per_expert: Vec<f64>,
    /// Tokens routed (once per sparse layer).
    pub rows: f64,
}

impl RouteTotals {
    /// Add another shard's totals.
    pub fn add(&mut self, other: &RouteTotals) {
        if self.tokens_per_expert.len() < other.tokens_per_expert.len() {
            self.tokens_per_expert
                .resize(other.tokens_per_expert.len(), 0.0);
        }
        for (a, b) in self
            .tokens_per_expert
            .iter_mut()
            .zip(&other.tokens_per_expert)
        {
            *a += b;
        }
        self.rows += other.rows;
    }
}

/// The balance loss `E · Σ_i f_i · P_i` (f_i: share of routed tokens, no gradient; P_i: mean
/// router probability) of one forward, in pieces.
#[derive(Debug, Clone)]
pub struct AuxParts {
    pub totals: RouteTotals,
    /// `[experts]`: Σ over real tokens and sparse layers of the router probabilities.
    pub prob_sum: Tensor<1>,
}

impl AuxParts {
    /// This forward's share of the balance loss of a batch whose totals are `batch`:
    /// `E · Σ_i (T_i / N) · (prob_sum_i / N)`. With its own totals it is this forward's loss
    /// (`RouterStats::aux_loss`); the shares of a batch's shards, each given the sum of their
    /// totals, add up to the loss of the batch in one forward. `[1]`.
    pub fn loss_in(&self, batch: &RouteTotals) -> Tensor<1> {
        let rows = batch.rows.max(1.0);
        let n = batch.tokens_per_expert.len();
        let share: Vec<f32> = batch
            .tokens_per_expert
            .iter()
            .map(|&c| (c / rows) as f32)
            .collect();
        let share = Tensor::<1>::from_data(TensorData::new(share, [n]), &self.prob_sum.device());
        (share * self.prob_sum.clone() / rows).sum() * n as f64
    }
}

/// What a forward call returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `[batch, seq, vocab]`, or `[batch, 1, vocab]` with `LogitsMode::Last`.
    pub logits: Tensor<3>,
    pub router: RouterStats,
}

/// `x * rsqrt(mean(x²) + eps) * weight` over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// `fused`: run [`fused::rms_norm`] (the caller checked [`fused::available`]).
    pub fn forward<const D: usize>(&self, x: Tensor<D>, fused: bool) -> Tensor<D> {
        rms_norm(x, self.weight.val(), self.eps, fused)
    }
}

/// `x * rsqrt(mean(x²) + eps) * weight` over the last dimension; `weight: [last dim]`.
fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64, fused: bool) -> Tensor<D> {
    if fused {
        return fused::rms_norm(x, weight, eps);
    }
    let var = x.clone().square().mean_dim(D - 1);
    x * (var + eps).sqrt().recip() * weight.unsqueeze()
}

/// A projection `x · W + b` with `W: [in, out]`, and optionally a LoRA adapter
/// ([`LoraAdapter`]): `x · W + b + scale · (x · A) · B`.
#[derive(Module, Debug)]
pub struct Proj {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// A low-rank adapter on this projection (`crate::lora`); `None` without LoRA.
    pub lora: Option<LoraAdapter>,
}

impl Proj {
    /// # Shapes
    /// `[rows, in]` → `[rows, out]`
    pub fn forward(&self, x: Tensor<2>, fused: bool) -> Tensor<2> {
        let Some(lora) = self.lora.as_ref().filter(|l| l.enabled) else {
            let y = linear(x, self.weight.val(), fused);
            return match &self.bias {
                Some(b) => y + b.val().unsqueeze(),
                None => y,
            };
        };
        let y = linear(x.clone(), self.weight.val(), fused);
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        y + lora.delta(x, fused)
    }

    /// The weight the projection computes with, `[in, out]`: `W`, or `W + scale · A · B` with
    /// an enabled adapter (what the host engine and `merge` use).
    pub fn merged_weight(&self) -> Tensor<2> {
        match self.lora.as_ref().filter(|l| l.enabled) {
            Some(l) => as_f32(self.weight.val()) + l.product(),
            None => self.weight.val(),
        }
    }
}

/// A LoRA adapter (Hu et al. 2021, PEFT's `LoraLayer`) on one projection: its output gains
/// `scale · (x · A) · B`, PEFT's `lora_B(lora_A(x)) * scaling`. Held transposed like every
/// weight here: PEFT's `lora_A.weight` `[r, in]` is `a: [in, r]`, `lora_B.weight` `[out, r]`
/// is `b: [r, out]`.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]`
    pub a: Param<Tensor<2>>,
    /// `[r, out]`
    pub b: Param<Tensor<2>>,
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    #[module(skip)]
    pub scale: f64,
    /// Off: the projection computes its base weight only (the GRPO reference, PEFT's
    /// `disable_adapter()`).
    #[module(skip)]
    pub enabled: bool,
    /// `lora_dropout`: inside a training forward ([`crate::lora::dropout_scope`]) the adapter's
    /// input is dropped with this probability (and the kept entries scaled by `1 / (1 − p)`),
    /// PEFT's `lora_B(lora_A(dropout(x)))`; everywhere else (rollouts, the reference,
    /// evaluation, merging) it is inactive, as in PEFT's eval mode.
    #[module(skip)]
    pub dropout: f64,
}

impl LoraAdapter {
    /// `scale · (dropout(x) · A) · B`. `[rows, in]` → `[rows, out]`
    pub fn delta(&self, x: Tensor<2>, fused: bool) -> Tensor<2> {
        let x = match crate::lora::dropout_mask(x.dims(), self.dropout) {
            Some(mask) => x.clone() * Tensor::from_data(mask, &x.device()),
            None => x,
        };
        linear(linear(x, self.a.val(), fused), self.b.val(), fused) * self.scale
    }

    /// `scale · A · B`, `[in, out]`: the adapter folded into a weight.
    pub fn product(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()) * self.scale
    }

    /// `[in, out]` of the projection it adapts.
    pub fn dims(&self) -> [usize; 2] {
        [self.a.val().dims()[0], self.b.val().dims()[1]]
    }

    pub fn rank(&self) -> usize {
        self.a.val().dims()[1]
    }
}

/// Log-probabilities of `targets` under `softmax(logits / temperature)` (temperature 0 or 1:
/// untempered, as in sampling) and, with `entropy`, each row's entropy of that distribution
/// (detached, on the host; empty without): the training loss's token log-probabilities. The
/// fused op ([`fused::token_logprobs`], the entropies in one host pass) where `kernels` asks
/// for it and the backend has it, else burn's `log_softmax` and `gather` (the reference).
///
/// # Shapes
/// `logits: [rows, vocab]`, `targets: [rows]` → `([rows], [rows] or [])`
///
/// # Panics
/// If `targets` does not have one entry per row or one is not below `vocab`: targets are the
/// sampled tokens, so that is a bug in the caller.
pub fn token_logprobs(
    logits: Tensor<2>,
    targets: &[usize],
    temperature: f32,
    entropy: bool,
    kernels: Kernels,
) -> (Tensor<1>, Vec<f32>) {
    let [rows, vocab] = logits.dims();
    assert_eq!(targets.len(), rows, "one target per row");
    assert!(
        targets.iter().all(|&t| t < vocab),
        "targets must lie below the vocabulary size"
    );
    let inv_temp = fused::inverse_temperature(temperature);
    if kernels == Kernels::Fused && fused::available(&logits.device()) {
        let h = if entropy {
            let values = to_vec_f32(logits.clone().detach());
            fused::kernels::entropies(&values, vocab, inv_temp)
        } else {
            vec![]
        };
        return (
            fused::token_logprobs(logits, targets.to_vec(), inv_temp as f64),
            h,
        );
    }
    let logits = if inv_temp != 1.0 {
        logits / temperature as f64
    } else {
        logits
    };
    let device = logits.device();
    let lp = log_softmax(logits, 1);
    let h = if entropy {
        let d = lp.clone().detach();
        to_vec_f32((d.clone().exp() * d).sum_dim(1).neg().reshape([rows]))
    } else {
        vec![]
    };
    let targets = targets.iter().map(|&t| t as i64).collect();
    let index = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
    (lp.gather(1, index).reshape([rows]), h)
}

/// Rows at flat `positions` of hidden states `[batch, seq, hidden]` → `[n, hidden]`.
fn pick_rows(h: Tensor<3>, positions: &[usize]) -> Tensor<2> {
    let [b, s, hidden] = h.dims();
    let index = int_tensor_1d(positions.iter().map(|&p| p as i64).collect(), &h.device());
    h.reshape([b * s, hidden]).select(0, index)
}

/// `x · w`: the fused [`fused::linear`] or burn's matmul (the reference).
fn linear(x: Tensor<2>, w: Tensor<2>, fused: bool) -> Tensor<2> {
    if fused {
        fused::linear(x, w)
    } else {
        x.matmul(as_f32(w))
    }
}

/// `t` in `f32`. A frozen base may be stored in `bf16` (`crate::lora::store_base_bf16`): the
/// fused kernels widen such weights inside the op, the tensor-op paths (the reference, other
/// backends, merging) through this.
pub(crate) fn as_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == burn::tensor::DType::F32 {
        t
    } else {
        t.cast(burn::tensor::DType::F32)
    }
}

/// `down(silu(gate(x)) * up(x))` with gate and up fused: `gate_up: [hidden, 2·inter]`
/// (gate first), `down: [inter, hidden]`.
fn swiglu(x: Tensor<2>, gate_up: Tensor<2>, down: Tensor<2>, fused: bool) -> Tensor<2> {
    if fused {
        return fused::linear(fused::silu_mul(fused::linear(x, gate_up)), down);
    }
    let [rows, _] = x.dims();
    let inter = gate_up.dims()[1] / 2;
    let h = x.matmul(as_f32(gate_up));
    let gate = h.clone().slice([0..rows, 0..inter]);
    let up = h.slice([0..rows, inter..2 * inter]);
    (silu(gate) * up).matmul(as_f32(down))
}

/// A dense SwiGLU FFN (also the shape of the shared expert), with optional LoRA adapters on
/// its three HF projections: `gate_proj` and `up_proj` adapt the two halves of the fused
/// `gate_up` separately (PEFT's layout has one adapter per `nn.Linear`), `down_proj` adapts
/// `down`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_up: Param<Tensor<2>>,
    pub down: Param<Tensor<2>>,
    /// `gate_proj`'s adapter: `[hidden, r]`, `[r, inter]`.
    pub gate_lora: Option<LoraAdapter>,
    /// `up_proj`'s adapter: `[hidden, r]`, `[r, inter]`.
    pub up_lora: Option<LoraAdapter>,
    /// `down_proj`'s adapter: `[inter, r]`, `[r, hidden]`.
    pub down_lora: Option<LoraAdapter>,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<2>, fused: bool) -> Tensor<2> {
        let on = |l: &Option<LoraAdapter>| l.as_ref().filter(|l| l.enabled).cloned();
        let (g, u, d) = (on(&self.gate_lora), on(&self.up_lora), on(&self.down_lora));
        if g.is_none() && u.is_none() && d.is_none() {
            return swiglu(x, self.gate_up.val(), self.down.val(), fused);
        }
        let [rows, _] = x.dims();
        let inter = self.gate_up.val().dims()[1] / 2;
        let mut h = linear(x.clone(), self.gate_up.val(), fused);
        if g.is_some() || u.is_some() {
            let device = x.device();
            let half = |l: Option<LoraAdapter>| match l {
                Some(l) => l.delta(x.clone(), fused),
                None => Tensor::zeros([rows, inter], &device),
            };
            h = h + Tensor::cat(vec![half(g), half(u)], 1);
        }
        let act = if fused {
            fused::silu_mul(h)
        } else {
            let gate = h.clone().slice([0..rows, 0..inter]);
            silu(gate) * h.slice([0..rows, inter..2 * inter])
        };
        let y = linear(act.clone(), self.down.val(), fused);
        match d {
            Some(d) => y + d.delta(act, fused),
            None => y,
        }
    }

    /// `gate_up` with the enabled gate and up adapters folded in, `[hidden, 2·inter]`.
    pub fn merged_gate_up(&self) -> Tensor<2> {
        let on = |l: &Option<LoraAdapter>| l.as_ref().filter(|l| l.enabled).map(|l| l.product());
        let (g, u) = (on(&self.gate_lora), on(&self.up_lora));
        if g.is_none() && u.is_none() {
            return self.gate_up.val();
        }
        let w = as_f32(self.gate_up.val());
        let [hidden, two_i] = w.dims();
        let device = w.device();
        let zeros = || Tensor::zeros([hidden, two_i / 2], &device);
        w + Tensor::cat(vec![g.unwrap_or_else(zeros), u.unwrap_or_else(zeros)], 1)
    }

    /// `down` with the enabled down adapter folded in, `[inter, hidden]`.
    pub fn merged_down(&self) -> Tensor<2> {
        match self.down_lora.as_ref().filter(|l| l.enabled) {
            Some(l) => as_f32(self.down.val()) + l.product(),
            None => self.down.val(),
        }
    }
}

/// Grouped-query self-attention with optional q/k RMSNorm (per head, or over the whole projection
/// as OLMoE does), optional clamp of q/k/v (OLMoE's `clip_qkv`) and rotate-half RoPE; or, with
/// `latent`, DeepSeek's Multi-head Latent Attention ([`crate::config::MlaConfig`]), whose four
/// main projections take these four fields (named in the comments by their HF tensors).
#[derive(Module, Debug)]
pub struct Attention {
    /// `[hidden, heads·head_dim]`. MLA: `q_proj` `[hidden, heads·qk_head_dim]`, or `q_b_proj`
    /// `[q_lora_rank, heads·qk_head_dim]` after `latent.q_a_proj` and its norm.
    pub q_proj: Proj,
    /// `[hidden, kv_heads·head_dim]`. MLA: `kv_a_proj_with_mqa`
    /// `[hidden, kv_lora_rank + qk_rope_head_dim]`, the latent and the shared `k_pe`.
    pub k_proj: Proj,
    /// `[hidden, kv_heads·head_dim]`. MLA: `kv_b_proj` `[kv_lora_rank, heads·(qk_nope_head_dim +
    /// v_head_dim)]`, each head's `k_nope` columns then its value columns.
    pub v_proj: Proj,
    /// `[heads·head_dim, hidden]`. MLA: `[heads·v_head_dim, hidden]`.
    pub o_proj: Proj,
    /// Weight `[head_dim]`, or `[num_heads · head_dim]` when `qk_norm_over_projection`.
    pub q_norm: Option<RmsNorm>,
    /// Weight `[head_dim]`, or `[num_kv_heads · head_dim]` when `qk_norm_over_projection`.
    pub k_norm: Option<RmsNorm>,
    #[module(skip)]
    pub qk_norm_over_projection: bool,
    #[module(skip)]
    pub clip_qkv: Option<f64>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
    /// The softmax scale: `1/√head_dim`, or the config's (Granite's `attention_multiplier`,
    /// MLA's `qk_head_dim^-0.5 · mscale²`).
    #[module(skip)]
    pub softmax_scale: f64,
    /// Multi-head Latent Attention's own parts; `None` for standard attention.
    pub latent: Option<LatentAttention>,
}

/// The parts of Multi-head Latent Attention beyond `Attention`'s four projections.
#[derive(Module, Debug)]
pub struct LatentAttention {
    /// `q_a_proj` `[hidden, q_lora_rank]`, with a `q_lora_rank`.
    pub q_a_proj: Option<Proj>,
    /// `q_a_layernorm` `[q_lora_rank]` (eps [`crate::config::MLA_NORM_EPS`]).
    pub q_a_layernorm: Option<RmsNorm>,
    /// `kv_a_layernorm` `[kv_lora_rank]` (eps [`crate::config::MLA_NORM_EPS`]).
    pub kv_a_layernorm: RmsNorm,
    #[module(skip)]
    pub kv_lora_rank: usize,
    #[module(skip)]
    pub qk_nope_head_dim: usize,
    #[module(skip)]
    pub qk_rope_head_dim: usize,
    #[module(skip)]
    pub v_head_dim: usize,
    /// The rotary dimensions are interleaved pairs ([`crate::config::MlaConfig`]).
    #[module(skip)]
    pub rope_interleave: bool,
}

impl LatentAttention {
    /// RoPE on the rotary part of queries or keys `[batch, seq, heads, qk_rope_head_dim]`.
    /// Interleaved pairs `(x0, x1), (x2, x3), …` are first laid out as `[x0, x2, …, x1, x3,
    /// …]`, after which the rotation is the rotate-half one: DeepSeek-V3's
    /// `apply_rotary_pos_emb_interleave` exactly, and DeepSeek-V2's complex rotation up to the
    /// order of the output dimensions, the same in queries and keys, which their dot products
    /// do not see.
    fn rotate(&self, t: Tensor<4>, ctx: &AttnContext) -> Tensor<4> {
        let t = if self.rope_interleave {
            let [b, s, h, d] = t.dims();
            t.reshape([b, s, h, d / 2, 2])
                .swap_dims(3, 4)
                .reshape([b, s, h, d])
        } else {
            t
        };
        apply_rope(t, &ctx.cos, &ctx.sin, ctx.fused)
    }
}

/// Per-call tensors shared by all layers: RoPE tables and the additive attention mask.
#[derive(Clone)]
pub(crate) struct AttnContext {
    /// `[batch, 1, seq, head_dim]`; `sin` with its first half negated (see [`swap_halves`]).
    cos: Tensor<4>,
    sin: Tensor<4>,
    /// `[batch, 1, seq, keys]`: 0 where a query may attend, `MASKED` elsewhere.
    mask: Tensor<4>,
    /// `[batch, 1, seq, 1]`: 0 for query rows with no key to attend to, 1 elsewhere; present
    /// only when such rows exist. Such a row attends to its own column only (the mask leaves it
    /// open so the softmax is finite); zeroing the row's probabilities makes padding inert: it
    /// contributes no output and receives no gradient.
    empty_rows: Option<Tensor<4>>,
    /// `[batch·seq]`: the rows of `empty_rows` that are 0, as host flags for
    /// [`fused::attention`]; empty when there are none.
    empty: Vec<bool>,
    /// Column where the new tokens go in the cache (= past length).
    past: usize,
    /// Run the [`fused`] kernels (they are available on this device and were asked for).
    fused: bool,
}

/// `[x1, x2] → [x2, x1]` over the last dimension. With the sign of `rotate_half`'s `−x2` folded
/// into the first half of the `sin` table, RoPE needs no `neg` op (nor its backward); the
/// products are the same to the bit, as `(−a)·b = a·(−b)` exactly.
fn swap_halves(x: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..s, d / 2..d]);
    Tensor::cat(vec![x2, x1], 3)
}

/// RoPE on heads `[batch, seq, heads, head_dim]`, returned in that layout.
/// `cos`, `sin`: `[batch, 1, seq, head_dim]`, `sin` sign-folded (see [`swap_halves`]).
fn apply_rope(t: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>, fused: bool) -> Tensor<4> {
    if fused {
        return fused::rope(t, cos.clone(), sin.clone());
    }
    let t = t.swap_dims(1, 2);
    (t.clone() * cos.clone() + swap_halves(t) * sin.clone()).swap_dims(1, 2)
}

/// Grouped-query attention as tensor ops, the reference for [`fused::attention`]: query
/// heads sharing a KV head are stacked along the row axis (`[b, nkv, group·s, d]`), so one
/// batched matmul per KV head covers the whole group without copying K/V.
///
/// # Shapes
/// `q: [b, s, nh, d]`, `k`, `v`: `[b, nkv, keys, d]`, `mask: [b, 1, s, keys]`,
/// `empty_rows: [b, 1, s, 1]` → `[b·s, nh·d]`
fn attention_reference(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &Tensor<4>,
    empty_rows: Option<&Tensor<4>>,
    scale: f64,
) -> Tensor<2> {
    let [b, s, nh, d] = q.dims();
    let [_, nkv, keys, _] = k.dims();
    let dv = v.dims()[3];
    let group = nh / nkv;
    let q = q.swap_dims(1, 2).reshape([b, nkv, group * s, d]);
    let scores = q.matmul(k.swap_dims(2, 3)).reshape([b, nh, s, keys]);
    let mut probs = softmax(scores * scale + mask.clone(), 3);
    if let Some(keep) = empty_rows {
        probs = probs * keep.clone();
    }
    probs
        .reshape([b, nkv, group * s, keys])
        .matmul(v)
        .reshape([b, nh, s, dv])
        .swap_dims(1, 2)
        .reshape([b * s, nh * dv])
}

/// Writes `new: [batch, heads, s, d]` into columns `past..past + s` of a cache tensor in place
/// and returns the cache's first `past + s` columns.
fn append_to_cache(cache: &mut Tensor<4>, new: Tensor<4>, past: usize) -> Tensor<4> {
    let [b, h, s, d] = new.dims();
    let end = past + s;
    // Take the cache out so it is uniquely owned and the write happens in place.
    let full = std::mem::replace(cache, Tensor::empty([0, 0, 0, 0], &new.device()));
    *cache = full.slice_assign([0..b, 0..h, past..end, 0..d], new);
    cache.clone().slice([0..b, 0..h, 0..end, 0..d])
}

/// The attention of `q` over `k`, `v` under the context's mask: the fused op or the reference.
///
/// # Shapes
/// `q: [b, s, nh, d]`, `k: [b, nkv, keys, d]`, `v: [b, nkv, keys, dv]` → `[b·s, nh·dv]`
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, ctx: &AttnContext, scale: f64) -> Tensor<2> {
    if ctx.fused {
        fused::attention(q, k, v, ctx.mask.clone(), ctx.empty.clone(), scale)
    } else {
        attention_reference(q, k, v, &ctx.mask, ctx.empty_rows.as_ref(), scale)
    }
}

impl Attention {
    /// # Shapes
    /// `x: [batch, seq, hidden]` → `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &AttnContext,
        cache: Option<(&mut Tensor<4>, Option<&mut Tensor<4>>)>,
    ) -> Tensor<3> {
        if let Some(latent) = &self.latent {
            return self.forward_latent(latent, x, ctx, cache.map(|(k, _)| k));
        }
        let [b, s, hidden] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let x2 = x.reshape([b * s, hidden]);
        // OLMoE's order: project → norm over the whole projection → clamp → split into heads.
        let project = |proj: &Proj, norm: Option<&RmsNorm>| {
            let mut t = proj.forward(x2.clone(), ctx.fused);
            if let Some(norm) = norm.filter(|_| self.qk_norm_over_projection) {
                t = norm.forward(t, ctx.fused);
            }
            match self.clip_qkv {
                Some(c) => t.clamp(-c, c),
                None => t,
            }
        };
        // Qwen3's order: split into heads → norm each head → RoPE.
        let heads = |t: Tensor<2>, n: usize, norm: Option<&RmsNorm>| {
            let t = t.reshape([b, s, n, d]);
            let t = match norm.filter(|_| !self.qk_norm_over_projection) {
                Some(norm) => norm.forward(t, ctx.fused),
                None => t,
            };
            apply_rope(t, &ctx.cos, &ctx.sin, ctx.fused) // [b, s, n, d]
        };
        let (qn, kn) = (self.q_norm.as_ref(), self.k_norm.as_ref());
        let q = heads(project(&self.q_proj, qn), nh, qn);
        let k = heads(project(&self.k_proj, kn), nkv, kn).swap_dims(1, 2);
        let v = project(&self.v_proj, None)
            .reshape([b, s, nkv, d])
            .swap_dims(1, 2);

        let (k, v) = match cache {
            Some((kc, Some(vc))) => (
                append_to_cache(kc, k, ctx.past),
                append_to_cache(vc, v, ctx.past),
            ),
            _ => (k, v),
        };
        let out = attend(q, k, v, ctx, self.softmax_scale);
        self.o_proj.forward(out, ctx.fused).reshape([b, s, hidden])
    }

    /// Multi-head Latent Attention in the expanded form (transformers' `DeepseekV2Attention` /
    /// `DeepseekV3Attention`): the latents of all keys (the cache's and the new tokens') go
    /// through `kv_b_proj` into every head's `k_nope` and value, `k_pe` is appended to each
    /// head's keys, then standard attention. The cache holds the latents, `[batch, 1,
    /// capacity, kv_lora_rank + qk_rope_head_dim]`.
    ///
    /// # Shapes
    /// `x: [batch, seq, hidden]` → `[batch, seq, hidden]`
    fn forward_latent(
        &self,
        lat: &LatentAttention,
        x: Tensor<3>,
        ctx: &AttnContext,
        cache: Option<&mut Tensor<4>>,
    ) -> Tensor<3> {
        let [b, s, hidden] = x.dims();
        let nh = self.num_heads;
        let (r, nope, rope, vd) = (
            lat.kv_lora_rank,
            lat.qk_nope_head_dim,
            lat.qk_rope_head_dim,
            lat.v_head_dim,
        );
        let (qk, fused) = (nope + rope, ctx.fused);
        let x2 = x.reshape([b * s, hidden]);
        let q_in = match (&lat.q_a_proj, &lat.q_a_layernorm) {
            (Some(a), Some(n)) => n.forward(a.forward(x2.clone(), fused), fused),
            _ => x2.clone(),
        };
        let q = self.q_proj.forward(q_in, fused).reshape([b, s, nh, qk]);
        let q_nope = q.clone().slice([0..b, 0..s, 0..nh, 0..nope]);
        let q_pe = lat.rotate(q.slice([0..b, 0..s, 0..nh, nope..qk]), ctx);
        let q = Tensor::cat(vec![q_nope, q_pe], 3);

        let ckv = self.k_proj.forward(x2, fused); // [b·s, r + rope]
        let c = lat
            .kv_a_layernorm
            .forward(ckv.clone().slice([0..b * s, 0..r]), fused)
            .reshape([b, s, 1, r]);
        let k_pe = ckv.slice([0..b * s, r..r + rope]).reshape([b, s, 1, rope]);
        let k_pe = lat.rotate(k_pe, ctx);
        let latent = Tensor::cat(vec![c, k_pe], 3).swap_dims(1, 2); // [b, 1, s, r + rope]
        let latent = match cache {
            Some(lc) => append_to_cache(lc, latent, ctx.past),
            None => latent,
        };
        let keys = latent.dims()[2];
        let c_all = latent
            .clone()
            .slice([0..b, 0..1, 0..keys, 0..r])
            .reshape([b * keys, r]);
        let k_pe = latent
            .slice([0..b, 0..1, 0..keys, r..r + rope])
            .expand([b, nh, keys, rope]);
        let kv = self
            .v_proj
            .forward(c_all, fused)
            .reshape([b, keys, nh, nope + vd])
            .swap_dims(1, 2); // [b, nh, keys, nope + vd]
        let k_nope = kv.clone().slice([0..b, 0..nh, 0..keys, 0..nope]);
        let v = kv.slice([0..b, 0..nh, 0..keys, nope..nope + vd]);
        let k = Tensor::cat(vec![k_nope, k_pe], 3);
        let out = attend(q, k, v, ctx, self.softmax_scale);
        self.o_proj.forward(out, fused).reshape([b, s, hidden])
    }
}

/// A sparse MoE FFN: router → scores → top-k → weighted sum of SwiGLU experts (+ shared expert).
#[derive(Module, Debug)]
pub struct MoeBlock {
    /// `[hidden, num_experts]`
    pub router: Param<Tensor<2>>,
    /// `[num_experts, hidden, 2·moe_inter]`
    pub experts_gate_up: Param<Tensor<3>>,
    /// `[num_experts, moe_inter, hidden]`
    pub experts_down: Param<Tensor<3>>,
    pub shared_expert: Option<Mlp>,
    /// `[hidden, 1]`
    pub shared_expert_gate: Option<Param<Tensor<2>>>,
    /// DeepSeek-V3's `e_score_correction_bias`: added to scores for the top-k choice only.
    /// Host data: it is never differentiated, only nudged by the trainer between steps.
    #[module(skip)]
    pub expert_bias: Option<Vec<f32>>,
    #[module(skip)]
    pub top_k: usize,
    #[module(skip)]
    pub norm_topk_prob: bool,
    #[module(skip)]
    pub scoring: ScoringFunc,
    #[module(skip)]
    pub routed_scaling_factor: f64,
    /// Group-limited expert selection (DeepSeek's `topk_method`); `None` = plain top-k.
    #[module(skip)]
    pub group_limit: Option<GroupLimit>,
}

/// DeepSeek's group-limited selection: experts `[g·m, (g+1)·m)` form group g (m = experts per
/// group); each token keeps its `topk_group` best groups and picks its top-k experts inside them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupLimit {
    pub n_group: usize,
    pub topk_group: usize,
    /// How a group is scored from its experts' selection scores.
    pub score: GroupScore,
}

/// How a group is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// Its best expert (DeepSeek-V2's `group_limited_greedy`).
    Max,
    /// The sum of its two best experts (DeepSeek-V3's `noaux_tc`).
    TopTwoSum,
}

impl GroupLimit {
    /// The group-limited selection a config asks for, if any.
    pub fn from_config(cfg: &ModelConfig) -> Option<Self> {
        let score = match cfg.topk_method {
            TopkMethod::Greedy => return None,
            TopkMethod::GroupLimitedGreedy => GroupScore::Max,
            TopkMethod::NoauxTc => GroupScore::TopTwoSum,
        };
        Some(GroupLimit {
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            score,
        })
    }
}

/// Running sums of the auxiliary loss across sparse layers (as transformers accumulates them).
pub(crate) struct AuxAccumulator {
    pub(crate) tokens_per_expert: Vec<f64>,
    pub(crate) prob_sum: Option<Tensor<1>>,
    pub(crate) rows: f64,
}

impl AuxAccumulator {
    pub(crate) fn new(num_experts: usize) -> Self {
        AuxAccumulator {
            tokens_per_expert: vec![0.0; num_experts],
            prob_sum: None,
            rows: 0.0,
        }
    }

    /// Adds another forward's statistics (of other layers) to these.
    pub(crate) fn merge(&mut self, other: AuxAccumulator) {
        for (a, b) in self
            .tokens_per_expert
            .iter_mut()
            .zip(other.tokens_per_expert)
        {
            *a += b;
        }
        self.rows += other.rows;
        self.prob_sum = match (self.prob_sum.take(), other.prob_sum) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

/// Top-k of each row, largest first; equal scores go to the lower expert index so the choice
/// never depends on the sort's stability or the backend.
#[cfg(test)]
fn top_k_rows(scores: &[f32], num_experts: usize, k: usize) -> Vec<usize> {
    select_experts(scores, num_experts, k, None)
}

/// The indices of the `k` largest of `row`, largest first, ties to the lower index.
///
/// An insertion into a list of at most `k` (k is 1–8 in practice): a full sort of every row
/// showed up at ~2% of a GRPO step's samples. Same order as sorting by `total_cmp` descending,
/// then index ascending (an element displaces only strictly smaller ones, and lower indices
/// are seen first); `top_k_insertion_equals_the_sort` checks it.
fn top_k_of(row: &[f32], k: usize, order: &mut Vec<usize>) {
    use std::cmp::Ordering::Greater;
    order.clear();
    let k = k.min(row.len());
    if k == 0 {
        return;
    }
    for (i, x) in row.iter().enumerate() {
        if order.len() == k && x.total_cmp(&row[order[k - 1]]) != Greater {
            continue;
        }
        let mut pos = order.len();
        while pos > 0 && x.total_cmp(&row[order[pos - 1]]) == Greater {
            pos -= 1;
        }
        if order.len() == k {
            order.pop();
        }
        order.insert(pos, i);
    }
}

/// The experts of each row of `scores` (`[tokens, num_experts]`, the selection scores: scores
/// plus any correction bias), largest first, ties to the lower index. With a group limit, only
/// experts of each row's `topk_group` best groups (group ties also to the lower index) compete.
pub(crate) fn select_experts(
    scores: &[f32],
    num_experts: usize,
    k: usize,
    groups: Option<GroupLimit>,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(scores.len() / num_experts * k);
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    let mut masked = vec![0.0f32; num_experts];
    let mut group_scores = Vec::new();
    for row in scores.chunks_exact(num_experts) {
        let Some(g) = groups else {
            top_k_of(row, k, &mut order);
            out.extend_from_slice(&order);
            continue;
        };
        let per = num_experts / g.n_group;
        group_scores.clear();
        for members in row.chunks_exact(per) {
            group_scores.push(match g.score {
                GroupScore::Max => members.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                GroupScore::TopTwoSum => {
                    top_k_of(members, 2, &mut order);
                    order.iter().map(|&i| members[i]).sum()
                }
            });
        }
        top_k_of(&group_scores, g.topk_group, &mut order);
        masked.fill(f32::NEG_INFINITY);
        for &grp in order.iter() {
            masked[grp * per..(grp + 1) * per].copy_from_slice(&row[grp * per..(grp + 1) * per]);
        }
        top_k_of(&masked, k, &mut order);
        out.extend_from_slice(&order);
    }
    out
}

impl MoeBlock {
    fn num_experts(&self) -> usize {
        self.router.val().dims()[1]
    }

    /// # Shapes
    /// `x: [tokens, hidden]` → `[tokens, hidden]`; `weight: [tokens]` is how many times each
    /// token counts in the statistics: 0 for padding (computed like any token but left out),
    /// 1 for a real token, n for a prefix shared by n rows
    /// is computed like any token but left out of the statistics).
    fn forward(
        &self,
        x: Tensor<2>,
        weight: &[u32],
        moe: MoeImpl,
        fused: bool,
        aux: Option<&mut AuxAccumulator>,
    ) -> (Tensor<2>, Vec<u32>) {
        let [t, _] = x.dims();
        let e = self.num_experts();
        let k = self.top_k;
        let device = x.device();
        let logits = linear(x.clone(), self.router.val(), fused); // [t, e]
        let scores = match self.scoring {
            ScoringFunc::Softmax => softmax(logits, 1),
            ScoringFunc::Sigmoid => sigmoid(logits),
        };

        // The choice itself is not differentiable, so it is made on the host, where ties can be
        // broken by index and the per-expert token lists for dispatch are needed anyway.
        let host = to_vec_f32(scores.clone().detach());
        let choice_scores: Vec<f32> = match &self.expert_bias {
            Some(bias) => host
                .chunks_exact(e)
                .flat_map(|r| r.iter().zip(bias).map(|(s, b)| s + b))
                .collect(),
            None => host.clone(),
        };
        let chosen = select_experts(&choice_scores, e, k, self.group_limit); // [t, k]

        let mut counts = vec![0u32; e];
        for (tok, row) in chosen.chunks_exact(k).enumerate() {
            for &ex in row {
                counts[ex] += weight[tok];
            }
        }

        let idx = int_tensor_2d(chosen.iter().map(|&c| c as i64).collect(), [t, k], &device);
        let mut weights = scores.clone().gather(1, idx); // [t, k]
        if self.norm_topk_prob {
            let denom = weights.clone().sum_dim(1);
            weights = match self.scoring {
                ScoringFunc::Softmax => weights / denom,
                ScoringFunc::Sigmoid => weights / (denom + 1e-20),
            };
        }
        if self.routed_scaling_factor != 1.0 {
            weights = weights * self.routed_scaling_factor;
        }

        let routed = match moe {
            MoeImpl::Dispatch => self.dispatch(x.clone(), &chosen, weights, fused),
            MoeImpl::DenseReference => self.dense_reference(x.clone(), &chosen, weights, fused),
        };
        let mut out = routed;
        if let Some(shared) = &self.shared_expert {
            let mut s = shared.forward(x.clone(), fused);
            if let Some(g) = &self.shared_expert_gate {
                s = s * sigmoid(x.clone().matmul(as_f32(g.val())));
            }
            out = out + s;
        }

        if let Some(acc) = aux {
            let n_valid: u32 = weight.iter().sum();
            for (ex, c) in counts.iter().enumerate() {
                acc.tokens_per_expert[ex] += *c as f64;
            }
            let probs = match self.scoring {
                ScoringFunc::Softmax => scores,
                ScoringFunc::Sigmoid => scores.clone() / scores.sum_dim(1),
            };
            let mask = Tensor::<2>::from_data(
                TensorData::new(weight.iter().map(|&w| w as f32).collect(), [t, 1]),
                &device,
            );
            let psum = (probs * mask).sum_dim(0).reshape([e]);
            acc.prob_sum = Some(match acc.prob_sum.take() {
                Some(p) => p + psum,
                None => psum,
            });
            acc.rows += n_valid as f64;
        }
        (out, counts)
    }

    /// Tokens grouped by expert: one gather, one matmul chain per used expert, one scatter-add
    /// ([`fused::moe_experts`] where the fused kernels run, else [`routed_reference`]).
    fn dispatch(
        &self,
        x: Tensor<2>,
        chosen: &[usize],
        weights: Tensor<2>,
        fused: bool,
    ) -> Tensor<2> {
        let (gate_up, down) = (self.experts_gate_up.val(), self.experts_down.val());
        if fused {
            fused::moe_experts(x, weights, gate_up, down, chosen.to_vec())
        } else {
            routed_reference(x, weights, gate_up, down, chosen)
        }
    }

    /// Every expert on every token; unchosen experts get weight 0.
    fn dense_reference(
        &self,
        x: Tensor<2>,
        chosen: &[usize],
        weights: Tensor<2>,
        fused: bool,
    ) -> Tensor<2> {
        let [t, hidden] = x.dims();
        let device = &x.device();
        let e = self.num_experts();
        let k = self.top_k;
        let mut one_hot = vec![0.0f32; t * k * e];
        for (slot, &ex) in chosen.iter().enumerate() {
            one_hot[slot * e + ex] = 1.0;
        }
        let one_hot = Tensor::<3>::from_data(TensorData::new(one_hot, [t, k, e]), device);
        let dense = (weights.reshape([t, k, 1]) * one_hot)
            .sum_dim(1)
            .reshape([t, e]);
        let mut out = Tensor::zeros([t, hidden], device);
        for ex in 0..e {
            let w_gu = expert_matrix(self.experts_gate_up.val(), ex);
            let w_d = expert_matrix(self.experts_down.val(), ex);
            let y = swiglu(x.clone(), w_gu, w_d, fused);
            out = out + y * dense.clone().slice([0..t, ex..ex + 1]);
        }
        out
    }
}

/// Expert `ex`'s matrix of a stacked `[num_experts, rows, cols]` weight, as a slice (gradients
/// flow back into the stack).
fn expert_matrix(w: Tensor<3>, ex: usize) -> Tensor<2> {
    let [_, rows, cols] = w.dims();
    as_f32(
        w.slice([ex..ex + 1, 0..rows, 0..cols])
            .reshape([rows, cols]),
    )
}

/// The routed experts as tensor ops, the reference for [`fused::moe_experts`]: the (token, j)
/// slots grouped by expert (stably), one `select` of their tokens' rows, one `swiglu` per
/// non-empty group, and the outputs times their weights added into the tokens' rows.
///
/// # Shapes
/// `x: [tokens, hidden]`, `weights: [tokens, k]`, `chosen: [tokens·k]`,
/// `gate_up: [num_experts, hidden, 2·inter]`, `down: [num_experts, inter, hidden]` →
/// `[tokens, hidden]`
fn routed_reference(
    x: Tensor<2>,
    weights: Tensor<2>,
    gate_up: Tensor<3>,
    down: Tensor<3>,
    chosen: &[usize],
) -> Tensor<2> {
    let (gate_up, down) = (as_f32(gate_up), as_f32(down));
    let [t, hidden] = x.dims();
    let device = &x.device();
    let [e, _, _] = gate_up.dims();
    let k = chosen.len() / t;
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); e];
    for (slot, &ex) in chosen.iter().enumerate() {
        by_expert[ex].push(slot);
    }
    let slots: Vec<usize> = by_expert.iter().flatten().copied().collect();
    let tokens = int_tensor_1d(slots.iter().map(|&s| (s / k) as i64).collect(), device);
    let slot_idx = int_tensor_1d(slots.iter().map(|&s| s as i64).collect(), device);
    let xs = x.select(0, tokens.clone()); // [t·k, hidden]
    let sizes: Vec<usize> = by_expert.iter().map(Vec::len).collect();
    let ys = experts_reference(xs, gate_up, down, &sizes); // [t·k, hidden], grouped by expert
    let w = weights
        .reshape([t * k])
        .select(0, slot_idx)
        .reshape([t * k, 1]);
    Tensor::zeros([t, hidden], device).select_assign(0, tokens, ys * w, IndexingUpdateOp::Add)
}

/// The routed experts on rows grouped by expert (`group_sizes[e]` rows for expert `e`, in
/// order), one `swiglu` per non-empty group.
///
/// # Shapes
/// `xs: [Σ group_sizes, hidden]`, `gate_up: [experts, hidden, 2·inter]`,
/// `down: [experts, inter, hidden]` → `[Σ group_sizes, hidden]`
fn experts_reference(
    xs: Tensor<2>,
    gate_up: Tensor<3>,
    down: Tensor<3>,
    group_sizes: &[usize],
) -> Tensor<2> {
    let hidden = xs.dims()[1];
    let mut outs = Vec::new();
    let mut start = 0;
    for (ex, &n) in group_sizes.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let rows = xs.clone().slice([start..start + n, 0..hidden]);
        let w_gu = expert_matrix(gate_up.clone(), ex);
        let w_d = expert_matrix(down.clone(), ex);
        outs.push(swiglu(rows, w_gu, w_d, false));
        start += n;
    }
    Tensor::cat(outs, 0)
}

/// The FFN of one layer. (A layer holds one and they are few: boxing the larger variant would
/// save nothing worth the indirection, and callers match on `Ffn::Sparse(MoeBlock)`.)
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Ffn {
    Dense(Mlp),
    Sparse(MoeBlock),
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Ffn,
}

/// What the layers of one forward share besides the attention context.
#[derive(Clone)]
pub(crate) struct LayerInputs {
    /// `[batch · seq]`: how many times each token counts in the router statistics.
    pub(crate) token_weight: Vec<u32>,
    pub(crate) moe: MoeImpl,
    /// Granite's `residual_multiplier`.
    pub(crate) residual: f64,
}

impl DecoderLayer {
    /// `h + attn(norm(h))`, then that plus `ffn(norm(·))`; appends to `cache` when given. The
    /// expert counts of a MoE layer.
    ///
    /// # Shapes
    /// `h: [batch, seq, hidden]` → `[batch, seq, hidden]`
    pub(crate) fn forward(
        &self,
        h: Tensor<3>,
        ctx: &AttnContext,
        cache: Option<(&mut Tensor<4>, Option<&mut Tensor<4>>)>,
        inputs: &LayerInputs,
        aux: Option<&mut AuxAccumulator>,
    ) -> (Tensor<3>, Option<Vec<u32>>) {
        let [b, s, hidden] = h.dims();
        let residual = |y: Tensor<3>| match inputs.residual {
            1.0 => y,
            r => y * r,
        };
        let a = self.self_attn.forward(
            self.input_layernorm.forward(h.clone(), ctx.fused),
            ctx,
            cache,
        );
        let h = h + residual(a);
        let x = self
            .post_attention_layernorm
            .forward(h.clone(), ctx.fused)
            .reshape([b * s, hidden]);
        let (f, counts) = match &self.mlp {
            Ffn::Dense(mlp) => (mlp.forward(x, ctx.fused), None),
            Ffn::Sparse(moe) => {
                let (y, c) = moe.forward(x, &inputs.token_weight, inputs.moe, ctx.fused, aux);
                (y, Some(c))
            }
        };
        (h + residual(f.reshape([b, s, hidden])), counts)
    }
}

/// The causal language model: `model.*` and `lm_head` of an HF checkpoint.
#[derive(Module, Debug)]
pub struct MoeModel {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<2>>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `[hidden, vocab]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Param<Tensor<2>>>,
    #[module(skip)]
    pub config: ModelConfig,
}

/// A float tensor's values on the host. Reading back a tensor this crate built as f32 cannot
/// fail short of a backend fault, which surfaces as an empty vector and then a shape panic.
pub(crate) fn to_vec_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap_or_default()
}

pub(crate) fn int_tensor_1d(v: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn int_tensor_2d(v: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

impl MoeModel {
    /// The device the weights live on (with autodiff when the model is being trained).
    pub fn device(&self) -> Device {
        self.embed_tokens.val().device()
    }

    /// Run the model on `batch`, appending its keys and values to `cache` when one is given.
    ///
    /// # Shapes
    /// logits: `[batch, seq, vocab]` (`[batch, 1, vocab]` with `LogitsMode::Last`).
    ///
    /// # Panics
    /// If `batch`'s vectors do not have `batch · seq` entries, or the cache has the wrong batch
    /// size or too little room: these are programming errors of the caller, not user input.
    pub fn forward(
        &self,
        batch: &Batch,
        cache: Option<&mut KvCache>,
        opts: ForwardOptions,
    ) -> ModelOutput {
        let (h, router) = self.trunk(batch, cache, opts, None);
        let [b, s, hidden] = h.dims();
        let h = match opts.logits {
            LogitsMode::All => h,
            LogitsMode::Last => h.slice([0..b, s - 1..s, 0..hidden]),
        };
        let rows = h.dims()[1];
        let logits = self.head(h.reshape([b * rows, hidden]), opts).reshape([
            b,
            rows,
            self.config.vocab_size,
        ]);
        ModelOutput { logits, router }
    }

    /// Logits at chosen positions only: row `i` of the result is what
    /// `forward(batch, None, opts).logits` holds at flat position `positions[i]` (`row · seq +
    /// column`), without running the final norm and LM head anywhere else. Scoring completions
    /// needs the positions that predict completion tokens, not the prompt's. `opts.logits` is
    /// not used: the positions say which logits are wanted.
    ///
    /// # Shapes
    /// `positions: [n]` → logits `[n, vocab]`.
    ///
    /// # Panics
    /// As [`MoeModel::forward`], and if a position is outside `batch · seq`.
    pub fn forward_positions(
        &self,
        batch: &Batch,
        positions: &[usize],
        opts: ForwardOptions,
    ) -> (Tensor<2>, RouterStats) {
        let (h, router) = self.hidden_at(batch, positions, opts);
        (self.head(h, opts), router)
    }

    /// The hidden states (before the final norm) that [`MoeModel::forward_positions`] turns
    /// into logits. `[n]` → `[n, hidden]`
    pub fn hidden_at(
        &self,
        batch: &Batch,
        positions: &[usize],
        opts: ForwardOptions,
    ) -> (Tensor<2>, RouterStats) {
        let (b, s) = (batch.batch, batch.seq);
        assert!(
            positions.iter().all(|&p| p < b * s),
            "positions must lie inside batch·seq"
        );
        let (h, router) = self.trunk(batch, None, opts, None);
        (pick_rows(h, positions), router)
    }

    /// [`MoeModel::forward_positions`] for rows that continue shared prefixes, each prefix
    /// computed once: row `r` is `prefixes` row `prefix_of_row[r]` followed by `suffixes` row
    /// `r`, whose `positions` (RoPE) must continue the prefix's. `positions` index the
    /// suffixes (`row · suffixes.seq + column`). The same logits as one forward over the
    /// concatenated rows, up to float rounding, and the same router statistics (a prefix's
    /// tokens count once per row that shares it). GRPO scores `group_size` completions of each
    /// prompt: with the prompt as the prefix, its tokens go through the layers (and their
    /// backward) once per group instead of once per completion.
    ///
    /// # Shapes
    /// `prefixes: [prompts, p]` (left-padded), `suffixes: [rows, s]`, `positions: [n]` →
    /// logits `[n, vocab]`.
    ///
    /// # Panics
    /// As [`MoeModel::forward_positions`], and if `prefix_of_row` does not have one entry per
    /// suffix row naming a prefix row.
    pub fn forward_positions_shared(
        &self,
        prefixes: &Batch,
        prefix_of_row: &[usize],
        suffixes: &Batch,
        positions: &[usize],
        opts: ForwardOptions,
    ) -> (Tensor<2>, RouterStats) {
        let (h, router) = self.hidden_at_shared(prefixes, prefix_of_row, suffixes, positions, opts);
        (self.head(h, opts), router)
    }

    /// The hidden states (before the final norm) that [`MoeModel::forward_positions_shared`]
    /// turns into logits. `[n]` → `[n, hidden]`
    pub fn hidden_at_shared(
        &self,
        prefixes: &Batch,
        prefix_of_row: &[usize],
        suffixes: &Batch,
        positions: &[usize],
        opts: ForwardOptions,
    ) -> (Tensor<2>, RouterStats) {
        let (b, s) = (suffixes.batch, suffixes.seq);
        assert_eq!(prefix_of_row.len(), b, "one prefix per suffix row");
        assert!(
            prefix_of_row.iter().all(|&p| p < prefixes.batch),
            "prefix_of_row must name prefix rows"
        );
        assert!(
            positions.iter().all(|&p| p < b * s),
            "positions must lie inside batch·seq"
        );
        let mut uses = vec![0u32; prefixes.batch];
        for &p in prefix_of_row {
            uses[p] += 1;
        }
        let capacity = prefixes.seq + s;
        let mut cache = KvCache::new(&self.config, prefixes.batch, capacity, &self.device());
        let (_, prefix_router) = self.trunk(prefixes, Some(&mut cache), opts, Some(&uses));
        let mut cache = cache.select_rows(prefix_of_row);
        let (h, router) = self.trunk(suffixes, Some(&mut cache), opts, None);
        (pick_rows(h, positions), prefix_router.merge(router))
    }

    /// Log-probabilities of `targets` under `softmax(logits / temperature)` at hidden states
    /// `h` (from [`MoeModel::hidden_at`]), and with `entropy` each row's entropy (detached,
    /// host; empty without): [`token_logprobs`] of [`MoeModel::forward_positions`]' logits.
    /// With the fused kernels the final norm is applied and then the LM head and the
    /// log-softmax run as one op a chunk of `opts.logits_chunk_rows` rows at a time
    /// ([`fused::head_logprobs`]), so the `[n, vocab]` logits are never all alive; else the
    /// reference: the whole logits, then [`token_logprobs`].
    ///
    /// # Shapes
    /// `h: [n, hidden]`, `targets: [n]` → `([n], [n] or [])`
    pub fn token_scores(
        &self,
        h: Tensor<2>,
        targets: &[usize],
        temperature: f32,
        entropy: bool,
        opts: ForwardOptions,
    ) -> (Tensor<1>, Vec<f32>) {
        if !self.fused(opts) {
            return token_logprobs(
                self.head(h, opts),
                targets,
                temperature,
                entropy,
                opts.kernels,
            );
        }
        let [n, _] = h.dims();
        let vocab = self.config.vocab_size;
        assert_eq!(targets.len(), n, "one target per row");
        assert!(
            targets.iter().all(|&t| t < vocab),
            "targets must lie below the vocabulary size"
        );
        let h = self.norm.forward(h, true);
        let (w, tied) = match &self.lm_head {
            Some(w) => (w.val(), false),
            None => (self.embed_tokens.val(), true),
        };
        let scale = fused::inverse_temperature(temperature) as f64 / self.config.logits_scaling;
        let chunk = match opts.logits_chunk_rows {
            0 => auto_chunk_rows(vocab),
            c => c,
        };
        let out = fused::head_logprobs(h, w, targets.to_vec(), scale, tied, chunk);
        let logp = out.clone().slice([0..1, 0..n]).reshape([n]);
        let h = if entropy {
            to_vec_f32(out.slice([1..2, 0..n]).detach())
        } else {
            vec![]
        };
        (logp, h)
    }

    /// Whether this call runs the fused kernels: asked for, and the backend has them.
    fn fused(&self, opts: ForwardOptions) -> bool {
        opts.kernels == Kernels::Fused && fused::available(&self.device())
    }

    /// Final norm and LM head. `[rows, hidden]` → `[rows, vocab]`
    fn head(&self, h: Tensor<2>, opts: ForwardOptions) -> Tensor<2> {
        let fused = self.fused(opts);
        let h = self.norm.forward(h, fused);
        let logits = match &self.lm_head {
            Some(w) => linear(h, w.val(), fused),
            None => linear(h, self.embed_tokens.val().transpose(), fused),
        };
        match self.config.logits_scaling {
            1.0 => logits,
            l => logits / l,
        }
    }

    /// Embeddings and decoder layers: hidden states `[batch, seq, hidden]` before the final
    /// norm, and the router statistics, in which each real token of row `r` counts
    /// `row_uses[r]` times (once without it).
    fn trunk(
        &self,
        batch: &Batch,
        mut cache: Option<&mut KvCache>,
        opts: ForwardOptions,
        row_uses: Option<&[u32]>,
    ) -> (Tensor<3>, RouterStats) {
        batch.assert_shapes();
        let (b, s) = (batch.batch, batch.seq);
        let cfg = &self.config;
        let device = self.device();
        let fused = self.fused(opts);

        // Key validity over [past | new] columns, then the causal + padding mask.
        let past = cache.as_ref().map_or(0, |c| c.len);
        let keys = past + s;
        let mut key_valid = vec![false; b * keys];
        for row in 0..b {
            if let Some(c) = cache.as_deref_mut() {
                assert_eq!(c.batch, b, "cache batch size differs from the input batch");
                assert!(
                    keys <= c.capacity,
                    "cache capacity {} exceeded ({} tokens)",
                    c.capacity,
                    keys
                );
                key_valid[row * keys..row * keys + past]
                    .copy_from_slice(&c.key_valid[row * c.capacity..row * c.capacity + past]);
                c.key_valid[row * c.capacity + past..row * c.capacity + keys]
                    .copy_from_slice(&batch.attention_mask[row * s..(row + 1) * s]);
            }
            key_valid[row * keys + past..(row + 1) * keys]
                .copy_from_slice(&batch.attention_mask[row * s..(row + 1) * s]);
        }
        let mut mask = vec![0.0f32; b * s * keys];
        let mut row_has_key = vec![0.0f32; b * s];
        for row in 0..b {
            for i in 0..s {
                let q = row * s + i;
                for j in 0..keys {
                    if j > past + i || !key_valid[row * keys + j] {
                        mask[q * keys + j] = MASKED;
                    } else {
                        row_has_key[q] = 1.0;
                    }
                }
                // A query with no key (left padding) keeps its own column so that its softmax
                // row is finite; `empty_rows` then zeroes the row's output and gradient.
                if row_has_key[q] == 0.0 {
                    mask[q * keys + past + i] = 0.0;
                }
            }
        }
        let any_empty = row_has_key.contains(&0.0);
        let empty = match any_empty {
            true => row_has_key.iter().map(|&k| k == 0.0).collect(),
            false => Vec::new(),
        };
        let empty_rows = any_empty
            .then(|| Tensor::from_data(TensorData::new(row_has_key, [b, 1, s, 1]), &device));
        let (cos, sin) = rope_tables(&batch.positions, b, s, &cfg.rope_frequencies());
        let ctx = AttnContext {
            cos: Tensor::from_data(TensorData::new(cos, [b, 1, s, cfg.head_dim]), &device),
            sin: Tensor::from_data(TensorData::new(sin, [b, 1, s, cfg.head_dim]), &device),
            mask: Tensor::from_data(TensorData::new(mask, [b, 1, s, keys]), &device),
            empty_rows,
            empty,
            past,
            fused,
        };

        let ids = int_tensor_1d(batch.input_ids.iter().map(|&i| i as i64).collect(), &device);
        let mut h = as_f32(self.embed_tokens.val().select(0, ids)).reshape([b, s, cfg.hidden_size]);
        if cfg.embedding_multiplier != 1.0 {
            h = h * cfg.embedding_multiplier;
        }
        let inputs = LayerInputs {
            token_weight: (0..b * s)
                .map(|i| u32::from(batch.attention_mask[i]) * row_uses.map_or(1, |u| u[i / s]))
                .collect(),
            moe: opts.moe,
            residual: cfg.residual_multiplier,
        };
        let mut counts = Vec::new();
        let mut acc = opts.aux_loss.then(|| AuxAccumulator::new(cfg.num_experts));
        // Recomputation needs the layers' inputs only; a cache would carry keys and values
        // (and their gradients) from one forward to the next, which it does not keep.
        let recompute = opts.recompute_layers && cache.is_none() && device.is_autodiff() && fused;
        for (li, layer) in self.layers.iter().enumerate() {
            let (out, c) = if recompute {
                crate::checkpoint::layer(layer, h, &ctx, &inputs, acc.as_mut())
            } else {
                let kv = cache
                    .as_deref_mut()
                    .map(|c| (&mut c.keys[li], c.values.get_mut(li)));
                layer.forward(h, &ctx, kv, &inputs, acc.as_mut())
            };
            h = out;
            counts.extend(c);
        }
        if let Some(c) = cache {
            c.len = keys;
        }

        let aux_parts = acc.and_then(|acc| {
            Some(AuxParts {
                prob_sum: acc.prob_sum?,
                totals: RouteTotals {
                    tokens_per_expert: acc.tokens_per_expert,
                    rows: acc.rows,
                },
            })
        });
        (
            h,
            RouterStats {
                expert_counts: counts,
                aux_loss: aux_parts.as_ref().map(|p| p.loss_in(&p.totals)),
                aux_parts,
            },
        )
    }

    /// DeepSeek-V3's auxiliary-loss-free update: every sparse layer's bias moves by
    /// `rate · sign(mean load − load)`, so under-used experts become more likely to be chosen.
    /// `expert_counts` is `[sparse layer][expert]` as in [`RouterStats`]. A no-op for models
    /// without `aux_loss_free_bias`.
    pub fn update_expert_bias(&mut self, expert_counts: &[Vec<u32>], rate: f32) {
        let sparse = self.layers.iter_mut().filter_map(|l| match &mut l.mlp {
            Ffn::Sparse(m) => Some(m),
            Ffn::Dense(_) => None,
        });
        for (moe, counts) in sparse.zip(expert_counts) {
            let Some(bias) = moe.expert_bias.as_mut() else {
                continue;
            };
            let mean = counts.iter().map(|&c| c as f32).sum::<f32>() / counts.len().max(1) as f32;
            for (b, &c) in bias.iter_mut().zip(counts) {
                let err = mean - c as f32;
                *b += rate
                    * if err > 0.0 {
                        1.0
                    } else if err < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
            }
        }
    }
}

/// RoPE `cos`/`sin` tables for each token, rotate-half layout (`[θ₀…θ_{d/2−1}, θ₀…θ_{d/2−1}]`),
/// computed in f32 the way transformers does (`inv_freq = 1 / θ^(2i/d)`, angle = pos · inv_freq).
/// The first half of `sin` is negated: `x·cos + swap_halves(x)·sin` is transformers'
/// `x·cos + rotate_half(x)·sin`.
///
/// # Shapes
/// `positions: [batch, seq]` → two `[batch, 1, seq, head_dim]` tables, flattened.
pub(crate) fn rope_tables(
    positions: &[u32],
    b: usize,
    s: usize,
    freqs: &RopeFrequencies,
) -> (Vec<f32>, Vec<f32>) {
    let inv_freq = &freqs.inv_freq;
    let head_dim = 2 * inv_freq.len();
    let scale = freqs.attention_factor;
    let mut cos = Vec::with_capacity(b * s * head_dim);
    let mut sin = Vec::with_capacity(b * s * head_dim);
    for &p in &positions[..b * s] {
        let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
        for sign in [-1.0f32, 1.0] {
            cos.extend(angles.iter().map(|a| a.cos() * scale));
            sin.extend(angles.iter().map(|a| sign * a.sin() * scale));
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_insertion_equals_the_sort() {
        let sorted = |row: &[f32], k: usize| {
            let mut o: Vec<usize> = (0..row.len()).collect();
            o.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            o.truncate(k);
            o
        };
        let mut state = 12345u64;
        let mut order = Vec::new();
        for n in 1..=10 {
            for _ in 0..200 {
                // Few distinct values, so ties are common; a NaN and -0.0 now and then.
                let row: Vec<f32> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        match (state >> 33) % 7 {
                            0 => f32::NAN,
                            1 => -0.0,
                            v => v as f32 * 0.25 - 0.5,
                        }
                    })
                    .collect();
                for k in 0..=n + 1 {
                    top_k_of(&row, k, &mut order);
                    assert_eq!(order, sorted(&row, k), "row {row:?} k {k}");
                }
            }
        }
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        // Row 0: experts 1 and 3 tie for first; row 1: all equal.
        let scores = [0.1, 0.4, 0.1, 0.4, 0.25, 0.25, 0.25, 0.25];
        assert_eq!(top_k_rows(&scores, 4, 2), vec![1, 3, 0, 1]);
        assert_eq!(top_k_rows(&scores, 4, 3), vec![1, 3, 0, 0, 1, 2]);
    }

    #[test]
    fn group_limited_selection_by_hand() {
        // 8 experts in 4 groups of 2: [0 1] [2 3] [4 5] [6 7].
        let row = [0.9, 0.0, 0.5, 0.45, 0.6, 0.1, 0.3, 0.35];
        // Plain top-3: 0, 4, 2.
        assert_eq!(select_experts(&row, 8, 3, None), vec![0, 4, 2]);
        // Max per group: [0.9, 0.5, 0.6, 0.35] → keep groups 0 and 2 → experts 0, 1, 4, 5.
        let v2 = GroupLimit {
            n_group: 4,
            topk_group: 2,
            score: GroupScore::Max,
        };
        assert_eq!(select_experts(&row, 8, 3, Some(v2)), vec![0, 4, 5]);
        // Top-2 sums: [0.9, 0.95, 0.7, 0.65] → keep groups 1 and 0 → experts 0, 1, 2, 3.
        let v3 = GroupLimit {
            score: GroupScore::TopTwoSum,
            ..v2
        };
        assert_eq!(select_experts(&row, 8, 3, Some(v3)), vec![0, 2, 3]);
        // Group ties go to the lower group: all groups score 1.0 → keep groups 0 and 1.
        let flat = [0.5f32; 8];
        assert_eq!(select_experts(&flat, 8, 3, Some(v3)), vec![0, 1, 2]);
        // Two rows are independent.
        let two: Vec<f32> = row.iter().chain(flat.iter()).copied().collect();
        assert_eq!(select_experts(&two, 8, 3, Some(v2)), vec![0, 4, 5, 0, 1, 2]);
    }

    // ---- the fused kernels against the reference compositions (values and gradients) ----

    /// `n` values in `[-scale, scale)` from a 64-bit LCG (Knuth's constants), top 24 bits.
    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn leaf<const D: usize>(shape: [usize; D], seed: u64, scale: f32) -> Tensor<D> {
        let n = shape.iter().product();
        let device = Device::flex().autodiff();
        Tensor::from_data(TensorData::new(noise(n, seed, scale), shape), &device).require_grad()
    }

    fn constant<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), &Device::flex().autodiff())
    }

    /// `max |a − b| / max(|b|)`.
    fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale
    }

    /// Runs `layer(fused)` for both settings on the same leaves, backpropagates `Σ y · c` for a
    /// fixed random cotangent `c`, and checks that outputs agree to `fwd_tol` and every leaf's
    /// gradient to `grad_tol` (relative to the reference's largest magnitude). Returns the
    /// reference's output so callers can check more.
    fn assert_fused_agrees<const D: usize, const N: usize>(
        leaves: [Tensor<D>; N],
        layer: impl Fn(&[Tensor<D>; N], bool) -> Tensor<D>,
        fwd_tol: f32,
        grad_tol: f32,
    ) -> Vec<f32> {
        let run = |fused: bool| {
            let y = layer(&leaves, fused);
            let c = constant(noise(y.shape().num_elements(), 99, 1.0), y.dims());
            let grads = (y.clone() * c).sum().backward();
            let g: Vec<Vec<f32>> = leaves
                .iter()
                .map(|l| to_vec_f32(l.grad(&grads).expect("every leaf gets a gradient")))
                .collect();
            (to_vec_f32(y), g)
        };
        let (y_fused, g_fused) = run(true);
        let (y_ref, g_ref) = run(false);
        let d = rel_diff(&y_fused, &y_ref);
        assert!(
            d <= fwd_tol,
            "outputs differ by {d:e} (tolerance {fwd_tol:e})"
        );
        for (i, (a, b)) in g_fused.iter().zip(&g_ref).enumerate() {
            let d = rel_diff(a, b);
            assert!(
                d <= grad_tol,
                "gradients of input {i} differ by {d:e} (tolerance {grad_tol:e})"
            );
        }
        y_ref
    }

    #[test]
    fn fused_rms_norm_agrees_with_the_reference() {
        // 40 = two 16-lane chunks and a tail; rows of very different scales.
        let x = leaf([3, 5, 40], 1, 1.0) * constant(noise(15, 2, 4.0), [3, 5, 1]);
        let x = Tensor::from_data(x.into_data(), &Device::flex().autodiff()).require_grad();
        assert_fused_agrees(
            [x, leaf([1, 1, 40], 3, 2.0)],
            |[x, w], fused| rms_norm(x.clone(), w.clone().reshape([40]), 1e-6, fused),
            1e-6,
            1e-5,
        );
    }

    #[test]
    fn fused_linear_agrees_with_the_reference() {
        // A plain weight, and a transposed one (a tied LM head: a strided view of the embedding).
        assert_fused_agrees(
            [leaf([7, 12], 13, 2.0), leaf([12, 20], 14, 1.0)],
            |[x, w], fused| linear(x.clone(), w.clone(), fused),
            1e-6,
            1e-6,
        );
        assert_fused_agrees(
            [leaf([5, 12], 15, 2.0), leaf([33, 12], 16, 1.0)],
            |[x, e], fused| linear(x.clone(), e.clone().transpose(), fused),
            1e-6,
            1e-6,
        );
    }

    /// The fused token log-probabilities (and the host entropies) against burn's
    /// `log_softmax` + `gather` (and its entropy): a vocabulary of two 16-lane chunks and a
    /// tail and one of W1's size, untempered (1 and 0) and tempered, logits up to ±16 so that
    /// the shift by the maximum matters, a target at each end of the vocabulary.
    #[test]
    fn fused_token_logprobs_agree_with_the_reference() {
        for (vocab, seed) in [(37, 21), (512, 22)] {
            let rows = 7;
            let targets: Vec<usize> = (0..rows).map(|r| (r * 11 + vocab - 1) % vocab).collect();
            let targets = [vec![0, vocab - 1], targets[2..].to_vec()].concat();
            for temperature in [1.0, 0.0, 0.7] {
                let logp = |[x]: &[Tensor<2>; 1], fused: bool| {
                    let kernels = if fused {
                        Kernels::Fused
                    } else {
                        Kernels::Reference
                    };
                    let (lp, _) = token_logprobs(x.clone(), &targets, temperature, false, kernels);
                    lp.reshape([rows, 1])
                };
                assert_fused_agrees([leaf([rows, vocab], seed, 16.0)], logp, 2e-6, 1e-5);
                let x = leaf([rows, vocab], seed, 16.0);
                let entropy =
                    |kernels| token_logprobs(x.clone(), &targets, temperature, true, kernels).1;
                let (fused, reference) = (entropy(Kernels::Fused), entropy(Kernels::Reference));
                assert_eq!(fused.len(), rows);
                let d = rel_diff(&fused, &reference);
                assert!(
                    d <= 1e-5,
                    "entropies differ by {d:e} (vocab {vocab}, T {temperature})"
                );
            }
        }
    }

    /// The chunked LM head + log-softmax ([`fused::head_logprobs`]) against the whole logits
    /// then burn's `log_softmax` + `gather`: values and the gradients of `h` and of the head
    /// weight (plain `[hidden, vocab]` and tied `[vocab, hidden]`), for chunks of 1 row, of
    /// sizes that do not divide the 10 rows (3, 4), of all rows at once (10, kept logits) and
    /// more; tempered and scaled logits; and the entropies against the reference's.
    #[test]
    fn chunked_head_logprobs_agree_with_the_whole_logits() {
        let (rows, hidden, vocab) = (10, 12, 37);
        let targets: Vec<usize> = (0..rows).map(|r| (r * 7 + 3) % vocab).collect();
        let targets = [vec![0, vocab - 1], targets[2..].to_vec()].concat();
        for tied in [false, true] {
            for (scale, chunk) in [(1.0, 1), (1.0, 3), (0.5, 4), (1.0 / 0.7, 10), (2.0, 64)] {
                let w_shape = if tied {
                    [vocab, hidden]
                } else {
                    [hidden, vocab]
                };
                let leaves = [leaf([rows, hidden], 31, 2.0), leaf(w_shape, 32, 1.5)];
                let logp = |[h, w]: &[Tensor<2>; 2], fused: bool| {
                    if fused {
                        let out = fused::head_logprobs(
                            h.clone(),
                            w.clone(),
                            targets.clone(),
                            scale,
                            tied,
                            chunk,
                        );
                        return out.slice([0..1, 0..rows]).reshape([rows, 1]);
                    }
                    let w = if tied {
                        w.clone().transpose()
                    } else {
                        w.clone()
                    };
                    let logits = h.clone().matmul(w) * scale;
                    let (lp, _) = token_logprobs(logits, &targets, 1.0, false, Kernels::Reference);
                    lp.reshape([rows, 1])
                };
                assert_fused_agrees(leaves, logp, 2e-6, 1e-5);
                let [h, w] = [leaf([rows, hidden], 31, 2.0), leaf(w_shape, 32, 1.5)];
                let out =
                    fused::head_logprobs(h.clone(), w.clone(), targets.clone(), scale, tied, chunk);
                let got = to_vec_f32(out.slice([1..2, 0..rows]));
                let w = if tied { w.transpose() } else { w };
                let (_, want) =
                    token_logprobs(h.matmul(w) * scale, &targets, 1.0, true, Kernels::Reference);
                let d = rel_diff(&got, &want);
                assert!(
                    d <= 1e-5,
                    "entropies differ by {d:e} (tied {tied}, chunk {chunk})"
                );
            }
        }
    }

    #[test]
    fn fused_swiglu_agrees_with_the_reference() {
        // Gates up to ±6: both branches of the sigmoid, saturated and not.
        assert_fused_agrees(
            [
                leaf([7, 12], 4, 2.0),
                leaf([12, 20], 5, 1.0),
                leaf([10, 12], 6, 1.0),
            ],
            |[x, gu, down], fused| swiglu(x.clone(), gu.clone(), down.clone(), fused),
            1e-6,
            1e-5,
        );
    }

    #[test]
    fn fused_experts_agree_with_the_reference() {
        // 5 tokens, top-2 of 4 experts; expert 1 gets no token (its weight gradients must be
        // exactly 0) and expert 2 is some tokens' first choice and others' second.
        let chosen = vec![0, 2, 2, 3, 3, 0, 2, 0, 0, 3];
        let (t, hidden, inter) = (5, 12, 8);
        let leaves = || {
            [
                leaf([1, t, hidden], 10, 2.0),
                leaf([1, t, 2], 13, 1.0),
                leaf([4, hidden, 2 * inter], 11, 1.0),
                leaf([4, inter, hidden], 12, 1.0),
            ]
        };
        let routed = |[x, w, gu, down]: &[Tensor<3>; 4], fused: bool| {
            let (x, w) = (x.clone().reshape([t, hidden]), w.clone().reshape([t, 2]));
            let y = if fused {
                fused::moe_experts(x, w, gu.clone(), down.clone(), chosen.clone())
            } else {
                routed_reference(x, w, gu.clone(), down.clone(), &chosen)
            };
            y.reshape([1, t, hidden])
        };
        let ys = assert_fused_agrees(leaves(), routed, 1e-6, 1e-5);
        assert_eq!(ys.len(), t * hidden);
        // Token 0's row by hand: weights times each chosen expert's SwiGLU of its row.
        let [x, w, gu, down] = leaves();
        let (x, w, gu, down) = (
            to_vec_f32(x),
            to_vec_f32(w),
            to_vec_f32(gu),
            to_vec_f32(down),
        );
        let expert = |e: usize, row: &[f32]| -> Vec<f64> {
            let gu = &gu[e * hidden * 2 * inter..];
            let down = &down[e * inter * hidden..];
            let a: Vec<f64> = (0..inter)
                .map(|j| {
                    let col = |c: usize| {
                        (0..hidden)
                            .map(|i| f64::from(row[i]) * f64::from(gu[i * 2 * inter + c]))
                            .sum::<f64>()
                    };
                    let (g, u) = (col(j), col(inter + j));
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            (0..hidden)
                .map(|o| {
                    (0..inter)
                        .map(|j| a[j] * f64::from(down[j * hidden + o]))
                        .sum()
                })
                .collect()
        };
        let (y0, y2) = (expert(0, &x[..hidden]), expert(2, &x[..hidden]));
        for o in 0..hidden {
            let want = f64::from(w[0]) * y0[o] + f64::from(w[1]) * y2[o];
            assert!(
                (f64::from(ys[o]) - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{o}"
            );
        }
        let [x, w, gu, down] = leaves();
        let y = fused::moe_experts(
            x.reshape([t, hidden]),
            w.reshape([t, 2]),
            gu.clone(),
            down,
            chosen.clone(),
        );
        let g = to_vec_f32(gu.grad(&y.sum().backward()).unwrap());
        assert!(
            g[hidden * 2 * inter..2 * hidden * 2 * inter]
                .iter()
                .all(|&v| v == 0.0)
        );
        assert!(g[..hidden * 2 * inter].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn fused_rope_agrees_with_the_reference() {
        // Two rows with different positions, three heads sharing each table row.
        let (b, s, heads, d) = (2, 5, 3, 8);
        let positions = [0, 1, 2, 3, 4, 7, 8, 9, 10, 11];
        let (cos, sin) = rope_tables(
            &positions,
            b,
            s,
            &crate::rope::RopeScaling::None.frequencies(d, 10_000.0, 2048),
        );
        let (cos, sin) = (constant(cos, [b, 1, s, d]), constant(sin, [b, 1, s, d]));
        assert_fused_agrees(
            [leaf([b, s, heads, d], 7, 1.0)],
            |[t], fused| apply_rope(t.clone(), &cos, &sin, fused),
            0.0,
            1e-6,
        );
    }

    #[test]
    fn fused_attention_agrees_with_the_reference() {
        // 4 new queries after 2 cached columns (6 keys), 4 query heads on 2 KV heads. In row 1
        // the first three keys are padding and query 0 has no key at all: the mask leaves its
        // own column open and the row is flagged empty (output and gradient 0).
        let (b, s, nh, nkv, keys, d) = (2, 4, 4, 2, 6, 8);
        let mut mask = vec![0.0f32; b * s * keys];
        for row in 0..b {
            for i in 0..s {
                for j in 0..keys {
                    if j > 2 + i || (row == 1 && j < 3 && !(i == 0 && j == 2)) {
                        mask[(row * s + i) * keys + j] = MASKED;
                    }
                }
            }
        }
        let mask = constant(mask, [b, 1, s, keys]);
        let mut keep = vec![1.0f32; b * s];
        keep[s] = 0.0;
        let empty: Vec<bool> = keep.iter().map(|&k| k == 0.0).collect();
        let keep = constant(keep, [b, 1, s, 1]);
        let scale = 1.0 / (d as f64).sqrt();
        // Keys and values as the first `keys` columns of a cache with room for 9: strided
        // blocks, read in place by the fused op; their gradients flow back through the slice.
        let cap = keys + 3;
        let cached = |t: &Tensor<4>| t.clone().slice([0..b, 0..nkv, 0..keys, 0..d]);
        let out = assert_fused_agrees(
            [
                leaf([b, s, nh, d], 8, 3.0),
                leaf([b, nkv, cap, d], 9, 3.0),
                leaf([b, nkv, cap, d], 14, 1.0),
            ],
            |[q, k, v], fused| {
                let (q, k, v) = (q.clone(), cached(k), cached(v));
                let y = if fused {
                    fused::attention(q, k, v, mask.clone(), empty.clone(), scale)
                } else {
                    attention_reference(q, k, v, &mask, Some(&keep), scale)
                };
                y.reshape([1, 1, b * s, nh * d])
            },
            1e-6,
            1e-5,
        );
        assert!(out[s * nh * d..(s + 1) * nh * d].iter().all(|&x| x == 0.0));
        assert!(out.iter().filter(|&&x| x != 0.0).count() > out.len() / 2);
        // Query row (1, 0) gets no gradient; with no empty row it would.
        let [q, k, v] = [
            leaf([b, s, nh, d], 8, 3.0),
            leaf([b, nkv, keys, d], 9, 3.0),
            leaf([b, nkv, keys, d], 14, 1.0),
        ];
        let y = fused::attention(q.clone(), k, v, mask.clone(), empty, scale);
        let g = to_vec_f32(q.grad(&y.sum().backward()).unwrap());
        let row = s * nh * d..(s + 1) * nh * d;
        assert!(g[row.clone()].iter().all(|&x| x == 0.0));
        assert!(g[..row.start].iter().any(|&x| x != 0.0));
    }

    /// MLA's values are not as wide as its queries and keys (`v_head_dim` vs `qk_head_dim`):
    /// the fused op against the reference with values narrower (5) and wider (12) than the
    /// keys (8), with a padded row, MLA's one-to-one heads and GQA's groups.
    #[test]
    fn fused_attention_with_other_value_widths_agrees_with_the_reference() {
        let (b, s, keys, d) = (2, 3, 5, 8);
        let mut mask = vec![0.0f32; b * s * keys];
        for row in 0..b {
            for i in 0..s {
                for j in 0..keys {
                    if j > 2 + i || (row == 1 && j == 0) {
                        mask[(row * s + i) * keys + j] = MASKED;
                    }
                }
            }
        }
        let mask = constant(mask, [b, 1, s, keys]);
        let scale = 0.3;
        for (nh, nkv, dv) in [(4, 4, 5), (4, 2, 12), (2, 1, 5)] {
            let out = assert_fused_agrees(
                [
                    leaf([b, s, nh, d], 31, 3.0),
                    leaf([b, nkv, keys, d], 32, 3.0),
                    leaf([b, nkv, keys, dv], 33, 1.0),
                ],
                |[q, k, v], fused| {
                    let (q, k, v) = (q.clone(), k.clone(), v.clone());
                    let y = if fused {
                        fused::attention(q, k, v, mask.clone(), vec![], scale)
                    } else {
                        attention_reference(q, k, v, &mask, None, scale)
                    };
                    y.reshape([1, 1, b * s, nh * dv])
                },
                1e-6,
                1e-5,
            );
            assert_eq!(out.len(), b * s * nh * dv);
        }
    }

    #[test]
    fn rope_tables_follow_the_rotate_half_layout() {
        let (cos, sin) = rope_tables(
            &[0, 3],
            1,
            2,
            &crate::rope::RopeScaling::None.frequencies(4, 100.0, 2048),
        );
        // inv_freq = [1, 100^(-1/2)] = [1, 0.1]; position 3 → angles [3, 0.3], repeated.
        assert_eq!(&cos[..4], &[1.0; 4]);
        let want = [3.0f32.cos(), 0.3f32.cos(), 3.0f32.cos(), 0.3f32.cos()];
        for (a, b) in cos[4..].iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        // The first half of `sin` carries rotate-half's minus sign.
        assert!((sin[4] + 3.0f32.sin()).abs() < 1e-6 && (sin[7] - 0.3f32.sin()).abs() < 1e-6);
    }
}
