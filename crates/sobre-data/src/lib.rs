//! `sobre-data`: everything between a dataset on disk and the token ids a model sees.
//!
//! It reads datasets (JSONL and Parquet, TRL's field names by default, a field mapping for verl
//! and GSM8K layouts), generates checkable task problems (`countdown`, `arithmetic`,
//! `functions`) from a seed with byte-identical output on every machine, writes solver-made R1-style demonstrations for
//! cold-start SFT, renders prompts (R1-Zero's template, a plain one, Hugging Face chat templates
//! through minijinja) and turns text into token ids and back (`tokenizer.json` through the
//! `tokenizers` crate, or a small byte-level BPE trained here for from-scratch runs).
//!
//! It is not for: scoring completions (that is `sobre-reward`), batching/padding tensors or
//! anything that needs burn (that is `sobre-train`/`sobre-rollout`), or downloading from the Hub.
//! The crate does no I/O it is not asked to do and has no global state.
//!
//! The trainer's path through it:
//!
//! ```no_run
//! use sobre_data::{tasks::{self, Split, TaskConfig}, template::Template, tokenizer::Tokenizer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let task = TaskConfig::Countdown(Default::default());
//! let train = tasks::generate(&task, Split::Train, 1000, 42, false)?;
//! let eval = tasks::generate(&task, Split::Eval, 200, 42, false)?;
//! let prompt = Template::R1Zero.render(&train[0].prompt)?;
//! let tok = Tokenizer::from_dir("runs/tok".as_ref())?;
//! let ids = tok.encode(&prompt)?;
//! assert_eq!(tok.decode(&ids, false)?, prompt);
//! let eos = tok.special().eos;
//! # let _ = (eval, eos); Ok(()) }
//! ```

pub mod check;
pub mod dataset;
pub mod parquet;
pub mod shipped;
pub mod tasks;
pub mod template;
pub mod tokenizer;

pub use dataset::{DataError, DatasetConfig, Location, Message, Prompt, Sample};
pub use tasks::{Split, TaskConfig};
pub use template::Template;
pub use tokenizer::Tokenizer;
