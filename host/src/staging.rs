//! Work on the guest's state that must not stall the step loop: compaction and the preparation
//! of a hot swap, done at a million keys in a second or more of CPU, on a thread of their own.
//!
//! Both start the same way: the step loop rolls the WAL to a new segment (everything before it is
//! then durable and closed), and a background thread starts a fresh instance from the snapshot on
//! disk plus the records of the segments before that boundary — exactly what a crash restart at
//! that point would start from.
//! - **Compaction**: the fresh instance's snapshot becomes the new base, naming the boundary as
//!   the first segment it does not cover, and the covered segments are deleted; the step loop
//!   then only moves its WAL's first segment. The live instance never stops for it (it was
//!   589 ms at 550k keys on the loop). A guest restart on the loop waits for a compaction in
//!   progress first, so that it never reads an old snapshot next to segments being deleted.
//! - **Staged swap**: the fresh instance is of the new build. While it starts, the step loop keeps
//!   every record it appends; the staged instance is caught up with them (`replay`) in rounds off
//!   the loop until few are left, and at the switch the step loop replays the last few, takes
//!   the old instance's volatile state (`handover-volatile`) and hands it to the new one
//!   (`adopt`). The pause no longer grows with the state (it was 441 ms at 1M keys). The guest
//!   refuses a hand-over whose durable state does not match; the swap then happens the old way.
//!
//! One job runs at a time; the thread runs at a lower priority than the step loop.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use crate::runtime::{Guest, GuestBuild, GuestConfig};
use crate::storage::{self, Snapshot};

/// A staged instance is caught up on the step loop (and the switch made) once at most this many
/// records are left to replay; more go to another round off the loop.
pub const SWITCH_RECORDS_MAX: usize = 500;
/// Rounds of catching up off the loop before the step loop replays whatever is left.
pub const CATCH_UP_ROUNDS_MAX: u32 = 8;
/// Bytes of records a staged swap may keep while its instance is prepared; beyond that the
/// swap is made the old way (the disk is fast enough to outrun the preparation).
pub const TAIL_BYTES_MAX: usize = 256 << 20;

/// What a background job was asked to do.
enum Job {
    Compact { build: GuestBuild, config: GuestConfig, dir: PathBuf, boundary: u64 },
    Stage { build: GuestBuild, config: GuestConfig, dir: PathBuf, boundary: u64 },
    Replay { build: GuestBuild, guest: Box<Guest>, records: Vec<Vec<u8>> },
}

/// What a background job produced.
pub enum Done {
    /// A snapshot covering the segments before `boundary` is saved.
    Compacted {
        /// The first segment the snapshot does not cover.
        boundary: u64,
        /// Records it covers, as the fresh instance replayed them (after the older snapshot).
        records: usize,
        /// Its size.
        bytes: usize,
        /// Reading, starting and snapshotting, and saving.
        timings: Timings,
    },
    /// An instance of `build` started from the durable state and caught up with the records
    /// given so far.
    Staged {
        /// Its build.
        build: GuestBuild,
        /// The instance.
        guest: Box<Guest>,
        /// Timings of this round.
        timings: Timings,
    },
    /// A compaction could not sync or write to the disk: the host stops, as for a failed WAL
    /// sync (`step_loop::EXIT_DISK_FAILED`), rather than retry on a disk that lost writes.
    DiskFailed {
        /// What failed.
        reason: String,
    },
    /// The job failed: why, and the build of a swap (which then is made the old way, or refused).
    Failed {
        /// What failed.
        reason: String,
        /// The build, for a swap.
        build: Option<GuestBuild>,
    },
}

/// Where a background job's time went (milliseconds).
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Reading the snapshot and WAL segments.
    pub read_ms: f64,
    /// Instantiating and `start` (or `replay`).
    pub start_ms: f64,
    /// The fresh instance's snapshot.
    pub snapshot_ms: f64,
    /// Writing and syncing the snapshot file.
    pub save_ms: f64,
    /// Deleting the WAL segments the snapshot covers.
    pub drop_ms: f64,
}

/// The background thread's two ends, on the step loop.
pub struct Background {
    jobs: Sender<Job>,
    done: Receiver<Done>,
    busy: bool,
}

impl Background {
    /// Starts the thread; `wake` is called after each job (to wake the step loop).
    pub fn start(wake: impl Fn() + Send + 'static) -> anyhow::Result<Background> {
        let (jobs, todo) = channel::<Job>();
        let (report, done) = channel();
        std::thread::Builder::new().name("staging".into()).spawn(move || {
            lower_priority();
            for job in todo {
                if report.send(run(job)).is_err() {
                    return;
                }
                wake();
            }
        })?;
        Ok(Background { jobs, done, busy: false })
    }

