//! Rejoining after a lost disk: a replica whose acceptor lost its promises and accepted values
//! must not vote again until no quorum can have counted a vote of its earlier incarnation that
//! it would now contradict (`rejoin` module: the fence).

mod common;

use std::collections::BTreeMap;

use common::{put, voting, Fate, Lcg, Sim};
use waxos_guest::acceptor::Acceptor;
use waxos_guest::message::{self, Ballot, Message, Record, Value};
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

/// The fence rule at the acceptor: a fence ballot is promised only by an acceptor whose promise
/// is of a strictly lower epoch — a lower ballot of the same epoch is not enough, since
/// elections count rounds up within an epoch — and the answer reports everything accepted.
#[test]
fn a_fence_is_promised_only_from_a_strictly_lower_epoch() {
    let mut acceptor = Acceptor::default();
    acceptor.on_accept(Ballot { round: 7, node: 1 }, 3, Value::Noop);
    let (reply, record) = acceptor.on_fence(Ballot::fence(1, 2), 7);
    assert_eq!(record, Some(Record::Promised(Ballot::fence(1, 2))), "the promise is persisted");
    let Message::Fenced { accepted, log_start: 0, .. } = reply else { panic!("expected Fenced: {reply:?}") };
    assert_eq!(accepted, vec![(3, Ballot { round: 7, node: 1 }, Value::Noop)]);
    // A higher ballot of the same epoch: refused.
    let (reply, record) = acceptor.on_fence(Ballot::fence(1, 3), 7);
    assert_eq!(reply, Message::Nack { ballot: Ballot::fence(1, 3), promised: Ballot::fence(1, 2) });
    assert_eq!(record, None);
    // An election counted up in epoch 1, then a fence of epoch 1 again: refused too.
    acceptor.on_prepare(Ballot { round: (1 << 40) + 5, node: 4 }, 0);
    assert!(matches!(acceptor.on_fence(Ballot::fence(1, 5), 7).0, Message::Nack { .. }));
    assert!(matches!(acceptor.on_fence(Ballot::fence(2, 5), 7).0, Message::Fenced { .. }));
}

/// A replica that rejoined, voted, and then restarts from its WAL (no snapshot) must still say
/// that it knows nothing below its fence's log start: it never had those accepted values, and a
/// candidate behind that point must catch up instead of taking its silence for "nothing
/// accepted" (Paxos Made Simple §2.2, P2c).
#[test]
fn a_rejoined_replica_restarted_from_its_wal_keeps_its_fence_log_start() {
    let mut sim = Sim::with_retain(5, 45, 10);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let leader = sim.wait_for_leader();
    for i in 0..100 {
        assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    let wiped = (1..=5).find(|&n| n != leader).expect("a follower");
    sim.wipe_and_restart(wiped);
    assert!(sim.run_until(10_000, |s| s.nodes[&wiped].status().contains("\"voting\":true")), "never voted again");
    let fence_log_start = sim.nodes[&wiped].acceptor.log_start;
    assert!(fence_log_start > 0, "the fence reported compacted slots");
    sim.crash(wiped);
    sim.restart(wiped);
    assert!(sim.nodes[&wiped].acceptor.log_start >= fence_log_start, "the restarted acceptor forgot its log start");
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 9, 1, put("after", "x")), Outcome::Done);
}

/// A hot swap while a wiped replica rejoins: the new build carries on (a completed fence's
/// catch-up) or fences again; either way the replica votes again and nothing is lost.
#[test]
fn a_hot_swap_during_a_rejoin_neither_skips_nor_blocks_the_fence() {
    for swap_after_ms in [10, 20, 30, 60, 200] {
        let mut sim = Sim::with_retain(5, 46, 10);
        sim.wait_for_leader();
        sim.run_for(1_000);
        let leader = sim.wait_for_leader();
        for i in 0..40 {
            assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
        }
        let wiped = (1..=5).find(|&n| n != leader).expect("a follower");
        sim.wipe_and_restart(wiped);
        sim.run_for(swap_after_ms);
        sim.hot_swap(wiped);
        assert!(
            sim.run_until(10_000, |s| s.nodes[&wiped].status().contains("\"voting\":true")),
            "swapped {swap_after_ms} ms into the rejoin: never voted again"
        );
        assert!(sim.nodes[&wiped].learner.next_apply >= sim.nodes[&wiped].acceptor.log_start);
        let leader = sim.wait_for_leader();
        assert_eq!(sim.call(leader, 9, 1, put("after", "x")), Outcome::Done);
        assert!(sim.run_until(5_000, |s| s.value_at(wiped, "after").is_some()));
        assert_eq!(sim.value_at(wiped, "k0"), Some(b"v".to_vec()));
    }
}

