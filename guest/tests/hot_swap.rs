//! Hand-over snapshots: what a hot swap gives the new build, and what a crash restart must not.

mod common;

use common::{get, put, Fate, Sim};
use waxos_guest::message::{self, Message};
use waxos_guest::replica::Replica;
use waxos_guest::types::{Envelope, NodeId, Outcome};

#[test]
fn handover_keeps_leadership_and_waiting_requests() {
    let mut sim = Sim::new(5, 31);
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 1, 1, put("a", "1")), Outcome::Done);
    // A request arrives and is in flight when the swap happens.
    let id = sim.request(leader, 1, 2, put("b", "2"));
    sim.tick();
    let config = sim.nodes[&leader].config().clone();
    let handover = sim.nodes[&leader].snapshot(true);
    let swapped = Replica::start(config, Some(&handover), &[]).expect("new build starts from the hand-over");
    assert!(swapped.proposer.is_leader(), "the new build leads on without an election");
    sim.nodes.insert(leader, swapped);
    assert!(sim.run_until(2_000, |s| s.replies.contains_key(&id)), "the waiting request was answered");
    assert_eq!(sim.replies[&id], Outcome::Done);
    assert_eq!(sim.leaders(), vec![leader], "no leader change");
}

#[test]
fn crash_snapshot_never_restores_leadership() {
    let mut sim = Sim::new(3, 37);
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 1, 1, put("a", "1")), Outcome::Done);
    let config = sim.nodes[&leader].config().clone();
    let durable = sim.nodes[&leader].snapshot(false);
    let restarted = Replica::start(config, Some(&durable), &[]).expect("restart");
    assert!(!restarted.proposer.is_leader(), "a crash restart must run phase 1 again");
    assert_eq!(restarted.learner.kv.data.get("a"), Some(&b"1".to_vec()));
}

/// ReadIndex (Raft dissertation §6.4): a read may be answered only after a majority confirmed
/// the leader's ballot in a round sent after the read arrived. A hot swap keeps the ballot, so
/// the new build must not number its rounds from 1 again: a confirmation of an old round
/// (delivered late) would then complete a new read. The scenario: a1's answer to a
/// read's round is delayed; l and a2 stall while the others elect l2, which overwrites k; l is
/// hot-swapped and resumes (a new instance gets one CheckQuorum timeout of grace, so it still
/// leads); a new read at l is confirmed by l and a2, and a1's old answer arrives.
#[test]
fn a_read_confirmation_from_before_a_hot_swap_never_confirms_a_read_after_it() {
    let mut sim = Sim::new(5, 43);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let l = sim.wait_for_leader();
    let others: Vec<NodeId> = (1..=5).filter(|&n| n != l).collect();
    let (a1, a2) = (others[0], others[1]);
    assert_eq!(sim.call(l, 1, 1, put("k", "old")), Outcome::Done);
    sim.run_for(200);
    let probe = waxos_guest::replica::CHECK_QUORUM_PROBE_BIT;
    sim.filter = Some(Box::new(move |env: &Envelope| match message::decode::<Message>(&env.payload) {
        Ok(Message::ReadConfirmed { round, .. })
            if round > 0 && round & probe == 0 && env.src == a1 && env.dst == l =>
        {
            Fate::Hold
        }
        _ => Fate::Deliver,
    }));
    assert_eq!(sim.call(l, 1, 2, get("k")), Outcome::Value(Some(b"old".to_vec())));
    assert_eq!(sim.held.len(), 1, "a1's confirmation is held back");
    sim.filter = None;
    sim.paused.extend([l, a2]);
    let rest: Vec<NodeId> = others.iter().copied().filter(|&n| n != a2).collect();
    sim.partition(&[l, a2], &rest);
    let l2 = loop {
        sim.tick();
        if let Some(&n) = sim.leaders().iter().find(|&&n| n != l && !sim.paused.contains(&n)) {
            break n;
        }
        assert!(sim.now_ms < 60_000, "no new leader");
    };
    assert_eq!(sim.call(l2, 2, 1, put("k", "new")), Outcome::Done);
    sim.hot_swap(l);
    // l resumes first (a2, resuming right after, finds l's heartbeat and round waiting).
    sim.paused.remove(&l);
    assert!(sim.nodes[&l].proposer.is_leader(), "l should still think it leads");
    let read = sim.request(l, 3, 1, get("k"));
    sim.tick();
    sim.paused.clear();
    sim.tick();
    sim.tick();
    // a1's answer from before the swap arrives now, after l and a2 confirmed the new round.
    assert_eq!(sim.release_held(|_| true), 1);
    sim.run_for(1_000);
    assert_ne!(sim.replies.get(&read), Some(&Outcome::Value(Some(b"old".to_vec()))), "stale read after a hot swap");
}

/// A hand-over written by a build before the read-state trailer (the same bytes without it)
/// is accepted: the new build leads on, answers reads, and numbers its confirmation rounds
/// above any the old one could have sent.
#[test]
fn a_handover_from_a_build_without_the_read_state_trailer_is_accepted() {
    let (mut sim, l, handover) = leader_handover(44);
    let (state, _membership, _read_trailer, phase_one) = split_handover(&sim, l, &handover);
    // A build of format 3 without the read-state trailer: state and membership only.
    let older = &handover[..handover.len() - phase_one.len() - read_trailer_of_one_read().len()];
    assert!(older.len() > state.len());
    let config = sim.nodes[&l].config().clone();
    let swapped = Replica::start(config, Some(older), &[]).expect("an older build's hand-over is accepted");
    assert!(swapped.proposer.is_leader());
    sim.nodes.insert(l, swapped);
    assert_eq!(sim.call(l, 1, 3, get("k")), Outcome::Value(Some(b"v".to_vec())));
    assert_eq!(sim.leaders(), vec![l], "no leader change");
}

