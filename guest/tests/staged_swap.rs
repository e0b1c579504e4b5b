//! Staged hot swaps (`staging` in the WIT contract): the host starts the new build's instance
//! from the durable records while the old one keeps serving, catches it up with `replay`, and at
//! the switch hands over only the volatile state (`handover_volatile` → `adopt`). These pin what
//! the switch must keep (leadership, requests in flight, every write that landed while the new
//! instance was prepared) and what `adopt` must refuse (a durable state that is not the old
//! instance's), since the host relies on that refusal to fall back to a hand-over snapshot.

mod common;

use common::{get, put, Sim};
use waxos_guest::replica::Replica;
use waxos_guest::types::{NodeId, Outcome};

/// What a host has when it stages a swap of `id`: the records durable at the WAL roll.
fn records_now(sim: &Sim, id: NodeId) -> Vec<Vec<u8>> {
    let mut records = sim.wal.get(&id).cloned().unwrap_or_default();
    records.extend(sim.unsynced.get(&id).cloned().unwrap_or_default());
    records
}

/// The host's staging: a fresh instance of the new build from the records before the boundary.
fn stage(sim: &Sim, id: NodeId) -> (Replica, usize) {
    let records = records_now(sim, id);
    let staged = Replica::start(sim.nodes[&id].config().clone(), None, &records).expect("the staged instance starts");
    (staged, records.len())
}

/// The host's switch: the records appended since the boundary replayed, then the hand-over.
fn switch(sim: &mut Sim, id: NodeId, mut staged: Replica, boundary: usize) -> Result<(), String> {
    let records = records_now(sim, id);
    staged.replay(&records[boundary..])?;
    let volatile = sim.nodes[&id].handover_volatile();
    staged.adopt(&volatile)?;
    sim.nodes.insert(id, staged);
    Ok(())
}

#[test]
fn a_staged_swap_of_the_leader_keeps_leadership_and_every_write_made_while_it_was_prepared() {
    let mut sim = Sim::new(5, 71);
    let leader = sim.wait_for_stable_leader();
    for seq in 1..=20 {
        assert_eq!(sim.call(leader, 1, seq, put(&format!("before{seq}"), "v")), Outcome::Done);
    }
    let (staged, boundary) = stage(&sim, leader);
    // While the new instance is prepared off the step loop, the old one keeps serving.
    for seq in 21..=60 {
        assert_eq!(sim.call(leader, 1, seq, put(&format!("during{seq}"), "v")), Outcome::Done);
    }
    // A request is in flight at the switch.
    let waiting = sim.request(leader, 1, 61, put("in-flight", "v"));
    sim.tick();
    switch(&mut sim, leader, staged, boundary).expect("the hand-over is adopted");
    assert!(sim.nodes[&leader].proposer.is_leader(), "the new instance leads on without an election");
    assert!(sim.run_until(2_000, |s| s.replies.contains_key(&waiting)), "the request in flight is answered");
    assert_eq!(sim.replies[&waiting], Outcome::Done);
    for seq in 1..=60 {
        let key = if seq <= 20 { format!("before{seq}") } else { format!("during{seq}") };
        assert_eq!(sim.value_at(leader, &key), Some(b"v".to_vec()), "{key} is lost at the swapped leader");
    }
    assert_eq!(sim.call(leader, 2, 1, get("in-flight")), Outcome::Value(Some(b"v".to_vec())));
    assert_eq!(sim.leaders(), vec![leader], "no leader change");
}

#[test]
fn a_staged_swap_of_a_follower_serves_reads_with_the_writes_made_while_it_was_prepared() {
    let mut sim = Sim::new(5, 73);
    let leader = sim.wait_for_stable_leader();
    let follower = (1..=5).find(|&n| n != leader).expect("a follower");
    assert_eq!(sim.call(leader, 1, 1, put("k", "old")), Outcome::Done);
    sim.run_for(100);
    let (staged, boundary) = stage(&sim, follower);
    assert_eq!(sim.call(leader, 1, 2, put("k", "new")), Outcome::Done);
    sim.run_for(100);
    switch(&mut sim, follower, staged, boundary).expect("the hand-over is adopted");
    assert_eq!(sim.call(follower, 2, 1, get("k")), Outcome::Value(Some(b"new".to_vec())));
    assert_eq!(sim.leaders(), vec![leader], "no leader change");
}

/// The host relies on this refusal: a staged instance fed the records wrongly (one lost between
/// the boundary and the switch) must not take over, or the replica would run on without an
/// acknowledged write; the old instance stays, untouched, and keeps serving.
#[test]
fn a_staged_instance_that_missed_a_record_refuses_the_hand_over() {
    let mut sim = Sim::new(5, 79);
    let leader = sim.wait_for_stable_leader();
    assert_eq!(sim.call(leader, 1, 1, put("a", "1")), Outcome::Done);
    let (mut staged, boundary) = stage(&sim, leader);
    assert_eq!(sim.call(leader, 1, 2, put("b", "2")), Outcome::Done);
    let records = records_now(&sim, leader);
    assert!(records.len() > boundary + 1, "the write appended records");
    // Every record since the boundary but the last chosen one.
    staged.replay(&records[boundary..records.len() - 1]).expect("replay");
    let volatile = sim.nodes[&leader].handover_volatile();
    let refused = staged.adopt(&volatile).expect_err("a staged instance behind the old one must refuse");
    assert!(refused.contains("differs"), "unexpected refusal: {refused}");
    // The old instance was not touched by the refused hand-over and keeps leading.
    assert_eq!(sim.call(leader, 1, 3, get("b")), Outcome::Value(Some(b"2".to_vec())));
    assert_eq!(sim.leaders(), vec![leader]);
}

/// A staged instance that replays a record twice (a host that gave the same tail twice) is
/// caught by the same check rather than applying a write twice in silence: either the state
/// still matches (replay is idempotent) or the hand-over is refused.
#[test]
fn a_record_replayed_twice_never_makes_a_different_state_take_over() {
    let mut sim = Sim::new(3, 83);
    let leader = sim.wait_for_stable_leader();
    let (mut staged, boundary) = stage(&sim, leader);
    for seq in 1..=5 {
        assert_eq!(sim.call(leader, 1, seq, put("counter", &seq.to_string())), Outcome::Done);
    }
    let records = records_now(&sim, leader);
    staged.replay(&records[boundary..]).expect("replay");
    staged.replay(&records[boundary..]).expect("replay again");
    let volatile = sim.nodes[&leader].handover_volatile();
    if staged.adopt(&volatile).is_ok() {
        assert_eq!(staged.learner.kv.data.get("counter"), Some(&b"5".to_vec()));
        assert_eq!(staged.learner.next_apply, sim.nodes[&leader].learner.next_apply);
    }
}
