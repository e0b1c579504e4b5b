//! Membership changes through the log (`membership`): the rules a reconfiguration must keep,
//! on the in-memory network of replicas. Run natively and under wasmtime (`just test`).

mod common;

use common::{get, put, Sim};
use waxos_guest::membership::{Member, MemberChange, ALPHA};
use waxos_guest::types::{Command, NodeId, Outcome};

const OPERATOR: u64 = 0x0BE7_A70B;

/// Asks `node` for a change; when `node` turns out to be removed meanwhile (the operator asked
/// a leaving leader), asks the leader again with the same seq, as the CLI does.
fn change(sim: &mut Sim, node: NodeId, seq: u64, change: MemberChange) -> Outcome {
    let mut node = node;
    loop {
        match sim.call(node, OPERATOR, seq, Command::ChangeMembers(change.clone())) {
            Outcome::Rejected(reason) if reason.contains("no longer a member") => {
                sim.run_until(5_000, |s| s.leaders().iter().any(|&l| l != node));
                node = sim.wait_for_leader();
            }
            outcome => return outcome,
        }
    }
}

/// Adds a member at `address` through `via`; returns its new id.
fn add(sim: &mut Sim, via: NodeId, seq: u64, address: &str) -> NodeId {
    match change(sim, via, seq, MemberChange::Add { address: address.to_string() }) {
        Outcome::Member(id) => id,
        other => panic!("add {address} refused: {other:?}"),
    }
}

/// The members a node knows, as it told its host.
fn known(sim: &Sim, node: NodeId) -> Vec<Member> {
    sim.members.get(&node).cloned().unwrap_or_default()
}

/// The voters in effect at a node's first unapplied slot.
fn voters_at(sim: &Sim, node: NodeId) -> Vec<NodeId> {
    let learner = &sim.nodes[&node].learner;
    learner.membership.at(learner.next_apply).voters().collect()
}

/// Starts the host of a member just added, as `--join` does: with the members a member knows.
fn join(sim: &mut Sim, id: NodeId, via: NodeId) {
    let members = known(sim, via);
    assert!(members.iter().any(|m| m.id == id && !m.voter), "node {id} is a learner in {members:?}");
    sim.join(id, members);
}

/// A put through `node` that must succeed.
fn write(sim: &mut Sim, node: NodeId, client: u64, seq: u64, key: &str, value: &str) {
    let outcome = sim.call(node, client, seq, put(key, value));
    assert_eq!(outcome, Outcome::Done, "put {key} via node {node}");
}

/// A learner catches up, is promoted, and then counts: with two of the three first voters
/// gone, the two that are left and the promoted one are a majority of four.
#[test]
fn a_learner_catches_up_and_once_promoted_its_vote_counts() {
    let mut sim = Sim::new(3, 61);
    let leader = sim.wait_for_leader();
    for i in 0..20 {
        write(&mut sim, leader, 1, i + 1, &format!("k{i}"), "v");
    }
    let id = add(&mut sim, leader, 1, "host4:7000");
    assert_eq!(id, 4);
    join(&mut sim, 4, leader);
    assert!(sim.run_until(5_000, |s| s.value_at(4, "k19").is_some()), "the learner caught up");
    assert!(!sim.nodes[&4].proposer.is_leader());
    assert_eq!(change(&mut sim, leader, 2, MemberChange::Promote(4)), Outcome::Member(4));
    assert!(sim.run_until(5_000, |s| voters_at(s, 4) == vec![1, 2, 3, 4]), "promoted: {:?}", voters_at(&sim, 4));
    // Two of the first three go; the rest is 2 of 4: no majority. Bring one back as node 4's
    // partner: {leader, 4} + one more of the first three make 3 of 4.
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&n| n != leader).collect();
    sim.crash(others[0]);
    let leader = sim.wait_for_leader();
    write(&mut sim, leader, 2, 1, "after", "promotion");
    assert!(sim.run_until(5_000, |s| s.value_at(4, "after").is_some()));
}

