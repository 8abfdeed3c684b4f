//! `[tools]` in a run: the rollout engine's [`sobre_rollout::Tools`] made of the configured
//! tools ([`sobre_reward::tools::ToolBox`]) and the run's tokenizer, the loss mask without the
//! responses the tools inserted, and the per-step tool metrics.
//!
//! What training sees: a completion is the whole transcript (sampled text, calls, responses),
//! which the rewards score and `samples.jsonl` shows; the response tokens were not sampled, so
//! they leave the loss, the KL, the entropy and the token counts of the loss normalisers
//! ([`mask_responses`]), as verl's agent loop (`response_mask`) and TRL's tool masks do.

use serde_json::{Map, Value, json};
use sobre_data::Tokenizer;
use sobre_reward::tools::{ToolBox, ToolParams};
use sobre_rollout::{Completion, ToolResponse, ToolSettings, Tools};

use crate::TrainError;
use crate::metrics::num;
use crate::score::{Layout, exclude_tokens};

/// The configured tools, answering in the run's tokens.
pub struct ToolRunner<'a> {
    toolbox: ToolBox,
    tok: &'a Tokenizer,
}

impl<'a> ToolRunner<'a> {
    pub fn new(params: &ToolParams, tok: &'a Tokenizer) -> Result<Self, TrainError> {
        let toolbox = ToolBox::new(params.clone()).map_err(|e| TrainError::Data(e.to_string()))?;
        Ok(ToolRunner { toolbox, tok })
    }
}

impl Tools for ToolRunner<'_> {
    fn closed_call(&self, text: &str) -> Option<String> {
        self.toolbox.closed_call(text)
    }

    fn respond(&self, call: &str) -> ToolResponse {
        let (text, error) = self.toolbox.respond(call);
        match self.tok.encode(&text) {
            Ok(ids) => ToolResponse { ids, text, error },
            Err(e) => ToolResponse {
                ids: vec![],
                text: format!("the response could not be tokenized: {e}"),
                error: true,
            },
        }
    }

    fn settings(&self) -> ToolSettings {
        let p = self.toolbox.params();
        ToolSettings {
            max_calls: p.max_calls,
            max_response_tokens: p.max_response_tokens,
            overlap_steps: p.overlap_steps,
            responses_count_as_new_tokens: p.responses_count_as_new_tokens,
        }
    }
}

/// Zero `layout`'s mask at the tokens a tool inserted (`completions[r].sampled[i] == false`),
/// so they take no part in the loss, the KL, the entropy or any token count. `completions` are
/// the layout's rows, in order.
pub fn mask_responses(layout: &mut Layout, completions: &[&Completion]) {
    exclude_tokens(layout, completions.iter().map(|c| c.sampled.as_slice()));
}

/// `tools/*` metrics of a step's completions: calls per completion, the share of calls that
/// failed, seconds spent in tools (summed over calls), response tokens per completion.
pub fn tool_metrics(mt: &mut Map<String, Value>, completions: &[&Completion]) {
    let n = completions.len().max(1) as f64;
    let calls: Vec<_> = completions.iter().flat_map(|c| &c.tool_calls).collect();
    let errors = calls.iter().filter(|c| c.error).count();
    mt.insert(
        "tools/calls_per_completion".into(),
        num(calls.len() as f64 / n),
    );
    mt.insert(
        "tools/error_rate".into(),
        if calls.is_empty() {
            Value::Null
        } else {
            num(errors as f64 / calls.len() as f64)
        },
    );
    mt.insert(
        "tools/seconds".into(),
        num(calls.iter().map(|c| c.seconds).sum()),
    );
    let tokens: usize = calls.iter().map(|c| c.response_tokens).sum();
    mt.insert(
        "tools/response_tokens_per_completion".into(),
        num(tokens as f64 / n),
    );
}

/// A completion's calls as `samples.jsonl` shows them.
pub fn calls_json(c: &Completion) -> Value {
    Value::Array(
        c.tool_calls
            .iter()
            .map(|t| json!({"call": t.call, "response": t.response, "error": t.error}))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;
    use sobre_rollout::FinishReason;

    use super::*;
    use crate::kl::KlEstimator;
    use crate::losses::{LossSettings, PolicyLossInput, grpo};

    fn completion(tokens: Vec<u32>, sampled: Vec<bool>) -> Completion {
        Completion {
            prompt_index: 0,
            sample_index: 0,
            prompt_tokens: 2,
            logprobs: vec![0.0; tokens.len()],
            tokens,
            sampled,
            tool_calls: vec![],
            text: None,
            finish_reason: FinishReason::Stop,
        }
    }

    /// Row 0: 5 tokens, the middle two a tool's response; row 1: 3 sampled tokens. After
    /// [`mask_responses`] the loss's gradient reaches exactly the 6 sampled tokens.
    #[test]
    fn no_gradient_reaches_response_tokens() {
        let a = completion(vec![5, 6, 7, 8, 9], vec![true, false, false, true, true]);
        let b = completion(vec![4, 3, 2], vec![true; 3]);
        let prompt = [1u32, 2];
        let pairs: Vec<(&[u32], &[u32])> = vec![(&prompt, &a.tokens), (&prompt, &b.tokens)];
        let mut layout = Layout::new(&pairs, 0);
        mask_responses(&mut layout, &[&a, &b]);
        assert_eq!(
            layout.mask,
            vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
        );
        let device = sobre_model::default_device().autodiff();
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [2, 5]), &device);
        let logp = t((0..10).map(|i| -0.1 * (i + 1) as f32).collect()).require_grad();
        let input = PolicyLossInput {
            logp: logp.clone(),
            old_logp: logp.clone().detach(),
            ref_logp: None,
            advantages: t(vec![1.0; 10]),
            mask: t(layout.mask.clone()),
        };
        let settings = LossSettings {
            epsilon: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            kl: KlEstimator::K3,
            max_completion_length: 5,
            dapo_normalizer: 1.0,
        };
        let g = logp
            .grad(&grpo(&input, &settings).backward())
            .unwrap()
            .try_into_vec_as::<f32>()
            .unwrap();
        // grpo: −A / (row's loss tokens) / rows: row 0 has 3, row 1 has 3.
        let want = [
            -1.0 / 6.0,
            0.0,
            0.0,
            -1.0 / 6.0,
            -1.0 / 6.0,
            -1.0 / 6.0,
            -1.0 / 6.0,
            -1.0 / 6.0,
            0.0,
            0.0,
        ];
        for (x, w) in g.iter().zip(want) {
            assert!((x - w).abs() < 1e-6, "{g:?}");
        }
    }
}
