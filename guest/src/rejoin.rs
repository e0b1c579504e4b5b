//! Rejoining after a lost disk: how a replica whose acceptor forgot its promises and accepted
//! values earns its vote back (the *fence*), and how elections open a new ballot *epoch*.
//!
//! A replica that starts with `config.rejoining` and no durable state does not vote
//! (`Record::Voting(false)`). Its earlier incarnation may have promised ballots and accepted
//! values that some proposer still counts (a leader's `in_flight[s].accepts`, a candidate's
//! promises). Voting again after "catching up with the leader" is not enough (issue 11, bug A):
//! a slot still in flight is not caught up, and no wait is long enough to be a proof.
//!
//! # Epochs
//! `Ballot { round, node }` is unchanged on the wire; its *epoch* is `round >> 40`. Elections
//! count rounds up within the highest epoch known **open**: a majority promised a ballot of it
//! (a fence of it completed, announced by `EpochOpened`, or a leader of it was heard — a leader
//! won phase 1). A ballot of an epoch only seen in a fence that may not have completed is never
//! counted up from; a replica that must go above one first opens a new epoch with a fence of its
//! own (`Proposer::epoch_unopened`). Epoch 0 is open from the start.
//!
//! # The fence
//! The rejoiner `r` picks `E` = (highest epoch it has seen) + 1 and sends
//! `Fence { B_f = Ballot::fence(E, r) }` to every other acceptor. A voting acceptor answers only
//! if every ballot it promised is of a *strictly lower* epoch: it then promises `B_f` (persisted
//! before the answer leaves) and reports everything it accepted and its `log_start` (`Fenced`);
//! otherwise it refuses with its promise (`Nack`) and `r` retries above that epoch (after a
//! random back-off). A non-voting acceptor does not answer. With answers from a set `M` of at
//! least `n - q + 1` other members (`q = n/2 + 1`; 3 of the 4 others when n = 5), `r` promises
//! `B_f`, sets its `log_start` to `L` = the highest `log_start` reported, adopts for every slot
//! `>= L` the highest-ballot accepted value reported (persisted as `Record::Accepted`),
//! announces the open epoch, catches its learner up to `L`, and only then persists
//! `Voting(true)` and votes.
//!
//! A voting replica opens an epoch with the same fence, adopting nothing: `q - 1` other answers
//! and its own promise make a majority that holds the epoch.
//!
//! # Why this is safe
//! Assume (as Paxos does for crashes) that fewer than `q` replicas are at once without their
//! durable state. Let `Q` be any quorum (phase 1 or phase 2) that counted a vote of `r`'s
//! earlier incarnation for a ballot `b`. Each member of `M` answered the fence after that vote.
//! 1. *`B_f` is above `b`.* Phase-1 and phase-2 ballots are only counted up within an epoch
//!    known open, so when `b` was created at least `q` acceptors held (had promised) a ballot
//!    of epoch `>= epoch(b)`: a completed fence's answers and its fencer, or a phase-1
//!    majority. A promised epoch never decreases, except that a wiped acceptor holds nothing
//!    until its own fence completes — and that fence, by this same argument (induction over
//!    completed fences), opens an epoch above `epoch(b)`, so it holds one again. Let `k < q` be
//!    the replicas that answer no fence (wiped, or fenced but still catching up; `r` among
//!    them). At least `q - k` holders are among the `n - k` that answer, and `M` is `n - q + 1`
//!    of those: `(q - k) + (n - q + 1) > n - k`, so they share an acceptor, which answered
//!    holding an epoch `>= epoch(b)`. Hence `E > epoch(b)` and `B_f > b`: `r` never again votes
//!    for a ballot `<= b` — all that a promise of `b` asked of it (Paxos Made Simple §2.2,
//!    P1a). (A fence answer of the earlier incarnation counts only for that fence, whose step 2
//!    needs `r`'s later votes above the ballots it bounds: they are, being `>= B_f`.)
//! 2. *A value `r` accepted is reported to it.* If `Q` counted `r`'s accept of `(s, b, v)`:
//!    `Q \ {r}` has `q - 1` of the `n - 1` others and `M` has `n - q + 1` of them, so they share
//!    an acceptor `z`. `z` accepted `(s, b, v)` either before answering the fence — then it
//!    reports `(s, b' >= b, v')` (P2c: a value accepted at `b' >= b` with `v` chosen at `b` is
//!    `v`), or `s < L` and every slot below `L` is chosen and applied, which a candidate behind
//!    it learns from `r`'s `log_start` (it must catch up first) — or after, at a ballot
//!    `>= B_f`, impossible by 1 since `b < B_f`. So `r` holds, for `s`, a value accepted at a
//!    ballot `>= b`, and reports it in every later promise: a later candidate whose quorum meets
//!    `Q` only in `r` still finds it (§2.2, P2c).
//! 3. *Adopting is a legal accept.* Every adopted tuple was accepted by some acceptor at that
//!    ballot, so it was proposed at that ballot; holding it changes no quorum's count (no
//!    proposer receives an `Accepted` for it) and only adds a genuine proposal to `r`'s reports,
//!    which keeps P2c's "highest-ballot value is safe" argument intact.
//!
//! The honest cost: `M` promised `B_f`, so the current leader's accepts are refused and it steps
//! down (at once, if its own acceptor answered: `Proposer::yield_to`); a new leader is elected
//! in the epoch the fence opened — one leader change per rejoin. A fence needs `n - q + 1`
//! answers from acceptors of this build or later (older builds drop the message): a disk should
//! not be wiped and rejoined in the middle of a rolling upgrade, whose older builds also count
//! rounds up without regard to epochs.
//!
//! # Configurations
//! With membership changes (`crate::membership`) "`n` and `q`" are per configuration, and a
//! wiped rejoiner starts from its host's first roster, which may be long out of date. The fence
//! goes to every voter of every configuration it knows and completes only when, in each of
//! them that it votes in, `n - q + 1` of the other voters answered (`fence_complete`). Once
//! caught up it judges the same answers again against every configuration it has learned
//! meanwhile (`fence_still_holds`); where they fall short it fences again, against the newer
//! voters too, and votes only once a fence holds in every configuration it knows. The catch-up
//! goes past the last adopted slot that holds a membership change (`FenceDone::catch_up_to`):
//! a change chosen at or above `L` by a configuration the answers meet is reported by one of
//! them, so by induction over changes every configuration that may have counted the earlier
//! incarnation's vote is known at the second judgement. A rejoiner caught up past `L` raises its
//! acceptor's log start to what it applied, as a restart does. (A hot swap while catching up
//! loses the answers — not in the hand-over's format — and skips the second judgement.)
//!
//! Nothing here is durable beyond `Voting`, `Promised` and `Accepted` records: a rejoiner that
//! restarts (crash or hot swap) before it votes simply runs a new fence, with a higher epoch; a
//! hot swap after the fence completed resumes catching up to its log start (carried in the
//! hand-over's trailer). A disk that rejoined and voted restores the fence's log start on a
//! restart from its learner (`Voting(true)` was persisted only once the learner had applied
//! past it, and made every record before it durable).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::membership::{Configuration, Membership};
use crate::message::{Ballot, Message, Value};
use crate::proposer::Outgoing;
use crate::types::{NodeId, Role};

