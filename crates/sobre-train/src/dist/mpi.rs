//! MPI's world as the process group (feature `mpi`): `mpirun -np N sobre train …`.

use std::sync::{Mutex, MutexGuard};

use ::mpi::Threading;
use ::mpi::collective::SystemOperation;
use ::mpi::datatype::PartitionMut;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;

use super::{Collective, set_world};

/// MPI's world communicator behind a lock.
struct MpiWorld {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: MPI was initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), which
// allows any thread to call MPI as long as no two do at once; every call goes through `comm`'s
// lock, so none ever do.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    fn comm(&self) -> MutexGuard<'_, SimpleCommunicator> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_f32(&self, data: &mut [f32]) {
        let send = data.to_vec();
        self.comm()
            .all_reduce_into(&send[..], data, SystemOperation::sum());
    }
    fn all_reduce_f64(&self, data: &mut [f64]) {
        let send = data.to_vec();
        self.comm()
            .all_reduce_into(&send[..], data, SystemOperation::sum());
    }
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let comm = self.comm();
        let len = i32::try_from(mine.len()).unwrap_or_else(|_| {
            comm.abort(1);
        });
        let mut counts = vec![0i32; self.size];
        comm.all_gather_into(&len, &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |at, &c| {
                let d = *at;
                *at = at.saturating_add(c);
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut buf = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            comm.all_gather_varcount_into(mine, &mut part);
        }
        counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
            .collect()
    }
    fn abort(&self, code: i32) {
        self.comm().abort(code)
    }
}

/// Keeps MPI initialised; dropping it finalises MPI (after the run, on every rank).
pub struct MpiGuard(#[allow(dead_code)] Universe);

/// Initialise MPI and install its world as the process group. Call once, first thing.
pub fn init() -> Result<MpiGuard, String> {
    let (universe, threading) = ::mpi::initialize_with_threading(Threading::Serialized)
        .ok_or("MPI is already initialised in this process")?;
    if matches!(threading, Threading::Single | Threading::Funneled) {
        return Err(format!(
            "the MPI library offers thread level {threading:?}; sobre's replicas need at least \
             Serialized (MPI_THREAD_SERIALIZED)"
        ));
    }
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    let world = MpiWorld {
        comm: Mutex::new(comm),
        rank,
        size,
    };
    set_world(Box::new(world)).map_err(|_| "a process group is already installed".to_string())?;
    Ok(MpiGuard(universe))
}
