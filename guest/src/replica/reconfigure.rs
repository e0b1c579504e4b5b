//! The replica's side of membership changes (`crate::membership` holds the rules): whom each
//! message goes to when the voters differ from slot to slot, who may vote and lead now, telling
//! the host when the members it knows change, a leader that is no longer a voter standing
//! down once its last slots are chosen, and a member that hears no leader asking the members it
//! knows to catch it up (the leader may be one it does not know yet).

use std::collections::BTreeSet;

use super::{Replica, CATCHUP_INTERVAL_MS};
use crate::message::Message;
use crate::proposer::ELECTION_TIMEOUT_MIN_MS;
use crate::types::{Effect, NodeId, Outcome, Role};

impl Replica {
    /// No live leader heard for an election timeout: the leader may be a member this replica
    /// does not know yet, added by a change it has not learned. Its messages are dropped here
    /// (and its host refuses the stream), so its heartbeats never say that this replica is
    /// behind, and nothing else would catch it up (the simulator found such a member stuck for
    /// good, its pre-votes refused by members that hear the leader). So ask a member known here,
    /// another one each time, as a rejoiner does; one that applied more answers with the
    /// chosen slots or a snapshot, and the change that added the leader comes with them.
    pub(super) fn catch_up_if_leaderless(&mut self) {
        let quiet_ms = ELECTION_TIMEOUT_MIN_MS;
        let due = self.last_catchup_ms.is_none_or(|t| self.now_ms >= t + quiet_ms.max(CATCHUP_INTERVAL_MS));
        let leaderless_for_long = self.last_heartbeat_ms.is_none_or(|t| self.now_ms >= t + quiet_ms);
        // A snapshot on its way is the catch-up: asking another member would only start a
        // second transfer and throw this one away (a review's break: N - 1 transfers per
        // resend period on an idle cluster).
        let receiving =
            self.incoming_snapshot.as_ref().is_some_and(|s| self.now_ms < s.started_ms + super::SNAPSHOT_RESEND_MS);
        if !self.voting
            || self.proposer.is_leader()
            || !leaderless_for_long
            || !due
            || receiving
            || self.now_ms < quiet_ms
        {
            return;
        }
        let peers = self.peers_now();
        if peers.is_empty() {
            return;
        }
        let peer = peers[(self.now_ms / quiet_ms) as usize % peers.len()];
        self.last_catchup_ms = Some(self.now_ms);
        self.send(peer, Role::Learner, Message::CatchUp { from_slot: self.catch_up_from() });
    }

    /// The voters of the configuration in effect at the first slot not applied: who runs
    /// pre-votes, elections and fences with whom, and whose majority CheckQuorum wants.
    pub(super) fn voters_now(&self) -> Vec<NodeId> {
        self.learner.membership.at(self.learner.next_apply).voters().collect()
    }

    /// Whether this replica votes at the first slot not applied (a learner or a removed
    /// member neither stands for election nor leads).
    pub(super) fn votes_now(&self) -> bool {
        self.learner.membership.at(self.learner.next_apply).is_voter(self.config.me)
    }

    /// Every member known but this one (learners included): whom to ask for catch-up.
    pub(super) fn peers_now(&self) -> Vec<NodeId> {
        self.learner.membership.everyone().into_iter().filter(|&m| m != self.config.me).collect()
    }

    /// Whom a message meant for every member goes to: an accept to the voters of its slot, a
    /// prepare or a read confirmation to the voters of every governing configuration, the rest
    /// (chosen values) to every member known, learners included.
    pub(super) fn recipients(&self, msg: &Message) -> BTreeSet<NodeId> {
        let membership = &self.learner.membership;
        match msg {
            Message::Accept { slot, .. } => membership.at(*slot).voters().collect(),
            Message::Prepare { .. } | Message::ReadConfirm { .. } => membership.all_voters(),
            _ => membership.everyone(),
        }
    }

    /// Tells the host the members this replica knows, at start and whenever they change.
    pub(super) fn announce_members_if_changed(&mut self) {
        let revision = self.learner.membership.revision();
        if self.announced_members == Some(revision) {
            return;
        }
        self.announced_members = Some(revision);
        let membership = &self.learner.membership;
        let mut line =
            format!("members at slot {}: {}", self.learner.next_apply, membership.at(self.learner.next_apply));
        for (from, config) in membership.governing().filter(|(from, _)| *from > self.learner.next_apply) {
            line.push_str(&format!("; from slot {from}: {config}"));
        }
        let members = membership.known_members();
        self.log(line);
        self.effects.push(Effect::Members(members));
    }

    /// Why a request cannot be served here, when this replica is no longer a member: the
    /// configuration in effect at its first unapplied slot does not name it. It learns nothing
    /// further (no member sends to it), so what waits here is refused with a reason the host
    /// maps to "retry another member" (the same `(client, seq)` there applies at most once).
    pub(super) fn removed_reason(&self) -> Option<String> {
        let next_apply = self.learner.next_apply;
        (!self.learner.membership.at(next_apply).contains(self.config.me)).then(|| {
            format!(
                "node {} is no longer a member (removed from slot {next_apply} on): retry another member",
                self.config.me
            )
        })
    }

    /// Refuses everything waiting here once this replica is removed (`removed_reason`).
    pub(super) fn refuse_all_if_removed(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Some(reason) = self.removed_reason() else {
            return;
        };
        self.log(format!("{reason}: refusing {} waiting requests", self.pending.len()));
        for (id, _) in std::mem::take(&mut self.pending) {
            self.effects.push(Effect::Reply(id, Outcome::Rejected(reason.clone())));
        }
    }

    /// A leader that does not vote at its next slot (removed or demoted by a change now in
    /// effect there) proposes nothing more; once its slots in flight are chosen it stands down,
    /// and the voters of the new configuration elect one of theirs.
    pub(super) fn stand_down_if_leaving(&mut self) {
        if self.proposer.leaving(&self.learner.membership) && self.proposer.in_flight.is_empty() {
            self.proposer.stand_down(self.now_ms);
            self.log(format!(
                "not a voter from slot {} on: no longer leading (the remaining voters elect)",
                self.proposer.next_slot
            ));
        }
    }
}