/// An unanswered fence is sent again this often.
pub const FENCE_RESEND_MS: u64 = 200;
/// A completed fence's `EpochOpened` is sent again this often until a leader of its epoch is
/// heard (a lost announcement would otherwise leave others waiting for an epoch to open).
pub const EPOCH_ANNOUNCE_MS: u64 = 200;

/// What an acceptor answered to our fence.
#[derive(Clone, Debug)]
struct FenceAnswer {
    accepted: Vec<(u64, Ballot, Value)>,
    log_start: u64,
}

/// A fence in progress.
#[derive(Clone, Debug)]
struct Fence {
    ballot: Ballot,
    /// Answers must echo it (see `Message::Fence`).
    nonce: u64,
    /// A rejoiner adopts what the answers report and then catches up; a voting replica that
    /// only opens an epoch does not.
    adopt: bool,
    answers: BTreeMap<NodeId, FenceAnswer>,
    sent_ms: u64,
}

/// A completed fence, for the replica to apply.
#[derive(Clone, Debug)]
pub struct FenceDone {
    /// The fence ballot, now promised by `n - q + 1` others.
    pub ballot: Ballot,
    /// Whether the replica rejoins (adopts the answers, catches up to `log_start`).
    pub adopt: bool,
    /// The highest `log_start` reported.
    pub log_start: u64,
    /// For every slot `>= log_start`, the highest-ballot accepted value reported.
    pub adopted: BTreeMap<u64, (Ballot, Value)>,
    /// The slot the learner must apply up to before the replica votes: `log_start`, or past
    /// the last adopted slot that holds a membership change (see "Configurations" above).
    pub catch_up_to: u64,
}

