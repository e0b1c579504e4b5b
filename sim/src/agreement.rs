//! Agreement between replicas, checked whether or not a client saw the difference.
//!
//! Linearizability of the client history misses a slot chosen with two values that no client
//! happened to read, and replicas that diverge after the last operation. Two checks close that:
//! - while the run goes on, every record a replica persists is decoded (the guest's own record
//!   format, `waxos_guest::message::Record`): each `Chosen { slot, value }` — or
//!   `ChosenAccepted { slot, ballot }`, resolved through that replica's own `Accepted` record of
//!   the same slot and ballot before it — must agree with every other replica's record for that
//!   slot, the moment it is written;
//! - at the end, once every fault has healed and the clients are done, every replica must reach
//!   the same applied slot, and there hold the same value for every key (read with
//!   `get-stale`, which answers from the replica's own state).
//!
//! Records this build of the checker cannot decode (a newer format) are skipped, not failed:
//! the end-of-run comparison still covers such a build.

use std::collections::BTreeMap;

use waxos_guest::message::{self, Ballot, Record, Value};

use crate::world::{status_number, Failure, World, TICK_MS};

/// After the clients are done, the replicas must all reach one applied slot within this time.
pub const CONVERGE_MS: u64 = 10_000;
/// How often convergence is looked at.
const CONVERGE_POLL_MS: u64 = 100;

/// Every slot's chosen value, as the first replica that recorded it said.
#[derive(Default)]
pub struct Agreement {
    chosen: BTreeMap<u64, (Value, usize)>,
    /// Per node and slot, every value its acceptor recorded accepting, by ballot (one proposal
    /// per ballot and slot), to resolve `ChosenAccepted` (kept: a restarted node may record the
    /// same slot chosen again; a run is short).
    accepted: BTreeMap<usize, BTreeMap<u64, BTreeMap<Ballot, Value>>>,
}

impl Agreement {
    /// A record node `node` persists; `Ok(true)` for an installed snapshot, `Err` when it names
    /// a chosen value another replica recorded differently.
    pub fn observe(&mut self, node: usize, record: &[u8]) -> Result<bool, String> {
        let chosen = match message::decode::<Record>(record) {
            Ok(Record::Accepted { slot, ballot, value }) => {
                self.accepted.entry(node).or_default().entry(slot).or_default().insert(ballot, value);
                return Ok(false);
            }
            Ok(Record::ChosenAccepted { slot, ballot }) => {
                match self.accepted.get(&node).and_then(|by_slot| by_slot.get(&slot)).and_then(|by| by.get(&ballot)) {
                    Some(value) => Ok(Record::Chosen { slot, value: value.clone() }),
                    None => {
                        return Err(format!(
                        "node {} recorded slot {slot} chosen as its accept at {ballot}, but never recorded that accept",
                        node + 1
                    ))
                    }
                }
            }
            other => other,
        };
        match chosen {
            Ok(Record::Chosen { slot, value }) => match self.chosen.get(&slot) {
                Some((first, by)) if *first != value => Err(format!(
                    "slot {slot} chosen with two values: node {} recorded {first:?}, node {} recorded {value:?}",
                    by + 1,
                    node + 1
                )),
                Some(_) => Ok(false),
                None => {
                    self.chosen.insert(slot, (value, node));
                    Ok(false)
                }
            },
            Ok(Record::Installed(_)) => Ok(true),
            Ok(_) | Err(_) => Ok(false),
        }
    }
}

impl World<'_> {
    /// After every fault healed and the clients finished: waits until every replica applied up
    /// to the same slot, then compares every key across them.
    pub(crate) fn converge_and_compare(&mut self) -> Result<(), Failure> {
        let deadline_ms = self.now + CONVERGE_MS;
        // The members: not the hosts stopped for good (dead, or removed by the operator).
        self.retire_removed();
        let members: Vec<usize> = (0..self.nodes.len()).filter(|&i| !self.nodes[i].retired).collect();
        loop {
            if let Some(problem) = self.divergence.take() {
                return Err(Failure::Divergence(problem));
            }
            let applied: Vec<Option<u64>> =
                members.iter().map(|&i| self.status(i).and_then(|s| status_number(&s, "applied"))).collect();
            let first = applied[0];
            if first.is_some() && applied.iter().all(|a| *a == first) {
                break;
            }
            if self.now >= deadline_ms {
                let named: Vec<u32> = members.iter().map(|&i| i as u32 + 1).collect();
                return Err(Failure::Liveness(format!(
                    "replicas did not converge within {CONVERGE_MS} ms after the clients finished: nodes {named:?} applied {applied:?}"
                )));
            }
            for _ in 0..CONVERGE_POLL_MS / TICK_MS {
                self.tick()?;
            }
        }
        let keys = self.key_names();
        let mut states = Vec::with_capacity(members.len());
        for &i in &members {
            states.push(self.read_stale(i, &keys)?);
        }
        if let Some(problem) = self.divergence.take() {
            return Err(Failure::Divergence(problem));
        }
        for (m, &i) in members.iter().enumerate().skip(1) {
            for (k, key) in keys.iter().enumerate() {
                if states[m][k] != states[0][k] {
                    return Err(Failure::Divergence(format!(
                        "replicas applied the same slots but differ on {key}: node {} has {:?}, node {} has {:?}",
                        members[0] + 1,
                        states[0][k].as_deref().map(String::from_utf8_lossy),
                        i + 1,
                        states[m][k].as_deref().map(String::from_utf8_lossy)
                    )));
                }
            }
        }
        self.note(|| format!("replicas converged on identical state for {} keys", keys.len()));
        Ok(())
    }
}
