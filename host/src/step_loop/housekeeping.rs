//! Housekeeping of the step loop: compaction and hot swaps, and how they are kept off it.
//!
//! With the staging thread (`crate::staging`, started by `StepLoop::run`), the loop only rolls
//! the WAL and hands work over: a compaction's snapshot is made by a fresh instance started from
//! the disk, and a hot swap's new instance is prepared the same way, caught up with the records
//! appended since (`StagedSwap`), and switched to with only the volatile state handed over. So
//! neither pause grows with the state (issue 14: 589 ms and 441 ms at a million keys, on the
//! loop). Without the thread (tests that drive `turn` themselves), or with a build that does not
//! export `staging`, both happen on the loop the old way: the guest's own snapshot, and a
//! hand-over snapshot started by the new build.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{version_of, StepLoop, SwapReport, COMPACTION_RETRY_MS};
use crate::runtime::{Guest, GuestBuild};
use crate::staging::{Background, Done, StagedSwap, Timings};

impl StepLoop {
    /// The guest's snapshot becomes the new base; covered WAL segments go. Called when no sync
    /// is in flight, so the wait for the disk is this compaction's own.
    pub(super) fn compact(&mut self) {
        self.pipeline.compaction_due = false;
        if self.background.is_some() {
            return self.compact_off_loop();
        }
        self.drain_syncs();
        let Some(guest) = self.guest.as_mut() else { return };
        let started = Instant::now();
        let snapshot = match guest.snapshot(false) {
            Ok(snapshot) => snapshot,
            Err(crash) => return self.on_crash(crash),
        };
        let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
        let bytes = snapshot.len();
        let records = self.storage.records_since_snapshot;
        let compacted = self.storage.compact(snapshot);
        crate::metrics::snapshot(bytes, started.elapsed());
        crate::metrics::compaction_pause(started.elapsed());
        match compacted {
            Ok(()) => tracing::info!(
                "compacted {records} WAL records into a {bytes}-byte snapshot ({snapshot_ms:.1} ms in the guest, {:.1} ms in all)",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => self.stop_host_disk(format!("cannot write the snapshot: {e:#}")),
        }
    }

    /// Hot swap, between two steps: hand-over snapshot of the old instance, `start` of the new
    /// one from it, replace. If anything fails the old instance keeps running untouched.
    pub(super) fn swap(&mut self, build: GuestBuild) -> Result<SwapReport, String> {
        let next = self.guest_dir.join("next.wasm");
        let refuse = |reason: String| {
            let _ = std::fs::remove_file(&next);
            let _ = std::fs::remove_file(crate::signing::signature_path(&next));
            tracing::warn!("swap to {} refused: {reason}", build.hash);
            Err(reason)
        };
        let Some(old) = self.guest.as_mut() else {
            return refuse("the current guest is down (restarting); retry the swap".into());
        };
        let old_version = version_of(&old.status().unwrap_or_default());
        let started = Instant::now();
        let handover = match old.snapshot(true) {
            Ok(bytes) => bytes,
            Err(crash) => {
                let reason = format!("the current guest failed its hand-over snapshot: {crash}");
                self.on_crash(crash);
                return refuse(reason);
            }
        };
        let snapshot_done = started.elapsed();
        let mut new = match build.instantiate() {
            Ok(new) => new,
            Err(crash) => return refuse(format!("the new build cannot be instantiated: {crash}")),
        };
        let instantiate_done = started.elapsed();
        let effects = match new.start(&self.config, Some(&handover), &[]) {
            Ok(Ok(effects)) => effects,
            Ok(Err(refused)) => return refuse(format!("the new build refused the current state: {refused}")),
            Err(crash) => return refuse(format!("the new build crashed in start: {crash}")),
        };
        let start_done = started.elapsed();
        let new_version = match new.status() {
            Ok(json) => version_of(&json),
            Err(crash) => return refuse(format!("the new build crashed in status: {crash}")),
        };
        let pause = started.elapsed();
        self.install_build(&build)?;
        if let Some(old) = self.guest.replace(new) {
            crate::runtime::dispose(old);
        }
        let report = SwapReport { old_version, new_version, build_hash: build.hash.clone(), pause };
        self.build = build;
        self.carry_out(effects);
        tracing::info!(
            "hot swap: {} -> {} (build {}), pause {:.2} ms (hand-over snapshot of {} bytes {:.2} ms, instantiate {:.2} ms, start {:.2} ms)",
            report.old_version,
            report.new_version,
            report.build_hash,
            pause.as_secs_f64() * 1e3,
            handover.len(),
            snapshot_done.as_secs_f64() * 1e3,
            (instantiate_done - snapshot_done).as_secs_f64() * 1e3,
            (start_done - instantiate_done).as_secs_f64() * 1e3,
        );
        Ok(report)
    }

    /// Persists the choice of `build`: a restarted host runs it. The build and its signature
    /// (`signing::install_next`).
    fn install_build(&self, build: &GuestBuild) -> Result<(), String> {
        crate::signing::install_next(&self.guest_dir)
            .and_then(|_| {
                crate::crash_point::reach("swap.after_install");
                crate::storage::sync_dir(&self.guest_dir)
            })
            .map_err(|e| {
                // Not a refusal: the signature may be installed already, and deleting
                // `next.wasm` would leave the old build with the new signature. As after a
                // crash at the same point, the next start finishes the install (`signing`);
                // until then the old build runs.
                tracing::error!("swap to {} not persisted (the old build keeps running): {e:#}", build.hash);
                format!("cannot persist the new build: {e:#}")
            })
    }

    /// Compaction with the staging thread: a WAL roll is asked for (made at the next hand-off
    /// to the WAL's writer thread, so nothing here waits on the disk), and once it is made the
    /// thread snapshots a fresh instance started from the segments before it
    /// (`start_after_roll`).
    fn compact_off_loop(&mut self) {
        let busy = self.background.as_ref().is_none_or(Background::busy) || self.awaiting_roll.is_some();
        if busy || self.compaction_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.compacting = (self.storage.records_since_snapshot, self.storage.bytes_since_snapshot);
        self.storage.records_since_snapshot = 0;
        self.storage.bytes_since_snapshot = 0;
        self.roll_for(AwaitingRoll::Compaction);
    }

    /// Asks for the WAL roll a background job starts from: at the next hand-off when a writer
    /// thread syncs the WAL; inline (syncing here) without one.
    fn roll_for(&mut self, purpose: AwaitingRoll) {
        self.awaiting_roll = Some(purpose);
        if self.pipeline.pipelined() {
            self.storage.wal.request_roll();
            if let Err(failure) = self.pipeline.hand_off(&mut self.storage.wal) {
                self.stop_host_disk(failure);
            }
        } else {
            let started = Instant::now();
            self.drain_syncs();
            match self.storage.wal.roll() {
                Ok(boundary) => self.storage.wal.note_rolled(boundary),
                Err(e) => self.stop_host_disk(format!("cannot start a new WAL segment: {e:#}")),
            }
            crate::metrics::compaction_pause(started.elapsed());
        }
        self.start_after_roll();
    }

    /// Starts the background job a WAL roll was asked for, once the roll is made: every record
    /// before the new segment is then durable.
    pub(super) fn start_after_roll(&mut self) {
        let Some(boundary) = self.storage.wal.take_rolled() else { return };
        let (config, dir) = (self.config.clone(), self.storage.dir().to_path_buf());
        match self.awaiting_roll.take() {
            Some(AwaitingRoll::Compaction) => {
                crate::crash_point::reach("compact.after_roll");
                let build = self.build.clone();
                if let Some(background) = self.background.as_mut() {
                    background.compact(build, config, dir, boundary);
                }
                tracing::info!(
                    "compacting {} WAL records off the step loop (the WAL rolled to segment {boundary})",
                    self.compacting.0
                );
            }
            Some(AwaitingRoll::Swap(build)) => {
                tracing::info!(
                    "hot swap to {}: preparing the new build off the step loop from the durable state (the WAL rolled to segment {boundary})",
                    build.hash
                );
                if let Some(background) = self.background.as_mut() {
                    background.stage(*build, config, dir, boundary);
                }
            }
            None => tracing::warn!("the WAL rolled to segment {boundary} for nothing waiting"),
        }
    }

    /// Takes what the staging thread finished: a compaction (drop the covered segments), a
    /// staged instance (another round, or the switch), a failure.
    pub(super) fn collect_background(&mut self) {
        let Some(done) = self.background.as_mut().and_then(Background::try_done) else { return };
        self.on_background_done(done);
    }

    /// Waits for the background job in progress, if any, and takes its result (a guest restart
    /// must not read the durable state while a compaction replaces it).
    pub(super) fn finish_background_job(&mut self) {
        if let Some(done) = self.background.as_mut().and_then(Background::wait) {
            self.on_background_done(done);
        }
    }

    fn on_background_done(&mut self, done: Done) {
        match done {
            Done::Compacted { boundary, records, bytes, timings } => {
                self.storage.wal.segments_dropped_before(boundary);
                self.storage.snapshot_bytes = bytes as u64;
                let total =
                    timings.read_ms + timings.start_ms + timings.snapshot_ms + timings.save_ms + timings.drop_ms;
                crate::metrics::snapshot(bytes, Duration::from_secs_f64(total / 1e3));
                self.compaction_retry_at = None;
                tracing::info!(
                    "compacted {} WAL records into a {bytes}-byte snapshot off the step loop ({records} replayed by a fresh instance: read {:.1} ms, start {:.1} ms, snapshot {:.1} ms, save {:.1} ms, segments dropped {:.1} ms)",
                    self.compacting.0,
                    timings.read_ms,
                    timings.start_ms,
                    timings.snapshot_ms,
                    timings.save_ms,
                    timings.drop_ms,
                );
            }
            Done::DiskFailed { reason } => self.stop_host_disk(reason),
            Done::Failed { reason, build: None } => {
                self.storage.records_since_snapshot += self.compacting.0;
                self.storage.bytes_since_snapshot += self.compacting.1;
                self.compaction_retry_at = Some(Instant::now() + Duration::from_millis(COMPACTION_RETRY_MS));
                tracing::warn!("{reason}; trying again in {} s", COMPACTION_RETRY_MS / 1000);
            }
            Done::Failed { reason, build: Some(build) } => {
                // The old way decides: it refuses what the new build cannot run (and says why),
                // and does what staging could not (a WAL segment that could not be read).
                if let Some(staged) = self.staged_swap.take() {
                    tracing::warn!(
                        "staged swap to {} failed ({reason}): swapping with a hand-over snapshot",
                        build.hash
                    );
                    self.swap_now(build, staged.reply, staged.one_at_a_time);
                }
            }
            Done::Staged { build, guest, timings } => self.on_staged(build, guest, timings),
        }
        if !self.background.as_ref().is_some_and(Background::busy) && self.awaiting_roll.is_none() {
            if let Some((build, reply, one_at_a_time)) = self.swap_waiting.take() {
                self.begin_swap(build, reply, one_at_a_time);
            }
        }
    }

    /// A swap asked for: staged when both builds can (and the staging thread runs), else at
    /// once with a hand-over snapshot.
    pub(super) fn begin_swap(
        &mut self,
        build: GuestBuild,
        reply: oneshot::Sender<Result<SwapReport, String>>,
        one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let stageable = self.background.is_some()
            && build.supports_staging()
            && self.build.supports_staging()
            && self.guest.is_some()
            && self.staged_swap.is_none();
        if !stageable {
            return self.swap_now(build, reply, one_at_a_time);
        }
        if self.background.as_ref().is_some_and(Background::busy) || self.awaiting_roll.is_some() {
            // A compaction runs: the swap is staged once it is done.
            self.swap_waiting = Some((build, reply, one_at_a_time));
            return;
        }
        // The records not yet handed to the writer thread go after the roll: the staged
        // instance replays them with everything appended from now on.
        let tail = if self.pipeline.pipelined() { self.storage.wal.buffered_records() } else { Vec::new() };
        let tail_bytes = tail.iter().map(Vec::len).sum();
        self.staged_swap = Some(StagedSwap {
            reply,
            one_at_a_time,
            tail,
            tail_bytes,
            rounds: 0,
            asked: Instant::now(),
            abandoned: None,
        });
        self.roll_for(AwaitingRoll::Swap(Box::new(build)));
    }

    /// The swap with one hand-over snapshot (`swap`), answered.
    fn swap_now(
        &mut self,
        build: GuestBuild,
        reply: oneshot::Sender<Result<SwapReport, String>>,
        one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let swapped = self.swap(build);
        crate::metrics::swap(swapped.as_ref().ok().map(|report| report.pause));
        let _ = reply.send(swapped);
        drop(one_at_a_time);
    }

    /// A round of a staged swap is done: another round off the loop while many records arrived
    /// meanwhile, else the switch.
    fn on_staged(&mut self, build: GuestBuild, guest: Box<Guest>, timings: Timings) {
        let Some(staged) = self.staged_swap.as_mut() else { return };
        staged.rounds += 1;
        tracing::debug!(
            "staged swap round {}: {:.1} ms; {} records since",
            staged.rounds,
            timings.start_ms,
            staged.tail.len()
        );
        if let Some(why) = staged.abandoned.clone() {
            crate::runtime::dispose(*guest);
            let Some(staged) = self.staged_swap.take() else { return };
            tracing::warn!("staged swap to {} abandoned ({why}): swapping with a hand-over snapshot", build.hash);
            return self.swap_now(build, staged.reply, staged.one_at_a_time);
        }
        if staged.tail.len() > crate::staging::SWITCH_RECORDS_MAX && staged.rounds < crate::staging::CATCH_UP_ROUNDS_MAX
        {
            let records = staged.take_tail();
            if let Some(background) = self.background.as_mut() {
                background.replay(build, guest, records);
            }
            return;
        }
        let Some(staged) = self.staged_swap.take() else { return };
        match self.switch_to_staged(&build, *guest, staged.tail, staged.asked) {
            Ok(report) => {
                self.build = build;
                crate::metrics::swap(Some(report.pause));
                let _ = staged.reply.send(Ok(report));
            }
            Err(Fallback::OldWay(why)) => {
                tracing::warn!(
                    "staged swap to {} not possible ({why}): swapping with a hand-over snapshot",
                    build.hash
                );
                return self.swap_now(build, staged.reply, staged.one_at_a_time);
            }
            Err(Fallback::Refused(reason)) => {
                let _ = std::fs::remove_file(self.guest_dir.join("next.wasm"));
                let _ = std::fs::remove_file(crate::signing::signature_path(&self.guest_dir.join("next.wasm")));
                let _ = staged.reply.send(Err(reason));
            }
        }
        drop(staged.one_at_a_time);
    }

    /// The switch of a staged swap: the last records replayed, the old instance's volatile state
    /// adopted by the new one, the choice persisted. On `Fallback::OldWay` nothing changed.
    fn switch_to_staged(
        &mut self,
        build: &GuestBuild,
        mut new: Guest,
        tail: Vec<Vec<u8>>,
        asked: Instant,
    ) -> Result<SwapReport, Fallback> {
        let started = Instant::now();
        let Some(old) = self.guest.as_mut() else {
            return Err(Fallback::OldWay("the running guest is down".into()));
        };
        match new.replay(&tail) {
            Ok(Ok(_logs)) => {}
            Ok(Err(refused)) => return Err(Fallback::OldWay(format!("the new build refused a record: {refused}"))),
            Err(crash) => return Err(Fallback::OldWay(crash.to_string())),
        }
        let replayed = started.elapsed();
        let old_version = version_of(&old.status().unwrap_or_default());
        let volatile = match old.handover_volatile() {
            Ok(volatile) => volatile,
            Err(crash) => {
                let reason = format!("the current guest failed its hand-over: {crash}");
                self.on_crash(crash);
                return Err(Fallback::Refused(reason));
            }
        };
        let handed = started.elapsed();
        let effects = match new.adopt(&volatile) {
            Ok(Ok(effects)) => effects,
            Ok(Err(refused)) => return Err(Fallback::OldWay(refused)),
            Err(crash) => return Err(Fallback::OldWay(crash.to_string())),
        };
        let adopted = started.elapsed();
        let new_version = match new.status() {
            Ok(json) => version_of(&json),
            Err(crash) => return Err(Fallback::OldWay(format!("the new build crashed in status: {crash}"))),
        };
        let pause = started.elapsed();
        self.install_build(build).map_err(Fallback::Refused)?;
        if let Some(old) = self.guest.replace(new) {
            crate::runtime::dispose(old);
        }
        let report = SwapReport { old_version, new_version, build_hash: build.hash.clone(), pause };
        self.carry_out(effects);
        tracing::info!(
            "hot swap (staged): {} -> {} (build {}), pause {:.2} ms (replay of {} records {:.2} ms, hand-over of {} bytes {:.2} ms, adopt {:.2} ms); prepared off the step loop in {} ms",
            report.old_version,
            report.new_version,
            report.build_hash,
            pause.as_secs_f64() * 1e3,
            tail.len(),
            replayed.as_secs_f64() * 1e3,
            volatile.len(),
            (handed - replayed).as_secs_f64() * 1e3,
            (adopted - handed).as_secs_f64() * 1e3,
            (started - asked).as_millis()
        );
        Ok(report)
    }
}

/// What a requested WAL roll is for: the background job that starts from it.
pub(super) enum AwaitingRoll {
    /// A compaction off the loop.
    Compaction,
    /// A staged hot swap to this build.
    Swap(Box<GuestBuild>),
}

/// Why a staged switch did not happen.
enum Fallback {
    /// Nothing changed: swap with a hand-over snapshot instead.
    OldWay(String),
    /// The swap is refused (the old instance crashed, the choice could not be persisted).
    Refused(String),
}
