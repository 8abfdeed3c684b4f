//! Fused CPU kernels, each with a hand-written backward, for the layers that burn's eager `flex`
//! backend would otherwise run as chains of small tensor ops:
//!
//! | kernel | replaces (forward) |
//! |---|---|
//! | [`rms_norm`] | `square`, `mean_dim`, `add`, `sqrt`, `recip`, `mul`, `mul` |
//! | [`silu_mul`] | two `slice`s of the fused gate/up product, `sigmoid`, `mul`, `mul` |
//! | [`rope`] | two `slice`s, `cat`, `mul`, `mul`, `add` |
//! | [`attention`] | `swap_dims` and `reshape` copies of the queries and the output, two batched `matmul`s (a `swap_dims` of the keys), `mul` (scale), `add` (mask), the `max_dim`, `sub`, `exp`, `sum_dim`, `div` that burn's autodiff decomposes `softmax` into, and `mul` by the empty-row mask |
//! | [`moe_experts`] | `select` of the tokens' rows grouped by expert; per expert a slice of those rows, slices of the stacked weights, a SwiGLU; `cat`; `select` of the routing weights, `mul`, `select_assign` (add) into the tokens' rows |
//! | [`linear`] | `matmul` (burn-flex zero-fills its output, copies it to re-align it, and its backward multiplies transposed copies) |
//! | [`token_logprobs`] | `div` (temperature), and `log_softmax`'s `max_dim`, `sub`, `exp`, `sum_dim`, `log`, `sub`, then `gather` of the targets |
//! | [`head_logprobs`] | the LM head's `matmul` and then [`token_logprobs`], a chunk of rows at a time, so that the `[rows, vocab]` logits are never all alive (forward or backward) |
//!
//! Under autodiff every one of those ops is a graph node that allocates its output, keeps its
//! inputs alive and runs its own backward (a slice's backward zero-fills a tensor the size of
//! its input). Here each layer is one node that keeps what its backward needs and computes
//! the input gradient in one pass over the rows.
//!
//! The kernels are a burn backend extension implemented for `Flex` and `Autodiff<Flex>`: on
//! other backends (`tch`, `cuda`) [`available`] is false and the model runs its reference
//! composition of tensor ops (`model.rs`), which is also the slow path the kernels are tested
//! against, here (forward and gradients of each kernel) and in the model's tests (whole
//! forward and backward). All tensors are `f32`, as everywhere in sobre.
//!
//! The forward passes compute what the reference computes, in the same order where that is
//! cheap (RoPE and SwiGLU agree to the bit; RMSNorm's sum of squares and the softmax's sum may
//! add in another order); the backward passes are the analytic gradients, so they agree with
//! the reference's chain of op backwards to float rounding.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchDevice, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::{Bytes, DType, Shape};

use crate::matmul::{View, gemm, product};

/// Whether the fused kernels run on `device` (the `flex` CPU backend, with or without autodiff).
pub fn available(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// `x * rsqrt(mean(x²) + eps) * weight` over the last dimension.
///
/// # Shapes
/// `x: [..., h]`, `weight: [h]` → `[..., h]`
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rms_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        eps,
    ))
}

/// SwiGLU's activation on a fused gate/up product: `silu(gate) * up` with `gate` the first
/// half of the last dimension and `up` the second.
///
/// # Shapes
/// `h: [rows, 2·inter]` → `[rows, inter]`
pub fn silu_mul(h: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::silu_mul(
        h.into_dispatch(),
    ))
}

/// Rotate-half RoPE, `x * cos + swap_halves(x) * sin`, with `sin`'s first half already negated
/// (the sign of `rotate_half` folded into the table, as in `model.rs`). `cos` and `sin` are
/// constants: they get no gradient.
///
/// # Shapes
/// `x: [batch, seq, heads, head_dim]`, `cos`, `sin`: `[batch, 1, seq, head_dim]` → like `x`
pub fn rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// Grouped-query attention as one op: query head `h` attends with key/value head
/// `h / (heads / kv_heads)`, probabilities `softmax(q · kᵀ · scale + mask)` over the keys
/// (the additive mask, `0` or `-inf`, shared by every head), rows whose query has no key to
/// attend to (`empty[row·seq + i]`; an empty vector when there are none) all zero. Per batch
/// row and head: one GEMM for the scores, the softmax in place, one GEMM written straight into
/// the head's columns of the output, which comes out `[tokens, heads·head_dim]`, the layout
/// the output projection takes. The reference (`model.rs`) swaps `q` to heads-major, runs
/// batched matmuls and reshapes back: copies, zero-filled outputs and, under autodiff, a graph
/// node for each of them. `mask` and `empty` are constants: they get no gradient.
///
/// Values may be narrower or wider than queries and keys (MLA's `v_head_dim`).
///
/// # Shapes
/// `q: [batch, seq, heads, head_dim]`, `k: [batch, kv_heads, keys, head_dim]`,
/// `v: [batch, kv_heads, keys, v_dim]`, `mask: [batch, 1, seq, keys]`, `empty: [batch·seq]` or
/// `[]` → `[batch·seq, heads·v_dim]`
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4>,
    empty: Vec<bool>,
    scale: f64,
) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
        empty,
        scale,
    ))
}

/// The routed experts of a MoE layer as one op, dispatch and combine included: row `t` of the
/// result is `Σ_j weights[t, j] · swiglu_e(x[t])` with `e = chosen[t·k + j]`. The op groups the
/// (token, j) slots by expert, gathers each expert's rows into a scratch block, runs one matmul
/// chain per non-empty expert (as the reference's per-expert `swiglu` calls) and adds each
/// output row, scaled by its weight, into its token's row. The backward writes each expert's
/// weight gradient straight into one `[num_experts, …]` tensor and adds the input gradient row
/// by row, where the reference's `select`, `mul` and `select_assign` are graph nodes whose
/// backwards allocate, zero-fill and scatter (about 4% of the W1 policy update's samples).
///
/// # Shapes
/// `x: [tokens, hidden]`, `weights: [tokens, k]`, `chosen: [tokens·k]` (expert indices),
/// `gate_up: [num_experts, hidden, 2·inter]`, `down: [num_experts, inter, hidden]` →
/// `[tokens, hidden]`
pub fn moe_experts(
    x: Tensor<2>,
    weights: Tensor<2>,
    gate_up: Tensor<3>,
    down: Tensor<3>,
    chosen: Vec<usize>,
) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::moe_experts(
        x.into_dispatch(),
        weights.into_dispatch(),
        gate_up.into_dispatch(),
        down.into_dispatch(),
        chosen,
    ))
}

/// `x · w`, one node whose forward and backward (`dx = dy · wᵀ`, `dw = xᵀ · dy`) call gemm
/// on the tensors' own buffers, transposes as strides (`matmul.rs`).
///
/// # Shapes
/// `x: [rows, in]`, `w: [in, out]` → `[rows, out]`
pub fn linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::linear(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// `log softmax(logits · inv_temp)` at each row's target: the policy's token log-probabilities.
/// One pass over each row forward (its maximum, then `Σ exp` and the target's logit), keeping
/// only the row's log-normaliser; the backward, `d logits = g · inv_temp · (onehot − p)`,
/// recomputes `p` from the logits in one more pass. The reference's chain of tensor ops keeps
/// and allocates several `[rows, vocab]` tensors, and its backward as many again. `targets` are
/// constants.
///
/// # Shapes
/// `logits: [rows, vocab]`, `targets: [rows]` (each `< vocab`) → `[rows]`
pub fn token_logprobs(logits: Tensor<2>, targets: Vec<usize>, inv_temp: f64) -> Tensor<1> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::token_logprobs(
        logits.into_dispatch(),
        targets,
        inv_temp,
    ))
}

