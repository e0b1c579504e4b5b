//! Durable storage of the guest's `persist` records: a checksummed, append-only write-ahead log.
//!
//! Format: records of `[len: u32 LE][crc32c(payload): u32 LE][payload]`. Appends are buffered
//! and made durable together by one `fdatasync` per step (group commit): the step loop calls
//! `append` for every record of a step, then `sync` once, before anything of that step leaves
//! the host. On open, a torn or corrupt *last* record (a crash mid-append) is cut off with a
//! warning; a bad record with valid data after it is corruption and stops the start with an
//! error naming the file and offset, because silently dropping acknowledged state is worse
//! than not starting.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Header bytes per record.
const HEADER_BYTES: usize = 8;
/// Largest record accepted (a guard against a corrupt length field).
pub const RECORD_BYTES_MAX: usize = 256 << 20;

/// An open write-ahead log.
pub struct Wal {
    file: File,
    path: PathBuf,
    buffer: Vec<u8>,
    /// Durable length in bytes.
    len: u64,
    /// Records appended since open (durable or buffered).
    pub records: u64,
}

impl Wal {
    /// Opens (creating) `dir/wal.log` and returns it with every durable record, in order.
    pub fn open(dir: &Path) -> anyhow::Result<(Wal, Vec<Vec<u8>>)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let path = dir.join("wal.log");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let (records, valid_len) = scan(&mut file, &path)?;
        let file_len = file.metadata()?.len();
        if valid_len < file_len {
            tracing::warn!(
                "{}: torn or corrupt tail at offset {valid_len} ({} bytes) cut off",
                path.display(),
                file_len - valid_len
            );
            file.set_len(valid_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(valid_len))?;
        let wal = Wal {
            file,
            path,
            buffer: Vec::new(),
            len: valid_len,
            records: records.len() as u64,
        };
        Ok((wal, records))
    }

    /// Buffers one record; durable after the next `sync`.
    pub fn append(&mut self, payload: &[u8]) {
        self.buffer
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buffer
            .extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        self.buffer.extend_from_slice(payload);
        self.records += 1;
    }

    /// Writes what is buffered and waits until it is on disk (one `fdatasync`).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buffer)
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.file
            .sync_data()
            .with_context(|| format!("fdatasync of {}", self.path.display()))?;
        self.len += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Every durable record, read back from disk (used to restart a crashed guest).
    pub fn read_all(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut file =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let (records, _) = scan(&mut file, &self.path)?;
        Ok(records)
    }

    /// Durable bytes.
    #[cfg(test)]
    pub fn len_bytes(&self) -> u64 {
        self.len
    }
}

/// Reads records from the start; returns them and the length of the valid prefix.
fn scan(file: &mut File, path: &Path) -> anyhow::Result<(Vec<Vec<u8>>, u64)> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        match record_at(&bytes, at) {
            Some((payload, next)) => {
                records.push(payload.to_vec());
                at = next;
            }
            None => {
                if valid_record_follows(&bytes, at) {
                    bail!(
                        "{}: corrupt record at offset {at} with valid records after it; \
                         refusing to start (restore the file, or wipe the data dir to rejoin from peers)",
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
/// torn tail. Only headers whose length lands exactly on the end or on another valid header
/// count, so random bytes are very unlikely to pass.
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

    fn write_records(dir: &Path, payloads: &[&[u8]]) -> u64 {
        let (mut wal, _) = Wal::open(dir).expect("open");
        for p in payloads {
            wal.append(p);
        }
        wal.sync().expect("sync");
        wal.len_bytes()
    }

    #[test]
    fn wal_empty_file_opens_with_no_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, records) = Wal::open(dir.path()).expect("open");
        assert!(records.is_empty());
    }

    #[test]
    fn wal_replays_what_was_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), &[b"one", b"two", b"three"]);
        let (_, records) = Wal::open(dir.path()).expect("open");
        assert_eq!(
            records,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn wal_truncates_torn_tail_at_every_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix_len = write_records(dir.path(), &[b"first record", b"second record"]);
        let full_len = write_records(dir.path(), &[b"the last record, torn"]);
        let path = dir.path().join("wal.log");
        let whole = std::fs::read(&path).expect("read");
        for cut in prefix_len..full_len {
            std::fs::write(&path, &whole[..cut as usize]).expect("write");
            let (_, records) = Wal::open(dir.path()).expect("torn tail must open");
            assert_eq!(records.len(), 2, "cut at {cut}");
            assert_eq!(
                std::fs::metadata(&path).expect("meta").len(),
                prefix_len,
                "tail cut off at {cut}"
            );
        }
    }

    #[test]
    fn wal_refuses_corruption_before_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(
            dir.path(),
            &[b"first record", b"second record", b"third record"],
        );
        let path = dir.path().join("wal.log");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_BYTES + 2] ^= 0xff; // inside the first payload
        std::fs::write(&path, &bytes).expect("write");
        let err = Wal::open(dir.path()).err().expect("must refuse");
        assert!(err.to_string().contains("offset 0"), "{err}");
    }
}
