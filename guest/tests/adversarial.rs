//! Adversarial tests: each tries to break a Paxos rule (agreement, a wiped acceptor never voting
//! against what it forgot, fresh linearizable reads) with an exact interleaving or a seeded chaos run
//! on the in-memory harness. Two found real bugs (fixed; planted again by `bug-fence-without-nonce`
//! and `bug-snapshot-forgets-rejoin`).

mod common;

use std::collections::BTreeMap;

use common::{put, voting, Fate, Lcg, Sim};
use waxos_guest::message::{self, Message, Value};
use waxos_guest::replica::Replica;
use waxos_guest::types::{Envelope, NodeId, Outcome};

/// Records every slot every replica has in its learner log into `learned`; panics on a second
/// value for a slot (Paxos Made Simple §2.3, Agreement).
fn record_learned(sim: &Sim, learned: &mut BTreeMap<u64, (NodeId, Value)>) {
    for (n, r) in &sim.nodes {
        for (slot, value) in &r.learner.chosen {
            let first = learned.entry(*slot).or_insert_with(|| (*n, value.clone()));
            assert_eq!(
                &first.1, value,
                "slot {slot} learned with two values: node {} has {:?}, node {n} has {:?}",
                first.0, first.1, value
            );
        }
    }
}

fn run_recording(sim: &mut Sim, ms: u64, learned: &mut BTreeMap<u64, (NodeId, Value)>) {
    let end = sim.now_ms + ms;
    while sim.now_ms < end {
        sim.tick();
        record_learned(sim, learned);
    }
}

fn is_msg(env: &Envelope, f: impl Fn(&Message) -> bool) -> bool {
    message::decode::<Message>(&env.payload).is_ok_and(|m| f(&m))
}

