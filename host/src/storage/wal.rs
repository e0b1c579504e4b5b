//! The write-ahead log of the guest's `persist` records: checksummed, append-only, in
//! segment files.
//!
//! Record format: `[len: u32 LE][crc32c(payload): u32 LE][payload]`. Appends are buffered and
//! made durable together by one `fdatasync` per step (group commit): the step loop calls
//! `append` for every record of a step, then `sync` once, before anything of that step leaves
//! the host. Segments are files `wal/<n>.wal`; a segment that outgrows its limit is closed and
//! the next one started, and compaction deletes segments a snapshot covers. On open, a torn or
//! corrupt *last* record of the last segment (a crash mid-append) is cut off with a warning; a
//! bad record anywhere else is corruption and stops the start with an error naming the file
//! and offset, because silently dropping acknowledged state is worse than not starting.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Header bytes per record.
const HEADER_BYTES: usize = 8;
/// Largest record accepted (a guard against a corrupt length field).
pub const RECORD_BYTES_MAX: usize = 1 << 30;

/// An open write-ahead log.
pub struct Wal {
    dir: PathBuf,
    file: File,
    segment: u64,
    segment_len: u64,
    segment_bytes_max: u64,
    buffer: Vec<u8>,
    /// First segment still needed (the snapshot covers those before it).
    first_segment: u64,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.wal"))
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> anyhow::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".wal").and_then(|n| n.parse::<u64>().ok()) {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

impl Wal {
    /// Opens the log in `dir`, whose segments before `first_segment` are covered by a
    /// snapshot, and returns it with every durable record after that point, in order.
    pub fn open(dir: &Path, first_segment: u64, segment_bytes_max: u64) -> anyhow::Result<(Wal, Vec<Vec<u8>>)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut present = segments(dir)?;
        for &old in present.iter().filter(|&&n| n < first_segment) {
            // Left over by a compaction interrupted after its snapshot was durable.
            std::fs::remove_file(segment_path(dir, old))?;
        }
        present.retain(|&n| n >= first_segment);
        if let Some(&first) = present.first() {
            if first != first_segment {
                bail!("{}: WAL segment {first_segment} is missing (found {first}); refusing to start", dir.display());
            }
        }
        for pair in present.windows(2) {
            if pair[1] != pair[0] + 1 {
                bail!("{}: WAL segment {} is missing; refusing to start", dir.display(), pair[0] + 1);
            }
        }
        let mut records = Vec::new();
        let last = present.last().copied();
        for &n in &present {
            let path = segment_path(dir, n);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (mut found, valid_len) = scan(&bytes, &path, Some(n) == last)?;
            records.append(&mut found);
            if valid_len < bytes.len() as u64 {
                tracing::warn!(
                    "{}: torn or corrupt tail at offset {valid_len} ({} bytes) cut off",
                    path.display(),
                    bytes.len() as u64 - valid_len
                );
                let file = OpenOptions::new().write(true).open(&path)?;
                file.set_len(valid_len)?;
                file.sync_all()?;
            }
        }
        let segment = last.unwrap_or(first_segment);
        let path = segment_path(dir, segment);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let segment_len = file.seek(SeekFrom::End(0))?;
        if last.is_none() {
            super::sync_dir(dir)?;
        }
        let wal = Wal {
            dir: dir.to_path_buf(),
            file,
            segment,
            segment_len,
            segment_bytes_max: segment_bytes_max.max(1),
            buffer: Vec::new(),
            first_segment,
        };
        Ok((wal, records))
    }

    /// Buffers one record; durable after the next `sync`.
    pub fn append(&mut self, payload: &[u8]) {
        self.buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buffer.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        self.buffer.extend_from_slice(payload);
    }

    /// Writes what is buffered and waits until it is on disk (one `fdatasync`); starts a new
    /// segment when this one is full.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.segment);
        self.file.write_all(&self.buffer).with_context(|| format!("appending to {}", path.display()))?;
        self.file.sync_data().with_context(|| format!("fdatasync of {}", path.display()))?;
        self.segment_len += self.buffer.len() as u64;
        self.buffer.clear();
        if self.segment_len >= self.segment_bytes_max {
            self.roll()?;
        }
        Ok(())
    }

    /// True when records are buffered that no `sync` or hand-off has taken yet.
    pub fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Hands what is buffered to a writer on another thread (`storage::syncer`): the bytes and
    /// a handle to the segment they belong at the end of. Starts a new segment first when this
    /// one is full; the caller guarantees no earlier hand-off is still being written (one
    /// writer, in order). None when nothing is buffered.
    pub fn take_for_sync(&mut self) -> anyhow::Result<Option<(File, Vec<u8>)>> {
        if self.buffer.is_empty() {
            return Ok(None);
        }
        if self.segment_len >= self.segment_bytes_max {
            let buffer = std::mem::take(&mut self.buffer);
            self.roll()?;
            self.buffer = buffer;
        }
        let file = self.file.try_clone().context("duplicating the WAL segment handle")?;
        self.segment_len += self.buffer.len() as u64;
        Ok(Some((file, std::mem::take(&mut self.buffer))))
    }

    /// Closes the current segment and starts the next; returns the new segment's number.
    pub fn roll(&mut self) -> anyhow::Result<u64> {
        self.sync()?;
        let next = self.segment + 1;
        let path = segment_path(&self.dir, next);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        super::sync_dir(&self.dir)?;
        self.file = file;
        self.segment = next;
        self.segment_len = 0;
        Ok(next)
    }

    /// Deletes the segments before `first` (a durable snapshot covers them).
    pub fn drop_segments_before(&mut self, first: u64) -> anyhow::Result<()> {
        for n in segments(&self.dir)?.into_iter().filter(|&n| n < first) {
            std::fs::remove_file(segment_path(&self.dir, n))?;
        }
        self.first_segment = first;
        super::sync_dir(&self.dir)
    }

    /// Every durable record after the snapshot, read back from disk.
    pub fn read_all(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut records = Vec::new();
        for n in segments(&self.dir)?.into_iter().filter(|&n| n >= self.first_segment) {
            let path = segment_path(&self.dir, n);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (mut found, _) = scan(&bytes, &path, n == self.segment)?;
            records.append(&mut found);
        }
        Ok(records)
    }
}

