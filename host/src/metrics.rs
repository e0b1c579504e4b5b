//! Prometheus metrics: one registry per process, the metrics' definitions, the hooks the rest
//! of the host calls, and the plain-HTTP endpoint that serves them (`GET /metrics`).
//!
//! Everything lives here so that the hot paths (the step loop, the WAL's writer thread, the
//! request handlers) each gain a one-line call: an atomic add or a histogram observation, never
//! a lock held across I/O and never a wait. What the guest knows (leader, ballot, slots) comes
//! from its status, sampled by the step loop every `GUEST_SAMPLE_MS` (`observe_guest_status`);
//! a peer's queue depth is read when a scrape asks for it (`on_scrape`). Names follow
//! Prometheus's conventions: the `waxos_` prefix, base units (`_seconds`, `_bytes`), `_total`
//! on counters (added by the encoder). The encoder writes the OpenMetrics text format, which
//! Prometheus (and `curl`) read as is.
//!
//! The endpoint is plain HTTP on its own port (`waxosd --metrics-port`), as Prometheus scrapes
//! by default: it shows counts, latencies, slots and ballots, never a key or a value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A leader (or, for a leader, a majority) heard from within this long counts as live.
pub const LEADER_FRESH: Duration = Duration::from_secs(2);
/// How often the step loop samples the guest's status for the gauges and leader changes.
pub const GUEST_SAMPLE_MS: u64 = 100;
/// Scrapes served at once; further connections are closed unanswered.
const SCRAPES_AT_ONCE_MAX: usize = 16;
/// Bytes of an HTTP request head read before it is refused.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// A scrape connection that has not sent its request and read its answer by then is closed.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Labels of a request: `op` (put, get, delete) and `outcome` (ok, or the gRPC code's name).
type OpOutcome = [(&'static str, &'static str); 2];
/// One label with a fixed set of values (`kind`, `cause`, `outcome`).
type Kind = [(&'static str, &'static str); 1];
/// A peer's member id.
type PeerLabel = [(&'static str, String); 1];
/// A histogram family with its buckets.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A refresh run before each scrape (e.g. the peers' queue depths).
type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Every metric of the host.
pub struct Metrics {
    registry: Registry,
    requests: Family<OpOutcome, Counter>,
    request_seconds: Histograms<OpOutcome>,
    leader_changes: Counter,
    leader_id: Gauge,
    is_leader: Gauge,
    ballot_epoch: Gauge,
    ballot_round: Gauge,
    ballot_node: Gauge,
    first_unchosen_slot: Gauge,
    chosen_slot: Gauge,
    applied_slot: Gauge,
    keys: Gauge,
    voting: Gauge,
    guest_up: Gauge,
    step_seconds: Histogram,
    step_events: Histogram,
    turn_seconds: Histogram,
    turn_longest_seconds: Gauge<f64, AtomicU64>,
    compaction_pause_seconds: Histogram,
    wal_fsync_seconds: Histogram,
    wal_written_bytes: Counter,
    snapshot_seconds: Histogram,
    snapshot_bytes: Gauge,
    swap_pause_seconds: Histogram,
    swaps: Family<Kind, Counter>,
    guest_crashes: Counter,
    guest_restarts: Counter,
    chaos_events: Family<Kind, Counter>,
    chaos_dropped_messages: Counter,
    shed: Counter,
    peer_queue_depth: Family<PeerLabel, Gauge>,
    peer_reconnects: Family<PeerLabel, Counter>,
    serving: Gauge,
    /// The last leader seen (-1: none yet), so that a change is counted once.
    last_leader: AtomicI64,
    /// When a batch last came from each member: the guest keeps naming a leader that went
    /// silent (a minority's pre-votes fail, so it never elects another), health must not.
    heard: Mutex<HashMap<u32, Instant>>,
    refreshes: Mutex<Vec<Refresh>>,
}

/// Latency buckets: 50 µs to ~26 s, doubling.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 20))
}

/// The process's metrics (made on first use).
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("waxos"),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_buckets),
            leader_changes: Counter::default(),
            leader_id: Gauge::default(),
            is_leader: Gauge::default(),
            ballot_epoch: Gauge::default(),
            ballot_round: Gauge::default(),
            ballot_node: Gauge::default(),
            first_unchosen_slot: Gauge::default(),
            chosen_slot: Gauge::default(),
            applied_slot: Gauge::default(),
            keys: Gauge::default(),
            voting: Gauge::default(),
            guest_up: Gauge::default(),
            step_seconds: Histogram::new(exponential_buckets(5e-6, 2.0, 20)),
            step_events: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            turn_seconds: Histogram::new(exponential_buckets(5e-6, 2.0, 20)),
            turn_longest_seconds: Gauge::default(),
            compaction_pause_seconds: latency_buckets(),
            wal_fsync_seconds: Histogram::new(exponential_buckets(25e-6, 2.0, 18)),
            wal_written_bytes: Counter::default(),
            snapshot_seconds: latency_buckets(),
            snapshot_bytes: Gauge::default(),
            swap_pause_seconds: latency_buckets(),
            swaps: Family::default(),
            guest_crashes: Counter::default(),
            guest_restarts: Counter::default(),
            chaos_events: Family::default(),
            chaos_dropped_messages: Counter::default(),
            shed: Counter::default(),
            peer_queue_depth: Family::default(),
            peer_reconnects: Family::default(),
            serving: Gauge::default(),
            last_leader: AtomicI64::new(-1),
            heard: Mutex::new(HashMap::new()),
            refreshes: Mutex::new(Vec::new()),
        };
        m.leader_id.set(-1);
        // The usual series exist from the start (at 0), so that a rate over them is defined
        // before the first event, and each family shows in the very first scrape.
        for op in ["put", "get", "delete"] {
            drop(m.requests.get_or_create(&[("op", op), ("outcome", "ok")]));
            drop(m.request_seconds.get_or_create(&[("op", op), ("outcome", "ok")]));
        }
        for kind in ["outage_start", "outage_end", "crash_start", "crash_end"] {
            drop(m.chaos_events.get_or_create(&[("kind", kind)]));
        }
        for outcome in ["done", "refused"] {
            drop(m.swaps.get_or_create(&[("outcome", outcome)]));
        }
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "requests",
            "Client requests answered, by op and outcome (ok or the gRPC code)",
            self.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from a client request's arrival to its answer, by op and outcome",
            Unit::Seconds,
            self.request_seconds.clone(),
        );
        r.register(
            "leader_changes",
            "Times the leader this replica knows changed to another node",
            self.leader_changes.clone(),
        );
        r.register("leader_id", "Node id of the leader this replica knows (-1: none)", self.leader_id.clone());
        r.register("is_leader", "1 while this replica's guest leads", self.is_leader.clone());
        r.register(
            "ballot_epoch",
            "Epoch of the highest ballot this replica's proposer has seen",
            self.ballot_epoch.clone(),
        );
        r.register("ballot_round", "Round (within its epoch) of the highest ballot seen", self.ballot_round.clone());
        r.register("ballot_node", "Node of the highest ballot seen", self.ballot_node.clone());
        r.register("first_unchosen_slot", "First log slot not known chosen here", self.first_unchosen_slot.clone());
        r.register("chosen_slot", "Highest log slot known chosen here (-1: none)", self.chosen_slot.clone());
        r.register("applied_slot", "Log slots applied to the key-value state here", self.applied_slot.clone());
        r.register("keys", "Keys in this replica's state", self.keys.clone());
        r.register(
            "voting",
            "1 while this replica votes (0 while it catches up after losing state)",
            self.voting.clone(),
        );
        r.register(
            "serving",
            "1 while the health service says SERVING: guest up, a live leader known",
            self.serving.clone(),
        );
        r.register(
            "guest_up",
            "1 while the guest instance runs (0: crashed or held down, restarting)",
            self.guest_up.clone(),
        );
        r.register_with_unit("step_duration", "Time of one guest step", Unit::Seconds, self.step_seconds.clone());
        r.register("step_events", "Events handed to one guest step", self.step_events.clone());
        r.register_with_unit(
            "turn_duration",
            "Time of one turn of the step loop (the guest step, WAL appends, and whatever housekeeping ran on the loop): how long the replica could not answer",
            Unit::Seconds,
            self.turn_seconds.clone(),
        );
        r.register_with_unit(
            "turn_longest",
            "The longest turn of the step loop since the host started",
            Unit::Seconds,
            self.turn_longest_seconds.clone(),
        );
        r.register_with_unit(
            "compaction_pause",
            "What a compaction cost the step loop itself (only without the staging thread; with it, the loop only asks for a WAL roll)",
            Unit::Seconds,
            self.compaction_pause_seconds.clone(),
        );
        r.register_with_unit(
            "wal_fsync_duration",
            "Time to write and fdatasync one WAL hand-off (group commit)",
            Unit::Seconds,
            self.wal_fsync_seconds.clone(),
        );
        r.register_with_unit(
            "wal_written",
            "WAL bytes written and synced",
            Unit::Bytes,
            self.wal_written_bytes.clone(),
        );
        r.register_with_unit(
            "snapshot_duration",
            "Time to make a snapshot and write it (off the step loop when the staging thread runs; compaction_pause is the loop's share)",
            Unit::Seconds,
            self.snapshot_seconds.clone(),
        );
        r.register_with_unit(
            "snapshot_size",
            "Size of the last snapshot written",
            Unit::Bytes,
            self.snapshot_bytes.clone(),
        );
        r.register_with_unit(
            "swap_pause",
            "Pause of a hot swap: last step on the old instance to the new one ready",
            Unit::Seconds,
            self.swap_pause_seconds.clone(),
        );
        r.register("swaps", "Hot swaps, by outcome (done, refused)", self.swaps.clone());
        r.register("guest_crashes", "Guest traps, deadlines and memory-limit hits", self.guest_crashes.clone());
        r.register("guest_restarts", "Guest instances restarted from snapshot and WAL", self.guest_restarts.clone());
        r.register("chaos_events", "Injected failures, by kind", self.chaos_events.clone());
        r.register(
            "chaos_dropped_messages",
            "Acceptor messages dropped by injected outages",
            self.chaos_dropped_messages.clone(),
        );
        r.register("shed", "Requests and messages turned away while the disk was behind", self.shed.clone());
        r.register("peer_queue_depth", "Envelopes queued for a peer, by peer node id", self.peer_queue_depth.clone());
        r.register("peer_reconnects", "Streams to a peer opened again after the first", self.peer_reconnects.clone());
        self
    }

    /// The metrics in the OpenMetrics text format, after the scrape-time refreshes.
    pub fn encode(&self) -> String {
        if let Ok(refreshes) = self.refreshes.lock() {
            refreshes.iter().for_each(|refresh| refresh(self));
        }
        let mut out = String::with_capacity(16 * 1024);
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Runs `refresh` before every scrape.
    pub fn on_scrape(&self, refresh: impl Fn(&Metrics) + Send + Sync + 'static) {
        if let Ok(mut refreshes) = self.refreshes.lock() {
            refreshes.push(Box::new(refresh));
        }
    }
}

