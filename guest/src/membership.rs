//! Membership: which replicas vote on which slot, and which only learn. Replicated state: it
//! changes only by a command chosen in the log (`MemberChange`), applied in slot order like any
//! other, and it travels with the state machine in snapshots and state transfers.
//!
//! # The window
//! A change chosen in slot `s` governs the slots from `s + ALPHA` on (Lamport's α, "Paxos Made
//! Simple" §3, and "Reconfiguring a State Machine", 2010): `config(t)`, the configuration of slot
//! `t`, is the initial one with every change chosen in a slot `<= t - ALPHA` applied in order.
//! A proposer sends phase 2a for slot `t` only once it applied every slot `<= t - ALPHA` (`t <
//! next_apply + ALPHA`), so it always knows `config(t)`, and the pipelining window is ALPHA
//! slots from the first unapplied one.
//!
//! # Why no two disjoint quorums ever exist
//! Paxos is safe per slot when every phase-1 quorum and every phase-2 quorum *of that slot*
//! intersect. Here:
//! 1. Every replica that knows `config(t)` knows the same one: it is a function of the chosen
//!    prefix below `t - ALPHA + 1`, which every learner applies in the same order.
//! 2. A leader proposes in slot `t` under ballot `b` only after a majority of
//!    `voters(config(t))` promised `b` for every slot from its first unapplied one on
//!    (`Proposer::covers`); a replica that promised late, after the leader already proposed in
//!    some slots, counts for the later slots only, and what it reports for them is adopted (the
//!    highest ballot wins, as in phase 1 itself).
//! 3. A value is chosen in `t` only by accepts from a majority of `voters(config(t))`.
//!
//! So all quorums of slot `t` are majorities of one set, and intersect: the single-decree
//! argument holds for each slot unchanged. Two disjoint quorums would need two configurations
//! for one slot, and (1) rules that out. None of it depends on who leads: a new leader's
//! phase 1 meets `config(t)`'s majority whenever it learned `config(t)`. Nor on crashes or swaps:
//! the configuration is derived from the applied log, snapshotted with the state machine (a
//! restart from a snapshot or a transferred state knows every `config(t)` for `t < next_apply +
//! ALPHA`), and handed over with it. Learners are in no `voters` set, so they are never counted.
//!
//! A leader that the window makes a non-voter stops proposing at the first slot it does not
//! vote on, waits for its slots in flight, and stands down; the remaining voters elect.
//! Node ids are never reused (`next_id` only grows), so a new member never inherits an old
//! acceptor's promises.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::types::{NodeId, Outcome};

/// α: a change chosen in slot `s` governs slots from `s + ALPHA`; the leader's pipelining
/// window is this many slots from the first one not applied.
pub const ALPHA: u64 = crate::proposer::WINDOW_SLOTS_MAX as u64;
/// Bound on members (voters and learners) of a configuration.
pub const MEMBERS_MAX: usize = 16;
/// Bound on a member's address (`host:port`).
pub const ADDRESS_BYTES_MAX: usize = 256;
/// The format version of the encoded membership (snapshots, state transfers).
pub const MEMBERSHIP_VERSION: u8 = 1;

/// One member of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// Its node id (never reused).
    pub id: NodeId,
    /// Where its host listens (`host:port`), as the operator gave it; empty when unknown (a
    /// test or a first start that named none).
    pub address: String,
    /// Votes (its acceptor is counted) or only learns.
    pub voter: bool,
}

impl Member {
    /// A voter with no address (tests, the simulator).
    pub fn voter(id: NodeId) -> Member {
        Member { id, address: String::new(), voter: true }
    }
}

/// Voters `ids`, no addresses (tests, the simulator).
pub fn voters(ids: &[NodeId]) -> Vec<Member> {
    ids.iter().map(|&id| Member::voter(id)).collect()
}

/// What an operator asks for (`Command::ChangeMembers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// A new member at `address`, as a learner; it gets the next node id.
    Add {
        /// `host:port` of the new member's host.
        address: String,
    },
    /// A learner becomes a voter.
    Promote(NodeId),
    /// A member leaves.
    Remove(NodeId),
}

