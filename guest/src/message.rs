//! The wire format of Paxos payloads between replicas, and of the records the guest persists.
//!
//! Every encoded message and record starts with a format version byte, then postcard. A build
//! reads every version up to its own and refuses newer ones with a clear error, so that mixed
//! builds can interoperate during a rolling upgrade.

use serde::{Deserialize, Serialize};

use crate::types::{Command, NodeId};

/// The format version this build writes.
pub const FORMAT_VERSION: u8 = 1;

/// A Paxos ballot: totally ordered by `(round, node)`, so two proposers never share one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    /// Increases with every election attempt.
    pub round: u64,
    /// The proposer that owns the ballot (tie-breaker).
    pub node: NodeId,
}

/// A ballot's epoch is its round shifted right by this many bits (`rejoin`): normal elections
/// count rounds within an epoch; only a completed fence opens a new one.
pub const EPOCH_SHIFT: u32 = 40;

impl Ballot {
    /// Below every real ballot.
    pub const ZERO: Ballot = Ballot { round: 0, node: 0 };

    /// The epoch (high bits of the round): see `rejoin`.
    pub fn epoch(self) -> u64 {
        self.round >> EPOCH_SHIFT
    }

    /// The fence ballot of `epoch` owned by `node`: the lowest ballot of that epoch for it,
    /// above every ballot of every lower epoch.
    pub fn fence(epoch: u64, node: NodeId) -> Ballot {
        Ballot { round: epoch << EPOCH_SHIFT, node }
    }
}

impl std::fmt::Display for Ballot {
    /// `round.node`; from epoch 1 on, `epoch:round-within-epoch.node` (`1:0.3` is node 3's
    /// fence of epoch 1), since the raw round is unreadable there.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.epoch() {
            0 => write!(f, "{}.{}", self.round, self.node),
            epoch => write!(f, "{epoch}:{}.{}", self.round & ((1 << EPOCH_SHIFT) - 1), self.node),
        }
    }
}

/// A client command as it travels through the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCommand {
    /// The replica whose host holds the waiting caller.
    pub origin: NodeId,
    /// The host-local request id at `origin`.
    pub request_id: u64,
    /// Client identity for exactly-once.
    pub client: u64,
    /// Client sequence number for exactly-once.
    pub seq: u64,
    /// What to do.
    pub command: Command,
}

/// What one log slot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// A gap filled by a new leader.
    Noop,
    /// Commands applied in order (batching: many per slot).
    Batch(Vec<ClientCommand>),
}

/// `CatchUp { from_slot: SNAPSHOT_WANTED }`: a member that joined a running cluster asks for a
/// snapshot, never the log from slot 0 — its first configuration is the cluster's of the day it
/// joined, so replaying the log from the cluster's first slot under it would not be the
/// history the others applied (an `Add` of itself refused as a duplicate, say).
pub const SNAPSHOT_WANTED: u64 = u64::MAX;