    /// True while a job runs (or its result waits to be taken).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Compacts off the loop: a fresh instance of `build`, started from the snapshot in `dir` and
    /// the WAL segments before `boundary`, snapshots, and the snapshot is saved.
    pub fn compact(&mut self, build: GuestBuild, config: GuestConfig, dir: PathBuf, boundary: u64) {
        self.submit(Job::Compact { build, config, dir, boundary });
    }

    /// Starts an instance of `build` from the snapshot in `dir` and the WAL segments before
    /// `boundary` (a staged swap's first round).
    pub fn stage(&mut self, build: GuestBuild, config: GuestConfig, dir: PathBuf, boundary: u64) {
        self.submit(Job::Stage { build, config, dir, boundary });
    }

    /// Catches a staged instance up with `records` (a later round).
    pub fn replay(&mut self, build: GuestBuild, guest: Box<Guest>, records: Vec<Vec<u8>>) {
        self.submit(Job::Replay { build, guest, records });
    }

    fn submit(&mut self, job: Job) {
        self.busy = true;
        if self.jobs.send(job).is_err() {
            tracing::error!("the staging thread is gone: job dropped");
            self.busy = false;
        }
    }

    /// A finished job, if one is reported.
    pub fn try_done(&mut self) -> Option<Done> {
        let done = self.done.try_recv().ok()?;
        self.busy = false;
        Some(done)
    }

    /// Waits for the job in progress, if any (tests, and a guest restart, which must not read
    /// the disk while a compaction replaces the snapshot).
    pub fn wait(&mut self) -> Option<Done> {
        if !self.busy {
            return None;
        }
        let done = self.done.recv().ok();
        self.busy = false;
        done
    }
}

