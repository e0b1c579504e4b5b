//! The replicated state machine: a key-value map plus per-client sessions for exactly-once.
//!
//! Commands reach it strictly in log order (the learner sees to that), so every replica that
//! applied the same prefix holds the same map. A session remembers each client's last applied
//! `seq`, a fingerprint of the command that used it and the outcome of that command if it was a
//! write, so a retried write (same client, seq and command) applies once and gets the original
//! answer back, and a stale duplicate never applies at all. A pair used again for *another*
//! command (another kind of operation, another key or another value) is refused with a reason
//! starting `reused` (`reused_reason`): answering it with the earlier command's outcome would
//! tell the client its command was done when nothing was applied.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::types::{Command, Outcome};

/// Bound on remembered client sessions; the least recently used are forgotten first. A client
/// forgotten this way loses exactly-once only for retries older than 100k other clients' writes.
pub const SESSIONS_MAX: usize = 100_000;

/// What the state machine remembers of one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Highest applied sequence number.
    pub seq: u64,
    /// Outcome of that request if it was a write (a retried read is simply read again).
    pub outcome: Option<Outcome>,
    /// Slot of the last use, for LRU eviction (deterministic on every replica).
    pub last_slot: u64,
    /// `fingerprint` of the command that used `seq`. `None` for a session restored from a
    /// snapshot (or state transfer) of format 1, which had none: for those only the kind of
    /// operation is known, from `outcome` (`Session::same_request`).
    pub fingerprint: Option<u64>,
}

/// The key-value state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    /// The data.
    #[serde(serialize_with = "bytes_map_out", deserialize_with = "bytes_map_in")]
    pub data: BTreeMap<String, Vec<u8>>,
    /// Per-client sessions.
    pub sessions: BTreeMap<u64, Session>,
    /// `(last_slot, client)`: eviction order of sessions.
    lru: BTreeSet<(u64, u64)>,
}

/// A session as format 1 (snapshot format 1, every state transfer) writes it: no fingerprint.
#[derive(Clone, Debug, Deserialize)]
pub struct SessionV1 {
    seq: u64,
    outcome: Option<Outcome>,
    last_slot: u64,
}

/// The state machine as format 1 wrote it (`SessionV1`); read only, to migrate.
#[derive(Clone, Debug, Deserialize)]
pub struct KvV1 {
    #[serde(deserialize_with = "bytes_map_in")]
    data: BTreeMap<String, Vec<u8>>,
    sessions: BTreeMap<u64, SessionV1>,
    lru: BTreeSet<(u64, u64)>,
}

impl From<KvV1> for Kv {
    /// Sessions of format 1 keep their seq, outcome and place in the eviction order; their
    /// fingerprint is unknown.
    fn from(old: KvV1) -> Kv {
        let sessions = old
            .sessions
            .into_iter()
            .map(|(client, s)| {
                (client, Session { seq: s.seq, outcome: s.outcome, last_slot: s.last_slot, fingerprint: None })
            })
            .collect();
        Kv { data: old.data, sessions, lru: old.lru }
    }
}

/// A session in format 1's layout, borrowed (`KvV1Out`).
#[derive(Serialize)]
struct SessionV1Out<'a> {
    seq: u64,
    outcome: &'a Option<Outcome>,
    last_slot: u64,
}

/// The sessions in format 1's layout, borrowed.
struct SessionsV1Out<'a>(&'a BTreeMap<u64, Session>);

impl Serialize for SessionsV1Out<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0.iter().map(|(c, s)| (c, SessionV1Out { seq: s.seq, outcome: &s.outcome, last_slot: s.last_slot })),
        )
    }
}

/// The state machine written in format 1's layout (the same bytes a build before fingerprints
/// writes for it, fingerprints left out): what a state transfer carries, so that every build
/// can read it (`learner::AppState::encode` sends the fingerprints after it).
#[derive(Serialize)]
pub struct KvV1Out<'a> {
    #[serde(serialize_with = "bytes_map_out_ref")]
    data: &'a BTreeMap<String, Vec<u8>>,
    sessions: SessionsV1Out<'a>,
    lru: &'a BTreeSet<(u64, u64)>,
}

fn bytes_map_out_ref<S: serde::Serializer>(map: &&BTreeMap<String, Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
    bytes_map_out(map, serializer)
}

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit (Fowler, Noll, Vo), continued from `hash` over `bytes`. Defined here and not
/// taken from std (whose hashers are seeded per process and may change between releases): a
/// session's fingerprint is replicated state, so every replica and every future build must
/// compute the same value.
pub fn fnv1a_64(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The kinds of operation a fingerprint tells apart (its first byte). Both kinds of read are one
/// kind: a read is a read, however it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Put = 1,
    Read = 2,
    Delete = 3,
    Membership = 4,
}