/// [`token_logprobs`] on host buffers, for a model that is not being trained (the frozen
/// reference on the host engine): the same kernel, no graph. Temperature as in sampling (0 or
/// 1: untempered).
///
/// # Shapes
/// `logits: [rows · vocab]`, `targets: [rows]` (each `< vocab`) → `[rows]`
pub fn token_logprobs_host(
    logits: &[f32],
    vocab: usize,
    targets: &[usize],
    temperature: f32,
) -> Vec<f32> {
    kernels::token_logprobs(logits, vocab, targets, inverse_temperature(temperature)).0
}

/// The LM head and [`token_logprobs`] in one op, `chunk_rows` rows at a time: row `i` of the
/// result is `log softmax(scale · h_i · W)` at `targets[i]` (row 0) and that distribution's
/// entropy (row 1, a constant: it receives no gradient). `W` is `w: [hidden, vocab]`, or with
/// `tied` the embedding matrix `w: [vocab, hidden]` read transposed (no copy).
///
/// Only one chunk's `[chunk_rows, vocab]` logits exist at a time. When every row fits in one
/// chunk, the op keeps that chunk's logits for the backward, as [`token_logprobs`] does;
/// otherwise the backward recomputes each chunk's logits from `h` and `W` (one more GEMM
/// of the head's size, Liger's and TRL's chunked losses' trade): a GRPO batch of
/// 4,096 completion tokens over a 32k vocabulary holds 512 MB of logits at once unchunked,
/// and its backward as many again.
///
/// # Shapes
/// `h: [rows, hidden]` (after the final norm), `targets: [rows]` → `[2, rows]`
pub fn head_logprobs(
    h: Tensor<2>,
    w: Tensor<2>,
    targets: Vec<usize>,
    scale: f64,
    tied: bool,
    chunk_rows: usize,
) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::head_logprobs(
        h.into_dispatch(),
        w.into_dispatch(),
        HeadSpec {
            targets,
            scale: scale as f32,
            tied,
            chunk_rows: chunk_rows.max(1),
        },
    ))
}

/// A decoder layer as one graph node that keeps only its input and recomputes the layer in its
/// backward ([`crate::checkpoint`]): the layer's output `[batch · seq · hidden]`, followed (a
/// MoE layer with the balance loss) by its routing probabilities' sum `[experts]`. `anchor`, a
/// tracked parameter of the layer (`None`: it trains nothing), is the node's second parent.
pub(crate) fn recompute(
    h: Tensor<3>,
    anchor: Option<Tensor<1>>,
    segment: crate::checkpoint::Segment,
) -> Tensor<1> {
    let anchor = anchor.unwrap_or_else(|| Tensor::zeros([1], &h.device()));
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::recompute(
        h.into_dispatch(),
        anchor.into_dispatch(),
        segment,
    ))
}

/// The constant arguments of [`head_logprobs`].
#[derive(Debug, Clone)]
pub struct HeadSpec {
    pub targets: Vec<usize>,
    /// Multiplies the logits: `inv_temp / logits_scaling`.
    pub scale: f32,
    /// `w` is `[vocab, hidden]` (the tied embedding), else `[hidden, vocab]`.
    pub tied: bool,
    pub chunk_rows: usize,
}

/// The factor the logits are scaled by for a sampling temperature: `1 / temperature`, and 1
/// for 0 (greedy, whose log-probabilities are the untempered ones) and for 1.
pub(crate) fn inverse_temperature(temperature: f32) -> f32 {
    if temperature > 0.0 && temperature != 1.0 {
        1.0 / temperature
    } else {
        1.0
    }
}

/// The backend extension behind the functions above.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    fn moe_experts(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        chosen: Vec<usize>,
    ) -> FloatTensor<Self>;
    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    fn silu_mul(h: FloatTensor<Self>) -> FloatTensor<Self>;
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        empty: Vec<bool>,
        scale: f64,
    ) -> FloatTensor<Self>;
    fn token_logprobs(
        logits: FloatTensor<Self>,
        targets: Vec<usize>,
        inv_temp: f64,
    ) -> FloatTensor<Self>;
    fn head_logprobs(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        spec: HeadSpec,
    ) -> FloatTensor<Self>;
    fn recompute(
        x: FloatTensor<Self>,
        anchor: FloatTensor<Self>,
        segment: crate::checkpoint::Segment,
    ) -> FloatTensor<Self>;
}

impl FusedOps for Flex {
    fn moe_experts(
        x: FlexTensor,
        weights: FlexTensor,
        gate_up: FlexTensor,
        down: FlexTensor,
        chosen: Vec<usize>,
    ) -> FlexTensor {
        let moe = MoeInputs::new(x, weights, gate_up, down, &chosen);
        moe_forward(&moe).0
    }

    fn linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x, w) = (x.to_contiguous(), w.to_contiguous());
        let ([rows, inp], [_, out]) = (dims2(&x), dims2(&w));
        let y = product(
            View::dense(values(&x), rows, inp),
            View::dense(&weight_values(&w), inp, out),
        );
        tensor(y, [rows, out].into())
    }

    fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f64) -> FlexTensor {
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let shape = shape_of(&x);
        tensor(
            kernels::rms_norm(values(&x), values(&weight), eps as f32),
            shape,
        )
    }

    fn silu_mul(h: FlexTensor) -> FlexTensor {
        let h = h.to_contiguous();
        let mut shape = shape_of(&h);
        let last = shape.num_dims() - 1;
        shape[last] /= 2;
        tensor(kernels::silu_mul(values(&h), shape[last]), shape)
    }

    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        let (x, cos, sin) = (x.to_contiguous(), cos.to_contiguous(), sin.to_contiguous());
        let shape = shape_of(&x);
        let (heads, d) = (shape[2], shape[3]);
        tensor(
            kernels::rope(values(&x), values(&cos), values(&sin), heads, d),
            shape,
        )
    }

    fn attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        empty: Vec<bool>,
        scale: f64,
    ) -> FlexTensor {
        let attn = AttnInputs::new(q, k, v, scale);
        attention_forward(&attn, &mask.to_contiguous(), &empty)
    }

    fn token_logprobs(logits: FlexTensor, targets: Vec<usize>, inv_temp: f64) -> FlexTensor {
        token_logprobs_forward(&logits.to_contiguous(), &targets, inv_temp as f32).0
    }

    fn head_logprobs(h: FlexTensor, w: FlexTensor, spec: HeadSpec) -> FlexTensor {
        let head = HeadInputs::new(h, w, spec);
        head_forward(&head, false).0
    }

    fn recompute(
        x: FlexTensor,
        _anchor: FlexTensor,
        segment: crate::checkpoint::Segment,
    ) -> FlexTensor {
        segment.forward(x)
    }
}

/// The inputs of [`head_logprobs`], contiguous, and their sizes.
#[derive(Debug, Clone)]
struct HeadInputs {
    h: FlexTensor,
    w: FlexTensor,
    spec: HeadSpec,
    rows: usize,
    hidden: usize,
    vocab: usize,
}

