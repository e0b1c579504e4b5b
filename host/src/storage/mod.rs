//! Durable storage of a host: the write-ahead log of the guest's `persist` records, the latest
//! snapshot of the guest's state, and atomic file replacement.
//!
//! Start-up state is the latest valid snapshot plus every WAL record after it. Compaction
//! (`Storage::compact`) rolls the WAL to a fresh segment, writes the snapshot atomically naming
//! that segment as the first one it does not cover, and only then deletes the covered
//! segments, so a crash at any point leaves a consistent pair. A data dir whose WAL failed a
//! sync is set aside on the next start and the host rejoins (`lost`).

pub mod lost;
pub mod snapshot;
pub mod syncer;
pub mod wal;

use std::path::{Path, PathBuf};

use anyhow::Context;

pub use snapshot::Snapshot;
pub use wal::Wal;

/// The disk failed a write or sync: what the page cache holds may not be on the disk, so the
/// data dir is marked (`lost`) and the next start rejoins rather than replay.
#[derive(Debug)]
pub struct DiskFailed(pub String);

impl std::fmt::Display for DiskFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for DiskFailed {}

/// The storage of one host.
pub struct Storage {
    dir: PathBuf,
    /// The write-ahead log.
    pub wal: Wal,
    /// Records appended since the last snapshot.
    pub records_since_snapshot: u64,
    /// Their bytes.
    pub bytes_since_snapshot: u64,
    /// The size of the last snapshot (0: none yet).
    pub snapshot_bytes: u64,
    /// `COMPACT_AT_LOG_TO_SNAPSHOT_RATIO` unless the host says otherwise (`--compact-log-ratio`).
    pub compact_log_ratio: f64,
}

/// By default, a compaction waits until the WAL since the last snapshot is at least this fraction of the
/// snapshot's size (and `--snapshot-every` records long). A snapshot costs its whole size to
/// make and write, however few records it covers: at a million keys (115 MB) a compaction every
/// 20,000 records meant one every few seconds under load, each writing 115 MB. Tied to the
/// snapshot's size, the bytes written for snapshots stay within four times the WAL's, and a
/// restart replays at most a quarter of a snapshot's worth of records on top of the snapshot:
/// replaying is about ten times slower per byte than loading a snapshot (at a million keys, a
/// log of half the snapshot's size took 3.5 s to replay, the snapshot 0.4 s to load).
pub const COMPACT_AT_LOG_TO_SNAPSHOT_RATIO: f64 = 0.25;

/// What a guest starts from.
pub struct Durable {
    /// The latest snapshot's bytes, if any.
    pub snapshot: Option<Vec<u8>>,
    /// Records after it, in order.
    pub records: Vec<Vec<u8>>,
}

impl Storage {
    /// Opens (creating) the storage in `dir` and returns it with the durable state.
    pub fn open(dir: &Path, segment_bytes_max: u64) -> anyhow::Result<(Storage, Durable)> {
        create_dir_durably(dir)?;
        let snapshot = Snapshot::load(dir)?;
        let first_segment = snapshot.as_ref().map_or(0, |s| s.first_segment);
        let (wal, records) = match Wal::open(&dir.join("wal"), first_segment, snapshot.is_some(), segment_bytes_max) {
            Ok(opened) => opened,
            Err(e) if e.is::<DiskFailed>() => {
                // Linux reports a writeback error once: the next start's fsync would pass and
                // replay pages that may never reach the disk. Mark, so that it rejoins instead.
                if let Err(mark) = lost::mark(dir, &format!("{e:#}")) {
                    tracing::error!("cannot mark {} as needing a rejoin either: {mark:#}", dir.display());
                }
                return Err(e.context("the disk failed before the WAL could be replayed; the next start rejoins"));
            }
            Err(e) => return Err(e),
        };
        let storage = Storage {
            dir: dir.to_path_buf(),
            wal,
            records_since_snapshot: records.len() as u64,
            bytes_since_snapshot: records.iter().map(|r| r.len() as u64).sum(),
            snapshot_bytes: snapshot.as_ref().map_or(0, |s| s.bytes.len() as u64),
            compact_log_ratio: COMPACT_AT_LOG_TO_SNAPSHOT_RATIO,
        };
        Ok((storage, Durable { snapshot: snapshot.map(|s| s.bytes), records }))
    }

