//! Backup and restore: `Admin.SaveSnapshot` (what `waxos … snapshot save FILE` calls) and
//! `waxosd … --restore FILE`. The file's format is `waxos_proto::backup` (an 80-byte header:
//! magic, version, slot, cluster id of origin, length and CRC32C; then the guest's snapshot).
//!
//! **Save.** First a linearizable read barrier: a GET of `BARRIER_KEY` through the guest's
//! ordinary read path (ReadIndex at the leader, follower ReadIndex elsewhere). It is answered
//! only once this replica has applied the read index, which a majority confirmed after the read
//! arrived, so every write acknowledged before the call is applied here. Then, between two
//! steps of the step loop, the guest's ordinary snapshot and its status (`applied`, the slot
//! of the header) are taken together. The applied slot never goes back on a live replica
//! (a guest crash restarts from every record appended, lazy ones included), so the state is at
//! a slot at or past every write acknowledged before the call. It streams to the caller in
//! `CHUNK_BYTES` chunks through a small bounded queue: the host holds the state once, not the
//! file twice over.
//!
//! **Restore.** Every member of the new cluster starts with `--restore FILE` and an empty data
//! dir, as with etcd's `snapshot restore`. The file is read and checked before the host listens
//! (a damaged or truncated one is refused with the reason, exit 1, nothing written). The roster
//! is made as at any first start, so the coordinator mints a new cluster id; peers of the old
//! cluster are refused as any other cluster's are (their batches name another id, see
//! `identity`). Once the roster is known, a throwaway guest instance is started from the backup
//! (the guest's `backup` module keeps only the state machine and its slot, and takes the new
//! roster), its snapshot becomes the data dir's base, and the host starts as from any
//! snapshot. `restore.json` in the data dir records which backup it came from: written as
//! pending before the roster, done once the snapshot is durable. A start that stopped in
//! between (it never voted) restores again; a restart with `--restore` still on the command
//! line after a restore is an ordinary restart; `--restore` into a data dir that holds another
//! replica, or that was restored from another backup, is refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use waxos_proto::backup::{Header, HEADER_BYTES};
use waxos_proto::SnapshotChunk;

use crate::runtime::{Command, Effect, GuestBuild, GuestConfig, Outcome};
use crate::step_loop::{Input, StepLoopHandle};
use crate::storage::{Durable, Storage};

/// Bytes of backup file per streamed message.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Chunks queued ahead of a slow caller (bounds what a save holds beyond the state itself).
const CHUNKS_QUEUED_MAX: usize = 4;
/// The key the read barrier reads (its value does not matter; only that the read is linearizable).
pub const BARRIER_KEY: &str = "waxos/backup-barrier";
/// How long the read barrier may take (a majority must confirm the leader).
const BARRIER_DEADLINE: Duration = Duration::from_secs(10);
/// How long the step loop may take to hand over the snapshot.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(30);
/// The prefix that asks the guest's `start` for a restore (the guest's `backup::RESTORE_TAG`).
pub const RESTORE_TAG: &[u8; 8] = b"WXRESTOR";
/// The data dir's record of the backup it was restored from.
const MARKER_FILE: &str = "restore.json";

/// A backup about to stream: its header and the state after it.
pub struct Saved {
    /// The file's header.
    pub header: Header,
    /// The guest's snapshot.
    pub state: Vec<u8>,
}