/// A rejoiner whose fence completed, catching its learner up before it votes.
#[derive(Clone, Debug)]
struct CatchingUp {
    /// Votes once its learner applied every slot below this one.
    log_start: u64,
    /// When it last asked a peer for slots.
    asked_ms: Option<u64>,
    /// Who answered the fence, judged again against the configurations learned while catching
    /// up. `None` after a hot swap (not in the hand-over's format).
    answered: Option<BTreeSet<NodeId>>,
}

/// A completed fence's announcement.
#[derive(Clone, Copy, Debug)]
struct Announcement {
    ballot: Ballot,
    sent_ms: Option<u64>,
}

/// The fence and rejoin state of one replica (volatile: see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Rejoin {
    fence: Option<Fence>,
    /// A refused rejoiner's next fence waits until then (a random back-off, so that two
    /// replicas rejoining at once do not refuse each other for ever).
    next_fence_ms: u64,
    catching_up: Option<CatchingUp>,
    announcement: Option<Announcement>,
}

/// Whether the fence answers of `answered` (other members) complete a fence of `me` in every
/// configuration of `membership`: per configuration, `fence_answers_needed` of its voters
/// other than `me`. A rejoiner's vote counted only where it is a voter, so a configuration
/// it does not vote in asks nothing of its fence; a voting replica opening an epoch needs a
/// majority of every configuration holding the epoch (its own promise counts where it votes).
pub fn fence_complete(me: NodeId, membership: &Membership, adopt: bool, answered: &BTreeSet<NodeId>) -> bool {
    membership.governing().all(|(_, config)| answers_suffice(me, config, adopt, answered))
}

fn answers_suffice(me: NodeId, config: &Configuration, adopt: bool, answered: &BTreeSet<NodeId>) -> bool {
    let voters = config.voters().count();
    let needed = match (config.is_voter(me), adopt) {
        (true, _) => fence_answers_needed(voters, adopt),
        (false, true) => 0,
        (false, false) => config.quorum(),
    };
    config.voters().filter(|v| *v != me && answered.contains(v)).count() >= needed
}

/// Whether a value holds a membership change.
fn changes_members(value: &Value) -> bool {
    matches!(value, Value::Batch(commands) if commands.iter().any(|c| matches!(c.command, crate::types::Command::ChangeMembers(_))))
}

/// Answers from this many other members complete a fence. A rejoiner's (`adopt`): the
/// smallest set that meets every quorum of `members` minus the rejoiner (with
/// `q = members/2 + 1`, `members - q + 1`). A voting replica's, which only opens an epoch:
/// `q - 1`, since with its own promise a majority then holds the epoch.
pub fn fence_answers_needed(members: usize, adopt: bool) -> usize {
    let quorum = members / 2 + 1;
    let needed = if adopt { members - quorum + 1 } else { quorum - 1 };
    needed.min(members.saturating_sub(1))
}

impl Rejoin {
    /// True while a fence is in progress.
    pub fn fencing(&self) -> bool {
        self.fence.is_some()
    }

    /// The slot the learner must reach before this replica votes (fence completed), if any.
    pub fn catching_up_to(&self) -> Option<u64> {
        self.catching_up.as_ref().map(|c| c.log_start)
    }

    /// Caught up: whether the fence's answers also complete it in every configuration the
    /// learner knows now (`membership`). When they do not (the rejoiner started from an older
    /// roster and learned of a newer configuration while catching up), the replica must not
    /// vote: it fences again, now against every voter it knows.
    pub fn fence_still_holds(&self, me: NodeId, membership: &Membership) -> bool {
        match self.catching_up.as_ref().and_then(|c| c.answered.as_ref()) {
            Some(answered) => fence_complete(me, membership, true, answered),
            None => true,
        }
    }

