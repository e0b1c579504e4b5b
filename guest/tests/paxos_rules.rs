//! One test per Paxos rule the guest must keep. References are to Lamport, "Paxos Made Simple".
//! These run natively and, compiled to wasm32-wasip2, under wasmtime (`just test`).

mod common;

use common::{delete, get, put, Sim};
use waxos_guest::acceptor::Acceptor;
use waxos_guest::kv::Kv;
use waxos_guest::learner::Learner;
use waxos_guest::membership::{voters, Membership};
use waxos_guest::message::{self, Ballot, ClientCommand, Message, Record, Value};
use waxos_guest::proposer::{Phase, Promise, Proposer};
use waxos_guest::replica::Replica;
use waxos_guest::types::{Command, Config, Effect, Event, Outcome, Request, Role};

fn b(round: u64, node: u32) -> Ballot {
    Ballot { round, node }
}

fn cmd(client: u64, seq: u64, command: Command) -> ClientCommand {
    ClientCommand { origin: 1, request_id: seq, client, seq, command }
}

fn batch(key: &str) -> Value {
    Value::Batch(vec![cmd(7, 1, put(key, "v"))])
}

/// §2.2 P1a: an acceptor can accept ballot n only if it has not promised a higher one; so a
/// promise refuses any lower ballot.
#[test]
fn promise_refuses_lower_ballot() {
    let mut acceptor = Acceptor::default();
    let (reply, record) = acceptor.on_prepare(b(5, 2), 0);
    assert!(matches!(reply, Message::Promise { ballot, .. } if ballot == b(5, 2)));
    assert_eq!(record, Some(Record::Promised(b(5, 2))), "a new promise must be persisted");
    let (reply, record) = acceptor.on_prepare(b(4, 3), 0);
    assert_eq!(reply, Message::Nack { ballot: b(4, 3), promised: b(5, 2) });
    assert_eq!(record, None);
    // Same round, lower node id: still lower.
    let (reply, _) = acceptor.on_prepare(b(5, 1), 0);
    assert!(matches!(reply, Message::Nack { .. }));
}

/// §2.2 P1a: an accept below the promise is refused and changes nothing.
#[test]
fn accept_below_promise_is_refused() {
    let mut acceptor = Acceptor::default();
    acceptor.on_prepare(b(3, 1), 0);
    let (reply, record) = acceptor.on_accept(b(2, 2), 0, batch("x"));
    assert_eq!(reply, Some(Message::Nack { ballot: b(2, 2), promised: b(3, 1) }));
    assert!(record.is_none());
    assert!(acceptor.accepted.is_empty());
    let (reply, record) = acceptor.on_accept(b(3, 1), 0, batch("x"));
    assert_eq!(reply, Some(Message::Accepted { ballot: b(3, 1), slot: 0 }));
    assert!(matches!(record, Some(Record::Accepted { slot: 0, .. })), "an accept must be persisted");
}

/// A promise reports what was accepted from the candidate's first slot on (§2.2 phase 1b).
#[test]
fn promise_reports_accepted_values_from_first_slot() {
    let mut acceptor = Acceptor::default();
    acceptor.on_accept(b(1, 1), 3, batch("three"));
    acceptor.on_accept(b(1, 1), 9, batch("nine"));
    let (reply, _) = acceptor.on_prepare(b(2, 2), 5);
    let Message::Promise { accepted, .. } = reply else { panic!("expected a promise") };
    assert_eq!(accepted, vec![(9, b(1, 1), batch("nine"))]);
}

/// A learner whose membership is `members`, all voters, from slot 0.
fn learner_of(members: &[u32]) -> Learner {
    let membership = Membership::initial(voters(members)).expect("a valid roster");
    Learner { membership, ..Learner::default() }
}

fn leader_of(members: &[u32], me: u32) -> (Proposer, Vec<(u32, Role, Message)>) {
    let mut p = Proposer::new(me, members.to_vec(), 42, 0);
    let mut out = Vec::new();
    p.start_election(0, 0, &mut out);
    for &m in members.iter().take(members.len() / 2 + 1) {
        p.on_promise(
            m,
            Promise { ballot: p.ballot, accepted: vec![], log_start: 0 },
            0,
            &learner_of(members),
            &mut out,
        );
    }
    assert!(p.is_leader());
    (p, out)
}