impl std::fmt::Display for MemberChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberChange::Add { address } => write!(f, "add {address:?} as a learner"),
            MemberChange::Promote(id) => write!(f, "promote node {id}"),
            MemberChange::Remove(id) => write!(f, "remove node {id}"),
        }
    }
}

/// The members of one configuration, in id order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// Every member, in id order.
    pub members: Vec<Member>,
}

impl Configuration {
    /// The voters' ids.
    pub fn voters(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().filter(|m| m.voter).map(|m| m.id)
    }

    /// A majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters().count() / 2 + 1
    }

    /// Whether the voters for which `yes` holds are a majority.
    pub fn has_quorum(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        self.voters().filter(|&v| yes(v)).count() >= self.quorum()
    }

    /// Whether `id` votes in this configuration.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.members.iter().any(|m| m.id == id && m.voter)
    }

    /// Whether `id` is a member (voter or learner).
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    fn get_mut(&mut self, id: NodeId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Whether the configuration is one a replica can start from: members distinct, at least
    /// one voter, within the bounds.
    pub fn check(&self) -> Result<(), String> {
        let ids: BTreeSet<NodeId> = self.members.iter().map(|m| m.id).collect();
        if ids.len() != self.members.len() {
            return Err(format!("the configuration names a node twice: {self}"));
        }
        if self.voters().next().is_none() {
            return Err(format!("the configuration has no voter: {self}"));
        }
        if self.members.len() > MEMBERS_MAX {
            return Err(format!("the configuration has {} members; the limit is {MEMBERS_MAX}", self.members.len()));
        }
        Ok(())
    }
}

impl std::fmt::Display for Configuration {
    /// `voters [1, 2, 3], learners [4]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let voters: Vec<NodeId> = self.voters().collect();
        let learners: Vec<NodeId> = self.members.iter().filter(|m| !m.voter).map(|m| m.id).collect();
        write!(f, "voters {voters:?}, learners {learners:?}")
    }
}

/// The configurations that govern the slots from the first one not applied on: the one in
/// effect there, then any chosen to take effect later (at most ALPHA slots later).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Membership {
    /// `(first slot governed, configuration)`, ascending; the first entry governs every slot
    /// below the second's.
    configs: Vec<(u64, Configuration)>,
    /// The id the next added member gets.
    next_id: NodeId,
    /// Counts changes (applied or dropped configurations), so that the replica can tell its
    /// host when the members it knows change. Not replicated state.
    #[serde(skip)]
    revision: u64,
}

impl PartialEq for Membership {
    /// The same configurations and next id (the revision counts local changes only).
    fn eq(&self, other: &Membership) -> bool {
        self.configs == other.configs && self.next_id == other.next_id
    }
}

impl Eq for Membership {}

impl Default for Membership {
    /// No member at all (a learner's before it is given one): no quorum anywhere.
    fn default() -> Membership {
        Membership { configs: vec![(0, Configuration::default())], next_id: 1, revision: 0 }
    }
}

impl Membership {
    /// Takes `other`'s configurations (a transferred or restored state), as a change.
    pub fn replace_with(&mut self, other: Membership) {
        let revision = self.revision + 1;
        *self = Membership { revision, ..other };
    }

    /// The configuration a cluster starts with, governing from slot 0.
    pub fn initial(members: Vec<Member>) -> Result<Membership, String> {
        let mut members = members;
        members.sort();
        let config = Configuration { members };
        config.check()?;
        let next_id = config.members.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        Ok(Membership { configs: vec![(0, config)], next_id, revision: 0 })
    }

    /// The configuration of slot `slot` (known for every slot below `next_apply + ALPHA`).
    pub fn at(&self, slot: u64) -> &Configuration {
        let index = self.configs.partition_point(|(from, _)| *from <= slot);
        &self.configs[index.saturating_sub(1)].1
    }

    /// The newest configuration chosen (in effect or not yet).
    pub fn latest(&self) -> &Configuration {
        &self.configs[self.configs.len() - 1].1
    }

