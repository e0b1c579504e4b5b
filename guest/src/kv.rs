//! The replicated state machine: a key-value map plus per-client sessions for exactly-once.
//!
//! Commands reach it strictly in log order (the learner sees to that), so every replica that
//! applied the same prefix holds the same map. A session remembers each client's last applied
//! `seq` and the outcome of its last write, so a retried write (same client and seq) applies once
//! and gets the original answer back, and a stale duplicate never applies at all.

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
    /// Applies one command from log slot `slot` for `client`/`seq` and returns its outcome.
    pub fn apply(&mut self, slot: u64, client: u64, seq: u64, command: &Command) -> Outcome {
        if client != 0 {
            if let Some(session) = self.sessions.get(&client) {
                if seq < session.seq {
                    return Outcome::Rejected(format!(
                        "stale request: client {client:#x} already applied seq {} > {seq}",
                        session.seq
                    ));
                }
                if seq == session.seq {
                    if let Some(outcome) = &session.outcome {
                        return outcome.clone();
                    }
                    if !command.is_read() {
                        return Outcome::Rejected(format!("seq {seq} was already used by a read"));
                    }
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
        };
        if client != 0 {
            let remembered = (!command.is_read()).then(|| outcome.clone());
            if let Some(old) = self.sessions.insert(client, Session { seq, outcome: remembered, last_slot: slot }) {
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

    /// Rebuilds the eviction index after a snapshot was loaded.
    pub fn rebuild_index(&mut self) {
        self.lru = self.sessions.iter().map(|(c, s)| (s.last_slot, *c)).collect();
    }
}
