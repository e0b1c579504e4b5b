//! CheckQuorum: a leader that no majority hears from steps down, so that leader stickiness
//! cannot keep a cluster leaderless-in-effect for ever.

mod common;

use common::{put, Sim};
use waxos_guest::types::{NodeId, Outcome};

/// Raft dissertation §6.2 (CheckQuorum): a leader steps down when an election timeout passes
/// without hearing from a majority; stickiness (followers ignore candidates while a leader
/// lives) is only safe to keep with it. The scenario: messages from three followers to
/// the leader are lost (one-way), its heartbeats still arrive, its accepts never reach a
/// majority. Another leader must take over and writes must complete.
#[test]
fn a_leader_that_hears_from_no_majority_steps_down_so_another_can_be_elected() {
    let mut sim = Sim::new(5, 51);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let old = sim.wait_for_leader();
    assert_eq!(sim.call(old, 1, 1, put("a", "1")), Outcome::Done);
    let deaf_to: Vec<NodeId> = (1..=5).filter(|&n| n != old).take(3).collect();
    for &f in &deaf_to {
        sim.cut_one_way.insert((f, old));
    }
    let other_leader = |s: &Sim| s.leaders().iter().any(|&n| n != old);
    assert!(sim.run_until(5_000, other_leader), "the deaf leader kept every follower sticky");
    assert!(!sim.nodes[&old].proposer.is_leader(), "the deaf leader still leads");
    let new = sim.leaders().into_iter().find(|&n| n != old).expect("another leader");
    assert_eq!(sim.call(new, 2, 1, put("b", "2")), Outcome::Done);
}

/// A gray failure CheckQuorum's probes cannot see: every accept from the leader is lost while
/// its small messages (heartbeats, probes) get through, so followers stay sticky to a leader that
/// cannot commit. It must step down once it chose nothing for `COMMIT_STALL_MS`.
#[test]
fn a_leader_whose_accepts_are_lost_steps_down_so_another_can_be_elected() {
    use common::Fate;
    use waxos_guest::message::{self, Message};
    let mut sim = Sim::new(5, 53);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let old = sim.wait_for_leader();
    assert_eq!(sim.call(old, 1, 1, put("a", "1")), Outcome::Done);
    sim.filter = Some(Box::new(move |env: &waxos_guest::types::Envelope| {
        let accept = matches!(message::decode::<Message>(&env.payload), Ok(Message::Accept { .. }));
        if accept && env.src == old && env.dst != old {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }));
    let stuck = sim.request(old, 1, 2, put("b", "2"));
    let other_leader = |s: &Sim| s.leaders().iter().any(|&n| n != old);
    assert!(sim.run_until(10_000, other_leader), "a leader whose accepts are lost kept leading");
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&stuck)), "the write never completed");
    assert_eq!(sim.replies[&stuck], Outcome::Done);
}

/// CheckQuorum must not depose a healthy leader of an idle cluster: followers answer its
/// heartbeats, so it hears from a majority with no traffic at all.
#[test]
fn an_idle_healthy_leader_keeps_leading() {
    let mut sim = Sim::new(5, 52);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let leader = sim.wait_for_leader();
    sim.run_for(10_000);
    assert_eq!(sim.leaders(), vec![leader], "an idle leader lost its leadership");
    // Two followers down: a majority (itself and two) still hears it.
    let down: Vec<NodeId> = (1..=5).filter(|&n| n != leader).take(2).collect();
    for &n in &down {
        sim.crash(n);
    }
    sim.run_for(10_000);
    assert_eq!(sim.leaders(), vec![leader], "a leader with a bare majority lost its leadership");
}