/// A learner is never counted: with two of three voters down, a learner that is up does not
/// make a majority, so nothing is chosen until a voter returns.
#[test]
fn a_learner_is_never_counted() {
    let mut sim = Sim::new(3, 62);
    let leader = sim.wait_for_leader();
    let id = add(&mut sim, leader, 1, "host4:7000");
    join(&mut sim, id, leader);
    sim.run_for(2_000);
    assert!(sim.run_until(5_000, |s| s.nodes[&id].learner.next_apply >= s.nodes[&leader].learner.next_apply));
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&n| n != leader).collect();
    sim.crash(others[0]);
    sim.crash(others[1]);
    let request = sim.request(leader, 3, 1, put("lonely", "x"));
    sim.run_for(3_000);
    assert!(!sim.replies.contains_key(&request), "chosen by one voter and a learner");
    assert_eq!(sim.value_at(id, "lonely"), None);
    sim.restart(others[0]);
    assert!(sim.run_until(10_000, |s| s.replies.contains_key(&request)), "a voter back: chosen");
    let leader = sim.wait_for_leader();
    assert_eq!(sim.call(leader, 3, 2, get("lonely")), Outcome::Value(Some(b"x".to_vec())));
}

/// A change takes effect ALPHA slots after its own, on an idle cluster too (the leader fills
/// the window with no-ops), and every replica announces the same members.
#[test]
fn a_change_takes_effect_after_the_window_on_an_idle_cluster() {
    let mut sim = Sim::new(5, 63);
    let leader = sim.wait_for_leader();
    assert_eq!(change(&mut sim, leader, 1, MemberChange::Remove(5)), Outcome::Member(5));
    let slot = sim.nodes[&leader].learner.next_apply;
    assert!(
        sim.run_until(5_000, |s| (1..=4).all(|n| voters_at(s, n) == vec![1, 2, 3, 4])),
        "the change never took effect"
    );
    for n in 1..=4 {
        assert!(sim.nodes[&n].learner.next_apply >= slot + ALPHA - 1, "node {n} applied up to the window");
        let members: Vec<NodeId> = known(&sim, n).iter().map(|m| m.id).collect();
        assert_eq!(members, vec![1, 2, 3, 4], "node {n} told its host");
    }
    // Node 5 learned its own removal and stands aside: it never stands for election.
    assert!(sim.run_until(3_000, |s| voters_at(s, 5) == vec![1, 2, 3, 4]));
    sim.run_for(3_000);
    assert!(!sim.nodes[&5].proposer.is_leader());
    assert_eq!(sim.leaders().len(), 1);
}

/// Removing the leader hands leadership over: it stops proposing at the first slot it does
/// not vote on, stands down, and one of the remaining voters leads; writes go on.
#[test]
fn removing_the_leader_hands_leadership_over() {
    let mut sim = Sim::new(3, 64);
    let leader = sim.wait_for_stable_leader();
    write(&mut sim, leader, 1, 1, "before", "1");
    assert_eq!(change(&mut sim, leader, 1, MemberChange::Remove(leader)), Outcome::Member(leader));
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&n| n != leader).collect();
    assert!(
        sim.run_until(10_000, |s| s.leaders().len() == 1 && rest.contains(&s.leaders()[0])),
        "no leader among the rest: {:?}",
        sim.leaders()
    );
    let new_leader = sim.leaders()[0];
    write(&mut sim, new_leader, 1, 2, "after", "2");
    for &n in &rest {
        assert!(sim.run_until(3_000, |s| s.value_at(n, "after").is_some()));
        assert_eq!(sim.value_at(n, "before"), Some(b"1".to_vec()));
    }
}

