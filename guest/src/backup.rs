//! Restoring a backup: a replica of a *new* cluster that starts from another cluster's state
//! machine (`waxosd --restore FILE`, every member from the same file, as etcd's
//! `snapshot restore`).
//!
//! A backup holds one member's ordinary snapshot (`Replica::snapshot(false)`). Started from it
//! as it is, a replica would also take the old cluster's acceptor state (promises, values
//! accepted in slots that may never have been chosen) and its membership (the old members'
//! ids and addresses). A restore keeps only the state machine and its position: the key-value
//! data with its client sessions (so a retried write still applies once) and `next_apply`.
//! Everything else starts as in a new cluster: the members are the new roster (`Config`), no
//! acceptor has promised or accepted anything, and the log resumes at `next_apply` with every
//! slot below it applied and forgotten (`log_start`), so a replica that is behind (one not
//! restored, or added later) catches up by snapshot transfer.
//!
//! Why this is safe: every member of the new cluster starts from the same state at the same
//! slot, and no acceptor carries a vote, so the new cluster's Paxos begins as a first start
//! does, only at slot `next_apply` instead of 0.
//!
//! The host asks for a restore through `start`'s snapshot argument: `RESTORE_TAG` followed by
//! the backed-up snapshot (no change to the WIT contract; a build that predates restores
//! refuses it as a snapshot it cannot read). The host then takes an ordinary snapshot of the
//! new replica at once and makes it the data dir's base, so a restart never sees the tag.

use crate::acceptor::Acceptor;
use crate::kv::Kv;
use crate::learner::{AppState, Learner};

/// First bytes of a `start` snapshot that asks for a restore (no snapshot version begins so).
pub const RESTORE_TAG: &[u8; 8] = b"WXRESTOR";

/// The backed-up snapshot, when `snapshot` asks for a restore.
pub fn requested(snapshot: &[u8]) -> Option<&[u8]> {
    snapshot.strip_prefix(RESTORE_TAG.as_slice())
}

/// The restore request of `backed_up` (what a host passes to `start`).
pub fn request(backed_up: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(RESTORE_TAG.len() + backed_up.len());
    bytes.extend_from_slice(RESTORE_TAG);
    bytes.extend_from_slice(backed_up);
    bytes
}

/// No real log reaches this slot (a million slots a second for nine years): a backup that says
/// it is past it was forged or is corrupt, and slot arithmetic near `u64::MAX` would wrap.
pub const SLOT_MAX: u64 = 1 << 48;

/// Whether a backed-up state's slot is one a real cluster could have reached.
pub fn check_slot(next_apply: u64) -> Result<(), String> {
    if next_apply > SLOT_MAX {
        return Err(format!("backup refused: its state claims slot {next_apply}, beyond any real log ({SLOT_MAX})"));
    }
    Ok(())
}