impl HeadInputs {
    fn new(h: FlexTensor, w: FlexTensor, spec: HeadSpec) -> Self {
        let (h, w) = (h.to_contiguous(), w.to_contiguous());
        let ([rows, hidden], [a, b]) = (dims2(&h), dims2(&w));
        let vocab = if spec.tied { a } else { b };
        assert_eq!(
            if spec.tied { b } else { a },
            hidden,
            "head weight and h disagree"
        );
        assert_eq!(spec.targets.len(), rows, "one target per row");
        HeadInputs {
            h,
            w,
            spec,
            rows,
            hidden,
            vocab,
        }
    }

    /// `W` as `[hidden, vocab]`, from its elements `w` ([`weight_values`] of `self.w`).
    fn weight<'a>(&self, w: &'a [f32]) -> View<'a> {
        if self.spec.tied {
            View::dense(w, self.vocab, self.hidden).t()
        } else {
            View::dense(w, self.hidden, self.vocab)
        }
    }

    /// The row ranges of the chunks.
    fn chunks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let c = self.spec.chunk_rows;
        (0..self.rows.div_ceil(c)).map(move |i| i * c..((i + 1) * c).min(self.rows))
    }

    /// The raw logits `h · W` of `rows` (unscaled), `[rows.len(), vocab]`; `w` as in
    /// [`HeadInputs::weight`].
    fn logits(&self, rows: std::ops::Range<usize>, w: &[f32]) -> Vec<f32> {
        let h = &values(&self.h)[rows.start * self.hidden..rows.end * self.hidden];
        product(View::dense(h, rows.len(), self.hidden), self.weight(w))
    }
}

/// The forward of [`head_logprobs`]: `[2, rows]` (log-probabilities, entropies), each row's
/// log-normaliser, and (with `keep`, when there is a single chunk) the logits.
fn head_forward(head: &HeadInputs, keep: bool) -> (FlexTensor, Vec<f32>, Option<Vec<f32>>) {
    let (rows, vocab) = (head.rows, head.vocab);
    let mut out = vec![0.0; 2 * rows];
    let mut lse = Vec::with_capacity(rows);
    let mut kept = None;
    let w = weight_values(&head.w);
    for range in head.chunks() {
        let logits = head.logits(range.clone(), &w);
        let targets = &head.spec.targets[range.clone()];
        let (logp, l, ent) = kernels::token_scores(&logits, vocab, targets, head.spec.scale);
        out[range.clone()].copy_from_slice(&logp);
        out[rows + range.start..rows + range.end].copy_from_slice(&ent);
        lse.extend(l);
        if keep && range.len() == rows {
            kept = Some(logits);
        }
    }
    (tensor(out, [2, rows].into()), lse, kept)
}

/// The forward of [`token_logprobs`] on contiguous `logits`: the log-probabilities and each
/// row's log-normaliser (for the backward).
fn token_logprobs_forward(
    logits: &FlexTensor,
    targets: &[usize],
    inv_temp: f32,
) -> (FlexTensor, Vec<f32>) {
    let [rows, vocab] = dims2(logits);
    let (logp, lse) = kernels::token_logprobs(values(logits), vocab, targets, inv_temp);
    (tensor(logp, [rows].into()), lse)
}

/// The inputs of [`attention`] and its sizes: `q` contiguous; `k` and `v` as they come when
/// each (batch row, KV head) block is a contiguous `[keys, head_dim]` matrix (the first
/// `keys` columns of a KV cache are, at the cache's own strides: no copy of the whole cache
/// per layer and decode step), else contiguous copies.
#[derive(Clone, Debug)]
struct AttnInputs {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    scale: f32,
    /// `[batch, seq, heads, kv_heads, keys, head_dim, v_dim]`
    dims: [usize; 7],
}

/// `t` itself when its last two dimensions are a contiguous matrix at non-negative strides,
/// else a contiguous copy.
fn matrix_blocks(t: FlexTensor) -> FlexTensor {
    let (shape, strides) = (t.layout().shape(), t.layout().strides());
    let d = shape[3] as isize;
    if strides[3] == 1 && strides[2] == d && strides[0] >= 0 && strides[1] >= 0 {
        t
    } else {
        t.to_contiguous()
    }
}

/// Block `(b, g)` of a `[batch, kv_heads, keys, head_dim]` tensor made by [`matrix_blocks`],
/// as its contiguous `keys × head_dim` elements.
fn kv_block(t: &FlexTensor, b: usize, g: usize) -> &[f32] {
    let layout = t.layout();
    let (shape, strides) = (layout.shape(), layout.strides());
    let at = layout.start_offset() + b * strides[0] as usize + g * strides[1] as usize;
    &t.storage::<f32>()[at..at + shape[2] * shape[3]]
}

impl AttnInputs {
    fn new(q: FlexTensor, k: FlexTensor, v: FlexTensor, scale: f64) -> Self {
        let (q, k, v) = (q.to_contiguous(), matrix_blocks(k), matrix_blocks(v));
        let (qs, ks) = (q.layout().shape(), k.layout().shape());
        let dims = [
            qs[0],
            qs[1],
            qs[2],
            ks[1],
            ks[2],
            qs[3],
            v.layout().shape()[3],
        ];
        AttnInputs {
            q,
            k,
            v,
            scale: scale as f32,
            dims,
        }
    }

    /// Head `h` of batch row `b` in a `[batch, seq, heads, d]` buffer: `[seq, d]` with rows
    /// `heads·d` apart (`d`: the queries' `head_dim` or the outputs' `v_dim`).
    fn token_major<'a>(&self, data: &'a [f32], b: usize, h: usize, d: usize) -> View<'a> {
        let [_, s, nh, ..] = self.dims;
        View {
            data: &data[(b * s * nh + h) * d..],
            rows: s,
            cols: d,
            row_stride: nh * d,
            col_stride: 1,
        }
    }

    /// Key/value head `g` of batch row `b`: `k` as `[keys, head_dim]` and `v` as
    /// `[keys, v_dim]` matrices.
    fn kv(&self, b: usize, g: usize) -> (View<'_>, View<'_>) {
        let [_, _, _, _, keys, d, dv] = self.dims;
        (
            View::dense(kv_block(&self.k, b, g), keys, d),
            View::dense(kv_block(&self.v, b, g), keys, dv),
        )
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.dims[2] / self.dims[3]
    }

    /// Offsets of key/value head `g` of batch row `b` in the (contiguous) gradients of `k` and
    /// of `v`.
    fn kv_at(&self, b: usize, g: usize) -> (usize, usize) {
        let [_, _, _, nkv, keys, d, dv] = self.dims;
        ((b * nkv + g) * keys * d, (b * nkv + g) * keys * dv)
    }
}

/// The forward of [`attention`]: the output `[batch·seq, heads·v_dim]`. One head's
/// probabilities are alive at a time; the backward recomputes them ([`head_probs`]), so that
/// a training forward keeps no `[batch, heads, seq, keys]` tensor per layer, which grows with
/// the square of the sequence (flash attention's trade: one more `q·kᵀ` in the backward).
fn attention_forward(attn: &AttnInputs, mask: &FlexTensor, empty: &[bool]) -> FlexTensor {
    let [b, s, nh, _, keys, _, dv] = attn.dims;
    let mut p = vec![0.0f32; s * keys];
    let mut out = vec![0.0f32; b * s * nh * dv];
    for bi in 0..b {
        for h in 0..nh {
            head_probs(attn, values(mask), empty, bi, h, &mut p);
            let (_, vg) = attn.kv(bi, h / attn.group());
            let o = &mut out[(bi * s * nh + h) * dv..];
            gemm(o, nh * dv, View::dense(&p, s, keys), vg, false);
        }
    }
    tensor(out, [b * s, nh * dv].into())
}

