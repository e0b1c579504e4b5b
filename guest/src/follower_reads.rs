//! Linearizable reads at a follower: etcd's follower ReadIndex.
//!
//! A follower that gets a linearizable GET does not send it through the log, nor to the leader.
//! It asks the leader for a read index (`Message::ReadIndex`); the leader treats the ask like a
//! read of its own (see `reads`): it takes its read index (every slot it had proposed) when the
//! ask arrives, waits for a confirmation round sent after that, and answers
//! `Message::ReadIndexed` with the index. The follower then waits until it has applied every
//! slot below the index and answers from its own state machine — so reads spread over all
//! members scale with the members instead of funnelling through the leader's state machine.
//!
//! Why it is linearizable: a read here arrived before the ask that serves it was sent, so before
//! the leader took its index; every write acknowledged before the read was chosen before then,
//! so it lies below the index (and the leader's confirmation round proves no newer leader could
//! have chosen anything the index misses — the argument of `reads`). Once this follower applied
//! up to the index, its state contains every such write.
//!
//! Asks are batched like confirmation rounds: at most one in flight; reads arriving meanwhile
//! wait for the next ask, and an answer to ask `a` serves every read assigned an ask up to `a`.
//! An answer is only taken when it names this instance's `nonce`: after a crash restart or a hot
//! swap the ask counter starts over, and an answer to an ask of the previous instance, delivered
//! late, must not serve a read that arrived after its index was taken. A read not served within
//! `READ_CONFIRM_TIMEOUT_MS` (no leader, a lost answer, a peer of an older build that does not
//! know the messages) goes through the log instead, which is always correct.

use std::collections::VecDeque;

use crate::reads::{READ_CONFIRM_TIMEOUT_MS, READ_ROUND_RETRY_MS};
use crate::types::NodeId;

/// A linearizable read waiting at a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerRead {
    /// The host's request id.
    pub request_id: u64,
    /// The client's identity (kept for the log fallback).
    pub client: u64,
    /// The client's sequence number.
    pub seq: u64,
    /// The key.
    pub key: String,
    /// The ask that serves it (0: none sent since it arrived).
    ask: u64,
    /// The leader's read index, once answered: every slot below it must be applied here.
    index: Option<u64>,
    /// When the read arrived.
    pub since_ms: u64,
}

/// The follower's side of ReadIndex.
#[derive(Clone, Debug, Default)]
pub struct FollowerReads {
    /// Identifies this instance's asks (see the module doc).
    nonce: u64,
    /// The last ask sent.
    last_ask: u64,
    /// When it was sent, and to which leader.
    sent_ms: u64,
    sent_to: Option<NodeId>,
    /// The highest ask answered.
    answered: u64,
    /// In arrival order.
    waiting: VecDeque<FollowerRead>,
}

impl FollowerReads {
    /// An empty queue whose asks carry `nonce` (distinct per instance).
    pub fn new(nonce: u64) -> Self {
        FollowerReads { nonce, ..FollowerReads::default() }
    }

    /// Reads waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when no read waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Queues a read that arrived now.
    pub fn add(&mut self, request_id: u64, client: u64, seq: u64, key: String, now_ms: u64) {
        self.waiting.push_back(FollowerRead { request_id, client, seq, key, ask: 0, index: None, since_ms: now_ms });
    }

    /// The ask to send to `leader` now, as `(nonce, ask)`: when a read arrived since the last
    /// ask, and no ask is in flight (or the one in flight is overdue, or went to another leader).
    pub fn ask_to_send(&mut self, leader: NodeId, now_ms: u64) -> Option<(u64, u64)> {
        let needed = self.waiting.iter().any(|r| r.ask == 0);
        let in_flight = self.answered < self.last_ask
            && now_ms < self.sent_ms + READ_ROUND_RETRY_MS
            && self.sent_to == Some(leader);
        if !needed || in_flight {
            return None;
        }
        self.last_ask += 1;
        self.sent_ms = now_ms;
        self.sent_to = Some(leader);
        for read in self.waiting.iter_mut().filter(|r| r.ask == 0) {
            read.ask = self.last_ask;
        }
        Some((self.nonce, self.last_ask))
    }

