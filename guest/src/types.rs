//! Native mirrors of the WIT types (`wit/waxos.wit`).
//!
//! The Paxos roles work on these plain Rust types so that they know nothing of WIT and run
//! natively in tests; `lib.rs` converts at the boundary.

use serde::{Deserialize, Serialize};

pub use crate::membership::{Member, MemberChange};

/// A replica's identity within the roster.
pub type NodeId = u32;

/// Which Paxos role a message is for; visible to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Phase-1/phase-2 answers, heartbeats, forwarded requests.
    Proposer,
    /// Prepare and accept requests.
    Acceptor,
    /// Chosen values and catch-up.
    Learner,
}

/// One message between replicas; the payload is `message::Message` encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Sender.
    pub src: NodeId,
    /// Receiver.
    pub dst: NodeId,
    /// Role at the receiver.
    pub role: Role,
    /// Encoded `message::Message`.
    pub payload: Vec<u8>,
}

/// A client's command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store `value` under `key`.
    Put(String, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Read `key` (linearizable).
    Get(String),
    /// Remove `key`.
    Delete(String),
    /// Read `key` from this replica's applied state as it is (serializable, possibly stale);
    /// never enters the log.
    GetStale(String),
    /// Change the members (an operator's command; `membership`).
    ChangeMembers(MemberChange),
}

impl Command {
    /// The key the command is about (none for a membership change).
    pub fn key(&self) -> &str {
        match self {
            Command::Put(k, _) | Command::Get(k) | Command::Delete(k) | Command::GetStale(k) => k,
            Command::ChangeMembers(_) => "",
        }
    }

    /// True for the reads.
    pub fn is_read(&self) -> bool {
        matches!(self, Command::Get(_) | Command::GetStale(_))
    }
}

/// A client request handed to this replica by its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Host-local id, named again by the `Reply` effect.
    pub id: u64,
    /// The client's identity (0: anonymous, no retry deduplication).
    pub client: u64,
    /// The client's sequence number; a retry reuses it.
    pub seq: u64,
    /// What to do.
    pub command: Command,
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A get's answer.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// A put applied.
    Done,
    /// A delete applied; true when the key existed.
    Removed(bool),
    /// Try another replica (the leader, when known).
    Redirect(Option<NodeId>),
    /// Refused, with the reason.
    Rejected(String),
    /// A membership change applied; the member it was about (an added one's new id).
    Member(NodeId),
}

/// Something that happened since the last step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A client request.
    Request(Request),
    /// A peer's message.
    Message(Envelope),
    /// Time passed.
    Tick,
}

/// Something the guest wants the host to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send after this step's persists are durable.
    Send(Envelope),
    /// Answer request `id` after this step's persists are durable.
    Reply(u64, Outcome),
    /// Append to the write-ahead log; durable before this step's sends and replies.
    Persist(Vec<u8>),
    /// Append to the write-ahead log; durable with a later step's `Persist` (a crash may lose it).
    PersistLazy(Vec<u8>),
    /// A debug line for the host's log.
    Log(String),
    /// The members this replica knows now (`Membership::known_members`): sent at start and
    /// whenever they change, so the host knows whom to connect to and accept.
    Members(Vec<Member>),
}

/// Fixed at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This replica.
    pub me: NodeId,
    /// The configuration to start with when no snapshot names one: the first start's roster
    /// (all voters), or, for a host that joins a running cluster, the members as a member told
    /// it (itself a learner). A snapshot's or a transferred state's membership replaces it.
    pub members: Vec<Member>,
    /// PRNG seed (election timeouts).
    pub seed: u64,
    /// Test-only commands enabled (trap / loop keys).
    pub test_hooks: bool,
    /// Applied slots kept to serve peers catching up; older ones are dropped (a peer further
    /// behind gets a snapshot).
    pub retain_slots: u64,
    /// This replica lost its durable state and rejoins: its acceptor stays out of votes until
    /// it has caught up with the leader.
    pub rejoining: bool,
}
