//! Pre-vote (Raft dissertation §9.6): a replica whose election timer ran out first asks the
//! others whether they would take part in an election, and raises its ballot (phase 1) only
//! with a majority's yes.
//!
//! Why: a replica that merely missed some heartbeats (a lossy link, a pause) would otherwise
//! start phase 1 with a higher ballot. The others ignore it while they hear the leader (leader
//! stickiness), but its own acceptor promises that ballot — durably — and, once it follows the
//! leader again, refuses the leader's next accept: a healthy leader deposed (issue 11,
//! suspicion 1). A replica grants a pre-vote only when it has not heard a live leader within
//! the minimum election timeout (the same test as stickiness), and a pre-vote changes no
//! durable state, so nothing is promised until a majority agrees there is no leader. Safety
//! never depends on it: it only decides when phase 1 starts.

use std::collections::BTreeSet;

use crate::message::{Ballot, Message};
use crate::proposer::Outgoing;
use crate::types::{NodeId, Role};

/// One pre-vote round in progress.
#[derive(Clone, Debug)]
pub struct PreVote {
    /// The ballot the election would use (it names the round; nothing is promised).
    ballot: Ballot,
    /// Who said yes, this replica included.
    grants: BTreeSet<NodeId>,
}

impl PreVote {
    /// Asks every other member; this replica says yes to itself.
    pub fn start(me: NodeId, members: &[NodeId], ballot: Ballot, out: &mut Vec<Outgoing>) -> PreVote {
        for &m in members {
            if m != me {
                out.push((m, Role::Proposer, Message::PreVote { ballot }));
            }
        }
        PreVote { ballot, grants: BTreeSet::from([me]) }
    }

    /// A yes from `src`; true once `quorum` members said yes.
    pub fn on_granted(&mut self, src: NodeId, ballot: Ballot, quorum: usize) -> bool {
        if ballot == self.ballot {
            self.grants.insert(src);
        }
        self.won(quorum)
    }

    /// True once `quorum` members said yes.
    pub fn won(&self, quorum: usize) -> bool {
        self.grants.len() >= quorum
    }
}
