//! A second review of membership through the log (after 5864868): interleavings that break
//! the rule, kept as tests. Each asserts what the rule demands.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{get, put, Fate, Sim};
use waxos_guest::membership::{Member, MemberChange};
use waxos_guest::message::{self, Message, Value};
use waxos_guest::types::{Command, Envelope, NodeId, Outcome};

const OPERATOR: u64 = 0x0BE7_A70B;

fn change(sim: &mut Sim, node: NodeId, seq: u64, change: MemberChange) -> Outcome {
    sim.call(node, OPERATOR, seq, Command::ChangeMembers(change))
}

fn known(sim: &Sim, node: NodeId) -> Vec<Member> {
    sim.members.get(&node).cloned().unwrap_or_default()
}

fn voters_at(sim: &Sim, node: NodeId) -> Vec<NodeId> {
    let learner = &sim.nodes[&node].learner;
    learner.membership.at(learner.next_apply).voters().collect()
}

fn decode(env: &Envelope) -> Option<Message> {
    message::decode::<Message>(&env.payload).ok()
}

fn slot_of_put(sim: &Sim, node: NodeId, key: &str) -> u64 {
    sim.nodes[&node]
        .learner
        .chosen
        .iter()
        .find(|(_, v)| {
            matches!(v, Value::Batch(cmds) if cmds.iter().any(|c| matches!(&c.command, Command::Put(k, _) if k == key)))
        })
        .map(|(s, _)| *s)
        .expect("the put is in the log")
}

