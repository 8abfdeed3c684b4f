//! Host inference: the model's forward pass for sampling, on plain `f32` buffers.
//!
//! A rollout decodes one token per sequence per step. Through burn tensors one decode step of a
//! small model is some forty tensor ops per layer, each allocating a zero-filled output and
//! dispatching through the backend, and those fixed costs, not arithmetic, were most of the
//! rollout (docs/PERF.md item 10). Here a layer is a few GEMM calls (the `gemm` crate, which
//! burn-flex also calls) and loops over slices, with no autodiff bookkeeping: sampling needs no
//! gradients. The weights are copied out of the model once per rollout.
//!
//! [`MoeModel::forward`] with a [`crate::KvCache`] is the reference: the same layers, options
//! and masking rules, so the same logits up to float rounding (tested in `tests/model.rs`,
//! `host_inference_agrees_with_the_model`, over every family's options).
//!
//! Multi-head Latent Attention (DeepSeek) caches the compressed form: per token and layer the
//! normalised latent `c` `[kv_lora_rank]` and the rotated shared key `k_pe`
//! `[qk_rope_head_dim]`, one row of `kv_lora_rank + qk_rope_head_dim` floats. Its fast path,
//! [`LatentForm::Absorbed`], never expands them: head `h`'s key is `[c · W_UK_h, k_pe]` and its
//! value `c · W_UV_h` (the columns of `kv_b_proj`), so `q_h · k_h = [q_nope_h · W_UK_hᵀ, q_pe_h]
//! · [c, k_pe]`: the query absorbs `W_UK_h` and every head attends over the latent rows
//! themselves (one product for all heads and new tokens of a row), and `W_UV_h` is applied
//! once to each head's softmax-weighted sum of latents. [`LatentForm::Expanded`] expands
//! every cached latent into each head's key and value through `kv_b_proj`, as transformers
//! does, and is the reference the absorbed form is tested against (`tests/mla.rs`).

use crate::config::ScoringFunc;
use crate::fused;
use crate::fused::kernels::{self, sigmoid};
use crate::matmul::{PANEL, View, gemm, panel_product, product};
use crate::model::{
    Attention, Batch, DecoderLayer, Ffn, GroupLimit, LatentAttention, Mlp, MoeBlock, MoeModel,
    Proj, RmsNorm, rope_tables, select_experts, to_vec_f32,
};
use crate::rope::RopeFrequencies;
use burn::prelude::*;
use multiversion::multiversion;
use std::sync::Arc;

/// A weight matrix `W: [rows, cols]` (`x · W` maps `rows` input features to `cols` outputs),
/// stored as column panels: panel `p` holds columns `p·PANEL ..` as its own row-major
/// `[rows, width]` block.
///
/// Decoding multiplies a few rows by every weight once per token, so the weights stream from L3
/// or memory on each use. Row-major `W` makes gemm's microkernel fetch one cache line per input
/// feature at a stride of `cols` floats; a panel is read front to back, which the prefetcher
/// follows. Measured on the development machine (2-core Zen 3, 16 MB of `256 × 256` weights
/// cycled as decoding does; `examples/gemm_layouts.rs`): 8 rows 20 → 45 GFLOP/s, 32 rows
/// 43 → 73, 550 rows unchanged, 2,200 rows (prefill) about 10% slower (docs/PERF.md item 11).
struct Weight {
    panels: Panels,
    rows: usize,
    cols: usize,
}

/// A [`Weight`]'s panels: `f32`, or `bf16` for a frozen model asked to take half the memory
/// (`model.frozen_dtype`), each panel widened to `f32` into a scratch buffer before its product,
/// so the arithmetic stays `f32`.
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Weight {
    /// The weight times `r`.
    fn scaled(mut self, r: f32) -> Self {
        if r != 1.0 {
            match &mut self.panels {
                Panels::F32(p) => p.iter_mut().for_each(|w| *w *= r),
                Panels::Bf16(p) => p
                    .iter_mut()
                    .for_each(|w| *w = half::bf16::from_f32(w.to_f32() * r)),
            }
        }
        self
    }

    /// The same weight stored in `bf16` (round to nearest even).
    fn store_bf16(&mut self) {
        if let Panels::F32(p) = &self.panels {
            self.panels = Panels::Bf16(p.iter().map(|&w| half::bf16::from_f32(w)).collect());
        }
    }

    /// From a row-major `[rows, cols]` matrix.
    fn new(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "weight is not [rows, cols]");
        let mut panels = Vec::with_capacity(w.len());
        for start in (0..cols).step_by(PANEL) {
            let end = (start + PANEL).min(cols);
            for r in 0..rows {
                panels.extend_from_slice(&w[r * cols + start..r * cols + end]);
            }
        }
        Weight {
            panels: Panels::F32(panels),
            rows,
            cols,
        }
    }

    /// `c = x · W`, or `c += x · W` with `accumulate`; contiguous row-major `x: [m, rows]`,
    /// `c: [m, cols]`.
    ///
    /// Many rows (prefill, the reference model's forward) go a block of [`ROW_BLOCK`] at a
    /// time through every panel, so that the block of `x` stays in L2 across the panels instead
    /// of streaming all of `x` from L3 once per panel. Each output element is computed the
    /// same way either way.
    fn matmul(&self, c: &mut [f32], x: &[f32], m: usize, accumulate: bool) {
        for first in (0..m).step_by(ROW_BLOCK) {
            let rows = ROW_BLOCK.min(m - first);
            let (c, x) = (&mut c[first * self.cols..], &x[first * self.rows..]);
            self.matmul_rows(c, x, rows, accumulate);
        }
    }

    /// [`Weight::matmul`] on one block of rows.
    fn matmul_rows(&self, c: &mut [f32], x: &[f32], m: usize, accumulate: bool) {
        let x = View::dense(&x[..m * self.rows], m, self.rows);
        let mut wide = Vec::new();
        for start in (0..self.cols).step_by(PANEL) {
            let width = PANEL.min(self.cols - start);
            let span = start * self.rows..(start + width) * self.rows;
            let panel: &[f32] = match &self.panels {
                Panels::F32(p) => &p[span],
                Panels::Bf16(p) => {
                    wide.clear();
                    wide.extend(p[span].iter().map(|w| w.to_f32()));
                    &wide
                }
            };
            if width == PANEL {
                panel_product(&mut c[start..], self.cols, x, panel, accumulate);
            } else {
                let b = View::dense(panel, self.rows, width);
                gemm(&mut c[start..], self.cols, x, b, accumulate);
            }
        }
    }
}

/// Rows of `x` per block in [`Weight::matmul`]: 96 rows of a 256-wide input are 96 KiB, which
/// stay in a 512 KiB L2 beside a 16 KiB panel; a multiple of the panel kernel's 6-row blocks.
const ROW_BLOCK: usize = 96;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    to_vec_f32(t)
}

/// A `[rows, cols]` weight tensor as a [`Weight`].
fn weight(t: Tensor<2>) -> Weight {
    let [rows, cols] = t.dims();
    // A base stored in bf16 keeps bf16 panels: the same values, half the memory.
    let bf16 = t.dtype() == burn::tensor::DType::BF16;
    let mut w = Weight::new(&host(t), rows, cols);
    if bf16 {
        w.store_bf16();
    }
    w
}

/// `x · W + b` with `W: [in, out]`.
struct HostProj {
    w: Weight,
    b: Option<Vec<f32>>,
}

impl HostProj {
    fn weights(&mut self) -> Vec<&mut Weight> {
        vec![&mut self.w]
    }

    fn new(p: &Proj) -> Self {
        HostProj {
            w: weight(p.merged_weight()),
            b: p.bias.as_ref().map(|b| host(b.val())),
        }
    }

    /// The projection with its output columns reordered: output `j` is `p`'s output
    /// `order[j]`.
    fn reordered(p: &Proj, order: &[usize]) -> Self {
        let [rows, cols] = p.weight.val().dims();
        assert_eq!(order.len(), cols, "one source column per output column");
        let w = host(p.merged_weight());
        let mut moved = Vec::with_capacity(w.len());
        for row in w.chunks_exact(cols) {
            moved.extend(order.iter().map(|&j| row[j]));
        }
        HostProj {
            w: Weight::new(&moved, rows, cols),
            b: p.bias
                .as_ref()
                .map(|b| host(b.val()))
                .map(|b| order.iter().map(|&j| b[j]).collect()),
        }
    }

    /// The projection's output times `r` (`x · rW + rb`).
    fn scaled(self, r: f32) -> Self {
        HostProj {
            w: self.w.scaled(r),
            b: self.b.map(|b| b.into_iter().map(|v| v * r).collect()),
        }
    }

    /// `x: [rows, in]` → `y: [rows, out]`, added to `y` with `accumulate`.
    fn apply(&self, y: &mut [f32], x: &[f32], rows: usize, accumulate: bool) {
        self.w.matmul(y, x, rows, accumulate);
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(self.w.cols) {
                row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
            }
        }
    }
}