/// The probabilities `[seq, keys]` of head `h` of batch row `bi` into `p`: the masked, scaled
/// softmax of `q·kᵀ` (the same bits in the forward and in the backward's recomputation).
fn head_probs(attn: &AttnInputs, m: &[f32], empty: &[bool], bi: usize, h: usize, p: &mut [f32]) {
    let [_, s, _, _, keys, d, _] = attn.dims;
    let (kg, _) = attn.kv(bi, h / attn.group());
    gemm(
        p,
        keys,
        attn.token_major(values(&attn.q), bi, h, d),
        kg.t(),
        false,
    );
    let rows = bi * s..(bi + 1) * s;
    let empty = empty.get(rows.clone()).unwrap_or(&[]);
    let mask = &m[rows.start * keys..rows.end * keys];
    kernels::masked_softmax_rows(p, mask, empty, keys, attn.scale);
}

/// A non-empty group's gate/up product `h: [n, 2·inter]` and activation `a: [n, inter]`.
type Saved = (Vec<f32>, Vec<f32>);

/// The contiguous inputs of [`moe_experts`] and its slots grouped by expert: `slots` lists
/// every `token·k + j` with expert `chosen[token·k + j]` = 0 first, then 1, …, each expert's
/// in token order (the order of the reference's stable grouping, so that a token's
/// contributions are added in the same order); `sizes[e]` is expert `e`'s count.
#[derive(Clone, Debug)]
struct MoeInputs {
    x: FlexTensor,
    weights: FlexTensor,
    gate_up: FlexTensor,
    down: FlexTensor,
    k: usize,
    slots: Vec<usize>,
    sizes: Vec<usize>,
}

impl MoeInputs {
    fn new(
        x: FlexTensor,
        weights: FlexTensor,
        gate_up: FlexTensor,
        down: FlexTensor,
        chosen: &[usize],
    ) -> Self {
        let num_experts = gate_up.layout().shape()[0];
        let [tokens, k] = dims2(&weights);
        assert_eq!(chosen.len(), tokens * k, "one expert per (token, j) slot");
        let mut sizes = vec![0usize; num_experts];
        for &e in chosen {
            sizes[e] += 1;
        }
        let mut next: Vec<usize> = sizes
            .iter()
            .scan(0, |start, &n| {
                let s = *start;
                *start += n;
                Some(s)
            })
            .collect();
        let mut slots = vec![0usize; chosen.len()];
        for (slot, &e) in chosen.iter().enumerate() {
            slots[next[e]] = slot;
            next[e] += 1;
        }
        Self {
            x: x.to_contiguous(),
            weights: weights.to_contiguous(),
            gate_up: gate_up.to_contiguous(),
            down: down.to_contiguous(),
            k,
            slots,
            sizes,
        }
    }

    /// `(expert, its slots)` for each expert with at least one slot, in expert order.
    fn groups(&self) -> impl Iterator<Item = (usize, &[usize])> {
        let mut start = 0;
        self.sizes.iter().enumerate().filter_map(move |(e, &n)| {
            let slots = &self.slots[start..start + n];
            start += n;
            (n > 0).then_some((e, slots))
        })
    }

    /// `[hidden, inter]`.
    fn dims(&self) -> [usize; 2] {
        [dims2(&self.x)[1], self.down.layout().shape()[1]]
    }

    /// Expert `e`'s `gate_up: [hidden, 2·inter]` and `down: [inter, hidden]`, from the
    /// elements of all of them (`gu`, `dn`: [`weight_values`] of `self.gate_up`, `self.down`).
    fn expert<'a>(&self, e: usize, gu: &'a [f32], dn: &'a [f32]) -> (View<'a>, View<'a>) {
        let [hidden, inter] = self.dims();
        let (gu_len, dn_len) = (hidden * 2 * inter, inter * hidden);
        (
            View::dense(&gu[e * gu_len..(e + 1) * gu_len], hidden, 2 * inter),
            View::dense(&dn[e * dn_len..(e + 1) * dn_len], inter, hidden),
        )
    }
}

/// Copies the rows `slot / k` of `src: [·, width]` into `dst` (resized to `[slots, width]`).
fn gather_rows(dst: &mut Vec<f32>, src: &[f32], width: usize, slots: &[usize], k: usize) {
    dst.clear();
    for &s in slots {
        let t = s / k;
        dst.extend_from_slice(&src[t * width..(t + 1) * width]);
    }
}

