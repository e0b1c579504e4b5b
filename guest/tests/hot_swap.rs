//! Hand-over snapshots: what a hot swap gives the new build, and what a crash restart must not.

mod common;

use common::{put, Sim};
use waxos_guest::replica::Replica;
use waxos_guest::types::Outcome;

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