// ---- Hooks: each a line at the place that already measures or logs the thing. ----

/// A client request was answered (`service`).
pub fn request(op: &'static str, outcome: &'static str, elapsed: Duration) {
    let m = get();
    let labels = [("op", op), ("outcome", outcome)];
    m.requests.get_or_create(&labels).inc();
    m.request_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
}

/// The name of a gRPC code, for the `outcome` label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// One guest step took `elapsed` over `events` events (`step_loop`).
pub fn step(elapsed: Duration, events: usize) {
    let m = get();
    m.step_seconds.observe(elapsed.as_secs_f64());
    m.step_events.observe(events as f64);
}

/// One turn of the step loop took `elapsed`.
pub fn turn(elapsed: Duration) {
    let m = get();
    let seconds = elapsed.as_secs_f64();
    m.turn_seconds.observe(seconds);
    if seconds > m.turn_longest_seconds.get() {
        m.turn_longest_seconds.set(seconds);
    }
}

/// A compaction held the step loop for `elapsed` (all of it on the loop; the roll and the
/// segment drop off it).
pub fn compaction_pause(elapsed: Duration) {
    get().compaction_pause_seconds.observe(elapsed.as_secs_f64());
}

/// A WAL write + fdatasync of `bytes` took `elapsed` (the writer thread, or inline).
pub fn wal_synced(bytes: usize, elapsed: Duration) {
    let m = get();
    m.wal_fsync_seconds.observe(elapsed.as_secs_f64());
    m.wal_written_bytes.inc_by(bytes as u64);
}