struct HostNorm {
    w: Vec<f32>,
    eps: f32,
}

impl HostNorm {
    fn new(n: &RmsNorm) -> Self {
        HostNorm {
            w: host(n.weight.val()),
            eps: n.eps as f32,
        }
    }

    /// Normalizes each `w.len()`-wide row of `x`.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        kernels::rms_norm(x, &self.w, self.eps)
    }
}

/// SwiGLU with gate and up side by side: `gate_up: [hidden, 2·inter]`, `down: [inter, hidden]`.
struct HostMlp {
    gate_up: Weight,
    down: Weight,
    hidden: usize,
    inter: usize,
}

impl HostMlp {
    fn weights(&mut self) -> Vec<&mut Weight> {
        vec![&mut self.gate_up, &mut self.down]
    }

    /// From row-major `gate_up: [hidden, 2·inter]` and `down: [inter, hidden]`.
    fn from_parts(gate_up: &[f32], down: &[f32], hidden: usize) -> Self {
        let inter = gate_up.len() / hidden / 2;
        HostMlp {
            gate_up: Weight::new(gate_up, hidden, 2 * inter),
            down: Weight::new(down, inter, hidden),
            hidden,
            inter,
        }
    }

    fn new(m: &Mlp) -> Self {
        let hidden = m.gate_up.val().dims()[0];
        Self::from_parts(&host(m.merged_gate_up()), &host(m.merged_down()), hidden)
    }

    /// The MLP's output times `r` (its down projection scaled).
    fn scaled(mut self, r: f32) -> Self {
        self.down = self.down.scaled(r);
        self
    }

    /// `x: [rows, hidden]` → `[rows, hidden]`.
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (h, i) = (self.hidden, self.inter);
        let mut gu = vec![0.0; rows * 2 * i];
        self.gate_up.matmul(&mut gu, x, rows, false);
        let act = kernels::silu_mul(&gu, i);
        let mut y = vec![0.0; rows * h];
        self.down.matmul(&mut y, &act, rows, false);
        y
    }
}

struct HostAttention {
    q: HostProj,
    k: HostProj,
    v: HostProj,
    o: HostProj,
    q_norm: Option<HostNorm>,
    k_norm: Option<HostNorm>,
    over_projection: bool,
    clip: Option<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The softmax scale (`1/√head_dim` or the config's).
    scale: f32,
}

struct HostMoe {
    /// `[hidden, experts]`
    router: Weight,
    /// One SwiGLU per expert.
    experts: Vec<HostMlp>,
    shared: Option<HostMlp>,
    /// `[hidden]`
    shared_gate: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    top_k: usize,
    norm_topk_prob: bool,
    scoring: ScoringFunc,
    routed_scaling_factor: f32,
    group_limit: Option<GroupLimit>,
}

enum HostFfn {
    Dense(HostMlp),
    Sparse(HostMoe),
}

/// How the host engine computes Multi-head Latent Attention over its compressed cache (see the
/// module's documentation); both give the same logits up to float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatentForm {
    /// `W_UK` absorbed into the queries, attention over the latent rows, `W_UV` after it: the
    /// fast path.
    #[default]
    Absorbed,
    /// Every cached latent expanded into each head's key and value through `kv_b_proj`, then
    /// per-head attention (transformers' computation): the reference.
    Expanded,
}

/// Multi-head Latent Attention on the host. The RoPE dimensions of the query and of `k_pe`
/// are stored de-interleaved (their weights' columns reordered once, here) when the model
/// interleaves them, so rotation is the rotate-half kernel.
struct HostLatent {
    /// `q_a_proj` and `q_a_layernorm`, with a `q_lora_rank`.
    q_a: Option<(HostProj, HostNorm)>,
    /// `q_proj` or `q_b_proj`: `[·, heads · qk_head_dim]`.
    q: HostProj,
    /// `kv_a_proj_with_mqa`: `[hidden, kv_lora_rank + qk_rope_head_dim]`.
    kv_a: HostProj,
    kv_norm: HostNorm,
    /// Per head, `W_UK_hᵀ`: `[qk_nope_head_dim, kv_lora_rank]` row-major (the absorbed query
    /// is `q_nope_h · W_UK_hᵀ`).
    uk_t: Vec<Vec<f32>>,
    /// Per head, `W_UV_h`: `[kv_lora_rank, v_head_dim]` row-major.
    uv: Vec<Vec<f32>>,
    /// `kv_b_proj`, `[kv_lora_rank, heads · (qk_nope_head_dim + v_head_dim)]`, for the expanded
    /// form.
    kv_b: Weight,
    o: HostProj,
    heads: usize,
    rank: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    scale: f32,
    form: LatentForm,
}

enum HostAttn {
    Standard(HostAttention),
    Latent(HostLatent),
}

struct HostLayer {
    input_norm: HostNorm,
    attn: HostAttn,
    post_norm: HostNorm,
    ffn: HostFfn,
}

impl HostLayer {
    /// Every weight matrix of the layer (what `bf16` storage converts; norms, biases, the
    /// MLA per-head blocks and gates stay `f32`).
    fn weights(&mut self) -> Vec<&mut Weight> {
        let mut w = match &mut self.attn {
            HostAttn::Standard(a) => [&mut a.q, &mut a.k, &mut a.v, &mut a.o]
                .into_iter()
                .flat_map(HostProj::weights)
                .collect(),
            HostAttn::Latent(l) => {
                let mut w = vec![&mut l.kv_b];
                if let Some((q_a, _)) = &mut l.q_a {
                    w.extend(q_a.weights());
                }
                for p in [&mut l.q, &mut l.kv_a, &mut l.o] {
                    w.extend(p.weights());
                }
                w
            }
        };
        match &mut self.ffn {
            HostFfn::Dense(m) => w.extend(m.weights()),
            HostFfn::Sparse(m) => {
                w.push(&mut m.router);
                for e in m.experts.iter_mut().chain(m.shared.as_mut()) {
                    w.extend(e.weights());
                }
            }
        }
        w
    }
}

/// Keys and values of past tokens on the host, as [`crate::KvCache`] holds them for tensors.
///
/// A cache made by [`HostKvCache::share_prefix`] holds, besides each row's own tokens, a
/// shared prefix: the cache of the prompts, each row reading its prompt's keys where a copied
/// cache would hold one copy per sample of the group (see [`HostKvCache::share_prefix`]).
///
/// # Shapes
/// per layer, keys transposed, `[batch, kv_heads, head_dim, capacity]` (a decode step's scores
/// are then `Σ_d q_d · keys[d, ..]`, vectorised across keys with no horizontal sums), and
/// values `[batch, kv_heads, capacity, head_dim]`; `key_valid:
/// [batch, capacity]`. MLA (`latent`): keys `[batch, capacity, kv_lora_rank +
/// qk_rope_head_dim]`, each token's normalised latent then its rotated `k_pe`, and no values.
#[derive(Debug, Clone)]
pub struct HostKvCache {
    keys: Vec<Vec<f32>>,
    /// Empty per layer for MLA.
    values: Vec<Vec<f32>>,
    /// The compressed MLA cache (keys hold the latents).
    latent: bool,
    key_valid: Vec<bool>,
    batch: usize,
    capacity: usize,
    /// This cache's own tokens per row (after the shared prefix, if any).
    len: usize,
    /// `kv_heads · capacity · head_dim`: one row's block in a layer.
    row_block: usize,
    /// The shared prefix and, for each row, which of its rows comes before this row's tokens.
    prefix: Option<(Arc<HostKvCache>, Vec<usize>)>,
}