    /// The leader answered ask `ask` of instance `nonce` with read index `index`.
    pub fn on_answer(&mut self, nonce: u64, ask: u64, index: u64) {
        if nonce != self.nonce || ask > self.last_ask {
            return;
        }
        self.answered = self.answered.max(ask);
        for read in self.waiting.iter_mut().filter(|r| r.ask != 0 && r.ask <= ask && r.index.is_none()) {
            read.index = Some(index);
        }
    }

    /// Takes the reads that may be answered now: served, with every slot below their index
    /// applied (`applied` is the learner's next slot to apply).
    pub fn ready(&mut self, applied: u64) -> Vec<FollowerRead> {
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(|r| r.index.is_some_and(|index| index <= applied));
        self.waiting = waiting.into();
        ready
    }

    /// Takes the reads that waited too long (they go through the log).
    pub fn expired(&mut self, now_ms: u64) -> Vec<FollowerRead> {
        let mut expired = Vec::new();
        while self.waiting.front().is_some_and(|r| now_ms >= r.since_ms + READ_CONFIRM_TIMEOUT_MS) {
            if let Some(read) = self.waiting.pop_front() {
                expired.push(read);
            }
        }
        expired
    }

    /// Takes every waiting read (this replica now leads, or hands over to a new build).
    pub fn take_all(&mut self) -> Vec<FollowerRead> {
        self.waiting.drain(..).collect()
    }

    /// The reads waiting, oldest first.
    pub fn waiting(&self) -> impl Iterator<Item = &FollowerRead> {
        self.waiting.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_read_waits_for_an_ask_sent_after_it_and_for_the_index_to_be_applied() {
        let mut reads = FollowerReads::new(7);
        reads.add(1, 0, 0, "k".into(), 0);
        assert_eq!(reads.ask_to_send(1, 0), Some((7, 1)));
        assert_eq!(reads.ask_to_send(1, 1), None, "one ask in flight at a time");
        reads.add(2, 0, 0, "k".into(), 2);
        reads.on_answer(7, 1, 10);
        assert!(reads.ready(9).is_empty(), "slot 9 not applied yet");
        let ready = reads.ready(10);
        assert_eq!(ready.iter().map(|r| r.request_id).collect::<Vec<_>>(), vec![1]);
        assert!(reads.ready(100).is_empty(), "read 2 arrived after ask 1 was sent: ask 1 cannot serve it");
        assert_eq!(reads.ask_to_send(1, 3), Some((7, 2)));
        reads.on_answer(7, 2, 12);
        assert_eq!(reads.ready(12).len(), 1);
    }

    #[test]
    fn an_answer_to_another_instances_ask_is_ignored() {
        let mut reads = FollowerReads::new(7);
        reads.add(1, 0, 0, "k".into(), 0);
        assert_eq!(reads.ask_to_send(1, 0), Some((7, 1)));
        reads.on_answer(6, 1, 0);
        assert!(reads.ready(u64::MAX).is_empty(), "an answer from before a restart or swap must not count");
        reads.on_answer(7, 2, 0);
        assert!(reads.ready(u64::MAX).is_empty(), "an ask never sent cannot be answered");
    }

    #[test]
    fn a_new_leader_or_an_overdue_ask_gets_a_new_ask_and_unserved_reads_expire() {
        let mut reads = FollowerReads::new(1);
        reads.add(1, 0, 0, "k".into(), 0);
        assert_eq!(reads.ask_to_send(1, 0), Some((1, 1)));
        reads.add(2, 0, 0, "k".into(), 1);
        assert_eq!(reads.ask_to_send(2, 1), Some((1, 2)), "another leader: ask it at once");
        reads.add(3, 0, 0, "k".into(), 2);
        assert_eq!(reads.ask_to_send(2, 2 + READ_ROUND_RETRY_MS), Some((1, 3)), "overdue");
        reads.on_answer(1, 3, 5);
        assert_eq!(reads.ready(5).len(), 3, "a later ask serves the reads of earlier ones");
        reads.add(4, 0, 0, "k".into(), 100);
        assert!(reads.expired(100 + READ_CONFIRM_TIMEOUT_MS - 1).is_empty());
        assert_eq!(reads.expired(100 + READ_CONFIRM_TIMEOUT_MS).len(), 1);
    }
}
