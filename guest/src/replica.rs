//! One replica: the three Paxos roles and the state machine behind one sans-IO `step`.
//!
//! Events go in (client requests, peer messages, ticks), effects come out (messages, replies,
//! records to persist, log lines), in the style of raft-rs's `Ready`. Messages a role sends to
//! its own replica are delivered within the same step without leaving the guest; that is safe
//! because the host makes every `persist` of a step durable before any `send` or `reply` of it.
//!
//! Requests from this host's clients are kept in `pending` until the command is applied: the
//! leader proposes them, a follower forwards them to the leader it knows (and again, whenever
//! the leader changes or a resend interval passes). Retries are harmless because the state
//! machine deduplicates by `(client, seq)`, and a pair reused for another command is refused
//! (`kv`), never answered with the first command's outcome.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::acceptor::Acceptor;
use crate::follower_reads::{FollowerRead, FollowerReads};
use crate::kv::{Kv, KvV1};
use crate::learner::Learner;
use crate::membership::Membership;
use crate::message::{self, Ballot, ClientCommand, DecodeError, Message, Record, Value};
use crate::prevote::PreVote;
use crate::proposer::{
    Outgoing, Phase, PhaseOne, PhaseOneState, Promise, Proposer, ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS,
    EVERY_MEMBER,
};
use crate::reads::{Reads, RemoteAsk, WaitingRead};
use crate::rejoin::{EarlyRejoin, FenceDone, Rejoin};
use crate::types::{Command, Config, Effect, Envelope, Event, NodeId, Outcome, Request, Role};

mod reconfigure;
mod snapshot_transfer;
mod staging;

use snapshot_transfer::IncomingSnapshot;

/// The guest build's version, reported by `status`: the crate version, plus the build label
/// `WAXOS_BUILD_LABEL` given at compile time, if any (`0.1.0+canary`).
pub fn guest_version() -> String {
    match option_env!("WAXOS_BUILD_LABEL") {
        Some(label) if !label.is_empty() => format!("{}+{label}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}
/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest value accepted, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Bound on this replica's own requests waiting to be applied.
pub const PENDING_MAX: usize = 20_000;
/// A pending request not yet applied is sent to the leader again after this long.
pub const PENDING_RESEND_MS: u64 = 1_000;
/// A pending request is given up after this long (the host's caller is long gone).
pub const PENDING_EXPIRE_MS: u64 = 60_000;
/// A learner behind the leader asks for missing slots at most this often.
pub const CATCHUP_INTERVAL_MS: u64 = 100;
/// Slots per catch-up answer.
pub const CATCHUP_SLOTS_MAX: usize = 256;
/// Bytes per snapshot-transfer message.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// A snapshot is sent to one peer at most this often.
pub const SNAPSHOT_RESEND_MS: u64 = 5_000;
/// Byte bound of one catch-up answer.
pub const CATCHUP_BYTES_MAX: usize = 4 << 20;
/// Bytes of applied values the learner keeps to serve peers catching up, whatever
/// `retain_slots` says: 2,000 slots of batched 256 KiB values would otherwise fill the guest's
/// memory (found by the value-size benchmark: the guest ran out of memory and restarted).
pub const RETAIN_BYTES_MAX: usize = 64 << 20;
/// Applied slots whose accepted values the acceptor keeps (the pipelining window).
pub const ACCEPTOR_RETAIN_SLOTS: u64 = crate::proposer::WINDOW_SLOTS_MAX as u64;
/// With test hooks on, a put of this key makes the guest trap.
pub const TEST_TRAP_KEY: &str = "__waxos_test_trap__";
/// With test hooks on, a put of this key makes the guest loop forever.
pub const TEST_LOOP_KEY: &str = "__waxos_test_loop__";

/// A request of this host's, waiting for its command to be applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Pending {
    command: ClientCommand,
    submitted_ms: u64,
    sent_ms: u64,
}

/// Everything a snapshot holds. Borrowed when written (no copy of the state on the way out),
/// owned when read. `K` is the state machine's layout: `Kv` in format 2 (what this build
/// writes), `KvV1` in format 1 (sessions without fingerprints; read to migrate). Nothing else
/// differs between the two formats.
#[derive(Serialize, Deserialize)]
struct SnapshotState<'a, K: Clone> {
    promised: Ballot,
    accepted: Cow<'a, BTreeMap<u64, (Ballot, Value)>>,
    acceptor_log_start: u64,
    chosen: Cow<'a, BTreeMap<u64, Value>>,
    learner_log_start: u64,
    next_apply: u64,
    kv: Cow<'a, K>,
    voting: bool,
    /// Present only in a hand-over snapshot (hot swap): the state that is not durable.
    volatile: Option<Volatile<'a>>,
}

/// A decoded snapshot: the state, its membership (none before format 3, whose builds never
/// changed members), the bytes after them (a hand-over's trailers).
type DecodedSnapshot<'b> = (SnapshotState<'static, Kv>, Option<Membership>, &'b [u8]);

/// Decodes a snapshot of format 1 (migrated: its sessions keep everything but a fingerprint,
/// which they never had), 2, or 3 (2's layout followed by the membership).
fn decode_snapshot(bytes: &[u8]) -> Result<DecodedSnapshot<'_>, String> {
    let version = bytes.first().copied().unwrap_or(0);
    let (state, rest) = decode_snapshot_state(bytes).map_err(|e| e.to_string())?;
    if version < 3 {
        return Ok((state, None, rest));
    }
    let (membership, rest) = Membership::decode(rest)?;
    Ok((state, Some(membership), rest))
}

fn decode_snapshot_state(bytes: &[u8]) -> Result<(SnapshotState<'static, Kv>, &[u8]), DecodeError> {
    if bytes.first().is_some_and(|&version| version <= 1) {
        let (old, rest): (SnapshotState<'static, KvV1>, &[u8]) = message::decode_with_rest(1, bytes)?;
        let state = SnapshotState {
            promised: old.promised,
            accepted: old.accepted,
            acceptor_log_start: old.acceptor_log_start,
            chosen: old.chosen,
            learner_log_start: old.learner_log_start,
            next_apply: old.next_apply,
            kv: Cow::Owned(Kv::from(old.kv.into_owned())),
            voting: old.voting,
            volatile: old.volatile,
        };
        return Ok((state, rest));
    }
    message::decode_with_rest(message::SNAPSHOT_VERSION, bytes)
}

/// What a hot swap hands over beyond the durable state, so that the new build continues exactly
/// where the old one stopped: a leader stays leader with its slots in flight, requests waiting
/// at this replica are still answered. Never part of a crash restart: a restarted leader must
/// not reuse its ballot for slots it may have proposed after the snapshot.
#[derive(Serialize, Deserialize)]
struct Volatile<'a> {
    now_ms: u64,
    proposer: Cow<'a, Proposer>,
    pending: Cow<'a, BTreeMap<u64, Pending>>,
    last_catchup_ms: Option<u64>,
    last_heartbeat_ms: Option<u64>,
    /// The old rejoin rule's state; the field keeps the hand-over format of earlier builds
    /// (`rejoin` explains what replaced it).
    rejoin: EarlyRejoin,
}

/// What a hand-over carries after `SnapshotState`, as a trailer that builds before it ignore
/// (postcard stops reading at the end of the value): its own version byte, then this.
#[derive(Serialize, Deserialize)]
struct HandoverTrailer {
    /// The last ReadIndex confirmation round the old instance sent: the new one numbers its
    /// rounds above it, so a late answer to an old round never confirms a new read.
    read_round: u64,
    /// A rejoiner whose fence completed: the log start it must apply up to before it votes.
    fenced_log_start: Option<u64>,
}