    /// Starts a fence of epoch `epoch`: one `Fence` to every other member's acceptor. Returns
    /// the fence ballot.
    // Plain values from one call site in `replica`; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn start_fence(
        &mut self,
        me: NodeId,
        members: &[NodeId],
        epoch: u64,
        adopt: bool,
        nonce: u64,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) -> Ballot {
        let ballot = Ballot::fence(epoch, me);
        self.fence = Some(Fence { ballot, nonce, adopt, answers: BTreeMap::new(), sent_ms: now_ms });
        for &m in members {
            if m != me {
                out.push((m, Role::Acceptor, Message::Fence { ballot, nonce }));
            }
        }
        ballot
    }

    /// An acceptor answered a fence. Returns the completed fence once enough distinct other
    /// members answered this one.
    // Plain values from one call site in `replica`; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn on_fenced(
        &mut self,
        me: NodeId,
        membership: &Membership,
        src: NodeId,
        ballot: Ballot,
        nonce: u64,
        accepted: Vec<(u64, Ballot, Value)>,
        log_start: u64,
    ) -> Option<FenceDone> {
        let fence = self.fence.as_mut()?;
        let other_attempt = fence.nonce != nonce && !cfg!(feature = "bug-fence-without-nonce");
        if fence.ballot != ballot || other_attempt || src == me {
            return None;
        }
        fence.answers.insert(src, FenceAnswer { accepted, log_start });
        let answered: BTreeSet<NodeId> = fence.answers.keys().copied().collect();
        if !fence_complete(me, membership, fence.adopt, &answered) {
            return None;
        }
        let fence = self.fence.take()?;
        let log_start = fence.answers.values().map(|a| a.log_start).max().unwrap_or(0);
        let mut adopted: BTreeMap<u64, (Ballot, Value)> = BTreeMap::new();
        if fence.adopt {
            for (slot, b, value) in fence.answers.into_values().flat_map(|a| a.accepted) {
                let higher = slot >= log_start && adopted.get(&slot).is_none_or(|(have, _)| *have < b);
                if higher {
                    adopted.insert(slot, (b, value));
                }
            }
        }
        let catch_up_to = adopted
            .iter()
            .filter(|(_, (_, value))| changes_members(value))
            .map(|(slot, _)| slot + 1)
            .fold(log_start, u64::max);
        if fence.adopt {
            self.catching_up = Some(CatchingUp { log_start: catch_up_to, asked_ms: None, answered: Some(answered) });
        }
        self.announcement = Some(Announcement { ballot: fence.ballot, sent_ms: None });
        Some(FenceDone { ballot: fence.ballot, adopt: fence.adopt, log_start, adopted, catch_up_to })
    }

    /// An acceptor refused `ballot`. When it is our fence's, the fence is abandoned, and a
    /// rejoiner's next one waits `backoff_ms`; returns whether it was a rejoiner's.
    pub fn on_nack(&mut self, ballot: Ballot, now_ms: u64, backoff_ms: u64) -> Option<bool> {
        if self.fence.as_ref().is_some_and(|f| f.ballot == ballot) {
            self.next_fence_ms = now_ms + backoff_ms;
            return self.fence.take().map(|f| f.adopt);
        }
        None
    }

    /// Whether a rejoiner without a fence should start one now.
    pub fn fence_due(&self, now_ms: u64) -> bool {
        self.fence.is_none() && self.catching_up.is_none() && now_ms >= self.next_fence_ms
    }

    /// A hot swap found this replica's fence completed (the hand-over's promise is its own
    /// fence ballot): it only has to catch up to `log_start` before it votes.
    pub fn resume_catching_up(&mut self, log_start: u64) {
        self.catching_up = Some(CatchingUp { log_start, asked_ms: None, answered: None });
    }

    /// The learner reached the fence's `log_start`: the replica votes from now on (or, when
    /// `fence_still_holds` said no, fences again).
    pub fn caught_up(&mut self) {
        self.catching_up = None;
    }

    /// Whether to ask a peer for missing slots now (at most every `interval_ms`).
    pub fn catch_up_due(&mut self, now_ms: u64, interval_ms: u64) -> bool {
        let Some(c) = self.catching_up.as_mut() else {
            return false;
        };
        if c.asked_ms.is_some_and(|t| now_ms < t + interval_ms) {
            return false;
        }
        c.asked_ms = Some(now_ms);
        true
    }

    /// Timers: the fence again to acceptors that have not answered; the completed fence's
    /// announcement again until a leader of its epoch (`leader_epoch`) is heard.
    pub fn on_time(
        &mut self,
        me: NodeId,
        members: &[NodeId],
        leader_epoch: Option<u64>,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(fence) = self.fence.as_mut() {
            if now_ms >= fence.sent_ms + FENCE_RESEND_MS {
                fence.sent_ms = now_ms;
                for &m in members {
                    if m != me && !fence.answers.contains_key(&m) {
                        out.push((m, Role::Acceptor, Message::Fence { ballot: fence.ballot, nonce: fence.nonce }));
                    }
                }
            }
        }
        if let Some(a) = self.announcement.as_mut() {
            if leader_epoch.is_some_and(|e| e >= a.ballot.epoch()) {
                self.announcement = None;
            } else if a.sent_ms.is_none_or(|t| now_ms >= t + EPOCH_ANNOUNCE_MS) {
                a.sent_ms = Some(now_ms);
                for &m in members {
                    out.push((m, Role::Proposer, Message::EpochOpened { ballot: a.ballot }));
                }
            }
        }
    }
}

