//! The step loop's persist-before-send rule, checked against the WAL on disk at each send.
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use waxos_guest::message::{self, Ballot, Message, Record, Value};

use super::*;
use crate::chaos::ChaosConfig;
use crate::runtime::Envelope;

/// Checks, at the very moment each envelope is handed over for sending, what the WAL on disk
/// already holds. If the step loop sent before making the step's records durable, the
/// record answered for would not be on disk yet.
struct DiskCheckingTransport {
    wal_dir: PathBuf,
    seen: Arc<Mutex<Vec<SendSeen>>>,
}

/// An envelope handed over, and the WAL records on disk at that moment.
type SendSeen = (Envelope, Vec<Record>);

impl Transport for DiskCheckingTransport {
    fn send(&self, envelope: Envelope) {
        let on_disk = crate::storage::wal::read_records(&self.wal_dir)
            .expect("read WAL")
            .iter()
            .map(|r| message::decode::<Record>(r).expect("a guest record"))
            .collect();
        self.seen.lock().expect("lock").push((envelope, on_disk));
    }
}

fn guest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/guest/waxos_guest.wasm")
}

fn envelope(src: u32, role: Role, msg: &Message) -> Envelope {
    Envelope { src, dst: 1, role, payload: message::encode(msg) }
}

fn step_loop_in(dir: &Path, transport: Box<dyn Transport>) -> StepLoop {
    let runtime = crate::runtime::Runtime::new(&dir.join("cache")).expect("engine");
    let build = runtime.load(&guest_path()).expect("guest (run `just build`)");
    let (storage, durable) = Storage::open(dir, 1 << 20).expect("storage");
    let config = GuestConfig {
        me: 1,
        members: crate::runtime::voters(&[1, 2, 3]),
        seed: 1,
        test_hooks: false,
        retain_slots: 100,
        rejoining: false,
    };
    let chaos = Chaos::new(ChaosConfig::preset("off", 0).expect("preset"), 0);
    StepLoop::new(build, dir.join("guest"), config, storage, durable, 1_000, chaos, transport).expect("start")
}

/// A learned chosen value is recorded lazily: not synced by its own step, synced by the next
/// idle step, and kept in log order.
#[test]
fn a_lazy_record_waits_for_the_next_sync_and_an_idle_step_syncs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let transport = DiskCheckingTransport { wal_dir: dir.path().join("wal"), seen };
    let mut step_loop = step_loop_in(dir.path(), Box::new(transport));
    let on_disk = || crate::storage::wal::read_records(&dir.path().join("wal")).expect("read WAL").len();
    // The new log's first record (whether this replica votes) is made durable first.
    step_loop.turn(Vec::new());
    assert_eq!(on_disk(), 1);
    let chosen = Message::Chosen { entries: vec![(0, Value::Noop)] };
    step_loop.turn(vec![Input::Message(envelope(2, Role::Learner, &chosen))]);
    assert_eq!(on_disk(), 1, "a lazy record alone must not cost its step an fsync");
    step_loop.turn(Vec::new());
    let records = crate::storage::wal::read_records(&dir.path().join("wal")).expect("read WAL");
    let decoded: Vec<Record> = records.iter().map(|r| message::decode(r).expect("record")).collect();
    assert_eq!(decoded, vec![Record::Voting(true), Record::Chosen { slot: 0, value: Value::Noop }]);
}

