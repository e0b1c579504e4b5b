//! The snapshot file: the guest's whole durable state at one point, and the first WAL segment
//! written after that point.
//!
//! Format: `WAXSNAP1`, first segment (u64 LE), length (u64 LE), CRC32C of the state (u32 LE),
//! state bytes. Written atomically (`write_atomically`): an interrupted write leaves the
//! previous snapshot in place. A snapshot that fails its checksum stops the start, because the
//! WAL segments it covered are gone.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

const MAGIC: &[u8; 8] = b"WAXSNAP1";
const HEADER_BYTES: usize = 8 + 8 + 8 + 4;

/// A snapshot and where the WAL continues after it.
pub struct Snapshot {
    /// The first WAL segment not covered by this snapshot.
    pub first_segment: u64,
    /// The guest's snapshot bytes.
    pub bytes: Vec<u8>,
}

impl Snapshot {
    fn path(dir: &Path) -> PathBuf {
        dir.join("snapshot")
    }

    /// The snapshot in `dir`, if there is one.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Snapshot>> {
        let path = Self::path(dir);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{}: {what}; refusing to start (restore the file, or wipe the data dir to rejoin from peers)",
                path.display()
            )
        };
        if data.len() < HEADER_BYTES || &data[..8] != MAGIC {
            return Err(bad("not a waxos snapshot"));
        }
        let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or([0; 8]));
        let first_segment = word(8);
        let len = word(16) as usize;
        let crc = u32::from_le_bytes(data[24..28].try_into().unwrap_or([0; 4]));
        let Some(bytes) = data.get(HEADER_BYTES..HEADER_BYTES + len) else {
            return Err(bad("truncated"));
        };
        if crc32c::crc32c(bytes) != crc {
            bail!(bad("checksum mismatch"));
        }
        Ok(Some(Snapshot { first_segment, bytes: bytes.to_vec() }))
    }

    /// Replaces the snapshot in `dir` atomically.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let mut data = Vec::with_capacity(HEADER_BYTES + self.bytes.len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&self.first_segment.to_le_bytes());
        data.extend_from_slice(&(self.bytes.len() as u64).to_le_bytes());
        data.extend_from_slice(&crc32c::crc32c(&self.bytes).to_le_bytes());
        data.extend_from_slice(&self.bytes);
        super::write_atomically(&Self::path(dir), &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Snapshot::load(dir.path()).expect("load").is_none());
        Snapshot { first_segment: 7, bytes: b"state".to_vec() }.save(dir.path()).expect("save");
        let s = Snapshot::load(dir.path()).expect("load").expect("some");
        assert_eq!((s.first_segment, s.bytes), (7, b"state".to_vec()));
    }

    #[test]
    fn snapshot_write_interrupted_before_rename_keeps_the_previous_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        Snapshot { first_segment: 1, bytes: b"old".to_vec() }.save(dir.path()).expect("save");
        // A crash mid-write leaves a partial temp file that never got renamed.
        std::fs::write(dir.path().join("snapshot.tmp"), b"WAXSNAP1\x02partial").expect("write");
        let s = Snapshot::load(dir.path()).expect("load").expect("some");
        assert_eq!(s.bytes, b"old");
        // And the next save replaces the leftover temp file.
        Snapshot { first_segment: 2, bytes: b"new".to_vec() }.save(dir.path()).expect("save");
        assert_eq!(Snapshot::load(dir.path()).expect("load").expect("some").bytes, b"new");
    }

    #[test]
    fn corrupt_snapshot_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        Snapshot { first_segment: 1, bytes: b"state".to_vec() }.save(dir.path()).expect("save");
        let path = dir.path().join("snapshot");
        let mut data = std::fs::read(&path).expect("read");
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, data).expect("write");
        let err = Snapshot::load(dir.path()).err().expect("must refuse").to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
}