/// §2.3: a value is chosen when a majority of acceptors accepted it — not before.
#[test]
fn majority_of_accepts_chooses() {
    let members = [1, 2, 3, 4, 5];
    let (mut p, _) = leader_of(&members, 1);
    p.enqueue(vec![cmd(7, 1, put("k", "v"))]);
    let mut out = Vec::new();
    p.flush(0, &learner_of(&members), &mut out);
    let slot = out
        .iter()
        .find_map(|(_, _, m)| match m {
            Message::Accept { slot, .. } => Some(*slot),
            _ => None,
        })
        .expect("an accept was sent");
    let ballot = p.ballot;
    assert_eq!(p.on_accepted(1, ballot, slot, &learner_of(&members).membership), None);
    assert_eq!(p.on_accepted(2, ballot, slot, &learner_of(&members).membership), None);
    assert_eq!(
        p.on_accepted(2, ballot, slot, &learner_of(&members).membership),
        None,
        "the same acceptor twice is still two votes short"
    );
    assert_eq!(
        p.on_accepted(3, b(ballot.round - 1, 3), slot, &learner_of(&members).membership),
        None,
        "an accept of another ballot does not count"
    );
    let chosen = p.on_accepted(3, ballot, slot, &learner_of(&members).membership);
    assert!(matches!(chosen, Some((s, Value::Batch(_))) if s == slot));
}

/// §2.2 P2c: a new leader re-proposes, per slot, the value accepted under the highest ballot.
#[test]
fn new_leader_adopts_highest_ballot_accepted_value() {
    let members = [1, 2, 3, 4, 5];
    let mut p = Proposer::new(2, members.to_vec(), 1, 0);
    p.observe(b(7, 1));
    let mut out = Vec::new();
    p.start_election(0, 0, &mut out);
    let ballot = p.ballot;
    assert!(ballot > b(7, 1));
    p.on_promise(
        1,
        Promise { ballot, accepted: vec![(0, b(3, 1), batch("old"))], log_start: 0 },
        0,
        &learner_of(&members),
        &mut out,
    );
    p.on_promise(
        2,
        Promise { ballot, accepted: vec![(0, b(6, 3), batch("newest"))], log_start: 0 },
        0,
        &learner_of(&members),
        &mut out,
    );
    out.clear();
    p.on_promise(
        3,
        Promise { ballot, accepted: vec![(0, b(5, 4), batch("middle"))], log_start: 0 },
        0,
        &learner_of(&members),
        &mut out,
    );
    assert!(p.is_leader());
    let proposed: Vec<_> = out
        .iter()
        .filter_map(|(_, _, m)| match m {
            Message::Accept { slot: 0, value, ballot: bb } if *bb == ballot => Some(value.clone()),
            _ => None,
        })
        .collect();
    assert!(!proposed.is_empty());
    assert!(proposed.iter().all(|v| *v == batch("newest")), "{proposed:?}");
}

/// §3: gaps in the log below the highest accepted slot are filled with no-ops.
#[test]
fn gaps_become_noops() {
    let members = [1, 2, 3];
    let mut p = Proposer::new(1, members.to_vec(), 1, 0);
    let mut out = Vec::new();
    p.start_election(0, 0, &mut out);
    let ballot = p.ballot;
    p.on_promise(1, Promise { ballot, accepted: vec![], log_start: 0 }, 0, &learner_of(&members), &mut out);
    out.clear();
    p.on_promise(
        2,
        Promise { ballot, accepted: vec![(2, b(1, 3), batch("two"))], log_start: 0 },
        0,
        &learner_of(&members),
        &mut out,
    );
    let mut proposed = std::collections::BTreeMap::new();
    for (_, _, m) in &out {
        if let Message::Accept { slot, value, .. } = m {
            proposed.insert(*slot, value.clone());
        }
    }
    assert_eq!(proposed.get(&0), Some(&Value::Noop));
    assert_eq!(proposed.get(&1), Some(&Value::Noop));
    assert_eq!(proposed.get(&2), Some(&batch("two")));
    assert_eq!(p.next_slot, 3);
}

/// A follower hands a client request to the leader it knows (it never proposes itself).
#[test]
fn followers_forward_to_leader() {
    let mut sim = Sim::new(5, 11);
    let leader = sim.wait_for_leader();
    let follower = if leader == 1 { 2 } else { 1 };
    sim.run_for(200);
    let node = sim.nodes.get_mut(&follower).expect("follower");
    let request = Request { id: 99, client: 5, seq: 1, command: put("a", "1") };
    let effects = node.step(sim.now_ms + 1, vec![Event::Request(request)]);
    let forwards: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(env) => Some(env),
            _ => None,
        })
        .filter(|env| matches!(message::decode::<Message>(&env.payload), Ok(Message::Forward { .. })))
        .collect();
    assert_eq!(forwards.len(), 1, "{effects:?}");
    assert_eq!(forwards[0].dst, leader);
    assert_eq!(forwards[0].role, Role::Proposer);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Send(env) if env.role == Role::Acceptor)),
        "a follower must not propose"
    );
}

