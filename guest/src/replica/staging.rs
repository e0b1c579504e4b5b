//! Starting a replica from its durable state, and the staged hot swap built on it.
//!
//! `start` and `replay` apply WAL records the same way (`replay_records`), so a host can start a
//! new build's instance off its step loop from the snapshot on disk and the WAL, catch it up with
//! the records persisted since, and only then switch: the old instance hands over its volatile
//! state alone (`handover_volatile`: leadership, slots in flight, requests waiting here, read
//! rounds), which the new one takes over (`adopt`). The pause is then independent of the size of
//! the state, where a hand-over snapshot (`Replica::snapshot(true)`) copies all of it twice.
//!
//! The staged instance's durable state must be the old instance's: the hand-over carries a mark
//! of it (`DurableMark`: applied slot, promise, highest accepted and chosen slots, keys,
//! sessions, voting, membership), and `adopt` refuses a mismatch without changing anything, so a
//! host that fed the records wrongly swaps the old way instead of running a replica that forgot
//! an acknowledged write.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{HandoverTrailer, Pending, Replica, Volatile};
use crate::follower_reads::FollowerReads;
use crate::learner::AppState;
use crate::message::{self, Ballot, Record};
use crate::proposer::PhaseOneState;
use crate::types::Effect;

/// The version of the staged hand-over's encoding.
const STAGED_HANDOVER_VERSION: u8 = 2;

/// What identifies the durable state a staged hand-over belongs to: equal on two instances that
/// applied the same records. Accepted values of applied slots are left out: each instance trims
/// them on its own schedule (`Replica::trim_log`), and they no longer matter to either. Keys and
/// sessions are counted, not compared: the new build re-applies the slots since the snapshot on
/// disk with its own code, so it must apply them as the old build did, which a rolling upgrade
/// needs anyway (members on either build apply the same slots); a digest of the contents kept
/// as the state machine applies would catch a build that does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DurableMark {
    next_apply: u64,
    promised: Ballot,
    highest_accepted: Option<(u64, Ballot)>,
    highest_chosen: Option<u64>,
    keys: u64,
    sessions: u64,
    voting: bool,
    membership: Vec<u8>,
}

/// A staged hot swap's hand-over: the volatile state, with the mark of the durable state it goes
/// with.
#[derive(Serialize, Deserialize)]
struct StagedHandover<'a> {
    /// The state format the old build writes (`message::SNAPSHOT_VERSION`): a build that reads
    /// only older formats refuses to take over, as it would refuse that build's snapshot (a
    /// downgrade past a format change), even when the disk holds no snapshot of that format yet.
    state_format: u8,
    mark: DurableMark,
    volatile: Volatile<'a>,
    trailer: HandoverTrailer,
    phase_one: Cow<'a, PhaseOneState>,
}

impl Replica {
    /// Applies WAL records in order (at start, and for a staged instance catching up): the
    /// acceptor's promises and accepts, the learner's chosen values and installed snapshots,
    /// whether this replica votes; then applies what became ready.
    pub(super) fn replay_records(&mut self, wal: &[Vec<u8>]) -> Result<(), String> {
        for (i, bytes) in wal.iter().enumerate() {
            let record: Record = message::decode(bytes).map_err(|e| format!("WAL record {i} refused: {e}"))?;
            self.acceptor.restore(&record);
            match record {
                Record::Chosen { slot, value } => {
                    self.learner.learn(slot, value);
                }
                Record::Installed(bytes) => {
                    self.learner.apply_ready();
                    let state = AppState::decode(&bytes)
                        .map_err(|e| format!("WAL record {i} (installed snapshot) refused: {e}"))?;
                    self.learner.install(state);
                }
                Record::ChosenAccepted { slot, ballot } => match self.acceptor.accepted.get(&slot) {
                    Some((accepted, value)) if *accepted == ballot => {
                        let value = value.clone();
                        self.learner.learn(slot, value);
                    }
                    // Cannot happen with an intact log (the Accepted record comes first and the
                    // acceptor keeps every unapplied slot); if it does, the slot is learned again
                    // from the peers, as after losing a lazy record.
                    _ => self.log(format!(
                        "WAL record {i}: slot {slot} chosen at {ballot}, but that accept is not in the log; relearning it"
                    )),
                },
                Record::Voting(voting) => {
                    self.voting = voting;
                    // A log that once said "not voting" belongs to a disk that rejoined.
                    self.disk_rejoined |= !voting;
                }
                Record::Promised(_) | Record::Accepted { .. } => {}
            }
        }
        self.learner.apply_ready();
        if self.disk_rejoined && self.voting && !cfg!(feature = "bug-rejoin-early") {
            // This disk once rejoined: its fence's log start is not among the records, but the
            // learner applied past it before `Voting(true)` (which made every earlier record
            // durable). Forgetting what is applied is always safe (a candidate behind it
            // catches up first), and it restores the fence's log start.
            let applied = self.learner.next_apply;
            self.acceptor.forget_below(applied);
        }
        Ok(())
    }