/// The version of `HandoverTrailer` this build writes.
const HANDOVER_TRAILER_VERSION: u8 = 1;
/// The version of the second hand-over trailer (after `HandoverTrailer`): the leader's
/// `PhaseOneState`. Without it (a hand-over from a build before membership changes) a leader
/// asks every voter for its promise again before it proposes further.
const PHASE_ONE_TRAILER_VERSION: u8 = 1;

/// Without a trailer (a hand-over from an older build), rounds restart above
/// `now_ms * READ_ROUNDS_PER_MS_MAX`: a build sends at most one round per step, and no host
/// steps a million times per millisecond.
const READ_ROUNDS_PER_MS_MAX: u64 = 1 << 20;

/// A leader that has not heard from a majority (itself included) for this long steps down
/// (CheckQuorum): followers' stickiness then lapses, and one of them can be elected.
pub const CHECK_QUORUM_MS: u64 = ELECTION_TIMEOUT_MIN_MS;
/// The leader probes every peer this often with a `ReadConfirm` whose round is
/// `CHECK_QUORUM_PROBE_BIT | sent_ms` (every build's acceptor echoes the round; the read path
/// ignores such rounds). A peer counts as heard only through the echo of a probe sent within
/// `CHECK_QUORUM_MS`: a message it sent long ago and that arrives late (a slow link, a deaf
/// leader's backlog) proves nothing about now.
pub const CHECK_QUORUM_PROBE_MS: u64 = 100;
/// A leader with slots in flight that has chosen nothing for this long steps down: its probes
/// may be answered while its accepts are lost (a gray failure: large messages dropped, a
/// queue stuck), and followers stay sticky to it for as long as it looks alive.
pub const COMMIT_STALL_MS: u64 = 2_000;
/// Marks a `ReadConfirm` round as a CheckQuorum probe carrying its send time.
pub const CHECK_QUORUM_PROBE_BIT: u64 = 1 << 63;

/// A replica.
#[derive(Debug)]
pub struct Replica {
    config: Config,
    now_ms: u64,
    started: bool,
    /// The acceptor role.
    pub acceptor: Acceptor,
    /// The proposer role.
    pub proposer: Proposer,
    /// The learner role and state machine.
    pub learner: Learner,
    pending: BTreeMap<u64, Pending>,
    to_forward: Vec<ClientCommand>,
    to_announce: Vec<(u64, Value)>,
    local: VecDeque<(Role, Message)>,
    effects: Vec<Effect>,
    last_catchup_ms: Option<u64>,
    /// False while a replica that lost its disk catches up (its acceptor stays silent).
    voting: bool,
    last_heartbeat_ms: Option<u64>,
    /// The fence that earns a replica that lost its disk its vote back, and epoch opening.
    rejoin: Rejoin,
    /// The old rule's state (planted bug `bug-rejoin-early`; carried through hand-overs).
    early_rejoin: EarlyRejoin,
    /// Per peer, the send time of the latest CheckQuorum probe it answered.
    heard_ms: BTreeMap<NodeId, u64>,
    /// Since when this replica leads (CheckQuorum gives a new leader one timeout of grace).
    leading_since_ms: Option<u64>,
    /// When this leader last chose a slot or had none in flight (`COMMIT_STALL_MS`).
    commit_progress_ms: Option<u64>,
    /// When the leader last probed its acceptors (CheckQuorum).
    probed_ms: Option<u64>,
    /// The pre-vote in progress, if any (volatile: a restart or a swap just asks again).
    pre_vote: Option<PreVote>,
    incoming_snapshot: Option<IncomingSnapshot>,
    snapshot_sent_ms: BTreeMap<NodeId, u64>,
    /// The membership revision last told to the host (`Effect::Members`).
    announced_members: Option<u64>,
    /// Size of the last snapshot taken, to size the next one's buffer.
    last_snapshot_bytes: std::cell::Cell<usize>,
    /// Linearizable reads waiting at the leader (ReadIndex), its own and followers' asks.
    reads: Reads,
    /// Linearizable reads waiting at this replica as a follower (follower ReadIndex).
    follower_reads: FollowerReads,
    /// This disk once rejoined: its log (or the snapshot that covers the start of it) said "not
    /// voting" at some point (`staging::replay_records`).
    disk_rejoined: bool,
}

impl Replica {
    /// Starts from an optional snapshot and the records persisted after it.
    pub fn start(config: Config, snapshot: Option<&[u8]>, wal: &[Vec<u8>]) -> Result<Self, String> {
        if cfg!(feature = "test-trap-on-start") {
            panic!("this build traps in start (test-trap-on-start)");
        }
        if !config.members.iter().any(|m| m.id == config.me) {
            let ids: Vec<NodeId> = config.members.iter().map(|m| m.id).collect();
            return Err(format!("node {} is not in the roster {ids:?}", config.me));
        }
        let initial_members = Membership::initial(config.members.clone())?;
        // A replica that rejoins (its host lost its state at some point) does not vote unless its
        // own log says it earned the vote back: a crash before its first record must not bring
        // it back as a voter with no memory of its promises.
        let voting = !config.rejoining;
        let mut replica = Replica {
            proposer: Proposer::new(config.me, roster_ids(&config), config.seed, 0),
            config,
            now_ms: 0,
            started: false,
            acceptor: Acceptor::default(),
            learner: Learner { membership: initial_members, ..Learner::default() },
            pending: BTreeMap::new(),
            to_forward: Vec::new(),
            to_announce: Vec::new(),
            local: VecDeque::new(),
            effects: Vec::new(),
            last_catchup_ms: None,
            voting,
            last_heartbeat_ms: None,
            rejoin: Rejoin::default(),
            early_rejoin: EarlyRejoin::default(),
            heard_ms: BTreeMap::new(),
            leading_since_ms: None,
            commit_progress_ms: None,
            probed_ms: None,
            pre_vote: None,
            incoming_snapshot: None,
            snapshot_sent_ms: BTreeMap::new(),
            last_snapshot_bytes: std::cell::Cell::new(0),
            reads: Reads::default(),
            follower_reads: FollowerReads::default(),
            announced_members: None,
            disk_rejoined: false,
        };
        // Whether this disk once rejoined: its log (or the snapshot that covers the start of it)
        // said "not voting" at some point.
        let mut rejoined_before = false;
        if let Some(backed_up) = snapshot.and_then(crate::backup::requested) {
            // A restore (`backup`): only the state machine and its slot come along.
            let (state, _old_members, _) = decode_snapshot(backed_up).map_err(|e| format!("backup refused: {e}"))?;
            crate::backup::check_slot(state.next_apply)?;
            crate::backup::install(
                &mut replica.learner,
                &mut replica.acceptor,
                state.next_apply,
                state.kv.into_owned(),
            );
        } else if let Some(bytes) = snapshot {
            let (state, membership, trailer) = decode_snapshot(bytes).map_err(|e| format!("snapshot refused: {e}"))?;
            if let Some(membership) = membership {
                replica.learner.membership.replace_with(membership);
            }
            replica.acceptor.promised = state.promised;
            replica.acceptor.accepted = state.accepted.into_owned();
            replica.acceptor.log_start = state.acceptor_log_start;
            replica.learner.chosen = state.chosen.into_owned();
            replica.learner.log_start = state.learner_log_start;
            replica.learner.next_apply = state.next_apply;
            replica.learner.kv = state.kv.into_owned();
            replica.learner.kv.rebuild_index();
            replica.learner.recount_applied_bytes();
            replica.voting = state.voting;
            rejoined_before = !state.voting && !cfg!(feature = "bug-snapshot-forgets-rejoin");
            if let Some(v) = state.volatile {
                let now_ms = v.now_ms;
                let (read_round, fenced_log_start, rest) =
                    match message::decode_with_rest::<HandoverTrailer>(HANDOVER_TRAILER_VERSION, trailer) {
                        Ok((t, rest)) => (t.read_round, t.fenced_log_start, rest),
                        Err(_) => (now_ms.saturating_mul(READ_ROUNDS_PER_MS_MAX), None, &[][..]),
                    };
                let phase_one =
                    message::decode_up_to::<PhaseOneState>(PHASE_ONE_TRAILER_VERSION, rest).unwrap_or_default();
                replica.take_over(v, HandoverTrailer { read_round, fenced_log_start }, phase_one);
            }
        }
        replica.disk_rejoined = rejoined_before;
        replica.replay_records(wal)?;
        if wal.is_empty() && snapshot.is_none() {
            // The first record of a new log: whether this replica votes. A data dir with a roster
            // but no record at all has lost its log (or never voted), and its host rejoins it.
            replica.persist(&Record::Voting(replica.voting));
        }
        replica.settle();
        replica.log(format!(
            "started: promised {}, {} accepted slots, applied up to {}, {} keys",
            replica.acceptor.promised,
            replica.acceptor.accepted.len(),
            replica.learner.next_apply,
            replica.learner.kv.data.len()
        ));
        Ok(replica)
    }

