//! The backup file: what `waxos <host> <port> snapshot save FILE` writes and
//! `waxosd … --restore FILE` starts a new cluster from. One format, here, so that the client
//! that writes a file and the host that restores it can never disagree on it.
//!
//! A file is an 80-byte header followed by the state. Every integer is little-endian.
//!
//! | offset | bytes | field |
//! |-------:|------:|-------|
//! | 0  | 8  | magic `WAXOSBAK` |
//! | 8  | 4  | format version, 1 |
//! | 12 | 4  | node id of the member that saved it |
//! | 16 | 8  | `next_apply`: the state holds every log slot below it applied, and none above |
//! | 24 | 8  | when it was saved, in ms since the Unix epoch |
//! | 32 | 32 | the id of the cluster it came from (32 hex digits; zero bytes when unknown) |
//! | 64 | 8  | length of the state, in bytes |
//! | 72 | 4  | CRC32C of the state |
//! | 76 | 4  | CRC32C of header bytes 0..76 |
//! | 80 | length | the state: the guest's own snapshot, in its own versioned format |
//!
//! The header has its own checksum, so a damaged length or slot is caught before the state
//! is read; the length catches a truncated (or extended) file, the state's checksum a flipped
//! bit. CRC32C, as the host's WAL and snapshots use: it is there against accidents (a torn
//! copy, a bad disk), not against someone who may write the file. A backup holds every value
//! of the store, so it needs the care of the data itself: keep it where only operators write.

use std::fmt;

/// First bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"WAXOSBAK";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Size of the header, in bytes.
pub const HEADER_BYTES: usize = 80;
/// Largest state a file may announce: a guest (wasm32) cannot hold more than 4 GiB.
pub const STATE_BYTES_MAX: u64 = 4 << 30;
/// Where the header's checksum starts (it covers every byte before it).
const HEADER_CRC_AT: usize = 76;
/// Bytes of the cluster id field.
const CLUSTER_ID_BYTES: usize = 32;

/// What a backup file says about its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The member that saved it.
    pub node_id: u32,
    /// Every log slot below this one is applied in the state.
    pub next_apply: u64,
    /// When it was saved, in ms since the Unix epoch.
    pub saved_at_ms: u64,
    /// The cluster it came from (32 hex digits), or empty when its member knew none.
    pub cluster_id: String,
    /// Length of the state, in bytes.
    pub state_bytes: u64,
    /// CRC32C of the state.
    pub state_crc32c: u32,
}

/// Why a file is not a usable backup. Each says what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupError {
    /// Shorter than a header, or not starting with `MAGIC`.
    NotABackup,
    /// Written by a newer build.
    UnknownVersion(u32),
    /// The header's own checksum does not match.
    HeaderChecksum,
    /// The header announces a state larger than any guest can hold.
    TooLarge(u64),
    /// Fewer or more bytes after the header than it announces.
    WrongLength {
        /// What the header says.
        expected: u64,
        /// What the file holds.
        found: u64,
    },
    /// The state's checksum does not match.
    StateChecksum {
        /// What the header says.
        expected: u32,
        /// What the state's bytes give.
        found: u32,
    },
}

impl fmt::Display for BackupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackupError::NotABackup => write!(f, "not a waxos backup (no WAXOSBAK header)"),
            BackupError::UnknownVersion(v) => {
                write!(f, "backup format version {v}; this build reads version {VERSION}: use a newer build")
            }
            BackupError::HeaderChecksum => write!(f, "the header's checksum does not match: the file is damaged"),
            BackupError::TooLarge(bytes) => write!(f, "the header announces a {bytes}-byte state, more than any replica holds: the file is damaged"),
            BackupError::WrongLength { expected, found } if found < expected => write!(
                f,
                "truncated: the header announces {expected} bytes of state, the file holds {found} (an interrupted copy?)"
            ),
            BackupError::WrongLength { expected, found } => {
                write!(f, "the header announces {expected} bytes of state, the file holds {found}: the file is damaged")
            }
            BackupError::StateChecksum { expected, found } => write!(
                f,
                "checksum mismatch: the state's CRC32C is {found:08x}, the header says {expected:08x}: the file is damaged"
            ),
        }
    }
}

impl std::error::Error for BackupError {}

impl Header {
    /// The header of a backup of `state`.
    pub fn for_state(state: &[u8], node_id: u32, next_apply: u64, saved_at_ms: u64, cluster_id: &str) -> Header {
        Header {
            node_id,
            next_apply,
            saved_at_ms,
            cluster_id: cluster_id.to_string(),
            state_bytes: state.len() as u64,
            state_crc32c: crc32c::crc32c(state),
        }
    }