/// §3: learners apply chosen commands strictly in slot order, whatever order they learn them.
#[test]
fn commands_apply_in_slot_order() {
    let mut learner = Learner::default();
    learner.learn(2, Value::Batch(vec![cmd(1, 3, put("k", "third"))]));
    assert!(learner.apply_ready().is_empty(), "slot 2 must wait for 0 and 1");
    learner.learn(0, Value::Batch(vec![cmd(1, 1, put("k", "first"))]));
    assert_eq!(learner.apply_ready().len(), 1);
    assert_eq!(learner.kv.data["k"], b"first");
    learner.learn(1, Value::Noop);
    let applied = learner.apply_ready();
    assert_eq!(applied.len(), 1);
    assert_eq!(learner.kv.data["k"], b"third");
    assert_eq!(learner.next_apply, 3);
    assert!(!learner.learn(1, Value::Noop), "an applied slot is not learned again");
}

/// Exactly-once: a retried write (same client and seq) applies once and gets the first answer.
#[test]
fn duplicate_client_seq_applies_once() {
    let mut kv = Kv::default();
    assert_eq!(kv.apply(0, 9, 1, &delete("k")), Outcome::Removed(false));
    assert_eq!(kv.apply(1, 9, 2, &put("k", "a")), Outcome::Done);
    assert_eq!(kv.apply(2, 10, 1, &put("k", "b")), Outcome::Done);
    // The retry of client 9's seq 2 arrives after client 10 overwrote the key.
    assert_eq!(kv.apply(3, 9, 2, &put("k", "a")), Outcome::Done);
    assert_eq!(kv.data["k"], b"b", "the retry must not apply again");
    assert_eq!(kv.apply(4, 9, 3, &delete("k")), Outcome::Removed(true));
    assert_eq!(kv.apply(5, 9, 3, &delete("k")), Outcome::Removed(true), "same answer as the first time");
    assert!(matches!(kv.apply(6, 9, 1, &put("k", "old")), Outcome::Rejected(_)), "a stale seq never applies");
    assert!(!kv.data.contains_key("k"));
}

/// The same through the whole cluster: a retry sent to another replica applies once.
#[test]
fn duplicate_request_through_two_replicas_applies_once() {
    let mut sim = Sim::new(5, 3);
    sim.wait_for_leader();
    assert_eq!(sim.call(1, 77, 1, put("counter", "1")), Outcome::Done);
    assert_eq!(sim.call(2, 78, 1, put("counter", "2")), Outcome::Done);
    assert_eq!(sim.call(3, 77, 1, put("counter", "1")), Outcome::Done);
    assert_eq!(sim.call(4, 79, 1, get("counter")), Outcome::Value(Some(b"2".to_vec())));
}

/// Liveness with randomized timeouts: two proposers that start phase 1 at the same moment
/// (and keep pre-empting each other) still converge on one leader, and requests complete.
#[test]
fn duelling_proposers_converge() {
    for seed in 0..20 {
        let mut sim = Sim::new(5, seed);
        sim.run_for(20);
        // Force nodes 1 and 2 into elections at the same instant, three times over.
        for _ in 0..3 {
            for id in [1, 2] {
                let now = sim.now_ms;
                let node = sim.nodes.get_mut(&id).expect("node");
                node.proposer.election_deadline_ms = now;
            }
            sim.run_for(30);
        }
        let leader = sim.wait_for_leader();
        let outcome = sim.call(leader, 1, 1, put("duel", "won"));
        assert_eq!(outcome, Outcome::Done, "seed {seed}");
        for id in 1..=5 {
            assert!(sim.run_until(2_000, |s| s.value_at(id, "duel").is_some()), "seed {seed}: node {id} never applied");
        }
    }
}

