//! waxos-sim: the real guest `.wasm`, under a deterministic simulator, checked for
//! linearizability.
//!
//! # Layout
//! - `world`: the simulated cluster (virtual clock, network, faults, clients), built on the
//!   host's own wasmtime runtime (`waxos_host::runtime`), not a copy of it.
//! - `checker`: linearizability of the resulting key-value history.

pub mod checker;
pub mod world;

use waxos_host::runtime::GuestBuild;

pub use world::{Failure, SimConfig, Stats};

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