/// The rule issue 11 replaced, kept as the planted bug `bug-rejoin-early` (and, always `None`,
/// as the hand-over field older builds expect): vote again once caught up with the leader's
/// `chosen_upto` and two election timeouts passed. A timing assumption, and wrong: a slot in
/// flight is not caught up.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct EarlyRejoin {
    /// The leader's `chosen_upto` when first heard of; caught up means applied to here.
    pub target: Option<u64>,
    /// When this replica started rejoining.
    pub since_ms: Option<u64>,
}

impl EarlyRejoin {
    /// True when the old rule would let the replica vote again now.
    pub fn ready(&mut self, applied: u64, chosen_upto: u64, now_ms: u64, wait_ms: u64) -> bool {
        let since = *self.since_ms.get_or_insert(now_ms);
        let target = *self.target.get_or_insert(chosen_upto);
        applied >= target && now_ms >= since + wait_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_needs_the_smallest_set_that_meets_every_quorum_minus_the_rejoiner() {
        assert_eq!(fence_answers_needed(5, true), 3);
        assert_eq!(fence_answers_needed(4, true), 2);
        assert_eq!(fence_answers_needed(3, true), 2);
        assert_eq!(fence_answers_needed(1, true), 0);
        // Opening an epoch only needs a majority with the fencer's own promise.
        assert_eq!(fence_answers_needed(5, false), 2);
        assert_eq!(fence_answers_needed(3, false), 1);
    }

    #[test]
    fn a_fence_adopts_the_highest_ballot_per_slot_from_the_highest_log_start() {
        let mut rejoin = Rejoin::default();
        let mut out = Vec::new();
        let ballot = rejoin.start_fence(1, &[1, 2, 3, 4, 5], 1, true, 77, 0, &mut out);
        let five = Membership::initial(crate::membership::voters(&[1, 2, 3, 4, 5])).expect("valid");
        assert_eq!(out.len(), 4);
        let low = Ballot { round: 3, node: 2 };
        let high = Ballot { round: 4, node: 3 };
        assert!(rejoin.on_fenced(1, &five, 2, ballot, 77, vec![(5, low, Value::Noop)], 2).is_none());
        assert!(rejoin.on_fenced(1, &five, 2, ballot, 77, vec![], 0).is_none(), "the same acceptor twice counts once");
        assert!(rejoin
            .on_fenced(1, &five, 3, ballot, 77, vec![(1, high, Value::Noop), (5, high, Value::Noop)], 4)
            .is_none());
        assert!(
            rejoin.on_fenced(1, &five, 4, ballot, 76, vec![], 0).is_none(),
            "an answer to another attempt (an earlier life's) does not count"
        );
        let done = rejoin.on_fenced(1, &five, 4, ballot, 77, vec![], 0).expect("three of four others answered");
        assert_eq!(done.log_start, 4);
        assert_eq!(done.adopted.keys().copied().collect::<Vec<_>>(), vec![5], "slot 1 is below the log start");
        assert_eq!(done.adopted[&5].0, high);
        assert_eq!(rejoin.catching_up_to(), Some(4));
    }
}