/// Runs a prepare and an accept through a step loop syncing inline or on the WAL's writer
/// thread, and checks what was on disk when each answer was handed over.
fn check_persist_before_send(pipelined: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let transport = DiskCheckingTransport { wal_dir: dir.path().join("wal"), seen: seen.clone() };
    let mut step_loop = step_loop_in(dir.path(), Box::new(transport));
    if pipelined {
        step_loop.pipeline = SyncPipeline::new(Some(Syncer::start(|| {}).expect("writer thread")));
    }

    let ballot = Ballot { round: 5, node: 2 };
    step_loop.turn(vec![Input::Message(envelope(2, Role::Acceptor, &Message::Prepare { ballot, first_slot: 0 }))]);
    let value = Value::Noop;
    let accept = Message::Accept { ballot, slot: 0, value: value.clone() };
    step_loop.turn(vec![Input::Message(envelope(2, Role::Acceptor, &accept))]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().expect("lock").len() < 2 {
        assert!(Instant::now() < deadline, "the answers were never sent");
        std::thread::sleep(Duration::from_millis(1));
        step_loop.turn(vec![Input::Synced]);
    }

    let seen = seen.lock().expect("lock");
    let promise = seen
        .iter()
        .find(|(e, _)| matches!(message::decode(&e.payload), Ok(Message::Promise { .. })))
        .expect("a promise was sent");
    assert!(promise.1.contains(&Record::Promised(ballot)), "promise sent before it was durable: {:?}", promise.1);
    let accepted = seen
        .iter()
        .find(|(e, _)| matches!(message::decode(&e.payload), Ok(Message::Accepted { .. })))
        .expect("an accepted was sent");
    assert!(
        accepted.1.contains(&Record::Accepted { slot: 0, ballot, value }),
        "accepted sent before it was durable: {:?}",
        accepted.1
    );
    let promise_at = seen.iter().position(|(e, _)| matches!(message::decode(&e.payload), Ok(Message::Promise { .. })));
    let accepted_at =
        seen.iter().position(|(e, _)| matches!(message::decode(&e.payload), Ok(Message::Accepted { .. })));
    assert!(promise_at < accepted_at, "effects left out of step order");
}

#[test]
fn nothing_is_sent_before_the_records_it_answers_for_are_durable() {
    check_persist_before_send(false);
}

#[test]
fn with_the_sync_on_its_own_thread_nothing_is_sent_before_it_is_durable_either() {
    check_persist_before_send(true);
}

/// A transport that drops everything (the compaction tests look at state, not at messages).
struct Nowhere;

impl Transport for Nowhere {
    fn send(&self, _envelope: Envelope) {}
}

/// Chooses slots `from..to` at the replica, each a put of `k{slot}` (as a leader, node 2,
/// would have it accept and then announce), and waits until everything is durable.
fn choose_puts(step_loop: &mut StepLoop, from: u64, to: u64) {
    let ballot = Ballot { round: 5, node: 2 };
    if from == 0 {
        step_loop.turn(vec![Input::Message(envelope(2, Role::Acceptor, &Message::Prepare { ballot, first_slot: 0 }))]);
    }
    for slot in from..to {
        let command = waxos_guest::message::ClientCommand {
            origin: 2,
            request_id: slot,
            client: 7,
            seq: slot + 1,
            command: waxos_guest::types::Command::Put(format!("k{slot}"), vec![slot as u8; 100]),
        };
        let value = Value::Batch(vec![command]);
        let accept = Message::Accept { ballot, slot, value: value.clone() };
        step_loop.turn(vec![Input::Message(envelope(2, Role::Acceptor, &accept))]);
        let chosen = Message::Chosen { entries: vec![(slot, value)] };
        step_loop.turn(vec![Input::Message(envelope(2, Role::Learner, &chosen))]);
    }
    step_loop.turn(Vec::new());
    step_loop.drain_syncs();
}

/// The status fields that say what a replica holds.
fn held_state(guest: &mut Guest) -> (u64, u64, String) {
    let status: serde_json::Value = serde_json::from_str(&guest.status().expect("status")).expect("status JSON");
    let field = |name: &str| status.get(name).and_then(serde_json::Value::as_u64).unwrap_or(u64::MAX);
    (field("applied"), field("keys"), status.get("promised").map(ToString::to_string).unwrap_or_default())
}

/// What a snapshot must keep, read natively (the guest's Rust types): the state machine with
/// its client sessions, the applied slot, the promise, and the accepted values still unapplied.
fn kept_state(config: &GuestConfig, snapshot: &[u8], records: &[Vec<u8>]) -> impl PartialEq + std::fmt::Debug {
    let config = waxos_guest::types::Config {
        me: config.me,
        members: waxos_guest::membership::voters(&[1, 2, 3]),
        seed: config.seed,
        test_hooks: false,
        retain_slots: config.retain_slots,
        rejoining: false,
    };
    let replica = waxos_guest::replica::Replica::start(config, Some(snapshot), records).expect("starts natively");
    let next_apply = replica.learner.next_apply;
    let unapplied: Vec<_> = replica.acceptor.accepted.range(next_apply..).map(|(s, v)| (*s, v.clone())).collect();
    (
        replica.learner.kv.data.clone(),
        format!("{:?}", replica.learner.kv.sessions),
        next_apply,
        replica.acceptor.promised,
        unapplied,
    )
}

/// Issue 14: a compaction off the step loop (a fresh instance started from the disk snapshots,
/// on the staging thread) keeps what the live guest's own snapshot on the loop keeps: the same
/// keys and values, client sessions, applied slot, promise and unapplied accepts.
#[test]
fn a_snapshot_made_off_the_loop_equals_one_made_on_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut step_loop = step_loop_in(dir.path(), Box::new(Nowhere));
    choose_puts(&mut step_loop, 0, 300);
    let on_loop = step_loop.guest.as_mut().expect("guest").snapshot(false).expect("snapshot");

    step_loop.background = Some(crate::staging::Background::start(|| {}).expect("staging thread"));
    step_loop.compact();
    step_loop.finish_background_job();
    let durable = step_loop.storage.read_durable().expect("durable state");
    let off_loop = durable.snapshot.clone().expect("the compaction off the loop saved a snapshot");
    assert!(durable.records.is_empty(), "the snapshot covers every record appended before it");
    let wal_segments = std::fs::read_dir(dir.path().join("wal")).expect("wal dir").count();
    assert_eq!(wal_segments, 1, "the covered segments are deleted");

    let on = kept_state(&step_loop.config, &on_loop, &[]);
    let off = kept_state(&step_loop.config, &off_loop, &durable.records);
    assert_eq!(on, off, "the snapshot made off the loop must keep what the one made on it keeps");
    let mut restarted = step_loop.build.instantiate().expect("instantiate");
    restarted.start(&step_loop.config, Some(&off_loop), &durable.records).expect("no crash").expect("starts");
    assert_eq!(held_state(&mut restarted), held_state(step_loop.guest.as_mut().expect("guest")));
    assert_eq!(held_state(&mut restarted).1, 300, "every put is in the snapshot");
    assert!(
        off_loop.len() <= on_loop.len() * 11 / 10,
        "the snapshot made off the loop carries what the live one trimmed: {} vs {} bytes",
        off_loop.len(),
        on_loop.len()
    );
}

