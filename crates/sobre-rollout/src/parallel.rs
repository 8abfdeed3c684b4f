//! Data parallelism on one machine: a batch cut into contiguous shards, one thread each.
//!
//! sobre builds burn's CPU backend without its rayon feature, so every tensor op runs on the
//! thread that calls it (splitting ops across cores as well measured slower beside replicas:
//! docs/PERF.md item 8), and one thread is one core. Shards of a batch on their own threads
//! (rollout engines in [`crate::generate`](mod@crate::generate); model replicas with their own autodiff graphs in the
//! trainer's `optim::sharded_gradients`) are how a step uses more cores — what `torchrun
//! --nproc_per_node` does with processes. The shards are fixed by `run.data_parallel_size`,
//! never by the machine, so a run's results do not depend on how many cores it finds.

use std::ops::Range;

/// `range` cut into `parts` contiguous pieces whose lengths differ by at most one (the longer
/// ones first); fewer pieces when the range is shorter than `parts`, never an empty one (an
/// empty range gives one empty piece).
pub fn split_range(range: Range<usize>, parts: usize) -> Vec<Range<usize>> {
    let n = parts.clamp(1, range.len().max(1));
    let (base, extra) = (range.len() / n, range.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut start = range.start;
    for i in 0..n {
        let end = start + base + usize::from(i < extra);
        out.push(start..end);
        start = end;
    }
    out
}

/// `f` applied to every item, each on its own scoped thread (inline when there is one item);
/// results in item order. A panic in `f` is passed on as is.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items.iter().map(|t| scope.spawn(move || f(t))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_range_is_contiguous_balanced_and_never_empty() {
        assert_eq!(split_range(0..128, 2), vec![0..64, 64..128]);
        assert_eq!(split_range(10..15, 2), vec![10..13, 13..15]);
        assert_eq!(split_range(0..7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(split_range(4..6, 8), vec![4..5, 5..6]);
        assert_eq!(split_range(3..3, 2), vec![3..3]);
        assert_eq!(split_range(0..5, 0), vec![0..5]);
    }

    #[test]
    fn par_map_keeps_item_order() {
        let items: Vec<u64> = (0..5).collect();
        let out = par_map(&items, |&x| {
            // Later items finish first.
            std::thread::sleep(std::time::Duration::from_millis(5 * (5 - x)));
            x * 10
        });
        assert_eq!(out, vec![0, 10, 20, 30, 40]);
    }
}