/// The forward of [`moe_experts`]: the output and each non-empty group's `(h, a)` for the
/// backward.
fn moe_forward(moe: &MoeInputs) -> (FlexTensor, Vec<Saved>) {
    let [tokens, hidden] = dims2(&moe.x);
    let inter = moe.dims()[1];
    let (x, w) = (values(&moe.x), values(&moe.weights));
    let mut out = vec![0.0f32; tokens * hidden];
    let (mut xe, mut ye) = (Vec::new(), Vec::new());
    let mut saved = Vec::new();
    let (gu, dn) = (weight_values(&moe.gate_up), weight_values(&moe.down));
    for (e, slots) in moe.groups() {
        let n = slots.len();
        let (w_gu, w_down) = moe.expert(e, &gu, &dn);
        gather_rows(&mut xe, x, hidden, slots, moe.k);
        let h = product(View::dense(&xe, n, hidden), w_gu);
        let a = kernels::silu_mul(&h, inter);
        ye.resize(n * hidden, 0.0);
        gemm(&mut ye, hidden, View::dense(&a, n, inter), w_down, false);
        for (&s, y) in slots.iter().zip(ye.chunks_exact(hidden)) {
            let t = s / moe.k;
            for (o, &v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(y) {
                *o += v * w[s];
            }
        }
        saved.push((h, a));
    }
    (tensor(out, [tokens, hidden].into()), saved)
}

fn dims2(t: &FlexTensor) -> [usize; 2] {
    let shape = t.layout().shape();
    [shape[0], shape[1]]
}

/// Backward of [`moe_experts`]; state: its inputs and each non-empty group's `(h, a)`.
#[derive(Debug)]
struct MoeBackward;

impl Backward<Flex, 4> for MoeBackward {
    type State = (MoeInputs, Vec<Saved>);

    /// Per expert, with `g` the output gradient's rows of its tokens and `w` their weights:
    /// `da₀ = g · downᵀ`, `d weights = rowsum(da₀ ∘ a)` (= `g · y`, without keeping `y`),
    /// `d down = aᵀ · (w ∘ g)`, `dh = silu_mul_backward(h, w ∘ da₀)`, `d gate_up = xᵀ · dh`,
    /// `dx += dh · gate_upᵀ` into the tokens' rows. Experts without tokens get zero weight
    /// gradients.
    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (moe, saved) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [tokens, hidden] = dims2(&moe.x);
        let inter = moe.dims()[1];
        let (x, w, g) = (values(&moe.x), values(&moe.weights), values(&grad));
        let (gu_len, dn_len) = (hidden * 2 * inter, inter * hidden);
        let mut dx = vec![0.0f32; tokens * hidden];
        let mut dw = vec![0.0f32; tokens * moe.k];
        let (gu, dn) = (weight_values(&moe.gate_up), weight_values(&moe.down));
        let mut d_gate_up = vec![0.0f32; gu.len()];
        let mut d_down = vec![0.0f32; dn.len()];
        let (mut xe, mut ge) = (Vec::new(), Vec::new());
        for ((e, slots), (h, a)) in moe.groups().zip(saved) {
            let n = slots.len();
            let (w_gu, w_down) = moe.expert(e, &gu, &dn);
            gather_rows(&mut ge, g, hidden, slots, moe.k);
            let mut da = product(View::dense(&ge, n, hidden), w_down.t());
            let rows = slots.iter().zip(da.chunks_exact_mut(inter));
            for ((&s, da_row), (a_row, g_row)) in
                rows.zip(a.chunks_exact(inter).zip(ge.chunks_exact_mut(hidden)))
            {
                dw[s] = kernels::dot(da_row, a_row);
                da_row.iter_mut().for_each(|v| *v *= w[s]);
                g_row.iter_mut().for_each(|v| *v *= w[s]);
            }
            let dw_down = &mut d_down[e * dn_len..(e + 1) * dn_len];
            gemm(
                dw_down,
                hidden,
                View::dense(&a, n, inter).t(),
                View::dense(&ge, n, hidden),
                false,
            );
            let dh = kernels::silu_mul_backward(&h, &da, inter);
            let dh = View::dense(&dh, n, 2 * inter);
            gather_rows(&mut xe, x, hidden, slots, moe.k);
            let dw_gu = &mut d_gate_up[e * gu_len..(e + 1) * gu_len];
            gemm(dw_gu, 2 * inter, View::dense(&xe, n, hidden).t(), dh, false);
            let dxe = product(dh, w_gu.t());
            for (&s, row) in slots.iter().zip(dxe.chunks_exact(hidden)) {
                let t = s / moe.k;
                for (o, &v) in dx[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
        let inputs = [
            tensor(dx, [tokens, hidden].into()),
            tensor(dw, [tokens, moe.k].into()),
            tensor(d_gate_up, shape_of(&moe.gate_up)),
            tensor(d_down, shape_of(&moe.down)),
        ];
        register(grads, ops.parents.map(|p| p.map(|n| n.id)), inputs);
    }
}

/// Backward of [`linear`]; state: `x` and `w` (contiguous).
#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 2> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let ([rows, inp], [_, out]) = (dims2(&x), dims2(&w));
        let dy = View::dense(values(&grad), rows, out);
        let [x_node, w_node] = ops.parents;
        if let Some(node) = x_node {
            let dx = product(dy, View::dense(&weight_values(&w), inp, out).t());
            grads.register::<Flex>(node.id, tensor(dx, [rows, inp].into()));
        }
        if let Some(node) = w_node {
            let dw = product(View::dense(values(&x), rows, inp).t(), dy);
            grads.register::<Flex>(node.id, tensor(dw, [inp, out].into()));
        }
    }
}

/// Adds each input's gradient to those of the inputs that take part in the graph (`None`:
/// the input needs no gradient).
fn register<const N: usize>(
    grads: &mut Gradients,
    nodes: [Option<NodeId>; N],
    inputs: [FlexTensor; N],
) {
    for (node, grad) in nodes.into_iter().zip(inputs) {
        if let Some(id) = node {
            grads.register::<Flex>(id, grad);
        }
    }
}

/// Backward of [`rms_norm`]; state: `x`, `weight`, `eps`.
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight, eps) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let (dx, dw) =
            kernels::rms_norm_backward(values(&x), values(&weight), values(&grad), eps as f32);
        let inputs = [tensor(dx, shape_of(&x)), tensor(dw, shape_of(&weight))];
        register(grads, ops.parents.map(|p| p.map(|n| n.id)), inputs);
    }
}

/// Backward of [`silu_mul`]; state: the fused product `h`.
#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 1> for SiluMulBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let h = ops.state.to_contiguous();
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [h_node] = ops.parents;
        if let Some(node) = h_node {
            let inter = grad.layout().shape()[1];
            let dh = kernels::silu_mul_backward(values(&h), values(&grad), inter);
            grads.register::<Flex>(node.id, tensor(dh, shape_of(&h)));
        }
    }
}

/// Backward of [`rope`]; state: `cos`, `sin`.
#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [x_node] = ops.parents;
        if let Some(node) = x_node {
            let (cos, sin) = (cos.to_contiguous(), sin.to_contiguous());
            let shape = shape_of(&grad);
            let (heads, d) = (shape[2], shape[3]);
            let dx = kernels::rope_backward(values(&grad), values(&cos), values(&sin), heads, d);
            grads.register::<Flex>(node.id, tensor(dx, shape));
        }
    }
}

/// Backward of [`attention`]; state: its inputs, the mask and the empty rows (each head's
/// probabilities are recomputed, [`attention_forward`]).
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = (AttnInputs, FlexTensor, Vec<bool>);

    /// Per batch row and head, with `dO` the head's columns of the output gradient:
    /// `dP = dO · vᵀ`, `dv += Pᵀ · dO`, `dS = scale · P ∘ (dP − rowsum(P ∘ dP))`,
    /// `dq = dS · k`, `dk += dSᵀ · q` (the heads of a group add into their shared key/value
    /// head). An empty row's `P` is 0, so it passes no gradient.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (attn, mask, empty) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [b, s, nh, nkv, keys, d, d_v] = attn.dims;
        let group = attn.group();
        let (q, g) = (values(&attn.q), values(&grad));
        let mut dq = vec![0.0f32; q.len()];
        let (mut dk, mut dv) = (
            vec![0.0f32; b * nkv * keys * d],
            vec![0.0f32; b * nkv * keys * d_v],
        );
        let mut ds = vec![0.0f32; s * keys];
        let mut probs = vec![0.0f32; s * keys];
        for bi in 0..b {
            for h in 0..nh {
                let (k_at, v_at) = attn.kv_at(bi, h / group);
                let (kg, vg) = attn.kv(bi, h / group);
                head_probs(&attn, values(&mask), &empty, bi, h, &mut probs);
                let p = &probs;
                let d_out = attn.token_major(g, bi, h, d_v);
                let shared = h % group != 0;
                gemm(&mut ds, keys, d_out, vg.t(), false);
                let pv = View::dense(p, s, keys);
                gemm(&mut dv[v_at..v_at + keys * d_v], d_v, pv.t(), d_out, shared);
                kernels::softmax_backward_rows(p, &mut ds, keys, attn.scale);
                let dsv = View::dense(&ds, s, keys);
                gemm(&mut dq[(bi * s * nh + h) * d..], nh * d, dsv, kg, false);
                let qh = attn.token_major(q, bi, h, d);
                gemm(&mut dk[k_at..k_at + keys * d], d, dsv.t(), qh, shared);
            }
        }
        let inputs = [
            tensor(dq, shape_of(&attn.q)),
            tensor(dk, shape_of(&attn.k)),
            tensor(dv, shape_of(&attn.v)),
        ];
        register(grads, ops.parents.map(|p| p.map(|n| n.id)), inputs);
    }
}

/// Backward of [`token_logprobs`]; state: the logits (contiguous), the targets, each row's
/// log-normaliser and `inv_temp`.
#[derive(Debug)]
struct TokenLogprobsBackward;

