//! Client sessions (issue 12, item 5): a `(client, seq)` pair names one request. A retry of
//! that request gets its original answer and applies nothing again; the pair used again for
//! another request (another operation, key or value) is refused (`reused …`), on every path a
//! request can take, and never answered with the first request's outcome.

mod common;

use common::{delete, get, put, Sim};
use waxos_guest::kv::Session;
use waxos_guest::learner::AppState;
use waxos_guest::message::{self, DecodeError, Message, Record};
use waxos_guest::replica::Replica;
use waxos_guest::types::{Command, Config, Effect, Envelope, Event, NodeId, Outcome, Role};

/// Snapshots written by the build before fingerprints (format 1), from a one-replica cluster
/// (`fixtures/README.md` says how): client 2 read `k` (seq 1, through the log, before any
/// write), client 1 put `k = a` (seq 1), client 5 put `k = b` (seq 1), client 3 deleted `gone`
/// (seq 1). So `k` is `b`, and a second application of client 1's put would make it `a`.
const V1_SNAPSHOT: &[u8] = include_bytes!("fixtures/v1-snapshot.bin");
/// The same state machine as a snapshot transfer (`AppState`, format 1) carries it.
const V1_APP_STATE: &[u8] = include_bytes!("fixtures/v1-appstate.bin");

fn is_reused(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Rejected(reason) if reason.starts_with("reused seq: (client"))
}

fn assert_reused(outcome: Outcome, what: &str) {
    assert!(is_reused(&outcome), "{what}: expected a `reused` refusal, got {outcome:?}");
}

/// Every replica applied the same and holds `value` under `key`.
fn assert_everywhere(sim: &mut Sim, key: &str, value: Option<&str>) {
    sim.run_for(500);
    let ids: Vec<NodeId> = sim.nodes.keys().copied().collect();
    for n in ids {
        assert_eq!(sim.value_at(n, key).as_deref(), value.map(str::as_bytes), "{key} at node {n}");
    }
}

fn follower_of(sim: &Sim, leader: NodeId) -> NodeId {
    *sim.nodes.keys().find(|&&n| n != leader).expect("a follower")
}

#[test]
fn the_same_pair_with_another_value_key_or_operation_is_refused_and_applies_nothing() {
    let mut sim = Sim::new(5, 61);
    let leader = sim.wait_for_stable_leader();
    let follower = follower_of(&sim, leader);
    assert_eq!(sim.call(leader, 7, 1, put("k", "a")), Outcome::Done);
    // The pair again, with another value: the answer used to be `Done`, with nothing applied.
    assert_reused(sim.call(leader, 7, 1, put("k", "b")), "another value at the leader");
    assert_reused(sim.call(follower, 7, 1, put("k", "b")), "another value at a follower");
    assert_reused(sim.call(leader, 7, 1, put("k2", "a")), "another key");
    assert_reused(sim.call(leader, 7, 1, delete("k")), "another operation");
    assert_everywhere(&mut sim, "k", Some("a"));
    assert_everywhere(&mut sim, "k2", None);
    // A genuine retry still gets the original answer, and applies once: another client's write
    // in between is not overwritten by it.
    assert_eq!(sim.call(leader, 8, 1, put("k", "c")), Outcome::Done);
    assert_eq!(sim.call(follower, 7, 1, put("k", "a")), Outcome::Done, "a retry");
    assert_eq!(sim.call(leader, 7, 1, put("k", "a")), Outcome::Done, "a retry");
    assert_everywhere(&mut sim, "k", Some("c"));
    // The same for a delete's pair.
    assert_eq!(sim.call(leader, 7, 2, delete("k")), Outcome::Removed(true));
    assert_reused(sim.call(leader, 7, 2, delete("k2")), "a delete's pair, another key");
    assert_reused(sim.call(leader, 7, 2, put("k", "z")), "a delete's pair, a put");
    assert_eq!(sim.call(leader, 7, 2, delete("k")), Outcome::Removed(true), "a delete's retry: the original answer");
    assert_everywhere(&mut sim, "k", None);
}