/// Paxos Made Simple §2.3 (one value per slot) under everything at once: wipes (at most one
/// replica without its state at a time), crash restarts from the WAL, partitions, one-way
/// cuts, acceptor outages, pauses, hot swaps, late messages, and compaction (20 slots kept). Every slot learned anywhere, at any
/// moment, must hold the same value everywhere; every acknowledged write must survive; after
/// healing, the cluster must write again.
#[test]
fn wipes_crashes_partitions_and_pauses_never_choose_two_values_for_a_slot() {
    for seed in 1..=200 {
        let mut sim = Sim::with_retain(5, 1000 + seed, 20);
        let mut rng = Lcg(seed);
        // About one message in twenty is held back, to arrive much later (or never).
        let mut filter_rng = Lcg(seed ^ 0x5eed);
        sim.filter =
            Some(Box::new(move |_: &Envelope| if filter_rng.below(20) == 0 { Fate::Hold } else { Fate::Deliver }));
        let mut learned: BTreeMap<u64, Value> = BTreeMap::new();
        let mut writes: Vec<(u64, String)> = Vec::new();
        let mut next_key = 0;
        for _ in 0..150 {
            let node = rng.below(5) as NodeId + 1;
            let what = rng.below(16);
            match what {
                0 | 12 => {
                    let others_voting = (1..=5).filter(|&n| n != node).all(|n| voting(&sim, n));
                    if others_voting && !sim.crashed.contains(&node) && !sim.paused.contains(&node) {
                        sim.wipe_and_restart(node);
                    }
                }
                1 if sim.crashed.is_empty() && !sim.paused.contains(&node) => sim.crash(node),
                2 => {
                    let crashed: Vec<NodeId> = sim.crashed.iter().copied().collect();
                    for n in crashed {
                        sim.restart(n);
                    }
                }
                3..=7 => {
                    sim.network_fault(what - 3, node, 3, &mut rng);
                }
                8 if sim.paused.is_empty() && !sim.crashed.contains(&node) => {
                    sim.paused.insert(node);
                }
                9 => sim.paused.clear(),
                10 if !sim.crashed.contains(&node) && !sim.paused.contains(&node) => sim.hot_swap(node),
                11 => {
                    sim.release_held(|_| true);
                }
                _ => {
                    if !sim.crashed.contains(&node) {
                        let key = format!("k{next_key}");
                        next_key += 1;
                        let id = sim.request(node, 7, next_key, put(&key, "v"));
                        writes.push((id, key));
                    }
                }
            }
            sim.run_for(100);
            for n in sim.nodes.keys() {
                for (slot, value) in &sim.nodes[n].learner.chosen {
                    let first = learned.entry(*slot).or_insert_with(|| value.clone());
                    assert_eq!(first, value, "seed {seed}: slot {slot} learned with two values (node {n})");
                }
            }
        }
        let crashed: Vec<NodeId> = sim.crashed.iter().copied().collect();
        for n in crashed {
            sim.restart(n);
        }
        sim.paused.clear();
        sim.cut.clear();
        sim.cut_one_way.clear();
        sim.acceptor_down.clear();
        sim.filter = None;
        sim.release_held(|_| true);
        assert!(
            sim.run_until(20_000, |s| (1..=5).all(|n| voting(s, n))),
            "seed {seed}: a wiped replica never voted again"
        );
        let leader = sim.wait_for_leader();
        assert_eq!(sim.call(leader, 9, 1, put("after", "x")), Outcome::Done, "seed {seed}");
        sim.run_for(3_000);
        assert_one_value_per_slot(&sim, &[1, 2, 3, 4, 5]);
        let done = writes.iter().filter(|(id, _)| sim.replies.get(id) == Some(&Outcome::Done)).count();
        eprintln!("seed {seed}: {} slots learned, {done} of {} writes acknowledged", learned.len(), writes.len());
        for (id, key) in &writes {
            if sim.replies.get(id) == Some(&Outcome::Done) {
                for n in 1..=5 {
                    assert_eq!(sim.value_at(n, key), Some(b"v".to_vec()), "seed {seed}: node {n} lost {key}");
                }
            }
        }
    }
}

/// Two replicas of five lose their disks at once: each fence needs all three voting others,
/// and the two must not refuse each other for ever. Both vote again, nothing is lost.
#[test]
fn two_replicas_wiped_at_once_both_rejoin() {
    for seed in 47..57 {
        let mut sim = Sim::with_retain(5, seed, 10);
        sim.wait_for_leader();
        sim.run_for(1_000);
        let leader = sim.wait_for_leader();
        for i in 0..30 {
            assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
        }
        let wiped: Vec<NodeId> = (1..=5).filter(|&n| n != leader).take(2).collect();
        for &n in &wiped {
            sim.wipe_and_restart(n);
        }
        let all_voting = |s: &Sim| (1..=5).all(|n| voting(s, n));
        assert!(sim.run_until(20_000, all_voting), "seed {seed}: the two wiped replicas never both voted again");
        let leader = sim.wait_for_leader();
        assert_eq!(sim.call(leader, 9, 1, put("after", "x")), Outcome::Done);
        for &n in &wiped {
            assert!(sim.run_until(5_000, |s| s.value_at(n, "after").is_some()));
            assert_eq!(sim.value_at(n, "k0"), Some(b"v".to_vec()));
        }
    }
}