/// A leader that won phase 1 in an old configuration counts a *late* promise (one that
/// arrives after it won, asked for because a newer configuration needs it) without the
/// `log_start` check phase 1 makes (`PhaseOne::Behind`). The late promiser had applied far
/// ahead and forgotten the slots in between, so its promise reports nothing for them; the
/// leader counts it towards the new configuration's majority, fills those slots with no-ops,
/// and the acceptors that never forgot them accept the no-ops over the values chosen there.
///
/// Cluster {1,2,3}, leader A. From slot 0, `p` (the next leader) neither accepts nor learns
/// (it still hears heartbeats, so it knows A's ballot); `x` accepts but learns nothing (its
/// acceptor forgets nothing). A adds 4 (which accepts but never learns: it keeps every accept)
/// and 5, and promotes both in one batch (slot s): {1,2,3,4,5} from s + 64. Then `x`'s acceptor
/// goes down; A writes k=v1 in slot t = s + 64, chosen by {A,4,5}, acknowledged, then 150 more
/// writes, so that 5's acceptor forgets t (log_start > t). A is cut off; only `p` stands (the
/// others' pre-votes are lost) and wins with {p,x} in {1,2,3} (both start at log 0: not
/// `Behind`); x reports up to t-1. Having applied the promotions, p asks 4 and 5 for promises:
/// the prepare to 4 is lost; 5's promise (log_start > t, reporting nothing below it) makes
/// {p,x,5} a majority of {1,...,5}. Slot t: nothing reported, below `reproposal_end` (5's
/// report), so a no-op, accepted by {p,x,4} (5 answers `Forgotten`, too late): chosen over k=v1.
#[test]
fn a_late_promise_from_a_replica_that_forgot_the_slots_is_not_counted_as_if_it_remembered() {
    let mut sim = Sim::new(3, 91);
    let a = sim.wait_for_stable_leader();
    let others: Vec<NodeId> = (1..=3).filter(|&n| n != a).collect();
    let (p, x) = (others[0], others[1]);
    // p neither accepts nor learns from now on, but hears the leaders' heartbeats (so it knows
    // their ballots); x accepts but never learns. Only `a` stands for election for now.
    sim.acceptor_down.insert(p);
    sim.learner_blocked.insert(p);
    sim.learner_blocked.insert(x);
    let phase = Rc::new(Cell::new(0u8));
    let seen = phase.clone();
    sim.filter = Some(Box::new(move |env: &Envelope| match (seen.get(), decode(env)) {
        (0, Some(Message::PreVote { .. })) if env.src != a => Fate::Drop,
        // Later only p stands (the others' pre-votes are lost), and p's prepares to 4 are lost.
        (1, Some(Message::PreVote { .. })) if env.src != p => Fate::Drop,
        (1, Some(Message::Prepare { .. })) if env.dst == 4 => Fate::Drop,
        _ => Fate::Deliver,
    }));
    let mut seq = 0;
    let mut next_seq = || {
        seq += 1;
        seq
    };
    // 4 joins and accepts from now on but never learns.
    let id4 = match change(&mut sim, a, next_seq(), MemberChange::Add { address: "host4:7000".into() }) {
        Outcome::Member(id) => id,
        other => panic!("add refused: {other:?}"),
    };
    assert_eq!(id4, 4);
    let members = known(&sim, a);
    sim.join(4, members);
    sim.learner_blocked.insert(4);
    let id5 = match change(&mut sim, a, next_seq(), MemberChange::Add { address: "host5:7000".into() }) {
        Outcome::Member(id) => id,
        other => panic!("add refused: {other:?}"),
    };
    assert_eq!(id5, 5);
    let members = known(&sim, a);
    sim.join(5, members);
    assert!(sim.run_until(10_000, |s| s.nodes[&5].learner.next_apply + 2 >= s.nodes[&a].learner.next_apply));
    // Both promotions in one batch: one slot, one new configuration {1,...,5}.
    let promote5 = sim.request(a, OPERATOR, next_seq(), Command::ChangeMembers(MemberChange::Promote(5)));
    let promote4 = sim.request(a, OPERATOR, next_seq(), Command::ChangeMembers(MemberChange::Promote(4)));
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&promote5) && s.replies.contains_key(&promote4)));
    assert_eq!(sim.replies[&promote5], Outcome::Member(5));
    assert_eq!(sim.replies[&promote4], Outcome::Member(4));
    assert!(
        sim.run_until(20_000, |s| voters_at(s, a) == vec![1, 2, 3, 4, 5]
            && s.nodes[&a].proposer.in_flight.is_empty()
            && s.nodes[&a].learner.membership.governing().count() == 1),
        "the promotions never took effect"
    );
    assert_eq!(sim.leaders(), vec![a]);
    // From here on x accepts nothing: k=v1 is chosen by {a, 4, 5}.
    sim.acceptor_down.insert(x);
    assert_eq!(sim.call(a, 7, 1, put("k", "v1")), Outcome::Done, "acknowledged");
    let t = slot_of_put(&sim, a, "k");
    let chosen = sim.nodes[&a].learner.chosen[&t].clone();
    for i in 0..150u64 {
        assert_eq!(sim.call(a, 8, i + 1, put(&format!("filler{i}"), "x")), Outcome::Done);
    }
    assert!(sim.nodes[&5].acceptor.log_start > t, "precondition: node 5's acceptor forgot slot {t}");
    assert!(sim.nodes[&4].acceptor.accepted.contains_key(&t), "precondition: node 4 still holds slot {t}");
    assert!(!sim.nodes[&x].acceptor.accepted.contains_key(&t), "precondition: node {x} never accepted slot {t}");
    assert_eq!(sim.nodes[&x].acceptor.log_start, 0);
    assert!(sim.nodes[&p].proposer.max_seen >= sim.nodes[&a].proposer.ballot, "p heard the leader's ballot");
    assert_eq!(sim.nodes[&p].learner.next_apply, 0);
    sim.isolated.insert(a);
    phase.set(1);
    sim.run_for(1_000);
    sim.acceptor_down.clear();
    sim.learner_blocked.remove(&p);
    assert!(
        sim.run_until(30_000, |s| s.nodes[&p].proposer.is_leader() && s.nodes[&p].learner.next_apply > t + 1),
        "node {p} never led past slot {t}"
    );
    let id = sim.request(p, 9, 1, get("k"));
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&id)), "the read never completed");
    assert_eq!(
        sim.replies[&id],
        Outcome::Value(Some(b"v1".to_vec())),
        "a linearizable read at the new leader missed an acknowledged write"
    );
    assert_eq!(
        sim.nodes[&p].learner.chosen.get(&t),
        Some(&chosen),
        "slot {t}: k=v1 chosen by {{{a},4,5}}, then another value by {{{p},{x},4}}"
    );
}