/// A Paxos message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Phase 1a, to acceptors: promise `ballot` for every slot from `first_slot` on.
    Prepare {
        /// The candidate's ballot.
        ballot: Ballot,
        /// The candidate's first unchosen slot.
        first_slot: u64,
    },
    /// Phase 1b, to the proposer: the promise and every value accepted from `first_slot` on.
    Promise {
        /// The ballot promised.
        ballot: Ballot,
        /// `(slot, accepted ballot, value)`.
        accepted: Vec<(u64, Ballot, Value)>,
        /// The acceptor forgot every slot below this one (all chosen and applied there): a
        /// candidate whose first unchosen slot is lower must catch up before it can lead.
        log_start: u64,
    },
    /// Phase 2a, to acceptors.
    Accept {
        /// The leader's ballot.
        ballot: Ballot,
        /// The log slot.
        slot: u64,
        /// The proposed value.
        value: Value,
    },
    /// Phase 2b, to the proposer.
    Accepted {
        /// The ballot accepted.
        ballot: Ballot,
        /// The slot.
        slot: u64,
    },
    /// An acceptor refused `ballot` because it promised a higher one.
    Nack {
        /// The refused ballot.
        ballot: Ballot,
        /// What the acceptor promised.
        promised: Ballot,
    },
    /// Leader liveness, to every proposer.
    Heartbeat {
        /// The leader's ballot.
        ballot: Ballot,
        /// Every slot below this is chosen at the leader.
        chosen_upto: u64,
    },
    /// Client commands a follower hands to the leader.
    Forward {
        /// Commands to propose.
        commands: Vec<ClientCommand>,
    },
    /// Chosen values, to learners.
    Chosen {
        /// `(slot, value)`.
        entries: Vec<(u64, Value)>,
    },
    /// A learner missing slots asks the leader for them.
    CatchUp {
        /// First slot it lacks; `SNAPSHOT_WANTED` asks for a snapshot (a joining member).
        from_slot: u64,
    },
    /// Part of a state-machine snapshot, for a learner whose missing slots were compacted away.
    /// Chunks are bounded in size, so no single message is large.
    SnapshotChunk {
        /// The snapshot's `next_apply` (identifies the transfer).
        next_apply: u64,
        /// Offset of `bytes` in the encoded `learner::AppState`.
        offset: u64,
        /// Total encoded size.
        total: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// ReadIndex, to acceptors (`reads`): say whether you promised a ballot above `ballot`.
    ReadConfirm {
        /// The leader's ballot.
        ballot: Ballot,
        /// The confirmation round.
        round: u64,
    },
    /// The acceptor promised nothing above `ballot` when round `round` reached it.
    ReadConfirmed {
        /// The leader's ballot.
        ballot: Ballot,
        /// The round confirmed.
        round: u64,
    },
    /// Follower ReadIndex (`follower_reads`), to the leader: what is your read index now?
    ReadIndex {
        /// The asking instance.
        nonce: u64,
        /// The ask number.
        ask: u64,
    },
    /// The leader's answer: confirmed as leader after the ask arrived; every slot it had
    /// proposed then lies below `index`.
    ReadIndexed {
        /// The asking instance.
        nonce: u64,
        /// The ask answered.
        ask: u64,
        /// The read index.
        index: u64,
    },
    /// A fence (`rejoin`), to acceptors: promise `ballot` if every ballot you promised is of a
    /// lower epoch, and report everything you accepted.
    Fence {
        /// The fence ballot: `Ballot::fence(epoch, sender)`.
        ballot: Ballot,
        /// Distinct per fence attempt of each life of the sender: a wiped replica fences with
        /// the same ballot its earlier life used, and that life's answers (duplicated or late)
        /// must not complete the new fence.
        nonce: u64,
    },
    /// The answer to a fence: `ballot` is promised (and persisted); like a phase-1b promise
    /// from slot 0.
    Fenced {
        /// The fence ballot promised.
        ballot: Ballot,
        /// The fence's nonce, echoed.
        nonce: u64,
        /// Every `(slot, accepted ballot, value)` the acceptor holds.
        accepted: Vec<(u64, Ballot, Value)>,
        /// The acceptor forgot every slot below this one (all chosen and applied there).
        log_start: u64,
    },
    /// A fence of `ballot`'s epoch completed: a majority promised it, so proposers may now run
    /// elections in that epoch (`rejoin`).
    EpochOpened {
        /// The completed fence's ballot.
        ballot: Ballot,
    },
    /// A follower heard the leader's heartbeat. No longer sent (CheckQuorum counts echoes of
    /// timestamped probes instead, which a late message cannot fake); kept so the variants after
    /// it keep their numbers.
    HeartbeatAck {
        /// The heartbeat's ballot.
        ballot: Ballot,
    },
    /// Pre-vote (`prevote`): would you take part in an election for `ballot`? (Nothing is
    /// promised.)
    PreVote {
        /// The ballot the asker's election would use.
        ballot: Ballot,
    },
    /// Yes to a pre-vote: no live leader heard within the minimum election timeout.
    PreVoteGranted {
        /// The pre-vote's ballot.
        ballot: Ballot,
    },
    /// An accept for `slot` reached an acceptor that already forgot every slot below `below`
    /// (they are chosen and applied there): the proposer must catch up from it.
    Forgotten {
        /// The refused accept's ballot.
        ballot: Ballot,
        /// The refused accept's slot.
        slot: u64,
        /// The acceptor's `log_start`.
        below: u64,
    },
}

