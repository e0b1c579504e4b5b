//! Rejoining after a lost disk: a replica whose acceptor lost its promises and accepted values
//! must not vote again until no quorum can have counted a vote of its earlier incarnation that
//! it would now contradict (`rejoin` module: the fence).

mod common;

use common::{put, Fate, Sim};
use waxos_guest::message::{self, Message};
use waxos_guest::types::{Envelope, NodeId, Outcome};

/// Paxos Made Simple §2.3: one value per slot. Every slot two replicas both learned holds the
/// same value at both (the harness keeps 1000 applied slots, so nothing is compacted here).
fn assert_one_value_per_slot(sim: &Sim, nodes: &[NodeId]) {
    for (i, x) in nodes.iter().enumerate() {
        for y in &nodes[i + 1..] {
            for (slot, value) in &sim.nodes[x].learner.chosen {
                if let Some(other) = sim.nodes[y].learner.chosen.get(slot) {
                    assert_eq!(value, other, "slot {slot}: node {x} and node {y} learned different values");
                }
            }
        }
    }
}

/// Paxos Made Simple §2.2 (P2c): a value accepted by a majority is the one every higher ballot
/// proposes, because every majority shares an acceptor with that majority that reports it. A
/// wiped acceptor has forgotten its accept, yet the leader still counts it: it must not vote
/// for anything else until its fence (a majority minus itself) has reported that accept to it.
/// The scenario: `a` proposes k1 in slot s and only `a` and `c` accept (acceptor outage
/// at d, e; a's accepts to b delayed); `c` is wiped and rejoins; `a` stalls (a paused process:
/// no CheckQuorum can depose it meanwhile); partition {a,b} | {c,d,e}; a's delayed accept
/// reaches b; the majority side writes k2; `a` resumes and counts {a, c, b} for k1. Both sides must
/// agree on slot s, and every acknowledged write must survive.
#[test]
fn wiped_acceptor_cannot_vote_against_a_value_it_accepted_before_the_wipe() {
    let mut sim = Sim::new(5, 41);
    let a = sim.wait_for_leader();
    let others: Vec<NodeId> = (1..=5).filter(|&n| n != a).collect();
    let (b, c, d, e) = (others[0], others[1], others[2], others[3]);
    assert_eq!(sim.call(a, 1, 1, put("k0", "x")), Outcome::Done);
    sim.run_for(200);
    sim.acceptor_down.extend([d, e]);
    sim.filter = Some(Box::new(move |env: &Envelope| {
        let accept = matches!(message::decode::<Message>(&env.payload), Ok(Message::Accept { .. }));
        if env.dst == b && accept {
            Fate::Hold
        } else {
            Fate::Deliver
        }
    }));
    let k1 = sim.request(a, 1, 2, put("k1", "v"));
    sim.run_for(100);
    assert!(!sim.replies.contains_key(&k1), "only a and c accepted: not chosen yet");
    sim.wipe_and_restart(c);
    // Long enough for the old rule (caught up with the leader + two election timeouts).
    sim.run_for(2_500);
    sim.paused.insert(a);
    sim.partition(&[a, b], &[c, d, e]);
    // a's delayed accepts reach b, whose answer waits for a to resume.
    sim.filter = None;
    sim.release_held(|_| true);
    sim.run_for(20);
    sim.acceptor_down.clear();
    // The majority side may not write into slot s without hearing from a or b: only they (and
    // c's lost disk) know what c accepted. With the old rule it does.
    let k2 = sim.request(d, 2, 1, put("k2", "w"));
    sim.run_for(5_000);
    sim.paused.remove(&a);
    sim.run_for(2_000);
    sim.cut.clear();
    let both = |s: &Sim| s.replies.contains_key(&k1) && s.replies.contains_key(&k2);
    assert!(sim.run_until(20_000, both), "k1 or k2 never completed after healing");
    sim.run_for(3_000);
    assert_one_value_per_slot(&sim, &[a, b, c, d, e]);
    for n in [a, b, c, d, e] {
        let data = &sim.nodes[&n].learner.kv.data;
        for (id, key, value) in [(k1, "k1", "v"), (k2, "k2", "w")] {
            if sim.replies[&id] == Outcome::Done {
                assert_eq!(data.get(key), Some(&value.as_bytes().to_vec()), "node {n} lost an acknowledged write");
            }
        }
    }
}
