//! Pre-vote: a replica that merely missed some heartbeats must not depose a healthy leader.

mod common;

use common::{put, Sim};
use waxos_guest::types::{NodeId, Outcome};

/// Raft dissertation §9.6 (pre-vote): a would-be candidate first asks whether a majority would
/// vote for it — they refuse while they hear a live leader — and only then raises its ballot.
/// Without it (issue 11, suspicion 1): a follower cut from the leader's heartbeats for one
/// election timeout starts phase 1; nobody else answers (they hear the leader), but its own
/// acceptor promises the higher ballot; the heartbeats come back and it follows the leader
/// again, yet its acceptor refuses the leader's next accept and deposes a healthy leader.
#[test]
fn a_follower_that_missed_heartbeats_does_not_depose_a_healthy_leader() {
    let mut sim = Sim::new(5, 71);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let leader = sim.wait_for_leader();
    let ballot = sim.nodes[&leader].proposer.ballot;
    let follower: NodeId = (1..=5).find(|&n| n != leader).expect("a follower");
    sim.cut_one_way.insert((leader, follower));
    sim.run_for(1_500);
    sim.cut_one_way.clear();
    sim.run_for(200);
    for seq in 1..=5 {
        assert_eq!(sim.call(leader, 1, seq, put("k", "v")), Outcome::Done);
    }
    assert_eq!(sim.leaders(), vec![leader], "a healthy leader was deposed");
    assert_eq!(sim.nodes[&leader].proposer.ballot, ballot, "the leader had to run phase 1 again");
}
