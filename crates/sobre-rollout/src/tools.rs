//! Tool calls inside a rollout: the interface the generation loop drives.
//!
//! A completion may call a tool. After every sampled token the engine hands the text sampled
//! since the last tool response to [`Tools::closed_call`]; when that text holds a complete call
//! the sequence *pauses*: the call runs on a worker thread ([`Tools::respond`]) while the other
//! sequences of the batch keep decoding, and the paused sequence idles for exactly
//! [`ToolSettings::overlap_steps`] decode steps (masked cache slots, ignored by attention). Then
//! the engine takes the response (waiting only if the tool is still running) and feeds its
//! tokens one per decode step, *not sampled*: they carry log-probability 0 and
//! `Completion::sampled = false`, so training masks them out of the loss, the KL and the
//! entropy. Sampling resumes after the last response token, with the shared-prefix cache and
//! the positions as if the response had been part of the text all along.
//!
//! Determinism: the idle steps are a fixed number, not "until the tool is done", and a
//! response is a function of the call, so a completion does not depend on how long a tool took.
//!
//! The formats (Hermes' `<tool_call>…</tool_call>`, inline `<calc>…</calc>`), the tools and the
//! tokenizer live outside this crate (`sobre-reward::tools`, `sobre-train`), behind [`Tools`].

/// What the engine needs from a set of tools. `Sync`: calls run on worker threads.
pub trait Tools: Sync {
    /// The call that `text` (the completion's text after its last tool response, or all of it)
    /// completes, if any: the call's text, as [`Tools::respond`] reads it.
    fn closed_call(&self, text: &str) -> Option<String>;
    /// Run `call` and return its response as it is inserted into the completion (already
    /// wrapped in the format's response markers and tokenized). Errors are responses too (a
    /// real tool's error message comes back as text); `error` marks them for the metrics.
    fn respond(&self, call: &str) -> ToolResponse;
    fn settings(&self) -> ToolSettings;
}

/// Limits of the tool loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolSettings {
    /// Calls answered per completion; later calls stay plain text.
    pub max_calls: usize,
    /// A response is cut to this many tokens (the context the engine reserves per call).
    pub max_response_tokens: usize,
    /// Decode steps a paused sequence idles while its tool runs (a fixed number, so results do
    /// not depend on timing); the engine waits for tools slower than that.
    pub overlap_steps: usize,
    /// Whether response tokens count towards `max_new_tokens` (default: only sampled tokens
    /// do; responses count towards the context the engine reserves).
    pub responses_count_as_new_tokens: bool,
}

impl Default for ToolSettings {
    fn default() -> Self {
        ToolSettings {
            max_calls: 4,
            max_response_tokens: 32,
            overlap_steps: 4,
            responses_count_as_new_tokens: false,
        }
    }
}

/// A tool's answer, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResponse {
    /// Token ids inserted after the call (cut to `max_response_tokens`); never empty for a
    /// well-behaved implementation (the engine inserts nothing and resumes if it is).
    pub ids: Vec<u32>,
    /// The inserted text (for samples and metrics).
    pub text: String,
    /// The tool failed (bad arguments, unknown tool, timeout, non-zero exit).
    pub error: bool,
}

/// One answered call of a completion.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolCallRecord {
    pub call: String,
    pub response: String,
    pub error: bool,
    /// The tool's own running time (on its worker), seconds.
    pub seconds: f64,
    /// Index in `Completion::tokens` of the first response token.
    pub response_start: usize,
    /// Response tokens inserted.
    pub response_tokens: usize,
}