    /// Everything durable, versioned; with `handover`, also the volatile state a hot-swapped
    /// build needs to continue without a pause.
    pub fn snapshot(&self, handover: bool) -> Vec<u8> {
        let volatile = handover.then(|| self.volatile());
        // The last snapshot's size, or (none taken yet) a guess from the number of keys.
        let hint = self.last_snapshot_bytes.get().max(self.learner.kv.data.len() * 64);
        let bytes = message::encode_with_capacity(
            message::SNAPSHOT_VERSION,
            &SnapshotState {
                promised: self.acceptor.promised,
                accepted: Cow::Borrowed(&self.acceptor.accepted),
                acceptor_log_start: self.acceptor.log_start,
                chosen: Cow::Borrowed(&self.learner.chosen),
                learner_log_start: self.learner.log_start,
                next_apply: self.learner.next_apply,
                kv: Cow::Borrowed(&self.learner.kv),
                voting: self.voting,
                volatile,
            },
            hint + hint / 8,
        );
        let mut bytes = bytes;
        if message::SNAPSHOT_VERSION >= 3 {
            bytes.extend(self.learner.membership.encode());
        }
        if handover {
            let trailer = self.handover_trailer();
            bytes.extend(message::encode_as(HANDOVER_TRAILER_VERSION, &trailer));
            bytes.extend(message::encode_as(PHASE_ONE_TRAILER_VERSION, &self.proposer.phase_one));
        }
        self.last_snapshot_bytes.set(bytes.len());
        bytes
    }

    /// Takes the effects produced so far (start-up logs).
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// One step: handle `events` in order, then run timers and propose what is queued.
    pub fn step(&mut self, now_ms: u64, events: Vec<Event>) -> Vec<Effect> {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.started {
            // The first deadline counts from the first step, not from whenever the host's clock
            // started: a restarted replica must not disturb a healthy leader at once.
            self.started = true;
            self.follower_reads = FollowerReads::new(self.instance_nonce());
            self.proposer = Proposer::new(self.config.me, roster_ids(&self.config), self.config.seed, self.now_ms);
            self.proposer.observe(self.acceptor.promised);
            if let Some(slot) = self.learner.highest_chosen() {
                self.proposer.note_chosen(slot);
            }
            self.derive_open_epoch();
        }
        for event in events {
            match event {
                Event::Request(request) => self.on_request(request),
                Event::Message(envelope) => self.on_envelope(envelope),
                Event::Tick => {}
            }
            self.drain_local();
        }
        self.rejoin_on_time();
        self.check_quorum();
        self.catch_up_if_leaderless();
        let mut out = Vec::new();
        if self.voting && self.votes_now() && self.proposer.election_due(self.now_ms) {
            if cfg!(feature = "bug-no-pre-vote") {
                // Planted bug (simulator test builds only): no pre-vote.
                if self.proposer.epoch_unopened() {
                    self.proposer.defer_election(self.now_ms);
                    self.elect_or_open_epoch();
                }
            } else {
                // A candidate whose prepares were all lost (found by the simulator: one stuck
                // for 20 s, deaf to the live leader's lower ballot) asks again as a follower.
                self.proposer.abandon_candidacy(self.now_ms);
                self.proposer.defer_election(self.now_ms);
                self.start_pre_vote();
            }
        } else if !self.votes_now() && self.proposer.election_due(self.now_ms) {
            // Not a voter at the first unapplied slot (a learner, one promoted for later
            // slots, a removed member): it never stands (the simulator found a learner winning
            // elections without a pre-vote, again and again, and standing down each time).
            self.proposer.abandon_candidacy(self.now_ms);
            self.proposer.defer_election(self.now_ms);
        }
        if self.voting {
            // A replica that cannot vote cannot lead either: it only follows.
            self.proposer.on_time(self.now_ms, &self.learner, &mut out);
        }
        self.dispatch(out);
        self.drain_local();
        self.resend_pending();
        let mut out = Vec::new();
        self.proposer.flush(self.now_ms, &self.learner, &mut out);
        self.dispatch(out);
        self.drain_local();
        self.stand_down_if_leaving();
        self.flush_forward();
        self.announce_chosen();
        self.confirm_reads();
        self.serve_follower_reads();
        std::mem::take(&mut self.effects)
    }

    /// Distinct for every instance of this replica (crash restart, hot swap), with overwhelming
    /// probability: the seed differs per host process, and within one the clock, the applied
    /// slot or the ballot seen move on between two instances. Follower reads tag their asks
    /// with it.
    fn instance_nonce(&self) -> u64 {
        let mut rng = crate::rng::Rng::new(self.config.seed ^ 0x5245_4144_494e_4458);
        let mixed = rng.next_u64() ^ self.now_ms;
        let mut rng = crate::rng::Rng::new(mixed ^ self.learner.next_apply.rotate_left(21));
        let mixed = rng.next_u64() ^ self.proposer.max_seen.round.rotate_left(42) ^ self.pending.len() as u64;
        crate::rng::Rng::new(mixed).next_u64()
    }

    /// Follower ReadIndex: reads that waited too long go through the log, an ask goes to the
    /// leader when reads need one, reads whose index is applied are answered here.
    fn serve_follower_reads(&mut self) {
        if self.follower_reads.is_empty() {
            return;
        }
        let leader = self.proposer.known_leader().filter(|&l| l != self.config.me);
        if self.proposer.is_leader() || leader.is_none() {
            // Leading now (the leader's own path serves them), or no leader to ask: the log.
            for read in self.follower_reads.take_all() {
                self.follower_read_through_log(read);
            }
            return;
        }
        for read in self.follower_reads.expired(self.now_ms) {
            self.follower_read_through_log(read);
        }
        if let Some(leader) = leader {
            if let Some((nonce, ask)) = self.follower_reads.ask_to_send(leader, self.now_ms) {
                self.send(leader, Role::Proposer, Message::ReadIndex { nonce, ask });
            }
        }
        for read in self.follower_reads.ready(self.learner.next_apply) {
            let outcome = self.learner.kv.read(read.client, read.seq, &read.key);
            self.effects.push(Effect::Reply(read.request_id, outcome));
        }
    }