    /// What the proposer and the host learn from the durable state once it is in place: the
    /// promise and the highest chosen slot bound the proposer's ballots and slots; open epochs;
    /// the members.
    pub(super) fn settle(&mut self) {
        self.proposer.observe(self.acceptor.promised);
        if let Some(slot) = self.learner.highest_chosen() {
            self.proposer.note_chosen(slot);
        }
        self.derive_open_epoch();
        self.announce_members_if_changed();
    }

    /// Takes over an old instance's volatile state (a hot swap's, either way).
    pub(super) fn take_over(&mut self, v: Volatile<'_>, trailer: HandoverTrailer, phase_one: PhaseOneState) {
        self.now_ms = v.now_ms;
        self.started = true;
        self.proposer = v.proposer.into_owned();
        self.pending = v.pending.into_owned();
        self.last_catchup_ms = v.last_catchup_ms;
        self.last_heartbeat_ms = v.last_heartbeat_ms;
        self.early_rejoin = v.rejoin;
        self.proposer.phase_one = phase_one;
        if let (Some(log_start), false) = (trailer.fenced_log_start, self.voting) {
            // The fence completed before the swap: only the catch-up remains.
            self.acceptor.forget_below(log_start);
            self.rejoin.resume_catching_up(log_start);
        }
        if !cfg!(feature = "bug-reads-reset-on-swap") {
            self.reads.resume_rounds_after(trailer.read_round);
        }
        // A new instance: its follower-read asks must not match the old one's.
        self.follower_reads = FollowerReads::new(self.instance_nonce());
    }

