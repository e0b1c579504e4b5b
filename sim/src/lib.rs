//! waxos-sim: the real guest `.wasm`, under a deterministic simulator, checked for
//! linearizability and agreement.
//!
//! # Layout
//! - `world`: the simulated cluster (virtual clock, replicas' life cycle, clients), built on the
//!   host's own wasmtime runtime (`waxos_host::runtime`), not a copy of it.
//! - `net`: the virtual network: directed links (one-way cuts), loss, duplication, short and
//!   long delays, slow links.
//! - `disk`: each host's snapshot and WAL, the pipelined sync and the effects held behind it,
//!   compaction, and what a crash or a wipe leaves.
//! - `background`: the host's work off its step loop: compaction by a fresh instance, and the
//!   staged hot swap (replay, hand-over of the volatile state, adopt).
//! - `faults`: the fault schedule (crashes, wipes, pauses, partitions of every shape, acceptor
//!   outages, hot swaps) and the progress check while a majority is healthy.
//! - `scenarios`: composed faults around the leader, in the shapes known to break Paxos.
//! - `membership`: an operator that adds, promotes, removes and replaces members meanwhile.
//! - `checker`: linearizability of the resulting key-value history.
//! - `agreement`: no slot chosen with two values; replicas converge on one state.
//! - `stats`: what a run did, fault by fault kind.
//! - `rng`: the one seeded source of randomness.

pub mod agreement;
pub mod background;
pub mod checker;
pub mod disk;
pub mod faults;
pub mod membership;
pub mod net;
pub mod rng;
pub mod scenarios;
pub mod stats;
pub mod world;

use waxos_host::runtime::GuestBuild;

pub use stats::Stats;
pub use world::{Failure, SimConfig};

/// Runs one seed; on failure returns a description and the trace (if `trace`).
pub fn run_seed(
    builds: &[GuestBuild],
    config: &SimConfig,
    seed: u64,
    trace: bool,
) -> Result<world::Run, (String, Vec<String>)> {
    let world = world::World::new(builds, config.clone(), seed, trace).map_err(|f| (format!("{f:?}"), Vec::new()))?;
    world.run().map_err(|(f, t)| (format!("{f:?}"), t))
}
