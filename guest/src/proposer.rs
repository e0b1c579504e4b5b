//! The proposer role: leader election (phase 1 once for all open slots), then phase 2 per slot.
//!
//! Reference: "Paxos Made Simple" §3 (Multi-Paxos). The leader is simply the proposer whose
//! phase 1 won. On winning it re-proposes, for every open slot, the value accepted under the
//! highest ballot any promising acceptor reported, and fills gaps with no-ops. It then proposes
//! client commands in batches (many per slot) with a bounded window of slots in flight, sends
//! heartbeats, and steps down as soon as any acceptor reports a higher promise. A follower that
//! hears no heartbeat for a randomized timeout starts phase 1 with a higher round; the random
//! spread (and a random back-off after losing) keeps duelling proposers from livelocking.
//!
//! Every slot has its own configuration (`membership`): accepts for slot `t` go to the voters of
//! `config(t)` and are counted among them; the leader proposes in `t` only once a majority of
//! them promised its ballot (`covers`), and no further than `membership::ALPHA` slots past the
//! first one not applied (so it knows `config(t)`). A replica that promises after the leader won
//! (a voter just added, or one that was slow) counts from then on, and what it reports accepted
//! in slots not yet proposed is adopted as in phase 1.
//!
//! Ballots carry an epoch (`Ballot::epoch`, see `rejoin`): an election counts rounds up within
//! the highest epoch known to be *open* (a fence of it completed, or a leader of it was heard),
//! never into an epoch seen only in a fence that may not have completed. When the highest
//! ballot seen is of an epoch not known open, the replica must open one by a fence first
//! (`epoch_unopened`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::learner::Learner;
use crate::membership::{Membership, ALPHA};
use crate::message::{Ballot, ClientCommand, Message, Value};
use crate::rng::Rng;
use crate::types::{NodeId, Role};

/// Leader heartbeat period.
pub const HEARTBEAT_INTERVAL_MS: u64 = 50;
/// Election timeout range: a follower waits a random time in this range without heartbeats.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 300;
/// Upper end (exclusive) of the election timeout.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 600;
/// A slot in flight is re-sent to acceptors that have not answered after this long, plus
/// `ACCEPT_RESEND_BYTES_PER_MS` of waiting per byte in flight: an accept waits behind every
/// earlier one at the acceptor (its write and fsync), and re-sending megabytes every 100 ms
/// only adds to the queue it waits in (measured: 256 KiB values at 64 clients went from 31 to
/// well over 100 ops/s).
pub const ACCEPT_RESEND_MS: u64 = 100;
/// Bytes in flight that add one millisecond to the resend interval (~32 MB/s).
pub const ACCEPT_RESEND_BYTES_PER_MS: usize = 32 * 1024;
/// Bound on slots in flight at once (pipelining window); also `membership::ALPHA`, the window
/// counted from the first slot not applied.
pub const WINDOW_SLOTS_MAX: usize = 64;
/// Bound on commands per slot.
pub const BATCH_COMMANDS_MAX: usize = 512;
/// Bound on payload bytes per slot (keys + values), so a slot's messages stay well under the
/// transport's message limit.
pub const BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Bound on the payload bytes of all slots in flight: with large values the slot window alone
/// would let one step send 64 slots × 2 MiB to every acceptor (over half a GiB of effects, more
/// than the host accepts from one call, found by the 256 KiB benchmark), and every resend
/// repeats it. Small values never reach it.
pub const WINDOW_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Bound on commands queued at the leader waiting for a slot.
pub const QUEUE_COMMANDS_MAX: usize = 50_000;

/// Where this proposer stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Following a leader (or waiting for one).
    Follower,
    /// Running phase 1 with `ballot`.
    Candidate {
        /// Promises received: per acceptor, what it had accepted.
        promises: BTreeMap<NodeId, Vec<(u64, Ballot, Value)>>,
        /// The first slot phase 1 covers.
        first_slot: u64,
        /// The highest `log_start` a promising acceptor reported, and which one.
        max_log_start: (u64, NodeId),
    },
    /// Phase 1 won: proposing.
    Leader,
}