/// Every record in the segments of `dir`, without changing anything (tests look at the disk).
#[cfg(test)]
pub fn read_records(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut records = Vec::new();
    for n in segments(dir)? {
        let path = segment_path(dir, n);
        let bytes = std::fs::read(&path)?;
        records.append(&mut scan(&bytes, &path, true)?.0);
    }
    Ok(records)
}

/// Reads the records of one segment; returns them and the length of the valid prefix. A bad
/// record is tolerated only as the tail of the last segment.
fn scan(bytes: &[u8], path: &Path, is_last: bool) -> anyhow::Result<(Vec<Vec<u8>>, u64)> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Some((payload, next)) => {
                records.push(payload.to_vec());
                at = next;
            }
            None => {
                if !is_last || valid_record_follows(bytes, at) {
                    bail!(
                        "{}: corrupt record at offset {at} with data after it; refusing to start \
                         (restore the file, or wipe the data dir to rejoin from peers)",
                        path.display()
                    );
                }
                break;
            }
        }
    }
    Ok((records, at as u64))
}

/// The record at `at` if it is whole and its checksum matches, with the offset after it.
fn record_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at + HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len > RECORD_BYTES_MAX {
        return None;
    }
    let payload = bytes.get(at + HEADER_BYTES..at + HEADER_BYTES + len)?;
    (crc32c::crc32c(payload) == crc).then_some((payload, at + HEADER_BYTES + len))
}

