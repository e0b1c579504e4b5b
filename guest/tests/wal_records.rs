//! What the guest writes to its log: each value once (the chosen record names the accept that
//! holds the value), and a restart rebuilds the same state from it.

mod common;

use common::{put, Sim};
use waxos_guest::types::{Command, Outcome};

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Each value goes into a replica's log once: in the acceptor's `Accepted` record; the learner's
/// record of the choice refers to it instead of repeating the value.
#[test]
fn every_replica_writes_a_value_to_its_log_once() {
    let mut sim = Sim::new(5, 31);
    let leader = sim.wait_for_stable_leader();
    let value: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
    let command = Command::Put("big".into(), value.clone());
    assert_eq!(sim.call(leader, 1, 1, command), Outcome::Done);
    // Every replica applies it, and every lazy record is synced.
    assert!(sim.run_until(2_000, |s| (1..=5).all(|n| s.value_at(n, "big").is_some())));
    sim.run_for(500);
    for node in 1..=5 {
        let log: Vec<u8> = sim.wal[&node].concat();
        assert_eq!(occurrences(&log, &value), 1, "node {node} wrote the value {} times", occurrences(&log, &value));
    }
}

/// A restart replays `Accepted` then `ChosenAccepted` and applies the value the accept holds.
#[test]
fn a_restart_rebuilds_a_value_chosen_by_reference_from_its_accept() {
    let mut sim = Sim::new(5, 32);
    let leader = sim.wait_for_stable_leader();
    for i in 0..20u64 {
        assert_eq!(sim.call(leader, 1, i + 1, put(&format!("k{i}"), &format!("value {i}"))), Outcome::Done);
    }
    assert!(sim.run_until(2_000, |s| (1..=5).all(|n| s.value_at(n, "k19").is_some())));
    sim.run_for(500);
    for node in 1..=5 {
        sim.crash(node);
    }
    for node in 1..=5 {
        sim.restart(node);
        for i in 0..20u64 {
            assert_eq!(sim.value_at(node, &format!("k{i}")), Some(format!("value {i}").into_bytes()), "node {node}");
        }
    }
}