/// A slot proposed and not yet chosen.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InFlight {
    /// The proposed value.
    pub value: Value,
    /// Acceptors that accepted it under the current ballot.
    pub accepts: BTreeSet<NodeId>,
    /// When the accept was last sent.
    pub sent_ms: u64,
}

/// An acceptor's phase-1b answer, as the proposer takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promise {
    /// The ballot promised.
    pub ballot: Ballot,
    /// `(slot, accepted ballot, value)` from the candidate's first slot on.
    pub accepted: Vec<(u64, Ballot, Value)>,
    /// The acceptor forgot every slot below this one.
    pub log_start: u64,
}

/// What a promise did to a candidacy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseOne {
    /// Not (yet) a majority, or not for our ballot.
    Pending,
    /// A majority promised: this proposer leads.
    Won,
    /// A majority promised, but this acceptor already forgot slots this candidate has not
    /// applied: it must catch up first (from that replica), so it stands down.
    Behind(NodeId),
}

/// Destination of a message meant for every member, this one included (node ids start at 1).
pub const EVERY_MEMBER: NodeId = 0;

/// A message to send: destination (or `EVERY_MEMBER`), role there, message.
pub type Outgoing = (NodeId, Role, Message);

/// The proposer's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proposer {
    me: NodeId,
    /// The first start's roster; read by nothing any more (the membership decides), kept so the
    /// hand-over format stays the one earlier builds read and write.
    members: Vec<NodeId>,
    /// This proposer's ballot while candidate or leader.
    pub ballot: Ballot,
    /// The highest ballot seen anywhere (the next election goes above it).
    pub max_seen: Ballot,
    /// Where it stands.
    pub phase: Phase,
    /// The leader it believes in, with that leader's ballot.
    pub leader: Option<(NodeId, Ballot)>,
    /// When to start an election if no heartbeat arrives.
    pub election_deadline_ms: u64,
    next_heartbeat_ms: u64,
    /// Next slot a leader proposes in.
    pub next_slot: u64,
    /// Slots proposed and not yet chosen.
    pub in_flight: BTreeMap<u64, InFlight>,
    /// Commands waiting for a slot (leader only).
    pub queue: VecDeque<ClientCommand>,
    rng: Rng,
    /// The highest epoch known open: a majority promised a ballot of it (a fence of it
    /// completed, or a leader of it won phase 1). Not part of the hand-over's format: derived
    /// again after a swap (`open_epoch` from the ballots it still holds).
    #[serde(skip)]
    open_epoch: u64,
    /// What phase 1 of this ballot gathered (handed over in the replica's trailer).
    #[serde(skip)]
    pub phase_one: PhaseOneState,
}

/// What phase 1 of the current ballot gathered, kept while leading: late promises count for
/// the slots not yet proposed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseOneState {
    /// The acceptors that promised the ballot.
    pub promised_by: BTreeSet<NodeId>,
    /// Per slot not yet proposed, the highest-ballot value a promise reported.
    pub adopted: BTreeMap<u64, (Ballot, Value)>,
    /// Slots below this (and from `next_slot`) must be proposed again or filled with no-ops
    /// before new commands: some acceptor may have accepted something there.
    pub reproposal_end: u64,
    /// When prepares last went to voters whose promise is missing.
    pub prepared_ms: u64,
}

impl Proposer {
    /// A follower with no leader yet; its first election deadline is randomized from `now_ms`.
    pub fn new(me: NodeId, members: Vec<NodeId>, seed: u64, now_ms: u64) -> Self {
        let mut rng = Rng::new(seed ^ (u64::from(me) << 32));
        let election_deadline_ms = now_ms + rng.range(ELECTION_TIMEOUT_MIN_MS, ELECTION_TIMEOUT_MAX_MS);
        Proposer {
            me,
            members,
            ballot: Ballot::ZERO,
            max_seen: Ballot::ZERO,
            phase: Phase::Follower,
            leader: None,
            election_deadline_ms,
            next_heartbeat_ms: 0,
            next_slot: 0,
            in_flight: BTreeMap::new(),
            queue: VecDeque::new(),
            rng,
            open_epoch: 0,
            phase_one: PhaseOneState::default(),
        }
    }