impl Backward<Flex, 1> for TokenLogprobsBackward {
    type State = (FlexTensor, Vec<usize>, Vec<f32>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, lse, inv_temp) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [logits_node] = ops.parents;
        if let Some(node) = logits_node {
            let [_, vocab] = dims2(&logits);
            let d = kernels::token_logprobs_backward(
                values(&logits),
                vocab,
                (&targets, &lse),
                values(&grad),
                inv_temp,
            );
            grads.register::<Flex>(node.id, tensor(d, shape_of(&logits)));
        }
    }
}

/// Backward of [`head_logprobs`]; state: the inputs, each row's log-normaliser, and the
/// logits when there was a single chunk (else each chunk's are recomputed).
#[derive(Debug)]
struct HeadLogprobsBackward;

impl Backward<Flex, 2> for HeadLogprobsBackward {
    type State = (HeadInputs, Vec<f32>, Option<Vec<f32>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (head, lse, kept) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        // Row 1 (the entropies) is a constant: only the log-probabilities' gradient flows.
        let g = &values(&grad)[..head.rows];
        let (hidden, vocab) = (head.hidden, head.vocab);
        let [h_node, w_node] = ops.parents;
        let mut dh = vec![
            0.0;
            if h_node.is_some() {
                head.rows * hidden
            } else {
                0
            }
        ];
        let mut dw = vec![0.0; if w_node.is_some() { hidden * vocab } else { 0 }];
        let mut kept = kept;
        let w = weight_values(&head.w);
        for (i, range) in head.chunks().enumerate() {
            let logits = kept
                .take()
                .unwrap_or_else(|| head.logits(range.clone(), &w));
            let targets = &head.spec.targets[range.clone()];
            let d = kernels::token_logprobs_backward(
                &logits,
                vocab,
                (targets, &lse[range.clone()]),
                &g[range.clone()],
                head.spec.scale,
            );
            drop(logits);
            let d = View::dense(&d, range.len(), vocab);
            if h_node.is_some() {
                let out = &mut dh[range.start * hidden..range.end * hidden];
                gemm(out, hidden, d, head.weight(&w).t(), false);
            }
            if w_node.is_some() {
                let h = &values(&head.h)[range.start * hidden..range.end * hidden];
                let h = View::dense(h, range.len(), hidden);
                if head.spec.tied {
                    gemm(&mut dw, hidden, d.t(), h, i > 0);
                } else {
                    gemm(&mut dw, vocab, h.t(), d, i > 0);
                }
            }
        }
        if let Some(node) = h_node {
            grads.register::<Flex>(node.id, tensor(dh, shape_of(&head.h)));
        }
        if let Some(node) = w_node {
            grads.register::<Flex>(node.id, tensor(dw, shape_of(&head.w)));
        }
    }
}

/// Backward of [`recompute`]; state: the layer's input and the layer. The input's gradient
/// goes to the first parent; the layer's parameters' gradients to their own nodes; the anchor
/// (second parent, there only to keep the node in the graph) gets zeros.
#[derive(Debug)]
struct RecomputeBackward;

impl Backward<Flex, 2> for RecomputeBackward {
    type State = (FlexTensor, crate::checkpoint::Segment, Shape);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, segment, anchor_shape) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dx, params) = segment.backward(x, dy);
        let [x_node, anchor_node] = ops.parents;
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, dx);
        }
        for (id, g) in params {
            grads.register::<Flex>(id, g);
        }
        if let Some(node) = anchor_node {
            let n = anchor_shape.num_elements();
            grads.register::<Flex>(node.id, tensor(vec![0.0; n], anchor_shape));
        }
    }
}