/// Whether some whole, valid record starts after a bad one at `bad`: then the damage is not a
/// torn tail. Only records that end exactly at the end or at another valid record count, so
/// random bytes are very unlikely to pass.
fn valid_record_follows(bytes: &[u8], bad: usize) -> bool {
    (bad + 1..bytes.len().saturating_sub(HEADER_BYTES)).any(|at| {
        record_at(bytes, at).is_some_and(|(payload, next)| {
            !payload.is_empty() && (next == bytes.len() || record_at(bytes, next).is_some())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT_MAX: u64 = 1 << 20;

    fn open(dir: &Path) -> (Wal, Vec<Vec<u8>>) {
        Wal::open(dir, 0, SEGMENT_MAX).expect("open")
    }

    /// Appends and syncs; returns the length of the current segment afterwards.
    fn write_records(dir: &Path, payloads: &[&[u8]]) -> u64 {
        let (mut wal, _) = open(dir);
        for p in payloads {
            wal.append(p);
        }
        wal.sync().expect("sync");
        wal.segment_len
    }

    #[test]
    fn wal_empty_file_opens_with_no_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, records) = open(dir.path());
        assert!(records.is_empty());
        // An empty segment file (crash right after creating it) is fine too.
        let (_, records) = open(dir.path());
        assert!(records.is_empty());
    }

    #[test]
    fn wal_replays_what_was_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), &[b"one", b"two", b"three"]);
        let (_, records) = open(dir.path());
        assert_eq!(records, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn wal_truncates_torn_tail_at_every_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix_len = write_records(dir.path(), &[b"first record", b"second record"]);
        let full_len = write_records(dir.path(), &[b"the last record, torn"]);
        let path = segment_path(dir.path(), 0);
        let whole = std::fs::read(&path).expect("read");
        for cut in prefix_len..full_len {
            std::fs::write(&path, &whole[..cut as usize]).expect("write");
            let (_, records) = open(dir.path());
            assert_eq!(records.len(), 2, "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).expect("meta").len(), prefix_len, "tail cut off at {cut}");
        }
        // A corrupt (not just short) last record is a torn tail too.
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        std::fs::write(&path, &flipped).expect("write");
        assert_eq!(open(dir.path()).1.len(), 2);
    }

    #[test]
    fn wal_refuses_corruption_before_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), &[b"first record", b"second record", b"third record"]);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_BYTES + 2] ^= 0xff; // inside the first payload
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path(), 0, SEGMENT_MAX).err().expect("must refuse").to_string();
        assert!(err.contains("0000000000000000.wal") && err.contains("offset 0"), "{err}");
    }

    #[test]
    fn wal_rolls_over_segments_and_replays_across_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path(), 0, 64).expect("open");
        for i in 0..20u32 {
            wal.append(format!("record {i:02} with some padding").as_bytes());
            wal.sync().expect("sync");
        }
        assert!(segments(dir.path()).expect("list").len() > 5, "segments must roll over");
        let (_, records) = Wal::open(dir.path(), 0, 64).expect("reopen");
        assert_eq!(records.len(), 20);
        assert_eq!(records[19], b"record 19 with some padding");
        // Corruption in a segment that is not the last is an error, not a torn tail.
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path(), 0, 64).err().expect("must refuse").to_string();
        assert!(err.contains("0000000000000001.wal"), "{err}");
    }

    #[test]
    fn wal_replay_after_compaction_starts_at_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(dir.path());
        wal.append(b"before");
        let first = wal.roll().expect("roll");
        wal.append(b"after");
        wal.sync().expect("sync");
        // The snapshot covers segment 0; a crash before the drop leaves it on disk.
        let (_, records) = Wal::open(dir.path(), first, SEGMENT_MAX).expect("open");
        assert_eq!(records, vec![b"after".to_vec()]);
        assert!(!segment_path(dir.path(), 0).exists(), "covered segment deleted on open");
    }
}