impl HostKvCache {
    /// Tokens held per row (real or padding), a shared prefix's included.
    pub fn len(&self) -> usize {
        self.len + self.prefix.as_ref().map_or(0, |(p, _)| p.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cache for rows that continue this cache's rows: row `i` comes after this cache's row
    /// `prefix_of_row[i]` and has room for `new_tokens` tokens of its own. The prefix rows are
    /// kept once, not copied per row: a group of samples decoding from one prompt reads the
    /// prompt's keys and values once per step for all of them (attention over the prefix is
    /// one product per group, merged with each row's own keys by their softmax normalisers,
    /// as cascade attention does), which cuts the memory a decode step streams
    /// (docs/PERF.md item 13). The same attention as [`Self::select_rows`]'s copies up to
    /// float rounding (tested).
    ///
    /// # Panics
    /// If a `prefix_of_row` entry is not a row of this cache, or this cache already continues a
    /// shared prefix (programming errors of the caller).
    pub fn share_prefix(self, prefix_of_row: &[usize], new_tokens: usize) -> Self {
        assert!(
            prefix_of_row.iter().all(|&r| r < self.batch),
            "prefix_of_row must name rows of the cache"
        );
        assert!(
            self.prefix.is_none(),
            "the cache already has a shared prefix"
        );
        let layers = self.keys.len();
        let row_block = self.row_block / self.capacity.max(1) * new_tokens;
        let rows = prefix_of_row.len();
        let values = if self.latent { 0 } else { rows * row_block };
        HostKvCache {
            keys: vec![vec![0.0; rows * row_block]; layers],
            values: vec![vec![0.0; values]; layers],
            latent: self.latent,
            key_valid: vec![false; rows * new_tokens],
            batch: rows,
            capacity: new_tokens,
            len: 0,
            row_block,
            prefix: Some((Arc::new(self), prefix_of_row.to_vec())),
        }
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Bytes of this cache's own buffers (f32; a shared prefix's not included): `batch ·
    /// capacity ·` [`InferenceModel::kv_bytes_per_token`].
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(Vec::len)
            .sum::<usize>()
            * 4
    }

    /// A cache whose row i is this cache's row `rows[i]` (see [`crate::KvCache::select_rows`]).
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let pick = |layer: &Vec<f32>| {
            if layer.is_empty() {
                return Vec::new(); // an MLA cache's values
            }
            let mut out = Vec::with_capacity(rows.len() * self.row_block);
            for &r in rows {
                out.extend_from_slice(&layer[r * self.row_block..(r + 1) * self.row_block]);
            }
            out
        };
        let mut key_valid = Vec::with_capacity(rows.len() * self.capacity);
        for &r in rows {
            key_valid
                .extend_from_slice(&self.key_valid[r * self.capacity..(r + 1) * self.capacity]);
        }
        HostKvCache {
            keys: self.keys.iter().map(pick).collect(),
            values: self.values.iter().map(pick).collect(),
            key_valid,
            batch: rows.len(),
            prefix: self
                .prefix
                .as_ref()
                .map(|(p, of)| (Arc::clone(p), rows.iter().map(|&r| of[r]).collect())),
            ..*self
        }
    }
}

/// The model's weights on the host, ready for [`InferenceModel::forward_last`].
pub struct InferenceModel {
    /// `[vocab, hidden]`
    embed: Vec<f32>,
    layers: Vec<HostLayer>,
    norm: HostNorm,
    /// `[hidden, vocab]`
    lm_head: Weight,
    hidden: usize,
    vocab: usize,
    rope: RopeFrequencies,
}

impl InferenceModel {
    /// A host copy of `model`'s weights, when its device computes on the host CPU (burn-flex),
    /// where this engine is the fast path; `None` on other backends, whose own kernels are
    /// faster than copying weights out.
    pub fn for_model(model: &MoeModel) -> Option<Self> {
        fused::available(&model.device()).then(|| Self::new(model))
    }

    /// A host copy of `model`'s weights, whatever its device.
    pub fn new(model: &MoeModel) -> Self {
        Self::with_latent_form(model, LatentForm::Absorbed)
    }

    /// [`InferenceModel::new`], computing Multi-head Latent Attention (if the model has it) in
    /// the given form; the cache is the compressed one either way.
    pub fn with_latent_form(model: &MoeModel, form: LatentForm) -> Self {
        let cfg = &model.config;
        let hidden = cfg.hidden_size;
        // Granite's multipliers are folded into the weights: the looked-up embeddings, each
        // residual branch's output projection, and the LM head (one multiply at load time
        // instead of one per token).
        let mut embed = host(model.embed_tokens.val());
        if cfg.embedding_multiplier != 1.0 {
            let m = cfg.embedding_multiplier as f32;
            embed.iter_mut().for_each(|w| *w *= m);
        }
        let lm_head = match &model.lm_head {
            Some(w) => weight(w.val()),
            None => weight(model.embed_tokens.val().transpose()),
        };
        let residual = cfg.residual_multiplier as f32;
        InferenceModel {
            embed,
            layers: model
                .layers
                .iter()
                .map(|l| host_layer(l, hidden, residual, form))
                .collect(),
            norm: HostNorm::new(&model.norm),
            lm_head: lm_head.scaled(1.0 / cfg.logits_scaling as f32),
            hidden,
            vocab: cfg.vocab_size,
            rope: cfg.rope_frequencies(),
        }
    }

    /// The same model with every weight matrix (the layers' projections and experts, the LM
    /// head) stored in `bf16`, widened to `f32` panel by panel as it is used: half their
    /// memory, at most bf16's rounding (a relative 2⁻⁹ per weight) in every logit's inputs.
    /// The embedding, norms and biases stay `f32`. For frozen models only (the GRPO reference,
    /// a teacher: `model.frozen_dtype = "bf16"`).
    pub fn into_bf16(mut self) -> Self {
        self.lm_head.store_bf16();
        for l in &mut self.layers {
            l.weights().into_iter().for_each(Weight::store_bf16);
        }
        self
    }

    /// Bytes the cache holds per token (f32, all layers): `2 · kv_heads · head_dim · 4` a
    /// layer, or MLA's compressed `(kv_lora_rank + qk_rope_head_dim) · 4`
    /// ([`crate::ModelConfig::kv_bytes_per_token`]).
    pub fn kv_bytes_per_token(&self) -> usize {
        let floats = |l: &HostLayer| match &l.attn {
            HostAttn::Standard(a) => 2 * a.kv_heads * a.head_dim,
            HostAttn::Latent(m) => m.rank + m.rope,
        };
        self.layers.iter().map(floats).sum::<usize>() * 4
    }