    /// Notes that `epoch` is open (a majority promised a ballot of it).
    pub fn open_epoch(&mut self, epoch: u64) {
        self.open_epoch = self.open_epoch.max(epoch);
    }

    /// The highest epoch known open.
    pub fn opened_epoch(&self) -> u64 {
        self.open_epoch
    }

    /// True when the highest ballot seen is of an epoch not known open: an election would have
    /// to count rounds in it, so a fence must open an epoch first.
    pub fn epoch_unopened(&self) -> bool {
        self.max_seen.epoch() > self.open_epoch
    }

    /// True when the election timer ran out (follower or candidate).
    pub fn election_due(&self, now_ms: u64) -> bool {
        !self.is_leader() && now_ms >= self.election_deadline_ms
    }

    /// Puts the next election off by a fresh random timeout (an epoch must be opened first).
    pub fn defer_election(&mut self, now_ms: u64) {
        self.reset_election_timer(now_ms);
    }

    /// This replica's own acceptor promised `promised`: a leader or candidate of a lower
    /// ballot stops at once, rather than keep counting under a ballot its own acceptor has
    /// abandoned. Returns true when it stopped.
    pub fn yield_to(&mut self, promised: Ballot, now_ms: u64) -> bool {
        self.observe(promised);
        if self.phase == Phase::Follower || promised <= self.ballot {
            return false;
        }
        self.step_down(now_ms);
        true
    }

    /// A random delay below `max_ms` (from this replica's seeded PRNG), to break ties.
    pub fn random_delay_ms(&mut self, max_ms: u64) -> u64 {
        self.rng.range(0, max_ms)
    }

    /// Stops leading (CheckQuorum: no majority heard from within an election timeout).
    pub fn stand_down(&mut self, now_ms: u64) {
        self.step_down(now_ms);
    }

    /// Drops slots in flight below `slot`: a learner learned them chosen (a snapshot).
    pub fn forget_in_flight_below(&mut self, slot: u64) {
        self.in_flight = self.in_flight.split_off(&slot);
        if self.next_slot < slot {
            self.next_slot = slot;
        }
    }

    /// True while this proposer leads.
    pub fn is_leader(&self) -> bool {
        self.phase == Phase::Leader
    }

    /// The leader this replica believes in, itself included.
    pub fn known_leader(&self) -> Option<NodeId> {
        self.leader.map(|(n, _)| n)
    }

    fn reset_election_timer(&mut self, now_ms: u64) {
        self.election_deadline_ms = now_ms + self.rng.range(ELECTION_TIMEOUT_MIN_MS, ELECTION_TIMEOUT_MAX_MS);
    }

    /// One outgoing entry for every member (this one included); the replica encodes it once.
    fn broadcast(&self, role: Role, message: &Message, out: &mut Vec<Outgoing>) {
        out.push((EVERY_MEMBER, role, message.clone()));
    }

