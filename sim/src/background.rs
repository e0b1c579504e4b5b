//! The host's work off its step loop (`host/src/staging.rs`), as the host does it: compaction by
//! a fresh instance, and the staged hot swap. Both start with the step loop draining its syncs
//! and rolling the WAL: the *boundary* is the number of records durable then, and the job works
//! from exactly what a crash restart at that point would start from (the disk's snapshot and the
//! durable records before the boundary), while the live instance keeps stepping and appending.
//! - *Compaction off the loop*: after a random virtual delay (tens of ms up to seconds: at a
//!   million keys it takes that long), a fresh instance of the build the node ran when the job
//!   began is started from the disk and its `snapshot(false)` saved as the new base, covering the
//!   records before the boundary; the node's next step drops them. A crash or wipe before the
//!   save loses the job; one between the save and the drop restarts from the new snapshot and the
//!   records from the boundary on (the disk's `covered` records are skipped, as the host's reads
//!   skip the segments a snapshot covers).
//! - *Staged swap*: every record the live instance appends after the boundary (strict or lazy,
//!   durable or not yet) is kept in a tail; when the preparation is done (0–1 s, sometimes
//!   longer) a fresh instance of the other build is started from the disk, caught up in further
//!   rounds of `replay` while the tail is long, and at the node's next step (a paused node's once
//!   it resumes) the switch: `replay` of the last tail, the old instance's `handover_volatile`,
//!   the new one's `adopt`, whose effects are carried out like a step's. A crash or wipe during
//!   the preparation abandons it (counted). The simulator feeds the staged instance every
//!   record, so a refused record or hand-over is a host or guest bug and fails the run (the host
//!   would silently fall back to a hand-over snapshot and hide it).
//!
//! One job per node at a time: a compaction due meanwhile waits, a swap asked for during a
//! compaction is staged once it is done. Which compactions and swaps go this way is drawn from a
//! stream of its own (`World::staging_rng`), per seed a share of none, half or all, so a seed
//! that does neither plays out exactly as it did before these paths existed.

use waxos_host::runtime::{Effect, Guest};

use crate::rng::Rng;
use crate::world::{Failure, World};

/// Shares of the per-seed draw: none, half, all.
const SHARES: [f64; 3] = [0.0, 0.5, 1.0];
/// A compaction off the loop takes this long (virtual ms)…
const COMPACTION_MS: (u64, u64) = (20, 300);
/// …or, one time in `LONG_COMPACTION_ONE_IN`, this long (a large state).
const LONG_COMPACTION_MS: (u64, u64) = (300, 2_000);
const LONG_COMPACTION_ONE_IN: u64 = 4;
/// A staged instance is started from the disk within this time of the swap being asked for…
const STAGING_MS: (u64, u64) = (0, 1_000);
/// …or, one time in `LONG_STAGING_ONE_IN`, this long.
const LONG_STAGING_MS: (u64, u64) = (1_000, 3_000);
const LONG_STAGING_ONE_IN: u64 = 8;
/// A catch-up round off the loop takes this long.
const ROUND_MS: (u64, u64) = (5, 200);
/// The switch is made once at most this many records are left to replay; more go to another
/// round off the loop (the host's `SWITCH_RECORDS_MAX`, scaled to the simulator's write rate).
const SWITCH_RECORDS_MAX: usize = 16;
/// Rounds off the loop before the switch replays whatever is left (the host's).
const CATCH_UP_ROUNDS_MAX: u32 = 8;

/// Which share of compactions and of hot swaps a seed makes off the step loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StagingMix {
    off_loop_compactions: f64,
    staged_swaps: f64,
}

impl StagingMix {
    /// Draws the seed's shares from its own stream.
    pub(crate) fn draw(rng: &mut Rng) -> StagingMix {
        let off_loop_compactions = SHARES[rng.range(0, SHARES.len() as u64) as usize];
        let staged_swaps = SHARES[rng.range(0, SHARES.len() as u64) as usize];
        StagingMix { off_loop_compactions, staged_swaps }
    }
}