    fn follower_read_through_log(&mut self, read: FollowerRead) {
        let entry =
            self.get_through_log_entry(read.request_id, read.client, read.seq, &read.key, read.since_ms, self.now_ms);
        self.send_through_log(entry);
    }

    /// The highest epoch known open after a restart or a hot swap (the proposer does not carry
    /// it): the epochs of ballots that won phase 1 — our own while we lead or stand as a
    /// candidate (counted up only in an open epoch), the leader's, every accepted one.
    fn derive_open_epoch(&mut self) {
        let mut epoch = self.proposer.ballot.epoch();
        if let Some((_, b)) = self.proposer.leader {
            epoch = epoch.max(b.epoch());
        }
        if let Some(b) = self.acceptor.accepted.values().map(|(b, _)| *b).max() {
            epoch = epoch.max(b.epoch());
        }
        self.proposer.open_epoch(epoch);
    }

    /// Starts a fence one epoch above everything seen (`rejoin`): to earn this replica's vote
    /// back (`adopt`), or, voting, to open an epoch an election can count rounds in.
    fn start_fence(&mut self, adopt: bool) {
        let epoch = self.proposer.max_seen.epoch().max(self.acceptor.promised.epoch()) + 1;
        let mut out = Vec::new();
        // Every voter of every configuration known: the fence must meet a quorum of each
        // (`rejoin::fence_complete`).
        let members: Vec<NodeId> = self.learner.membership.all_voters().into_iter().collect();
        // A fresh nonce per attempt (see `Message::Fence`): a wiped replica's clock and seed
        // differ from its earlier life's when it fences again.
        let nonce = crate::rng::Rng::new(self.instance_nonce() ^ self.now_ms.rotate_left(17) ^ epoch).next_u64();
        let ballot = self.rejoin.start_fence(self.config.me, &members, epoch, adopt, nonce, self.now_ms, &mut out);
        // Remembered (and handed over with the proposer): a new fence goes above this one.
        self.proposer.observe(ballot);
        self.log(format!(
            "fence {ballot} sent: {}",
            if adopt {
                "this replica lost its disk and votes only once fenced"
            } else {
                "opening an epoch to elect in"
            }
        ));
        self.dispatch(out);
    }

    /// The election timer ran out: ask the others first (`prevote`).
    fn start_pre_vote(&mut self) {
        let ballot = Ballot { round: self.proposer.max_seen.round + 1, node: self.config.me };
        let mut out = Vec::new();
        let pre_vote = PreVote::start(self.config.me, &self.voters_now(), ballot, &mut out);
        self.dispatch(out);
        if pre_vote.won(self.learner.membership.at(self.learner.next_apply).quorum()) {
            self.pre_vote = None;
            self.elect_or_open_epoch();
        } else {
            self.pre_vote = Some(pre_vote);
        }
    }

    /// A majority agrees there is no live leader: run phase 1, or first open an epoch when the
    /// highest ballot seen is of one no fence is known to have opened (counting rounds up in
    /// it could collide with a rejoiner's fence: `rejoin`).
    fn elect_or_open_epoch(&mut self) {
        // A leader heard from since the pre-vote began (its yeses may predate that leader):
        // raising our ballot now would only make our acceptor refuse it.
        if self.proposer.is_leader() || !self.voting || self.leader_is_alive(self.config.me) {
            return;
        }
        if self.proposer.epoch_unopened() {
            if !self.rejoin.fencing() {
                self.start_fence(false);
            }
            return;
        }
        let mut out = Vec::new();
        self.proposer.start_election(self.now_ms, self.learner.next_apply, &mut out);
        self.dispatch(out);
    }

    /// Fence timers, and a fenced rejoiner's catch-up: it votes once applied to the fence's
    /// log start.
    fn rejoin_on_time(&mut self) {
        if cfg!(feature = "bug-rejoin-early") {
            return;
        }
        if !self.voting && self.rejoin.fence_due(self.now_ms) {
            self.start_fence(true);
        }
        let mut out = Vec::new();
        let members: Vec<NodeId> = self.learner.membership.all_voters().into_iter().collect();
        let leader_epoch = self.proposer.leader.map(|(_, b)| b.epoch());
        self.rejoin.on_time(self.config.me, &members, leader_epoch, self.now_ms, &mut out);
        self.dispatch(out);
        if let Some(log_start) = self.rejoin.catching_up_to() {
            if self.learner.next_apply >= log_start
                && !self.rejoin.fence_still_holds(self.config.me, &self.learner.membership)
            {
                // Caught up, it learned of a configuration its fence's answers do not meet a
                // quorum of (it fenced against an older roster): fence again, against it too.
                self.rejoin.caught_up();
                self.log(format!(
                    "applied up to slot {}: the fence's answers meet no quorum of a configuration learned meanwhile; fencing again",
                    self.learner.next_apply
                ));
                self.start_fence(true);
            } else if self.learner.next_apply >= log_start {
                self.rejoin.caught_up();
                if log_start > self.acceptor.log_start {
                    // Caught up past the fence's log start (to a membership change it adopted):
                    // every slot below is chosen and applied here, and a candidate behind it
                    // must catch up first, as after a restart.
                    self.acceptor.forget_below(self.learner.next_apply);
                }
                self.voting = true;
                self.persist(&Record::Voting(true));
                self.log(format!("fenced and applied up to slot {}: voting again", self.learner.next_apply));
            } else if self.rejoin.catch_up_due(self.now_ms, CATCHUP_INTERVAL_MS) {
                // Anyone who applied past the log start can serve it: the leader if known,
                // otherwise each peer in turn.
                let peers = self.peers_now();
                let ask = self.proposer.known_leader().filter(|&l| l != self.config.me).or_else(|| {
                    let turn = (self.now_ms / CATCHUP_INTERVAL_MS) as usize;
                    peers.get(turn % peers.len().max(1)).copied()
                });
                if let Some(peer) = ask {
                    self.last_catchup_ms = Some(self.now_ms);
                    self.send(peer, Role::Learner, Message::CatchUp { from_slot: self.catch_up_from() });
                }
            }
        }
    }

    /// A fence completed: promise its ballot; a rejoiner adopts what the fence reported and
    /// will vote once caught up; the epoch is announced open.
    fn finish_fence(&mut self, done: FenceDone) {
        if done.ballot > self.acceptor.promised {
            self.acceptor.promised = done.ballot;
            self.persist(&Record::Promised(done.ballot));
        }
        if done.adopt {
            self.acceptor.forget_below(done.log_start);
            let mut adopted = 0;
            for (slot, (ballot, value)) in done.adopted {
                let newer = self.acceptor.accepted.get(&slot).is_none_or(|(have, _)| *have < ballot);
                if newer && slot >= self.acceptor.log_start {
                    self.persist(&Record::Accepted { slot, ballot, value: value.clone() });
                    self.acceptor.accepted.insert(slot, (ballot, value));
                    adopted += 1;
                }
            }
            self.log(format!(
                "fence {} complete: promised it, adopted {adopted} accepted slots from slot {}; voting once applied up to slot {}",
                done.ballot, done.log_start, done.catch_up_to
            ));
        } else {
            self.log(format!("fence {} complete: epoch {} is open", done.ballot, done.ballot.epoch()));
        }
        self.proposer.open_epoch(done.ballot.epoch());
        self.proposer.yield_to(done.ballot, self.now_ms);
    }