    /// An empty cache for `batch` rows of up to `capacity` tokens each.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> HostKvCache {
        let (latent, per_token) = match self.layers.first().map(|l| &l.attn) {
            Some(HostAttn::Standard(a)) => (false, a.kv_heads * a.head_dim),
            Some(HostAttn::Latent(m)) => (true, m.rank + m.rope),
            None => (false, 0),
        };
        let row_block = per_token * capacity;
        let values = if latent { 0 } else { batch * row_block };
        HostKvCache {
            keys: vec![vec![0.0; batch * row_block]; self.layers.len()],
            values: vec![vec![0.0; values]; self.layers.len()],
            latent,
            key_valid: vec![false; batch * capacity],
            batch,
            capacity,
            len: 0,
            row_block,
            prefix: None,
        }
    }

    /// Runs `batch` through the model, appending its keys and values to `cache`, and returns
    /// the logits of each row's last column: [`MoeModel::forward`] with
    /// `LogitsMode::Last` and a cache.
    ///
    /// # Shapes
    /// → `[batch, vocab]`, row-major.
    ///
    /// # Panics
    /// As [`MoeModel::forward`]: if `batch`'s vectors do not hold `batch · seq` entries or the
    /// cache has another batch size or too little room (programming errors of the caller).
    pub fn forward_last(&self, batch: &Batch, cache: &mut HostKvCache) -> Vec<f32> {
        let h = self.trunk(batch, cache);
        let (b, s) = (batch.batch, batch.seq);
        self.head_at(&h, &(0..b).map(|r| r * s + s - 1).collect::<Vec<_>>())
    }

    /// Logits at flat positions (`row · seq + column`) of `batch`: [`MoeModel::forward_positions`].
    ///
    /// # Shapes
    /// `positions: [n]` → `[n, vocab]`, row-major.
    ///
    /// # Panics
    /// As [`MoeModel::forward_positions`].
    pub fn forward_positions(&self, batch: &Batch, positions: &[usize]) -> Vec<f32> {
        let mut cache = self.new_cache(batch.batch, batch.seq);
        let h = self.trunk(batch, &mut cache);
        self.head_at(&h, positions)
    }

    /// Rows that continue shared prefixes, each prefix computed once:
    /// [`MoeModel::forward_positions_shared`].
    ///
    /// # Shapes
    /// `prefixes: [prompts, p]`, `suffixes: [rows, s]`, `positions: [n]` → `[n, vocab]`.
    ///
    /// # Panics
    /// As [`MoeModel::forward_positions_shared`].
    pub fn forward_positions_shared(
        &self,
        prefixes: &Batch,
        prefix_of_row: &[usize],
        suffixes: &Batch,
        positions: &[usize],
    ) -> Vec<f32> {
        assert_eq!(
            prefix_of_row.len(),
            suffixes.batch,
            "one prefix per suffix row"
        );
        assert!(
            prefix_of_row.iter().all(|&p| p < prefixes.batch),
            "prefix_of_row must name prefix rows"
        );
        let mut cache = self.new_cache(prefixes.batch, prefixes.seq + suffixes.seq);
        self.trunk(prefixes, &mut cache);
        let mut cache = cache.select_rows(prefix_of_row);
        let h = self.trunk(suffixes, &mut cache);
        self.head_at(&h, positions)
    }

    /// Embeddings and decoder layers over `batch`, appending to `cache`: hidden states
    /// `[batch · seq, hidden]` before the final norm.
    fn trunk(&self, batch: &Batch, cache: &mut HostKvCache) -> Vec<f32> {
        batch.assert_shapes();
        let (b, s, hd) = (batch.batch, batch.seq, self.hidden);
        assert_eq!(
            cache.batch, b,
            "cache batch size differs from the input batch"
        );
        let past = cache.len;
        assert!(
            past + s <= cache.capacity,
            "cache capacity {} exceeded ({} tokens)",
            cache.capacity,
            past + s
        );
        for row in 0..b {
            let at = row * cache.capacity + past;
            cache.key_valid[at..at + s]
                .copy_from_slice(&batch.attention_mask[row * s..(row + 1) * s]);
        }
        let rope = rope_tables(&batch.positions, b, s, &self.rope);
        let mut h = Vec::with_capacity(b * s * hd);
        for &id in &batch.input_ids {
            let id = id as usize;
            h.extend_from_slice(&self.embed[id * hd..(id + 1) * hd]);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let x = layer.input_norm.apply(&h);
            match &layer.attn {
                HostAttn::Standard(a) => a.apply(&mut h, &x, [b, s], &rope, cache, li),
                HostAttn::Latent(a) => a.apply(&mut h, &x, [b, s], &rope, cache, li),
            }
            let x = layer.post_norm.apply(&h);
            match &layer.ffn {
                HostFfn::Dense(mlp) => add(&mut h, &mlp.apply(&x, b * s)),
                HostFfn::Sparse(moe) => moe.apply(&mut h, &x, hd),
            }
        }
        cache.len = past + s;
        h
    }

    /// Final norm and LM head at rows `positions` of hidden states `h: [rows, hidden]`.
    /// Log-probabilities of `targets` at `positions` (temperature as in sampling):
    /// [`fused::token_logprobs_host`] of [`InferenceModel::forward_positions`]' logits, the LM
    /// head run a chunk of rows at a time so that the `[n, vocab]` logits are never all alive.
    ///
    /// # Shapes
    /// `positions`, `targets`: `[n]` → `[n]`
    pub fn token_logprobs(
        &self,
        batch: &Batch,
        positions: &[usize],
        targets: &[usize],
        temperature: f32,
    ) -> Vec<f32> {
        let mut cache = self.new_cache(batch.batch, batch.seq);
        let h = self.trunk(batch, &mut cache);
        self.head_logprobs(&h, positions, targets, temperature)
    }

    /// [`InferenceModel::token_logprobs`] for rows that continue shared prefixes
    /// ([`InferenceModel::forward_positions_shared`]); `(suffixes, positions)`.
    pub fn token_logprobs_shared(
        &self,
        prefixes: &Batch,
        prefix_of_row: &[usize],
        (suffixes, positions): (&Batch, &[usize]),
        targets: &[usize],
        temperature: f32,
    ) -> Vec<f32> {
        assert_eq!(
            prefix_of_row.len(),
            suffixes.batch,
            "one prefix per suffix row"
        );
        let mut cache = self.new_cache(prefixes.batch, prefixes.seq + suffixes.seq);
        self.trunk(prefixes, &mut cache);
        let mut cache = cache.select_rows(prefix_of_row);
        let h = self.trunk(suffixes, &mut cache);
        self.head_logprobs(&h, positions, targets, temperature)
    }

    /// The head and the log-softmax at `targets`, [`crate::auto_chunk_rows`] rows at a time.
    fn head_logprobs(
        &self,
        h: &[f32],
        positions: &[usize],
        targets: &[usize],
        temperature: f32,
    ) -> Vec<f32> {
        assert_eq!(positions.len(), targets.len(), "one target per position");
        let chunk = crate::model::auto_chunk_rows(self.vocab);
        let mut out = Vec::with_capacity(positions.len());
        for (p, t) in positions.chunks(chunk).zip(targets.chunks(chunk)) {
            let logits = self.head_at(h, p);
            out.extend(fused::token_logprobs_host(
                &logits,
                self.vocab,
                t,
                temperature,
            ));
        }
        out
    }

    fn head_at(&self, h: &[f32], positions: &[usize]) -> Vec<f32> {
        let hd = self.hidden;
        assert!(
            positions.iter().all(|&p| (p + 1) * hd <= h.len()),
            "positions must lie inside batch·seq"
        );
        let mut picked = Vec::with_capacity(positions.len() * hd);
        for &p in positions {
            picked.extend_from_slice(&h[p * hd..(p + 1) * hd]);
        }
        let x = self.norm.apply(&picked);
        let mut logits = vec![0.0; positions.len() * self.vocab];
        self.lm_head.matmul(&mut logits, &x, positions.len(), false);
        logits
    }
}

/// A layer's host copy; `residual` (Granite's `residual_multiplier`) scales the output of the
/// attention's and the FFN's last projection.
fn host_layer(l: &DecoderLayer, hidden: usize, residual: f32, form: LatentForm) -> HostLayer {
    HostLayer {
        input_norm: HostNorm::new(&l.input_layernorm),
        attn: match &l.self_attn.latent {
            Some(lat) => HostAttn::Latent(host_latent(&l.self_attn, lat, residual, form)),
            None => HostAttn::Standard(host_attention(&l.self_attn, residual)),
        },
        post_norm: HostNorm::new(&l.post_attention_layernorm),
        ffn: match &l.mlp {
            Ffn::Dense(m) => HostFfn::Dense(HostMlp::new(m).scaled(residual)),
            Ffn::Sparse(m) => HostFfn::Sparse(host_moe(m, hidden, residual)),
        },
    }
}

fn host_attention(a: &Attention, residual: f32) -> HostAttention {
    HostAttention {
        q: HostProj::new(&a.q_proj),
        k: HostProj::new(&a.k_proj),
        v: HostProj::new(&a.v_proj),
        o: HostProj::new(&a.o_proj).scaled(residual),
        scale: a.softmax_scale as f32,
        q_norm: a.q_norm.as_ref().map(HostNorm::new),
        k_norm: a.k_norm.as_ref().map(HostNorm::new),
        over_projection: a.qk_norm_over_projection,
        clip: a.clip_qkv.map(|c| c as f32),
        heads: a.num_heads,
        kv_heads: a.num_kv_heads,
        head_dim: a.head_dim,
    }
}

/// An MLA layer's host copy: `kv_b_proj` split per head into `W_UK_hᵀ` and `W_UV_h`, the RoPE
/// columns of the query and `k_pe` de-interleaved when the model interleaves them.
fn host_latent(
    a: &Attention,
    lat: &LatentAttention,
    residual: f32,
    form: LatentForm,
) -> HostLatent {
    let (nh, r, nope, rope, vd) = (
        a.num_heads,
        lat.kv_lora_rank,
        lat.qk_nope_head_dim,
        lat.qk_rope_head_dim,
        lat.v_head_dim,
    );
    let qk = nope + rope;
    // Interleaved pairs (x0, x1), (x2, x3), … → [x0, x2, …, x1, x3, …] (rotate-half layout).
    let rope_order: Vec<usize> = if lat.rope_interleave {
        (0..rope / 2)
            .map(|k| 2 * k)
            .chain((0..rope / 2).map(|k| 2 * k + 1))
            .collect()
    } else {
        (0..rope).collect()
    };
    let q_order: Vec<usize> = (0..nh)
        .flat_map(|h| {
            (0..nope)
                .map(move |c| h * qk + c)
                .chain(rope_order.iter().map(move |&k| h * qk + nope + k))
        })
        .collect();
    let kv_order: Vec<usize> = (0..r).chain(rope_order.iter().map(|&k| r + k)).collect();
    let kv_b = host(a.v_proj.merged_weight()); // [r, nh · (nope + vd)]
    let cols = nh * (nope + vd);
    let uk_t = (0..nh)
        .map(|h| {
            let mut m = Vec::with_capacity(nope * r);
            for c in 0..nope {
                m.extend((0..r).map(|i| kv_b[i * cols + h * (nope + vd) + c]));
            }
            m
        })
        .collect();
    let uv = (0..nh)
        .map(|h| {
            let mut m = Vec::with_capacity(r * vd);
            for i in 0..r {
                let at = i * cols + h * (nope + vd) + nope;
                m.extend_from_slice(&kv_b[at..at + vd]);
            }
            m
        })
        .collect();
    HostLatent {
        q_a: lat
            .q_a_proj
            .as_ref()
            .zip(lat.q_a_layernorm.as_ref())
            .map(|(p, n)| (HostProj::new(p), HostNorm::new(n))),
        q: HostProj::reordered(&a.q_proj, &q_order),
        kv_a: HostProj::reordered(&a.k_proj, &kv_order),
        kv_norm: HostNorm::new(&lat.kv_a_layernorm),
        uk_t,
        uv,
        kv_b: Weight::new(&kv_b, r, cols),
        o: HostProj::new(&a.o_proj).scaled(residual),
        heads: nh,
        rank: r,
        nope,
        rope,
        v_dim: vd,
        scale: a.softmax_scale as f32,
        form,
    }
}