/// A compaction wrote a `bytes`-byte snapshot, pausing the loop for `elapsed`.
pub fn snapshot(bytes: usize, elapsed: Duration) {
    let m = get();
    m.snapshot_seconds.observe(elapsed.as_secs_f64());
    m.snapshot_bytes.set(bytes as i64);
}

/// A hot swap was carried out with `pause` (Some) or refused (None).
pub fn swap(pause: Option<Duration>) {
    let m = get();
    match pause {
        Some(pause) => {
            m.swap_pause_seconds.observe(pause.as_secs_f64());
            m.swaps.get_or_create(&[("outcome", "done")]).inc();
        }
        None => {
            m.swaps.get_or_create(&[("outcome", "refused")]).inc();
        }
    }
}

/// The guest crashed (its instance is discarded).
pub fn guest_crashed() {
    get().guest_crashes.inc();
}

/// Whether a guest instance runs now.
pub fn guest_up(up: bool) {
    let m = get();
    m.guest_up.set(i64::from(up));
    if !up {
        m.serving.set(0);
    }
}

/// A guest instance was restarted from durable state.
pub fn guest_restarted() {
    let m = get();
    m.guest_restarts.inc();
    m.guest_up.set(1);
}

/// An injected failure (`chaos`): `outage_start`, `outage_end`, `crash_start`, `crash_end`.
pub fn chaos_event(kind: &'static str) {
    get().chaos_events.get_or_create(&[("kind", kind)]).inc();
}