    /// Timers: start an election when the leader went quiet; as leader, heartbeat every member
    /// (learners too: they follow the leader and catch up from it), ask voters whose promise is
    /// missing again, and re-send accepts that went unanswered.
    pub fn on_time(&mut self, now_ms: u64, learner: &Learner, out: &mut Vec<Outgoing>) {
        let first_unchosen = learner.next_apply;
        let membership = &learner.membership;
        match self.phase {
            Phase::Leader => {
                if now_ms >= self.next_heartbeat_ms {
                    self.next_heartbeat_ms = now_ms + HEARTBEAT_INTERVAL_MS;
                    let hb = Message::Heartbeat { ballot: self.ballot, chosen_upto: first_unchosen };
                    for m in membership.everyone() {
                        if m != self.me {
                            out.push((m, Role::Proposer, hb.clone()));
                        }
                    }
                }
                if now_ms >= self.phase_one.prepared_ms + HEARTBEAT_INTERVAL_MS
                    && !membership.quorum_in_every(|n| self.phase_one.promised_by.contains(&n))
                {
                    self.phase_one.prepared_ms = now_ms;
                    let prepare = Message::Prepare { ballot: self.ballot, first_slot: self.next_slot };
                    for m in membership.all_voters() {
                        if !self.phase_one.promised_by.contains(&m) {
                            out.push((m, Role::Acceptor, prepare.clone()));
                        }
                    }
                }
                let ballot = self.ballot;
                // Sizing the window costs a walk over it: only when some slot is due at all.
                if self.in_flight.values().all(|f| now_ms < f.sent_ms + ACCEPT_RESEND_MS) {
                    return;
                }
                let resend_ms = ACCEPT_RESEND_MS + (self.in_flight_bytes() / ACCEPT_RESEND_BYTES_PER_MS) as u64;
                for (&slot, flight) in self.in_flight.iter_mut() {
                    if now_ms >= flight.sent_ms + resend_ms {
                        flight.sent_ms = now_ms;
                        for m in membership.at(slot).voters() {
                            if !flight.accepts.contains(&m) {
                                let msg = Message::Accept { ballot, slot, value: flight.value.clone() };
                                out.push((m, Role::Acceptor, msg));
                            }
                        }
                    }
                }
            }
            Phase::Follower | Phase::Candidate { .. } => {
                // An unopened epoch needs a fence first (the replica runs it; `epoch_unopened`).
                if now_ms >= self.election_deadline_ms && !self.epoch_unopened() {
                    self.start_election(now_ms, first_unchosen, out);
                }
            }
        }
    }

    /// Phase 1a: a ballot above everything seen, sent to every acceptor (this one included).
    /// The caller made sure the epoch of everything seen is open (`epoch_unopened`).
    pub fn start_election(&mut self, now_ms: u64, first_unchosen: u64, out: &mut Vec<Outgoing>) {
        self.ballot = Ballot { round: self.max_seen.round + 1, node: self.me };
        self.max_seen = self.ballot;
        self.phase = Phase::Candidate { promises: BTreeMap::new(), first_slot: first_unchosen, max_log_start: (0, 0) };
        self.leader = None;
        self.in_flight.clear();
        self.phase_one = PhaseOneState::default();
        self.reset_election_timer(now_ms);
        if cfg!(feature = "bug-skip-phase1") {
            // Planted bug (simulator test builds only): lead without running phase 1.
            self.phase = Phase::Leader;
            self.leader = Some((self.me, self.ballot));
            self.next_slot = self.next_slot.max(first_unchosen);
            self.next_heartbeat_ms = now_ms;
            return;
        }
        let prepare = Message::Prepare { ballot: self.ballot, first_slot: first_unchosen };
        self.broadcast(Role::Acceptor, &prepare, out);
    }