fn host_moe(m: &MoeBlock, hidden: usize, residual: f32) -> HostMoe {
    let [e, _, two_i] = m.experts_gate_up.val().dims();
    let gate_up = host(m.experts_gate_up.val());
    let down = host(m.experts_down.val());
    let (gu, dn) = (hidden * two_i, two_i / 2 * hidden);
    // Experts of a base stored in bf16 keep bf16 panels (exactly their values, unscaled).
    let bf16 = m.experts_gate_up.val().dtype() == burn::tensor::DType::BF16 && residual == 1.0;
    HostMoe {
        router: weight(m.router.val()),
        experts: (0..e)
            .map(|ex| {
                let mut mlp = HostMlp::from_parts(
                    &gate_up[ex * gu..(ex + 1) * gu],
                    &down[ex * dn..(ex + 1) * dn],
                    hidden,
                )
                .scaled(residual);
                if bf16 {
                    mlp.weights().into_iter().for_each(Weight::store_bf16);
                }
                mlp
            })
            .collect(),
        shared: m
            .shared_expert
            .as_ref()
            .map(|s| HostMlp::new(s).scaled(residual)),
        shared_gate: m.shared_expert_gate.as_ref().map(|g| host(g.val())),
        bias: m.expert_bias.clone(),
        top_k: m.top_k,
        norm_topk_prob: m.norm_topk_prob,
        scoring: m.scoring,
        routed_scaling_factor: m.routed_scaling_factor as f32,
        group_limit: m.group_limit,
    }
}

fn add(h: &mut [f32], y: &[f32]) {
    h.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn clamp(x: &mut [f32], c: Option<f32>) {
    if let Some(c) = c {
        x.iter_mut().for_each(|v| *v = v.clamp(-c, c));
    }
}

impl HostAttention {
    /// `h += o_proj(attention(x))` for `[b, s]` new tokens `x: [b·s, hidden]`, writing their keys
    /// and values into layer `li` of `cache` (whose `len` is the past length).
    fn apply(
        &self,
        h: &mut [f32],
        x: &[f32],
        [b, s]: [usize; 2],
        (cos, sin): &(Vec<f32>, Vec<f32>),
        cache: &mut HostKvCache,
        li: usize,
    ) {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let t = b * s;
        // OLMoE's order: project → norm over the whole projection → clamp → heads;
        // Qwen3's: project → clamp → heads → norm each head → RoPE.
        let project = |proj: &HostProj, norm: Option<&HostNorm>, heads: usize, rope: bool| {
            let mut y = vec![0.0; t * proj.w.cols];
            proj.apply(&mut y, x, t, false);
            if let Some(n) = norm.filter(|_| self.over_projection) {
                y = n.apply(&y);
            }
            clamp(&mut y, self.clip);
            if let Some(n) = norm.filter(|_| !self.over_projection) {
                y = n.apply(&y);
            }
            if rope {
                y = kernels::rope(&y, cos, sin, heads, d);
            }
            y // [t, heads, d]
        };
        let q = project(&self.q, self.q_norm.as_ref(), nh, true);
        let k = project(&self.k, self.k_norm.as_ref(), nkv, true);
        let v = project(&self.v, None, nkv, false);

        let (cap, past) = (cache.capacity, cache.len);
        let (kc, vc) = (&mut cache.keys[li], &mut cache.values[li]);
        for row in 0..b {
            for i in 0..s {
                let tok = row * s + i;
                for g in 0..nkv {
                    let block = (row * nkv + g) * cap * d;
                    let from = (tok * nkv + g) * d;
                    let at = block + (past + i) * d;
                    vc[at..at + d].copy_from_slice(&v[from..from + d]);
                    let kt = &mut kc[block + past + i..];
                    for (dd, &x) in k[from..from + d].iter().enumerate() {
                        kt[dd * cap] = x;
                    }
                }
            }
        }

        if let Some((prefix, of_row)) = &cache.prefix {
            let own = (kc.as_slice(), vc.as_slice(), cache.key_valid.as_slice());
            let out = self.attend_after_prefix(&q, [b, s], own, [cap, past], prefix, li, of_row);
            self.o.apply(h, &out, t, true);
            return;
        }

        // Per row and head: scores = q · kᵀ (one GEMM over the row's new tokens), masked
        // softmax in place, out = probs · v (a second GEMM, written into the head's columns).
        let keys = past + s;
        let scale = self.scale;
        let group = nh / nkv;
        let mut out = vec![0.0f32; t * nh * d];
        let mut p = vec![0.0f32; s.max(group) * keys];
        for row in 0..b {
            let valid = &cache.key_valid[row * cap..row * cap + keys];
            for g in 0..nkv {
                let block = (row * nkv + g) * cap * d;
                let (kt, vr) = (&kc[block..block + d * cap], &vc[block..block + keys * d]);
                if s == 1 {
                    // One query per head: vector loops beat a GEMM call's set-up at this size,
                    // and the heads that share this key/value head read it once.
                    let heads = (row * nh + g * group) * d..(row * nh + (g + 1) * group) * d;
                    let o = &mut out[heads.clone()];
                    attend_one(&q[heads], kt, cap, vr, valid, scale, &mut p, o);
                    continue;
                }
                let k_t = View {
                    data: kt,
                    rows: d,
                    cols: keys,
                    row_stride: cap,
                    col_stride: 1,
                };
                for head in g * group..(g + 1) * group {
                    let q_at = row * s * nh * d + head * d;
                    let q_view = View {
                        data: &q[q_at..],
                        rows: s,
                        cols: d,
                        row_stride: nh * d,
                        col_stride: 1,
                    };
                    gemm(&mut p, keys, q_view, k_t, false);
                    causal_softmax_rows(&mut p[..s * keys], valid, past, scale);
                    gemm(
                        &mut out[q_at..],
                        nh * d,
                        View::dense(&p[..s * keys], s, keys),
                        View::dense(vr, keys, d),
                        false,
                    );
                }
            }
        }
        self.o.apply(h, &out, t, true);
    }

    /// Attention of `[b, s]` new queries `q: [b·s, heads·d]` in a cache with a shared prefix
    /// ([`HostKvCache::share_prefix`]): over the prefix, one product per run of rows with the
    /// same prefix row and per key/value head (all their queries against the prefix's keys,
    /// read once), then each row's own keys (causal, `own = (keys, values, key_valid)` at
    /// `[cap, past]`) merged in by their running maximum and normaliser. → `[b·s, heads·d]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_after_prefix(
        &self,
        q: &[f32],
        [b, s]: [usize; 2],
        (kc, vc, own_valid): (&[f32], &[f32], &[bool]),
        [cap, past]: [usize; 2],
        prefix: &HostKvCache,
        li: usize,
        of_row: &[usize],
    ) -> Vec<f32> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let group = nh / nkv;
        let scale = self.scale;
        let (pcap, plen) = (prefix.capacity, prefix.len);
        // Per query (token, head): the softmax's running maximum and normaliser; `out` holds
        // the unnormalised sums Σ exp(score − max) · v until the end.
        let mut max = vec![f32::NEG_INFINITY; b * s * nh];
        let mut norm = vec![0.0f32; b * s * nh];
        let mut out = vec![0.0f32; b * s * nh * d];
        let mut start = 0;
        while start < b {
            let p = of_row[start];
            let end = start + of_row[start..].iter().take_while(|&&r| r == p).count();
            let valid = &prefix.key_valid[p * pcap..p * pcap + plen];
            // The run's queries of one key/value head, token-major: [n, d].
            let query_slots = |g: usize| {
                (start * s..end * s)
                    .flat_map(move |tok| (0..group).map(move |j| tok * nh + g * group + j))
            };
            for g in 0..nkv {
                let slots: Vec<usize> = query_slots(g).collect();
                let mut qg = Vec::with_capacity(slots.len() * d);
                for &slot in &slots {
                    qg.extend_from_slice(&q[slot * d..(slot + 1) * d]);
                }
                let block = (p * nkv + g) * pcap * d;
                let k_t = View {
                    data: &prefix.keys[li][block..block + d * pcap],
                    rows: d,
                    cols: plen,
                    row_stride: pcap,
                    col_stride: 1,
                };
                let mut probs = product(View::dense(&qg, slots.len(), d), k_t);
                for (row, &slot) in probs.chunks_exact_mut(plen.max(1)).zip(&slots) {
                    (max[slot], norm[slot]) = exp_scores(row, valid, scale);
                }
                let v = View::dense(&prefix.values[li][block..block + plen * d], plen, d);
                let o = product(View::dense(&probs, slots.len(), plen), v);
                for (orow, &slot) in o.chunks_exact(d).zip(&slots) {
                    out[slot * d..(slot + 1) * d].copy_from_slice(orow);
                }
            }
            start = end;
        }
        let mut scratch = vec![0.0f32; group * (past + s)];
        for row in 0..b {
            for i in 0..s {
                let tok = row * s + i;
                let open = &own_valid[row * cap..row * cap + past + i + 1];
                for g in 0..nkv {
                    let block = (row * nkv + g) * cap * d;
                    let heads = tok * nh + g * group..tok * nh + (g + 1) * group;
                    attend_more(
                        &q[heads.start * d..heads.end * d],
                        (
                            &kc[block..block + d * cap],
                            cap,
                            &vc[block..block + cap * d],
                        ),
                        open,
                        scale,
                        &mut scratch,
                        (&mut max[heads.clone()], &mut norm[heads.clone()]),
                        &mut out[heads.start * d..heads.end * d],
                    );
                }
            }
        }
        for (o, &n) in out.chunks_exact_mut(d).zip(&norm) {
            let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
            o.iter_mut().for_each(|v| *v *= inv);
        }
        out
    }
}