    /// The header's bytes. A cluster id that is not 32 ASCII characters is written as unknown.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.node_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.next_apply.to_le_bytes());
        out[24..32].copy_from_slice(&self.saved_at_ms.to_le_bytes());
        if self.cluster_id.len() == CLUSTER_ID_BYTES && self.cluster_id.is_ascii() {
            out[32..64].copy_from_slice(self.cluster_id.as_bytes());
        }
        out[64..72].copy_from_slice(&self.state_bytes.to_le_bytes());
        out[72..76].copy_from_slice(&self.state_crc32c.to_le_bytes());
        let crc = crc32c::crc32c(&out[..HEADER_CRC_AT]);
        out[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a header from the first `HEADER_BYTES` of `bytes` (the state is not looked at).
    pub fn decode(bytes: &[u8]) -> Result<Header, BackupError> {
        let header = bytes.get(..HEADER_BYTES).ok_or(BackupError::NotABackup)?;
        if &header[..8] != MAGIC {
            return Err(BackupError::NotABackup);
        }
        let u32_at = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let u64_at = |at: usize| (u64::from(u32_at(at + 4)) << 32) | u64::from(u32_at(at));
        let version = u32_at(8);
        if version != VERSION {
            return Err(BackupError::UnknownVersion(version));
        }
        if crc32c::crc32c(&header[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
            return Err(BackupError::HeaderChecksum);
        }
        let state_bytes = u64_at(64);
        if state_bytes > STATE_BYTES_MAX {
            return Err(BackupError::TooLarge(state_bytes));
        }
        let id = &header[32..64];
        let cluster_id =
            if id.iter().all(|&b| b == 0) { String::new() } else { String::from_utf8_lossy(id).into_owned() };
        Ok(Header {
            node_id: u32_at(12),
            next_apply: u64_at(16),
            saved_at_ms: u64_at(24),
            cluster_id,
            state_bytes,
            state_crc32c: u32_at(72),
        })
    }
}

/// Checks a whole file in memory; its header and its state.
pub fn verify(file: &[u8]) -> Result<(Header, &[u8]), BackupError> {
    let header = Header::decode(file)?;
    let state = &file[HEADER_BYTES..];
    let found = state.len() as u64;
    if found != header.state_bytes {
        return Err(BackupError::WrongLength { expected: header.state_bytes, found });
    }
    let crc = crc32c::crc32c(state);
    if crc != header.state_crc32c {
        return Err(BackupError::StateChecksum { expected: header.state_crc32c, found: crc });
    }
    Ok((header, state))
}

/// Checks a file as it streams by, chunk after chunk, without holding it (the client, while it
/// writes what a host sends).
#[derive(Default)]
pub struct Verifier {
    /// The header's bytes while fewer than `HEADER_BYTES` arrived.
    start: Vec<u8>,
    header: Option<Header>,
    state_seen: u64,
    state_crc: u32,
}

impl Verifier {
    /// Takes the next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), BackupError> {
        if self.header.is_none() {
            let missing = HEADER_BYTES - self.start.len();
            let (head, rest) = bytes.split_at(missing.min(bytes.len()));
            self.start.extend_from_slice(head);
            if self.start.len() < HEADER_BYTES {
                return Ok(());
            }
            self.header = Some(Header::decode(&self.start)?);
            bytes = rest;
        }
        self.state_seen += bytes.len() as u64;
        self.state_crc = crc32c::crc32c_append(self.state_crc, bytes);
        Ok(())
    }

    /// The header, once every byte of the file arrived and the whole file checks out.
    pub fn finish(self) -> Result<Header, BackupError> {
        let header = self.header.ok_or(BackupError::NotABackup)?;
        if self.state_seen != header.state_bytes {
            return Err(BackupError::WrongLength { expected: header.state_bytes, found: self.state_seen });
        }
        if self.state_crc != header.state_crc32c {
            return Err(BackupError::StateChecksum { expected: header.state_crc32c, found: self.state_crc });
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn file(state: &[u8]) -> Vec<u8> {
        let header = Header::for_state(state, 3, 1234, 99, ID);
        let mut file = header.encode().to_vec();
        file.extend_from_slice(state);
        file
    }

    #[test]
    fn a_backup_round_trips_whole_and_in_chunks() {
        let state: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let file = file(&state);
        let (header, got) = verify(&file).expect("whole");
        assert_eq!((header.node_id, header.next_apply, header.saved_at_ms), (3, 1234, 99));
        assert_eq!((header.cluster_id.as_str(), got), (ID, &state[..]));
        let mut verifier = Verifier::default();
        for chunk in file.chunks(7) {
            verifier.feed(chunk).expect("chunk");
        }
        assert_eq!(verifier.finish().expect("streamed"), header);
    }

    #[test]
    fn a_damaged_or_truncated_backup_is_refused_with_the_reason() {
        let state = vec![7u8; 4096];
        let whole = file(&state);
        let mut flipped = whole.clone();
        flipped[HEADER_BYTES + 100] ^= 1;
        assert!(matches!(verify(&flipped), Err(BackupError::StateChecksum { .. })));
        let truncated = &whole[..whole.len() - 10];
        let err = verify(truncated).expect_err("truncated");
        assert!(err.to_string().starts_with("truncated"), "{err}");
        let mut bad_slot = whole.clone();
        bad_slot[16] ^= 1;
        assert_eq!(verify(&bad_slot).map(|_| ()), Err(BackupError::HeaderChecksum));
        assert_eq!(verify(b"WAXOSBA").map(|_| ()), Err(BackupError::NotABackup));
        assert_eq!(verify(&whole[..40]).map(|_| ()), Err(BackupError::NotABackup));
        let mut verifier = Verifier::default();
        verifier.feed(truncated).expect("feeds");
        assert!(matches!(verifier.finish(), Err(BackupError::WrongLength { .. })));
    }

    #[test]
    fn an_unknown_cluster_id_is_written_as_zeros_and_read_as_empty() {
        let header = Header::for_state(b"x", 1, 0, 0, "");
        let mut file = header.encode().to_vec();
        file.push(b'x');
        assert_eq!(verify(&file).expect("ok").0.cluster_id, "");
    }
}