/// A majority keeps serving when a minority is cut off, and the minority catches up later.
#[test]
fn minority_failure_keeps_serving_and_catches_up() {
    let mut sim = Sim::new(5, 5);
    let leader = sim.wait_for_leader();
    let cut: Vec<u32> = (1..=5).filter(|&n| n != leader).take(2).collect();
    for &n in &cut {
        sim.isolated.insert(n);
    }
    let live = (1..=5).find(|n| *n != leader && !cut.contains(n)).expect("a live follower");
    for i in 0..20 {
        let outcome = sim.call(live, 5, i + 1, put(&format!("k{i}"), "v"));
        assert_eq!(outcome, Outcome::Done);
    }
    sim.isolated.clear();
    for &n in &cut {
        assert!(sim.run_until(5_000, |s| s.value_at(n, "k19").is_some()), "node {n} did not catch up");
    }
}

/// Safety across leader failure: the old leader crashes, a new one is elected, every write
/// acknowledged before is still there, and the restarted node (from its WAL) agrees.
#[test]
fn leader_crash_keeps_acknowledged_writes() {
    let mut sim = Sim::new(5, 9);
    let first = sim.wait_for_leader();
    for i in 0..10 {
        assert_eq!(sim.call(first, 3, i + 1, put(&format!("k{i}"), &format!("v{i}"))), Outcome::Done);
    }
    sim.crash(first);
    let second = sim.wait_for_leader();
    assert_ne!(first, second);
    assert_eq!(sim.call(second, 4, 1, get("k9")), Outcome::Value(Some(b"v9".to_vec())));
    assert_eq!(sim.call(second, 4, 2, put("after", "crash")), Outcome::Done);
    sim.restart(first);
    assert!(sim.run_until(5_000, |s| s.value_at(first, "after").is_some()));
    for i in 0..10 {
        assert_eq!(sim.value_at(first, &format!("k{i}")), Some(format!("v{i}").into_bytes()));
    }
}

/// §2 rule made visible to the host: the record an acceptor must not forget comes before the
/// answer in the step's effects, so the host can make it durable before sending.
#[test]
fn acceptor_persists_before_answering() {
    let config = Config {
        me: 2,
        members: waxos_guest::membership::voters(&[1, 2, 3]),
        seed: 1,
        test_hooks: false,
        retain_slots: 1_000,
        rejoining: false,
    };
    let mut replica = Replica::start(config, None, &[]).expect("start");
    let prepare = message::encode(&Message::Prepare { ballot: b(4, 1), first_slot: 0 });
    let env = waxos_guest::types::Envelope { src: 1, dst: 2, role: Role::Acceptor, payload: prepare };
    let effects = replica.step(10, vec![Event::Message(env)]);
    let persist = effects.iter().position(|e| matches!(e, Effect::Persist(_))).expect("a persist");
    let send = effects.iter().position(|e| matches!(e, Effect::Send(_))).expect("a send");
    assert!(persist < send, "{effects:?}");
    // And a restart from those records remembers the promise.
    let wal: Vec<Vec<u8>> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Persist(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let config = Config {
        me: 2,
        members: waxos_guest::membership::voters(&[1, 2, 3]),
        seed: 1,
        test_hooks: false,
        retain_slots: 1_000,
        rejoining: false,
    };
    let restarted = Replica::start(config, None, &wal).expect("restart");
    assert_eq!(restarted.acceptor.promised, b(4, 1));
}

/// Snapshots round-trip all durable state; a snapshot from a newer format is refused.
#[test]
fn snapshot_round_trips_and_refuses_newer_format() {
    let mut sim = Sim::new(3, 21);
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 1, 1, put("snap", "shot")), Outcome::Done);
    let snapshot = sim.nodes[&leader].snapshot(false);
    let config = sim.nodes[&leader].config().clone();
    let restored = Replica::start(config.clone(), Some(&snapshot), &[]).expect("restore");
    assert_eq!(restored.learner.kv.data.get("snap"), Some(&b"shot".to_vec()));
    assert_eq!(restored.acceptor.promised, sim.nodes[&leader].acceptor.promised);
    assert_eq!(restored.learner.kv.sessions, sim.nodes[&leader].learner.kv.sessions, "fingerprints included");
    let mut newer = snapshot.clone();
    newer[0] = message::SNAPSHOT_VERSION + 1;
    let err = Replica::start(config, Some(&newer), &[]).expect_err("must refuse");
    assert!(err.contains("newer"), "{err}");
}