impl HostLatent {
    /// `h += o_proj(mla(x))` for `[b, s]` new tokens `x: [b·s, hidden]`, writing their latents
    /// into layer `li` of `cache` (whose `len` is the past length).
    fn apply(
        &self,
        h: &mut [f32],
        x: &[f32],
        [b, s]: [usize; 2],
        (cos, sin): &(Vec<f32>, Vec<f32>),
        cache: &mut HostKvCache,
        li: usize,
    ) {
        let (nh, r, nope, rope) = (self.heads, self.rank, self.nope, self.rope);
        let (qk, w, t) = (nope + rope, r + rope, b * s);
        let mut q = vec![0.0; t * nh * qk];
        match &self.q_a {
            Some((a, norm)) => {
                let mut y = vec![0.0; t * a.w.cols];
                a.apply(&mut y, x, t, false);
                self.q.apply(&mut q, &norm.apply(&y), t, false);
            }
            None => self.q.apply(&mut q, x, t, false),
        }
        let mut q_pe = Vec::with_capacity(t * nh * rope);
        for head in q.chunks_exact(qk) {
            q_pe.extend_from_slice(&head[nope..]);
        }
        let q_pe = kernels::rope(&q_pe, cos, sin, nh, rope); // [t, nh, rope]

        // The new tokens' latent rows: [norm(c), rope(k_pe)].
        let mut ckv = vec![0.0; t * w];
        self.kv_a.apply(&mut ckv, x, t, false);
        let (mut c, mut k_pe) = (Vec::with_capacity(t * r), Vec::with_capacity(t * rope));
        for row in ckv.chunks_exact(w) {
            c.extend_from_slice(&row[..r]);
            k_pe.extend_from_slice(&row[r..]);
        }
        let c = self.kv_norm.apply(&c);
        let k_pe = kernels::rope(&k_pe, cos, sin, 1, rope);
        let (cap, past) = (cache.capacity, cache.len);
        let lc = &mut cache.keys[li];
        for tok in 0..t {
            let at = ((tok / s) * cap + past + tok % s) * w;
            lc[at..at + r].copy_from_slice(&c[tok * r..(tok + 1) * r]);
            lc[at + r..at + w].copy_from_slice(&k_pe[tok * rope..(tok + 1) * rope]);
        }
        let out = match self.form {
            LatentForm::Absorbed => self.absorbed(&q, &q_pe, [b, s], cache, li),
            LatentForm::Expanded => self.expanded(&q, &q_pe, [b, s], cache, li),
        };
        self.o.apply(h, &out, t, true);
    }

    /// The absorbed form: queries `[q_nope_h · W_UK_hᵀ, q_pe_h]` attend over the latent rows
    /// (a shared prefix's first, one product per run of rows continuing the same prefix row,
    /// then each row's own, merged by their running softmax maxima and normalisers), then
    /// `W_UV_h` maps each head's weighted sum of latents to its values. → `[b·s, heads·v_dim]`
    fn absorbed(
        &self,
        q: &[f32],
        q_pe: &[f32],
        [b, s]: [usize; 2],
        cache: &HostKvCache,
        li: usize,
    ) -> Vec<f32> {
        let (nh, r, nope, rope, vd) = (self.heads, self.rank, self.nope, self.rope, self.v_dim);
        let (qk, w, t) = (nope + rope, r + rope, b * s);
        // [t, nh, w]: each head's absorbed query.
        let mut qa = vec![0.0f32; t * nh * w];
        for head in 0..nh {
            let q_nope = View {
                data: &q[head * qk..],
                rows: t,
                cols: nope,
                row_stride: nh * qk,
                col_stride: 1,
            };
            let uk_t = View::dense(&self.uk_t[head], nope, r);
            gemm(&mut qa[head * w..], nh * w, q_nope, uk_t, false);
        }
        for (row, pe) in qa.chunks_exact_mut(w).zip(q_pe.chunks_exact(rope)) {
            row[r..].copy_from_slice(pe);
        }
        let mut max = vec![f32::NEG_INFINITY; t * nh];
        let mut norm = vec![0.0f32; t * nh];
        let mut sums = vec![0.0f32; t * nh * r];
        let state = |lo: usize, hi: usize| lo * s * nh..hi * s * nh;
        if let Some((prefix, of_row)) = &cache.prefix {
            let (pcap, plen) = (prefix.capacity, prefix.len);
            let mut start = 0;
            while start < b {
                let p = of_row[start];
                let end = start + of_row[start..].iter().take_while(|&&x| x == p).count();
                let valid = &prefix.key_valid[p * pcap..p * pcap + plen];
                let rows = state(start, end);
                fold_latents(
                    &qa[rows.start * w..rows.end * w],
                    (&prefix.keys[li][p * pcap * w..(p * pcap + plen) * w], r),
                    |_, j| valid[j],
                    self.scale,
                    (&mut max[rows.clone()], &mut norm[rows.clone()]),
                    &mut sums[rows.start * r..rows.end * r],
                );
                start = end;
            }
        }
        let (cap, past) = (cache.capacity, cache.len);
        for row in 0..b {
            let valid = &cache.key_valid[row * cap..row * cap + past + s];
            let rows = state(row, row + 1);
            fold_latents(
                &qa[rows.start * w..rows.end * w],
                (
                    &cache.keys[li][row * cap * w..(row * cap + past + s) * w],
                    r,
                ),
                |query, j| j <= past + query / nh && valid[j],
                self.scale,
                (&mut max[rows.clone()], &mut norm[rows.clone()]),
                &mut sums[rows.start * r..rows.end * r],
            );
        }
        for (o, &n) in sums.chunks_exact_mut(r).zip(&norm) {
            let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
            o.iter_mut().for_each(|v| *v *= inv);
        }
        let mut out = vec![0.0f32; t * nh * vd];
        for head in 0..nh {
            let o_latent = View {
                data: &sums[head * r..],
                rows: t,
                cols: r,
                row_stride: nh * r,
                col_stride: 1,
            };
            let uv = View::dense(&self.uv[head], r, vd);
            gemm(&mut out[head * vd..], nh * vd, o_latent, uv, false);
        }
        out
    }

    /// The expanded form (the reference): each row's latents (a shared prefix's, then its own)
    /// through `kv_b_proj` into every head's `k_nope` and value, keys `[k_nope, k_pe]`, then a
    /// masked softmax per query and head. → `[b·s, heads·v_dim]`
    fn expanded(
        &self,
        q: &[f32],
        q_pe: &[f32],
        [b, s]: [usize; 2],
        cache: &HostKvCache,
        li: usize,
    ) -> Vec<f32> {
        let (nh, r, nope, rope, vd) = (self.heads, self.rank, self.nope, self.rope, self.v_dim);
        let (qk, w, kv_w) = (nope + rope, r + rope, nope + vd);
        let (cap, past) = (cache.capacity, cache.len);
        let mut out = vec![0.0f32; b * s * nh * vd];
        for row in 0..b {
            let (mut latents, mut valid) = (Vec::new(), Vec::new());
            if let Some((p, of_row)) = &cache.prefix {
                let pr = of_row[row];
                latents.extend_from_slice(&p.keys[li][pr * p.capacity * w..][..p.len * w]);
                valid.extend_from_slice(&p.key_valid[pr * p.capacity..][..p.len]);
            }
            let own_start = valid.len();
            latents.extend_from_slice(&cache.keys[li][row * cap * w..][..(past + s) * w]);
            valid.extend_from_slice(&cache.key_valid[row * cap..][..past + s]);
            let keys = valid.len();
            let c: Vec<f32> = latents
                .chunks_exact(w)
                .flat_map(|l| &l[..r])
                .copied()
                .collect();
            let mut kv = vec![0.0f32; keys * nh * kv_w];
            self.kv_b.matmul(&mut kv, &c, keys, false);
            let mut p = vec![0.0f32; keys];
            for i in 0..s {
                let tok = row * s + i;
                let open: Vec<bool> = (0..keys)
                    .map(|j| valid[j] && j <= own_start + past + i)
                    .collect();
                for head in 0..nh {
                    let qn = &q[(tok * nh + head) * qk..][..nope];
                    let qp = &q_pe[(tok * nh + head) * rope..][..rope];
                    for (j, pj) in p.iter_mut().enumerate() {
                        let kn = &kv[(j * nh + head) * kv_w..][..nope];
                        let kp = &latents[j * w + r..][..rope];
                        *pj = kernels::dot(qn, kn) + kernels::dot(qp, kp);
                    }
                    masked_softmax_row(&mut p, &open, self.scale);
                    let o = &mut out[(tok * nh + head) * vd..][..vd];
                    for (j, &pj) in p.iter().enumerate() {
                        let v = &kv[(j * nh + head) * kv_w + nope..][..vd];
                        o.iter_mut().zip(v).for_each(|(a, &x)| *a += pj * x);
                    }
                }
            }
        }
        out
    }
}