/// Takes a backup of this replica's state: the read barrier, then the snapshot (see the
/// module doc). `cluster_id` is the cluster's id as this host knows it.
pub async fn save(step_loop: &StepLoopHandle, cluster_id: &str) -> Result<Saved, Status> {
    if !step_loop.ready.load(Ordering::Acquire) {
        return Err(Status::unavailable("the replica is still starting; retry"));
    }
    let barrier_started = Instant::now();
    let (reply, outcome) = oneshot::channel();
    let command = Command::Get(BARRIER_KEY.to_string());
    step_loop.offer(Input::Request { command, client: 0, seq: 0, reply });
    match tokio::time::timeout(BARRIER_DEADLINE, outcome).await {
        Ok(Ok(Outcome::Value(_))) => {}
        Ok(Ok(Outcome::Redirect(_))) => return Err(Status::unavailable("no leader known yet; retry")),
        Ok(Ok(Outcome::Rejected(reason))) => return Err(Status::unavailable(reason)),
        Ok(Ok(other)) => return Err(Status::internal(format!("the read barrier was answered with {other:?}"))),
        Ok(Err(_)) => return Err(Status::unavailable("the replica dropped the read barrier (restarting); retry")),
        Err(_) => {
            return Err(Status::unavailable(format!(
                "the read barrier was not confirmed within {} s (is a majority of the voters up?); retry",
                BARRIER_DEADLINE.as_secs()
            )))
        }
    }
    let barrier_ms = barrier_started.elapsed().as_secs_f64() * 1e3;
    let snapshot_started = Instant::now();
    let (reply, taken) = oneshot::channel();
    step_loop.offer(Input::Backup(reply));
    let (state, status_json) = match tokio::time::timeout(SNAPSHOT_DEADLINE, taken).await {
        Ok(Ok(Ok(taken))) => taken,
        Ok(Ok(Err(reason))) => return Err(Status::unavailable(reason)),
        Ok(Err(_)) => return Err(Status::unavailable("the step loop dropped the snapshot; retry")),
        Err(_) => return Err(Status::unavailable("the snapshot was not taken in time; retry")),
    };
    let status: serde_json::Value = serde_json::from_str(&status_json)
        .map_err(|e| Status::internal(format!("the guest's status is not JSON ({e}): {status_json:?}")))?;
    let (Some(next_apply), Some(node_id)) = (status["applied"].as_u64(), status["me"].as_u64()) else {
        return Err(Status::internal(format!("the guest's status names no applied slot: {status_json:?}")));
    };
    let saved_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let header = Header::for_state(&state, node_id as u32, next_apply, saved_at_ms.as_millis() as u64, cluster_id);
    tracing::info!(
        "backup taken: slot {next_apply}, {} bytes of state (read barrier {barrier_ms:.1} ms, snapshot {:.1} ms)",
        state.len(),
        snapshot_started.elapsed().as_secs_f64() * 1e3
    );
    Ok(Saved { header, state })
}

/// Streams `saved` as the bytes of a backup file in order: the header, then the state, in
/// chunks of at most `CHUNK_BYTES`. Logs the response once the last chunk is handed over (or
/// the caller went away).
pub fn stream(saved: Saved, started: Instant) -> mpsc::Receiver<Result<SnapshotChunk, Status>> {
    let (tx, rx) = mpsc::channel(CHUNKS_QUEUED_MAX);
    tokio::spawn(async move {
        let header = saved.header.encode();
        let total = HEADER_BYTES + saved.state.len();
        let first = CHUNK_BYTES - HEADER_BYTES;
        let (head, rest) = saved.state.split_at(first.min(saved.state.len()));
        let mut data = header.to_vec();
        data.extend_from_slice(head);
        let mut sent = 0;
        for chunk in std::iter::once(data).chain(rest.chunks(CHUNK_BYTES).map(<[u8]>::to_vec)) {
            let bytes = chunk.len();
            if tx.send(Ok(SnapshotChunk { data: chunk })).await.is_err() {
                tracing::info!(
                    "response sent op=snapshot-save error=\"the caller went away after {sent} of {total} bytes\" latency_ms={:.2}",
                    started.elapsed().as_secs_f64() * 1e3
                );
                return;
            }
            sent += bytes;
        }
        tracing::info!(
            "response sent op=snapshot-save slot={} bytes={total} crc32c={:08x} latency_ms={:.2}",
            saved.header.next_apply,
            saved.header.state_crc32c,
            started.elapsed().as_secs_f64() * 1e3
        );
    });
    rx
}

/// A backup file read and checked, to restore from.
pub struct Backup {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// The guest's snapshot it holds.
    state: Vec<u8>,
}

impl Backup {
    /// Reads `path` and checks it whole (header, length, checksum). The error says what is
    /// wrong with the file.
    pub fn load(path: &Path) -> anyhow::Result<Backup> {
        let refuse =
            |why: String| anyhow!("--restore {}: {why}; refusing to start (nothing was written)", path.display());
        let mut file = std::fs::read(path).map_err(|e| refuse(format!("cannot read it: {e}")))?;
        let (header, _) = waxos_proto::backup::verify(&file).map_err(|e| refuse(e.to_string()))?;
        file.drain(..HEADER_BYTES);
        Ok(Backup { path: path.to_path_buf(), header, state: file })
    }