/// Rule 1/2 (Agreement; a wiped acceptor never votes against an accept it made before the
/// wipe) across a restart from a *snapshot* plus later WAL records.
///
/// The rejoiner's fence log start `L` is durable only implicitly: a WAL restart rebuilds it
/// from `rejoined_before` (a `Voting(false)` record in the replayed records). When the host
/// compacted while the replica was still fencing, the snapshot says `voting: false,
/// acceptor_log_start: 0` and the WAL after it holds `Promised(B_f)`, the adopted accepts, the
/// catch-up and `Voting(true)` — but no `Voting(false)`. The restarted acceptor then votes with
/// `log_start` 0 and no record of slots below `L`, which its earlier incarnation accepted.
///
/// n = 5. x leads with {x, y, r}; u and w are cut off from x, y (and their learners get
/// nothing), so they accepted none of slots 0..40. r is wiped; the host compacts r right away
/// (snapshot before the fence); r fences (u answers too), catches up, votes. r crashes and
/// restarts from that snapshot + the WAL after it. Partition {x, y} | {r, u, w}; r's pre-votes
/// are lost, so u (which applied nothing) is elected with promises from {u, w, r}: nobody
/// reports anything below L, nobody's log start says "behind", and u fills slots 0..L with
/// no-ops that r accepts — slot 0 chosen twice.
#[test]
fn a_rejoiner_restarted_from_a_snapshot_taken_before_its_fence_keeps_the_fence_log_start() {
    let mut sim = Sim::with_retain(5, 7001, 10);
    sim.wait_for_leader();
    sim.run_for(1_000);
    let x = sim.wait_for_stable_leader();
    let others: Vec<NodeId> = (1..=5).filter(|&n| n != x).collect();
    let (y, r, u, w) = (others[0], others[1], others[2], others[3]);
    let mut learned = BTreeMap::new();
    // u and w see nothing of x and y; their learners get nothing from anyone.
    sim.partition(&[u, w], &[x, y, r]);
    sim.learner_blocked.extend([u, w]);
    run_recording(&mut sim, 1_000, &mut learned);
    assert_eq!(sim.leaders(), vec![x]);
    for i in 0..40 {
        assert_eq!(sim.call(x, 1, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
        record_learned(&sim, &mut learned);
    }
    assert!(sim.nodes[&x].acceptor.log_start > 5, "x compacted its acceptor");
    assert!(sim.nodes[&r].acceptor.accepted.is_empty() || sim.nodes[&r].acceptor.log_start > 0);

    // r loses its disk; the host compacts its fresh log at once (snapshot before the fence).
    sim.wipe_and_restart(r);
    let snap = sim.nodes[&r].snapshot(false);
    let mark = sim.wal.get(&r).map_or(0, |w| w.len());
    // r can reach u and w again (their learners stay blocked).
    sim.cut.retain(|&(a, b)| !((a == r || b == r) && [u, w].contains(&(a + b - r))));
    let voted_again = (0..2_000).any(|_| {
        sim.tick();
        record_learned(&sim, &mut learned);
        voting(&sim, r)
    });
    assert!(voted_again, "r never voted again");
    let fence_log_start = sim.nodes[&r].acceptor.log_start;
    eprintln!("r fenced; acceptor log start {fence_log_start}; applied {}", sim.nodes[&r].learner.next_apply);
    run_recording(&mut sim, 2_000, &mut learned);

    // r restarts from the snapshot taken before its fence and the WAL records after it.
    sim.crash(r);
    sim.partition(&[x, y], &[r, u, w]);
    let config = sim.nodes[&r].config().clone();
    let wal_after: Vec<Vec<u8>> = sim.wal.get(&r).map(|w| w[mark..].to_vec()).unwrap_or_default();
    let restarted = Replica::start(config, Some(&snap), &wal_after).expect("restart from snapshot + WAL");
    eprintln!(
        "r restarted: voting {}, acceptor log start {} (was {fence_log_start}), applied {}",
        restarted.status().contains("\"voting\":true"),
        restarted.acceptor.log_start,
        restarted.learner.next_apply
    );
    sim.nodes.insert(r, restarted);
    sim.crashed.remove(&r);
    // r's own pre-votes are lost, so one of u, w gets elected on the minority-of-knowledge side.
    sim.filter = Some(Box::new(move |env: &Envelope| {
        if env.src == r && is_msg(env, |m| matches!(m, Message::PreVote { .. })) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }));
    run_recording(&mut sim, 5_000, &mut learned);
    eprintln!("leaders now: {:?}", sim.leaders());
    sim.filter = None;
    sim.cut.clear();
    sim.learner_blocked.clear();
    run_recording(&mut sim, 5_000, &mut learned);
    // Slots 0..L are applied and compacted at once where the no-ops were chosen, so the learner
    // logs may no longer show both values: the state machines do.
    for n in 1..=5 {
        assert_eq!(
            sim.value_at(n, "k0"),
            Some(b"v".to_vec()),
            "node {n} lost the acknowledged write k0 (slot 0 chosen again, as a no-op): keys per node {:?}",
            (1..=5).map(|m| sim.nodes[&m].learner.kv.data.len()).collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Chaos with what the suite's chaos lacks: restarts from a host snapshot (`snapshot(false)` plus
// the WAL after it, as the host compacts), two replicas without their disks at once, duplicated
// messages, and linearizable reads (leader and follower ReadIndex) checked against writes
// acknowledged before each read was issued.
// ---------------------------------------------------------------------------------------------

use std::cell::RefCell;
use std::rc::Rc;
use waxos_guest::types::Command;

/// The host's compaction: everything appended is made durable, the snapshot becomes the base,
/// the WAL starts over.
fn compact(sim: &mut Sim, snaps: &mut BTreeMap<NodeId, Vec<u8>>, n: NodeId) {
    let pending = sim.unsynced.remove(&n).unwrap_or_default();
    sim.wal.entry(n).or_default().extend(pending);
    snaps.insert(n, sim.nodes[&n].snapshot(false));
    sim.wal.insert(n, Vec::new());
}

/// A crashed replica restarts from its snapshot (if any) and the WAL after it.
fn restart_from_disk(sim: &mut Sim, snaps: &BTreeMap<NodeId, Vec<u8>>, n: NodeId) {
    let config = sim.nodes[&n].config().clone();
    let wal = sim.wal.get(&n).cloned().unwrap_or_default();
    let replica = Replica::start(config, snaps.get(&n).map(|s| s.as_slice()), &wal).expect("restart from disk");
    sim.nodes.insert(n, replica);
    sim.crashed.remove(&n);
}

#[derive(Clone, Debug)]
enum Op {
    Write { key: usize, seq: u64 },
    Read { key: usize, floor: u64, node: NodeId, at: u64 },
}

fn seq_of(v: &Option<Vec<u8>>) -> u64 {
    v.as_ref().map_or(0, |b| String::from_utf8_lossy(b).parse().unwrap_or(0))
}

struct ChaosOpts {
    compact_non_voting: bool,
    max_unvoting: usize,
    ops: usize,
}

fn chaos_run(seed: u64, opts: &ChaosOpts) {
    const KEYS: usize = 4;
    let mut sim = Sim::with_retain(5, 9000 + seed, 4);
    let mut rng = Lcg(seed.wrapping_mul(7919) + 1);
    let dups: Rc<RefCell<Vec<Envelope>>> = Rc::new(RefCell::new(Vec::new()));
    {
        let dups = dups.clone();
        let mut frng = Lcg(seed ^ 0xd00d);
        sim.filter = Some(Box::new(move |env: &Envelope| match frng.below(40) {
            0 => Fate::Hold,
            1 => {
                dups.borrow_mut().push(env.clone());
                Fate::Deliver
            }
            2 => Fate::Drop,
            _ => Fate::Deliver,
        }));
    }
    let mut snaps: BTreeMap<NodeId, Vec<u8>> = BTreeMap::new();
    let mut learned: BTreeMap<u64, (NodeId, Value)> = BTreeMap::new();
    let mut ops: BTreeMap<u64, Op> = BTreeMap::new();
    let mut acked = [0u64; KEYS];
    let mut next_seq = [0u64; KEYS];
    let mut next_reader = 5000u64;
    let mut checked: usize = 0;
    let mut reads_ok = 0usize;
    let mut log = Vec::new();
    let check = |sim: &Sim,
                 learned: &mut BTreeMap<u64, (NodeId, Value)>,
                 ops: &mut BTreeMap<u64, Op>,
                 acked: &mut [u64; KEYS],
                 reads_ok: &mut usize,
                 log: &Vec<String>| {
        for (n, r) in &sim.nodes {
            for (slot, value) in &r.learner.chosen {
                let first = learned.entry(*slot).or_insert_with(|| (*n, value.clone()));
                assert_eq!(
                    &first.1, value,
                    "seed {seed}: slot {slot} learned twice (nodes {} and {n}); ops {log:?}",
                    first.0
                );
            }
        }
        let done: Vec<u64> = ops.keys().copied().filter(|id| sim.replies.contains_key(id)).collect();
        for id in done {
            let op = ops.remove(&id).expect("op");
            match (op, &sim.replies[&id]) {
                (Op::Write { key, seq }, Outcome::Done) => acked[key] = acked[key].max(seq),
                (Op::Read { key, floor, node, at }, Outcome::Value(v)) => {
                    let got = seq_of(v);
                    assert!(
                        got >= floor,
                        "seed {seed}: stale read of k{key} at node {node} (issued {at} ms): got seq {got}, but seq {floor} was acknowledged before; ops {log:?}"
                    );
                    *reads_ok += 1;
                }
                _ => {}
            }
        }
    };
    for _ in 0..opts.ops {
        let node = rng.below(5) as NodeId + 1;
        let up = !sim.crashed.contains(&node) && !sim.paused.contains(&node);
        let unvoting = (1..=5).filter(|&n| !voting(&sim, n)).count();
        let what = rng.below(26);
        let desc = format!("{}: op {what} node {node}", sim.now_ms);
        match what {
            0 if up && voting(&sim, node) && unvoting < opts.max_unvoting => {
                sim.wipe_and_restart(node);
                snaps.remove(&node);
            }
            1 if sim.crashed.len() < 2 && up => sim.crash(node),
            2 => {
                let crashed: Vec<NodeId> = sim.crashed.iter().copied().collect();
                for n in crashed {
                    restart_from_disk(&mut sim, &snaps, n);
                }
            }
            3..=7 => {
                sim.network_fault(what - 3, node, 2, &mut rng);
            }
            8 if sim.paused.is_empty() && up => {
                sim.paused.insert(node);
            }
            9 => sim.paused.clear(),
            10 if up => sim.hot_swap(node),
            11 => {
                sim.release_held(|_| true);
            }
            12 => {
                let copies: Vec<Envelope> = dups.borrow_mut().drain(..).collect();
                for e in copies {
                    if !sim.crashed.contains(&e.dst) {
                        sim.deliver(e);
                    }
                }
            }
            13 | 14 if up && (opts.compact_non_voting || voting(&sim, node)) => compact(&mut sim, &mut snaps, node),
            15..=18 if !sim.crashed.contains(&node) => {
                let key = rng.below(KEYS as u64) as usize;
                next_seq[key] += 1;
                let seq = next_seq[key];
                let id = sim.request(node, 100 + key as u64, seq, put(&format!("k{key}"), &seq.to_string()));
                ops.insert(id, Op::Write { key, seq });
            }
            19..=23 if !sim.crashed.contains(&node) => {
                let key = rng.below(KEYS as u64) as usize;
                next_reader += 1;
                let id = sim.request(node, next_reader, 1, Command::Get(format!("k{key}")));
                ops.insert(id, Op::Read { key, floor: acked[key], node, at: sim.now_ms });
            }
            24 if sim.learner_blocked.len() < 2 => {
                sim.learner_blocked.insert(node);
            }
            25 => sim.learner_blocked.clear(),
            _ => {}
        }
        log.push(desc);
        if log.len() > 40 {
            log.remove(0);
        }
        for _ in 0..(5 + rng.below(15)) {
            sim.tick();
            check(&sim, &mut learned, &mut ops, &mut acked, &mut reads_ok, &log);
        }
        checked += 1;
    }
    let crashed: Vec<NodeId> = sim.crashed.iter().copied().collect();
    for n in crashed {
        restart_from_disk(&mut sim, &snaps, n);
    }
    sim.paused.clear();
    sim.cut.clear();
    sim.cut_one_way.clear();
    sim.acceptor_down.clear();
    sim.learner_blocked.clear();
    sim.filter = None;
    sim.release_held(|_| true);
    let healed = sim.run_until(30_000, |s| (1..=5).all(|n| voting(s, n)) && s.leaders().len() == 1);
    assert!(
        healed,
        "seed {seed}: after healing, not all voting with one leader: {:?}",
        (1..=5).map(|n| sim.nodes[&n].status()).collect::<Vec<_>>()
    );
    let leader = sim.leaders()[0];
    let id = sim.request(leader, 9, 1, put("after", "x"));
    let ok = sim.run_until(20_000, |s| s.replies.contains_key(&id));
    assert!(ok, "seed {seed}: no write completes after healing");
    for _ in 0..1500 {
        sim.tick();
        check(&sim, &mut learned, &mut ops, &mut acked, &mut reads_ok, &log);
    }
    if std::env::var_os("ADV_STATUS").is_some() {
        for n in 1..=5 {
            eprintln!("{} kv {:?}", sim.nodes[&n].status(), sim.nodes[&n].learner.kv.data);
        }
    }
    for n in 1..=5 {
        for (key, &acked_seq) in acked.iter().enumerate() {
            let have = seq_of(&sim.value_at(n, &format!("k{key}")));
            assert!(have >= acked_seq, "seed {seed}: node {n} lost k{key} seq {acked_seq} (has {have})");
        }
    }
    let kv1 = &sim.nodes[&1].learner.kv.data;
    for n in 2..=5 {
        assert_eq!(kv1, &sim.nodes[&n].learner.kv.data, "seed {seed}: node {n}'s state differs from node 1's");
    }
    let _ = checked;
    eprintln!("seed {seed}: {} slots, {reads_ok} reads checked, acked {acked:?}", learned.len());
}

fn seeds() -> std::ops::Range<u64> {
    let from: u64 = std::env::var("ADV_SEED_FROM").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let count: u64 = std::env::var("ADV_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    from..from + count
}

/// Chaos where the host compacts only voting replicas (so the bug above cannot fire) and up to
/// two replicas are without their disks at once.
#[test]
fn chaos_with_snapshot_restarts_two_wipes_and_duplicates_keeps_agreement_and_fresh_reads() {
    for seed in seeds() {
        chaos_run(seed, &ChaosOpts { compact_non_voting: false, max_unvoting: 2, ops: 200 });
    }
}

/// The same with the host compacting whenever it likes (rejoiners too).
#[test]
fn chaos_with_compaction_at_any_time_keeps_agreement() {
    for seed in seeds() {
        chaos_run(seed, &ChaosOpts { compact_non_voting: true, max_unvoting: 1, ops: 200 });
    }
}

/// Rule 3 (follower ReadIndex): an answer to an ask of an earlier instance of the follower (a
/// hot swap or a crash restart in between), delivered late, must not serve a read of the new
/// instance. f reads k (index I, answer held); f is swapped/restarted; k is overwritten
/// (acknowledged); f's learner gets nothing more; a new read at f; the old answer arrives.
#[test]
fn a_follower_read_answer_from_before_a_swap_or_restart_serves_no_later_read() {
    for restart in [false, true] {
        let mut sim = Sim::new(5, 7100 + restart as u64);
        let leader = sim.wait_for_stable_leader();
        let f = (1..=5).find(|&n| n != leader).expect("a follower");
        assert_eq!(sim.call(leader, 1, 1, put("k", "old")), Outcome::Done);
        assert!(sim.run_until(2_000, |s| s.value_at(f, "k").is_some()));
        sim.filter = Some(Box::new(move |env: &Envelope| {
            if env.dst == f && is_msg(env, |m| matches!(m, Message::ReadIndexed { .. })) {
                Fate::Hold
            } else {
                Fate::Deliver
            }
        }));
        let r1 = sim.request(f, 50, 1, common::get("k"));
        sim.run_for(60);
        assert!(!sim.held.is_empty(), "the leader answered the first ask (held)");
        assert!(!sim.replies.contains_key(&r1));
        if restart {
            sim.crash(f);
            sim.restart(f);
        } else {
            sim.hot_swap(f);
        }
        sim.learner_blocked.insert(f);
        assert_eq!(sim.call(leader, 1, 2, put("k", "new")), Outcome::Done);
        assert_eq!(sim.value_at(f, "k"), Some(b"old".to_vec()), "f missed the new write");
        // Wait until f follows the leader again, then read and let the old answer in.
        let ok = sim.run_until(3_000, |s| {
            s.leaders().len() == 1 && s.nodes[&f].proposer.known_leader() == Some(s.leaders()[0])
        });
        assert!(
            ok,
            "restart={restart}: f follows {:?}, leaders {:?}, f {}",
            sim.nodes[&f].proposer.known_leader(),
            sim.leaders(),
            sim.nodes[&f].status()
        );
        let r2 = sim.request(f, 51, 1, common::get("k"));
        sim.tick();
        sim.release_held(|_| true);
        sim.run_for(100);
        if let Some(out) = sim.replies.get(&r2) {
            assert_eq!(out, &Outcome::Value(Some(b"new".to_vec())), "restart={restart}: stale follower read");
        }
        sim.filter = None;
        sim.learner_blocked.clear();
        assert!(sim.run_until(5_000, |s| s.replies.contains_key(&r2)));
        assert_eq!(sim.replies[&r2], Outcome::Value(Some(b"new".to_vec())), "restart={restart}: stale follower read");
    }
}

/// Liveness (secondary): after a start-up duel, a stable leader (one second, idle) should not
/// be deposed by its first write. A candidate that lost the duel follows the winner, but its own
/// acceptor durably promised the candidate's higher ballot and refuses the winner's first
/// accept. Counts how many of 100 seeds lose their stable leader at the first write.
///
/// Seed 20000: node 5 leads with 1.5; node 1's prepare 2.1 was promised by 1, 2, 3, 4, but node 1
/// stepped down on 5's heartbeat before the promises arrived. Everyone follows 5 (sticky), 5's
/// CheckQuorum is satisfied by heartbeat acks, yet a majority refuses every accept or read
/// confirmation of 1.5: the idle "stable" leader cannot commit, and the first request costs an
/// election. 26 of 100 seeds.
#[test]
fn a_stable_leader_is_not_deposed_by_its_first_write() {
    let mut deposed = Vec::new();
    for seed in 0..100 {
        let mut sim = Sim::new(5, 20_000 + seed);
        let leader = sim.wait_for_stable_leader();
        let above: Vec<NodeId> =
            (1..=5).filter(|n| sim.nodes[n].acceptor.promised > sim.nodes[&leader].proposer.ballot).collect();
        let id = sim.request(leader, 1, 1, put("k", "v"));
        sim.run_until(3_000, |s| s.replies.contains_key(&id));
        if sim.leaders() != vec![leader] || sim.nodes[&leader].proposer.ballot != sim.nodes[&leader].acceptor.promised {
            deposed.push((seed, above));
        }
    }
    assert!(deposed.is_empty(), "{} of 100 stable leaders deposed by their first write (seed, acceptors promised above the leader): {deposed:?}", deposed.len());
}

/// Rule 1/2 (Agreement; a wiped acceptor never votes against a promise or accept of its earlier
/// incarnation) with a duplicated message. A fresh rejoiner always fences at epoch
/// `max_seen.epoch() + 1`, which is 1 when its first step hears nothing: the *same* fence
/// ballot `B_f(1, z)` as its earlier incarnation's fence of epoch 1. `on_fenced` only matches
/// the ballot, so duplicated `Fenced` answers to the earlier fence (reporting what the
/// acceptors held back then) complete the new fence — although since then the earlier
/// incarnation voted in epoch 1 at ballots above `B_f(1, z)`.
///
/// n = 5; u, w never hear from x, y (and their learners get nothing). z is wiped and fences
/// `B_f(1, z)` (x, y, u answer; the network duplicates the answers). z votes again; x leads in
/// epoch 1 with {x, y, z} and chooses slot s. z is wiped again while cut off from x, y; its new
/// fence is again `B_f(1, z)`, and the duplicated old answers complete it: it adopts nothing
/// for s and votes. {z, u, w} then elect a leader (an epoch-1 ballot below x's) that fills s
/// with a no-op: slot s chosen twice.
#[test]
fn duplicated_fence_answers_from_an_earlier_life_never_complete_a_later_fence() {
    let mut sim = Sim::new(5, 7200);
    let x = sim.wait_for_stable_leader();
    assert_eq!(sim.call(x, 1, 1, put("warm", "up")), Outcome::Done);
    let x = sim.wait_for_stable_leader();
    let others: Vec<NodeId> = (1..=5).filter(|&n| n != x).collect();
    let (y, z, u, w) = (others[0], others[1], others[2], others[3]);
    let mut learned = BTreeMap::new();
    sim.partition(&[u, w], &[x, y]);
    sim.learner_blocked.extend([u, w]);
    let dups: Rc<RefCell<Vec<Envelope>>> = Rc::new(RefCell::new(Vec::new()));
    let quiet_prevotes = Rc::new(RefCell::new(true));
    let drop_fences_from_z = Rc::new(RefCell::new(false));
    {
        let (dups, quiet, drop_fences) = (dups.clone(), quiet_prevotes.clone(), drop_fences_from_z.clone());
        sim.filter = Some(Box::new(move |env: &Envelope| {
            let Ok(msg) = message::decode::<Message>(&env.payload) else { return Fate::Deliver };
            match msg {
                // The network duplicates the fence answers to z; the copies arrive much later.
                Message::Fenced { .. } if env.dst == z => {
                    dups.borrow_mut().push(env.clone());
                    Fate::Deliver
                }
                Message::PreVote { .. } if *quiet.borrow() && [z, u, w].contains(&env.src) => Fate::Drop,
                Message::Fence { .. } if *drop_fences.borrow() && env.src == z => Fate::Drop,
                _ => Fate::Deliver,
            }
        }));
    }
    run_recording(&mut sim, 500, &mut learned);

    // z's first incarnation after a wipe: fence B_f(1, z), answered by x, y, u, w.
    sim.wipe_and_restart(z);
    let ok = (0..1_000).any(|_| {
        sim.tick();
        record_learned(&sim, &mut learned);
        voting(&sim, z)
    });
    assert!(ok, "z never voted again");
    assert_eq!(sim.nodes[&z].acceptor.promised.epoch(), 1);
    let stale: Vec<Envelope> = dups.borrow_mut().drain(..).filter(|e| [x, y, u].contains(&e.src)).collect();
    assert_eq!(stale.len(), 3, "the three duplicated answers");

    // x or y leads in epoch 1 with {x, y, z}; slot s is chosen with z's vote.
    let ok = sim.run_until(10_000, |s| {
        s.leaders().len() == 1
            && [x, y].contains(&s.leaders()[0])
            && s.nodes[&s.leaders()[0]].proposer.ballot.epoch() == 1
    });
    assert!(ok, "no epoch-1 leader among x, y: {:?}", sim.leaders());
    let leader = sim.leaders()[0];
    let id = sim.request(leader, 2, 1, put("k", "v"));
    let ok = (0..500).any(|_| {
        sim.tick();
        record_learned(&sim, &mut learned);
        sim.replies.contains_key(&id)
    });
    assert!(ok && sim.replies[&id] == Outcome::Done, "the write was acknowledged");
    let (s, b1) = sim.nodes[&z]
        .acceptor
        .accepted
        .iter()
        .rev()
        .find(|(_, (b, _))| b.epoch() == 1)
        .map(|(s, (b, _))| (*s, *b))
        .expect("z accepted in epoch 1");
    eprintln!("slot {s} chosen at {b1} with z's vote; leader {leader}");

    // z loses its disk again, cut off from x and y; its new fence is B_f(1, z) once more.
    sim.partition(&[x, y], &[z, u, w]);
    *drop_fences_from_z.borrow_mut() = true;
    sim.wipe_and_restart(z);
    sim.tick();
    assert!(sim.nodes[&z].status().contains("\"voting\":false"));
    for e in stale {
        sim.deliver(e);
    }
    run_recording(&mut sim, 100, &mut learned);
    eprintln!("z after the second fence: {}", sim.nodes[&z].status());
    *quiet_prevotes.borrow_mut() = false;
    run_recording(&mut sim, 5_000, &mut learned);
    eprintln!("leaders on z's side: {:?}", sim.leaders());
    // A write on z's side (or after healing) takes the first slot its leader thinks is free.
    // (With the fence fixed, z's side has no voting majority and no leader: nothing to do.)
    if let Some(&on_z_side) = sim.leaders().iter().find(|l| [z, u, w].contains(l)) {
        let _ = sim.request(on_z_side, 3, 1, put("z-side", "w"));
    }
    run_recording(&mut sim, 2_000, &mut learned);
    sim.cut.clear();
    sim.learner_blocked.clear();
    run_recording(&mut sim, 5_000, &mut learned);
    for n in 1..=5 {
        eprintln!(
            "{} slot {s}: {:?} kv {:?}",
            sim.nodes[&n].status(),
            sim.nodes[&n].learner.chosen.get(&s),
            sim.nodes[&n].learner.kv.data
        );
    }
    for n in 1..=5 {
        assert_eq!(sim.value_at(n, "k"), Some(b"v".to_vec()), "node {n} lost the acknowledged write (slot {s})");
    }
}