/// Folds latent rows `lat: [keys, w]` (`w` = `rank` + RoPE width; each row's first `rank`
/// entries are the value) into the running softmax of the absorbed query rows `q: [m, w]`:
/// scores `q · lᵀ · scale` over the keys `open(query, key)` allows, then, per query, the old
/// `(max, norm)` and unnormalised `sums: [m, rank]` rescaled to the new maximum and the new
/// keys' `exp(score − max)`-weighted latents added (online softmax). A query with no open key
/// keeps its state.
fn fold_latents(
    q: &[f32],
    (lat, rank): (&[f32], usize),
    open: impl Fn(usize, usize) -> bool,
    scale: f32,
    (max, norm): (&mut [f32], &mut [f32]),
    sums: &mut [f32],
) {
    let m = max.len();
    let w = q.len() / m.max(1);
    let keys = lat.len() / w.max(1);
    if keys == 0 || m == 0 {
        return;
    }
    let mut p = product(View::dense(q, m, w), View::dense(lat, keys, w).t()); // [m, keys]
    for (query, row) in p.chunks_exact_mut(keys).enumerate() {
        let mut row_max = f32::NEG_INFINITY;
        for (j, x) in row.iter_mut().enumerate() {
            *x *= scale;
            if open(query, j) {
                row_max = row_max.max(*x);
            }
        }
        if row_max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let new_max = max[query].max(row_max);
        let old = if max[query] == f32::NEG_INFINITY {
            0.0
        } else {
            kernels::exp(max[query] - new_max)
        };
        let mut sum = 0.0;
        for (j, x) in row.iter_mut().enumerate() {
            *x = if open(query, j) {
                kernels::exp(*x - new_max)
            } else {
                0.0
            };
            sum += *x;
        }
        norm[query] = norm[query] * old + sum;
        max[query] = new_max;
        sums[query * rank..(query + 1) * rank]
            .iter_mut()
            .for_each(|v| *v *= old);
    }
    let values = View {
        data: lat,
        rows: keys,
        cols: rank,
        row_stride: w,
        col_stride: 1,
    };
    gemm(sums, rank, View::dense(&p, m, keys), values, true);
}

/// `scores · scale`, replaced in place by `exp(score − max)` over the open keys (`open[j]`) and
/// 0 elsewhere; → `(max, Σ exp)` (`(-inf, 0)` when no key is open).
#[inline(always)]
fn exp_scores(scores: &mut [f32], open: &[bool], scale: f32) -> (f32, f32) {
    let mut max = f32::NEG_INFINITY;
    for (x, &o) in scores.iter_mut().zip(open) {
        *x *= scale;
        if o {
            max = max.max(*x);
        }
    }
    if max == f32::NEG_INFINITY {
        scores.fill(0.0);
        return (max, 0.0);
    }
    for (x, &o) in scores.iter_mut().zip(open) {
        *x = if o { kernels::exp(*x - max) } else { 0.0 };
    }
    (max, scores.iter().sum())
}

/// Folds more keys into a running softmax-weighted sum, for the heads of a group that share
/// them: for each head `h`, with scores `q_h · kᵀ · scale` over the open keys, the running
/// `(max, norm)` and unnormalised `out_h` become those of all keys so far (online softmax:
/// the old sums are rescaled by `exp(old max − new max)`). `q`, `out`: `[heads, d]`;
/// keys transposed `[d, cap]` (the first `open.len()` columns used), values `[cap, d]`;
/// `scratch`: room for `[heads, keys]`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn attend_more(
    q: &[f32],
    (k_t, cap, v): (&[f32], usize, &[f32]),
    open: &[bool],
    scale: f32,
    scratch: &mut [f32],
    (max, norm): (&mut [f32], &mut [f32]),
    out: &mut [f32],
) {
    let keys = open.len();
    let d = q.len() / max.len().max(1);
    for (h, (qh, ph)) in q
        .chunks_exact(d)
        .zip(scratch.chunks_exact_mut(keys))
        .enumerate()
    {
        key_scores(qh, k_t, cap, ph);
        let (m, n) = exp_scores(ph, open, scale);
        if m == f32::NEG_INFINITY {
            continue; // no open key: nothing to fold in, `ph` is all zero
        }
        let new_max = max[h].max(m);
        let (old, this) = (
            if max[h] == f32::NEG_INFINITY {
                0.0
            } else {
                kernels::exp(max[h] - new_max)
            },
            kernels::exp(m - new_max),
        );
        norm[h] = norm[h] * old + n * this;
        max[h] = new_max;
        let oh = &mut out[h * d..(h + 1) * d];
        oh.iter_mut().for_each(|o| *o *= old);
        ph.iter_mut().for_each(|p| *p *= this);
    }
    weighted_values(&scratch[..max.len() * keys], v, d, out);
}

/// Softmax of `scores · scale` over the open keys in place: key `j` is open when `j <
/// open.len()` (causal) and `open[j]` (not padding); closed keys get 0. A query with no open
/// key (left padding) gets an all-zero row, so it outputs 0, as the reference's `empty_rows`
/// makes it.
#[inline(always)]
fn masked_softmax_row(scores: &mut [f32], open: &[bool], scale: f32) {
    let (live, closed) = scores.split_at_mut(open.len());
    closed.fill(0.0);
    let (_, sum) = exp_scores(live, open, scale);
    if sum > 0.0 {
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|v| *v *= inv);
    }
}

/// [`masked_softmax_row`] on each row `i` of `scores: [rows, keys]`, the query at column
/// `past + i`: keys up to its own column, those open in `valid` (compiled for AVX2 as well:
/// the caller is not, and the softmax's `exp` vectorises only there).
#[multiversion(targets("x86_64+avx2+fma"))]
fn causal_softmax_rows(scores: &mut [f32], valid: &[bool], past: usize, scale: f32) {
    let keys = valid.len();
    for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
        masked_softmax_row(row, &valid[..=past + i], scale);
    }
}

/// One query per head of a group that shares keys and values: for each head `h`,
/// `out_h += softmax(q_h · kᵀ · scale) · v`, with `open` as in [`masked_softmax_row`].
/// `q`, `out`: `[heads, d]`; `k_t`: `[d, cap]` (transposed, the first `open.len()` columns
/// used); `v`: `[keys, d]`; `probs`: room for `[heads, keys]`.
#[multiversion(targets("x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn attend_one(
    q: &[f32],
    k_t: &[f32],
    cap: usize,
    v: &[f32],
    open: &[bool],
    scale: f32,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let keys = open.len();
    let d = v.len() / keys.max(1);
    let heads = q.len() / d.max(1);
    for (qh, ph) in q.chunks_exact(d).zip(probs.chunks_exact_mut(keys)) {
        key_scores(qh, k_t, cap, ph);
        masked_softmax_row(ph, open, scale);
    }
    weighted_values(&probs[..heads * keys], v, d, out);
}

/// `scores[j] = q · k_j` for the keys `j < scores.len()` of `k_t: [d, cap]` (keys
/// transposed), each a sum over `d` in order.
///
/// The sums run in registers, a block of keys at a time, and `scores` is written once: a
/// loop that added each dimension's products into `scores` in memory loaded and stored it
/// `d` times, a chain of store-to-load round trips that bounded a decode step's attention.
/// A block of 8 may read columns past the last key (up to `cap`, never beyond: the same
/// rows of the same cache) and drops those lanes.
#[inline(always)]
fn key_scores(q: &[f32], k_t: &[f32], cap: usize, scores: &mut [f32]) {
    let keys = scores.len();
    let mut j = 0;
    while j + 64 <= keys {
        key_block::<64>(q, k_t, cap, j, &mut scores[j..j + 64]);
        j += 64;
    }
    while j + 16 <= keys {
        key_block::<16>(q, k_t, cap, j, &mut scores[j..j + 16]);
        j += 16;
    }
    while j < keys {
        if j + 8 <= cap {
            let mut block = [0.0f32; 8];
            key_block::<8>(q, k_t, cap, j, &mut block);
            let n = (keys - j).min(8);
            scores[j..j + n].copy_from_slice(&block[..n]);
            j += n;
        } else {
            key_block::<1>(q, k_t, cap, j, &mut scores[j..j + 1]);
            j += 1;
        }
    }
}

