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
    let promise_at =
        seen.iter().position(|(e, _)| matches!(message::decode(&e.payload), Ok(Message::Promise { .. })));
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
