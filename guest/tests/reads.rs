//! Reads: linearizable GETs at the leader take no log slot (ReadIndex) and never return state a
//! newer leader has overwritten; `GetStale` reads a replica's own state as it is.

mod common;

use common::{get, put, Sim};
use waxos_guest::types::{Command, Outcome};

/// A linearizable GET at the leader sees the last acknowledged write and uses no log slot.
#[test]
fn a_leader_read_sees_the_last_write_without_a_log_slot() {
    let mut sim = Sim::new(5, 21);
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 1, 1, put("k", "v1")), Outcome::Done);
    let slots_before = sim.nodes[&leader].proposer.next_slot;
    for seq in 2..12 {
        assert_eq!(sim.call(leader, 1, seq, get("k")), Outcome::Value(Some(b"v1".to_vec())));
    }
    assert_eq!(sim.call(leader, 1, 12, get("missing")), Outcome::Value(None));
    assert_eq!(sim.nodes[&leader].proposer.next_slot, slots_before, "reads took log slots");
}

/// A leader cut off from the majority keeps believing it leads for a while; a newer leader on
/// the other side overwrites a key. The old leader must not answer a read with the old value.
/// (CheckQuorum would depose a leader that stepped on alone; so the old one is paused — a
/// stalled process — while the others elect and write, and its followers' last acks reach it
/// late, as from a slow network: it resumes believing it leads, heard from a majority.)
#[test]
fn a_deposed_leader_never_answers_a_read_with_overwritten_state() {
    let mut sim = Sim::new(5, 22);
    let first = sim.wait_for_leader();
    assert_eq!(sim.call(first, 1, 1, put("k", "old")), Outcome::Done);
    sim.run_for(1_000);
    let old = sim.wait_for_leader();
    // Paused (a stalled process), it cannot notice it lost its majority (CheckQuorum).
    sim.paused.insert(old);
    sim.isolated.insert(old);
    let new = loop {
        sim.tick();
        if let Some(&n) = sim.leaders().iter().find(|&&n| n != old) {
            break n;
        }
        assert!(sim.now_ms < 60_000, "no new leader");
    };
    assert_eq!(sim.call(new, 2, 1, put("k", "new")), Outcome::Done);
    assert!(sim.nodes[&old].proposer.is_leader(), "the old leader should still think it leads");
    // A read waits for it while paused; it resumes able to reach the acceptors but not the new
    // leader (whose heartbeats would depose it at once): it takes the read as leader, and the
    // acceptors must not confirm it.
    let id = sim.request(old, 3, 1, get("k"));
    sim.isolated.clear();
    sim.cut.insert((old.min(new), old.max(new)));
    sim.paused.remove(&old);
    sim.run_for(2_000);
    assert_ne!(sim.replies.get(&id), Some(&Outcome::Value(Some(b"old".to_vec()))), "stale read");
    assert!(!sim.nodes[&old].proposer.is_leader(), "the acceptors' refusal should depose the old leader");
    // Healed, the read completes with the new value (through the log, after the step-down).
    sim.cut.clear();
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&id)), "the read never completed");
    assert_eq!(sim.replies[&id], Outcome::Value(Some(b"new".to_vec())));
}

/// Follower ReadIndex: a linearizable read at a follower asks the leader for its read index and
/// answers from the follower's own state — no log slot, and the last acknowledged write.
#[test]
fn a_follower_read_takes_no_log_slot_and_sees_the_last_write() {
    let mut sim = Sim::new(5, 23);
    let leader = sim.wait_for_stable_leader();
    let follower = (1..=5).find(|&n| n != leader).expect("a follower");
    assert_eq!(sim.call(leader, 1, 1, put("k", "v")), Outcome::Done);
    let slots_before = sim.nodes[&leader].proposer.next_slot;
    for seq in 1..6 {
        assert_eq!(sim.call(follower, 2, seq, get("k")), Outcome::Value(Some(b"v".to_vec())));
    }
    assert_eq!(sim.nodes[&leader].proposer.next_slot, slots_before, "follower reads took log slots");
}

/// Raft dissertation §6.4 (follower reads): the follower may answer only once it has applied the
/// leader's read index. A follower that missed a write answers with it, never with its own
/// older value.
#[test]
fn a_lagging_follower_waits_for_the_read_index_before_answering() {
    let mut sim = Sim::new(5, 25);
    let leader = sim.wait_for_stable_leader();
    let follower = (1..=5).find(|&n| n != leader).expect("a follower");
    assert_eq!(sim.call(leader, 1, 1, put("k", "v1")), Outcome::Done);
    assert!(sim.run_until(2_000, |s| s.value_at(follower, "k").is_some()));
    sim.isolated.insert(follower);
    assert_eq!(sim.call(leader, 1, 2, put("k", "v2")), Outcome::Done);
    assert_eq!(sim.value_at(follower, "k"), Some(b"v1".to_vec()), "the follower missed v2");
    // Back, but unable to learn for a while: the read must wait, not answer v1.
    sim.isolated.clear();
    sim.learner_blocked.insert(follower);
    let id = sim.request(follower, 2, 1, get("k"));
    sim.run_for(150);
    assert_eq!(sim.replies.get(&id), None, "answered before applying the read index");
    sim.learner_blocked.clear();
    assert!(sim.run_until(5_000, |s| s.replies.contains_key(&id)), "the read never completed");
    assert_eq!(sim.replies[&id], Outcome::Value(Some(b"v2".to_vec())), "stale follower read");
}