/// Each op is one graph node whose parents are its differentiable inputs only; the constant
/// inputs (RoPE tables, the mask) are read and never receive a gradient.
impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn moe_experts(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
        chosen: Vec<usize>,
    ) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (weights, w_node) = weights.into_parts();
        let (gate_up, gu_node) = gate_up.into_parts();
        let (down, d_node) = down.into_parts();
        let moe = MoeInputs::new(x, weights, gate_up, down, &chosen);
        let (y, saved) = moe_forward(&moe);
        match MoeBackward
            .prepare::<C>([x_node, w_node, gu_node, d_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((moe, saved), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (w, w_node) = w.into_parts();
        let (x, w) = (x.to_contiguous(), w.to_contiguous());
        let y = Flex::linear(x.clone(), w.clone());
        match LinearBackward
            .prepare::<C>([x_node, w_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, w), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (weight, w_node) = weight.into_parts();
        let y = Flex::rms_norm(x.clone(), weight.clone(), eps);
        match RmsNormBackward
            .prepare::<C>([x_node, w_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, weight, eps), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn silu_mul(h: FloatTensor<Self>) -> FloatTensor<Self> {
        let (h, h_node) = h.into_parts();
        let y = Flex::silu_mul(h.clone());
        match SiluMulBackward
            .prepare::<C>([h_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(h, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        let y = Flex::rope(x, cos.clone(), sin.clone());
        match RopeBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((cos, sin), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        empty: Vec<bool>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let attn = AttnInputs::new(q, k, v, scale);
        let mask = mask.into_primitive().to_contiguous();
        let y = attention_forward(&attn, &mask, &empty);
        match AttentionBackward
            .prepare::<C>([q_node, k_node, v_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((attn, mask, empty), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn token_logprobs(
        logits: FloatTensor<Self>,
        targets: Vec<usize>,
        inv_temp: f64,
    ) -> FloatTensor<Self> {
        let (logits, node) = logits.into_parts();
        let logits = logits.to_contiguous();
        let inv_temp = inv_temp as f32;
        let (y, lse) = token_logprobs_forward(&logits, &targets, inv_temp);
        match TokenLogprobsBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits, targets, lse, inv_temp), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn head_logprobs(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        spec: HeadSpec,
    ) -> FloatTensor<Self> {
        let (h, h_node) = h.into_parts();
        let (w, w_node) = w.into_parts();
        let head = HeadInputs::new(h, w, spec);
        let (y, lse, kept) = head_forward(&head, true);
        match HeadLogprobsBackward
            .prepare::<C>([h_node, w_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((head, lse, kept), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn recompute(
        x: FloatTensor<Self>,
        anchor: FloatTensor<Self>,
        segment: crate::checkpoint::Segment,
    ) -> FloatTensor<Self> {
        let (x, x_node) = x.into_parts();
        let (anchor, anchor_node) = anchor.into_parts();
        let y = segment.forward(x.clone());
        match RecomputeBackward
            .prepare::<C>([x_node, anchor_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, segment, shape_of(&anchor)), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

fn shape_of(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

/// The elements of a contiguous tensor. Every tensor the model makes is `f32`; another dtype
/// here is a bug in sobre, not bad input.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused kernels take contiguous f32 tensors")
}

/// A weight's elements in `f32`: the tensor's own buffer, or — a frozen base stored in `bf16`
/// (`lora.base_dtype = "bf16"`) — a widened copy that lives only while the op runs, so the
/// graph keeps the `bf16` tensor and never a second, `f32` copy of the weights.
fn weight_values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(
            t.as_slice::<half::bf16>()
                .expect("fused kernels take contiguous f32 or bf16 weights")
                .iter()
                .map(|w| w.to_f32())
                .collect(),
        ),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    debug_assert_eq!(values.len(), shape.num_elements());
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// The kernels on plain slices, row by row.
///
/// The build targets baseline x86-64 (SSE2), so each kernel is also compiled for AVX2 + FMA
/// and the CPU's best is chosen at run time (`multiversion`). Rust never contracts `a·b + c`
/// into an FMA on its own, so both clones compute the same bits. `exp` is [`exp`], not libm's:
/// straight-line arithmetic that vectorises where a libm call cannot.
pub(crate) mod kernels {
    use multiversion::multiversion;

    /// Lanes of the accumulators in [`dot`]: independent partial sums let the compiler keep
    /// them in vector registers (a single `f32` accumulator is a serial dependency chain).
    const LANES: usize = 16;

    /// `e^x` to about 1 ulp for `x` in `[-87, 88]` (Cephes' `expf`: `x = n·ln 2 + r`,
    /// `|r| ≤ ln 2 / 2`, a degree-5 polynomial for `e^r`, and `2^n` built in the exponent bits).
    /// Outside that range the argument is clamped: `e^x` for `x < −87` is below `1.7e-38`,
    /// and every caller passes `x ≤ 0` (softmax after the max, sigmoid of `−|x|`), except NaN,
    /// which stays NaN.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        // Adding and subtracting 1.5·2²³ rounds to the nearest integer in plain SSE2.
        const ROUND: f32 = 12_582_912.0;
        let x = x.clamp(-87.0, 88.0);
        let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        (p * r * r + r + 1.0) * scale
    }

    /// `Σ a·b`. Always inlined, so that it takes the instruction set of the kernel clone that
    /// calls it (a separate function would be compiled for baseline x86-64 only).
    #[inline(always)]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let (ca, ta) = a.as_chunks::<LANES>();
        let (cb, tb) = b.as_chunks::<LANES>();
        let mut acc = [0.0f32; LANES];
        for (x, y) in ca.iter().zip(cb) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
        // Pairwise (8 + 8, 4 + 4, …): vector adds, four dependent steps instead of fifteen.
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                acc[l] += acc[l + width];
            }
        }
        acc[0] + tail
    }

    /// `1 / sqrt(mean(row²) + eps)`, as the reference: mean, add, sqrt, reciprocal.
    #[inline(always)]
    fn inv_rms(row: &[f32], eps: f32) -> f32 {
        let mean = dot(row, row) / row.len() as f32;
        1.0 / (mean + eps).sqrt()
    }

    /// `x: [rows·h]`, `w: [h]`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks_exact(w.len()) {
            let inv = inv_rms(row, eps);
            y.extend(row.iter().zip(w).map(|(&v, &wi)| v * inv * wi));
        }
        y
    }

    /// With `r = inv_rms(x)`, `x̂ = x·r` and `gw = g·w`:
    /// `dx = r · (gw − x̂ · mean(gw · x̂))`, `dw = Σ_rows g · x̂`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn rms_norm_backward(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
        let h = w.len();
        let mut dx = Vec::with_capacity(x.len());
        let mut dw = vec![0.0f32; h];
        let mut gw = vec![0.0f32; h];
        for (xr, gr) in x.chunks_exact(h).zip(g.chunks_exact(h)) {
            let inv = inv_rms(xr, eps);
            for ((o, &gi), &wi) in gw.iter_mut().zip(gr).zip(w) {
                *o = gi * wi;
            }
            let c = dot(&gw, xr) * inv / h as f32;
            dx.extend(
                gw.iter()
                    .zip(xr)
                    .map(|(&gwi, &xi)| inv * (gwi - xi * inv * c)),
            );
            for ((d, &gi), &xi) in dw.iter_mut().zip(gr).zip(xr) {
                *d += gi * (xi * inv);
            }
        }
        (dx, dw)
    }

    /// burn-flex's `sigmoid` expression (no overflow for either sign), branch-free so that
    /// loops over it vectorise: `1 / (1 + e^−x)` for `x ≥ 0`, `e^x / (1 + e^x)` below.
    #[inline(always)]
    pub fn sigmoid(x: f32) -> f32 {
        let e = exp(-x.abs());
        let s = 1.0 / (1.0 + e);
        if x >= 0.0 { s } else { e * s }
    }

    /// `h: [rows · 2·inter]` → `[rows · inter]`: `gate · sigmoid(gate) · up`. (Loops over
    /// output slices rather than `extend`: they vectorise.)
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn silu_mul(h: &[f32], inter: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; h.len() / 2];
        for (row, yr) in h.chunks_exact(2 * inter).zip(y.chunks_exact_mut(inter)) {
            let (gate, up) = row.split_at(inter);
            for ((o, &g), &u) in yr.iter_mut().zip(gate).zip(up) {
                *o = g * sigmoid(g) * u;
            }
        }
        y
    }

    /// `d gate = dy · up · s · (1 + gate · (1 − s))`, `d up = dy · gate · s`, `s = sigmoid(gate)`.
    /// `h: [rows · 2·inter]`, `dy: [rows · inter]` → `[rows · 2·inter]`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn silu_mul_backward(h: &[f32], dy: &[f32], inter: usize) -> Vec<f32> {
        let mut dh = vec![0.0f32; h.len()];
        let rows = h.chunks_exact(2 * inter).zip(dy.chunks_exact(inter));
        for ((row, dyr), dr) in rows.zip(dh.chunks_exact_mut(2 * inter)) {
            let (gate, up) = row.split_at(inter);
            let (dgate, dup) = dr.split_at_mut(inter);
            let terms = gate.iter().zip(up).zip(dyr);
            for ((((&g, &u), &d), dg), du) in terms.zip(dgate).zip(dup) {
                let s = sigmoid(g);
                *dg = d * u * s * (1.0 + g * (1.0 - s));
                *du = d * (g * s);
            }
        }
        dh
    }

    /// `x: [rows · d]` with `heads` consecutive rows per row of the tables `cos`, `sin`:
    /// `y[k] = x[k]·cos[k] + x[k ± d/2]·sin[k]` (the partner in the other half), the
    /// reference's `x·cos + swap_halves(x)·sin` term by term.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) -> Vec<f32> {
        let half = d / 2;
        let mut y = Vec::with_capacity(x.len());
        for (r, xr) in x.chunks_exact(d).enumerate() {
            let t = r / heads * d;
            let (c, s) = (&cos[t..t + d], &sin[t..t + d]);
            let (x1, x2) = xr.split_at(half);
            y.extend((0..half).map(|k| x1[k] * c[k] + x2[k] * s[k]));
            y.extend((0..half).map(|k| x2[k] * c[half + k] + x1[k] * s[half + k]));
        }
        y
    }

    /// `dx = g·cos + swap_halves(g·sin)`: the swap is its own inverse, so `x[k]`'s partner term
    /// `x[k]·sin[k ± d/2]` sends back `g[k ± d/2]·sin[k ± d/2]`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn rope_backward(g: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) -> Vec<f32> {
        let half = d / 2;
        let mut dx = Vec::with_capacity(g.len());
        for (r, gr) in g.chunks_exact(d).enumerate() {
            let t = r / heads * d;
            let (c, s) = (&cos[t..t + d], &sin[t..t + d]);
            let (g1, g2) = gr.split_at(half);
            dx.extend((0..half).map(|k| g1[k] * c[k] + g2[k] * s[half + k]));
            dx.extend((0..half).map(|k| g2[k] * c[half + k] + g1[k] * s[k]));
        }
        dx
    }

    /// `softmax(row · scale + mask)` in place for each row of `scores: [rows · keys]` with its
    /// row of `mask`, as burn-flex's softmax computes it (max, `exp(z − max)` summed in order,
    /// times the reciprocal of the sum); a masked entry (`-inf`) is 0 without calling `exp`.
    /// Rows flagged in `empty` (`[rows]`, or `[]` for none) become all 0; every other row must
    /// have an open key.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn masked_softmax_rows(
        scores: &mut [f32],
        mask: &[f32],
        empty: &[bool],
        keys: usize,
        scale: f32,
    ) {
        for (i, (row, m)) in scores
            .chunks_exact_mut(keys)
            .zip(mask.chunks_exact(keys))
            .enumerate()
        {
            if empty.get(i) == Some(&true) {
                row.fill(0.0);
                continue;
            }
            let mut max = f32::NEG_INFINITY;
            for (zi, &mi) in row.iter_mut().zip(m) {
                *zi = *zi * scale + mi;
                max = max.max(*zi);
            }
            for zi in row.iter_mut() {
                *zi = if *zi == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp(*zi - max)
                };
            }
            let sum: f32 = row.iter().sum();
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// `max_j x_j · s`, with [`LANES`] partial maxima (a single running maximum is a serial
    /// chain the compiler may not reorder).
    #[inline(always)]
    fn scaled_max(row: &[f32], s: f32) -> f32 {
        let (chunks, tail) = row.as_chunks::<LANES>();
        let mut acc = [f32::NEG_INFINITY; LANES];
        for c in chunks {
            for l in 0..LANES {
                acc[l] = acc[l].max(c[l] * s);
            }
        }
        let tail = tail.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * s));
        acc.iter().fold(tail, |m, &a| m.max(a))
    }

    /// `(Σ_j e_j, Σ_j e_j · z_j)` with `z_j = x_j · s − shift`, `e_j = exp(z_j)`, summed in
    /// [`LANES`] partial sums, then pairwise as in [`dot`].
    #[inline(always)]
    fn exp_sums(row: &[f32], s: f32, shift: f32) -> (f32, f32) {
        let (chunks, tail) = row.as_chunks::<LANES>();
        let (mut sum, mut weighted) = ([0.0f32; LANES], [0.0f32; LANES]);
        for c in chunks {
            for l in 0..LANES {
                let z = c[l] * s - shift;
                let e = exp(z);
                sum[l] += e;
                weighted[l] += e * z;
            }
        }
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                sum[l] += sum[l + width];
                weighted[l] += weighted[l + width];
            }
        }
        tail.iter().fold((sum[0], weighted[0]), |(a, b), &x| {
            let z = x * s - shift;
            let e = exp(z);
            (a + e, b + e * z)
        })
    }

    /// Per row of `logits: [rows, vocab]`, with `z = x · inv_temp`: `lse = log Σ exp(z)`
    /// (shifted by the row's maximum) and the target's `z − lse`. → `(log-probabilities, lse)`,
    /// one of each per row.
    ///
    /// # Panics
    /// If a target is not below `vocab` (a bug in the caller: targets are sampled tokens).
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn token_logprobs(
        logits: &[f32],
        vocab: usize,
        targets: &[usize],
        inv_temp: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut logp = Vec::with_capacity(targets.len());
        let mut lses = Vec::with_capacity(targets.len());
        for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
            let max = scaled_max(row, inv_temp);
            let lse = exp_sums(row, inv_temp, max).0.ln() + max;
            logp.push(row[t] * inv_temp - lse);
            lses.push(lse);
        }
        (logp, lses)
    }

    /// [`token_logprobs`] and [`entropies`] in one pass over each row (the sums the entropy
    /// needs are those the log-normaliser needs). → `(log-probabilities, lse, entropies)`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn token_scores(
        logits: &[f32],
        vocab: usize,
        targets: &[usize],
        inv_temp: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = targets.len();
        let (mut logp, mut lses, mut ent) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
            let max = scaled_max(row, inv_temp);
            let (sum, weighted) = exp_sums(row, inv_temp, max);
            let lse = sum.ln() + max;
            logp.push(row[t] * inv_temp - lse);
            lses.push(lse);
            ent.push(sum.ln() - weighted / sum);
        }
        (logp, lses, ent)
    }

    /// The gradient of [`token_logprobs`]: `d x_j = g · inv_temp · ([j = target] − p_j)` with
    /// `p_j = exp(x_j · inv_temp − lse)`. → `[rows · vocab]`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn token_logprobs_backward(
        logits: &[f32],
        vocab: usize,
        (targets, lse): (&[usize], &[f32]),
        g: &[f32],
        inv_temp: f32,
    ) -> Vec<f32> {
        let mut d = Vec::with_capacity(logits.len());
        for (((row, &t), &lse), &g) in logits.chunks_exact(vocab).zip(targets).zip(lse).zip(g) {
            let scale = g * inv_temp;
            let start = d.len();
            d.extend(row.iter().map(|&x| -scale * exp(x * inv_temp - lse)));
            d[start + t] += scale;
        }
        d
    }

    /// Entropy `−Σ p log p` of `softmax(x · inv_temp)` per row of `logits: [rows, vocab]`,
    /// computed as `log Σ e − Σ e·z / Σ e` with `z` shifted by the row's maximum.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn entropies(logits: &[f32], vocab: usize, inv_temp: f32) -> Vec<f32> {
        logits
            .chunks_exact(vocab)
            .map(|row| {
                let (sum, weighted) = exp_sums(row, inv_temp, scaled_max(row, inv_temp));
                sum.ln() - weighted / sum
            })
            .collect()
    }

    /// The softmax's backward in place, row by row: `g ← scale · y · (g − Σ g·y)`.
    /// `y`, `g`: `[rows · keys]`.
    #[multiversion(targets("x86_64+avx2+fma"))]
    pub fn softmax_backward_rows(y: &[f32], g: &mut [f32], keys: usize, scale: f32) {
        for (yr, gr) in y.chunks_exact(keys).zip(g.chunks_exact_mut(keys)) {
            let c = dot(yr, gr);
            for (gi, &yi) in gr.iter_mut().zip(yr) {
                *gi = scale * yi * (*gi - c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kernels::{exp, sigmoid};

    /// The kernels' `exp` against libm's over every argument it is used on (softmax after the
    /// max and sigmoid's `−|x|`: `[-87, 0]`) and some positive ones: within 2 ulp (2.4e-7
    /// relative), exact at 0, NaN stays NaN.
    #[test]
    fn kernel_exp_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 95.0 * i as f32 / 200_000.0; // [-87, 8]
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        // Clamped below: tiny but positive, never a denormal or garbage exponent.
        assert!(exp(-1e4) > 0.0 && exp(-1e4) < 2e-38);
    }

    #[test]
    fn kernel_sigmoid_is_finite_and_symmetric() {
        assert_eq!(sigmoid(0.0), 0.5);
        for x in [0.1f32, 1.0, 5.0, 20.0, 90.0, 1e4] {
            let (a, b) = (sigmoid(x), sigmoid(-x));
            assert!(a.is_finite() && b.is_finite() && b >= 0.0, "{x}");
            assert!((a + b - 1.0).abs() <= 1e-6, "{x}: {a} + {b}");
            let want = 1.0 / (1.0 + (-x as f64).exp());
            assert!((a as f64 - want).abs() <= 1e-7 * want, "{x}: {a} vs {want}");
        }
    }
}
