//! The write-ahead log of the guest's `persist` records: checksummed, append-only, in
//! segment files.
//!
//! Record format: `[len: u32 LE][crc32c(payload): u32 LE][payload]`; a payload is never empty.
//! Appends are buffered and made durable together by one `fdatasync` per step (group commit):
//! the step loop calls `append` for every record of a step, then `sync` once, before anything of
//! that step leaves the host. Segments are files `wal/<n>.wal`; a segment that outgrows its
//! limit is closed and the next one started, and compaction deletes segments a snapshot covers.
//!
//! Opening tells a crash from damage, the way etcd does. Only the tail of the last segment can
//! hold a write that was never synced; there, and only there, three things are cut off with a
//! warning: a zero-filled tail (space a file system allocated but never wrote), a record cut
//! short by the end of the file (unless its checksum shows it whole with another length: then
//! the length field is damaged), and a last record whose damage shows a zeroed disk sector (a
//! torn write: the sector never reached the disk, and fdatasync never returned for it).
//! Anything else — a checksum mismatch with every sector present,
//! anything bad in a segment that is not the last — is damage to records that may have been
//! acknowledged, and stops the start with an error naming the file and offset: silently
//! dropping acknowledged state is worse than not starting. Before replaying, every segment and
//! the directory are fsynced, so a restart acts only on what the disk holds, not on pages a
//! failed fdatasync left in the cache (PostgreSQL's rule). Covered segments are deleted only
//! after everything has been validated.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

/// Header bytes per record.
const HEADER_BYTES: usize = 8;
/// Largest record accepted (a guard against a corrupt length field).
pub const RECORD_BYTES_MAX: usize = 1 << 30;
/// The unit a write tears at: a disk writes a sector whole or not at all.
const SECTOR_BYTES: usize = 512;