    /// CheckQuorum: a leader that has not heard from a majority (itself included) within
    /// `CHECK_QUORUM_MS` steps down (issue 11, bug B: a leader that can send but not receive
    /// kept every follower sticky for ever). Followers ack heartbeats; silent peers are probed.
    fn check_quorum(&mut self) {
        if !self.proposer.is_leader() {
            self.leading_since_ms = None;
            self.commit_progress_ms = None;
            return;
        }
        let now = self.now_ms;
        let since = *self.leading_since_ms.get_or_insert(now);
        if self.proposer.in_flight.is_empty() {
            self.commit_progress_ms = Some(now);
        }
        let progress = *self.commit_progress_ms.get_or_insert(now);
        if now >= progress + COMMIT_STALL_MS && !cfg!(feature = "bug-no-check-quorum") {
            self.proposer.stand_down(now);
            self.commit_progress_ms = None;
            self.log(format!("chose nothing for {COMMIT_STALL_MS} ms with slots in flight: no longer leading"));
            return;
        }
        if self.probed_ms.is_none_or(|t| now >= t + CHECK_QUORUM_PROBE_MS) {
            self.probed_ms = Some(now);
            let probe = Message::ReadConfirm { ballot: self.proposer.ballot, round: CHECK_QUORUM_PROBE_BIT | now };
            let me = self.config.me;
            for m in self.learner.membership.all_voters() {
                if m != me {
                    self.send(m, Role::Acceptor, probe.clone());
                }
            }
        }
        if cfg!(feature = "bug-no-check-quorum") || now < since + CHECK_QUORUM_MS {
            return;
        }
        let me = self.config.me;
        let heard = |m: NodeId| m == me || self.heard_ms.get(&m).is_some_and(|&t| now < t + CHECK_QUORUM_MS);
        if !self.learner.membership.quorum_in_every(heard) {
            let voters = self.learner.membership.all_voters();
            let count = voters.iter().filter(|&&m| heard(m)).count();
            self.proposer.stand_down(now);
            self.log(format!(
                "heard from {count} of {} voters within {CHECK_QUORUM_MS} ms: no longer leading (CheckQuorum)",
                voters.len()
            ));
        }
    }

    /// ReadIndex at the leader: falls back to the log for reads that cannot be confirmed under
    /// the current ballot, broadcasts a confirmation round for new reads, answers those ready.
    fn confirm_reads(&mut self) {
        self.reads_follow_ballot();
        if self.reads.is_empty() {
            return;
        }
        for read in self.reads.expired(self.now_ms) {
            self.read_through_log(read);
        }
        if let Some(round) = self.reads.round_to_send(&self.learner.membership, self.now_ms) {
            let ballot = self.proposer.ballot;
            self.broadcast(Role::Acceptor, Message::ReadConfirm { ballot, round }, true);
            self.drain_local();
        }
        self.answer_ready_reads();
    }

    /// Reads wait under the ballot this replica leads with; those waiting under another one (or
    /// when it no longer leads) cannot be confirmed and go through the log.
    fn reads_follow_ballot(&mut self) {
        let leading = self.proposer.is_leader() && self.voting;
        if leading && self.reads.ballot() == self.proposer.ballot {
            return;
        }
        for read in self.reads.reset(self.proposer.ballot) {
            self.read_through_log(read);
        }
    }

    fn answer_ready_reads(&mut self) {
        // A follower's ask needs only the confirmation, not the index applied here: the follower
        // waits for its own learner.
        let floor = self.proposer.read_floor(&self.learner.membership);
        for read in self.reads.ready(&self.learner.membership, self.learner.next_apply, floor) {
            match read.remote {
                Some(RemoteAsk { node, nonce, ask }) => {
                    self.send(node, Role::Proposer, Message::ReadIndexed { nonce, ask, index: read.index })
                }
                None => {
                    let outcome = self.learner.kv.read(read.client, read.seq, &read.key);
                    self.effects.push(Effect::Reply(read.request_id, outcome));
                }
            }
        }
    }

    /// The pending entry of a read (the leader's or a follower's) that goes through the log
    /// after all.
    fn get_through_log_entry(
        &self,
        request_id: u64,
        client: u64,
        seq: u64,
        key: &str,
        since_ms: u64,
        sent_ms: u64,
    ) -> Pending {
        let command =
            ClientCommand { origin: self.config.me, request_id, client, seq, command: Command::Get(key.to_string()) };
        Pending { command, submitted_ms: since_ms, sent_ms }
    }

    /// Keeps `entry` pending until applied and hands its command to the leader.
    fn send_through_log(&mut self, entry: Pending) {
        let command = entry.command.clone();
        self.pending.insert(command.request_id, entry);
        self.route(command);
    }

    fn read_through_log(&mut self, read: WaitingRead) {
        if read.remote.is_some() {
            // A follower's ask that cannot be confirmed here: the follower asks again or falls
            // back to the log itself.
            return;
        }
        let entry =
            self.get_through_log_entry(read.request_id, read.client, read.seq, &read.key, read.since_ms, self.now_ms);
        self.send_through_log(entry);
    }

    fn log(&mut self, line: String) {
        self.effects.push(Effect::Log(line));
    }

    fn persist(&mut self, record: &Record) {
        self.effects.push(Effect::Persist(message::encode(record)));
    }

    /// A record that may be lost in a crash: what it says can be learned again from peers.
    fn persist_lazily(&mut self, record: &Record) {
        self.effects.push(Effect::PersistLazy(message::encode(record)));
    }

    /// Whether a message to this replica itself goes out through the host (and comes back in a
    /// later step) instead of being handled within this step. The leader's accept to its own
    /// acceptor does: the acceptor's record would otherwise hold the accepts to every other
    /// acceptor behind an fsync, when the two can overlap.
    fn loops_through_host(msg: &Message) -> bool {
        matches!(msg, Message::Accept { .. })
    }

    fn dispatch(&mut self, out: Vec<Outgoing>) {
        for (dst, role, msg) in out {
            if dst == EVERY_MEMBER {
                self.broadcast(role, msg, true);
            } else {
                self.send(dst, role, msg);
            }
        }
    }

    /// Sends `msg` to every member it is for (`recipients`; and to this replica when
    /// `include_me` and it is one of them), encoding it once: accept and chosen batches are the
    /// largest messages, sent to everyone every slot.
    fn broadcast(&mut self, role: Role, msg: Message, include_me: bool) {
        let me = self.config.me;
        let payload = message::encode(&msg);
        for dst in self.recipients(&msg) {
            if dst != me || (include_me && Self::loops_through_host(&msg)) {
                let envelope = Envelope { src: me, dst, role, payload: payload.clone() };
                self.effects.push(Effect::Send(envelope));
            } else if include_me {
                self.local.push_back((role, msg.clone()));
            }
        }
    }

    fn send(&mut self, dst: NodeId, role: Role, msg: Message) {
        if dst == self.config.me && !Self::loops_through_host(&msg) {
            self.local.push_back((role, msg));
        } else {
            let payload = message::encode(&msg);
            self.effects.push(Effect::Send(Envelope { src: self.config.me, dst, role, payload }));
        }
    }

    fn drain_local(&mut self) {
        while let Some((role, msg)) = self.local.pop_front() {
            self.handle(self.config.me, role, msg);
        }
    }