    /// The requests waiting here, as a hand-over carries them. Reads waiting for their
    /// confirmation are handed over as log commands, due at once: the new build's read state
    /// starts empty (and the hand-over format need not carry it). Followers' asks waiting here
    /// are dropped: the followers ask again or use the log.
    pub(super) fn handover_pending(&self) -> Cow<'_, BTreeMap<u64, Pending>> {
        if self.reads.is_empty() && self.follower_reads.is_empty() {
            return Cow::Borrowed(&self.pending);
        }
        let mut pending = self.pending.clone();
        for read in self.reads.waiting().filter(|r| r.remote.is_none()) {
            let entry = self.get_through_log_entry(read.request_id, read.client, read.seq, &read.key, read.since_ms, 0);
            pending.insert(read.request_id, entry);
        }
        for read in self.follower_reads.waiting() {
            let entry = self.get_through_log_entry(read.request_id, read.client, read.seq, &read.key, read.since_ms, 0);
            pending.insert(read.request_id, entry);
        }
        Cow::Owned(pending)
    }

    /// The volatile state a hot swap carries beyond the durable state.
    pub(super) fn volatile(&self) -> Volatile<'_> {
        Volatile {
            now_ms: self.now_ms,
            proposer: Cow::Borrowed(&self.proposer),
            pending: self.handover_pending(),
            last_catchup_ms: self.last_catchup_ms,
            last_heartbeat_ms: self.last_heartbeat_ms,
            rejoin: self.early_rejoin,
        }
    }

    /// What the hand-over trailer carries (read rounds, a completed fence).
    pub(super) fn handover_trailer(&self) -> HandoverTrailer {
        HandoverTrailer { read_round: self.reads.sent_round(), fenced_log_start: self.rejoin.catching_up_to() }
    }

    fn durable_mark(&self) -> DurableMark {
        DurableMark {
            next_apply: self.learner.next_apply,
            promised: self.acceptor.promised,
            highest_accepted: self
                .acceptor
                .accepted
                .range(self.learner.next_apply..)
                .next_back()
                .map(|(slot, (ballot, _))| (*slot, *ballot)),
            highest_chosen: self.learner.highest_chosen(),
            keys: self.learner.kv.data.len() as u64,
            sessions: self.learner.kv.sessions.len() as u64,
            voting: self.voting,
            membership: self.learner.membership.encode(),
        }
    }

    /// Catches a staged instance up with records persisted after those it started from; returns
    /// its log lines.
    ///
    /// Then it trims as a step does after applying (what no peer needs any more goes): a
    /// staged instance, or a fresh one whose snapshot a compaction off the step loop takes
    /// (`replay` of no records), must not carry the accepted values of every slot it replayed,
    /// where the live instance's acceptor kept a window. `start` does not trim: a restarted
    /// replica trims with its first apply, as before.
    pub fn replay(&mut self, wal: &[Vec<u8>]) -> Result<Vec<Effect>, String> {
        self.replay_records(wal)?;
        self.trim_log();
        Ok(std::mem::take(&mut self.effects).into_iter().filter(|e| matches!(e, Effect::Log(_))).collect())
    }

    /// The volatile state and the mark of the durable state, for `adopt` on a staged instance.
    pub fn handover_volatile(&self) -> Vec<u8> {
        let handover = StagedHandover {
            state_format: message::SNAPSHOT_VERSION,
            mark: self.durable_mark(),
            volatile: self.volatile(),
            trailer: self.handover_trailer(),
            phase_one: Cow::Borrowed(&self.proposer.phase_one),
        };
        message::encode_as(STAGED_HANDOVER_VERSION, &handover)
    }

    /// Takes over the volatile state of the instance this one replaces; refused, with nothing
    /// changed, when the durable states differ.
    pub fn adopt(&mut self, bytes: &[u8]) -> Result<Vec<Effect>, String> {
        let handover: StagedHandover<'static> = message::decode_up_to(STAGED_HANDOVER_VERSION, bytes)
            .map_err(|e| format!("staged hand-over refused: {e}"))?;
        if handover.state_format > message::SNAPSHOT_VERSION {
            return Err(format!(
                "staged hand-over refused: the running build's state format version {} is newer than this build reads (up to {}): it needs a newer guest build",
                handover.state_format,
                message::SNAPSHOT_VERSION
            ));
        }
        let mine = self.durable_mark();
        if handover.mark != mine {
            return Err(format!(
                "staged hand-over refused: the new instance's durable state differs from the old one's (old {:?}, new {:?})",
                handover.mark, mine
            ));
        }
        let StagedHandover { volatile, trailer, phase_one, .. } = handover;
        self.take_over(volatile, trailer, phase_one.into_owned());
        // Whatever the staged start said (logs, members) is stale; what follows is this
        // instance's first word as the replica.
        self.effects.retain(|e| matches!(e, Effect::Log(_)));
        self.announced_members = None;
        self.settle();
        self.log(format!(
            "took over a staged hand-over: applied up to {}, {} keys, {} requests waiting",
            self.learner.next_apply,
            self.learner.kv.data.len(),
            self.pending.len()
        ));
        Ok(std::mem::take(&mut self.effects))
    }
}