    /// Names this backup in the data dir's marker: its origin, slot, time and checksum.
    /// What names this backup (its origin, slot, save time and checksum): a registration
    /// carries it, and the marker file records it.
    pub fn id(&self) -> String {
        let h = &self.header;
        let origin = if h.cluster_id.is_empty() { "unknown" } else { h.cluster_id.as_str() };
        format!("cluster {origin} slot {} saved {} crc32c {:08x}", h.next_apply, h.saved_at_ms, h.state_crc32c)
    }
}

/// What `--restore` does with this data dir (`plan`).
pub enum Plan {
    /// Restore from the backup once the roster is known.
    Restore(Backup),
    /// This data dir was restored from the backup already: start from its own state.
    Restored,
}

/// The data dir's record of a restore (`restore.json`).
struct Marker {
    /// `Backup::id` of the file restored from.
    backup: String,
    /// Where the file was (for the operator; not compared).
    file: String,
    /// The restored state is the data dir's snapshot.
    done: bool,
}

fn read_marker(data_dir: &Path) -> anyhow::Result<Option<Marker>> {
    let path = data_dir.join(MARKER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let damaged = || anyhow!("{} is damaged: remove it only if this data dir holds no replica", path.display());
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| damaged())?;
    let text = |field: &str| value[field].as_str().map(str::to_string).ok_or_else(damaged);
    let done = value["done"].as_bool().ok_or_else(damaged)?;
    Ok(Some(Marker { backup: text("backup")?, file: text("file")?, done }))
}

fn write_marker(data_dir: &Path, backup: &Backup, done: bool) -> anyhow::Result<()> {
    let marker = Marker { backup: backup.id(), file: backup.path.display().to_string(), done };
    let value = serde_json::json!({"backup": marker.backup, "file": marker.file, "done": marker.done});
    let bytes = serde_json::to_vec_pretty(&value).context("encoding the restore marker")?;
    crate::storage::write_atomically(&data_dir.join(MARKER_FILE), &bytes)
}

/// Whether `data_dir` holds (part of) a replica: a roster, a snapshot or WAL segments.
fn holds_replica(data_dir: &Path) -> bool {
    let wal_entries = std::fs::read_dir(data_dir.join("wal")).map(|mut d| d.next().is_some()).unwrap_or(false);
    data_dir.join("roster.json").exists() || data_dir.join("snapshot").exists() || wal_entries
}

/// Reads and checks the backup at `path` and decides what to do with `data_dir` (before the
/// host registers or listens): restore into an empty data dir (recorded as pending), or go on
/// from an earlier restore of the same backup. Refuses a data dir that holds another replica.
pub fn plan(data_dir: &Path, path: &Path) -> anyhow::Result<Plan> {
    let backup = Backup::load(path)?;
    let h = &backup.header;
    tracing::info!(
        "--restore {}: a backup of cluster {} at slot {} ({} bytes of state, saved by node {} at {} ms since the epoch), checksum verified",
        path.display(),
        if h.cluster_id.is_empty() { "unknown" } else { h.cluster_id.as_str() },
        h.next_apply,
        h.state_bytes,
        h.node_id,
        h.saved_at_ms
    );
    match read_marker(data_dir)? {
        Some(marker) if marker.backup != backup.id() => bail!(
            "--restore {}: {} was restored from another backup ({}, from {}): refusing to start; remove --restore \
             to start it from its own state, or restore into an empty data dir",
            path.display(),
            data_dir.display(),
            marker.backup,
            marker.file
        ),
        Some(marker) if marker.done => {
            tracing::info!("{} was restored from this backup already: starting from its own state", data_dir.display());
            Ok(Plan::Restored)
        }
        // An earlier start stopped before the restore was durable: it never voted, restore again.
        Some(_) => Ok(Plan::Restore(backup)),
        None if holds_replica(data_dir) => bail!(
            "--restore {}: {} already holds a replica: a restore starts a member of a new cluster in an empty data \
             dir; give another --data-dir, or remove --restore to start this one",
            path.display(),
            data_dir.display()
        ),
        None => {
            write_marker(data_dir, &backup, false)?;
            Ok(Plan::Restore(backup))
        }
    }
}