/// An open write-ahead log.
pub struct Wal {
    dir: PathBuf,
    /// The current segment, shared with the writer thread's hand-offs (an `Arc`, not a
    /// duplicated descriptor: a host short of file descriptors must still be able to sync).
    file: Arc<File>,
    segment: u64,
    segment_len: u64,
    segment_bytes_max: u64,
    buffer: Vec<u8>,
    /// First segment still needed (the snapshot covers those before it).
    first_segment: u64,
    /// A roll asked for (`request_roll`): made at the next hand-off, with no sync on the loop.
    roll_requested: bool,
    /// The segment a requested roll started, until the step loop takes it (`take_rolled`).
    rolled: Option<u64>,
    /// A segment was created whose directory entry is not durable yet: the next hand-off (or
    /// inline sync) syncs the directory before its records count as durable.
    dir_sync_owed: bool,
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

/// What `Wal::take_for_sync` hands the writer thread: the segment (shared, not duplicated: a
/// dup per hand-off cost a descriptor each), its durable length before the bytes, the bytes.
pub struct HandOff {
    /// The segment the bytes go at the end of.
    pub file: Arc<File>,
    /// Its durable length before them.
    pub start: u64,
    /// The records, framed.
    pub bytes: Vec<u8>,
    /// A directory to sync first: the segment is new and its entry not durable yet.
    pub sync_dir_first: Option<PathBuf>,
}

impl Wal {
    /// Opens the log in `dir`, whose segments before `first_segment` are covered by a
    /// snapshot, and returns it with every durable record after that point, in order. With
    /// `snapshot_exists`, segment `first_segment` must be there: compaction makes it durable
    /// before the snapshot that names it, so its absence (or a missing `wal/`) is damage.
    pub fn open(
        dir: &Path,
        first_segment: u64,
        snapshot_exists: bool,
        segment_bytes_max: u64,
    ) -> anyhow::Result<(Wal, Vec<Vec<u8>>)> {
        if !dir.exists() {
            if snapshot_exists {
                bail!(
                    "{} is missing but a snapshot names segment {first_segment} in it: the records after \
                     the snapshot are gone; refusing to start (restore it, or wipe the data dir to rejoin from peers)",
                    dir.display()
                );
            }
            super::create_dir_durably(dir)?;
        }
        let mut present = segments(dir)?;
        // Covered segments are left by a compaction interrupted after its snapshot was durable;
        // they go only once the rest has been validated.
        let covered: Vec<u64> = present.iter().copied().filter(|&n| n < first_segment).collect();
        present.retain(|&n| n >= first_segment);
        match present.first() {
            Some(&first) if first != first_segment => {
                bail!("{}: WAL segment {first_segment} is missing (found {first}); refusing to start", dir.display())
            }
            None if snapshot_exists => bail!(
                "{}: WAL segment {first_segment}, which the snapshot names as the next one, is missing: the \
                 records after the snapshot are gone; refusing to start (restore it, or wipe the data dir to \
                 rejoin from peers)",
                dir.display()
            ),
            _ => {}
        }
        for pair in present.windows(2) {
            if pair[1] != pair[0] + 1 {
                bail!("{}: WAL segment {} is missing; refusing to start", dir.display(), pair[0] + 1);
            }
        }
        // Replay only what is on the disk: pages a failed fdatasync left dirty in the cache
        // must fail here (or be written now), not be acted upon.
        for &n in &present {
            let path = segment_path(dir, n);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| super::DiskFailed(format!("fsync of {} before replaying it: {e}", path.display())))?;
        }
        super::sync_dir(dir).map_err(|e| super::DiskFailed(format!("{e:#}")))?;
        let mut records = Vec::new();
        let last = present.last().copied();
        for &n in &present {
            let path = segment_path(dir, n);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (mut found, valid_len, why) = scan(&bytes, &path, Some(n) == last)?;
            records.append(&mut found);
            if valid_len < bytes.len() as u64 {
                tracing::warn!(
                    "{}: {} at offset {valid_len} ({} bytes, never synced) cut off",
                    path.display(),
                    why.unwrap_or("unsynced tail"),
                    bytes.len() as u64 - valid_len
                );
                let file = OpenOptions::new().write(true).open(&path)?;
                file.set_len(valid_len)?;
                file.sync_all()?;
                crate::crash_point::reach("wal.open.after_cut");
            }
        }
        for old in covered {
            std::fs::remove_file(segment_path(dir, old))?;
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
        super::sync_dir(dir)?;
        let wal = Wal {
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            segment,
            segment_len,
            segment_bytes_max: segment_bytes_max.max(1),
            buffer: Vec::new(),
            first_segment,
            roll_requested: false,
            rolled: None,
            dir_sync_owed: false,
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
        if std::mem::take(&mut self.dir_sync_owed) {
            super::sync_dir(&self.dir)?;
        }
        if std::mem::take(&mut self.roll_requested) {
            // Inline (no writer thread): the requested roll happens here, and what was
            // buffered before it goes to the segment it closes.
            self.rolled = Some(self.roll()?);
            return Ok(());
        }
        if self.buffer.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.segment);
        let started = std::time::Instant::now();
        crate::crash_point::reach("wal.sync.before_write");
        let mut file: &File = &self.file;
        let written = file.write_all(&self.buffer).and_then(|()| {
            crate::crash_point::reach("wal.sync.after_write");
            file.sync_data()
        });
        if let Err(e) = written {
            // As the writer thread does: what may not be on the disk goes from the file too.
            let cut = file.set_len(self.segment_len).and_then(|()| file.sync_all());
            return Err(anyhow::Error::new(super::DiskFailed(format!(
                "appending to and syncing {}: {e} (cut back to {} bytes: {cut:?})",
                path.display(),
                self.segment_len
            ))));
        }
        crate::crash_point::reach("wal.sync.after_fdatasync");
        crate::metrics::wal_synced(self.buffer.len(), started.elapsed());
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

    /// Bytes buffered that no `sync` or hand-off has taken yet.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Hands what is buffered to a writer on another thread (`storage::syncer`): the bytes, a
    /// handle to the segment they belong at the end of, and its durable length before them.
    /// Starts a new segment first when this one is full; the caller guarantees no earlier
    /// hand-off is still being written (one writer, in order). None when nothing is buffered.
    ///
    /// A requested roll (`request_roll`) is made here, even with nothing buffered: since no
    /// earlier hand-off is in flight, every record before the new segment is durable, and what
    /// is buffered goes after it. The new segment's directory entry is synced by the writer
    /// thread before these bytes (`HandOff::sync_dir_first`), not on the step loop: with five
    /// hosts writing snapshots to one disk, an fsync on the loop took up to half a second.
    pub fn take_for_sync(&mut self) -> anyhow::Result<Option<HandOff>> {
        if self.buffer.is_empty() && !self.roll_requested {
            return Ok(None);
        }
        if self.roll_requested || self.segment_len >= self.segment_bytes_max {
            self.open_next_segment()?;
            if std::mem::take(&mut self.roll_requested) {
                self.rolled = Some(self.segment);
            }
        }
        let file = Arc::clone(&self.file);
        let start = self.segment_len;
        self.segment_len += self.buffer.len() as u64;
        let sync_dir_first = std::mem::take(&mut self.dir_sync_owed).then(|| self.dir.clone());
        Ok(Some(HandOff { file, start, bytes: std::mem::take(&mut self.buffer), sync_dir_first }))
    }

    /// Asks for a new segment at the next hand-off (or inline sync); `take_rolled` then names it.
    pub fn request_roll(&mut self) {
        self.roll_requested = true;
    }

    /// True while a requested roll has not been made yet.
    pub fn roll_pending(&self) -> bool {
        self.roll_requested
    }

    /// Records a roll made by the caller (`roll`, inline) for `take_rolled`.
    pub fn note_rolled(&mut self, segment: u64) {
        self.rolled = Some(segment);
    }

    /// The segment a requested roll started, once it is made: every record before it is durable.
    pub fn take_rolled(&mut self) -> Option<u64> {
        self.rolled.take()
    }

    /// The records buffered and not yet handed off, in order (they go after a requested roll).
    pub fn buffered_records(&self) -> Vec<Vec<u8>> {
        let mut records = Vec::new();
        let mut at = 0;
        while at + 8 <= self.buffer.len() {
            let mut len = [0u8; 4];
            len.copy_from_slice(&self.buffer[at..at + 4]);
            let len = u32::from_le_bytes(len) as usize;
            let Some(payload) = self.buffer.get(at + 8..at + 8 + len) else { break };
            records.push(payload.to_vec());
            at += 8 + len;
        }
        records
    }

    /// Creates the next segment and makes it current, leaving its directory sync owed: no
    /// hand-off may be in flight, and what is buffered goes to the new segment.
    fn open_next_segment(&mut self) -> anyhow::Result<()> {
        let next = self.segment + 1;
        let path = segment_path(&self.dir, next);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        crate::crash_point::reach("wal.roll.after_create");
        self.file = Arc::new(file);
        self.segment = next;
        self.segment_len = 0;
        self.dir_sync_owed = true;
        Ok(())
    }

    /// Closes the current segment and starts the next; returns the new segment's number.
    pub fn roll(&mut self) -> anyhow::Result<u64> {
        self.sync()?;
        self.open_next_segment()?;
        super::sync_dir(&self.dir)?;
        self.dir_sync_owed = false;
        crate::crash_point::reach("wal.roll.after_dir_sync");
        Ok(self.segment)
    }

    /// Deletes the segments before `first` (a durable snapshot covers them).
    pub fn drop_segments_before(&mut self, first: u64) -> anyhow::Result<()> {
        delete_segments_before(&self.dir, first)?;
        self.first_segment = first;
        Ok(())
    }

    /// The segments before `first` were deleted by a compaction off the step loop (`staging`).
    pub fn segments_dropped_before(&mut self, first: u64) {
        self.first_segment = self.first_segment.max(first);
    }

    /// Every durable record after the snapshot, read back from disk.
    pub fn read_all(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.read_from(self.first_segment)
    }

    /// Every durable record of the segments from `first` on (a snapshot saved by a compaction
    /// off the step loop covers the segments before it, which may still be here).
    pub fn read_from(&self, first: u64) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut records = Vec::new();
        for n in segments(&self.dir)?.into_iter().filter(|&n| n >= first.max(self.first_segment)) {
            let path = segment_path(&self.dir, n);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (mut found, _, _) = scan(&bytes, &path, n == self.segment)?;
            records.append(&mut found);
        }
        Ok(records)
    }