/// Background work yields to the step loop (and to the peer and client threads): on two cores,
/// five hosts compacting at once must not slow what answers clients.
pub(crate) fn lower_priority() {
    // SAFETY: plain syscalls on this thread's own id; failure only leaves the priority as it is.
    let lowered = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
    };
    if lowered != 0 {
        tracing::debug!("the staging thread keeps the normal priority");
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Instantiates `build` and starts it from the durable state before `boundary`.
fn start_fresh(
    build: &GuestBuild,
    config: &GuestConfig,
    dir: &std::path::Path,
    boundary: u64,
    timings: &mut Timings,
) -> Result<(Guest, usize), String> {
    let started = Instant::now();
    let (durable, _) = storage::read_durable_before(dir, boundary).map_err(|e| format!("{e:#}"))?;
    timings.read_ms = ms(started);
    let started = Instant::now();
    let mut guest = build.instantiate().map_err(|e| e.to_string())?;
    match guest.start(config, durable.snapshot.as_deref(), &durable.records) {
        // A fresh start's effects are logs (and, on a log without records, its first record,
        // which the live instance wrote long ago): none is carried out.
        Ok(Ok(_)) => {}
        Ok(Err(refused)) => return Err(format!("the build refused the durable state: {refused}")),
        Err(crash) => return Err(crash.to_string()),
    }
    timings.start_ms = ms(started);
    Ok((guest, durable.records.len()))
}

fn run(job: Job) -> Done {
    let mut timings = Timings::default();
    match job {
        Job::Compact { build, config, dir, boundary } => compact(&build, &config, &dir, boundary, timings),
        Job::Stage { build, config, dir, boundary } => match start_fresh(&build, &config, &dir, boundary, &mut timings)
            .and_then(|(mut guest, _)| {
                // Trim what the start replayed here, not in the switch's replay on the step
                // loop (at a million keys that trim alone paused the swap for 45-76 ms).
                match guest.replay(&[]) {
                    Ok(Ok(_logs)) => Ok(guest),
                    Ok(Err(refused)) => Err(format!("the new build refused to trim: {refused}")),
                    Err(crash) => Err(crash.to_string()),
                }
            }) {
            Ok(guest) => Done::Staged { build, guest: Box::new(guest), timings },
            Err(reason) => Done::Failed { reason: format!("preparing the new build: {reason}"), build: Some(build) },
        },
        Job::Replay { build, mut guest, records } => {
            let started = Instant::now();
            let replayed = guest.replay(&records);
            timings.start_ms = ms(started);
            match replayed {
                Ok(Ok(_logs)) => Done::Staged { build, guest, timings },
                Ok(Err(refused)) => Done::Failed {
                    reason: format!("the new build refused a WAL record while catching up: {refused}"),
                    build: Some(build),
                },
                Err(crash) => {
                    Done::Failed { reason: format!("the new build crashed catching up: {crash}"), build: Some(build) }
                }
            }
        }
    }
}

/// A compaction's snapshot: a fresh instance of `build` started from the durable state before
/// `boundary`, trimmed as a step trims (`replay` of no records: builds with the staging exports),
/// snapshotted; the snapshot saved and the covered segments deleted.
fn compact(
    build: &GuestBuild,
    config: &GuestConfig,
    dir: &std::path::Path,
    boundary: u64,
    mut timings: Timings,
) -> Done {
    let failed =
        |reason: String| Done::Failed { reason: format!("compaction off the step loop: {reason}"), build: None };
    let (mut guest, records) = match start_fresh(build, config, dir, boundary, &mut timings) {
        Ok(started) => started,
        Err(reason) => return failed(reason),
    };
    let started = Instant::now();
    if build.supports_staging() {
        match guest.replay(&[]) {
            Ok(Ok(_logs)) => {}
            Ok(Err(refused)) => return failed(format!("the fresh instance refused to trim: {refused}")),
            Err(crash) => return failed(crash.to_string()),
        }
    }
    let bytes = match guest.snapshot_off_loop() {
        Ok(bytes) => bytes,
        Err(crash) => return failed(crash.to_string()),
    };
    drop(guest);
    timings.snapshot_ms = ms(started);
    let started = Instant::now();
    let len = bytes.len();
    // The boundary segment's directory entry is synced by the WAL's writer thread with its
    // first records; the snapshot that names it must not be durable before it. A failure here
    // is the disk's: the host stops, as for any failed sync (`Done::DiskFailed`).
    if let Err(e) = storage::sync_dir(&dir.join("wal")) {
        return Done::DiskFailed { reason: format!("syncing the WAL directory for a compaction: {e:#}") };
    }
    if let Err(e) = (Snapshot { first_segment: boundary, bytes }).save(dir) {
        return Done::DiskFailed { reason: format!("saving a compaction's snapshot: {e:#}") };
    }
    crate::crash_point::reach("compact.after_snapshot");
    timings.save_ms = ms(started);
    // The snapshot is durable: the segments it covers may go. Unlinking 64 MiB files and
    // syncing the directory took 45 ms on the loop.
    let started = Instant::now();
    if let Err(e) = storage::wal::delete_segments_before(&dir.join("wal"), boundary) {
        // Segments left behind are skipped on every read, and deleted next time.
        tracing::warn!("cannot delete the WAL segments the new snapshot covers: {e:#}");
    }
    crate::crash_point::reach("compact.after_drop");
    timings.drop_ms = ms(started);
    Done::Compacted { boundary, records, bytes: len, timings }
}

/// A staged swap in progress, on the step loop.
pub struct StagedSwap {
    /// Where the outcome goes.
    pub reply: tokio::sync::oneshot::Sender<Result<crate::step_loop::SwapReport, String>>,
    /// The host's one-swap-at-a-time lock, held until the swap is carried out or refused.
    pub one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    /// Records appended since the boundary that the staged instance has not been given yet.
    pub tail: Vec<Vec<u8>>,
    /// Their bytes.
    pub tail_bytes: usize,
    /// Rounds of catching up done off the loop.
    pub rounds: u32,
    /// When the swap was asked for.
    pub asked: Instant,
    /// Set when the staging can no longer be trusted to match (the live guest crashed, the tail
    /// outgrew its bound): the swap is then made the old way once the staged instance is back.
    pub abandoned: Option<String>,
}

impl StagedSwap {
    /// Keeps a record the live instance appended (the staged one replays it later).
    pub fn keep(&mut self, record: &[u8]) {
        if self.abandoned.is_some() {
            return;
        }
        self.tail_bytes += record.len();
        if self.tail_bytes > TAIL_BYTES_MAX {
            self.abandon(format!("more than {} MiB of records arrived while it was prepared", TAIL_BYTES_MAX >> 20));
        } else {
            self.tail.push(record.to_vec());
        }
    }

    /// Gives up the staging (the swap is made the old way).
    pub fn abandon(&mut self, why: String) {
        if self.abandoned.is_none() {
            self.abandoned = Some(why);
            self.tail = Vec::new();
            self.tail_bytes = 0;
        }
    }

    /// The records to give the staged instance now.
    pub fn take_tail(&mut self) -> Vec<Vec<u8>> {
        self.tail_bytes = 0;
        std::mem::take(&mut self.tail)
    }
}
