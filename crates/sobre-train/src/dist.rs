//! Data parallelism across processes: the ranks of a process group, each holding
//! `run.data_parallel_size` model replicas on threads ([`crate::parallel`]).
//!
//! A run with `N` ranks of `D` replicas cuts every batch into `N·D` shards, exactly as one
//! process with `N·D` replicas would, and rank `r` runs a contiguous block of them
//! ([`local_shards`]). What the ranks exchange is what the replicas of one process already
//! combine: every shard's completions ([`generate_all`]), the gradients (summed,
//! [`reduce_grads`]), the router's token totals for the balance loss, and each shard's
//! statistics ([`all_gather_concat`]). Every rank then applies the same AdamW step to the same
//! weights, so the weights never need to be sent. Rank 0 alone writes logs, samples and
//! checkpoints ([`is_main`]).
//!
//! The process group is global, as `torch.distributed`'s default group is: one [`Single`]
//! process unless the binary installs another ([`set_world`]), e.g. MPI's world under
//! `mpirun` (feature `mpi`, [`mpi`]).

use std::ops::Range;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sobre_model::MoeModel;
use sobre_rollout::{
    Completion, Detokenizer, Prompt, RolloutError, SamplingParams, Tools, generate_with_tools,
};

use crate::optim::HostGrad;
use crate::parallel::split_range;

/// The collective operations a process group offers. Every rank must make the same calls in
/// the same order (as with MPI); a rank that cannot go on ends the job ([`Collective::abort`])
/// rather than leave its peers waiting.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place; every rank gets the result.
    fn all_reduce_f32(&self, data: &mut [f32]);
    /// [`Collective::all_reduce_f32`] for `f64`.
    fn all_reduce_f64(&self, data: &mut [f64]);
    /// Every rank's bytes, in rank order.
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>>;
    /// End every rank of the job with `code` (MPI_Abort); returns only in a lone process.
    fn abort(&self, code: i32);
}

/// One process: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) {}
    fn all_reduce_f64(&self, _: &mut [f64]) {}
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        vec![mine.to_vec()]
    }
    fn abort(&self, _: i32) {}
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Install the process group; once per process, before any training. `Err` gives `world`
/// back when one is already installed.
pub fn set_world(world: Box<dyn Collective>) -> Result<(), Box<dyn Collective>> {
    WORLD.set(world)
}

/// The process group ([`Single`] unless [`set_world`] installed another).
pub fn world() -> &'static dyn Collective {
    WORLD.get_or_init(|| Box::new(Single)).as_ref()
}

/// Whether this process writes the run's files (rank 0).
pub fn is_main() -> bool {
    world().rank() == 0
}

/// Whether `flag` is set on any rank (a Ctrl-C that reached some ranks stops them all at the
/// same step).
pub fn any(flag: bool) -> bool {
    let mut v = [f64::from(u8::from(flag))];
    world().all_reduce_f64(&mut v);
    v[0] > 0.0
}

/// Wait until every rank is here.
pub fn barrier() {
    if world().size() > 1 {
        world().all_reduce_f64(&mut [0.0]);
    }
}

/// Run `write` on rank 0 (the one that writes the run's files), then wait until every rank is
/// here: the others may read what it wrote next. An error on rank 0 is returned there before
/// the barrier; the binary then ends the job ([`fail`]), so no rank waits forever.
pub fn written_by_main<E>(write: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
    if is_main() {
        write()?;
    }
    barrier();
    Ok(())
}

/// The sum of `x` over the ranks.
pub fn sum(x: f64) -> f64 {
    let mut v = [x];
    world().all_reduce_f64(&mut v);
    v[0]
}

/// Of `n` shards, the block rank `rank` of `size` runs: contiguous, near-equal, longer blocks
/// first (empty when there are fewer shards than ranks).
pub fn local_shards_of(n: usize, rank: usize, size: usize) -> Range<usize> {
    split_range(0..n, size)
        .into_iter()
        .filter(|r| !r.is_empty())
        .nth(rank)
        .unwrap_or(n..n)
}

/// [`local_shards_of`] for this process.
pub fn local_shards(n: usize) -> Range<usize> {
    local_shards_of(n, world().rank(), world().size())
}

/// Replicas over all ranks: how many shards a batch is cut into.
pub fn total_replicas(data_parallel_size: usize) -> usize {
    data_parallel_size.max(1) * world().size()
}