    /// Phase 1b answer. When a majority of the first slot's voters promised, this proposer
    /// becomes leader and proposes again every open slot (highest-ballot accepted value, or a
    /// no-op for a gap) as far as the window and the promises reach (`advance`); slots the local
    /// `learner` already knows chosen are not proposed again. A promise to a leader's ballot
    /// (late, or asked for because a new configuration needs it) counts from now on.
    pub fn on_promise(
        &mut self,
        src: NodeId,
        promise: Promise,
        now_ms: u64,
        learner: &Learner,
        out: &mut Vec<Outgoing>,
    ) -> PhaseOne {
        let Promise { ballot, accepted, log_start } = promise;
        if ballot != self.ballot {
            return PhaseOne::Pending;
        }
        if self.phase == Phase::Leader {
            // A late promiser that forgot slots this leader has neither proposed nor learned
            // (its log starts above them) reports nothing for them, so it must not count
            // toward covering them: one of them may hold a chosen value only its forgotten
            // accept knew of. As a candidate would, the leader stands down and catches up
            // from it first (a second review's break: Noop chosen over an acknowledged write).
            let mut first_open = self.next_slot;
            while first_open < log_start && learner.is_chosen(first_open) {
                first_open += 1;
            }
            if log_start > first_open {
                self.step_down(now_ms);
                return PhaseOne::Behind(src);
            }
            if self.phase_one.promised_by.insert(src) {
                let next_slot = self.next_slot;
                self.adopt(accepted.iter().filter(|(slot, _, _)| *slot >= next_slot));
                self.advance(now_ms, learner, out);
            }
            return PhaseOne::Pending;
        }
        let Phase::Candidate { promises, first_slot, max_log_start } = &mut self.phase else {
            return PhaseOne::Pending;
        };
        promises.insert(src, accepted);
        if log_start > max_log_start.0 {
            *max_log_start = (log_start, src);
        }
        let config = learner.membership.at(*first_slot);
        if !config.has_quorum(|n| promises.contains_key(&n)) {
            return PhaseOne::Pending;
        }
        if max_log_start.0 > *first_slot {
            let ahead = max_log_start.1;
            self.step_down(now_ms);
            return PhaseOne::Behind(ahead);
        }
        let first_slot = *first_slot;
        let promises = std::mem::take(promises);
        self.phase_one = PhaseOneState { promised_by: promises.keys().copied().collect(), ..PhaseOneState::default() };
        self.adopt(promises.values().flatten().filter(|(slot, _, _)| *slot >= first_slot));
        let end = [self.phase_one.adopted.keys().next_back().copied(), learner.highest_chosen()]
            .into_iter()
            .flatten()
            .max()
            .map_or(first_slot, |s| (s + 1).max(first_slot));
        self.phase_one.reproposal_end = end;
        self.phase_one.prepared_ms = now_ms;
        self.phase = Phase::Leader;
        self.leader = Some((self.me, self.ballot));
        self.in_flight.clear();
        self.next_heartbeat_ms = now_ms;
        self.next_slot = first_slot;
        self.advance(now_ms, learner, out);
        PhaseOne::Won
    }