/// A record of acceptor or learner state that must survive a crash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The acceptor promised this ballot.
    Promised(Ballot),
    /// The acceptor accepted `value` at `slot` under `ballot` (which implies a promise of it).
    Accepted {
        /// Slot.
        slot: u64,
        /// Ballot.
        ballot: Ballot,
        /// Value.
        value: Value,
    },
    /// The learner learned that `value` was chosen at `slot`.
    Chosen {
        /// Slot.
        slot: u64,
        /// Value.
        value: Value,
    },
    /// The learner installed a state-machine snapshot received from a peer (an encoded
    /// `learner::AppState`); every slot below its `next_apply` is applied.
    Installed(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Whether this replica's acceptor takes part in votes (false while a replica that lost its
    /// disk catches up: it could otherwise break promises it no longer remembers).
    Voting(bool),
    /// The learner learned that the value this replica's acceptor accepted at `slot` under
    /// `ballot` was chosen: a `Chosen` record without a second copy of the value, which the
    /// `Accepted` record before it in the log already holds (each value is written once).
    ChosenAccepted {
        /// Slot.
        slot: u64,
        /// The ballot of the `Accepted` record that holds the value.
        ballot: Ballot,
    },
}

/// Why bytes could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// No bytes at all.
    Empty,
    /// Written by a newer build than this one.
    NewerVersion {
        /// The version found.
        found: u8,
        /// The newest version this build reads.
        newest: u8,
    },
    /// Not a valid encoding.
    Malformed(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty payload"),
            DecodeError::NewerVersion { found, newest } => write!(
                f,
                "format version {found} is newer than this build reads (up to {newest}): it needs a newer guest build"
            ),
            DecodeError::Malformed(e) => write!(f, "malformed payload: {e}"),
        }
    }
}

/// The snapshot format version this build writes, and the newest it reads (a test-only feature
/// writes a newer one, to check that an older build refuses it). Version 3: version 2's state
/// followed by the membership (`membership::Membership::encode`). Version 2: client sessions
/// carry a fingerprint of their command (`kv::Session`); versions 1 and 2 are read and migrated
/// (their builds never changed members: the start's roster is their membership).
#[cfg(not(feature = "test-snapshot-v3"))]
pub const SNAPSHOT_VERSION: u8 = 3;
/// The snapshot format version this build writes (test-only, feature `test-snapshot-v3`, named
/// for when 3 was the next number: the layout of the current version under the number 4, which
/// the normal build refuses as newer).
#[cfg(feature = "test-snapshot-v3")]
pub const SNAPSHOT_VERSION: u8 = 4;

/// Encodes a value behind the format version byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_as(FORMAT_VERSION, value)
}

/// Encodes a value behind the given format version byte.
pub fn encode_as<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    encode_with_capacity(version, value, 64)
}

/// Encodes into a buffer of `capacity` bytes to start with: a snapshot's size is known roughly
/// from the last one, and growing a multi-megabyte buffer by doubling copies it again and again.
pub fn encode_with_capacity<T: Serialize>(version: u8, value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity.max(1));
    out.push(version);
    // postcard into a Vec cannot fail for these types (no maps with non-string keys, no I/O).
    postcard::to_extend(value, out).unwrap_or_default()
}

/// Decodes what `encode` wrote.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_up_to(FORMAT_VERSION, bytes)
}

/// Decodes what `encode_as` wrote with a version up to `newest`, and returns the bytes after
/// it (a trailer that older builds ignore).
pub fn decode_with_rest<T: for<'de> Deserialize<'de>>(newest: u8, bytes: &[u8]) -> Result<(T, &[u8]), DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version > newest {
        return Err(DecodeError::NewerVersion { found: version, newest });
    }
    postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// Decodes what `encode_as` wrote with a version up to `newest`.
pub fn decode_up_to<T: for<'de> Deserialize<'de>>(newest: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version > newest {
        return Err(DecodeError::NewerVersion { found: version, newest });
    }
    postcard::from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}