/// Installs a backed-up state machine (`kv`, every slot below `next_apply` applied) into a
/// freshly started replica's learner, keeping the learner's membership (the new roster), and
/// starts the acceptor's memory at the same slot.
pub fn install(learner: &mut Learner, acceptor: &mut Acceptor, next_apply: u64, kv: Kv) {
    if next_apply > learner.next_apply {
        learner.install(AppState { next_apply, kv, membership: None });
    } else {
        // Nothing applied yet (a backup of a cluster at slot 0): only the state machine.
        learner.kv = kv;
        learner.kv.rebuild_index();
    }
    acceptor.forget_below(next_apply);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Replica;
    use crate::types::{Command, Config, Effect, Event, Member, Outcome, Request};

    fn config(me: u32, ids: &[u32], port: u16) -> Config {
        Config {
            me,
            members: ids
                .iter()
                .map(|&id| Member { id, address: format!("127.0.0.1:{}", port + id as u16), voter: true })
                .collect(),
            seed: 7,
            test_hooks: false,
            retain_slots: 100,
            rejoining: false,
        }
    }

    /// A put with request id `id` from client 9, whose seq is always 1.
    fn put(id: u64, key: &str, value: &str) -> Event {
        let command = Command::Put(key.to_string(), value.as_bytes().to_vec());
        Event::Request(Request { id, client: 9, seq: 1, command })
    }

    /// Steps a one-member cluster until request `id` is answered.
    fn run_until_answered(replica: &mut Replica, now_ms: &mut u64, mut events: Vec<Event>, id: u64) -> Outcome {
        for _ in 0..2_000 {
            *now_ms += 10;
            let effects = replica.step(*now_ms, std::mem::take(&mut events));
            for effect in effects {
                match effect {
                    Effect::Reply(rid, outcome) if rid == id => return outcome,
                    Effect::Send(envelope) if envelope.dst == envelope.src => {
                        events.push(Event::Message(envelope));
                    }
                    _ => {}
                }
            }
        }
        panic!("request {id} never answered");
    }

    /// A restore keeps the data, its sessions and the slot, and takes the new roster: the old
    /// cluster's members (ids, addresses) and its acceptor's promise are gone.
    #[test]
    fn a_backup_past_any_real_slot_is_refused() {
        assert!(check_slot(u64::MAX - 3).is_err());
        assert!(check_slot(SLOT_MAX + 1).is_err());
        assert!(check_slot(1_000_000).is_ok());
    }

    #[test]
    fn a_restored_replica_keeps_the_state_machine_and_takes_the_new_roster() {
        let mut old = Replica::start(config(1, &[1], 40_000), None, &[]).expect("start");
        let mut now_ms = 0;
        assert_eq!(run_until_answered(&mut old, &mut now_ms, vec![put(1, "k", "v")], 1), Outcome::Done);
        let backed_up = old.snapshot(false);
        let applied = old.learner.next_apply;
        assert!(applied >= 1);
        assert_ne!(old.acceptor.promised, Default::default());

        let new_config = config(2, &[2, 3, 4], 50_000);
        let restored = Replica::start(new_config, Some(&request(&backed_up)), &[]).expect("restore");
        let members = |r: &Replica| -> Vec<(u32, String)> {
            let at = r.learner.membership.at(r.learner.next_apply);
            at.members.iter().map(|m| (m.id, m.address.clone())).collect()
        };
        assert_eq!(restored.learner.next_apply, applied, "the slot is kept");
        assert_eq!((restored.learner.log_start, restored.acceptor.log_start), (applied, applied), "nothing below it");
        assert_eq!(restored.learner.kv.data.get("k").map(Vec::as_slice), Some(&b"v"[..]));
        let new_roster: Vec<(u32, String)> =
            [2, 3, 4].iter().map(|&id| (id, format!("127.0.0.1:{}", 50_000 + id))).collect();
        assert_eq!(members(&restored), new_roster, "the new roster, not the old members");
        assert_eq!(restored.acceptor.promised, Default::default(), "no promise of the old cluster");
        assert!(restored.acceptor.accepted.is_empty());

        // Its ordinary snapshot is a plain one: a restart from it is the same replica.
        let again = Replica::start(config(2, &[2, 3, 4], 50_000), Some(&restored.snapshot(false)), &[]).expect("start");
        assert_eq!((again.learner.next_apply, members(&again)), (applied, new_roster));
    }

    /// A write retried after the restore with the (client, seq) it had before is not applied
    /// twice: the sessions came along.
    #[test]
    fn a_restored_replica_keeps_client_sessions() {
        let mut old = Replica::start(config(1, &[1], 40_000), None, &[]).expect("start");
        let mut now_ms = 0;
        run_until_answered(&mut old, &mut now_ms, vec![put(1, "k", "first")], 1);
        let mut restored =
            Replica::start(config(1, &[1], 50_000), Some(&request(&old.snapshot(false))), &[]).expect("restore");
        let mut now_ms = 0;
        // The same write again (a retry): answered from the session.
        let outcome = run_until_answered(&mut restored, &mut now_ms, vec![put(1, "k", "first")], 1);
        assert_eq!(outcome, Outcome::Done);
        // Seq 1 with another value: the session knows seq 1 was another request.
        let outcome = run_until_answered(&mut restored, &mut now_ms, vec![put(2, "k", "second")], 2);
        assert!(matches!(&outcome, Outcome::Rejected(reason) if reason.starts_with("reused seq")), "{outcome:?}");
        assert_eq!(restored.learner.kv.data.get("k").map(Vec::as_slice), Some(&b"first"[..]));
    }
}
