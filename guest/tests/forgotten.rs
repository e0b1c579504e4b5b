//! Accepts for slots an acceptor already compacted away: it says so, and the proposer catches
//! up instead of waiting for ever.

mod common;

use common::{put, Fate, Sim};
use waxos_guest::message::{self, Message};
use waxos_guest::types::{Envelope, NodeId, Outcome, Role};

/// Paxos Made Simple §3: a leader may need to learn chosen values before it can go on (the
/// learner applies slots strictly in order). An acceptor that compacted slot s away can no
/// longer accept it — s is chosen and applied there — so it must tell the leader, which then
/// learns s from it (catch-up or snapshot). The scenario, with 10 slots retained:
/// c, x, y accepted 40 slots but learned none; d (the leader) crashes; c wins with {c, x, y};
/// d's late chosen announcements reach x, which applies them and compacts, before c's accepts
/// arrive. Requests at c must still complete.
#[test]
fn a_leader_whose_accepts_reach_a_compacted_acceptor_catches_up_from_it() {
    let mut sim = Sim::with_retain(5, 61, 10);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let d = sim.wait_for_leader();
    let rest: Vec<NodeId> = (1..=5).filter(|&n| n != d).collect();
    let e = rest[0];
    let lagging: Vec<NodeId> = rest[1..].to_vec();
    sim.crash(e);
    // The lagging replicas' learners hear nothing; d's chosen announcements are held back.
    let lagging_in_filter = lagging.clone();
    sim.filter = Some(Box::new(move |env: &Envelope| {
        if env.role != Role::Learner || !lagging_in_filter.contains(&env.dst) {
            return Fate::Deliver;
        }
        match message::decode::<Message>(&env.payload) {
            Ok(Message::Chosen { .. }) => Fate::Hold,
            _ => Fate::Drop,
        }
    }));
    for i in 0..40 {
        assert_eq!(sim.call(d, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    sim.crash(d);
    let c = loop {
        sim.tick();
        if let Some(&n) = sim.leaders().iter().find(|n| lagging.contains(n)) {
            break n;
        }
        assert!(sim.now_ms < 60_000, "no new leader");
    };
    assert_eq!(sim.nodes[&c].learner.next_apply, 0, "the new leader learned nothing yet");
    // d's late announcements reach x ahead of c's accepts: x applies 40 slots and compacts.
    let x = *lagging.iter().find(|&&n| n != c).expect("x");
    sim.filter = None;
    assert!(sim.release_held(|env| env.dst == x) > 0);
    sim.tick();
    assert!(sim.nodes[&x].acceptor.log_start > 0, "x compacted its accepted slots");
    let id = sim.request(c, 9, 1, put("after", "x"));
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&id)), "the new leader's requests never complete");
    assert_eq!(sim.replies[&id], Outcome::Done);
    for i in 0..40 {
        assert_eq!(sim.value_at(c, &format!("k{i}")), Some(b"v".to_vec()), "k{i} lost");
    }
}
