//! Linearizable reads without a log slot: ReadIndex, as in Raft (dissertation §6.4) and etcd.
//!
//! A GET at the leader is answered from the local state machine once two things hold:
//! 1. every slot the leader had proposed when the read arrived (its *read index*) is applied
//!    here — that covers every write acknowledged before the read, since a write is
//!    acknowledged only once chosen. A new leader re-proposes phase 1's slots only as its
//!    window allows, so the index is raised to phase 1's bound (`reproposal_end`: above every
//!    slot a promise reported accepted) once a majority of every governing configuration has
//!    promised; before that no read is answered (a later configuration's majority may have
//!    chosen in slots this leader's first majority never accepted);
//! 2. a majority of acceptors answered, *after* the read arrived, that they had promised no
//!    ballot above the leader's. Any other leader that could have chosen a write this leader
//!    does not know of needed a majority of promises above it before the read; the two
//!    majorities share an acceptor, which cannot have said both.
//!
//! Reads share confirmation rounds: at most one round is in flight, and every read that arrives
//! meanwhile waits for the next one (as etcd batches ReadIndex requests), so the acceptors' work
//! is bounded by the round trip, not by the read rate. Rounds are numbered, and an acceptor's
//! answer to round `r` confirms every earlier round too. No clock is involved (no
//! lease), so no clock assumption can break it. A read not confirmed within
//! `READ_CONFIRM_TIMEOUT_MS` (a leader change, or peers of an older build that do not know the
//! messages) goes through the log instead, which is always correct.

use std::collections::{BTreeMap, VecDeque};

use crate::membership::Membership;
use crate::message::Ballot;
use crate::types::NodeId;

/// A read waiting longer than this for its confirmation goes through the log instead.
pub const READ_CONFIRM_TIMEOUT_MS: u64 = 200;
/// A round not confirmed by a majority within this long is followed by a new one anyway (its
/// messages may have been lost).
pub const READ_ROUND_RETRY_MS: u64 = 20;

/// The round of a read that waits for the next round to be sent.
const UNASSIGNED: u64 = u64::MAX;

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
    /// The confirmation round that must complete (sent after the read arrived; `UNASSIGNED`
    /// until it is sent).
    pub round: u64,
    /// When the read arrived.
    pub since_ms: u64,
    /// Set when this is a follower's ask for a read index (`follower_reads`): the leader answers
    /// the follower with the index instead of reading its own state.
    pub remote: Option<RemoteAsk>,
}

/// A follower's ask for a read index, waiting at the leader like a read of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAsk {
    /// The asking follower.
    pub node: NodeId,
    /// Its instance's nonce.
    pub nonce: u64,
    /// Its ask number.
    pub ask: u64,
}

/// The leader's side of ReadIndex.
#[derive(Clone, Debug, Default)]
pub struct Reads {
    /// The ballot the rounds and answers belong to.
    ballot: Ballot,
    /// The last round broadcast.
    sent_round: u64,
    /// When it was broadcast.
    sent_ms: u64,
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

    /// The last confirmation round sent (a hot swap hands it to the new build).
    pub fn sent_round(&self) -> u64 {
        self.sent_round
    }