/// An acceptor message dropped by an injected outage.
pub fn chaos_dropped() {
    get().chaos_dropped_messages.inc();
}

/// An input turned away because the disk is behind.
pub fn shed() {
    get().shed.inc();
}

/// A stream to peer `peer` was opened again after a break.
pub fn peer_reconnected(peer: u32) {
    get().peer_reconnects.get_or_create(&[("peer", peer.to_string())]).inc();
}

/// A batch of envelopes came from member `node` (`peer`).
pub fn heard_from(node: u32) {
    if let Ok(mut heard) = get().heard.lock() {
        heard.insert(node, Instant::now());
    }
}

/// Whether `node` was heard from within `LEADER_FRESH`.
fn heard_lately(heard: &HashMap<u32, Instant>, node: i64) -> bool {
    u32::try_from(node).ok().and_then(|n| heard.get(&n)).is_some_and(|at| at.elapsed() < LEADER_FRESH)
}

/// Sets the queue depth of each peer (from a scrape-time refresh); peers not listed are dropped.
pub fn peer_queue_depths(m: &Metrics, depths: impl IntoIterator<Item = (u32, usize)>) {
    m.peer_queue_depth.clear();
    for (peer, depth) in depths {
        m.peer_queue_depth.get_or_create(&[("peer", peer.to_string())]).set(depth as i64);
    }
}