    /// Marks this data dir: its WAL failed a write or sync (see `lost`).
    pub fn mark_wal_failed(&self, reason: &str) -> anyhow::Result<()> {
        lost::mark(&self.dir, reason)
    }

    /// Everything durable now (to restart a crashed guest): the snapshot and the records of the
    /// segments it does not cover (a compaction off the step loop saves its snapshot before the
    /// step loop drops the segments it covers).
    pub fn read_durable(&self) -> anyhow::Result<Durable> {
        let snapshot = Snapshot::load(&self.dir)?;
        let records = match &snapshot {
            Some(snapshot) => self.wal.read_from(snapshot.first_segment)?,
            None => self.wal.read_all()?,
        };
        Ok(Durable { snapshot: snapshot.map(|s| s.bytes), records })
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `snapshot` (the guest's state after every record appended so far) the new base
    /// and drops the WAL segments it covers.
    pub fn compact(&mut self, snapshot: Vec<u8>) -> anyhow::Result<()> {
        let len = snapshot.len() as u64;
        self.wal.sync()?;
        let first_segment = self.wal.roll()?;
        crate::crash_point::reach("compact.after_roll");
        Snapshot { first_segment, bytes: snapshot }.save(&self.dir)?;
        crate::crash_point::reach("compact.after_snapshot");
        self.wal.drop_segments_before(first_segment)?;
        crate::crash_point::reach("compact.after_drop");
        self.records_since_snapshot = 0;
        self.bytes_since_snapshot = 0;
        self.snapshot_bytes = len;
        Ok(())
    }

    /// Counts a record appended to the WAL.
    pub fn note_appended(&mut self, record: &[u8]) {
        self.records_since_snapshot += 1;
        self.bytes_since_snapshot += record.len() as u64;
    }

    /// Whether a compaction is due: at least `snapshot_every` records since the last snapshot,
    /// and a log that is `compact_log_ratio` of the snapshot's size.
    pub fn compaction_due(&self, snapshot_every: u64) -> bool {
        self.records_since_snapshot >= snapshot_every
            && self.bytes_since_snapshot as f64 >= self.snapshot_bytes as f64 * self.compact_log_ratio
    }
}

/// The durable state as it was when the WAL was rolled to segment `boundary`: the snapshot in
/// `dir` and the records of the closed segments before `boundary` it does not cover. Read off the
/// step loop (`crate::staging`); only the step loop deletes segments, and not while this runs.
pub fn read_durable_before(dir: &Path, boundary: u64) -> anyhow::Result<(Durable, u64)> {
    let snapshot = Snapshot::load(dir)?;
    // Without a snapshot the log starts at segment 0.
    let first = snapshot.as_ref().map_or(0, |s| s.first_segment);
    let records = wal::read_closed_segments(&dir.join("wal"), first, boundary)?;
    Ok((Durable { snapshot: snapshot.map(|s| s.bytes), records }, first))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path has no parent directory")?;
    create_dir_durably(dir)?;
    let tmp = path.with_extension("tmp");
    // Crash points are named after the file: `roster.after_rename`, `snapshot.after_tmp_write`…
    let point = |step: &str| {
        let stem = path.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
        crate::crash_point::reach(&format!("{stem}.{step}"));
    };
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    point("after_tmp_write");
    file.sync_all().with_context(|| format!("fsync of {}", tmp.display()))?;
    point("after_tmp_fsync");
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    point("after_rename");
    sync_dir(dir)
}

/// Creates `dir` (and missing parents) if it is not there, and makes each new entry durable
/// with an fsync of the directory holding it: a crash must not lose a directory that files
/// written later were synced into.
pub fn create_dir_durably(dir: &Path) -> anyhow::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// fsync of a directory, so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of directory {}", dir.display()))
}