/// Restores `backup` into `storage` (empty) as member `config.me` of the new roster: a guest
/// instance started from the backup, whose snapshot becomes the data dir's base. Returns the
/// durable state to start the step loop from.
pub fn restore(
    backup: &Backup,
    data_dir: &Path,
    storage: &mut Storage,
    build: &GuestBuild,
    config: &GuestConfig,
    cluster_id: &str,
) -> anyhow::Result<Durable> {
    let started = Instant::now();
    let refuse = |why: String| anyhow!("--restore {}: {why}; refusing to start", backup.path.display());
    let mut guest = build.instantiate().map_err(|e| refuse(format!("the guest cannot be instantiated: {e}")))?;
    let mut request = Vec::with_capacity(RESTORE_TAG.len() + backup.state.len());
    request.extend_from_slice(RESTORE_TAG);
    request.extend_from_slice(&backup.state);
    let effects = match guest.start(config, Some(&request), &[]) {
        Ok(Ok(effects)) => effects,
        Ok(Err(refused)) => return Err(refuse(format!("the guest refused the backup: {refused}"))),
        Err(crash) => return Err(refuse(format!("the guest crashed restoring it: {crash}"))),
    };
    for effect in effects {
        if let Effect::Log(line) = effect {
            tracing::info!("guest (restore): {line}");
        }
    }
    // The header's slot must be the state's own (a file whose header and body disagree was
    // put together by hand: a review's break).
    let applied = guest.status().ok().and_then(|status| {
        let value: serde_json::Value = serde_json::from_str(&status).ok()?;
        value["applied"].as_u64()
    });
    if applied != Some(backup.header.next_apply) {
        return Err(refuse(format!(
            "its header says slot {}, but its state is at slot {}",
            backup.header.next_apply,
            applied.map_or("unknown".to_string(), |a| a.to_string())
        )));
    }
    let snapshot = guest.snapshot(false).map_err(|e| refuse(format!("the guest crashed in its snapshot: {e}")))?;
    let snapshot_bytes = snapshot.len();
    storage.compact(snapshot).context("writing the restored state")?;
    write_marker(data_dir, backup, true)?;
    tracing::info!(
        "restored from {} (cluster {} at slot {}) as node {} of cluster {cluster_id}: a {snapshot_bytes}-byte snapshot in {:.1} ms",
        backup.path.display(),
        if backup.header.cluster_id.is_empty() { "unknown" } else { backup.header.cluster_id.as_str() },
        backup.header.next_apply,
        config.me,
        started.elapsed().as_secs_f64() * 1e3
    );
    storage.read_durable()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host asks for a restore with the very tag the guest looks for.
    #[test]
    fn the_restore_tag_is_the_guests() {
        assert_eq!(RESTORE_TAG, waxos_guest::backup::RESTORE_TAG);
    }

    fn backup_file(dir: &Path, state: &[u8]) -> PathBuf {
        let header = Header::for_state(state, 2, 10, 5, "0123456789abcdef0123456789abcdef");
        let mut file = header.encode().to_vec();
        file.extend_from_slice(state);
        let path = dir.join("backup.waxos");
        std::fs::write(&path, file).expect("write");
        path
    }

    /// An empty data dir is marked pending; a data dir holding a replica is refused; one
    /// restored from this backup goes on, one restored from another is refused.
    #[test]
    fn restore_plans_follow_the_data_dirs_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = backup_file(dir.path(), b"state");
        let data = dir.path().join("data");
        assert!(matches!(plan(&data, &file), Ok(Plan::Restore(_))));
        assert!(data.join(MARKER_FILE).exists());
        // Again before the restore finished: restore again.
        let Ok(Plan::Restore(backup)) = plan(&data, &file) else { panic!("a pending restore is redone") };
        write_marker(&data, &backup, true).expect("done");
        assert!(matches!(plan(&data, &file), Ok(Plan::Restored)));
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).expect("mkdir");
        let other_file = backup_file(&other, b"other state");
        let err = plan(&data, &other_file).err().expect("another backup").to_string();
        assert!(err.contains("restored from another backup"), "{err}");
        let occupied = dir.path().join("occupied");
        std::fs::create_dir_all(&occupied).expect("mkdir");
        std::fs::write(occupied.join("roster.json"), b"{}").expect("write");
        let err = plan(&occupied, &file).err().expect("a replica").to_string();
        assert!(err.contains("already holds a replica"), "{err}");
    }

    /// A damaged file is refused before anything is written into the data dir.
    #[test]
    fn a_damaged_backup_is_refused_before_the_data_dir_is_touched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = backup_file(dir.path(), b"state");
        let mut bytes = std::fs::read(&file).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, bytes).expect("write");
        let data = dir.path().join("data");
        let err = plan(&data, &file).err().expect("refused").to_string();
        assert!(err.contains("checksum mismatch") && err.contains("refusing to start"), "{err}");
        assert!(!data.exists(), "nothing written");
    }
}