    fn on_request(&mut self, request: Request) {
        if let Some(reason) = self.removed_reason() {
            self.effects.push(Effect::Reply(request.id, Outcome::Rejected(reason)));
            return;
        }
        if let Command::ChangeMembers(change) = &request.command {
            self.log(format!("membership change asked for: {change}"));
            self.on_log_request(request);
            return;
        }
        let key = request.command.key();
        let problem = if key.is_empty() {
            Some("key must not be empty".to_string())
        } else if key.len() > KEY_BYTES_MAX {
            Some(format!("key is {} bytes; the limit is {KEY_BYTES_MAX}", key.len()))
        } else if let Command::Put(_, value) = &request.command {
            (value.len() > VALUE_BYTES_MAX)
                .then(|| format!("value is {} bytes; the limit is {VALUE_BYTES_MAX}", value.len()))
        } else {
            None
        };
        if let Some(problem) = problem {
            self.effects.push(Effect::Reply(request.id, Outcome::Rejected(problem)));
            return;
        }
        if self.config.test_hooks {
            if key == TEST_TRAP_KEY {
                panic!("test hook: trap requested by key {TEST_TRAP_KEY}");
            }
            if key == TEST_LOOP_KEY {
                #[allow(clippy::empty_loop)]
                loop {}
            }
        }
        if let Command::GetStale(key) = &request.command {
            let outcome = self.learner.kv.read(request.client, request.seq, key);
            self.effects.push(Effect::Reply(request.id, outcome));
            return;
        }
        if self.pending.len() + self.reads.len() + self.follower_reads.len() >= PENDING_MAX {
            let reason = format!("overloaded: {PENDING_MAX} requests already waiting at this replica");
            self.effects.push(Effect::Reply(request.id, Outcome::Rejected(reason)));
            return;
        }
        if let Command::Get(key) = request.command {
            if self.proposer.is_leader() && self.voting {
                self.reads_follow_ballot();
                let index = self.proposer.next_slot;
                self.reads.add(request.id, request.client, request.seq, key, index, self.now_ms);
                return;
            }
            if self.proposer.known_leader().is_some_and(|l| l != self.config.me) {
                self.follower_reads.add(request.id, request.client, request.seq, key, self.now_ms);
                return;
            }
            self.on_log_request(Request { command: Command::Get(key), ..request });
            return;
        }
        self.on_log_request(request);
    }

    /// A request that goes through the log: kept in `pending` until applied.
    fn on_log_request(&mut self, request: Request) {
        let command = ClientCommand {
            origin: self.config.me,
            request_id: request.id,
            client: request.client,
            seq: request.seq,
            command: request.command,
        };
        self.pending
            .insert(request.id, Pending { command: command.clone(), submitted_ms: self.now_ms, sent_ms: self.now_ms });
        self.route(command);
    }

    /// Hands a command of ours to the leader: queued here when we lead, forwarded when another
    /// replica does, held in `pending` while no leader is known.
    fn route(&mut self, command: ClientCommand) {
        if self.proposer.is_leader() {
            for refused in self.proposer.enqueue(vec![command]) {
                self.pending.remove(&refused.request_id);
                let reason = "overloaded: the leader's queue is full".to_string();
                self.effects.push(Effect::Reply(refused.request_id, Outcome::Rejected(reason)));
            }
        } else if self.proposer.known_leader().is_some() {
            self.to_forward.push(command);
        }
    }

    fn flush_forward(&mut self) {
        if self.to_forward.is_empty() {
            return;
        }
        let commands = std::mem::take(&mut self.to_forward);
        if let Some(leader) = self.proposer.known_leader() {
            self.send(leader, Role::Proposer, Message::Forward { commands });
            self.drain_local();
        }
    }