    /// The configurations that govern slots from the first unapplied one on, with the first
    /// slot each governs.
    pub fn governing(&self) -> impl Iterator<Item = (u64, &Configuration)> {
        self.configs.iter().map(|(from, c)| (*from, c))
    }

    /// The first slot from `slot` on where another configuration takes over, if one is chosen.
    pub fn next_change_after(&self, slot: u64) -> Option<u64> {
        self.configs.iter().map(|(from, _)| *from).find(|&from| from > slot)
    }

    /// Every member of every governing configuration: who messages may come from, and whom
    /// chosen values and heartbeats go to.
    pub fn everyone(&self) -> BTreeSet<NodeId> {
        self.configs.iter().flat_map(|(_, c)| c.members.iter().map(|m| m.id)).collect()
    }

    /// Whether `id` is a member of any governing configuration.
    pub fn knows(&self, id: NodeId) -> bool {
        self.configs.iter().any(|(_, c)| c.contains(id))
    }

    /// Every voter of every governing configuration: whom prepares and read confirmations go to.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.configs.iter().flat_map(|(_, c)| c.voters()).collect()
    }

    /// Whether `yes` holds for a majority of the voters of every governing configuration.
    pub fn quorum_in_every(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        self.configs.iter().all(|(_, c)| c.has_quorum(&yes))
    }

    /// The members as the host should know them: everyone governing, `voter` as the newest
    /// configuration that names them says, addresses as the newest says.
    pub fn known_members(&self) -> Vec<Member> {
        let mut known: Vec<Member> = Vec::new();
        for (_, config) in self.configs.iter().rev() {
            for member in &config.members {
                if !known.iter().any(|k| k.id == member.id) {
                    known.push(member.clone());
                }
            }
        }
        known.sort();
        known
    }

    /// Bumps with every change of what `known_members` or `at` may return.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Applies `change`, chosen in slot `slot`: it governs from `slot + ALPHA`. Refused (and
    /// nothing changes) when it does not make sense against the newest configuration.
    pub fn apply(&mut self, slot: u64, change: &MemberChange) -> Outcome {
        let mut config = self.latest().clone();
        let id = match change {
            MemberChange::Add { address } => {
                if address.is_empty() || address.len() > ADDRESS_BYTES_MAX {
                    return Outcome::Rejected(format!(
                        "membership: an address must be 1 to {ADDRESS_BYTES_MAX} bytes (host:port)"
                    ));
                }
                if let Some(m) = config.members.iter().find(|m| m.address == *address) {
                    return Outcome::Rejected(format!("membership: {address} is already node {}", m.id));
                }
                if config.members.len() >= MEMBERS_MAX {
                    return Outcome::Rejected(format!("membership: already {MEMBERS_MAX} members, the limit"));
                }
                let id = self.next_id;
                self.next_id += 1;
                config.members.push(Member { id, address: address.clone(), voter: false });
                config.members.sort();
                id
            }
            MemberChange::Promote(id) => match config.get_mut(*id) {
                Some(m) if !m.voter => {
                    m.voter = true;
                    *id
                }
                Some(_) => return Outcome::Rejected(format!("membership: node {id} is already a voter")),
                None => return Outcome::Rejected(format!("membership: node {id} is not a member")),
            },
            MemberChange::Remove(id) => {
                if !config.contains(*id) {
                    return Outcome::Rejected(format!("membership: node {id} is not a member"));
                }
                if config.is_voter(*id) && config.voters().count() == 1 {
                    return Outcome::Rejected(format!("membership: node {id} is the last voter"));
                }
                config.members.retain(|m| m.id != *id);
                *id
            }
        };
        // The planted bug: the new configuration governs the next slot at once, without the
        // window (slots proposed meanwhile under the old one get counted under the new one).
        let from = if cfg!(feature = "bug-reconfig-at-once") { slot + 1 } else { slot.saturating_add(ALPHA) };
        match self.configs.last_mut() {
            // Two changes within one window's reach of each other land in the same slot when
            // chosen in the same slot: the later one replaces the earlier's result.
            Some((last_from, last)) if *last_from == from => *last = config,
            _ => self.configs.push((from, config)),
        }
        self.revision += 1;
        Outcome::Member(id)
    }

    /// Drops configurations that govern no slot from `next_apply` on.
    pub fn forget_before(&mut self, next_apply: u64) {
        let superseded = self.configs.iter().take_while(|(from, _)| *from <= next_apply).count();
        if superseded > 1 {
            self.configs.drain(..superseded - 1);
            self.revision += 1;
        }
    }

    /// Encoded for a snapshot or a state transfer.
    pub fn encode(&self) -> Vec<u8> {
        crate::message::encode_as(MEMBERSHIP_VERSION, self)
    }

    /// Decodes what `encode` wrote, and checks it.
    pub fn decode(bytes: &[u8]) -> Result<(Membership, &[u8]), String> {
        let (membership, rest): (Membership, &[u8]) =
            crate::message::decode_with_rest(MEMBERSHIP_VERSION, bytes).map_err(|e| format!("membership: {e}"))?;
        if membership.configs.is_empty() {
            return Err("membership: no configuration".to_string());
        }
        if membership.configs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("membership: configurations out of slot order".to_string());
        }
        for (_, config) in &membership.configs {
            config.check()?;
        }
        Ok((membership, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five() -> Membership {
        Membership::initial(voters(&[1, 2, 3, 4, 5])).expect("valid")
    }

    #[test]
    fn a_change_governs_from_alpha_slots_after_its_own() {
        let mut m = five();
        assert_eq!(m.apply(10, &MemberChange::Add { address: "h6:1".into() }), Outcome::Member(6));
        assert!(!m.at(10 + ALPHA - 1).contains(6), "not before the window");
        assert!(m.at(10 + ALPHA).contains(6) && !m.at(10 + ALPHA).is_voter(6), "a learner from s + α");
        assert_eq!(m.at(0).quorum(), 3);
        assert_eq!(m.at(10 + ALPHA).quorum(), 3, "learners do not count");
        assert_eq!(m.apply(11, &MemberChange::Promote(6)), Outcome::Member(6));
        assert_eq!(m.at(11 + ALPHA).quorum(), 4);
        assert_eq!(m.next_change_after(0), Some(10 + ALPHA));
        m.forget_before(11 + ALPHA);
        assert_eq!(m.governing().count(), 1);
        assert!(m.at(0).is_voter(6), "the only configuration left governs everything from here");
    }

    #[test]
    fn nonsense_changes_are_refused_and_change_nothing() {
        let mut m = Membership::initial(voters(&[1])).expect("valid");
        let before = m.clone();
        for change in [
            MemberChange::Promote(1),
            MemberChange::Promote(9),
            MemberChange::Remove(9),
            MemberChange::Remove(1),
            MemberChange::Add { address: String::new() },
        ] {
            assert!(matches!(m.apply(5, &change), Outcome::Rejected(_)), "{change}");
        }
        assert_eq!(m, before);
        assert_eq!(m.apply(5, &MemberChange::Add { address: "a:1".into() }), Outcome::Member(2));
        assert!(matches!(m.apply(6, &MemberChange::Add { address: "a:1".into() }), Outcome::Rejected(_)));
    }

    #[test]
    fn ids_are_never_reused() {
        let mut m = five();
        assert_eq!(m.apply(1, &MemberChange::Remove(5)), Outcome::Member(5));
        assert_eq!(m.apply(2, &MemberChange::Add { address: "b:1".into() }), Outcome::Member(6));
    }

    #[test]
    fn changes_chosen_in_one_slot_land_together() {
        let mut m = five();
        m.apply(3, &MemberChange::Remove(4));
        m.apply(3, &MemberChange::Remove(5));
        assert_eq!(m.governing().count(), 2);
        assert_eq!(m.at(3 + ALPHA).voters().collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn encodes_and_refuses_a_corrupt_one() {
        let mut m = five();
        m.apply(1, &MemberChange::Add { address: "c:1".into() });
        let bytes = m.encode();
        let (back, rest) = Membership::decode(&bytes).expect("decodes");
        assert!(rest.is_empty());
        assert_eq!(back.known_members(), m.known_members());
        assert!(Membership::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
