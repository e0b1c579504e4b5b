//! Adversarial review of cba5926 (leaderless catch-up, abandoned candidacy), membership through
//! the log, and the backup/restore merge (d144f2d). Each test asserts what the rules demand;
//! each failed when written (a break) and passes since its fix, except the controls.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use common::{put, Fate, Sim};
use waxos_guest::backup;
use waxos_guest::message::{self, Message};
use waxos_guest::replica::Replica;
use waxos_guest::types::{Envelope, NodeId, Outcome};

fn decode(env: &Envelope) -> Option<Message> {
    message::decode::<Message>(&env.payload).ok()
}

/// Two backups of one old (single-member) cluster: `older` after 3 writes, `newer` after 40.
fn two_backups() -> (Vec<u8>, Vec<u8>) {
    let mut old = Sim::new(1, 5);
    let leader = old.wait_for_leader();
    for i in 0..3 {
        assert_eq!(old.call(leader, 7, i + 1, put(&format!("old{i}"), "x")), Outcome::Done);
    }
    let older = old.nodes[&leader].snapshot(false);
    for i in 3..40 {
        assert_eq!(old.call(leader, 7, i + 1, put(&format!("old{i}"), "x")), Outcome::Done);
    }
    let newer = old.nodes[&leader].snapshot(false);
    (older, newer)
}

/// Replaces node `id` of `sim` by a replica restored from `backed_up` (as `waxosd --restore`).
fn restore_into(sim: &mut Sim, id: NodeId, backed_up: &[u8]) {
    let config = sim.nodes[&id].config().clone();
    let restored = Replica::start(config, Some(&backup::request(backed_up)), &[]).expect("restore");
    sim.nodes.insert(id, restored);
}

// Members restored from different backups, or a restored member next to a fresh majority,
// lose an acknowledged write once they catch up from one another (the review's first break):
// the guest cannot tell two histories apart, so the coordinator refuses such a first start
// (host/tests/backup.rs: `members_restored_from_different_backups_are_refused_at_the_first_start`).

/// The same with a member started *without* `--restore` next to restored ones is healed: the
/// fresh member is behind (its log starts at 0, the restored ones' at the backup's slot) and
/// catches up. (Kept as a control: it holds.)
#[test]
fn a_fresh_member_next_to_restored_ones_catches_up() {
    let (_, newer) = two_backups();
    let mut sim = Sim::new(3, 12);
    restore_into(&mut sim, 1, &newer);
    restore_into(&mut sim, 2, &newer);
    let leader = sim.wait_for_stable_leader();
    assert_eq!(sim.call(leader, 9, 1, put("w", "acknowledged")), Outcome::Done);
    assert!(sim.run_until(5_000, |s| (1..=3).all(|n| s.value_at(n, "w").is_some())));
    assert_eq!(sim.value_at(3, "old39"), Some(b"x".to_vec()));
}