/// The fingerprint of a command: FNV-1a 64 over the kind's byte (1 put, 2 read, 3 delete), the
/// key's length (8 bytes, little-endian) and bytes, and for a put the value's length (8 bytes,
/// little-endian) and bytes. The lengths keep (key, value) boundaries unambiguous. Part of the
/// snapshot format: never change it (a pinned test holds it).
pub fn fingerprint(command: &Command) -> u64 {
    match command {
        Command::Put(key, value) => fingerprint_of(Kind::Put, key, Some(value)),
        Command::Get(key) | Command::GetStale(key) => fingerprint_of(Kind::Read, key, None),
        Command::Delete(key) => fingerprint_of(Kind::Delete, key, None),
        Command::ChangeMembers(change) => {
            fingerprint_of(Kind::Membership, "", Some(&crate::message::encode_as(0, change)))
        }
    }
}

fn fingerprint_of(kind: Kind, key: &str, value: Option<&[u8]>) -> u64 {
    let mut hash = fnv1a_64(FNV_OFFSET_BASIS, &[kind as u8]);
    hash = fnv1a_64(hash, &(key.len() as u64).to_le_bytes());
    hash = fnv1a_64(hash, key.as_bytes());
    if let Some(value) = value {
        hash = fnv1a_64(hash, &(value.len() as u64).to_le_bytes());
        hash = fnv1a_64(hash, value);
    }
    hash
}

fn kind_of(command: &Command) -> Kind {
    match command {
        Command::Put(..) => Kind::Put,
        Command::Get(_) | Command::GetStale(_) => Kind::Read,
        Command::Delete(_) => Kind::Delete,
        Command::ChangeMembers(_) => Kind::Membership,
    }
}

/// Why a request was refused that reuses `(client, seq)` of another command. Starts with
/// `reused`, which the host maps to `FAILED_PRECONDITION` (retrying cannot help).
pub fn reused_reason(client: u64, seq: u64) -> String {
    format!("reused seq: (client {client:#x}, seq {seq}) was already used for another request: use a new seq")
}

impl Session {
    /// Whether a command of `kind` with `fingerprint` is the one that used this session's seq
    /// (a retry), rather than another one reusing the pair.
    fn same_request(&self, kind: Kind, fingerprint: u64) -> bool {
        match self.fingerprint {
            Some(known) => known == fingerprint,
            // A session of format 1: only the kind is known, from what it remembered (a put
            // answers `Done`, a delete `Removed`, a read nothing). Within one kind, as builds
            // before fingerprints did: the remembered outcome, or a read again.
            None => matches!(
                (&self.outcome, kind),
                (Some(Outcome::Done), Kind::Put) | (Some(Outcome::Removed(_)), Kind::Delete) | (None, Kind::Read)
            ),
        }
    }
}

/// Writes the map with its values as byte strings (one slice each, not byte by byte; the same
/// postcard bytes as a plain `Vec<u8>`).
fn bytes_map_out<S: serde::Serializer>(map: &BTreeMap<String, Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.iter().map(|(k, v)| (k, serde_bytes::Bytes::new(v))))
}

/// Reads what `bytes_map_out` wrote. The keys come in order (as a `BTreeMap` writes them), so the
/// entries are collected first and the tree built in one pass instead of entry by entry: the
/// bulk of a snapshot's or a hot swap's `start` at many keys.
fn bytes_map_in<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
    struct Entries;

    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = BTreeMap<String, Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of byte strings")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            // Bounded: a corrupt length must not reserve gigabytes up front.
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1 << 20));
            while let Some((key, value)) = map.next_entry::<String, serde_bytes::ByteBuf>()? {
                entries.push((key, value.into_vec()));
            }
            // Already sorted: `from_iter` checks that in one pass and bulk-builds the tree.
            Ok(BTreeMap::from_iter(entries))
        }
    }

    deserializer.deserialize_map(Entries)
}

impl Kv {
    /// Applies one key-value command from log slot `slot` for `client`/`seq` and returns its
    /// outcome (a membership change needs the membership: `apply_with`).
    pub fn apply(&mut self, slot: u64, client: u64, seq: u64, command: &Command) -> Outcome {
        self.apply_with(slot, client, seq, command, None)
    }