/// A GET with a PUT's pair used to get the PUT's `Done` (the host's INTERNAL) through the log;
/// on the paths outside the log (ReadIndex at the leader, a follower read, a stale read) it
/// must be refused as well, not answered with the value.
#[test]
fn a_read_with_a_writes_pair_is_refused_on_every_read_path() {
    let mut sim = Sim::new(5, 62);
    let leader = sim.wait_for_stable_leader();
    let follower = follower_of(&sim, leader);
    assert_eq!(sim.call(leader, 9, 1, put("k", "a")), Outcome::Done);
    sim.run_for(300);
    assert_reused(sim.call(leader, 9, 1, get("k")), "ReadIndex at the leader");
    assert_reused(sim.call(follower, 9, 1, get("k")), "a follower read");
    assert_reused(sim.call(follower, 9, 1, Command::GetStale("k".into())), "a stale read");
    // Through the log (a replica that knows no leader holds the read; then it is proposed).
    let mut sim = Sim::new(3, 63);
    let write = sim.request(1, 9, 1, put("k", "a"));
    let read = sim.request(1, 9, 1, get("k"));
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&write) && s.replies.contains_key(&read)));
    assert_eq!(sim.replies[&write], Outcome::Done);
    assert_reused(sim.replies[&read].clone(), "a read through the log");
    // A read of its own pair is just read again.
    assert_eq!(sim.call(1, 9, 2, get("k")), Outcome::Value(Some(b"a".to_vec())));
    assert_eq!(sim.call(1, 9, 2, get("k")), Outcome::Value(Some(b"a".to_vec())));
}

/// A write with a read's pair used to be refused as `seq … was already used by a read`, which
/// the host answered `UNAVAILABLE` (retry for ever).
#[test]
fn a_write_with_a_reads_pair_is_refused_as_reused() {
    let mut sim = Sim::new(3, 64);
    // Before any leader is known, the read goes through the log and leaves a session.
    let read = sim.request(2, 11, 1, get("k"));
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&read)));
    assert_eq!(sim.replies[&read], Outcome::Value(None));
    let leader = sim.wait_for_leader();
    assert_reused(sim.call(leader, 11, 1, put("k", "a")), "a put with a read's pair");
    assert_reused(sim.call(leader, 11, 1, delete("k")), "a delete with a read's pair");
    assert_reused(sim.call(leader, 11, 1, get("other")), "a read of another key with a read's pair");
    assert_everywhere(&mut sim, "k", None);
    // A read served outside the log leaves no session (only the log is replicated): a write
    // with its pair is a new request, applied and answered truthfully.
    assert_eq!(sim.call(leader, 11, 2, get("k")), Outcome::Value(None));
    assert_eq!(sim.call(leader, 11, 2, put("k", "b")), Outcome::Done);
    assert_everywhere(&mut sim, "k", Some("b"));
}

/// Two requests with one pair but different commands waiting at once (at the leader, or
/// forwarded by a follower): the leader proposes both, the first in the log is applied, and the
/// second must get its own refusal, not the first one's `Done`.
#[test]
fn a_different_command_with_a_pair_in_flight_is_not_answered_with_the_first_ones_outcome() {
    let mut sim = Sim::new(5, 65);
    let leader = sim.wait_for_stable_leader();
    let follower = follower_of(&sim, leader);
    for (client, at) in [(21, leader), (22, follower)] {
        let first = sim.request(at, client, 1, put("k", &format!("first-{client}")));
        let second = sim.request(at, client, 1, put("k", &format!("second-{client}")));
        let read = sim.request(at, client, 1, get("k"));
        assert!(sim.run_until(10_000, |s| [first, second, read].iter().all(|id| s.replies.contains_key(id))));
        assert_eq!(sim.replies[&first], Outcome::Done, "client {client}");
        assert_reused(sim.replies[&second].clone(), "the second put in flight");
        // Answered outside the log, the read may come before the put is applied (its value
        // then is the one before); after, it is refused. Never the put's `Done`.
        assert!(
            is_reused(&sim.replies[&read]) || matches!(sim.replies[&read], Outcome::Value(_)),
            "the read in flight: {:?}",
            sim.replies[&read]
        );
        assert_everywhere(&mut sim, "k", Some(&format!("first-{client}")));
    }
    // The same pair from two replicas at once: one is applied, the other refused.
    let a = sim.request(leader, 23, 1, put("j", "a"));
    let b = sim.request(follower, 23, 1, put("j", "b"));
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&a) && s.replies.contains_key(&b)));
    let (won, lost) = if sim.replies[&a] == Outcome::Done { ("a", b) } else { ("b", a) };
    assert_reused(sim.replies[&lost].clone(), "the pair from another replica");
    assert_everywhere(&mut sim, "j", Some(won));
}

