//! One module per subcommand: an `Args` struct (clap) and a `run(Args) -> anyhow::Result<()>`.

pub mod bench;
pub mod data;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod plot;
pub mod reward;
pub mod tokenizer;
pub mod train;
