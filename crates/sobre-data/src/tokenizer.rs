//! Tokenizers: `tokenizer.json` files through the `tokenizers` crate, loaded from a model
//! directory or trained here as a small byte-level BPE for from-scratch runs.
//!
//! The trained tokenizer is Qwen2's design at a small vocabulary:
//! - pre-tokenizer: Qwen2's split regex (contractions, letter runs with one leading
//!   non-letter, **one digit per piece** — as Llama 3 and Qwen do — punctuation runs, newlines,
//!   spaces), then byte-level mapping. Splitting digits individually means numbers never merge
//!   into multi-digit tokens whose boundaries depend on the number, which is what arithmetic
//!   and countdown need: `1234` is always `1 2 3 4`.
//! - model: BPE over the 256 byte symbols (all kept, so any text round-trips), no unknown token.
//! - no normalizer (a normalizer would break exact round-trips), byte-level decoder.
//! - ids 0–5 are the added tokens, in this order: `<|endoftext|>` (end of text, eos),
//!   `<|pad|>` (padding), `<think>`, `</think>`, `<answer>`, `</answer>`. The first two are
//!   *special* (dropped by `decode(skip_special = true)`); the tag tokens are added but not
//!   special, as Qwen3 has `<think>`, so decoding always keeps them. None is ever split.
//!
//! It is saved as `tokenizer.json` + `tokenizer_config.json` (`PreTrainedTokenizerFast`, with
//! `clean_up_tokenization_spaces = false` so transformers decodes to the exact text);
//! `scripts/check_tokenizer.py` checks that transformers loads it and encodes identically.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, TokenizerBuilder};

use crate::template::special_token_text;

/// End of text; also the eos token.
pub const EOS: &str = "<|endoftext|>";
/// Padding.
pub const PAD: &str = "<|pad|>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";
pub const ANSWER_START: &str = "<answer>";
pub const ANSWER_END: &str = "</answer>";

/// Qwen2's pre-tokenizer split pattern (from Qwen2's `tokenizer.json`).
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Errors from loading, training, saving or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error(
        "vocab size {got} is too small: it must be at least {min} (256 bytes + the added tokens)"
    )]
    VocabTooSmall { got: usize, min: usize },
    #[error("added token `{0}` is empty or already a token of the tokenizer")]
    BadAddedToken(String),
    #[error("the tokenizer has no end-of-text token: set `eos_token` in tokenizer_config.json")]
    NoEos,
}

fn tk_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// Ids of the tokens the trainer needs by role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub eos: u32,
    /// The padding id (the eos id when the tokenizer has no pad token, as HF does).
    pub pad: u32,
    pub bos: Option<u32>,
    pub think_start: Option<u32>,
    pub think_end: Option<u32>,
    pub answer_start: Option<u32>,
    pub answer_end: Option<u32>,
}

/// Options for training a byte-level BPE.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Final vocabulary size, added tokens included (≥ 262).
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are not merged.
    pub min_frequency: u64,
    /// `model_max_length` written to `tokenizer_config.json`.
    pub model_max_length: usize,
    /// More tokens kept whole, like the R1 tags (never merged with their neighbours, never
    /// split): a tool's markers (`<calc>`, `</calc>`, `<result>`, `</result>`), so that a call
    /// closes on a token boundary and its response starts on one.
    pub added_tokens: Vec<String>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 1024,
            min_frequency: 2,
            model_max_length: 2048,
            added_tokens: vec![],
        }
    }
}

/// A tokenizer with its special-token ids and the fields of its `tokenizer_config.json`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    config: Value,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

fn added(content: &str, special: bool) -> AddedToken {
    AddedToken::from(content, special).normalized(false)
}

fn pre_tokenizer() -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tk_err)?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])))
}

type BpeImpl = tokenizers::TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

fn bpe_shell(model: BPE) -> Result<BpeImpl, TokenizerError> {
    TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(None)
        .with_pre_tokenizer(Some(pre_tokenizer()?))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        ))))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .map_err(tk_err)
}

