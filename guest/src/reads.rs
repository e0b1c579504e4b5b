//! Linearizable reads without a log slot: ReadIndex, as in Raft (dissertation §6.4) and etcd.
//!
//! A GET at the leader is answered from the local state machine once two things hold:
//! 1. every slot the leader had proposed when the read arrived (its *read index*) is applied
//!    here — that covers every write acknowledged before the read, since a write is
//!    acknowledged only once chosen, and a leader's phase 1 re-proposed every slot a previous
//!    leader may have had chosen;
//! 2. a majority of acceptors answered, *after* the read arrived, that they had promised no
//!    ballot above the leader's. Any other leader that could have chosen a write this leader
//!    does not know of needed a majority of promises above it before the read; the two
//!    majorities share an acceptor, which cannot have said both.
//!
//! Reads arriving in one step share one confirmation round; rounds are numbered, and an
//! acceptor's answer to round `r` confirms every earlier round too. No clock is involved (no
//! lease), so no clock assumption can break it. A read not confirmed within
//! `READ_CONFIRM_TIMEOUT_MS` (a leader change, or peers of an older build that do not know the
//! messages) goes through the log instead, which is always correct.

use std::collections::{BTreeMap, VecDeque};

use crate::message::Ballot;
use crate::types::NodeId;

/// A read waiting longer than this for its confirmation goes through the log instead.
pub const READ_CONFIRM_TIMEOUT_MS: u64 = 200;

/// A linearizable read waiting for its read index and its confirmation round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingRead {
    /// The host's request id.
    pub request_id: u64,
    /// The client's identity and sequence number (kept for the log fallback).
    pub client: u64,
    /// The client's sequence number.
    pub seq: u64,
    /// The key.
    pub key: String,
    /// Every slot below it must be applied before the read is answered.
    pub index: u64,
    /// The confirmation round that must complete (sent after the read arrived).
    pub round: u64,
    /// When the read arrived.
    pub since_ms: u64,
}

/// The leader's side of ReadIndex.
#[derive(Clone, Debug, Default)]
pub struct Reads {
    /// The ballot the rounds and answers belong to.
    ballot: Ballot,
    /// The last round broadcast.
    sent_round: u64,
    /// Per acceptor, the highest round it confirmed under `ballot`.
    confirmed: BTreeMap<NodeId, u64>,
    /// In arrival order, so `index` and `round` never decrease along the queue.
    waiting: VecDeque<WaitingRead>,
}

impl Reads {
    /// Starts over under `ballot`; returns the reads that were waiting (they go through the log).
    pub fn reset(&mut self, ballot: Ballot) -> Vec<WaitingRead> {
        self.ballot = ballot;
        self.confirmed.clear();
        self.waiting.drain(..).collect()
    }

    /// The ballot reads currently wait under.
    pub fn ballot(&self) -> Ballot {
        self.ballot
    }

    /// Reads waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when no read waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Queues a read that arrived now; it needs the next round, which has not been sent yet.
    pub fn add(&mut self, request_id: u64, client: u64, seq: u64, key: String, index: u64, now_ms: u64) {
        let round = self.sent_round + 1;
        self.waiting.push_back(WaitingRead { request_id, client, seq, key, index, round, since_ms: now_ms });
    }

    /// The round to broadcast now, if a waiting read needs one not yet sent.
    pub fn round_to_send(&mut self) -> Option<u64> {
        let needed = self.waiting.back().is_some_and(|r| r.round > self.sent_round);
        needed.then(|| {
            self.sent_round += 1;
            self.sent_round
        })
    }

    /// An acceptor confirmed `round` under `ballot`.
    pub fn on_confirmed(&mut self, src: NodeId, ballot: Ballot, round: u64) {
        if ballot != self.ballot || round > self.sent_round {
            return;
        }
        let entry = self.confirmed.entry(src).or_insert(0);
        *entry = (*entry).max(round);
    }

    /// The highest round a majority (`quorum` acceptors) confirmed.
    fn majority_round(&self, quorum: usize) -> u64 {
        let mut rounds: Vec<u64> = self.confirmed.values().copied().collect();
        if rounds.len() < quorum {
            return 0;
        }
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        rounds[quorum - 1]
    }

    /// Takes the reads that may be answered now: confirmed by a majority and with every slot
    /// below their index applied (`applied` is the learner's next slot to apply).
    pub fn ready(&mut self, quorum: usize, applied: u64) -> Vec<WaitingRead> {
        let majority = self.majority_round(quorum);
        let mut ready = Vec::new();
        while self.waiting.front().is_some_and(|r| r.round <= majority && r.index <= applied) {
            if let Some(read) = self.waiting.pop_front() {
                ready.push(read);
            }
        }
        ready
    }

    /// Takes the reads that waited too long (they go through the log).
    pub fn expired(&mut self, now_ms: u64) -> Vec<WaitingRead> {
        let mut expired = Vec::new();
        while self.waiting.front().is_some_and(|r| now_ms >= r.since_ms + READ_CONFIRM_TIMEOUT_MS) {
            if let Some(read) = self.waiting.pop_front() {
                expired.push(read);
            }
        }
        expired
    }

    /// The reads waiting, oldest first (a hot swap hands them over through the log path).
    pub fn waiting(&self) -> impl Iterator<Item = &WaitingRead> {
        self.waiting.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Ballot = Ballot { round: 3, node: 1 };

    #[test]
    fn a_read_is_ready_only_after_a_later_round_is_confirmed_by_a_majority_and_its_index_applied() {
        let mut reads = Reads::default();
        reads.reset(B);
        reads.add(1, 0, 0, "k".into(), 10, 0);
        // An answer to a round sent before the read arrived does not count.
        reads.on_confirmed(1, B, 0);
        reads.on_confirmed(2, B, 0);
        reads.on_confirmed(3, B, 0);
        assert!(reads.ready(3, 10).is_empty());
        assert_eq!(reads.round_to_send(), Some(1));
        assert_eq!(reads.round_to_send(), None, "one round per batch of reads");
        reads.on_confirmed(1, B, 1);
        reads.on_confirmed(2, B, 1);
        assert!(reads.ready(3, 10).is_empty(), "two of five is no majority");
        reads.on_confirmed(4, Ballot { round: 2, node: 4 }, 1);
        assert!(reads.ready(3, 10).is_empty(), "an answer under another ballot does not count");
        reads.on_confirmed(4, B, 1);
        assert!(reads.ready(3, 9).is_empty(), "slot 9 not applied yet");
        assert_eq!(reads.ready(3, 10).len(), 1);
    }

    #[test]
    fn a_later_round_confirms_earlier_ones_and_a_reset_hands_back_the_waiting_reads() {
        let mut reads = Reads::default();
        reads.reset(B);
        reads.add(1, 0, 0, "a".into(), 1, 0);
        assert_eq!(reads.round_to_send(), Some(1));
        reads.add(2, 0, 0, "b".into(), 2, 0);
        assert_eq!(reads.round_to_send(), Some(2));
        for node in 1..=3 {
            reads.on_confirmed(node, B, 2);
        }
        assert_eq!(reads.ready(3, 5).iter().map(|r| r.request_id).collect::<Vec<_>>(), vec![1, 2]);
        reads.add(3, 0, 0, "c".into(), 5, 10);
        assert_eq!(reads.expired(10 + READ_CONFIRM_TIMEOUT_MS - 1), vec![]);
        let back = reads.reset(Ballot { round: 4, node: 2 });
        assert_eq!(back.len(), 1);
        assert!(reads.is_empty());
    }
}
