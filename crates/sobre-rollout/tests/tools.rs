//! Tool calls inside a rollout: a paused sequence equals itself decoded alone, response tokens
//! are inserted unsampled, sampled tokens' log-probabilities equal training's, and a slow tool
//! changes nothing but the time.

use std::time::Duration;

use sobre_model::{ForwardOptions, ModelConfig, MoeModel, default_device, init_model};
use sobre_rollout::{
    Completion, Detokenizer, EngineKernels, EngineMode, FinishReason, Io, Prompt, SamplingParams,
    ScoredBatch, ToolResponse, ToolSettings, Tools, completion_logprobs, generate_on,
    generate_with_tools,
};

fn test_model(seed: u64) -> MoeModel {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.initializer_range = 0.25;
    init_model(&c, seed, &default_device())
}

/// Token `i` is the letter `a + i mod 26`.
struct Letters;
impl Detokenizer for Letters {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| char::from(b'a' + (i % 26) as u8))
            .collect()
    }
}

/// A call is any text up to its first `q`, `x` or `z`; the response is three tokens made from
/// the call (a function of it), after `delay`.
struct Echo {
    settings: ToolSettings,
    delay: Duration,
    empty: bool,
}

impl Echo {
    fn new(overlap_steps: usize) -> Echo {
        Echo {
            settings: ToolSettings {
                max_calls: 3,
                max_response_tokens: 8,
                overlap_steps,
                responses_count_as_new_tokens: false,
            },
            delay: Duration::ZERO,
            empty: false,
        }
    }
}

impl Tools for Echo {
    fn closed_call(&self, text: &str) -> Option<String> {
        let end = text.find(['q', 'x', 'z'])?;
        Some(text[..=end].to_string())
    }
    fn respond(&self, call: &str) -> ToolResponse {
        std::thread::sleep(self.delay);
        let ids = if self.empty {
            vec![]
        } else {
            vec![60, (call.len() % 50) as u32 + 1, 61]
        };
        ToolResponse {
            text: Letters.decode(&ids),
            ids,
            error: false,
        }
    }
    fn settings(&self) -> ToolSettings {
        self.settings
    }
}

fn prompts() -> Vec<Prompt> {
    (0..4)
        .map(|k| Prompt {
            ids: (0..3 + k as u32).map(|i| 5 + i * 3 + k as u32).collect(),
            key: k,
        })
        .collect()
}

fn params() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        max_new_tokens: 20,
        seed: 11,
        ..Default::default()
    }
}

fn run(
    model: &MoeModel,
    p: &[Prompt],
    group: usize,
    tools: &Echo,
    mode: EngineMode,
) -> Vec<Completion> {
    let io = Io {
        detok: Some(&Letters),
        tools: Some(tools),
    };
    generate_on(model, p, group, &params(), io, mode, EngineKernels::Host).unwrap()
}

