//! Activation recomputation per decoder layer (gradient checkpointing, `grpo.gradient_checkpointing`
//! and `sft.gradient_checkpointing`; transformers' `gradient_checkpointing_enable()`).
//!
//! A training forward keeps, for the backward, every intermediate of every layer: the
//! attention's inputs and probabilities, each expert's rows, the SwiGLU's halves. With
//! recomputation a layer is one graph node ([`fused::recompute`]) whose forward runs the layer
//! with no graph at all and keeps only the layer's input; its backward runs the layer's forward
//! again, this time recorded, on a fresh copy of the layer's parameters, backpropagates the
//! output's gradient through that small graph (burn supports a `backward()` inside a backward
//! step), and hands the input's gradient on and each parameter's gradient to the outer
//! gradients under the parameter's own node. Peak activation memory drops from all layers' to
//! one layer's (plus every layer's input); each layer's forward runs twice.
//!
//! The router's balance loss reaches the router through a recomputed layer too: a MoE layer's
//! node outputs its hidden states and its routing probabilities' sum side by side, and the
//! token counts (constants) come back from the first run.

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Gradients;

use crate::fused;
use crate::model::{AttnContext, AuxAccumulator, DecoderLayer, Ffn, LayerInputs};

/// A layer's forward as the recomputation runs it: the layer (a copy of the real one) and its
/// input → its output and (MoE, with the balance loss) routing probabilities, flattened into
/// one vector.
type Run = dyn Fn(&DecoderLayer, Tensor<3>) -> Tensor<1> + Send + Sync;

/// One recomputed layer: what [`fused::recompute`]'s node keeps besides its input.
#[derive(Clone)]
pub struct Segment {
    /// The trained layer's weights with no gradient: the first run records nothing, and the
    /// rerun makes fresh leaves of them.
    detached: DecoderLayer,
    run: Arc<Run>,
    /// Per parameter of the trained layer in visiting order, its node when it requires a
    /// gradient (where the rerun's gradients go).
    param_ids: Vec<Option<NodeId>>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("params", &self.param_ids.len())
            .finish()
    }
}

impl Segment {
    /// The layer's first run, with no graph. `x` is the input `[batch, seq, hidden]`.
    pub(crate) fn forward(&self, x: FlexTensor) -> FlexTensor {
        let y = (self.run)(&self.detached, tensor_of::<3>(x).autodiff());
        flex_of(y.inner())
    }

    /// The backward of the layer: `(dx, [(parameter node, its gradient)])` for output gradient
    /// `dy`, by running the layer again with a graph.
    pub(crate) fn backward(
        &self,
        x: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, Vec<(NodeId, FlexTensor)>) {
        let x = tensor_of::<3>(x).autodiff().require_grad();
        // Fresh leaves from the detached copy: forking the tracked layer would register a
        // step on the outer graph, whose lock the running backward holds.
        let fresh = self.detached.clone().map(&mut Track {
            ids: &self.param_ids,
            at: 0,
        });
        let y = (self.run)(&fresh, x.clone());
        let grads = (y * tensor_of::<1>(dy)).sum().backward();
        let dx = match x.grad(&grads) {
            Some(g) => flex_of(g),
            None => flex_of(x.zeros_like().inner()),
        };
        let mut visitor = GradsOf {
            grads: &grads,
            out: vec![],
        };
        fresh.visit(&mut visitor);
        let params = self
            .param_ids
            .iter()
            .zip(visitor.out)
            .filter_map(|(id, g)| Some((*id.as_ref()?, g?)))
            .collect();
        (dx, params)
    }
}