/// `out[..W] = q · k_j` for the `W` keys from column `j` of `k_t: [d, cap]`; the
/// accumulators are a fixed-size array, so that they live in vector registers.
#[inline(always)]
fn key_block<const W: usize>(q: &[f32], k_t: &[f32], cap: usize, j: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; W];
    for (dd, &qd) in q.iter().enumerate() {
        let k = &k_t[dd * cap + j..dd * cap + j + W];
        for (a, &x) in acc.iter_mut().zip(k) {
            *a += qd * x;
        }
    }
    out[..W].copy_from_slice(&acc);
}

/// `out_h += Σ_j probs[h, j] · v_j` for each head `h` of `out: [heads, d]`, with `probs:
/// [heads, keys]` and `v: [≥ keys, d]`: per element a sum over the keys in order, run in
/// registers for a block of columns at a time (as in [`key_scores`], and for its reason).
#[inline(always)]
fn weighted_values(probs: &[f32], v: &[f32], d: usize, out: &mut [f32]) {
    let heads = out.len() / d.max(1);
    let keys = probs.len() / heads.max(1);
    for (ph, oh) in probs
        .chunks_exact(keys.max(1))
        .zip(out.chunks_exact_mut(d.max(1)))
    {
        let mut c = 0;
        while c + 64 <= d {
            value_block::<64>(ph, v, d, c, &mut oh[c..c + 64]);
            c += 64;
        }
        while c + 8 <= d {
            value_block::<8>(ph, v, d, c, &mut oh[c..c + 8]);
            c += 8;
        }
        while c < d {
            value_block::<1>(ph, v, d, c, &mut oh[c..c + 1]);
            c += 1;
        }
    }
}

/// `out[..W] += Σ_j p[j] · v[j, c..c + W]` for `v: [≥ p.len(), d]`.
#[inline(always)]
fn value_block<const W: usize>(p: &[f32], v: &[f32], d: usize, c: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; W];
    acc.copy_from_slice(&out[..W]);
    for (j, &pj) in p.iter().enumerate() {
        let x = &v[j * d + c..j * d + c + W];
        for (a, &xv) in acc.iter_mut().zip(x) {
            *a += pj * xv;
        }
    }
    out[..W].copy_from_slice(&acc);
}

impl HostMoe {
    /// `h += moe(x)` for `x: [tokens, hidden]`.
    fn apply(&self, h: &mut [f32], x: &[f32], hidden: usize) {
        let t = x.len() / hidden;
        let e = self.experts.len();
        let k = self.top_k;
        let mut scores = vec![0.0; t * e];
        self.router.matmul(&mut scores, x, t, false);
        for row in scores.chunks_exact_mut(e) {
            match self.scoring {
                ScoringFunc::Softmax => {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row.iter_mut().for_each(|v| *v = kernels::exp(*v - max));
                    let sum: f32 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = sigmoid(*v)),
            }
        }
        let chosen = match &self.bias {
            Some(bias) => {
                let biased: Vec<f32> = scores
                    .chunks_exact(e)
                    .flat_map(|r| r.iter().zip(bias).map(|(s, b)| s + b))
                    .collect();
                select_experts(&biased, e, k, self.group_limit)
            }
            None => select_experts(&scores, e, k, self.group_limit),
        };
        let mut weights: Vec<f32> = chosen
            .iter()
            .enumerate()
            .map(|(slot, &ex)| scores[slot / k * e + ex])
            .collect();
        for w in weights.chunks_exact_mut(k) {
            if self.norm_topk_prob {
                let sum: f32 = w.iter().sum();
                let denom = match self.scoring {
                    ScoringFunc::Softmax => sum,
                    ScoringFunc::Sigmoid => sum + 1e-20,
                };
                w.iter_mut().for_each(|v| *v /= denom);
            }
            w.iter_mut().for_each(|v| *v *= self.routed_scaling_factor);
        }

        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); e];
        for (slot, &ex) in chosen.iter().enumerate() {
            by_expert[ex].push(slot);
        }
        let mut xs = Vec::new();
        for (expert, slots) in self.experts.iter().zip(&by_expert) {
            if slots.is_empty() {
                continue;
            }
            xs.clear();
            for &slot in slots {
                let tok = slot / k;
                xs.extend_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
            }
            let y = expert.apply(&xs, slots.len());
            for (&slot, yr) in slots.iter().zip(y.chunks_exact(hidden)) {
                let (tok, w) = (slot / k, weights[slot]);
                let hr = &mut h[tok * hidden..(tok + 1) * hidden];
                hr.iter_mut().zip(yr).for_each(|(a, &v)| *a += w * v);
            }
        }
        if let Some(shared) = &self.shared {
            let y = shared.apply(x, t);
            for ((hr, yr), xr) in h
                .chunks_exact_mut(hidden)
                .zip(y.chunks_exact(hidden))
                .zip(x.chunks_exact(hidden))
            {
                let gate = self
                    .shared_gate
                    .as_ref()
                    .map_or(1.0, |g| sigmoid(kernels::dot(xr, g)));
                hr.iter_mut().zip(yr).for_each(|(a, &v)| *a += gate * v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PANEL, Weight, key_scores, weighted_values};
    use crate::matmul::tests::values;

    /// The decode attention's register-blocked loops against the plain ones they replaced
    /// (each score summed over `d` in order into memory, each output element over the keys in
    /// order): the same additions in the same order, so equal bit for bit. Key counts cover
    /// every block size and tail (64, 16, 8 and single keys), capacities that are and are
    /// not multiples of 8 (a tail block may then read up to, never past, the capacity), head
    /// sizes that are and are not multiples of the 64- and 8-wide column blocks.
    #[test]
    fn attention_blocks_equal_the_plain_loops() {
        for d in [8, 13, 64, 72] {
            for cap in [13, 64, 70, 71, 131] {
                let k_t = values(d * cap, d + cap);
                let v = values(cap * d, 2 * d + cap);
                for keys in [1, 7, 8, 9, 16, 23, 64, 65, 70, 71, 99, 131] {
                    if keys > cap {
                        continue;
                    }
                    let heads = 2;
                    let q = values(heads * d, keys);
                    let mut got = vec![0.0f32; heads * keys];
                    let mut want = vec![0.0f32; heads * keys];
                    for h in 0..heads {
                        let qh = &q[h * d..(h + 1) * d];
                        key_scores(qh, &k_t, cap, &mut got[h * keys..(h + 1) * keys]);
                        let ph = &mut want[h * keys..(h + 1) * keys];
                        for (dd, &qd) in qh.iter().enumerate() {
                            for (j, p) in ph.iter_mut().enumerate() {
                                *p += qd * k_t[dd * cap + j];
                            }
                        }
                    }
                    assert_eq!(got, want, "scores, d {d}, cap {cap}, keys {keys}");
                    let start = values(heads * d, 3);
                    let (mut got, mut want) = (start.clone(), start);
                    let probs = values(heads * keys, 5);
                    weighted_values(&probs, &v, d, &mut got);
                    for j in 0..keys {
                        for h in 0..heads {
                            let pj = probs[h * keys + j];
                            for x in 0..d {
                                want[h * d + x] += pj * v[j * d + x];
                            }
                        }
                    }
                    assert_eq!(got, want, "values, d {d}, cap {cap}, keys {keys}");
                }
            }
        }
    }

    /// The panelled product against the textbook triple loop (in `f64`), on widths that leave
    /// a partial panel (37 = 2·16 + 5), one narrower than a panel (5) and exact multiples,
    /// and on more rows than one row block (200 = 2·96 + 8); with and without accumulation.
    /// Relative 1e-6: only the summation order differs.
    #[test]
    fn panelled_weight_matmul_equals_the_plain_product() {
        for (m, rows, cols) in [
            (3, 7, 37),
            (1, 16, 5),
            (9, 33, 2 * PANEL),
            (2, 1, 17),
            (200, 33, 37),
        ] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let x: Vec<f32> = (0..m * rows)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
                .collect();
            let packed = Weight::new(&w, rows, cols);
            for accumulate in [false, true] {
                let mut c = vec![0.5f32; m * cols];
                packed.matmul(&mut c, &x, m, accumulate);
                for i in 0..m {
                    for j in 0..cols {
                        let dot: f64 = (0..rows)
                            .map(|r| x[i * rows + r] as f64 * w[r * cols + j] as f64)
                            .sum();
                        let want = dot + if accumulate { 0.5 } else { 0.0 };
                        let got = c[i * cols + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                            "[{m}, {rows}] · [{rows}, {cols}] at ({i}, {j}), accumulate \
                             {accumulate}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