    /// The WAL's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Deletes the segments of the WAL in `dir` before `first` (a durable snapshot covers them), and
/// syncs the directory.
pub fn delete_segments_before(dir: &Path, first: u64) -> anyhow::Result<()> {
    for n in segments(dir)?.into_iter().filter(|&n| n < first) {
        std::fs::remove_file(segment_path(dir, n))?;
    }
    super::sync_dir(dir)
}

/// The records of the closed segments `from..to` of the WAL in `dir` (closed: rolled and synced
/// before, so every record in them is whole; a damaged one is an error). Read off the step loop
/// while it appends to a later segment.
pub fn read_closed_segments(dir: &Path, from: u64, to: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut records = Vec::new();
    let present = segments(dir)?;
    for n in from..to {
        if !present.contains(&n) {
            // Segments are numbered without gaps from the one a snapshot names.
            bail!("WAL segment {} is missing", segment_path(dir, n).display());
        }
        let path = segment_path(dir, n);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (mut found, _, _) = scan(&bytes, &path, false)?;
        records.append(&mut found);
    }
    Ok(records)
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

/// What `scan` found in a segment: its records, the length of the valid prefix and, when that
/// is not the whole file, why the rest is an unsynced tail.
type Scanned = (Vec<Vec<u8>>, u64, Option<&'static str>);

/// Reads the records of one segment; returns them, the length of the valid prefix and, when
/// that is not the whole file, why the rest is an unsynced tail. Only the last segment may end
/// in one (see the module doc); any other bad record is refused.
fn scan(bytes: &[u8], path: &Path, is_last: bool) -> anyhow::Result<Scanned> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Some((payload, next)) => {
                records.push(payload.to_vec());
                at = next;
            }
            None => {
                let unsynced = if is_last { unsynced_tail(bytes, at) } else { None };
                let Some(why) = unsynced else {
                    bail!(
                        "{}: corrupt record at offset {at} ({}); refusing to start \
                         (restore the file, or wipe the data dir to rejoin from peers)",
                        path.display(),
                        damage(bytes, at, is_last)
                    );
                };
                return Ok((records, at as u64, Some(why)));
            }
        }
    }
    Ok((records, at as u64, None))
}

/// The record at `at` if it is whole, not empty and its checksum matches, with the offset after
/// it.
fn record_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let (len, crc) = header_at(bytes, at)?;
    if len == 0 || len > RECORD_BYTES_MAX {
        return None;
    }
    let payload = bytes.get(at + HEADER_BYTES..at + HEADER_BYTES + len)?;
    (crc32c::crc32c(payload) == crc).then_some((payload, at + HEADER_BYTES + len))
}