/// Records appended while a compaction runs off the loop land after its boundary: a guest crash
/// restart afterwards (snapshot + the rest of the WAL) holds every write, and the restart waits
/// for a compaction still in progress rather than read an old snapshot next to segments being
/// deleted.
#[test]
fn writes_made_during_a_compaction_off_the_loop_survive_a_guest_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut step_loop = step_loop_in(dir.path(), Box::new(Nowhere));
    step_loop.background = Some(crate::staging::Background::start(|| {}).expect("staging thread"));
    choose_puts(&mut step_loop, 0, 200);
    step_loop.compact();
    // The loop goes on while the staging thread works.
    choose_puts(&mut step_loop, 200, 400);
    // A guest crash, with the compaction perhaps still running: the restart waits for it.
    step_loop.discard_guest("test: a guest crash");
    step_loop.try_restart();
    let guest = step_loop.guest.as_mut().expect("the guest restarted");
    let (applied, keys, _) = held_state(guest);
    assert_eq!((applied, keys), (400, 400), "a write made during the compaction was lost");
    let durable = step_loop.storage.read_durable().expect("durable state");
    assert!(durable.snapshot.is_some(), "the compaction saved its snapshot");
    assert!(!durable.records.is_empty(), "the writes made meanwhile follow it in the WAL");
}
