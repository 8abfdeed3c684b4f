//! Rule-based rewards for reinforcement learning of reasoning models, as DeepSeek-R1 used them:
//! rewards a program can check. It scores a completion against its dataset row — the R1
//! `<think>…</think><answer>…</answer>` format, math answers by mathematical equivalence (aiming at
//! the verdicts of the `math-verify` Python package), countdown equations by exact rational
//! arithmetic, exact/regex matches, length shaping (open-r1's cosine reward, DAPO's soft overlong
//! penalty), an n-gram repetition penalty and R1's language-consistency reward (the share of the
//! chain of thought's words in one script) — and combines them with weights from a config.
//!
//! It is pure Rust with no tensor dependency: it does not sample, tokenize or train, and it knows
//! nothing of models. Every reward is a pure function of `(sample, completion)` that never panics
//! and finishes in bounded time on any input (1 MB strings, deep nesting, `9^9^9^9`).
//!
//! Two rewards run programs: `code` runs the completion's code against the sample's tests in a
//! [`sandbox`], and `command` asks a long-lived verifier program of the user's over JSON lines.
//! Both score batches in parallel through [`CombinedReward::score_batch`].
//!
//! ```
//! use sobre_reward::{CombinedReward, Completion, Sample};
//!
//! let rewards = CombinedReward::from_toml(r#"
//!     [[reward]]
//!     name = "accuracy"
//!     weight = 1.0
//!     [[reward]]
//!     name = "format"
//!     weight = 0.5
//!     mode = "lenient"
//! "#).unwrap();
//! let sample: Sample = serde_json::from_str(r#"{"answer": "\\frac{1}{2}"}"#).unwrap();
//! let out = rewards.score(&sample, &Completion::new("<think>half</think><answer>0.5</answer>"));
//! assert_eq!(out.total, 1.5);
//! assert_eq!(out.components[0], ("accuracy".to_string(), Some(1.0)));
//! ```

pub mod accuracy;
pub mod bench;
pub mod code;
pub mod command;
pub mod countdown;
mod error;
pub mod format;
pub mod language;
pub mod length;
pub mod matching;
pub mod math;
pub mod registry;
pub mod repetition;
pub mod sandbox;
pub mod tools;

pub use error::RewardError;
pub use registry::{
    CombinedReward, RewardBreakdown, RewardSpec, build_reward, check_reward, reward_names,
};

/// A dataset row: the fields rewards read by name (`answer`, `nums`, `target`, …).
pub type Sample = serde_json::Map<String, serde_json::Value>;

/// What a reward sees of one generated completion.
#[derive(Debug, Clone, Copy, Default)]
pub struct Completion<'a> {
    /// The generated text (without the prompt).
    pub text: &'a str,
    /// Its length in tokens, when the caller knows it (length rewards use characters otherwise).
    pub num_tokens: Option<usize>,
    /// Whether generation stopped at the token limit rather than at a stop token.
    pub truncated: bool,
    /// The generation limit (`max_new_tokens`), when the caller knows it.
    pub max_tokens: Option<usize>,
}

impl<'a> Completion<'a> {
    /// A completion known only by its text.
    pub fn new(text: &'a str) -> Self {
        Completion {
            text,
            ..Default::default()
        }
    }

    /// Length in tokens if known, else in characters.
    pub fn length(&self) -> usize {
        self.num_tokens.unwrap_or_else(|| self.text.chars().count())
    }
}

/// One reward's verdict on one completion: its score and, for rewards that report several
/// ([`Reward::components`]), each component's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scores {
    /// The reward's score (what its weight multiplies); `None`: does not apply.
    pub value: Option<f32>,
    /// One entry per name of [`Reward::components`], in that order.
    pub components: Vec<Option<f32>>,
}

impl Scores {
    /// A score with no components.
    pub fn single(value: Option<f32>) -> Self {
        Scores {
            value,
            components: Vec::new(),
        }
    }
}

/// A reward: a named pure function of a sample and a completion.
///
/// `None` means the reward does not apply to this sample (for example `countdown` on a row with
/// no `nums`); [`CombinedReward`] counts it as 0 in the total and reports it as `null`.
pub trait Reward: Send + Sync {
    /// The registry name (`"accuracy"`, `"format"`, …).
    fn name(&self) -> &str;
    /// Score one completion.
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Option<f32>;
    /// Names of the components this reward reports beside its own score (logged as
    /// `name/component`); none by default.
    fn components(&self) -> &[String] {
        &[]
    }
    /// Score many completions at once. Rewards that run programs (`code`, `command`) run them
    /// in parallel here; the default scores one by one. An error is a failure of the reward
    /// itself (a verifier that keeps crashing, a malformed reply), never of a completion.
    fn score_batch(&self, items: &[(&Sample, Completion<'_>)]) -> Result<Vec<Scores>, RewardError> {
        Ok(items
            .iter()
            .map(|(s, c)| Scores::single(self.score(s, c)))
            .collect())
    }
}

impl std::fmt::Debug for dyn Reward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reward({})", self.name())
    }
}
