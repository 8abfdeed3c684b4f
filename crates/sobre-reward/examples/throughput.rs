//! Quick throughput check without the CLI: `cargo run --release -p sobre-reward --example throughput`.
//! `sobre bench rewards` is the reported figure; this is the same loop.

use sobre_reward::{CombinedReward, Completion};
use std::time::Instant;

fn main() -> Result<(), sobre_reward::RewardError> {
    let data = sobre_reward::bench::realistic_completions(2000, 0);
    for names in [&["format"][..], &["format", "accuracy"][..]] {
        let rewards = CombinedReward::from_names(names)?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < 2.0 {
            for (s, t) in &data {
                std::hint::black_box(rewards.score(s, &Completion::new(t)));
                n += 1;
            }
        }
        println!(
            "{names:?}: {:.0} evals/s",
            n as f64 / start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
