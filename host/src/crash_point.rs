//! Named crash points: every step of every storage operation (append, sync, roll, snapshot,
//! compaction, roster save, swap persistence, rejoin) calls `crash_point::reach(name)` between
//! its disk actions. In a build with the `crash-points` feature (test builds: `just test`), the
//! environment variable `WAXOS_CRASH_AT=<name>[@<n>]` makes the process exit on the n-th time
//! (default: first) it reaches that point, with exit code `EXIT_CODE` and one log line naming
//! it; the crash-point harness (`host/tests/crash_points.rs`) restarts the host and checks that
//! no acknowledged write was lost, no promise forgotten and no valid state refused. In other
//! builds `reach` is empty and costs nothing.
//!
//! The exit skips destructors and buffers of our own, as SIGKILL does; the page cache survives
//! it as it survives a process crash. Power loss (what the page cache held is gone, torn
//! sectors) is the WAL's torn-tail tests and the fault-injecting disk's part.

/// Exit code of a process stopped at a crash point.
pub const EXIT_CODE: i32 = 99;

/// Every crash point, in the order an operation reaches them. `ALL` is what the harness runs.
pub const ALL: &[&str] = &[
    // Group commit (the WAL's writer thread, or inline when it has none).
    "wal.sync.before_write",
    "wal.sync.after_write",
    "wal.sync.after_fdatasync",
    // A segment roll-over.
    "wal.roll.after_create",
    "wal.roll.after_dir_sync",
    // Compaction: sync, roll, snapshot (an atomic replacement), drop covered segments.
    "compact.after_roll",
    "snapshot.after_tmp_write",
    "snapshot.after_tmp_fsync",
    "snapshot.after_rename",
    "compact.after_snapshot",
    "compact.after_drop",
    // The roster file (an atomic replacement), and a rejoin's first record after it.
    "roster.after_tmp_write",
    "roster.after_rename",
    "rejoin.after_roster_saved",
    // Swap persistence: the new build written, then installed as current.
    "next.after_tmp_fsync",
    "next.after_rename",
    "swap.after_signature_install",
    "swap.after_install",
    // Recovery itself: after cutting an unsynced WAL tail on open.
    "wal.open.after_cut",
];

/// Marks `name` as reached; exits here if the test build was told to (see the module doc).
#[inline]
pub fn reach(name: &str) {
    #[cfg(feature = "crash-points")]
    armed::reach(name);
    #[cfg(not(feature = "crash-points"))]
    let _ = name;
}

#[cfg(feature = "crash-points")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    fn plan() -> &'static Option<(String, u64)> {
        PLAN.get_or_init(|| {
            let spec = std::env::var("WAXOS_CRASH_AT").ok()?;
            let (name, nth) = match spec.split_once('@') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            if !super::ALL.contains(&name.as_str()) {
                tracing::error!("WAXOS_CRASH_AT names no crash point: {name:?}");
            }
            Some((name, nth.max(1)))
        })
    }

    pub fn reach(name: &str) {
        let Some((armed, nth)) = plan() else { return };
        if armed == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
            tracing::error!("crash point {name} reached (time {nth}): exiting now");
            waxos_proto::logging::flush();
            std::process::exit(super::EXIT_CODE);
        }
    }
}