/// The length and checksum fields of the record header at `at`, if the header is whole.
fn header_at(bytes: &[u8], at: usize) -> Option<(usize, u32)> {
    let header = bytes.get(at..at + HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    Some((len, crc))
}

/// Why the bytes from the bad record at `at` to the end of the last segment are a write that
/// never completed (and so was never acknowledged), or None when they are damage. When in
/// doubt, damage: refusing a valid crash state costs a rejoin, cutting synced records loses
/// acknowledged ones.
fn unsynced_tail(bytes: &[u8], at: usize) -> Option<&'static str> {
    if bytes[at..].iter().all(|&b| b == 0) {
        return Some("zero-filled tail");
    }
    let Some((len, _)) = header_at(bytes, at) else {
        return Some("torn record header");
    };
    if len == 0 {
        // Nothing writes an empty record: a zero header is unwritten space if its sector is
        // zeros to the end (a torn group commit: later sectors may hold records of the same
        // write, which was never synced either).
        let sector_end = ((at / SECTOR_BYTES) + 1) * SECTOR_BYTES;
        return bytes[at..sector_end.min(bytes.len())].iter().all(|&b| b == 0).then_some("torn write (zeroed sector)");
    }
    if len > RECORD_BYTES_MAX {
        return None;
    }
    let end = at + HEADER_BYTES + len;
    if end > bytes.len() {
        // Cut short by the end of the file: a crash mid-append, unless the record is whole
        // with another length (its length field is what is damaged).
        return (!whole_with_another_length(bytes, at)).then_some("record cut short by the end of the file");
    }
    // Whole but its checksum fails: torn only if a sector of it never reached the disk and
    // nothing written after it did (then it is the end of the last write). Zeros that a
    // client's value holds look the same, so a record followed by valid records is damage.
    let last = end == bytes.len() || bytes[end..].iter().all(|&b| b == 0);
    (last && has_zeroed_sector(bytes, at, end)).then_some("torn write (zeroed sector)")
}

/// Whether a disk sector that the range `from..to` touches is zeros in the file, judged whole
/// (a sector the file holds all of), or, at the end of the file, the part it holds when that is
/// at least `PARTIAL_SECTOR_BYTES_MIN`: the mark of a write that did not reach the disk.
fn has_zeroed_sector(bytes: &[u8], from: usize, to: usize) -> bool {
    const PARTIAL_SECTOR_BYTES_MIN: usize = 32;
    let mut sector = (from / SECTOR_BYTES) * SECTOR_BYTES;
    while sector < to {
        let sector_end = (sector + SECTOR_BYTES).min(bytes.len());
        let whole = sector_end - sector == SECTOR_BYTES || sector_end - sector >= PARTIAL_SECTOR_BYTES_MIN;
        if whole && bytes[sector..sector_end].iter().all(|&b| b == 0) {
            return true;
        }
        sector += SECTOR_BYTES;
    }
    false
}