    /// Applies one command; a membership change goes to `membership`, exactly once like a
    /// write (a retried change gets the first outcome back).
    pub fn apply_with(
        &mut self,
        slot: u64,
        client: u64,
        seq: u64,
        command: &Command,
        membership: Option<&mut crate::membership::Membership>,
    ) -> Outcome {
        let fingerprint = if client != 0 { fingerprint(command) } else { 0 };
        if client != 0 {
            if let Some(session) = self.sessions.get_mut(&client) {
                if seq < session.seq {
                    return Outcome::Rejected(format!(
                        "stale request: client {client:#x} already applied seq {} > {seq}",
                        session.seq
                    ));
                }
                if seq == session.seq {
                    if !session.same_request(kind_of(command), fingerprint) {
                        if session.outcome.is_none() && command.is_read() {
                            // A read reusing a read's pair (another key): builds before
                            // fingerprints read again here, which moved the session up the
                            // eviction order. So does this one, so that eviction stays the same on
                            // every replica of a cluster in the middle of a rolling upgrade.
                            self.lru.remove(&(session.last_slot, client));
                            session.last_slot = slot;
                            self.lru.insert((slot, client));
                        }
                        return Outcome::Rejected(reused_reason(client, seq));
                    }
                    if let Some(outcome) = &session.outcome {
                        return outcome.clone();
                    }
                    // The same read again: read again.
                }
            }
        }
        let outcome = match command {
            Command::Put(key, value) => {
                self.data.insert(key.clone(), value.clone());
                Outcome::Done
            }
            Command::Get(key) | Command::GetStale(key) => Outcome::Value(self.data.get(key).cloned()),
            Command::Delete(key) => Outcome::Removed(self.data.remove(key).is_some()),
            Command::ChangeMembers(change) => match membership {
                Some(membership) => membership.apply(slot, change),
                None => Outcome::Rejected("a membership change needs the replica's membership".to_string()),
            },
        };
        if client != 0 {
            let remembered = (!command.is_read()).then(|| outcome.clone());
            let session = Session { seq, outcome: remembered, last_slot: slot, fingerprint: Some(fingerprint) };
            if let Some(old) = self.sessions.insert(client, session) {
                self.lru.remove(&(old.last_slot, client));
            }
            self.lru.insert((slot, client));
            while self.sessions.len() > SESSIONS_MAX {
                let Some((_, evicted)) = self.lru.pop_first() else {
                    break;
                };
                self.sessions.remove(&evicted);
            }
        }
        outcome
    }

    /// A read answered outside the log (ReadIndex at the leader, a follower read, a stale
    /// read): the value of `key`, or the refusal the log would give when `(client, seq)` was
    /// already used for another command. Changes nothing, so it leaves no session either (only
    /// what goes through the log is replicated): a write that later reuses the pair of a read
    /// served this way is applied as a new request.
    pub fn read(&self, client: u64, seq: u64, key: &str) -> Outcome {
        if client != 0 {
            if let Some(session) = self.sessions.get(&client) {
                if seq == session.seq && !session.same_request(Kind::Read, fingerprint_of(Kind::Read, key, None)) {
                    return Outcome::Rejected(reused_reason(client, seq));
                }
            }
        }
        Outcome::Value(self.data.get(key).cloned())
    }

    /// The state machine in format 1's layout (no fingerprints), borrowed.
    pub fn as_v1(&self) -> KvV1Out<'_> {
        KvV1Out { data: &self.data, sessions: SessionsV1Out(&self.sessions), lru: &self.lru }
    }

    /// The fingerprint of every session that has one, by client.
    pub fn fingerprints(&self) -> Vec<(u64, u64)> {
        self.sessions.iter().filter_map(|(c, s)| s.fingerprint.map(|f| (*c, f))).collect()
    }

    /// Gives sessions their fingerprints back (`fingerprints` of the same state).
    pub fn restore_fingerprints(&mut self, fingerprints: &[(u64, u64)]) {
        for (client, fingerprint) in fingerprints {
            if let Some(session) = self.sessions.get_mut(client) {
                session.fingerprint = Some(*fingerprint);
            }
        }
    }

    /// Rebuilds the eviction index after a snapshot was loaded.
    pub fn rebuild_index(&mut self) {
        self.lru = self.sessions.iter().map(|(c, s)| (s.last_slot, *c)).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint is replicated state: pinned, so that no build ever computes another.
    #[test]
    fn fingerprints_are_fnv1a_64_and_never_change() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a_64(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // This build's fingerprints (any change breaks every snapshot's sessions).
        let put = fingerprint(&Command::Put("k".into(), b"a".to_vec()));
        let get = fingerprint(&Command::Get("k".into()));
        let delete = fingerprint(&Command::Delete("k".into()));
        assert_eq!(
            [put, get, delete],
            [PINNED_PUT, PINNED_GET, PINNED_DELETE],
            "{put:#018x} {get:#018x} {delete:#018x}"
        );
        assert_eq!(get, fingerprint(&Command::GetStale("k".into())), "a read is a read");
        // Lengths keep the boundary between key and value.
        assert_ne!(
            fingerprint(&Command::Put("ab".into(), b"c".to_vec())),
            fingerprint(&Command::Put("a".into(), b"bc".to_vec()))
        );
    }

    // Checked against an independent implementation (Python, from the definition above).
    const PINNED_PUT: u64 = 0x4629_320e_4e52_3196;
    const PINNED_GET: u64 = 0x07b2_df75_92fc_1a5d;
    const PINNED_DELETE: u64 = 0x15e2_232d_38e1_6d48;
}