/// Garbage from a peer is logged and dropped; the replica keeps working.
#[test]
fn undecodable_and_unknown_sender_messages_are_dropped() {
    let config = Config {
        me: 1,
        members: waxos_guest::membership::voters(&[1, 2, 3]),
        seed: 1,
        test_hooks: false,
        retain_slots: 1_000,
        rejoining: false,
    };
    let mut replica = Replica::start(config, None, &[]).expect("start");
    // Start-up effects (the new log's first record) are the host's to carry out first.
    let _ = replica.take_effects();
    let garbage =
        waxos_guest::types::Envelope { src: 2, dst: 1, role: Role::Acceptor, payload: vec![1, 0xff, 0xff, 0xff] };
    let stranger = waxos_guest::types::Envelope {
        src: 9,
        dst: 1,
        role: Role::Acceptor,
        payload: message::encode(&Message::Prepare { ballot: b(9, 9), first_slot: 0 }),
    };
    let effects = replica.step(10, vec![Event::Message(garbage), Event::Message(stranger)]);
    let logs = effects.iter().filter(|e| matches!(e, Effect::Log(l) if l.starts_with("dropped"))).count();
    assert_eq!(logs, 2, "{effects:?}");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Send(_) | Effect::Persist(_))));
    assert_eq!(replica.acceptor.promised, Ballot::ZERO);
    assert!(matches!(replica.proposer.phase, Phase::Follower));
}

/// Bad input from a client is refused with a reason, never proposed.
#[test]
fn oversize_and_empty_keys_are_rejected() {
    let config = Config {
        me: 1,
        members: waxos_guest::membership::voters(&[1]),
        seed: 1,
        test_hooks: false,
        retain_slots: 1_000,
        rejoining: false,
    };
    let mut replica = Replica::start(config, None, &[]).expect("start");
    let long = "k".repeat(1025);
    let events = vec![
        Event::Request(Request { id: 1, client: 1, seq: 1, command: put("", "v") }),
        Event::Request(Request { id: 2, client: 1, seq: 2, command: put(&long, "v") }),
        Event::Request(Request { id: 3, client: 1, seq: 3, command: Command::Put("k".into(), vec![0; (1 << 20) + 1]) }),
    ];
    let effects = replica.step(10, events);
    let rejected = effects.iter().filter(|e| matches!(e, Effect::Reply(_, Outcome::Rejected(_)))).count();
    assert_eq!(rejected, 3, "{effects:?}");
}

/// Latency: the leader's accept to its own acceptor goes out through the host (and comes back in
/// a later step), so the step that proposes has no record to fsync before its accepts leave;
/// and the reply to a write waits for no fsync at the leader either — the chosen record is lazy,
/// since a chosen value is by definition durable on a majority of acceptors already.
#[test]
fn a_write_waits_for_no_leader_fsync_before_its_accepts_or_its_reply() {
    let mut sim = Sim::new(5, 31);
    let leader = sim.wait_for_leader();
    sim.run_for(500);
    let now = sim.now_ms + 10;
    let replica = sim.nodes.get_mut(&leader).expect("leader");
    let request = Request { id: 99, client: 5, seq: 1, command: put("k", "v") };
    let effects = replica.step(now, vec![Event::Request(request)]);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Persist(_))), "proposing step must not fsync: {effects:?}");
    let accepts: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(env) => match message::decode::<Message>(&env.payload) {
                Ok(Message::Accept { ballot, slot, .. }) => Some((env.dst, ballot, slot)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(accepts.len(), 5, "an accept to every acceptor, the leader's own included: {accepts:?}");
    let (_, ballot, slot) = accepts[0];
    let own = effects
        .into_iter()
        .find_map(|e| match e {
            Effect::Send(env) if env.dst == leader => Some(env),
            _ => None,
        })
        .expect("own accept");
    // The own accept comes back: now the leader's acceptor persists (strictly) and votes.
    let effects = replica.step(now + 1, vec![Event::Message(own)]);
    assert!(effects.iter().any(|e| matches!(e, Effect::Persist(_))), "the own acceptor's record is strict");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Reply(..))), "one vote is no majority");
    // Two followers' votes complete the majority: the reply leaves with only a lazy record.
    let followers: Vec<u32> = (1..=5).filter(|&n| n != leader).take(2).collect();
    let votes = followers
        .iter()
        .map(|&src| {
            let payload = message::encode(&Message::Accepted { ballot, slot });
            Event::Message(waxos_guest::types::Envelope { src, dst: leader, role: Role::Proposer, payload })
        })
        .collect();
    let effects = replica.step(now + 2, votes);
    assert!(effects.contains(&Effect::Reply(99, Outcome::Done)), "the write is answered: {effects:?}");
    assert!(effects.iter().any(|e| matches!(e, Effect::PersistLazy(_))), "the chosen record is kept, lazily");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Persist(_))), "no fsync before the reply");
}