/// Whether the record at `at`, which claims to run past the end of the file, is in fact whole
/// with a shorter length: its checksum matches some prefix of what follows its header, and
/// that prefix ends at the end of the file or at a valid record. Then its length field is
/// damaged, and the records it swallowed were synced. (Records inside a torn record's own
/// value never pass: the checksum is over the whole record.)
fn whole_with_another_length(bytes: &[u8], at: usize) -> bool {
    let Some((_, crc)) = header_at(bytes, at) else { return false };
    let payload_at = at + HEADER_BYTES;
    let mut running = 0u32;
    for (i, &b) in bytes[payload_at..].iter().enumerate() {
        running = crc32c::crc32c_append(running, &[b]);
        let next = payload_at + i + 1;
        if running == crc && (next == bytes.len() || record_at(bytes, next).is_some()) {
            return true;
        }
    }
    false
}

/// What is wrong with the bad record at `at`, for the error.
fn damage(bytes: &[u8], at: usize, is_last: bool) -> String {
    let tail_note = if is_last { "" } else { " in a segment that is not the last, so it was synced" };
    match header_at(bytes, at) {
        None => format!("header cut short{tail_note}"),
        Some((0, _)) => format!("zero length with data in its sector{tail_note}"),
        Some((len, _)) if len > RECORD_BYTES_MAX => format!("impossible length {len}{tail_note}"),
        Some((len, _)) if at + HEADER_BYTES + len > bytes.len() => {
            format!("length {len} runs past the end of the file but the record is whole with another length{tail_note}")
        }
        Some(_) if is_last => {
            "checksum mismatch where no write can have torn (no zeroed sector, or synced records after it): damage, not a torn write".to_string()
        }
        Some(_) => format!("checksum mismatch{tail_note}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT_MAX: u64 = 1 << 20;

    fn open(dir: &Path) -> (Wal, Vec<Vec<u8>>) {
        Wal::open(dir, 0, false, SEGMENT_MAX).expect("open")
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
    }

    /// Bit rot in the last record is not a torn write: every sector is there, so the record
    /// was written whole and may have been acknowledged. Cutting it would lose it silently.
    #[test]
    fn wal_refuses_a_checksum_mismatch_in_the_last_record_when_no_sector_is_zeroed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), &[b"first record", b"the last record, acknowledged"]);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path(), 0, false, SEGMENT_MAX).err().expect("must refuse").to_string();
        assert!(err.contains("checksum mismatch") && err.contains("not a torn write"), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "nothing cut on refusal");
    }

    /// Space a file system allocated but never wrote reads as zeros: the end of the log
    /// (etcd's rule), not an empty record and not corruption.
    #[test]
    fn wal_reads_a_zero_filled_tail_as_the_end_of_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let valid = write_records(dir.path(), &[b"one", b"two"]);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &bytes).expect("write");
        let (mut wal, records) = open(dir.path());
        assert_eq!(records, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), valid, "zeros cut off");
        // And the log goes on from there.
        wal.append(b"three");
        wal.sync().expect("sync");
        assert_eq!(open(dir.path()).1.len(), 3);
    }

    /// A group commit torn by power loss: its first page never reached the disk (zeros), a later
    /// page did. fdatasync never returned for any of it, so all of it is cut.
    #[test]
    fn wal_cuts_a_torn_group_commit_with_a_zeroed_page_and_records_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let valid = write_records(dir.path(), &[b"synced one", b"synced two"]) as usize;
        let path = segment_path(dir.path(), 0);
        let synced = std::fs::read(&path).expect("read");
        // What the torn write held: records from `valid` to past the next page boundary.
        let mut unsynced = Vec::new();
        for i in 0..200u32 {
            let payload = format!("unsynced record {i:04}");
            unsynced.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            unsynced.extend_from_slice(&crc32c::crc32c(payload.as_bytes()).to_le_bytes());
            unsynced.extend_from_slice(payload.as_bytes());
        }
        let page_end = 4096;
        assert!(valid + unsynced.len() > page_end + 512);
        let mut torn = synced.clone();
        torn.extend_from_slice(&unsynced);
        torn[valid..page_end].fill(0); // the first page of the write never reached the disk
        std::fs::write(&path, &torn).expect("write");
        let (_, records) = open(dir.path());
        assert_eq!(records, vec![b"synced one".to_vec(), b"synced two".to_vec()]);
        assert_eq!(std::fs::metadata(&path).expect("meta").len() as usize, valid);
        // A zeroed sector inside a record that is otherwise whole: torn too.
        let mut torn = synced;
        let big = vec![7u8; 2000];
        torn.extend_from_slice(&(big.len() as u32).to_le_bytes());
        torn.extend_from_slice(&crc32c::crc32c(&big).to_le_bytes());
        let payload_at = torn.len();
        torn.extend_from_slice(&big);
        let sector = payload_at.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        torn[sector..sector + SECTOR_BYTES].fill(0);
        std::fs::write(&path, &torn).expect("write");
        assert_eq!(open(dir.path()).1.len(), 2);
    }

    /// A zero length with data in the rest of its sector is not unwritten space: refused.
    #[test]
    fn wal_refuses_a_zeroed_header_with_data_in_its_sector() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), &[b"one", b"two", b"three"]);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        let second = HEADER_BYTES + 3;
        bytes[second..second + HEADER_BYTES].fill(0);
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path(), 0, false, SEGMENT_MAX).err().expect("must refuse").to_string();
        assert!(err.contains("zero length"), "{err}");
    }

    /// A snapshot names the segment after it; compaction made that segment durable first, so
    /// its absence (or a missing wal/) means records were lost: refused, never started without them.
    #[test]
    fn wal_refuses_to_open_without_the_segment_a_snapshot_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal_dir = dir.path().join("wal");
        let err = Wal::open(&wal_dir, 3, true, SEGMENT_MAX).err().expect("must refuse").to_string();
        assert!(err.contains("is missing"), "{err}");
        assert!(!wal_dir.exists(), "refusing creates nothing");
        std::fs::create_dir(&wal_dir).expect("mkdir");
        let err = Wal::open(&wal_dir, 3, true, SEGMENT_MAX).err().expect("must refuse").to_string();
        assert!(err.contains("segment 3") && err.contains("missing"), "{err}");
        // Without a snapshot an empty log is simply new.
        assert!(Wal::open(&wal_dir, 0, false, SEGMENT_MAX).is_ok());
    }

    /// Segments a snapshot covers are deleted only after the rest validated: a refused start
    /// changes nothing on disk.
    #[test]
    fn wal_deletes_covered_segments_only_after_validating_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(dir.path());
        wal.append(b"covered");
        let first = wal.roll().expect("roll");
        wal.append(b"after one");
        wal.append(b"after two");
        wal.sync().expect("sync");
        drop(wal);
        let path = segment_path(dir.path(), first);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_BYTES] ^= 0xff; // first record after the snapshot, with one after it
        std::fs::write(&path, &bytes).expect("write");
        assert!(Wal::open(dir.path(), first, true, SEGMENT_MAX).is_err());
        assert!(segment_path(dir.path(), 0).exists(), "covered segment kept while the start is refused");
    }

    #[test]
    fn wal_refuses_corruption_before_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), &[b"first record", b"second record", b"third record"]);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_BYTES + 2] ^= 0xff; // inside the first payload
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path(), 0, false, SEGMENT_MAX).err().expect("must refuse").to_string();
        assert!(err.contains("0000000000000000.wal") && err.contains("offset 0"), "{err}");
    }

    #[test]
    fn wal_rolls_over_segments_and_replays_across_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path(), 0, false, 64).expect("open");
        for i in 0..20u32 {
            wal.append(format!("record {i:02} with some padding").as_bytes());
            wal.sync().expect("sync");
        }
        assert!(segments(dir.path()).expect("list").len() > 5, "segments must roll over");
        let (_, records) = Wal::open(dir.path(), 0, false, 64).expect("reopen");
        assert_eq!(records.len(), 20);
        assert_eq!(records[19], b"record 19 with some padding");
        // Corruption in a segment that is not the last is an error, not a torn tail.
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path(), 0, false, 64).err().expect("must refuse").to_string();
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
        let (_, records) = Wal::open(dir.path(), first, true, SEGMENT_MAX).expect("open");
        assert_eq!(records, vec![b"after".to_vec()]);
        assert!(!segment_path(dir.path(), 0).exists(), "covered segment deleted on open");
    }
}
