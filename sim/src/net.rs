//! The virtual network between the simulated hosts.
//!
//! It owns the messages in flight and the state of each *directed* link, because in waxos each
//! direction between two hosts is its own gRPC stream: a→b can be cut while b→a works (one-way
//! loss, asymmetric partitions, a leader that can send but not receive). It draws every
//! message's fate from the run's seed: loss, duplication, a short delay, or now and then a long
//! one (up to seconds: a message stuck in a buffer, which then arrives long after the sender
//! moved on — across elections and hot swaps). A directed link can also be slow for a while
//! (every message on it takes hundreds of milliseconds to seconds). A message is refused when
//! its link is cut at send time; one in flight is lost when its link is cut at delivery, unless
//! it was one of the long-delayed ones (those model a message already past the cut).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use waxos_host::runtime::Envelope;

use crate::rng::Rng;

/// Delivery delay of an ordinary message under faults: `1..NORMAL_DELAY_MS_MAX` ms.
pub const NORMAL_DELAY_MS_MAX: u64 = 30;
/// Without faults.
pub const CALM_DELAY_MS_MAX: u64 = 5;
/// One message in `LONG_DELAY_ONE_IN` is held back for `LONG_DELAY_MS` ms.
pub const LONG_DELAY_ONE_IN: u64 = 400;
/// Range of a long delay.
pub const LONG_DELAY_MS: (u64, u64) = (200, 3_000);
/// Range of every delay on a slow link (a stream stuck behind a congested connection).
pub const SLOW_LINK_DELAY_MS: (u64, u64) = (500, 5_000);
/// Probability that a message is lost outright.
pub const LOSS_CHANCE: f64 = 0.02;
/// Probability that a message is delivered twice.
pub const DUPLICATE_CHANCE: f64 = 0.01;

/// What happened to a message handed to the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Lost (at random, or its link is cut).
    Lost,
    /// In flight (`copies` of it; `long` when held back for long).
    Sent {
        /// 1, or 2 when duplicated.
        copies: u32,
        /// At least one copy was long-delayed.
        long: bool,
    },
}

struct InFlight {
    envelope: Envelope,
    sent_ms: u64,
    /// Long-delayed: already past any cut made after it was sent.
    long: bool,
    /// Held back as this kind: if the hold was extended meanwhile, it waits for the new end.
    held: Option<Held>,
}

/// Messages in flight and the directed links.
pub struct Net {
    nodes: usize,
    faults: bool,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, InFlight>,
    next_seq: u64,
    /// `cut_until_ms[src][dst]`: the link src→dst is down before this time.
    cut_until_ms: Vec<Vec<u64>>,
    /// `slow_until_ms[src][dst]`: every message on src→dst is long-delayed before this time.
    slow_until_ms: Vec<Vec<u64>>,
    /// `hold_until_ms[kind][src][dst]`: every message of `kind` (`Held`) sent on src→dst
    /// before this time is held back until then, then delivered unless a cut is in the way.
    hold_until_ms: [Vec<Vec<u64>>; Held::KINDS],
    /// `replay_fenced[src][dst]`: `(until, at)`: every `Fenced` answer sent on src→dst before
    /// `until` is delivered as usual and once more at `at` (a copy stuck in a buffer, past any
    /// cut by then).
    replay_fenced: Vec<Vec<(u64, u64)>>,
    /// `mute_pre_votes_until_ms[src]`: every `PreVote` src sends before then is lost.
    mute_pre_votes_until_ms: Vec<u64>,
}

impl Net {
    /// `nodes` hosts, all links up; `faults` off means no loss, duplication or long delays.
    pub fn new(nodes: usize, faults: bool) -> Net {
        Net {
            nodes,
            faults,
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            cut_until_ms: vec![vec![0; nodes]; nodes],
            slow_until_ms: vec![vec![0; nodes]; nodes],
            hold_until_ms: std::array::from_fn(|_| vec![vec![0; nodes]; nodes]),
            replay_fenced: vec![vec![(0, 0); nodes]; nodes],
            mute_pre_votes_until_ms: vec![0; nodes],
        }
    }

    /// One more host (a member added to the cluster), its links up.
    pub fn add_node(&mut self) {
        self.nodes += 1;
        let n = self.nodes;
        let square: [&mut Vec<Vec<u64>>; 2] = [&mut self.cut_until_ms, &mut self.slow_until_ms];
        for matrix in square.into_iter().chain(self.hold_until_ms.iter_mut()) {
            matrix.iter_mut().for_each(|row| row.resize(n, 0));
            matrix.push(vec![0; n]);
        }
        self.replay_fenced.iter_mut().for_each(|row| row.resize(n, (0, 0)));
        self.replay_fenced.push(vec![(0, 0); n]);
        self.mute_pre_votes_until_ms.push(0);
    }