impl Tokenizer {
    /// Trains a byte-level BPE on `texts` (see the module docs for its design).
    pub fn train<I, S>(texts: I, opts: &TrainOptions) -> Result<Tokenizer, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let mut specials = vec![
            added(EOS, true),
            added(PAD, true),
            added(THINK_START, false),
            added(THINK_END, false),
            added(ANSWER_START, false),
            added(ANSWER_END, false),
        ];
        for t in &opts.added_tokens {
            if t.is_empty() || specials.iter().any(|s| &s.content == t) {
                return Err(TokenizerError::BadAddedToken(t.clone()));
            }
            specials.push(added(t, false));
        }
        let min = 256 + specials.len();
        if opts.vocab_size < min {
            return Err(TokenizerError::VocabTooSmall {
                got: opts.vocab_size,
                min,
            });
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(opts.vocab_size)
            .min_frequency(opts.min_frequency)
            .show_progress(false)
            // The trainer reserves ids 0..6 for these, in order.
            .special_tokens(specials.to_vec())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tk = bpe_shell(BPE::default())?;
        tk.train(&mut trainer, texts).map_err(tk_err)?;
        // The trainer registers every reserved token as special; rebuild around the trained
        // model so the tag tokens are plain added tokens (kept by skip-special decoding).
        let mut fresh = bpe_shell(tk.get_model().clone())?;
        fresh.add_special_tokens(&specials[..2]);
        fresh.add_tokens(&specials[2..]);
        let inner = tokenizers::Tokenizer::from(fresh);
        let added_decoder: BTreeMap<String, Value> = specials
            .iter()
            .enumerate()
            .map(|(id, t)| {
                (
                    id.to_string(),
                    json!({
                        "content": t.content,
                        "lstrip": false,
                        "normalized": false,
                        "rstrip": false,
                        "single_word": false,
                        "special": t.special,
                    }),
                )
            })
            .collect();
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": null,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": null,
            "add_bos_token": false,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": opts.model_max_length,
            "added_tokens_decoder": added_decoder,
        });
        Tokenizer::with_config(inner, config)
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` if present) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| TokenizerError::File {
                path: tok_path.display().to_string(),
                message: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| TokenizerError::File {
                path: cfg_path.display().to_string(),
                message: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::File {
                path: cfg_path.display().to_string(),
                message: format!("not valid JSON: {e}"),
            })?
        } else {
            json!({})
        };
        Tokenizer::with_config(inner, config)
    }

    fn with_config(
        inner: tokenizers::Tokenizer,
        config: Value,
    ) -> Result<Tokenizer, TokenizerError> {
        let id_of =
            |key: &str| special_token_text(config.get(key)).and_then(|t| inner.token_to_id(&t));
        // Without a config, fall back on the end-of-text names common model families use.
        let eos = id_of("eos_token")
            .or_else(|| {
                [EOS, "<|im_end|>", "<|eot_id|>", "</s>", "<eos>"]
                    .iter()
                    .find_map(|t| inner.token_to_id(t))
            })
            .ok_or(TokenizerError::NoEos)?;
        let special = SpecialTokens {
            eos,
            pad: id_of("pad_token").unwrap_or(eos),
            bos: id_of("bos_token"),
            think_start: inner.token_to_id(THINK_START),
            think_end: inner.token_to_id(THINK_END),
            answer_start: inner.token_to_id(ANSWER_START),
            answer_end: inner.token_to_id(ANSWER_END),
        };
        Ok(Tokenizer {
            inner,
            special,
            config,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<(), TokenizerError> {
        let file_err = |path: &Path, e: String| TokenizerError::File {
            path: path.display().to_string(),
            message: e,
        };
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
        let tok_path = dir.join("tokenizer.json");
        let text = self.inner.to_string(true).map_err(tk_err)?;
        std::fs::write(&tok_path, text + "\n").map_err(|e| file_err(&tok_path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = serde_json::to_string_pretty(&self.config)
            .map_err(|e| file_err(&cfg_path, e.to_string()))?;
        std::fs::write(&cfg_path, cfg + "\n").map_err(|e| file_err(&cfg_path, e.to_string()))?;
        Ok(())
    }

    /// Sets (or clears) the `chat_template` saved in `tokenizer_config.json`.
    pub fn set_chat_template(&mut self, template: Option<&str>) {
        if let Value::Object(map) = &mut self.config {
            match template {
                Some(t) => map.insert("chat_template".into(), Value::String(t.into())),
                None => map.remove("chat_template"),
            };
        }
    }

    /// The `chat_template` of `tokenizer_config.json`, when it is a plain string.
    pub fn chat_template(&self) -> Option<&str> {
        self.config.get("chat_template")?.as_str()
    }

    /// Token ids of `text`, with no BOS/EOS added: special-token text in `text` (e.g.
    /// `<think>`) becomes its single id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Token strings of `text` (byte-level symbols, e.g. `Ġ` for a space), for display.
    pub fn tokens(&self, text: &str) -> Result<Vec<String>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tk_err)?
            .get_tokens()
            .to_vec())
    }

    /// Text of `ids`; with `skip_special`, eos/pad (and other special tokens) are dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens: the model's embedding needs this many rows.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The texts a sample contributes to tokenizer training: its prompt rendered with `template`
/// (so the template's words get merges too), its answer and its completion.
pub fn training_texts(
    sample: &crate::dataset::Sample,
    template: &crate::template::Template,
) -> Result<Vec<String>, crate::template::TemplateError> {
    let mut out = vec![template.render(&sample.prompt)?];
    out.extend(sample.answer.iter().cloned());
    out.extend(sample.completion.iter().cloned());
    Ok(out)
}
