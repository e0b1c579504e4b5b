//! The acceptor role: promises and accepts, the memory that makes Paxos safe.
//!
//! Reference: Lamport, "Paxos Made Simple" §2.2. An acceptor never accepts a ballot below the
//! highest it promised, and every change it makes is returned as a `Record` that the host makes
//! durable before the acceptor's answer leaves the machine. Accepted values of slots that are
//! chosen and applied long ago are forgotten (`forget_below`); a promise then says where the
//! acceptor's memory starts, so a candidate that is further behind cannot mistake a forgotten
//! slot for an empty one.

use std::collections::BTreeMap;

use crate::message::{Ballot, Message, Record, Value};

/// An acceptor's durable state.
#[derive(Clone, Debug, Default)]
pub struct Acceptor {
    /// The highest ballot promised (phase 1b) or accepted (phase 2b).
    pub promised: Ballot,
    /// Per slot, the highest-ballot value accepted.
    pub accepted: BTreeMap<u64, (Ballot, Value)>,
    /// Every slot below this one was chosen, applied, and forgotten here.
    pub log_start: u64,
}

impl Acceptor {
    /// Phase 1b: promise `ballot` if it is not below an earlier promise. Returns the answer and
    /// the record to persist (none when nothing changed).
    pub fn on_prepare(&mut self, ballot: Ballot, first_slot: u64) -> (Message, Option<Record>) {
        if ballot < self.promised {
            return (Message::Nack { ballot, promised: self.promised }, None);
        }
        let record = (ballot > self.promised).then_some(Record::Promised(ballot));
        self.promised = ballot;
        let accepted = self.accepted.range(first_slot..).map(|(&slot, (b, v))| (slot, *b, v.clone())).collect();
        (Message::Promise { ballot, accepted, log_start: self.log_start }, record)
    }

    /// Phase 2b: accept `value` at `slot` unless a higher ballot was promised. A slot already
    /// forgotten (chosen long ago) is not accepted again: its value is settled, and the answer
    /// says so (`Forgotten`), so that a proposer whose learner lacks it catches up instead of
    /// waiting for an accept that never comes.
    pub fn on_accept(&mut self, ballot: Ballot, slot: u64, value: Value) -> (Option<Message>, Option<Record>) {
        if ballot < self.promised {
            return (Some(Message::Nack { ballot, promised: self.promised }), None);
        }
        if slot < self.log_start {
            if cfg!(feature = "bug-silent-forgotten") {
                // Planted bug (simulator test builds only): drop the accept without a word.
                return (None, None);
            }
            return (Some(Message::Forgotten { ballot, slot, below: self.log_start }), None);
        }
        self.promised = ballot;
        let record = Record::Accepted { slot, ballot, value: value.clone() };
        self.accepted.insert(slot, (ballot, value));
        (Some(Message::Accepted { ballot, slot }), Some(record))
    }

    /// A fence (`rejoin`): promise `ballot` only if every ballot promised so far is of a
    /// strictly lower epoch — a lower ballot of the same epoch is not enough, since normal
    /// elections count rounds up within an epoch without bound. The answer reports every
    /// accepted value, like a phase-1b promise from slot 0.
    pub fn on_fence(&mut self, ballot: Ballot, nonce: u64) -> (Message, Option<Record>) {
        if self.promised.epoch() >= ballot.epoch() {
            return (Message::Nack { ballot, promised: self.promised }, None);
        }
        self.promised = ballot;
        let accepted = self.accepted.iter().map(|(&slot, (b, v))| (slot, *b, v.clone())).collect();
        (Message::Fenced { ballot, nonce, accepted, log_start: self.log_start }, Some(Record::Promised(ballot)))
    }

    /// Replays a persisted record (start-up).
    pub fn restore(&mut self, record: &Record) {
        match record {
            // Planted bug (simulator test builds only): forget promises across a restart.
            Record::Promised(_) if cfg!(feature = "bug-forget-promise") => {}
            Record::Promised(b) => self.promised = self.promised.max(*b),
            Record::Accepted { slot, ballot, value } => {
                if !cfg!(feature = "bug-forget-promise") {
                    self.promised = self.promised.max(*ballot);
                }
                let newer = self.accepted.get(slot).is_none_or(|(b, _)| b <= ballot);
                if newer && *slot >= self.log_start {
                    self.accepted.insert(*slot, (*ballot, value.clone()));
                }
            }
            Record::Chosen { .. } | Record::ChosenAccepted { .. } | Record::Installed(_) | Record::Voting(_) => {}
        }
    }

    /// Forgets accepted values below `slot`; the caller guarantees they are chosen and applied.
    pub fn forget_below(&mut self, slot: u64) {
        if slot > self.log_start {
            self.accepted = self.accepted.split_off(&slot);
            self.log_start = slot;
        }
    }
}