/// Every rank's `local`, concatenated in rank order. A rank that cannot read what a peer sent
/// (different sobre builds) ends the job.
pub fn all_gather_concat<T: Serialize + DeserializeOwned>(local: Vec<T>) -> Vec<T> {
    let w = world();
    if w.size() == 1 {
        return local;
    }
    let bytes = postcard::to_allocvec(&local).unwrap_or_else(|e| {
        fail(&format!(
            "cannot encode what this rank sends its peers: {e}"
        ));
        Vec::new()
    });
    drop(local);
    let mut out = Vec::new();
    for (rank, b) in w.all_gather(&bytes).iter().enumerate() {
        match postcard::from_bytes::<Vec<T>>(b) {
            Ok(v) => out.extend(v),
            Err(e) => fail(&format!(
                "cannot read what rank {rank} sent ({e}): do all ranks run the same sobre build?"
            )),
        }
    }
    out
}

/// Print `msg` as this rank's error and end the job (every rank: the others would wait for
/// this one forever).
pub fn fail(msg: &str) {
    let w = world();
    eprintln!("error: rank {} of {}: {msg}", w.rank(), w.size());
    w.abort(1);
}

/// Sum the ranks' gradients. Each rank's list holds the parameters its shards reached (an
/// expert no token of a shard was routed to has none), so the lists are merged by path in rank
/// order — the order [`crate::optim::accumulate`] gives one process's shards — and summed one
/// tensor at a time (no second copy of all the gradients). `None` (a shard whose loss was not
/// finite) on any rank is `None` on every rank.
pub fn reduce_grads(local: Option<Vec<HostGrad>>) -> Option<Vec<HostGrad>> {
    let w = world();
    if w.size() == 1 {
        return local;
    }
    if any(local.is_none()) {
        return None;
    }
    let local = local.unwrap_or_default();
    let heads: Vec<(String, Vec<usize>)> = local
        .iter()
        .map(|g| (g.path.clone(), g.shape.clone()))
        .collect();
    let all_heads = all_gather_concat(vec![heads]);
    let mut union: Vec<(String, Vec<usize>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (path, shape) in all_heads.into_iter().flatten() {
        if seen.insert(path.clone()) {
            union.push((path, shape));
        }
    }
    let mut mine: std::collections::HashMap<String, Vec<f32>> =
        local.into_iter().map(|g| (g.path, g.values)).collect();
    let summed = union
        .into_iter()
        .map(|(path, shape)| {
            let numel = shape.iter().product::<usize>();
            let mut values = mine.remove(&path).unwrap_or_else(|| vec![0.0; numel]);
            if values.len() != numel {
                fail(&format!(
                    "the gradient of `{path}` has {} values here but shape {shape:?} on a peer",
                    values.len()
                ));
            }
            w.all_reduce_f32(&mut values);
            HostGrad {
                path,
                shape,
                values,
            }
        })
        .collect();
    Some(summed)
}

/// [`generate_with_tools`] over the ranks: the prompts cut into `ranks × data_parallel_size`
/// shards as one process with that many replicas would cut them, rank `r` decoding its block
/// (its own replicas on threads), and every rank given every completion, ordered by prompt. A
/// rollout error on any rank is the error of every rank.
pub fn generate_all(
    model: &MoeModel,
    prompts: &[Prompt],
    group_size: usize,
    params: &SamplingParams,
    detok: Option<&dyn Detokenizer>,
    tools: Option<&dyn Tools>,
) -> Result<Vec<Completion>, RolloutError> {
    if world().size() == 1 {
        return generate_with_tools(model, prompts, group_size, params, detok, tools);
    }
    let shards = split_range(0..prompts.len(), total_replicas(params.data_parallel_size));
    let block = local_shards(shards.len());
    let range = if block.is_empty() {
        0..0
    } else {
        shards[block.start].start..shards[block.end - 1].end
    };
    let local: Result<Vec<Completion>, String> = if range.is_empty() {
        Ok(Vec::new())
    } else {
        generate_with_tools(
            model,
            &prompts[range.clone()],
            group_size,
            params,
            detok,
            tools,
        )
        .map(|cs| {
            cs.into_iter()
                .map(|mut c| {
                    c.prompt_index += range.start;
                    c
                })
                .collect()
        })
        .map_err(|e| e.to_string())
    };
    let mut out = Vec::with_capacity(prompts.len() * group_size);
    for (rank, part) in all_gather_concat(vec![local]).into_iter().enumerate() {
        match part {
            Ok(cs) => out.extend(cs),
            Err(e) => return Err(RolloutError::Params(format!("on rank {rank}: {e}"))),
        }
    }
    Ok(out)
}

/// Keeps the process group up for the run (MPI is finalised when it drops).
pub struct WorldGuard {
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi::MpiGuard>,
}

/// Whether the environment says an MPI launcher (`mpirun`, `mpiexec`, `srun` over PMI/PMIx)
/// started this process, and with how many ranks when it tells (Open MPI's, MPICH's and
/// Slurm's variables).
pub fn mpi_launch_size() -> Option<usize> {
    let vars = [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ];
    let told = vars.iter().find_map(|v| std::env::var(v).ok());
    match told {
        Some(n) => Some(n.trim().parse().unwrap_or(0)),
        None => std::env::var_os("PMIX_RANK").map(|_| 0),
    }
}

impl WorldGuard {
    /// Leave the process group now (MPI_Finalize; every rank must): before
    /// `std::process::exit`, which runs no destructors.
    pub fn finalize(self) {}
}

/// Join the process group `launcher` (`run.launcher`) names, as the first thing a run does.
pub fn launch(launcher: &str) -> Result<WorldGuard, String> {
    let told = mpi_launch_size();
    let use_mpi = match launcher {
        "local" => false,
        "mpi" => true,
        _ => told.is_some_and(|n| n != 1),
    };
    if !use_mpi {
        return Ok(WorldGuard {
            #[cfg(feature = "mpi")]
            _mpi: None,
        });
    }
    #[cfg(feature = "mpi")]
    {
        Ok(WorldGuard {
            _mpi: Some(mpi::init()?),
        })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let why = match told {
            Some(n) if n > 1 => format!(
                "an MPI launcher started this process as one of {n} ranks, but this sobre was \
                 built without the `mpi` feature: each rank would run the whole job alone"
            ),
            _ => "`run.launcher = \"mpi\"` needs a sobre built with the `mpi` feature".into(),
        };
        Err(format!(
            "{why}. Build with `cargo build --release -p sobre-cli --features mpi` \
             (scripts/test-mpi.sh installs what it needs), or set run.launcher = \"local\""
        ))
    }
}

#[cfg(feature = "mpi")]
pub mod mpi;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_is_run_by_exactly_one_rank_in_order() {
        for n in 0..9 {
            for size in 1..5 {
                let blocks: Vec<Range<usize>> =
                    (0..size).map(|r| local_shards_of(n, r, size)).collect();
                let covered: Vec<usize> = blocks.iter().flat_map(|b| b.clone()).collect();
                assert_eq!(covered, (0..n).collect::<Vec<_>>(), "n {n} size {size}");
            }
        }
        assert_eq!(local_shards_of(4, 0, 2), 0..2);
        assert_eq!(local_shards_of(4, 1, 2), 2..4);
        assert_eq!(local_shards_of(3, 1, 2), 2..3);
        assert_eq!(local_shards_of(1, 1, 2), 1..1);
    }

    #[test]
    fn one_process_collectives_are_the_identity() {
        assert_eq!(world().size(), 1);
        assert!(is_main());
        assert!(any(true) && !any(false));
        assert_eq!(sum(2.5), 2.5);
        assert_eq!(all_gather_concat(vec![1u32, 2]), vec![1, 2]);
        let g = vec![HostGrad {
            path: "a".into(),
            shape: vec![2],
            values: vec![1.0, -2.0],
        }];
        assert_eq!(
            reduce_grads(Some(g.clone())).unwrap()[0].values,
            g[0].values
        );
        assert!(reduce_grads(None).is_none());
        assert_eq!(local_shards(3), 0..3);
    }

    #[test]
    fn completions_survive_the_wire_format_with_non_finite_values() {
        let c = Completion {
            prompt_index: 3,
            sample_index: 1,
            prompt_tokens: 5,
            tokens: vec![7, 8],
            logprobs: vec![-0.5, f32::NEG_INFINITY],
            sampled: vec![true, false],
            tool_calls: vec![],
            text: Some("x".into()),
            finish_reason: sobre_rollout::FinishReason::Length,
        };
        let bytes = postcard::to_allocvec(&vec![(c.clone(), f64::NAN)]).unwrap();
        let back: Vec<(Completion, f64)> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back[0].0.tokens, c.tokens);
        assert_eq!(back[0].0.logprobs, c.logprobs);
        assert_eq!(back[0].0.finish_reason, c.finish_reason);
        assert!(back[0].1.is_nan());
    }
}