fn same(a: &Completion, b: &Completion, tol: f32) {
    assert_eq!(a.tokens, b.tokens, "tokens differ");
    assert_eq!(a.sampled, b.sampled);
    assert_eq!(a.finish_reason, b.finish_reason);
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        assert!((x - y).abs() <= tol, "logprob {x} vs {y}");
    }
    let calls = |c: &Completion| {
        c.tool_calls
            .iter()
            .map(|t| {
                (
                    t.call.clone(),
                    t.response.clone(),
                    t.response_start,
                    t.response_tokens,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(calls(a), calls(b));
}

#[test]
fn a_paused_sequence_inside_a_batch_equals_it_decoded_alone() {
    let m = test_model(3);
    let p = prompts();
    for overlap in [0, 3] {
        let tools = Echo::new(overlap);
        let batch = run(&m, &p, 4, &tools, EngineMode::SharedPrefill);
        let calls: usize = batch.iter().map(|c| c.tool_calls.len()).sum();
        assert!(
            calls >= 8,
            "too few calls ({calls}) for the test to mean anything"
        );
        assert!(
            batch.iter().any(|c| c.tool_calls.is_empty()),
            "some rows never pause"
        );
        for c in &batch {
            // Each row alone: its prompt, its own sample stream (group of one is sample 0).
            if c.sample_index == 0 {
                let alone = run(
                    &m,
                    &p[c.prompt_index..=c.prompt_index],
                    1,
                    &tools,
                    EngineMode::SharedPrefill,
                );
                same(c, &alone[0], 1e-5);
            }
        }
        // The reference engine (no cache, no idle slots) agrees.
        let reference = run(&m, &p, 4, &tools, EngineMode::NoCache);
        for (a, b) in batch.iter().zip(&reference) {
            same(a, b, 1e-4);
        }
    }
}

#[test]
fn responses_are_inserted_unsampled_and_sampled_logprobs_equal_training() {
    let m = test_model(4);
    let p = prompts();
    let tools = Echo::new(2);
    let out = run(&m, &p, 3, &tools, EngineMode::SharedPrefill);
    let mut responses = 0;
    for c in &out {
        assert_eq!(c.tokens.len(), c.sampled.len());
        assert_eq!(c.tokens.len(), c.logprobs.len());
        assert!(c.tool_calls.len() <= 3);
        let sampled = c.sampled.iter().filter(|&&s| s).count();
        assert!(
            sampled <= 20,
            "responses do not count towards max_new_tokens"
        );
        for t in &c.tool_calls {
            let span = t.response_start..t.response_start + t.response_tokens;
            assert_eq!(t.response_tokens, 3);
            assert_eq!(c.tokens[span.start], 60);
            assert_eq!(c.tokens[span.end - 1], 61);
            assert!(span.clone().all(|i| !c.sampled[i] && c.logprobs[i] == 0.0));
            // The call ends right before its response, in the text sampled since the last one.
            assert!(t.call.ends_with(['q', 'x', 'z']), "{}", t.call);
            responses += 1;
        }
        let unsampled = c.sampled.iter().filter(|&&s| !s).count();
        assert_eq!(unsampled, 3 * c.tool_calls.len());
    }
    assert!(responses >= 6, "{responses}");
    // Training's forward over the whole transcript: the sampled tokens' log-probs agree.
    let pairs: Vec<(&[u32], &[u32])> = out
        .iter()
        .map(|c| (p[c.prompt_index].ids.as_slice(), c.tokens.as_slice()))
        .collect();
    let scored = ScoredBatch::new(&pairs, 0);
    let (lp, _) = completion_logprobs(&m, &scored, 1.0, ForwardOptions::default());
    let lp: Vec<f32> = lp.try_into_vec_as::<f32>().unwrap();
    let width = scored.max_completion;
    for (r, c) in out.iter().enumerate() {
        for (i, (&x, &s)) in c.logprobs.iter().zip(&c.sampled).enumerate() {
            if s {
                let y = lp[r * width + i];
                assert!(
                    (x - y).abs() < 1e-4,
                    "row {r} token {i}: rollout {x} vs training {y}"
                );
            }
        }
    }
}

#[test]
fn a_slow_tool_changes_only_the_time_and_an_empty_response_stops() {
    let m = test_model(3);
    let p = prompts();
    let fast = Echo::new(2);
    let slow = Echo {
        delay: Duration::from_millis(30),
        ..Echo::new(2)
    };
    let a = run(&m, &p, 2, &fast, EngineMode::SharedPrefill);
    let b = run(&m, &p, 2, &slow, EngineMode::SharedPrefill);
    for (x, y) in a.iter().zip(&b) {
        same(x, y, 0.0);
    }
    let slowest = b
        .iter()
        .flat_map(|c| &c.tool_calls)
        .map(|t| t.seconds)
        .fold(0.0, f64::max);
    assert!(slowest >= 0.03, "{slowest}");

    let empty = Echo {
        empty: true,
        ..Echo::new(2)
    };
    let params = params();
    let io = Io {
        detok: Some(&Letters),
        tools: Some(&empty),
    };
    let out = generate_with_tools(&m, &p, 2, &params, io.detok, io.tools).unwrap();
    assert!(out.iter().any(|c| !c.tool_calls.is_empty()));
    for c in out.iter().filter(|c| !c.tool_calls.is_empty()) {
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(c.finish_reason, FinishReason::Stop);
        assert_eq!(c.tool_calls[0].response_tokens, 0);
        assert!(c.sampled.iter().all(|&s| s));
    }
    // Tools without a detokenizer are refused.
    let err = generate_with_tools(&m, &p, 1, &params, None, Some(&empty))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tools need a tokenizer"), "{err}");
}

/// Opens a call on `q` and closes it only on `z`: a sequence that opens one and reaches
/// `max_new_tokens` before closing it ends with `length`, unanswered.
struct OpenOnQ;
impl Tools for OpenOnQ {
    fn closed_call(&self, text: &str) -> Option<String> {
        let start = text.find('q')?;
        let end = text[start..].find('z')? + start;
        Some(text[start..=end].to_string())
    }
    fn respond(&self, call: &str) -> ToolResponse {
        ToolResponse {
            ids: vec![60, 61],
            text: format!("[{call}]"),
            error: false,
        }
    }
    fn settings(&self) -> ToolSettings {
        ToolSettings {
            max_calls: 2,
            max_response_tokens: 4,
            overlap_steps: 1,
            responses_count_as_new_tokens: false,
        }
    }
}

#[test]
fn an_unterminated_call_ends_at_max_new_tokens_unanswered() {
    let m = test_model(5);
    let params = SamplingParams {
        ignore_eos: true,
        ..params()
    };
    let out =
        generate_with_tools(&m, &prompts(), 4, &params, Some(&Letters), Some(&OpenOnQ)).unwrap();
    let mut unterminated = 0;
    for c in &out {
        let sampled = c.sampled.iter().filter(|&&s| s).count();
        assert_eq!((sampled, c.finish_reason), (20, FinishReason::Length));
        // The text after the last response: an open call there was never answered.
        let tail_start = c
            .tool_calls
            .last()
            .map_or(0, |t| t.response_start + t.response_tokens);
        let tail = Letters.decode(&c.tokens[tail_start..]);
        if let Some(q) = tail.find('q')
            && !tail[q..].contains('z')
        {
            unterminated += 1;
        }
        assert!(c.tool_calls.len() <= 2);
    }
    assert!(unterminated > 0, "no completion ended inside an open call");
}