fn one_replica_config() -> Config {
    Config {
        me: 1,
        members: waxos_guest::membership::voters(&[1]),
        seed: 7,
        test_hooks: false,
        retain_slots: 1_000,
        rejoining: false,
    }
}

fn sessions(replica: &Replica) -> Vec<(u64, Session)> {
    replica.learner.kv.sessions.iter().map(|(c, s)| (*c, s.clone())).collect()
}

/// A snapshot of format 1 (sessions without fingerprints) loads; its sessions keep
/// exactly-once. For them only the kind of operation is known (from the outcome they
/// remember), so a pair reused for another kind is refused, and a put of the same kind with
/// another value gets the old answer as before (nothing is applied either way).
#[test]
fn a_snapshot_of_format_1_loads_and_keeps_exactly_once_for_its_sessions() {
    assert_eq!(V1_SNAPSHOT[0], 1, "the fixture is of format 1");
    let replica = Replica::start(one_replica_config(), Some(V1_SNAPSHOT), &[]).expect("a v1 snapshot loads");
    assert_eq!(replica.learner.kv.data.get("k"), Some(&b"b".to_vec()));
    let migrated = sessions(&replica);
    assert_eq!(migrated.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![1, 2, 3, 5]);
    assert!(migrated.iter().all(|(_, s)| s.seq == 1 && s.fingerprint.is_none()), "{migrated:?}");
    let mut sim = Sim::new(1, 7);
    sim.nodes.insert(1, replica);
    sim.wait_for_leader();
    // Retries: the original answers, applied once (client 1's put does not overwrite `b`).
    assert_eq!(sim.call(1, 1, 1, put("k", "a")), Outcome::Done);
    assert_eq!(sim.call(1, 3, 1, delete("gone")), Outcome::Removed(false));
    assert_eq!(sim.call(1, 2, 1, get("k")), Outcome::Value(Some(b"b".to_vec())), "a read again");
    assert_eq!(
        sim.call(1, 1, 0, put("k", "a")),
        Outcome::Rejected("stale request: client 0x1 already applied seq 1 > 0".into())
    );
    assert_eq!(sim.value_at(1, "k"), Some(b"b".to_vec()));
    // Another kind of operation with a v1 session's pair: refused.
    assert_reused(sim.call(1, 1, 1, get("k")), "a read with a v1 put's pair");
    assert_reused(sim.call(1, 5, 1, delete("k")), "a delete with a v1 put's pair");
    assert_reused(sim.call(1, 3, 1, put("gone", "x")), "a put with a v1 delete's pair");
    assert_reused(sim.call(1, 2, 1, put("k", "z")), "a put with a v1 read's pair");
    // The same kind with another value: unknown for a v1 session, so the remembered answer as
    // before (and nothing applied).
    assert_eq!(sim.call(1, 1, 1, put("k", "other")), Outcome::Done);
    assert_eq!(sim.value_at(1, "k"), Some(b"b".to_vec()), "nothing applied");
    // A new seq is fingerprinted.
    assert_eq!(sim.call(1, 1, 2, put("k", "c")), Outcome::Done);
    assert_reused(sim.call(1, 1, 2, put("k", "d")), "another value for a new session");
    assert_eq!(sim.value_at(1, "k"), Some(b"c".to_vec()));
    // The next snapshot is of this build's format and keeps both kinds of session.
    let snapshot = sim.nodes[&1].snapshot(false);
    assert_eq!(snapshot[0], message::SNAPSHOT_VERSION);
    let again = Replica::start(one_replica_config(), Some(&snapshot), &[]).expect("restart from this build's format");
    let kept = sessions(&again);
    assert!(kept.iter().find(|(c, _)| *c == 1).is_some_and(|(_, s)| s.seq == 2 && s.fingerprint.is_some()));
    assert!(kept.iter().find(|(c, _)| *c == 5).is_some_and(|(_, s)| s.seq == 1 && s.fingerprint.is_none()));
}