    fn resend_pending(&mut self) {
        let now = self.now_ms;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.submitted_ms + crate::replica::PENDING_EXPIRE_MS)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.pending.remove(&id);
            let reason = "timed out waiting for a quorum".to_string();
            self.effects.push(Effect::Reply(id, Outcome::Rejected(reason)));
        }
        let due: Vec<ClientCommand> = self
            .pending
            .values_mut()
            .filter(|p| now >= p.sent_ms + PENDING_RESEND_MS)
            .map(|p| {
                p.sent_ms = now;
                p.command.clone()
            })
            .collect();
        for command in due {
            self.route(command);
        }
    }

    /// The leader changed: every pending request goes to the new one.
    fn reroute_all_pending(&mut self) {
        let now = self.now_ms;
        let all: Vec<ClientCommand> = self
            .pending
            .values_mut()
            .map(|p| {
                p.sent_ms = now;
                p.command.clone()
            })
            .collect();
        for command in all {
            self.route(command);
        }
    }

    fn on_envelope(&mut self, envelope: Envelope) {
        if envelope.dst != self.config.me {
            self.log(format!("dropped a message for node {} (this is node {})", envelope.dst, self.config.me));
            return;
        }
        // Our own messages come back through the host (see `loops_through_host`); the host
        // refuses envelopes that claim our id from anywhere else.
        if !self.learner.membership.knows(envelope.src) {
            self.log(format!("dropped a message from unknown node {}", envelope.src));
            return;
        }
        let msg: Message = match message::decode(&envelope.payload) {
            Ok(msg) => msg,
            Err(e @ (DecodeError::Empty | DecodeError::Malformed(_) | DecodeError::NewerVersion { .. })) => {
                self.log(format!("dropped an undecodable message from node {}: {e}", envelope.src));
                return;
            }
        };
        if role_of(&msg) != envelope.role {
            self.log(format!("dropped a message from node {} labelled for the wrong role", envelope.src));
            return;
        }
        self.handle(envelope.src, envelope.role, msg);
    }

    fn handle(&mut self, src: NodeId, _role: Role, msg: Message) {
        match msg {
            Message::Prepare { ballot, first_slot } => {
                if !self.voting || self.leader_is_alive(src) {
                    return;
                }
                self.proposer.observe(ballot);
                let (reply, record) = self.acceptor.on_prepare(ballot, first_slot);
                if let Some(record) = record {
                    self.persist(&record);
                    self.proposer.yield_to(self.acceptor.promised, self.now_ms);
                }
                self.send(src, Role::Proposer, reply);
            }
            Message::Fence { ballot, nonce } => {
                // No stickiness here: a rejoiner must be able to fence while a leader lives.
                if !self.voting {
                    return;
                }
                self.proposer.observe(ballot);
                let (reply, record) = self.acceptor.on_fence(ballot, nonce);
                if let Some(record) = record {
                    self.persist(&record);
                    if self.proposer.yield_to(self.acceptor.promised, self.now_ms) {
                        self.log(format!("our acceptor promised fence {ballot} of node {src}: no longer leading"));
                    }
                }
                self.send(src, Role::Proposer, reply);
            }
            Message::Fenced { ballot, nonce, accepted, log_start } => {
                if let Some(done) = self.rejoin.on_fenced(
                    self.config.me,
                    &self.learner.membership,
                    src,
                    ballot,
                    nonce,
                    accepted,
                    log_start,
                ) {
                    self.finish_fence(done);
                }
            }
            // Being heard from (noted above) is all an ack says.
            Message::HeartbeatAck { .. } => {}
            Message::PreVote { ballot } => {
                if self.voting && !self.leader_is_alive(src) {
                    self.send(src, Role::Proposer, Message::PreVoteGranted { ballot });
                }
            }
            Message::PreVoteGranted { ballot } => {
                let config = self.learner.membership.at(self.learner.next_apply);
                let (quorum, counts) = (config.quorum(), config.is_voter(src));
                if counts && self.pre_vote.as_mut().is_some_and(|p| p.on_granted(src, ballot, quorum)) {
                    self.pre_vote = None;
                    self.elect_or_open_epoch();
                }
            }
            Message::EpochOpened { ballot } => {
                self.proposer.observe(ballot);
                self.proposer.open_epoch(ballot.epoch());
            }
            Message::Forgotten { ballot, slot, below } => {
                // Slots below `below` are chosen and applied at `src`: learn them from it
                // rather than wait for accepts it will never give.
                let due = self.last_catchup_ms.is_none_or(|t| self.now_ms >= t + CATCHUP_INTERVAL_MS);
                if below > self.learner.next_apply && due {
                    self.log(format!(
                        "node {src} forgot slot {slot} (accept at {ballot}): it applied up to {below}, we up to {}; catching up from it",
                        self.learner.next_apply
                    ));
                    self.last_catchup_ms = Some(self.now_ms);
                    self.send(src, Role::Learner, Message::CatchUp { from_slot: self.catch_up_from() });
                }
            }
            Message::Accept { ballot, slot, value } => {
                self.proposer.observe(ballot);
                // Only a leader sends accepts: its ballot won phase 1, its epoch is open.
                self.proposer.open_epoch(ballot.epoch());
                if !self.voting {
                    return;
                }
                let (reply, record) = self.acceptor.on_accept(ballot, slot, value);
                if let Some(record) = record {
                    self.persist(&record);
                }
                if let Some(reply) = reply {
                    self.send(src, Role::Proposer, reply);
                }
            }
            Message::Promise { ballot, accepted, log_start } => {
                let mut out = Vec::new();
                let outcome = self.proposer.on_promise(
                    src,
                    Promise { ballot, accepted, log_start },
                    self.now_ms,
                    &self.learner,
                    &mut out,
                );
                self.dispatch(out);
                if let PhaseOne::Behind(ahead) = outcome {
                    self.log(format!(
                        "ballot {ballot} won, but node {ahead} forgot slots this replica has not \
                         applied (it applied up to {}): catching up from it instead of leading",
                        self.learner.next_apply
                    ));
                    self.last_catchup_ms = Some(self.now_ms);
                    self.send(ahead, Role::Learner, Message::CatchUp { from_slot: self.catch_up_from() });
                }
                if outcome == PhaseOne::Won {
                    self.log(format!("node {} leads with ballot {}", self.config.me, ballot));
                    self.reroute_all_pending();
                }
            }
            Message::Accepted { ballot, slot } => {
                if let Some((slot, value)) = self.proposer.on_accepted(src, ballot, slot, &self.learner.membership) {
                    self.commit_progress_ms = Some(self.now_ms);
                    self.to_announce.push((slot, value.clone()));
                    self.learn(slot, value);
                }
            }
            Message::Nack { ballot, promised } => {
                if self.proposer.on_nack(ballot, promised, self.now_ms) {
                    self.log(format!("ballot {ballot} lost to {promised}: following"));
                }
                let backoff_ms = self.proposer.random_delay_ms(crate::rejoin::FENCE_RESEND_MS);
                match self.rejoin.on_nack(ballot, self.now_ms, backoff_ms) {
                    Some(true) => {
                        self.log(format!(
                            "fence {ballot} refused by node {src} (promised {promised}): fencing higher in {backoff_ms} ms"
                        ));
                    }
                    Some(false) => {
                        // Another replica is opening an epoch too: back off for a random election
                        // timeout, as a candidate that lost does (no duel of fences).
                        self.proposer.defer_election(self.now_ms);
                        self.log(format!("fence {ballot} refused by node {src} (promised {promised}): backing off"));
                    }
                    None => {}
                }
            }
            Message::Heartbeat { ballot, chosen_upto } => {
                let before = self.proposer.known_leader();
                // A leader below our acceptor's promise cannot count on our vote, and our next
                // answer to it deposes it: following its (possibly late) heartbeats would only
                // keep this replica sticky to a leader that cannot commit.
                let below_our_promise = ballot < self.acceptor.promised && !self.proposer.is_leader();
                if !below_our_promise && self.proposer.on_heartbeat(src, ballot, self.now_ms) {
                    self.last_heartbeat_ms = Some(self.now_ms);
                    // A leader exists after all: a pre-vote in progress is moot.
                    self.pre_vote = None;
                    if before != Some(src) {
                        self.log(format!("following node {src} (ballot {ballot})"));
                        self.reroute_all_pending();
                    }
                    if cfg!(feature = "bug-rejoin-early") {
                        self.check_rejoined_early(chosen_upto);
                    }
                    let receiving = self
                        .incoming_snapshot
                        .as_ref()
                        .is_some_and(|s| self.now_ms < s.started_ms + SNAPSHOT_RESEND_MS);
                    let due = !receiving && self.last_catchup_ms.is_none_or(|t| self.now_ms >= t + CATCHUP_INTERVAL_MS);
                    if chosen_upto > self.learner.next_apply && due {
                        self.last_catchup_ms = Some(self.now_ms);
                        self.send(src, Role::Learner, Message::CatchUp { from_slot: self.catch_up_from() });
                    }
                }
            }
            Message::Forward { commands } => {
                if self.proposer.is_leader() {
                    // What does not fit is dropped: its origin sends it again.
                    let _ = self.proposer.enqueue(commands);
                }
            }
            Message::Chosen { entries } => {
                for (slot, value) in entries {
                    self.learn(slot, value);
                }
            }
            Message::CatchUp { from_slot: crate::message::SNAPSHOT_WANTED } => self.send_snapshot(src),
            Message::CatchUp { from_slot } => {
                match self.learner.chosen_from(from_slot, CATCHUP_SLOTS_MAX, CATCHUP_BYTES_MAX) {
                    Some(entries) => {
                        if !entries.is_empty() {
                            self.send(src, Role::Learner, Message::Chosen { entries });
                        }
                    }
                    None => self.send_snapshot(src),
                }
            }
            Message::SnapshotChunk { next_apply, offset, total, bytes } => {
                self.on_snapshot_chunk(src, next_apply, offset, total, bytes)
            }
            Message::ReadConfirm { ballot, round } => {
                // No higher promise now: no other leader can have chosen anything yet. A higher
                // one deposes the asking leader at once, as a refused accept would. (Round 0 is
                // the leader's CheckQuorum probe; answered the same way.)
                if !self.voting {
                    return;
                }
                self.proposer.open_epoch(ballot.epoch());
                if self.acceptor.promised <= ballot {
                    self.send(src, Role::Proposer, Message::ReadConfirmed { ballot, round });
                } else {
                    self.send(src, Role::Proposer, Message::Nack { ballot, promised: self.acceptor.promised });
                }
            }
            // Round 0 answers a CheckQuorum probe: being heard from is all it says.
            Message::ReadConfirmed { ballot, round } if round & CHECK_QUORUM_PROBE_BIT != 0 => {
                // A CheckQuorum probe's echo: the peer heard us at or after the probe was sent.
                let sent_ms = round & !CHECK_QUORUM_PROBE_BIT;
                if ballot == self.proposer.ballot && sent_ms <= self.now_ms && src != self.config.me {
                    let heard = self.heard_ms.entry(src).or_insert(0);
                    *heard = (*heard).max(sent_ms);
                }
            }
            Message::ReadConfirmed { round: 0, .. } => {}
            Message::ReadConfirmed { ballot, round } => self.reads.on_confirmed(src, ballot, round),
            Message::ReadIndex { nonce, ask } => {
                // Only a leader has a read index to give; a follower that asked the wrong
                // replica asks again or falls back to the log.
                if self.proposer.is_leader() && self.voting && src != self.config.me {
                    self.reads_follow_ballot();
                    let index = self.proposer.next_slot;
                    self.reads.add_remote(RemoteAsk { node: src, nonce, ask }, index, self.now_ms);
                }
            }
            Message::ReadIndexed { nonce, ask, index } => self.follower_reads.on_answer(nonce, ask, index),
        }
    }

    /// Records a chosen value and applies what is now in order, answering our own requests.
    fn learn(&mut self, slot: u64, value: Value) {
        if !self.learner.learn(slot, value.clone()) {
            return;
        }
        // Lazily: the value is already durable on a majority of acceptors (that is what chosen
        // means), so the reply need not wait for this record, and a crash that loses it only
        // means learning the slot again from a peer.
        // Write the value once: when our acceptor holds it, name the accept instead of copying it.
        let record = match self.acceptor.accepted.get(&slot) {
            Some((ballot, accepted)) if *accepted == value => Record::ChosenAccepted { slot, ballot: *ballot },
            _ => Record::Chosen { slot, value },
        };
        self.persist_lazily(&record);
        self.proposer.note_chosen(slot);
        self.apply_ready();
    }

    /// Applies what is ready, answers our own requests, and drops what no peer needs anymore.
    fn apply_ready(&mut self) {
        for (cmd, outcome) in self.learner.apply_ready() {
            if cmd.origin != self.config.me {
                continue;
            }
            // The very command pending, not just its (client, seq): after a host restart its
            // request ids start over, and an earlier life's command with the same id and pair
            // but another operation may still be applied (the state machine refuses the
            // second of two commands sharing a pair; each gets its own answer).
            let ours = self.pending.get(&cmd.request_id).is_some_and(|p| p.command == cmd);
            if ours {
                self.pending.remove(&cmd.request_id);
                self.effects.push(Effect::Reply(cmd.request_id, outcome));
            }
        }
        self.announce_members_if_changed();
        self.refuse_all_if_removed();
        self.trim_log();
    }

    /// Whether a leader other than `candidate` was heard from within the minimum election
    /// timeout (or this replica leads). Prepares from other replicas are then ignored, so a
    /// replica that was cut off and comes back with a high ballot cannot depose a healthy
    /// leader (leader stickiness, as in Raft's pre-vote). Safety does not depend on it.
    fn leader_is_alive(&self, candidate: NodeId) -> bool {
        if self.proposer.is_leader() {
            return candidate != self.config.me;
        }
        match (self.proposer.known_leader(), self.last_heartbeat_ms) {
            (Some(leader), Some(heard)) => leader != candidate && self.now_ms < heard + ELECTION_TIMEOUT_MIN_MS,
            _ => false,
        }
    }

    /// Keeps `retain_slots` applied slots (a quarter more before trimming, to trim rarely).
    ///
    /// The acceptor keeps far less: accepted values of applied slots matter only to a candidate
    /// that has not applied them, and such a candidate learns from the promise's `log_start`
    /// that it must catch up (from a learner's retained log) before it can lead. Keeping only
    /// the pipelining window halves the state a snapshot or a hot swap carries.
    fn trim_log(&mut self) {
        let retain = self.config.retain_slots.max(1);
        let next = self.learner.next_apply;
        if next > self.learner.log_start + retain + retain / 4 {
            self.learner.forget_below(next - retain);
        }
        if self.learner.applied_bytes > RETAIN_BYTES_MAX {
            // Large values: keep three quarters of the byte bound (to trim rarely); a peer
            // further behind gets a snapshot, as for slots.
            let keep_from = self.learner.keep_from_for_bytes(RETAIN_BYTES_MAX / 4 * 3);
            self.learner.forget_below(keep_from);
        }
        let keep = (ACCEPTOR_RETAIN_SLOTS).min(retain);
        if next > self.acceptor.log_start + keep + keep / 4 {
            self.acceptor.forget_below(next - keep);
        }
    }

    /// The rule issue 11 replaced (planted bug `bug-rejoin-early`): vote again once applied
    /// what the leader had chosen when first heard from, and two election timeouts passed.
    fn check_rejoined_early(&mut self, chosen_upto: u64) {
        if self.voting {
            return;
        }
        let (applied, now) = (self.learner.next_apply, self.now_ms);
        if self.early_rejoin.ready(applied, chosen_upto, now, 2 * ELECTION_TIMEOUT_MAX_MS) {
            self.voting = true;
            // Never below what the current leader uses.
            self.acceptor.promised = self.acceptor.promised.max(self.proposer.max_seen);
            self.persist(&Record::Promised(self.acceptor.promised));
            self.persist(&Record::Voting(true));
            self.log(format!("caught up to slot {}: voting again", self.learner.next_apply));
        }
    }

    fn announce_chosen(&mut self) {
        if self.to_announce.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.to_announce);
        self.broadcast(Role::Learner, Message::Chosen { entries }, false);
    }

    /// A JSON object describing this replica.
    pub fn status(&self) -> String {
        let role = match self.proposer.phase {
            Phase::Leader => "leader",
            Phase::Candidate { .. } => "candidate",
            Phase::Follower => "follower",
        };
        let leader = self.proposer.known_leader().map_or("null".to_string(), |l| l.to_string());
        format!(
            "{{\"version\":\"{}\",\"me\":{},\"role\":\"{role}\",\"leader\":{leader},\"ballot\":\"{}\",\"promised\":\"{}\",\"first_unchosen\":{},\"highest_chosen\":{},\"next_slot\":{},\"applied\":{},\"keys\":{},\"pending\":{},\"voting\":{},\"log_start\":{},\"voters\":{:?},\"learners\":{:?}}}",
            guest_version(),
            self.config.me,
            self.proposer.max_seen,
            self.acceptor.promised,
            self.learner.next_apply,
            self.learner.highest_chosen().map_or("null".to_string(), |s| s.to_string()),
            self.proposer.next_slot,
            self.learner.next_apply,
            self.learner.kv.data.len(),
            self.pending.len(),
            self.voting,
            self.learner.log_start,
            self.voters_now(),
            self.learner.membership.at(self.learner.next_apply).members.iter().filter(|m| !m.voter).map(|m| m.id).collect::<Vec<_>>(),
        )
    }

    /// This replica's config.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// The ids of the roster a replica was started with (the proposer's hand-over format keeps them).
fn roster_ids(config: &Config) -> Vec<NodeId> {
    config.members.iter().map(|m| m.id).collect()
}

/// The role a message is addressed to (checked against the envelope's label).
pub fn role_of(msg: &Message) -> Role {
    match msg {
        Message::Prepare { .. } | Message::Accept { .. } | Message::ReadConfirm { .. } | Message::Fence { .. } => {
            Role::Acceptor
        }
        Message::Promise { .. }
        | Message::Accepted { .. }
        | Message::Nack { .. }
        | Message::Heartbeat { .. }
        | Message::Forward { .. }
        | Message::ReadConfirmed { .. }
        | Message::ReadIndex { .. }
        | Message::ReadIndexed { .. }
        | Message::Fenced { .. }
        | Message::EpochOpened { .. }
        | Message::Forgotten { .. }
        | Message::HeartbeatAck { .. }
        | Message::PreVote { .. }
        | Message::PreVoteGranted { .. } => Role::Proposer,
        Message::Chosen { .. } | Message::CatchUp { .. } | Message::SnapshotChunk { .. } => Role::Learner,
    }
}