/// Sizes 5 → 3 → 7 → 5 with writes between each step: every acknowledged write is readable
/// at every member in the end.
#[test]
fn sizes_five_three_seven_five_keep_every_write() {
    let mut sim = Sim::new(5, 65);
    let mut seq = 0;
    let mut writes = Vec::new();
    let mut op_seq = 0;
    let mut burst = |sim: &mut Sim, writes: &mut Vec<String>| {
        for _ in 0..10 {
            seq += 1;
            let leader = sim.wait_for_leader();
            let key = format!("w{seq}");
            write(sim, leader, 9, seq, &key, "x");
            writes.push(key);
        }
    };
    let mut next_op = || {
        op_seq += 1;
        op_seq
    };
    burst(&mut sim, &mut writes);
    for gone in [4, 5] {
        let leader = sim.wait_for_leader();
        assert_eq!(change(&mut sim, leader, next_op(), MemberChange::Remove(gone)), Outcome::Member(gone));
    }
    assert!(sim.run_until(10_000, |s| voters_at(s, 1) == vec![1, 2, 3]));
    sim.remove_node(4);
    sim.remove_node(5);
    burst(&mut sim, &mut writes);
    let mut added = Vec::new();
    for i in 0..4 {
        let leader = sim.wait_for_leader();
        let id = add(&mut sim, leader, next_op(), &format!("new{i}:7000"));
        join(&mut sim, id, leader);
        added.push(id);
    }
    assert_eq!(added, vec![6, 7, 8, 9], "ids are never reused");
    for &id in &added {
        let leader = sim.wait_for_leader();
        assert!(sim.run_until(10_000, |s| s.nodes[&id].learner.next_apply + 2 >= s.nodes[&leader].learner.next_apply));
        assert_eq!(change(&mut sim, leader, next_op(), MemberChange::Promote(id)), Outcome::Member(id));
    }
    assert!(sim.run_until(10_000, |s| voters_at(s, 1) == vec![1, 2, 3, 6, 7, 8, 9]), "{:?}", voters_at(&sim, 1));
    burst(&mut sim, &mut writes);
    for gone in [1, 2] {
        let leader = sim.wait_for_leader();
        assert_eq!(change(&mut sim, leader, next_op(), MemberChange::Remove(gone)), Outcome::Member(gone));
    }
    assert!(sim.run_until(20_000, |s| voters_at(s, 3) == vec![3, 6, 7, 8, 9]), "{:?}", voters_at(&sim, 3));
    burst(&mut sim, &mut writes);
    let members = [3, 6, 7, 8, 9];
    let leader = sim.wait_for_leader();
    assert!(members.contains(&leader), "the leader {leader} is a member");
    for key in &writes {
        for &n in &members {
            assert!(sim.run_until(5_000, |s| s.value_at(n, key).is_some()), "{key} missing at node {n}");
        }
    }
}

/// Nonsense is refused with a reason and changes nothing; a retried change (same client and
/// seq) gets the first answer back and applies once.
#[test]
fn nonsense_is_refused_and_a_retry_applies_once() {
    let mut sim = Sim::new(3, 66);
    let leader = sim.wait_for_leader();
    assert!(
        matches!(change(&mut sim, leader, 1, MemberChange::Promote(2)), Outcome::Rejected(r) if r.contains("already a voter"))
    );
    assert!(
        matches!(change(&mut sim, leader, 2, MemberChange::Remove(9)), Outcome::Rejected(r) if r.contains("not a member"))
    );
    let id = add(&mut sim, leader, 3, "dup:1");
    assert_eq!(
        change(&mut sim, leader, 3, MemberChange::Add { address: "dup:1".into() }),
        Outcome::Member(id),
        "a retry"
    );
    assert!(matches!(
        change(&mut sim, leader, 4, MemberChange::Add { address: "dup:1".into() }),
        Outcome::Rejected(r) if r.contains("already node")
    ));
    sim.run_for(2_000);
    let ids: Vec<NodeId> = known(&sim, leader).iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![1, 2, 3, id]);
}

/// The membership survives a crash (replayed from the log), a restart from a snapshot, and a
/// hot swap: a restarted replica knows the same configuration as the others.
#[test]
fn the_membership_survives_crash_restart_and_hot_swap() {
    let mut sim = Sim::new(3, 67);
    let leader = sim.wait_for_leader();
    let id = add(&mut sim, leader, 1, "host4:1");
    join(&mut sim, id, leader);
    assert!(sim.run_until(5_000, |s| s.nodes[&id].learner.next_apply + 1 >= s.nodes[&leader].learner.next_apply));
    assert_eq!(change(&mut sim, leader, 2, MemberChange::Promote(id)), Outcome::Member(id));
    assert!(sim.run_until(5_000, |s| (1..=4).all(|n| voters_at(s, n) == vec![1, 2, 3, 4])));
    let follower = if leader == 1 { 2 } else { 1 };
    sim.crash(follower);
    sim.restart(follower);
    assert!(sim.run_until(5_000, |s| voters_at(s, follower) == vec![1, 2, 3, 4]), "after a crash");
    let snapshot = sim.nodes[&follower].snapshot(false);
    let config = sim.nodes[&follower].config().clone();
    let restarted = waxos_guest::replica::Replica::start(config, Some(&snapshot), &[]).expect("from a snapshot");
    assert_eq!(restarted.learner.membership, sim.nodes[&follower].learner.membership, "from a snapshot");
    sim.hot_swap(leader);
    assert_eq!(voters_at(&sim, leader), vec![1, 2, 3, 4], "after a hot swap");
    let leader = sim.wait_for_leader();
    write(&mut sim, leader, 5, 1, "still", "here");
}