impl std::fmt::Display for StagingMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} % of compactions off the step loop, {:.0} % of hot swaps staged",
            self.off_loop_compactions * 100.0,
            self.staged_swaps * 100.0
        )
    }
}

/// A node's job off its step loop.
pub(crate) enum Job {
    /// A compaction by a fresh instance.
    Compaction {
        /// The build the node ran when it began.
        build: usize,
        /// Durable records before the roll: what the snapshot covers.
        boundary: usize,
        /// The snapshot is saved then.
        done_at_ms: u64,
        /// Saved; the covered records are dropped at the node's next step.
        saved: bool,
    },
    /// A staged hot swap being prepared.
    StagedSwap {
        /// The build swapped to.
        build: usize,
        /// Durable records before the roll: what the staged instance starts from.
        boundary: usize,
        /// The preparation (or the current catch-up round) is done then.
        ready_at_ms: u64,
        /// The staged instance, once started.
        staged: Option<Box<Guest>>,
        /// Records appended since the boundary (or the last round) not given to it yet.
        tail: Vec<Vec<u8>>,
        /// Rounds done (the start is the first).
        rounds: u32,
    },
}

impl World<'_> {
    /// The host's compaction, due now on node `i`: off the loop (a share of them, per seed) or
    /// on it; nothing while a job runs (the host's `compact_off_loop` when busy).
    pub(crate) fn compaction_due(&mut self, i: usize) {
        if self.nodes[i].background.is_some() {
            return;
        }
        let share = self.staging_mix.off_loop_compactions;
        if share > 0.0 && self.staging_rng.chance(share) {
            self.compact_off_loop(i);
        } else {
            self.compact(i);
        }
    }

    /// Drains node `i`'s syncs (releasing what they held) and returns the boundary: every record
    /// appended so far is durable, and the WAL is rolled after it.
    fn drain_and_roll(&mut self, i: usize) -> usize {
        let released = self.nodes[i].disk.drain();
        self.observe_durable(i);
        self.release(i, released);
        self.nodes[i].disk.durable.len()
    }

    /// Starts a compaction off the loop: drain, roll, and a job that snapshots later.
    fn compact_off_loop(&mut self, i: usize) {
        if self.nodes[i].guest.is_none() {
            return;
        }
        let boundary = self.drain_and_roll(i);
        self.nodes[i].disk.records_since_snapshot = 0;
        let took_ms = if self.staging_rng.range(0, LONG_COMPACTION_ONE_IN) == 0 {
            self.staging_rng.range(LONG_COMPACTION_MS.0, LONG_COMPACTION_MS.1)
        } else {
            self.staging_rng.range(COMPACTION_MS.0, COMPACTION_MS.1)
        };
        let build = self.nodes[i].build;
        self.nodes[i].background =
            Some(Job::Compaction { build, boundary, done_at_ms: self.now + took_ms, saved: false });
        self.note(|| format!("node {} compacts {boundary} records off the step loop (done in {took_ms} ms)", i + 1));
    }

    /// Whether node `i` can swap the staged way (both builds export `staging`).
    fn stageable(&self, i: usize) -> bool {
        let other = 1 - self.nodes[i].build;
        self.builds[other].supports_staging() && self.builds[self.nodes[i].build].supports_staging()
    }

    /// A hot swap of node `i` asked for by a random fault: staged (a share of them, per seed,
    /// with a random preparation time) or the old way at once. Nothing while a staged swap is
    /// prepared there (the host takes one swap at a time); during a compaction a staged swap
    /// waits for it to finish.
    pub(crate) fn swap(&mut self, i: usize) {
        if self.builds.len() < 2 || self.now < self.nodes[i].paused_until_ms || self.nodes[i].guest.is_none() {
            return;
        }
        if self.nodes[i].swap_waiting.is_some() || matches!(self.nodes[i].background, Some(Job::StagedSwap { .. })) {
            return;
        }
        let share = self.staging_mix.staged_swaps;
        if !(self.stageable(i) && share > 0.0 && self.staging_rng.chance(share)) {
            return self.swap_old_way(i);
        }
        let prepare_ms = if self.staging_rng.range(0, LONG_STAGING_ONE_IN) == 0 {
            self.staging_rng.range(LONG_STAGING_MS.0, LONG_STAGING_MS.1)
        } else {
            self.staging_rng.range(STAGING_MS.0, STAGING_MS.1)
        };
        if self.nodes[i].background.is_some() {
            self.nodes[i].swap_waiting = Some(prepare_ms);
            self.note(|| format!("hot swap of node {} staged once its compaction is done", i + 1));
            return;
        }
        self.begin_staged_swap(i, prepare_ms);
    }

    /// A hot swap of node `i` that a scenario needs on this very tick: staged with no
    /// preparation time (a share of them, as `swap`, when no compaction runs there), or the old
    /// way. A staged swap already prepared there is switched now (its preparation is random
    /// anyway).
    pub(crate) fn swap_at_once(&mut self, i: usize) {
        if self.builds.len() < 2 || self.now < self.nodes[i].paused_until_ms || self.nodes[i].guest.is_none() {
            return;
        }
        if matches!(self.nodes[i].background, Some(Job::StagedSwap { .. })) {
            return self.on_staged(i, true);
        }
        let share = self.staging_mix.staged_swaps;
        let staged =
            self.nodes[i].background.is_none() && self.stageable(i) && share > 0.0 && self.staging_rng.chance(share);
        if staged {
            self.begin_staged_swap(i, 0);
        } else {
            self.swap_old_way(i);
        }
    }

    /// Begins a staged swap of node `i`: drain, roll, keep the tail from now on; with no
    /// preparation time, the switch is made at once.
    fn begin_staged_swap(&mut self, i: usize, prepare_ms: u64) {
        let boundary = self.drain_and_roll(i);
        let build = 1 - self.nodes[i].build;
        self.nodes[i].background = Some(Job::StagedSwap {
            build,
            boundary,
            ready_at_ms: self.now + prepare_ms,
            staged: None,
            tail: Vec::new(),
            rounds: 0,
        });
        self.note(|| {
            format!(
                "hot swap of node {} to build {build} staged from {boundary} durable records ({prepare_ms} ms)",
                i + 1
            )
        });
        if prepare_ms == 0 {
            self.collect_background(i);
        }
    }

    /// Keeps the records of a step of node `i` for its staged instance, if one is prepared.
    pub(crate) fn keep_for_staged(&mut self, i: usize, effects: &[Effect]) {
        if let Some(Job::StagedSwap { tail, .. }) = self.nodes[i].background.as_mut() {
            for effect in effects {
                if let Effect::Persist(record) | Effect::PersistLazy(record) = effect {
                    tail.push(record.clone());
                }
            }
        }
    }

    /// Node `i` crashed, was wiped or stopped: its job is lost (a staged swap counts as
    /// abandoned).
    pub(crate) fn drop_background(&mut self, i: usize, why: &str) {
        self.nodes[i].swap_waiting = None;
        match self.nodes[i].background.take() {
            Some(Job::StagedSwap { .. }) => {
                self.stats.staged_swaps_abandoned += 1;
                self.note(|| format!("staged hot swap of node {} abandoned ({why})", i + 1));
            }
            Some(Job::Compaction { saved: false, .. }) => {
                self.note(|| format!("compaction off the step loop of node {} lost ({why})", i + 1));
            }
            Some(Job::Compaction { saved: true, .. }) => {
                self.note(|| {
                    format!(
                        "node {} stops between saving its snapshot and dropping the records it covers ({why})",
                        i + 1
                    )
                });
            }
            None => {}
        }
    }

    /// The background threads' work due now: compactions off the loop whose time is up save
    /// their snapshot (the node's next step drops what it covers). A host that is down runs
    /// nothing.
    pub(crate) fn run_background(&mut self) {
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if node.down_until_ms.is_some() || node.retired || node.guest.is_none() {
                continue;
            }
            let Some(Job::Compaction { build, boundary, done_at_ms, saved: false }) = node.background else { continue };
            if self.now < done_at_ms {
                continue;
            }
            match self.fresh_instance(i, build, boundary).and_then(|mut guest| {
                guest.snapshot_off_loop().map_err(|crash| format!("the fresh instance crashed in snapshot: {crash}"))
            }) {
                Ok(snapshot) => {
                    self.nodes[i].disk.save_covering(snapshot, boundary);
                    if let Some(Job::Compaction { saved, .. }) = self.nodes[i].background.as_mut() {
                        *saved = true;
                    }
                    self.note(|| format!("node {} saved the snapshot of its compaction off the step loop", i + 1));
                }
                Err(problem) => {
                    self.fail(Failure::GuestCrash(format!("node {}: compaction off the step loop: {problem}", i + 1)));
                    self.nodes[i].background = None;
                }
            }
        }
    }

    /// An instance of `build` started from node `i`'s disk as it was at `boundary` (the
    /// host's `start_fresh`: its effects, logs and records written long ago, are dropped).
    fn fresh_instance(&mut self, i: usize, build: usize, boundary: usize) -> Result<Box<Guest>, String> {
        let node = &self.nodes[i];
        let mut guest = self.builds[build].instantiate().map_err(|e| e.to_string())?;
        match guest.start(&node.config, node.disk.snapshot.as_deref(), node.disk.records_before(boundary)) {
            Ok(Ok(_)) => Ok(Box::new(guest)),
            Ok(Err(refused)) => Err(format!("a fresh instance refused the durable state: {refused}")),
            Err(crash) => Err(format!("a fresh instance crashed in start: {crash}")),
        }
    }

    /// What the step loop of node `i` takes from its background thread before stepping: a saved
    /// compaction (the covered records go), a staged instance (another round, or the switch).
    pub(crate) fn collect_background(&mut self, i: usize) {
        match self.nodes[i].background.as_ref() {
            Some(Job::Compaction { saved: true, .. }) => {
                self.nodes[i].background = None;
                self.nodes[i].disk.drop_covered();
                self.stats.compactions += 1;
                self.stats.compactions_off_loop += 1;
                if let Some(prepare_ms) = self.nodes[i].swap_waiting.take() {
                    self.begin_staged_swap(i, prepare_ms);
                }
            }
            Some(Job::StagedSwap { ready_at_ms, .. }) if self.now >= *ready_at_ms => self.on_staged(i, false),
            _ => {}
        }
    }

    /// A staged instance of node `i` is ready: started now if it was not yet, then another
    /// round off the loop while the tail is long (unless `switch_now`), else the switch.
    fn on_staged(&mut self, i: usize, switch_now: bool) {
        let Some(Job::StagedSwap { build, boundary, staged, .. }) = self.nodes[i].background.as_mut() else { return };
        let (build, boundary) = (*build, *boundary);
        if staged.is_none() {
            match self.fresh_instance(i, build, boundary) {
                Ok(guest) => {
                    if let Some(Job::StagedSwap { staged, .. }) = self.nodes[i].background.as_mut() {
                        *staged = Some(guest);
                    }
                }
                Err(problem) => {
                    self.nodes[i].background = None;
                    return self.fail(Failure::GuestCrash(format!("node {}: staged hot swap: {problem}", i + 1)));
                }
            }
        }
        let Some(Job::StagedSwap { tail, rounds, ready_at_ms, staged, .. }) = self.nodes[i].background.as_mut() else {
            return;
        };
        *rounds += 1;
        if !switch_now && tail.len() > SWITCH_RECORDS_MAX && *rounds < CATCH_UP_ROUNDS_MAX {
            let records = std::mem::take(tail);
            let round = *rounds;
            *ready_at_ms = self.now + self.staging_rng.range(ROUND_MS.0, ROUND_MS.1);
            let replayed = staged.as_mut().map(|guest| guest.replay(&records));
            self.stats.staged_catch_up_rounds += 1;
            self.note(|| {
                format!("node {}: staged instance catches up with {} records (round {round})", i + 1, records.len())
            });
            return self.check_replayed(i, replayed, records.len());
        }
        let Some(Job::StagedSwap { build, staged: Some(new), tail, .. }) = self.nodes[i].background.take() else {
            return;
        };
        self.switch_to_staged(i, build, *new, tail);
    }

    /// A `replay` of `count` records by node `i`'s staged instance must take them all.
    fn check_replayed(
        &mut self,
        i: usize,
        replayed: Option<Result<Result<Vec<Effect>, String>, waxos_host::runtime::GuestCrash>>,
        count: usize,
    ) {
        match replayed {
            Some(Ok(Ok(_))) | None => {}
            Some(Ok(Err(refused))) => {
                self.nodes[i].background = None;
                self.fail(Failure::Divergence(format!(
                    "node {}: the staged instance refused one of {count} records it was fed in order: {refused}",
                    i + 1
                )));
            }
            Some(Err(crash)) => {
                self.nodes[i].background = None;
                self.fail(Failure::GuestCrash(format!(
                    "node {}: the staged instance crashed in replay: {crash}",
                    i + 1
                )));
            }
        }
    }

    /// The switch, on the step loop of node `i`: the last records replayed, the old instance's
    /// volatile state adopted by the new one, whose effects are carried out like a step's.
    fn switch_to_staged(&mut self, i: usize, build: usize, mut new: Guest, tail: Vec<Vec<u8>>) {
        let replayed = new.replay(&tail);
        self.check_replayed(i, Some(replayed), tail.len());
        if self.background_failure.is_some() {
            return;
        }
        let Some(old) = self.nodes[i].guest.as_mut() else { return };
        let leading = old.status().is_ok_and(|s| s.contains("\"role\":\"leader\""));
        let volatile = match old.handover_volatile() {
            Ok(volatile) => volatile,
            Err(crash) => {
                return self.fail(Failure::GuestCrash(format!("node {} crashed in handover-volatile: {crash}", i + 1)));
            }
        };
        let effects = match new.adopt(&volatile) {
            Ok(Ok(effects)) => effects,
            Ok(Err(refused)) => {
                return self.fail(Failure::Divergence(format!(
                    "node {}: the staged instance of build {build}, fed every durable record and the {} records since, refused the hand-over (the host would swap the old way and hide it): {refused}",
                    i + 1,
                    tail.len()
                )));
            }
            Err(crash) => {
                return self.fail(Failure::GuestCrash(format!(
                    "node {}: the staged instance crashed in adopt: {crash}",
                    i + 1
                )));
            }
        };
        self.nodes[i].guest = Some(new);
        self.nodes[i].build = build;
        self.nodes[i].swapped_at_ms = Some(self.now);
        self.stats.swaps += 1;
        self.stats.staged_swaps += 1;
        self.stats.leader_swaps += u64::from(leading);
        let (count, lead) = (tail.len(), if leading { " (leader)" } else { "" });
        self.note(|| {
            format!("hot swap node {} to build {build}{lead}, staged ({count} records replayed at the switch)", i + 1)
        });
        self.carry_out(i, effects);
    }

    /// Keeps the first failure found off the loop (the run ends with it at the end of the tick).
    fn fail(&mut self, failure: Failure) {
        if self.background_failure.is_none() {
            self.background_failure = Some(failure);
        }
    }
}