/// cba5926 (a): a member that hears no leader asks a *rotating* peer for catch-up every
/// election timeout, with no regard to a snapshot transfer already under way (the heartbeat
/// path checks `incoming_snapshot`; this one does not). Every peer it asks that dropped its
/// slots sends the whole state (each rate-limits only per receiver), and since the peers of an
/// idle cluster offer a snapshot at the same slot, the receiver restarts its transfer with each
/// new offer: N-1 full snapshots per `SNAPSHOT_RESEND_MS` instead of one, and the transfer under
/// way is thrown away every 300 ms.
///
/// Setup: 5 nodes, retain 10 slots, 3 MiB of state (4 chunks). Node `lag` misses 60 slots, then
/// hears every peer but the leader (leader -> lag cut one way: no heartbeats). Chunks past the
/// first are held back (a slow link): a transfer takes longer than 300 ms.
#[test]
fn a_leaderless_member_gets_at_most_one_snapshot_transfer_at_a_time() {
    let mut sim = Sim::with_retain(5, 17, 10);
    let leader = sim.wait_for_stable_leader();
    let lag = (1..=5).find(|&n| n != leader).expect("a follower");
    sim.isolated.insert(lag);
    for i in 0..3 {
        let big = "v".repeat(900_000);
        assert_eq!(sim.call(leader, 8, i + 1, put(&format!("big{i}"), &big)), Outcome::Done);
    }
    for i in 3..60 {
        assert_eq!(sim.call(leader, 8, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    assert!(sim.nodes[&leader].learner.log_start > sim.nodes[&lag].learner.next_apply);
    sim.isolated.clear();
    sim.cut_one_way.insert((leader, lag));
    let senders = Rc::new(RefCell::new(Vec::<(u64, NodeId)>::new()));
    let seen = senders.clone();
    let clock = Rc::new(RefCell::new(0u64));
    let now = clock.clone();
    sim.filter = Some(Box::new(move |env: &Envelope| match decode(env) {
        Some(Message::SnapshotChunk { offset, .. }) if env.dst == lag => {
            if offset == 0 {
                seen.borrow_mut().push((*now.borrow(), env.src));
                Fate::Deliver
            } else {
                Fate::Hold
            }
        }
        _ => Fate::Deliver,
    }));
    let start = sim.now_ms;
    while sim.now_ms < start + 4_900 {
        *clock.borrow_mut() = sim.now_ms;
        sim.tick();
    }
    let offers = senders.borrow().clone();
    let distinct: BTreeSet<NodeId> = offers.iter().map(|(_, n)| *n).collect();
    eprintln!("snapshot transfers started towards node {lag} within 4.9 s: {offers:?}");
    assert!(
        offers.len() <= 1,
        "{} full snapshot transfers (from {distinct:?}) started towards one leaderless member within one \
         SNAPSHOT_RESEND_MS: {offers:?}",
        offers.len()
    );
}

/// cba5926 (b) + pre-vote stability: a follower that is cut off from the leader only (it still
/// hears the others, and they hear the leader) must not depose the leader. Its pre-votes are
/// refused; abandoning a candidacy it never had changes nothing. (Control: holds.)
#[test]
fn a_member_cut_off_from_the_leader_alone_does_not_depose_it() {
    let mut sim = Sim::new(5, 19);
    let leader = sim.wait_for_stable_leader();
    let ballot = sim.nodes[&leader].proposer.ballot;
    let cut = (1..=5).find(|&n| n != leader).expect("a follower");
    sim.cut.insert((leader.min(cut), leader.max(cut)));
    sim.run_for(10_000);
    assert_eq!(sim.leaders(), vec![leader], "the leader was deposed");
    assert_eq!(sim.nodes[&leader].proposer.ballot, ballot);
    assert!(sim.nodes[&cut].acceptor.promised <= ballot, "the cut-off member promised a higher ballot");
}

/// Membership replay from slot 0 with a roster that is not the cluster's first one. A host
/// whose data dir is wiped gets its roster back from somewhere (a wiped coordinator adopts the
/// roster a member announces; a member that joined later holds its *join-time* roster, not the
/// first start's). The guest takes `config.members` as the configuration of slot 0
/// (`Membership::initial`) and, catching up from a peer that still holds the log from slot 0,
/// applies every change again on top of it. Changes already reflected in that roster are
/// refused as nonsense (they change nothing, and `next_id` does not move), and an `Add` of an
/// address that was added and removed since is applied again under a *new* id: the rejoined
/// replica's membership (replicated state) differs from everybody else's, and every id it
/// hands out later is off by one.
#[test]
#[ignore = "open: the fix hid a planted bug from the simulator (see snapshot_transfer::catch_up_from)"]
fn a_replica_replaying_the_log_from_a_later_roster_ends_with_the_same_membership() {
    use waxos_guest::membership::MemberChange;
    use waxos_guest::types::Command;
    const OPERATOR: u64 = 0x0BE7_A70B;
    let mut sim = Sim::new(3, 23);
    let leader = sim.wait_for_stable_leader();
    let mut seq = 0;
    let mut change = |sim: &mut Sim, c: MemberChange| {
        seq += 1;
        sim.call(leader, OPERATOR, seq, Command::ChangeMembers(c))
    };
    assert_eq!(change(&mut sim, MemberChange::Add { address: "h4:1".into() }), Outcome::Member(4));
    assert_eq!(change(&mut sim, MemberChange::Remove(4)), Outcome::Member(4));
    assert_eq!(change(&mut sim, MemberChange::Add { address: "h5:1".into() }), Outcome::Member(5));
    for i in 0..5 {
        assert_eq!(sim.call(leader, 9, i + 1, put(&format!("k{i}"), "v")), Outcome::Done);
    }
    sim.run_for(2_000);
    assert_eq!(sim.nodes[&leader].learner.log_start, 0, "the log from slot 0 is still kept");
    // A follower's disk is wiped; its host gets the roster of today (as a joined member's
    // announcement would give it): voters 1, 2, 3 and the learner 5.
    let w = (1..=3).find(|&n| n != leader).expect("a follower");
    let today = sim.nodes[&leader].learner.membership.known_members();
    sim.crash(w);
    sim.wal.remove(&w);
    let mut config = sim.nodes[&w].config().clone();
    config.members = today;
    config.rejoining = true;
    sim.nodes.insert(w, Replica::start(config, None, &[]).expect("start wiped"));
    sim.crashed.remove(&w);
    let target = sim.nodes[&leader].learner.next_apply;
    assert!(sim.run_until(10_000, |s| s.nodes[&w].learner.next_apply >= target), "no catch-up");
    sim.run_for(1_000);
    let ours = sim.nodes[&w].learner.membership.clone();
    let theirs = sim.nodes[&leader].learner.membership.clone();
    eprintln!("rejoined: {:?}\nleader:   {:?}", ours.known_members(), theirs.known_members());
    assert_eq!(ours, theirs, "the rejoined replica's membership differs from the leader's");
}