/// A member that joins a running cluster starts from a snapshot, not the log from slot 0: its
/// first configuration is the one of the day it joined (with itself as a learner), so a replay
/// from the first slot would apply the cluster's history under the wrong members (its own
/// `Add` refused as a duplicate, the operator's exactly-once answer another). Once caught up
/// its state equals the leader's byte for byte.
#[test]
fn a_joined_member_starts_from_a_snapshot_and_its_state_equals_the_leaders() {
    let mut sim = Sim::new(3, 64);
    let leader = sim.wait_for_leader();
    for i in 0..10 {
        write(&mut sim, leader, 1, i + 1, &format!("k{i}"), "v");
    }
    let id = add(&mut sim, leader, 1, "host4:7000");
    join(&mut sim, id, leader);
    write(&mut sim, leader, 1, 11, "after", "join");
    assert!(sim.run_until(5_000, |s| s.nodes[&id].learner.next_apply == s.nodes[&leader].learner.next_apply
        && s.value_at(id, "after").is_some()));
    let state = |n: NodeId| sim.nodes[&n].learner.app_state().encode();
    assert!(state(id) == state(leader), "the joined member's state differs from the leader's");
}

/// A promotion does not depose the leader: when the grown configuration starts to govern,
/// CheckQuorum wants a majority of it heard, and the promoted member has been heard (its
/// acceptor answers the accepts of the slots it votes in, and the probes), so the leader keeps
/// leading at its ballot. (A review suspected a leader with no `heard_ms` entry for a new
/// voter stands down; it does not: planting probes to the current voters only still passes.)
#[test]
fn a_promotion_keeps_the_leader_at_its_ballot() {
    let mut sim = Sim::new(3, 63);
    let leader = sim.wait_for_stable_leader();
    write(&mut sim, leader, 1, 1, "k", "v");
    let id = add(&mut sim, leader, 1, "host4:7000");
    join(&mut sim, id, leader);
    assert!(sim.run_until(5_000, |s| s.value_at(id, "k").is_some()), "the learner caught up");
    let ballot = sim.nodes[&leader].proposer.ballot;
    assert_eq!(change(&mut sim, leader, 2, MemberChange::Promote(id)), Outcome::Member(id));
    assert!(sim.run_until(5_000, |s| voters_at(s, leader) == vec![1, 2, 3, 4]), "the promotion took effect");
    sim.run_for(2_000);
    assert_eq!(sim.leaders(), vec![leader], "the leader was deposed");
    assert_eq!(sim.nodes[&leader].proposer.ballot, ballot, "the leader was re-elected");
    write(&mut sim, leader, 1, 2, "k", "after");
}