    /// Whether src→dst (node indexes) carries messages at `now_ms`.
    pub fn link_up(&self, src: usize, dst: usize, now_ms: u64) -> bool {
        src == dst || now_ms >= self.cut_until_ms[src][dst]
    }

    /// Whether src→dst is slow at `now_ms`.
    pub fn link_slow(&self, src: usize, dst: usize, now_ms: u64) -> bool {
        src != dst && now_ms < self.slow_until_ms[src][dst]
    }

    /// Whether anything `src` sent to `dst` over a slow link may still be on its way at
    /// `now_ms` (the link is slow now, or was less than the longest delay ago).
    pub fn stale(&self, src: usize, dst: usize, now_ms: u64) -> bool {
        src != dst && now_ms < self.slow_until_ms[src][dst].saturating_add(SLOW_LINK_DELAY_MS.1)
    }

    /// Cuts src→dst until `until_ms` (a longer cut already in place stays).
    pub fn cut(&mut self, src: usize, dst: usize, until_ms: u64) {
        if src != dst {
            let cut = &mut self.cut_until_ms[src][dst];
            *cut = (*cut).max(until_ms);
        }
    }

    /// Makes src→dst slow until `until_ms`.
    pub fn slow(&mut self, src: usize, dst: usize, until_ms: u64) {
        if src != dst {
            let slow = &mut self.slow_until_ms[src][dst];
            *slow = (*slow).max(until_ms);
        }
    }

    /// Holds back every message of `kind` sent on src→dst until `until_ms`.
    pub fn hold(&mut self, kind: Held, src: usize, dst: usize, until_ms: u64) {
        if src != dst {
            let hold = &mut self.hold_until_ms[kind as usize][src][dst];
            *hold = (*hold).max(until_ms);
        }
    }

    /// Every `Fenced` answer sent on src→dst before `until_ms` is delivered once more at `at_ms`.
    pub fn replay_fenced(&mut self, src: usize, dst: usize, until_ms: u64, at_ms: u64) {
        if src != dst {
            self.replay_fenced[src][dst] = (until_ms, at_ms);
        }
    }

    /// Every `PreVote` `src` sends before `until_ms` is lost.
    pub fn mute_pre_votes(&mut self, src: usize, until_ms: u64) {
        self.mute_pre_votes_until_ms[src] = self.mute_pre_votes_until_ms[src].max(until_ms);
    }

    /// Every link up and fast again (messages in flight stay in flight).
    pub fn heal_all(&mut self) {
        let rows = self.cut_until_ms.iter_mut().chain(self.slow_until_ms.iter_mut());
        self.mute_pre_votes_until_ms.iter_mut().for_each(|t| *t = 0);
        for row in rows.chain(self.hold_until_ms.iter_mut().flatten()) {
            row.iter_mut().for_each(|t| *t = 0);
        }
    }

    /// Hands a message to the network at `now_ms`.
    pub fn send(&mut self, envelope: Envelope, now_ms: u64, rng: &mut Rng) -> Fate {
        let (src, dst) = (envelope.src as usize - 1, envelope.dst as usize - 1);
        if src >= self.nodes || dst >= self.nodes {
            return Fate::Lost;
        }
        if self.faults && (rng.chance(LOSS_CHANCE) || !self.link_up(src, dst, now_ms)) {
            return Fate::Lost;
        }
        if self.faults && now_ms < self.mute_pre_votes_until_ms[src] && is_pre_vote(&envelope) {
            return Fate::Lost;
        }
        let copies = if self.faults && rng.chance(DUPLICATE_CHANCE) { 2 } else { 1 };
        let (replay_until, replay_at) = self.replay_fenced[src][dst];
        if self.faults && now_ms < replay_until && replay_at > now_ms && is_fenced(&envelope) {
            self.next_seq += 1;
            self.queue.push(Reverse((replay_at, self.next_seq)));
            self.in_flight.insert(
                self.next_seq,
                InFlight { envelope: envelope.clone(), sent_ms: now_ms, long: true, held: None },
            );
        }
        let any_held = self.hold_until_ms.iter().any(|kind| now_ms < kind[src][dst]);
        let held = any_held.then(|| Held::of(&envelope)).flatten();
        let held_until = held.map_or(0, |kind| self.hold_until_ms[kind as usize][src][dst]);
        if self.faults && now_ms < held_until {
            // Held confirmations are stuck in a buffer: they arrive past a cut made meanwhile.
            let long = held == Some(Held::ReadConfirmations);
            for _ in 0..copies {
                self.next_seq += 1;
                let at = held_until + rng.range(1, NORMAL_DELAY_MS_MAX);
                self.queue.push(Reverse((at, self.next_seq)));
                let message = InFlight { envelope: envelope.clone(), sent_ms: now_ms, long, held };
                self.in_flight.insert(self.next_seq, message);
            }
            return Fate::Sent { copies, long: true };
        }
        let mut any_long = false;
        for _ in 0..copies {
            let slow = self.faults && self.link_slow(src, dst, now_ms);
            let long = slow || (self.faults && rng.range(0, LONG_DELAY_ONE_IN) == 0);
            let delay_ms = if slow {
                rng.range(SLOW_LINK_DELAY_MS.0, SLOW_LINK_DELAY_MS.1)
            } else if long {
                rng.range(LONG_DELAY_MS.0, LONG_DELAY_MS.1)
            } else {
                rng.range(1, if self.faults { NORMAL_DELAY_MS_MAX } else { CALM_DELAY_MS_MAX })
            };
            any_long |= long;
            self.next_seq += 1;
            self.queue.push(Reverse((now_ms + delay_ms, self.next_seq)));
            let message = InFlight { envelope: envelope.clone(), sent_ms: now_ms, long, held: None };
            self.in_flight.insert(self.next_seq, message);
        }
        Fate::Sent { copies, long: any_long }
    }