/// Layer `layer` on `h`, recomputed in the backward: as [`DecoderLayer::forward`] without a
/// cache, adding to `acc` as it would.
pub(crate) fn layer(
    layer: &DecoderLayer,
    h: Tensor<3>,
    ctx: &AttnContext,
    inputs: &LayerInputs,
    acc: Option<&mut AuxAccumulator>,
) -> (Tensor<3>, Option<Vec<u32>>) {
    let dims = h.dims();
    let n = dims.iter().product::<usize>();
    let experts = acc
        .as_ref()
        .filter(|_| matches!(layer.mlp, Ffn::Sparse(_)))
        .map(|a| a.tokens_per_expert.len());
    // The first run's routing statistics (constants; the rerun writes the same again).
    type Side = (Option<Vec<u32>>, Option<AuxAccumulator>);
    let side: Arc<Mutex<Option<Side>>> = Arc::new(Mutex::new(None));
    let run = {
        let (ctx, inputs, side) = (ctx.clone(), inputs.clone(), Arc::clone(&side));
        move |l: &DecoderLayer, h: Tensor<3>| -> Tensor<1> {
            let mut local = experts.map(AuxAccumulator::new);
            let (y, counts) = l.forward(h, &ctx, None, &inputs, local.as_mut());
            let y = y.reshape([n]);
            let probs = local.as_ref().and_then(|a| a.prob_sum.clone());
            let out = match probs {
                Some(p) => Tensor::cat(vec![y, p], 0),
                None => y,
            };
            if let Ok(mut s) = side.lock() {
                *s = Some((
                    counts,
                    local.map(|a| AuxAccumulator {
                        prob_sum: None,
                        ..a
                    }),
                ));
            }
            out
        }
    };
    let mut ids = IdsOf(vec![]);
    layer.visit(&mut ids);
    // A tracked parameter, flattened, as the node's second parent, so that the node is in the
    // graph even when its input is a constant (LoRA, whose embeddings are frozen).
    let mut anchor = FirstTracked(None);
    layer.visit(&mut anchor);
    let segment = Segment {
        detached: layer.clone().no_grad(),
        run: Arc::new(run),
        param_ids: ids.0,
    };
    let out = fused::recompute(h, anchor.0, segment);
    let (counts, local) = side
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_default();
    let y = out.clone().slice(0..n).reshape(dims);
    if let (Some(acc), Some(mut local), Some(e)) = (acc, local, experts) {
        local.prob_sum = Some(out.slice(n..n + e));
        acc.merge(local);
    }
    (y, counts)
}

/// A host flex tensor as a (non-autodiff) tensor.
fn tensor_of<const D: usize>(t: FlexTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Flex(BackendTensor::Float(t)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

/// A (non-autodiff) flex tensor's primitive. Recomputation runs only where the fused kernels
/// do, on flex, so another backend here is a bug in sobre.
fn flex_of<const D: usize>(t: Tensor<D>) -> FlexTensor {
    match t.into_dispatch().kind {
        DispatchTensorKind::Flex(b) => b.float(),
        _ => unreachable!("recomputation runs on the flex backend only"),
    }
}

/// A tracked tensor's autodiff node.
fn node_of<const D: usize>(t: Tensor<D>) -> Option<NodeId> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Autodiff(inner) => match *inner {
            DispatchTensorKind::Flex(BackendTensor::Autodiff(ad)) => Some(ad.id()),
            _ => None,
        },
        _ => None,
    }
}

struct IdsOf(Vec<Option<NodeId>>);

impl ModuleVisitor for IdsOf {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.0.push(if t.is_require_grad() {
            node_of(t)
        } else {
            None
        });
    }
}

/// Marks the parameters that had a node (in visiting order) as fresh tracked leaves.
struct Track<'a> {
    ids: &'a [Option<NodeId>],
    at: usize,
}

impl ModuleMapper for Track<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let tracked = self.ids.get(self.at).is_some_and(Option::is_some);
        self.at += 1;
        if tracked {
            param.set_require_grad(true)
        } else {
            param
        }
    }
}

struct GradsOf<'a> {
    grads: &'a Gradients,
    out: Vec<Option<FlexTensor>>,
}

impl ModuleVisitor for GradsOf<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(param.val().grad(self.grads).map(flex_of));
    }
}

struct FirstTracked(Option<Tensor<1>>);

impl ModuleVisitor for FirstTracked {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        if self.0.is_none() && t.is_require_grad() {
            let n = t.shape().num_elements();
            self.0 = Some(t.reshape([n]));
        }
    }
}