/// A member cut off while a new member joined, was promoted and became the leader comes back
/// to a leader it does not know: it drops that leader's messages (as its host refuses the
/// stream), so no heartbeat ever says it is behind, and its pre-votes are refused by members
/// that hear the leader. It must still catch up (it asks a member it knows when it hears no
/// leader): found stuck for good by the simulator.
#[test]
fn a_member_that_missed_a_new_leaders_arrival_catches_up() {
    use waxos_guest::message::{self, Message};
    let mut sim = Sim::new(3, 71);
    let old_leader = sim.wait_for_stable_leader();
    let followers: Vec<NodeId> = (1..=3).filter(|&n| n != old_leader).collect();
    let (cut_off, other) = (followers[0], followers[1]);
    write(&mut sim, old_leader, 9, 1, "before", "1");
    sim.isolated.insert(cut_off);
    let new = add(&mut sim, old_leader, 1, "h4:1");
    join(&mut sim, new, old_leader);
    sim.run_for(1_000);
    assert_eq!(change(&mut sim, old_leader, 2, MemberChange::Promote(new)), Outcome::Member(new));
    // Only the new member may campaign: the other follower's pre-votes and prepares are lost.
    sim.filter = Some(Box::new(move |e| {
        let campaign =
            matches!(message::decode::<Message>(&e.payload), Ok(Message::PreVote { .. } | Message::Prepare { .. }));
        if e.src == other && campaign {
            common::Fate::Drop
        } else {
            common::Fate::Deliver
        }
    }));
    assert_eq!(change(&mut sim, old_leader, 3, MemberChange::Remove(old_leader)), Outcome::Member(old_leader));
    assert!(sim.run_until(10_000, |s| s.leaders() == vec![new]), "the new member leads: {:?}", sim.leaders());
    write(&mut sim, new, 9, 2, "after", "2");
    // The removed leader's host is stopped by its operator.
    sim.remove_node(old_leader);
    assert!(!sim.nodes[&cut_off].learner.membership.knows(new), "it missed the new member's arrival");
    sim.isolated.remove(&cut_off);
    let target = sim.nodes[&new].learner.next_apply;
    assert!(
        sim.run_until(5_000, |s| s.nodes[&cut_off].learner.next_apply >= target),
        "the member that was cut off catches up (applied {} of {target})",
        sim.nodes[&cut_off].learner.next_apply
    );
    assert_eq!(sim.value_at(cut_off, "after"), Some(b"2".to_vec()));
    assert!(sim.run_until(3_000, |s| s.nodes[&cut_off].proposer.known_leader() == Some(new)), "and follows it");
}

/// A candidate whose prepares were all lost, while a leader of a lower ballot lives on, must
/// give its candidacy up and follow that leader; found by the simulator stuck for good, deaf to
/// the leader's heartbeats (their ballot is below its own) while every pre-vote was refused.
#[test]
fn a_candidate_whose_prepares_were_lost_follows_the_live_leader() {
    let mut sim = Sim::new(3, 72);
    let leader = sim.wait_for_stable_leader();
    let candidate = (1..=3).find(|&n| n != leader).expect("a follower");
    let now = sim.now_ms;
    let replica = sim.nodes.get_mut(&candidate).expect("the follower");
    let first_unchosen = replica.learner.next_apply;
    // Phase 1a at a ballot above the leader's, every prepare lost.
    replica.proposer.start_election(now, first_unchosen, &mut Vec::new());
    let stuck_ballot = replica.proposer.ballot;
    assert!(stuck_ballot > sim.nodes[&leader].proposer.ballot);
    assert!(
        sim.run_until(5_000, |s| s.nodes[&candidate].proposer.known_leader() == Some(leader)),
        "it follows the leader again: {}",
        sim.nodes[&candidate].status()
    );
    assert_eq!(sim.leaders(), vec![leader], "the leader kept leading");
    write(&mut sim, candidate, 9, 1, "k", "v");
}

/// A learner that hears no leader (here: the link from the leader cut) never stands for
/// election: once promoted for later slots it would win without a pre-vote (the proposer's own
/// timer), depose the leader and stand down at once, over and over — found by the simulator as
/// a cluster that made no progress while a majority was up.
#[test]
fn a_learner_that_hears_no_leader_never_stands() {
    let mut sim = Sim::new(3, 73);
    let leader = sim.wait_for_stable_leader();
    let learner = add(&mut sim, leader, 1, "h4:1");
    join(&mut sim, learner, leader);
    sim.run_for(1_000);
    let ballot = sim.nodes[&leader].proposer.ballot;
    // Everything from the leader to the learner is lost: it hears no leader at all.
    sim.cut_one_way.insert((leader, learner));
    for i in 0..30 {
        sim.run_for(100);
        let status = sim.nodes[&learner].status();
        assert!(status.contains("\"role\":\"follower\""), "the learner stood after {} ms: {status}", i * 100);
    }
    assert_eq!(sim.leaders(), vec![leader]);
    assert_eq!(sim.nodes[&leader].proposer.ballot, ballot, "the leader kept its ballot");
}
