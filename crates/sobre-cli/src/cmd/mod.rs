//! One module per subcommand: an `Args` struct (clap) and a `run(Args) -> anyhow::Result<()>`.

pub mod generate;
pub mod inspect;
pub mod logits;
pub mod reward;
pub mod bench;
pub mod data;
pub mod tokenizer;
pub mod train;
pub mod eval;
pub mod plot;