    /// Numbers the next rounds above `round`, the last one an earlier instance (before a hot
    /// swap) may have sent under the same ballot: a late answer to one of those then confirms
    /// no read of this instance (`on_confirmed` counts a round as confirming all below it).
    pub fn resume_rounds_after(&mut self, round: u64) {
        self.sent_round = self.sent_round.max(round);
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

    /// Queues a read that arrived now; it needs the next round sent (none assigned yet).
    pub fn add(&mut self, request_id: u64, client: u64, seq: u64, key: String, index: u64, now_ms: u64) {
        let round = UNASSIGNED;
        let remote = None;
        self.waiting.push_back(WaitingRead { request_id, client, seq, key, index, round, since_ms: now_ms, remote });
    }

    /// Queues a follower's ask that arrived now; like a read, it needs the next round sent.
    pub fn add_remote(&mut self, ask: RemoteAsk, index: u64, now_ms: u64) {
        self.waiting.push_back(WaitingRead {
            request_id: 0,
            client: 0,
            seq: 0,
            key: String::new(),
            index,
            round: UNASSIGNED,
            since_ms: now_ms,
            remote: Some(ask),
        });
    }

    /// The round to broadcast now: when a waiting read needs one not sent yet, and the round in
    /// flight (if any) is confirmed by a majority of every governing configuration or overdue.
    pub fn round_to_send(&mut self, membership: &Membership, now_ms: u64) -> Option<u64> {
        let needed = self.waiting.back().is_some_and(|r| r.round > self.sent_round);
        let in_flight =
            self.majority_round(membership) < self.sent_round && now_ms < self.sent_ms + READ_ROUND_RETRY_MS;
        if !needed || in_flight {
            return None;
        }
        self.sent_round += 1;
        self.sent_ms = now_ms;
        for read in self.waiting.iter_mut().rev() {
            if read.round <= self.sent_round {
                break;
            }
            read.round = self.sent_round;
        }
        Some(self.sent_round)
    }

    /// An acceptor confirmed `round` under `ballot`.
    pub fn on_confirmed(&mut self, src: NodeId, ballot: Ballot, round: u64) {
        if ballot != self.ballot || round > self.sent_round {
            return;
        }
        let entry = self.confirmed.entry(src).or_insert(0);
        *entry = (*entry).max(round);
    }

    /// The highest round a majority of the voters of every configuration governing a slot
    /// from the first unapplied one on confirmed: no leader of another ballot can choose in any
    /// slot the read may depend on without one of them.
    fn majority_round(&self, membership: &Membership) -> u64 {
        membership
            .governing()
            .map(|(_, config)| {
                let mut rounds: Vec<u64> =
                    config.voters().map(|v| self.confirmed.get(&v).copied().unwrap_or(0)).collect();
                rounds.sort_unstable_by(|a, b| b.cmp(a));
                rounds.get(config.quorum() - 1).copied().unwrap_or(0)
            })
            .min()
            .unwrap_or(0)
    }

    /// Takes the reads that may be answered now: confirmed by a majority and with every slot
    /// below their index applied (`applied` is the learner's next slot to apply).
    ///
    /// `floor` is the leader's phase-1 bound (`Proposer::read_floor`): every slot a previous
    /// leader may have had chosen lies below it. `None` while phase 1 has not heard a majority
    /// of every governing configuration (a slot governed by a configuration whose majority did
    /// not promise may hold a chosen value this leader has not seen): nothing is ready then.
    /// A read's index is raised to the floor before it is judged, so a follower's ask is
    /// answered with the raised index too.
    pub fn ready(&mut self, membership: &Membership, applied: u64, floor: Option<u64>) -> Vec<WaitingRead> {
        let Some(floor) = floor else {
            return Vec::new();
        };
        let majority = self.majority_round(membership);
        let mut ready = Vec::new();
        while let Some(read) = self.waiting.front_mut() {
            read.index = read.index.max(floor);
            if read.round > majority || read.index > applied {
                break;
            }
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
    use crate::membership::voters;

    const B: Ballot = Ballot { round: 3, node: 1 };

    fn five() -> Membership {
        Membership::initial(voters(&[1, 2, 3, 4, 5])).expect("valid")
    }

    #[test]
    fn a_read_is_ready_only_after_a_later_round_is_confirmed_by_a_majority_and_its_index_applied() {
        let mut reads = Reads::default();
        reads.reset(B);
        reads.add(1, 0, 0, "k".into(), 10, 0);
        // An answer to a round sent before the read arrived does not count.
        reads.on_confirmed(1, B, 0);
        reads.on_confirmed(2, B, 0);
        reads.on_confirmed(3, B, 0);
        assert!(reads.ready(&five(), 10, Some(0)).is_empty());
        assert_eq!(reads.round_to_send(&five(), 0), Some(1));
        assert_eq!(reads.round_to_send(&five(), 0), None, "one round per batch of reads");
        reads.on_confirmed(1, B, 1);
        reads.on_confirmed(2, B, 1);
        assert!(reads.ready(&five(), 10, Some(0)).is_empty(), "two of five is no majority");
        reads.on_confirmed(4, Ballot { round: 2, node: 4 }, 1);
        assert!(reads.ready(&five(), 10, Some(0)).is_empty(), "an answer under another ballot does not count");
        reads.on_confirmed(4, B, 1);
        assert!(reads.ready(&five(), 9, Some(0)).is_empty(), "slot 9 not applied yet");
        assert_eq!(reads.ready(&five(), 10, Some(0)).len(), 1);
    }

    #[test]
    fn a_read_waits_for_phase_one_to_reach_every_configuration_and_for_its_bound() {
        let mut reads = Reads::default();
        reads.reset(B);
        reads.add(1, 0, 0, "k".into(), 3, 0);
        assert_eq!(reads.round_to_send(&five(), 0), Some(1));
        for node in 1..=3 {
            reads.on_confirmed(node, B, 1);
        }
        assert!(reads.ready(&five(), 100, None).is_empty(), "phase 1 has not heard every configuration");
        assert!(reads.ready(&five(), 7, Some(8)).is_empty(), "slot 7 may hold a previous leader's write");
        let ready = reads.ready(&five(), 8, Some(8));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].index, 8, "a follower's ask is answered with the raised index");
    }

    #[test]
    fn one_round_in_flight_at_a_time_and_a_later_round_confirms_earlier_ones() {
        let mut reads = Reads::default();
        reads.reset(B);
        reads.add(1, 0, 0, "a".into(), 1, 0);
        assert_eq!(reads.round_to_send(&five(), 0), Some(1));
        reads.add(2, 0, 0, "b".into(), 2, 1);
        reads.add(3, 0, 0, "c".into(), 2, 2);
        assert_eq!(reads.round_to_send(&five(), 2), None, "round 1 is still in flight");
        assert_eq!(reads.round_to_send(&five(), READ_ROUND_RETRY_MS), Some(2), "an overdue round is followed anyway");
        for node in 1..=3 {
            reads.on_confirmed(node, B, 2);
        }
        assert_eq!(reads.ready(&five(), 5, Some(0)).iter().map(|r| r.request_id).collect::<Vec<_>>(), vec![1, 2, 3]);
        reads.add(4, 0, 0, "d".into(), 5, 10);
        assert_eq!(reads.round_to_send(&five(), 30), Some(3), "round 2 was confirmed: the next may go");
        assert_eq!(reads.expired(10 + READ_CONFIRM_TIMEOUT_MS - 1), vec![]);
        let back = reads.reset(Ballot { round: 4, node: 2 });
        assert_eq!(back.len(), 1);
        assert!(reads.is_empty());
    }
}
