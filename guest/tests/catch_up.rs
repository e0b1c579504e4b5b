//! Catch-up and compaction: lagging replicas get missing slots or, when those were dropped, a
//! snapshot; a replica that lost its disk does not vote until it has caught up.

mod common;

use common::{get, put, Sim};
use waxos_guest::message::{self, Ballot, Message};
use waxos_guest::types::{Effect, Envelope, Event, Outcome, Role};

#[test]
fn lagging_replica_catches_up_by_snapshot_when_slots_were_dropped() {
    let mut sim = Sim::with_retain(5, 13, 10);
    let leader = sim.wait_for_leader();
    let lagging = (1..=5).find(|&n| n != leader).expect("a follower");
    sim.isolated.insert(lagging);
    for i in 0..60 {
        assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), &format!("v{i}"))), Outcome::Done);
    }
    assert!(sim.nodes[&leader].learner.log_start > 0, "the leader must have dropped old slots");
    sim.isolated.clear();
    assert!(sim.run_until(5_000, |s| s.value_at(lagging, "k59").is_some()), "no catch-up");
    for i in 0..60 {
        assert_eq!(sim.value_at(lagging, &format!("k{i}")), Some(format!("v{i}").into_bytes()));
    }
    // It serves linearizable reads and writes like everyone else afterwards.
    assert_eq!(sim.call(lagging, 9, 1, get("k0")), Outcome::Value(Some(b"v0".to_vec())));
}

#[test]
fn candidate_behind_compacted_acceptors_does_not_lead() {
    let mut sim = Sim::with_retain(3, 17, 5);
    let leader = sim.wait_for_leader();
    let behind = (1..=3).find(|&n| n != leader).expect("a follower");
    sim.isolated.insert(behind);
    for i in 0..40 {
        assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    // The lagging node's messages reach the others again, but it is forced to run for leader
    // before it heard any heartbeat: the others forgot slots it lacks, so it must not lead.
    sim.isolated.clear();
    let now = sim.now_ms;
    sim.nodes.get_mut(&behind).expect("node").proposer.election_deadline_ms = now;
    sim.run_for(10);
    sim.run_for(50);
    assert!(!sim.nodes[&behind].proposer.is_leader(), "a replica missing compacted slots took the lead");
    // The cluster still agrees and makes progress.
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 8, 100, put("after", "x")), Outcome::Done);
    assert!(sim.run_until(5_000, |s| s.value_at(behind, "after").is_some()));
    assert_eq!(sim.value_at(behind, "k39"), Some(b"v".to_vec()));
}

#[test]
fn wiped_replica_does_not_vote_until_caught_up() {
    let mut sim = Sim::new(5, 23);
    let leader = sim.wait_for_leader();
    for i in 0..10 {
        assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    let wiped = (1..=5).find(|&n| n != leader).expect("a follower");
    sim.wipe_and_restart(wiped);
    // Right after the restart it ignores prepares (no promise could be trusted).
    let prepare = message::encode(&Message::Prepare { ballot: Ballot { round: 99, node: leader }, first_slot: 0 });
    let env = Envelope { src: leader, dst: wiped, role: Role::Acceptor, payload: prepare };
    let now = sim.now_ms;
    let effects = sim.nodes.get_mut(&wiped).expect("node").step(now, vec![Event::Message(env)]);
    // (It does send its own fence to the acceptors: that is no answer.)
    let answered = effects.iter().any(|e| matches!(e, Effect::Send(env) if env.role == Role::Proposer));
    assert!(!answered, "a wiped acceptor answered: {effects:?}");
    // Later it has caught up and votes again.
    assert!(sim.run_until(5_000, |s| s.value_at(wiped, "k9").is_some()));
    assert!(sim.run_until(5_000, |s| s.nodes[&wiped].status().contains("\"voting\":true")), "never voted again");
}

/// A peer ahead of this learner asks it for slots it has not learned: an empty answer, not a
/// trap (found by the simulator once chosen records became lazy: a crash can put a leader's
/// learner behind a follower's).
#[test]
fn a_catch_up_request_from_a_peer_ahead_gets_an_empty_answer() {
    let mut learner = waxos_guest::learner::Learner::default();
    learner.learn(0, waxos_guest::message::Value::Noop);
    learner.apply_ready();
    assert_eq!(learner.chosen_from(5, 10, 1 << 20), Some(Vec::new()));
}

/// Issue 17, proven bug 1: the host keeps the rejoin flag with its roster; a rejoining replica
/// that crashed before its `Voting(false)` record was durable restarts with some records but no
/// vote record. It must come back silent (its promises are forgotten), not as a voter.
#[test]
fn a_rejoining_replica_whose_log_lacks_a_vote_record_does_not_vote() {
    use waxos_guest::message::{Record, Value};
    use waxos_guest::replica::Replica;
    use waxos_guest::types::Config;
    let config = Config {
        me: 1,
        members: waxos_guest::membership::voters(&[1, 2, 3]),
        seed: 1,
        test_hooks: false,
        retain_slots: 100,
        rejoining: true,
    };
    let wal = vec![message::encode(&Record::Chosen { slot: 0, value: Value::Noop })];
    let replica = Replica::start(config.clone(), None, &wal).expect("start");
    assert!(replica.status().contains("\"voting\":false"), "{}", replica.status());
    // Without the flag, the same log votes; a fresh log's first record says which.
    let replica = Replica::start(Config { rejoining: false, ..config.clone() }, None, &wal).expect("start");
    assert!(replica.status().contains("\"voting\":true"), "{}", replica.status());
    let mut fresh = Replica::start(config, None, &[]).expect("start");
    let first = fresh.take_effects().into_iter().find_map(|e| match e {
        Effect::Persist(bytes) => Some(message::decode::<Record>(&bytes).expect("record")),
        _ => None,
    });
    assert_eq!(first, Some(Record::Voting(false)));
}