/// A hand-over from a build before membership changes (snapshot format 2: no membership after
/// the state, no phase-one trailer after the read-state one) is accepted: the roster it was
/// started with is its membership, and the leader, which does not know who promised its
/// ballot, asks the voters again and leads on without an election.
#[test]
fn a_handover_from_a_build_before_membership_changes_is_accepted() {
    let (mut sim, l, handover) = leader_handover(45);
    let (state, _membership, read_trailer, _phase_one) = split_handover(&sim, l, &handover);
    let mut older = state.to_vec();
    older[0] = 2;
    older.extend_from_slice(read_trailer);
    let config = sim.nodes[&l].config().clone();
    let swapped = Replica::start(config, Some(&older), &[]).expect("a format-2 hand-over is accepted");
    assert!(swapped.proposer.is_leader());
    assert!(swapped.proposer.phase_one.promised_by.is_empty(), "who promised is not known");
    sim.nodes.insert(l, swapped);
    assert_eq!(sim.call(l, 1, 3, put("k", "w")), Outcome::Done);
    assert_eq!(sim.call(l, 1, 4, get("k")), Outcome::Value(Some(b"w".to_vec())));
    assert_eq!(sim.leaders(), vec![l], "no leader change");
    assert!(sim.nodes[&l].proposer.phase_one.promised_by.len() >= 3, "a majority promised again");
}

/// A five-replica cluster with one put applied and one read served by ReadIndex, and its
/// leader's hand-over.
fn leader_handover(seed: u64) -> (Sim, u32, Vec<u8>) {
    let mut sim = Sim::new(5, seed);
    let first = sim.wait_for_leader();
    assert_eq!(sim.call(first, 1, 1, put("k", "v")), Outcome::Done);
    sim.run_for(2_000);
    let l = sim.wait_for_leader();
    let slots = sim.nodes[&l].proposer.next_slot;
    assert_eq!(sim.call(l, 1, 2, get("k")), Outcome::Value(Some(b"v".to_vec())));
    assert_eq!(sim.nodes[&l].proposer.next_slot, slots, "the read took the ReadIndex path");
    let handover = sim.nodes[&l].snapshot(true);
    (sim, l, handover)
}

/// This build's read-state trailer after one read: version 1, read round 1, no fence.
fn read_trailer_of_one_read() -> Vec<u8> {
    message::encode_as(1, &(1u64, None::<u64>))
}

/// A hand-over's parts: state, membership, read-state trailer, phase-one trailer.
fn split_handover<'h>(sim: &Sim, l: u32, handover: &'h [u8]) -> (&'h [u8], &'h [u8], &'h [u8], &'h [u8]) {
    let phase_one = message::encode_as(1, &sim.nodes[&l].proposer.phase_one);
    let read = read_trailer_of_one_read();
    let membership = sim.nodes[&l].learner.membership.encode();
    assert!(handover.ends_with(&phase_one), "the phase-one trailer is the last bytes");
    let rest = &handover[..handover.len() - phase_one.len()];
    assert!(rest.ends_with(&read), "the read-state trailer comes before it");
    let rest = &rest[..rest.len() - read.len()];
    assert!(rest.ends_with(&membership), "the membership comes after the state");
    let state_len = rest.len() - membership.len();
    let (state, tail) = handover.split_at(state_len);
    let (membership, tail) = tail.split_at(membership.len());
    let (read, phase_one) = tail.split_at(read.len());
    (state, membership, read, phase_one)
}

/// A hand-over written by the build before session fingerprints (snapshot format 1, from a
/// one-replica cluster with a put in flight: `fixtures/README.md`) is accepted: the write in
/// flight is answered, and the sessions it carries keep exactly-once.
#[test]
fn a_handover_of_format_1_from_a_build_before_session_fingerprints_is_accepted() {
    let handover: &[u8] = include_bytes!("fixtures/v1-handover.bin");
    assert_eq!(handover[0], 1, "the fixture is of format 1");
    let config = waxos_guest::types::Config {
        me: 1,
        members: waxos_guest::membership::voters(&[1]),
        seed: 7,
        test_hooks: false,
        retain_slots: 1_000,
        rejoining: false,
    };
    let swapped = Replica::start(config, Some(handover), &[]).expect("the old build's hand-over is accepted");
    assert!(swapped.proposer.is_leader(), "leads on without an election");
    let mut sim = Sim::new(1, 7);
    sim.nodes.insert(1, swapped);
    // The put in flight in the old build was request 5 (client 6, seq 1, p = 1).
    assert!(sim.run_until(2_000, |s| s.replies.contains_key(&5)), "the waiting request was answered");
    assert_eq!(sim.replies[&5], Outcome::Done);
    assert_eq!(sim.value_at(1, "p"), Some(b"1".to_vec()));
    // Client 1's put of k = a was followed by client 5's k = b: its retry applies nothing.
    assert_eq!(sim.call(1, 1, 1, put("k", "a")), Outcome::Done);
    assert_eq!(sim.value_at(1, "k"), Some(b"b".to_vec()));
    assert!(
        matches!(sim.call(1, 1, 1, get("k")), Outcome::Rejected(r) if r.starts_with("reused")),
        "a read with a put's pair is refused"
    );
    assert_eq!(sim.call(1, 6, 1, put("p", "1")), Outcome::Done, "the handed-over write's retry");
    assert!(matches!(sim.call(1, 6, 1, put("p", "2")), Outcome::Rejected(r) if r.starts_with("reused")));
    assert_eq!(sim.value_at(1, "p"), Some(b"1".to_vec()));
}