/// A state transfer from the build before fingerprints (an `Installed` record in its log, or a
/// snapshot sent by such a peer) is read. This build's transfers keep format 1's bytes, so a
/// lagging replica of the older build can still install them in the middle of a rolling
/// upgrade, and carry the fingerprints after them, in a trailer older builds ignore.
#[test]
fn state_transfers_are_read_from_and_readable_by_the_build_before_fingerprints() {
    assert_eq!(V1_APP_STATE[0], 1, "the fixture is of format 1");
    let record = message::encode(&Record::Installed(V1_APP_STATE.to_vec()));
    let replica = Replica::start(one_replica_config(), None, &[record]).expect("a v1 Installed record replays");
    assert_eq!(replica.learner.next_apply, 4);
    assert_eq!(replica.learner.kv.data.get("k"), Some(&b"b".to_vec()));
    assert_eq!(sessions(&replica).len(), 4);
    // From a peer of the older build, in one chunk.
    let config = Config { members: waxos_guest::membership::voters(&[1, 2]), ..one_replica_config() };
    let mut replica = Replica::start(config, None, &[]).expect("start");
    let chunk = Message::SnapshotChunk {
        next_apply: 4,
        offset: 0,
        total: V1_APP_STATE.len() as u64,
        bytes: V1_APP_STATE.to_vec(),
    };
    let envelope = Envelope { src: 2, dst: 1, role: Role::Learner, payload: message::encode(&chunk) };
    let effects = replica.step(1_000, vec![Event::Message(envelope)]);
    assert!(effects.iter().any(|e| matches!(e, Effect::Persist(_))), "installed and recorded: {effects:?}");
    assert_eq!(replica.learner.next_apply, 4);
    let installed = sessions(&replica);
    assert_eq!(installed.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![1, 2, 3, 5]);
    assert!(installed.iter().all(|(_, s)| s.fingerprint.is_none()));
    // What this build sends for the same state: the older build's bytes exactly, then the
    // trailer (its version, no fingerprints known here), then the membership.
    let ours = replica.learner.app_state().encode();
    assert_eq!(&ours[..V1_APP_STATE.len()], V1_APP_STATE, "format 1's bytes, which the older build reads");
    assert_eq!(&ours[V1_APP_STATE.len()..V1_APP_STATE.len() + 2], &[1, 0]);
    assert_eq!(&ours[V1_APP_STATE.len() + 2..], &replica.learner.membership.encode()[..]);
    // Fingerprints travel in the trailer.
    let mut state = replica.learner.app_state();
    assert_eq!(state.kv.apply(4, 9, 1, &put("j", "x")), Outcome::Done);
    state.next_apply = 5;
    let fingerprint = state.kv.sessions[&9].fingerprint;
    assert!(fingerprint.is_some());
    let bytes = state.encode();
    let back = AppState::decode(&bytes).expect("decode");
    assert_eq!(back.kv.sessions, state.kv.sessions, "fingerprints included");
    // An older build reads the prefix only (what `decode` makes of it without the trailer).
    let membership_len = state.membership.as_ref().map_or(0, |m| m.encode().len());
    let trailers_len = message::encode_as(1, &vec![(9u64, fingerprint.unwrap())]).len() + membership_len;
    let v1_part = &bytes[..bytes.len() - trailers_len];
    let prefix = AppState::decode(v1_part).expect("the format-1 part alone");
    assert_eq!(prefix.kv.data, state.kv.data);
    assert_eq!(prefix.kv.sessions[&9].fingerprint, None);
    assert!(matches!(AppState::decode(&[2, 0]), Err(DecodeError::NewerVersion { found: 2, newest: 1 })));
}

/// A replica that catches up by a snapshot from a peer holds the same sessions, fingerprints
/// included: it refuses a reused pair as the others do.
#[test]
fn a_replica_caught_up_by_snapshot_has_the_fingerprints() {
    let mut sim = Sim::with_retain(3, 66, 5);
    let leader = sim.wait_for_stable_leader();
    let lagging = follower_of(&sim, leader);
    sim.isolated.insert(lagging);
    assert_eq!(sim.call(leader, 31, 1, put("k", "a")), Outcome::Done);
    for i in 0..40 {
        assert_eq!(sim.call(leader, 32, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    assert!(sim.nodes[&leader].learner.log_start > 0, "the leader dropped old slots");
    sim.isolated.clear();
    assert!(sim.run_until(5_000, |s| s.value_at(lagging, "k39").is_some()), "no catch-up");
    assert!(sim.nodes[&lagging].learner.log_start > 0, "caught up by a snapshot");
    assert_eq!(sim.nodes[&lagging].learner.kv.sessions, sim.nodes[&leader].learner.kv.sessions);
    assert!(sim.nodes[&lagging].learner.kv.sessions[&31].fingerprint.is_some());
    assert_reused(sim.call(lagging, 31, 1, Command::GetStale("k".into())), "a stale read at the caught-up replica");
}