    /// Reference: "Paxos Made Simple" §2.2 (P2c): per slot, the value of the highest ballot.
    fn adopt<'a>(&mut self, reported: impl Iterator<Item = &'a (u64, Ballot, Value)>) {
        for (slot, b, value) in reported {
            let higher = self.phase_one.adopted.get(slot).is_none_or(|(have, _)| have < b);
            if higher {
                self.phase_one.adopted.insert(*slot, (*b, value.clone()));
            }
            self.phase_one.reproposal_end = self.phase_one.reproposal_end.max(slot + 1);
        }
    }

    /// Whether a majority of `slot`'s voters promised this ballot.
    pub fn covers(&self, slot: u64, membership: &Membership) -> bool {
        membership.at(slot).has_quorum(|n| self.phase_one.promised_by.contains(&n))
    }

    /// The slot every read index must reach while leading: phase 1's bound (every slot a
    /// promise reported accepted lies below it; a read's own index, `next_slot` when it
    /// arrived, covers what this leader proposed — the bound is not raised to the current
    /// `next_slot`, or a read under steady writes would chase slots proposed after it). `None` until a majority of every governing
    /// configuration promised this ballot: a value chosen in a slot that a later configuration
    /// governs need not be known to the first slot's majority. Why that suffices: a chosen
    /// slot at or above the bound is governed by a configuration from a change in a slot
    /// below it (the change was applied before anyone proposed there, and the first change at
    /// or above the bound would itself be reported, raising the bound), and a majority of
    /// that configuration promised, so one of them reported it — a contradiction.
    pub fn read_floor(&self, membership: &Membership) -> Option<u64> {
        membership.quorum_in_every(|n| self.phase_one.promised_by.contains(&n)).then_some(self.phase_one.reproposal_end)
    }

    /// Whether the leader stops at `next_slot` because it does not vote there (removed, or
    /// demoted): it then stands down once its slots in flight are chosen.
    pub fn leaving(&self, membership: &Membership) -> bool {
        self.is_leader() && !membership.at(self.next_slot).is_voter(self.me)
    }

    /// Proposes slot after slot while the window, the bytes in flight and the promises allow:
    /// first what phase 1 reported (or no-ops in its gaps), then queued commands, then no-ops
    /// up to a configuration chosen to take effect (so that a change takes effect on an idle
    /// cluster too).
    fn advance(&mut self, now_ms: u64, learner: &Learner, out: &mut Vec<Outgoing>) {
        if !self.is_leader() {
            return;
        }
        let membership = &learner.membership;
        let mut in_flight_bytes = self.in_flight_bytes();
        loop {
            let slot = self.next_slot;
            if slot >= learner.next_apply + ALPHA
                || self.in_flight.len() >= WINDOW_SLOTS_MAX
                || in_flight_bytes >= WINDOW_BYTES_MAX
            {
                return;
            }
            if learner.is_chosen(slot) {
                self.next_slot += 1;
                continue;
            }
            if !membership.at(slot).is_voter(self.me) || !self.covers(slot, membership) {
                return;
            }
            let value = if let Some((_, value)) = self.phase_one.adopted.remove(&slot) {
                value
            } else if slot < self.phase_one.reproposal_end {
                // Reference: "Paxos Made Simple" §3: gaps are filled with no-ops.
                Value::Noop
            } else if !self.queue.is_empty() {
                let batch = self.take_batch();
                in_flight_bytes += batch.iter().map(command_bytes).sum::<usize>();
                Value::Batch(batch)
            } else if membership.next_change_after(slot).is_some() {
                Value::Noop
            } else {
                return;
            };
            self.next_slot += 1;
            self.propose(slot, value, now_ms, out);
        }
    }

    /// The next batch from the queue (at least one command; the caller checked it is not empty).
    fn take_batch(&mut self) -> Vec<ClientCommand> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while let Some(cmd) = self.queue.front() {
            let size = command_bytes(cmd);
            if !batch.is_empty() && (batch.len() >= BATCH_COMMANDS_MAX || bytes + size > BATCH_BYTES_MAX) {
                break;
            }
            bytes += size;
            if let Some(cmd) = self.queue.pop_front() {
                batch.push(cmd);
            }
        }
        batch
    }

    fn propose(&mut self, slot: u64, value: Value, now_ms: u64, out: &mut Vec<Outgoing>) {
        let msg = Message::Accept { ballot: self.ballot, slot, value: value.clone() };
        self.broadcast(Role::Acceptor, &msg, out);
        self.in_flight.insert(slot, InFlight { value, accepts: BTreeSet::new(), sent_ms: now_ms });
    }

    /// Phase 2b answer. Returns the slot and value once a majority of the slot's voters
    /// accepted them: chosen.
    pub fn on_accepted(
        &mut self,
        src: NodeId,
        ballot: Ballot,
        slot: u64,
        membership: &Membership,
    ) -> Option<(u64, Value)> {
        if !self.is_leader() || ballot != self.ballot {
            return None;
        }
        let config = membership.at(slot);
        let flight = self.in_flight.get_mut(&slot)?;
        if !config.is_voter(src) {
            return None;
        }
        flight.accepts.insert(src);
        if !config.has_quorum(|n| flight.accepts.contains(&n)) {
            return None;
        }
        self.in_flight.remove(&slot).map(|f| (slot, f.value))
    }

    /// An acceptor promised a higher ballot than ours: step down and back off.
    pub fn on_nack(&mut self, ballot: Ballot, promised: Ballot, now_ms: u64) -> bool {
        if promised > self.max_seen {
            self.max_seen = promised;
        }
        if ballot != self.ballot || promised <= self.ballot || self.phase == Phase::Follower {
            return false;
        }
        self.step_down(now_ms);
        true
    }

    /// A candidate whose election timed out gives its candidacy up (it asks again by
    /// pre-vote): else its ballot, above a live leader's, would have it ignore that leader's
    /// heartbeats for good while every pre-vote is refused.
    pub fn abandon_candidacy(&mut self, now_ms: u64) {
        if matches!(self.phase, Phase::Candidate { .. }) {
            self.step_down(now_ms);
        }
    }

    fn step_down(&mut self, now_ms: u64) {
        self.phase = Phase::Follower;
        self.leader = None;
        self.in_flight.clear();
        self.queue.clear();
        self.phase_one = PhaseOneState::default();
        self.reset_election_timer(now_ms);
    }

    /// A leader's heartbeat. A follower follows it unless it knows a leader with a higher
    /// ballot; a candidate gives up its candidacy and follows (its own ballot won nobody over
    /// while a leader is alive); a leader steps down only for a higher ballot. A stale leader
    /// followed this way is harmless: acceptors refuse its accepts, and it stops. Returns true
    /// when the heartbeat was accepted (the election timer was reset).
    pub fn on_heartbeat(&mut self, src: NodeId, ballot: Ballot, now_ms: u64) -> bool {
        // A leader's ballot won phase 1: its epoch is open.
        self.open_epoch(ballot.epoch());
        match self.phase {
            Phase::Leader if ballot <= self.ballot => return false,
            // A candidate whose ballot is higher carries on: a majority may have promised it
            // already, and then the lower leader cannot commit anything; giving up would only
            // leave a leader that looks alive and gets refused (a second election).
            Phase::Candidate { .. } if ballot < self.ballot => return false,
            Phase::Leader | Phase::Candidate { .. } => self.step_down(now_ms),
            Phase::Follower => {
                if self.leader.is_some_and(|(_, b)| ballot < b) {
                    return false;
                }
            }
        }
        self.observe(ballot);
        self.leader = Some((src, ballot));
        self.reset_election_timer(now_ms);
        true
    }

    /// Notes a ballot seen in a prepare or accept, so the next election goes above it.
    pub fn observe(&mut self, ballot: Ballot) {
        if ballot > self.max_seen {
            self.max_seen = ballot;
        }
    }

    /// Queues client commands at the leader. Returns the commands that did not fit.
    pub fn enqueue(&mut self, commands: Vec<ClientCommand>) -> Vec<ClientCommand> {
        let mut refused = Vec::new();
        for cmd in commands {
            if self.queue.len() >= QUEUE_COMMANDS_MAX {
                refused.push(cmd);
            } else {
                self.queue.push_back(cmd);
            }
        }
        refused
    }

    /// Payload bytes of the slots in flight.
    fn in_flight_bytes(&self) -> usize {
        self.in_flight.values().map(|f| crate::learner::value_bytes(&f.value)).sum()
    }

    /// Proposes what is due (queued commands, phase 1's slots, no-ops towards a new
    /// configuration) while the window has room.
    pub fn flush(&mut self, now_ms: u64, learner: &Learner, out: &mut Vec<Outgoing>) {
        self.advance(now_ms, learner, out);
    }

    /// A slot was learned chosen (from this leader's accepts, a peer's announcement or the
    /// records at start). A follower moves `next_slot` past it (its status shows where the log
    /// stands; a win resets it anyway). A leader never jumps: slots between `next_slot` and a
    /// slot learned from elsewhere (a previous leader's late announcement) may be open, chosen
    /// or not, and must still be proposed (phase 1's value or a no-op) — jumping left a hole
    /// its learner never filled and gave reads an index past it. Instead phase 1's bound
    /// rises, so `advance` fills the gap and every read index covers the learned slot
    /// (`read_floor`); `advance` itself skips chosen slots.
    pub fn note_chosen(&mut self, slot: u64) {
        self.in_flight.remove(&slot);
        if self.is_leader() {
            // Only a slot at or past `next_slot` was learned from elsewhere: below it, this
            // leader proposed it or skipped it as chosen, and a read index covers it already
            // (raising the bound for its own chosen slots would make reads chase new writes).
            if slot >= self.next_slot {
                self.phase_one.reproposal_end = self.phase_one.reproposal_end.max(slot + 1);
            }
        } else if self.next_slot <= slot {
            self.next_slot = slot + 1;
        }
    }
}

/// Approximate size of a command, for batch bounds.
pub fn command_bytes(cmd: &ClientCommand) -> usize {
    32 + match &cmd.command {
        crate::types::Command::Put(k, v) => k.len() + v.len(),
        crate::types::Command::Get(k) | crate::types::Command::Delete(k) | crate::types::Command::GetStale(k) => {
            k.len()
        }
        crate::types::Command::ChangeMembers(change) => match change {
            crate::membership::MemberChange::Add { address } => address.len(),
            _ => 8,
        },
    }
}