/// Takes the guest's status JSON (sampled by the step loop): leader, ballot, slots, keys.
pub fn observe_guest_status(json: &str) {
    let Ok(status) = serde_json::from_str::<serde_json::Value>(json) else { return };
    let m = get();
    let int = |field: &str| status[field].as_i64();
    let leader = int("leader");
    m.leader_id.set(leader.unwrap_or(-1));
    if leader.is_some_and(|leader| leader_changed(&m.last_leader, leader)) {
        m.leader_changes.inc();
    }
    m.is_leader.set(i64::from(status["role"] == "leader"));
    if let Some((epoch, round, node)) = status["ballot"].as_str().and_then(parse_ballot) {
        m.ballot_epoch.set(epoch);
        m.ballot_round.set(round);
        m.ballot_node.set(node);
    }
    if let Some(slot) = int("first_unchosen") {
        m.first_unchosen_slot.set(slot);
    }
    m.chosen_slot.set(int("highest_chosen").unwrap_or(-1));
    if let Some(applied) = int("applied") {
        m.applied_slot.set(applied);
    }
    if let Some(keys) = int("keys") {
        m.keys.set(keys);
    }
    m.voting.set(i64::from(status["voting"] == true));
    m.guest_up.set(1);
    // A live leader: a leader that heard from a majority lately, or a follower that heard
    // from its leader lately.
    let me = int("me").unwrap_or(-1);
    let voters: Vec<i64> =
        status["voters"].as_array().map(|v| v.iter().filter_map(|n| n.as_i64()).collect()).unwrap_or_default();
    let live = match (leader, m.heard.lock()) {
        (Some(leader), Ok(heard)) if leader == me => {
            let others = voters.iter().filter(|&&v| v != me && heard_lately(&heard, v)).count();
            others >= voters.len() / 2
        }
        (Some(leader), Ok(heard)) => heard_lately(&heard, leader),
        _ => false,
    };
    m.serving.set(i64::from(live));
}

/// Notes `leader` as the one known now: true when it replaces another (the first leader known,
/// and a leader known again after an election, are no change).
fn leader_changed(last: &AtomicI64, leader: i64) -> bool {
    let before = last.swap(leader, Ordering::AcqRel);
    before >= 0 && before != leader
}

/// Whether this replica should be reported healthy: its guest runs and it knows a live leader.
pub fn serving() -> bool {
    let m = get();
    m.guest_up.get() == 1 && m.serving.get() == 1
}

/// The guest's ballot text (`round.node`, or `epoch:round.node`) as numbers.
fn parse_ballot(text: &str) -> Option<(i64, i64, i64)> {
    let (epoch, rest) = match text.split_once(':') {
        Some((e, rest)) => (e.parse().ok()?, rest),
        None => (0, text),
    };
    let (round, node) = rest.split_once('.')?;
    Some((epoch, round.parse().ok()?, node.parse().ok()?))
}

// ---- The endpoint. ----

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(SCRAPES_AT_ONCE_MAX));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // Too many at once: closed unanswered.
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it; the connection is closed after.
async fn answer(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            let body = get().encode();
            respond(&mut stream, "200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", &body).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found: metrics are at /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET /metrics\n").await,
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_change_is_counted_once_and_the_first_leader_is_not_a_change() {
        let last = AtomicI64::new(-1);
        assert!(!leader_changed(&last, 1), "the first leader known is no change");
        assert!(!leader_changed(&last, 1));
        assert!(leader_changed(&last, 2));
        assert!(!leader_changed(&last, 2));
        assert_eq!(parse_ballot("3.1"), Some((0, 3, 1)));
        assert_eq!(parse_ballot("1:4.2"), Some((1, 4, 2)));
        assert_eq!(parse_ballot("junk"), None);
    }

    #[test]
    fn the_guest_status_fills_the_gauges_in_the_text_format() {
        observe_guest_status(r#"{"leader":1,"role":"follower","ballot":"3.1","applied":5,"highest_chosen":4}"#);
        let text = get().encode();
        assert!(text.contains("# TYPE waxos_leader_changes counter"), "{text}");
        assert!(text.contains("waxos_leader_changes_total "), "{text}");
        assert!(text.contains("waxos_applied_slot "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn requests_are_counted_by_op_and_outcome_with_a_latency_histogram() {
        request("put", "ok", Duration::from_micros(300));
        request("get", code_name(tonic::Code::Unavailable), Duration::from_millis(2));
        let text = get().encode();
        assert!(text.contains(r#"waxos_requests_total{op="put",outcome="ok"}"#), "{text}");
        assert!(text.contains("waxos_request_duration_seconds_bucket{"), "{text}");
        assert!(text.contains(r#"outcome="unavailable""#), "{text}");
    }
}