    /// The next message due by `now_ms`, if any: `Ok` to deliver (with the time it was sent),
    /// `Err` lost to a cut made while it was in flight.
    pub fn next_due(&mut self, now_ms: u64) -> Option<Result<(Envelope, u64), Envelope>> {
        loop {
            let Reverse((at, seq)) = self.queue.peek().copied()?;
            if at > now_ms {
                return None;
            }
            self.queue.pop();
            let Some(message) = self.in_flight.remove(&seq) else { continue };
            let (src, dst) = (message.envelope.src as usize - 1, message.envelope.dst as usize - 1);
            if let Some(kind) = message.held {
                let until = self.hold_until_ms[kind as usize][src][dst];
                if until > at {
                    // The hold was extended: wait for its new end.
                    self.queue.push(Reverse((until + (at % NORMAL_DELAY_MS_MAX), seq)));
                    self.in_flight.insert(seq, message);
                    continue;
                }
            }
            if !message.long && self.faults && !self.link_up(src, dst, now_ms) {
                return Some(Err(message.envelope));
            }
            return Some(Ok((message.envelope, message.sent_ms)));
        }
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The kinds of message a link can hold back (`Net::hold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Phase 2a `Accept`s: an acceptor whose proposals queue behind a stuck stream while its
    /// other traffic flows.
    Accepts,
    /// What teaches a learner chosen slots (`Chosen` announcements, catch-up answers,
    /// `SnapshotChunk`s): a follower that accepts and answers heartbeats but learns nothing.
    Learned,
    /// An acceptor's answers to read confirmation rounds (`ReadConfirmed`): late answers,
    /// all at once, past any cut made meanwhile.
    ReadConfirmations,
}

impl Held {
    const KINDS: usize = 3;

    /// The kind of `envelope`, if it is one a link can hold back.
    fn of(envelope: &Envelope) -> Option<Held> {
        use waxos_guest::message::{self, Message};
        match message::decode::<Message>(&envelope.payload).ok()? {
            Message::Accept { .. } => Some(Held::Accepts),
            Message::Chosen { .. } | Message::SnapshotChunk { .. } => Some(Held::Learned),
            Message::ReadConfirmed { .. } => Some(Held::ReadConfirmations),
            _ => None,
        }
    }
}

/// Whether the envelope carries a rejoiner's fence answer (`Fenced`).
fn is_fenced(envelope: &Envelope) -> bool {
    use waxos_guest::message::{self, Message};
    matches!(message::decode::<Message>(&envelope.payload), Ok(Message::Fenced { .. }))
}

/// Whether the envelope carries an acceptor's `Forgotten` answer.
pub(crate) fn is_forgotten(envelope: &Envelope) -> bool {
    use waxos_guest::message::{self, Message};
    envelope.role == waxos_host::runtime::Role::Proposer
        && matches!(message::decode::<Message>(&envelope.payload), Ok(Message::Forgotten { .. }))
}

/// Whether the envelope carries a `PreVote`.
fn is_pre_vote(envelope: &Envelope) -> bool {
    use waxos_guest::message::{self, Message};
    matches!(message::decode::<Message>(&envelope.payload), Ok(Message::PreVote { .. }))
}
