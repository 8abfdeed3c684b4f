//! Errors from building rewards out of configuration.

/// Why a reward configuration was refused. Messages name the reward and the key.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// No reward is registered under this name.
    #[error("unknown reward `{name}`; valid names are: {}", valid.join(", "))]
    UnknownReward {
        name: String,
        valid: Vec<&'static str>,
    },
    /// A parameter of a known reward is unknown, has the wrong type, or a bad value.
    #[error("reward `{reward}`: parameter `{key}`: {message}")]
    Param {
        reward: String,
        key: String,
        message: String,
    },
    /// A `[[reward]]` table is malformed (no `name`, non-numeric `weight`, …).
    #[error("reward table: {0}")]
    Spec(String),
    /// A reward cannot work here (no sandbox on this OS, a verifier that does not start).
    #[error("reward `{reward}`: {message}")]
    Setup { reward: String, message: String },
    /// A reward failed while scoring (a verifier that keeps crashing, a malformed reply).
    #[error("reward `{reward}`: {message}")]
    Runtime { reward: String, message: String },
    /// The TOML text itself does not parse.
    #[error("reward config: {0}")]
    Toml(String),
}