/// `GetStale` answers from the replica's own state at once, even cut off from everyone.
#[test]
fn a_stale_read_answers_from_local_state_even_when_isolated() {
    let mut sim = Sim::new(5, 24);
    let leader = sim.wait_for_leader();
    let follower = (1..=5).find(|&n| n != leader).expect("a follower");
    assert_eq!(sim.call(leader, 1, 1, put("k", "v1")), Outcome::Done);
    assert!(sim.run_until(2_000, |s| s.value_at(follower, "k").is_some()));
    sim.isolated.insert(follower);
    assert_eq!(sim.call(leader, 1, 2, put("k", "v2")), Outcome::Done);
    let stale = sim.call(follower, 2, 1, Command::GetStale("k".into()));
    assert_eq!(stale, Outcome::Value(Some(b"v1".to_vec())), "the isolated follower's own (stale) value");
}

/// A leader that learns a slot chosen elsewhere (a previous leader's late announcement) past
/// a slot it has not learned must still fill that slot, and a read after it must see the
/// learned write. Before, `note_chosen` moved `next_slot` past the hole: the leader never
/// proposed there, its learner stalled, and a read index was given past the hole (a review
/// found the interleaving with a membership change; here the announcement is delivered by hand).
#[test]
fn a_leader_fills_the_slot_below_one_it_learned_from_elsewhere_and_reads_see_it() {
    use waxos_guest::message::{self, ClientCommand, Message, Value};
    use waxos_guest::types::{Envelope, Role};
    let mut sim = Sim::new(3, 33);
    let leader = sim.wait_for_stable_leader();
    assert_eq!(sim.call(leader, 1, 1, put("k", "v1")), Outcome::Done);
    let hole = sim.nodes[&leader].proposer.next_slot;
    let other = (1..=3).find(|&n| n != leader).expect("a follower");
    let write = ClientCommand { origin: other, request_id: 0, client: 7, seq: 1, command: put("k", "v2") };
    let chosen = Message::Chosen { entries: vec![(hole + 1, Value::Batch(vec![write]))] };
    sim.deliver(Envelope { src: other, dst: leader, role: Role::Learner, payload: message::encode(&chosen) });
    sim.run_for(50);
    assert!(sim.nodes[&leader].proposer.is_leader(), "precondition: it still leads");
    assert_eq!(sim.call(leader, 1, 2, get("k")), Outcome::Value(Some(b"v2".to_vec())));
    assert!(sim.nodes[&leader].learner.next_apply > hole + 1, "the hole at slot {hole} was filled");
}

/// A read at the leader waits only for what was proposed before it arrived: in a steady stream
/// of writes whose accepts take an extra tick (so some are always in flight), it is answered
/// within a few ticks, long before the 200 ms after which a read goes through the log (a read
/// index raised to the leader's current `next_slot` chased every later write until then).
#[test]
fn a_read_in_a_stream_of_writes_does_not_wait_for_writes_that_arrived_after_it() {
    use waxos_guest::message::{self, Message};
    let mut sim = Sim::new(3, 44);
    let leader = sim.wait_for_stable_leader();
    assert_eq!(sim.call(leader, 1, 1, put("k", "before")), Outcome::Done);
    sim.filter = Some(Box::new(|env: &waxos_guest::types::Envelope| match message::decode::<Message>(&env.payload) {
        Ok(Message::Accepted { .. }) => common::Fate::Hold,
        _ => common::Fate::Deliver,
    }));
    let (mut writes, mut read, mut answered_after, mut late) = (Vec::new(), None, None, Vec::new());
    for tick in 0..60u64 {
        for w in 0..3 {
            writes.push(sim.request(leader, 100 + tick * 3 + w, 1, put(&format!("w{tick}-{w}"), "x")));
        }
        if tick == 10 {
            read = Some(sim.request(leader, 1, 2, get("k")));
        }
        // What was held back in the tick before is delivered now: one tick late.
        for envelope in std::mem::take(&mut late) {
            sim.deliver(envelope);
        }
        late = std::mem::take(&mut sim.held);
        sim.tick();
        if answered_after.is_none() && read.is_some_and(|id| sim.replies.contains_key(&id)) {
            answered_after = Some(tick - 10);
        }
    }
    assert!(sim.nodes[&leader].proposer.is_leader(), "precondition: it still leads");
    let read = read.expect("sent");
    assert_eq!(sim.replies.get(&read), Some(&Outcome::Value(Some(b"before".to_vec()))));
    let limit = waxos_guest::reads::READ_CONFIRM_TIMEOUT_MS / common::TICK_MS / 2;
    assert!(answered_after.is_some_and(|t| t < limit), "the read was answered after {answered_after:?} ticks");
    sim.filter = None;
    for envelope in late {
        sim.deliver(envelope);
    }
    assert!(sim.run_until(30_000, |s| writes.iter().all(|id| s.replies.contains_key(id))));
}
