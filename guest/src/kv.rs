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
    #[serde(deserialize_with = "sorted_map")]
    pub data: BTreeMap<String, Vec<u8>>,
    /// Per-client sessions.
    pub sessions: BTreeMap<u64, Session>,
    /// `(last_slot, client)`: eviction order of sessions.
    lru: BTreeSet<(u64, u64)>,
}

/// Reads a map that was written in key order (as every `BTreeMap` is) by collecting it first
/// and building the tree in one pass, instead of inserting entry by entry: the bulk of a
/// snapshot's or a hot swap's `start` at many keys.
fn sorted_map<'de, D, K, V>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(std::marker::PhantomData<(K, V)>);

    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<K, V> {
        type Value = BTreeMap<K, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            // Bounded: a corrupt length must not reserve gigabytes up front.
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            // Already sorted: `from_iter` checks that in one pass and bulk-builds the tree.
            Ok(BTreeMap::from_iter(entries))
        }
    }

    deserializer.deserialize_map(Entries(std::marker::PhantomData))
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
