//! The step loop: the one thread that owns the guest instance (a wasmtime `Store` is not
//! `Sync`) and the write-ahead log.
//!
//! gRPC handlers and peer streams only push `Input`s into its bounded channel. Each turn it
//! drains what is queued (up to `STEP_EVENTS_MAX`), calls the guest's `step` once, appends
//! every `persist` record to the WAL, and hands the step's `send` and `reply` effects on only
//! once those records (and every earlier one) are durable. That order is the rule that keeps an
//! acceptor's promises and accepts across a crash (DESIGN §2); `sync_pipeline` keeps it while
//! the `fdatasync` runs on the WAL's writer thread, and bounds what a stalled disk may cost (the
//! loop then turns work away rather than grow or wait). A failed write or sync stops the host
//! and marks the data dir, so the next start rejoins (`storage::lost`). A guest crash (trap, deadline, memory) is logged; the instance is
//! thrown away and a new one started from the snapshot and WAL, while the host keeps serving.
//! Every `snapshot_every` records it compacts: the guest's snapshot becomes the new base and
//! the WAL segments it covers are dropped. It also runs the chaos schedule (acceptor outages,
//! injected guest crashes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::chaos::{Chaos, ChaosEvent};
use crate::peer::Transport;
use crate::runtime::{Command, Effect, Event, Guest, GuestBuild, GuestConfig, GuestCrash, Outcome, Request, Role};
use crate::staging::{Background, Done, StagedSwap, Timings};
use crate::storage::syncer::Syncer;
use crate::storage::{Durable, Storage};
use crate::sync_pipeline::SyncPipeline;

/// The guest is stepped at least this often (its timers: heartbeats, elections, re-sends).
pub const TICK_MS: u64 = 10;
/// Bound on inputs waiting for the step loop.
pub const INPUT_QUEUE_MAX: usize = 65_536;
/// Bound on the bytes those inputs carry (values, envelopes): a step loop held up (a
/// compaction's fsync on a slow disk) must not let the queue grow without end. High enough
/// never to drop in normal operation: at 256 MiB, followers of a leader writing 64 × 256 KiB
/// values at once dropped accepts while their disk lagged, and the resends cut throughput by
/// two thirds.
pub const INPUT_QUEUE_BYTES_MAX: usize = 1 << 30;
/// Bound on events handed to one `step`.
pub const STEP_EVENTS_MAX: usize = 4_096;
/// A restart attempt after a failed one waits this long.
const RESTART_RETRY_MS: u64 = 1_000;

/// What the step loop is asked to do.
pub enum Input {
    /// A client request; the outcome goes to `reply`.
    Request {
        /// What to do.
        command: Command,
        /// Client identity.
        client: u64,
        /// Client sequence number.
        seq: u64,
        /// Where the outcome goes.
        reply: oneshot::Sender<Outcome>,
    },
    /// A peer's envelope.
    Message(crate::runtime::Envelope),
    /// The guest's status JSON and build hash (or why there is none).
    Status(oneshot::Sender<Result<(String, String), String>>),
    /// A backup's state (`backup`): the guest's snapshot and its status JSON, taken between
    /// the same two steps.
    Backup(oneshot::Sender<Result<(Vec<u8>, String), String>>),
    /// The WAL's writer thread finished a sync (wakes the loop; the report itself comes from
    /// the `Syncer`).
    Synced,
    /// Replace the guest by `build` between two steps (hot swap).
    Swap {
        /// The new build, compiled and linked off the step loop.
        build: GuestBuild,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<SwapReport, String>>,
        /// The host's one-swap-at-a-time lock, released once this swap is carried out or
        /// refused (see `admin`).
        one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    },
}

/// What a hot swap did.
#[derive(Clone, Debug)]
pub struct SwapReport {
    /// Version of the build replaced.
    pub old_version: String,
    /// Version now running.
    pub new_version: String,
    /// Hash of the build now running.
    pub build_hash: String,
    /// Last step on the old instance to the new instance ready for its first step.
    pub pause: Duration,
}

/// The sending side, cloned into every handler.
#[derive(Clone)]
pub struct StepLoopHandle {
    tx: SyncSender<Input>,
    /// Bytes carried by the inputs queued (see `INPUT_QUEUE_BYTES_MAX`).
    queued_bytes: Arc<AtomicUsize>,
    /// True once the guest runs (the roster is complete).
    pub ready: Arc<AtomicBool>,
}

impl StepLoopHandle {
    /// Offers an input; if the queue is full, a request is answered "overloaded" and a message
    /// dropped (Paxos tolerates loss).
    pub fn offer(&self, input: Input) {
        let bytes = input.bytes();
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let sent = if queued > INPUT_QUEUE_BYTES_MAX && bytes > 0 {
            Err(TrySendError::Full(input))
        } else {
            self.tx.try_send(input)
        };
        if sent.is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(Input::Request { reply, .. })) => {
                let _ = reply.send(Outcome::Rejected("overloaded: the replica's input queue is full".into()));
            }
            Err(TrySendError::Full(Input::Status(reply))) => {
                let _ = reply.send(Err("overloaded".into()));
            }
            Err(TrySendError::Full(Input::Backup(reply))) => {
                let _ = reply.send(Err("overloaded: the replica's input queue is full; retry".into()));
            }
            Err(TrySendError::Full(Input::Swap { reply, .. })) => {
                let _ = reply.send(Err("overloaded: the replica's input queue is full; retry".into()));
            }
            Err(TrySendError::Full(Input::Message(_))) => {
                tracing::debug!("input queue full: envelope dropped")
            }
            // The loop is busy anyway: it looks for finished syncs every turn.
            Err(TrySendError::Full(Input::Synced)) => {}
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("step loop is gone: input dropped")
            }
        }
    }
}

impl Input {
    /// What this input carries, roughly, for the queue's byte bound.
    fn bytes(&self) -> usize {
        match self {
            Input::Request { command: Command::Put((key, value)), .. } => 64 + key.len() + value.len(),
            Input::Request { command: Command::Get(key) | Command::GetStale(key) | Command::Delete(key), .. } => {
                64 + key.len()
            }
            Input::Request { command: Command::ChangeMembers(_), .. } => 320,
            Input::Message(envelope) => 64 + envelope.payload.len(),
            Input::Status(_) | Input::Backup(_) | Input::Synced | Input::Swap { .. } => 0,
        }
    }
}

/// A new channel: the handle for producers, the receiver for `StepLoop::run`.
pub fn channel() -> (StepLoopHandle, Inputs) {
    let (tx, rx) = std::sync::mpsc::sync_channel(INPUT_QUEUE_MAX);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let handle = StepLoopHandle { tx, queued_bytes: queued_bytes.clone(), ready: Arc::new(AtomicBool::new(false)) };
    (handle, Inputs { rx, queued_bytes })
}

/// The receiving side, for `StepLoop::run`: takes inputs off the queue and their bytes off its
/// count.
pub struct Inputs {
    rx: Receiver<Input>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Inputs {
    fn taken(&self, input: Input) -> Input {
        self.queued_bytes.fetch_sub(input.bytes(), Ordering::AcqRel);
        input
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Input, RecvTimeoutError> {
        self.rx.recv_timeout(timeout).map(|input| self.taken(input))
    }

    fn try_recv(&self) -> Option<Input> {
        self.rx.try_recv().ok().map(|input| self.taken(input))
    }
}

/// The loop's state.
pub struct StepLoop {
    build: GuestBuild,
    /// Where a swapped-in build is kept, so a restarted host runs it.
    guest_dir: PathBuf,
    guest: Option<Guest>,
    config: GuestConfig,
    storage: Storage,
    snapshot_every: u64,
    chaos: Chaos,
    dropped_for_outage: u64,
    /// Benchmark switch: one fdatasync per record instead of per step (no group commit).
    sync_every_record: bool,
    peers: Box<dyn Transport>,
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
    /// Envelopes the guest sent to itself: its next step's first events.
    loopback: Vec<crate::runtime::Envelope>,
    /// Effects waiting for the disk, and the WAL's writer thread (from `run`; without it,
    /// each step syncs inline).
    pipeline: SyncPipeline,
    /// Inputs turned away while the disk is behind (`SyncPipeline::disk_behind`), since the last log.
    shed: u64,
    last_shed_log: Instant,
    next_request_id: u64,
    clock: Instant,
    last_restart_attempt: Option<Instant>,
    last_sweep: Instant,
    /// When the guest's status was last sampled for the metrics (`sample_for_metrics`).
    last_sample: Instant,
    /// The thread that compacts and prepares hot swaps off the loop (`staging`; from `run`:
    /// without it, both happen on the loop).
    background: Option<Background>,
    /// Records the compaction in progress covers (counted again if it fails).
    compacting_records: u64,
    /// After a failed compaction off the loop, the next one waits until then.
    compaction_retry_at: Option<Instant>,
    /// A staged hot swap in progress.
    staged_swap: Option<StagedSwap>,
    /// A swap that arrived while a compaction ran: it is staged once that is done.
    swap_waiting: Option<SwapAsked>,
}

/// A swap asked for: the build, where the outcome goes, the one-swap-at-a-time lock.
type SwapAsked = (GuestBuild, oneshot::Sender<Result<SwapReport, String>>, tokio::sync::OwnedMutexGuard<()>);

/// A failed compaction off the loop is tried again after this long.
const COMPACTION_RETRY_MS: u64 = 10_000;

impl StepLoop {
    /// Starts the guest from `durable` state and returns the loop, ready to `run`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        build: GuestBuild,
        guest_dir: PathBuf,
        config: GuestConfig,
        storage: Storage,
        durable: Durable,
        snapshot_every: u64,
        chaos: Chaos,
        peers: Box<dyn Transport>,
    ) -> anyhow::Result<StepLoop> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut step_loop = StepLoop {
            build,
            guest_dir,
            guest: None,
            config,
            storage,
            snapshot_every: snapshot_every.max(1),
            chaos,
            dropped_for_outage: 0,
            sync_every_record: false,
            peers,
            waiting: HashMap::new(),
            loopback: Vec::new(),
            pipeline: SyncPipeline::new(None),
            shed: 0,
            last_shed_log: Instant::now(),
            // Unique across restarts of this host, so a late reply can never match a new request.
            next_request_id: now.as_micros() as u64,
            clock: Instant::now(),
            last_restart_attempt: None,
            last_sweep: Instant::now(),
            last_sample: Instant::now(),
            background: None,
            compacting_records: 0,
            compaction_retry_at: None,
            staged_swap: None,
            swap_waiting: None,
        };
        let started = Instant::now();
        let guest = step_loop.start_guest(&durable).map_err(anyhow::Error::msg)?;
        tracing::info!(
            "guest {} started from {} + {} WAL records in {} ms",
            step_loop.build.source,
            describe_snapshot(&durable),
            durable.records.len(),
            started.elapsed().as_millis()
        );
        step_loop.guest = Some(guest);
        Ok(step_loop)
    }

    /// One fdatasync per record instead of one per step: only to measure what group commit
    /// saves (`waxosd --sync-every-record`).
    pub fn with_sync_every_record(mut self, on: bool) -> Self {
        self.sync_every_record = on;
        self
    }

    fn start_guest(&mut self, durable: &Durable) -> Result<Guest, String> {
        let mut guest = self.build.instantiate().map_err(|e| e.to_string())?;
        match guest.start(&self.config, durable.snapshot.as_deref(), &durable.records) {
            Ok(Ok(effects)) => {
                // Start-up effects are only logs and records (e.g. a rejoining replica's vote
                // withdrawal), never messages: nothing has been stepped yet.
                self.carry_out(effects);
                Ok(guest)
            }
            Ok(Err(refused)) => Err(format!("guest refused its durable state: {refused}")),
            Err(crash) => Err(crash.to_string()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Runs until the process ends; `handle` is this loop's own (the WAL's writer thread wakes
    /// it through it).
    pub fn run(mut self, inputs: Inputs, handle: StepLoopHandle) {
        let woken = handle.clone();
        match Background::start(move || woken.offer(Input::Synced)) {
            Ok(background) => self.background = Some(background),
            Err(e) => tracing::warn!("no staging thread ({e:#}): compacting and swapping on the step loop"),
        }
        match Syncer::start(move || handle.offer(Input::Synced)) {
            Ok(syncer) => self.pipeline = SyncPipeline::new(Some(syncer)),
            Err(e) => tracing::warn!("no WAL writer thread ({e:#}): syncing on the step loop"),
        }
        loop {
            let mut batch: Vec<Input> = self.loopback.drain(..).map(Input::Message).collect();
            if batch.is_empty() {
                // Nothing of our own to do: wait for input, or tick.
                match inputs.recv_timeout(Duration::from_millis(TICK_MS)) {
                    Ok(input) => batch.push(input),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while batch.len() < STEP_EVENTS_MAX {
                match inputs.try_recv() {
                    Some(input) => batch.push(input),
                    None => break,
                }
            }
            self.turn(batch);
        }
    }

    fn turn(&mut self, inputs: Vec<Input>) {
        self.collect_syncs();
        self.collect_background();
        if self.pipeline.compaction_due && !self.pipeline.in_flight() {
            self.compact();
        }
        self.run_chaos();
        // A disk that is behind (stalled, failing slowly) must not cost memory without end:
        // take no new work until it catches up.
        let backlog = self.pipeline.backlog_bytes(&self.storage.wal);
        let overloaded = self.pipeline.disk_behind(&self.storage.wal);
        if self.guest.is_none() && !self.chaos.guest_held_down() {
            self.try_restart();
        }
        let mut events = Vec::with_capacity(inputs.len().max(1));
        let mut statuses = Vec::new();
        let mut swaps = Vec::new();
        let mut backups = Vec::new();
        for input in inputs {
            match input {
                Input::Request { command, client, seq, reply } => {
                    if overloaded {
                        self.shed += 1;
                        crate::metrics::shed();
                        let _ = reply.send(Outcome::Rejected(format!(
                            "overloaded: this replica's disk is behind ({} MiB not yet durable); retry on another replica",
                            backlog >> 20
                        )));
                        continue;
                    }
                    if self.guest.is_none() {
                        let _ = reply.send(Outcome::Rejected("replica's guest is down (restarting); retry".into()));
                        continue;
                    }
                    let id = self.next_request_id;
                    self.next_request_id += 1;
                    self.waiting.insert(id, reply);
                    events.push(Event::Request(Request { id, client, seq, command }));
                }
                Input::Message(_) if overloaded => {
                    self.shed += 1;
                    crate::metrics::shed();
                }
                Input::Message(envelope) => {
                    if self.chaos.acceptor_down() && envelope.role == Role::Acceptor {
                        self.dropped_for_outage += 1;
                        crate::metrics::chaos_dropped();
                    } else {
                        events.push(Event::Message(envelope));
                    }
                }
                Input::Status(reply) => statuses.push(reply),
                Input::Backup(reply) => backups.push(reply),
                Input::Swap { build, reply, one_at_a_time } => swaps.push((build, reply, one_at_a_time)),
                Input::Synced => {}
            }
        }
        if self.shed > 0 && self.last_shed_log.elapsed() >= Duration::from_secs(1) {
            tracing::warn!(
                "disk behind: {} MiB of WAL not yet durable; {} requests and messages turned away in {} ms",
                backlog >> 20,
                self.shed,
                self.last_shed_log.elapsed().as_millis()
            );
            self.shed = 0;
            self.last_shed_log = Instant::now();
        }
        if events.is_empty() {
            events.push(Event::Tick);
            // Idle: make lazily persisted records durable now rather than at the next write.
            if self.pipeline.pipelined() {
                self.hand_off();
            } else {
                self.make_durable();
            }
        }
        let now_ms = self.now_ms();
        if let Some(guest) = self.guest.as_mut() {
            let started = Instant::now();
            let stepped = guest.step(now_ms, &events);
            crate::metrics::step(started.elapsed(), events.len());
            match stepped {
                Ok(effects) => self.carry_out(effects),
                Err(crash) => self.on_crash(crash),
            }
        }
        for (build, reply, one_at_a_time) in swaps {
            self.begin_swap(build, reply, one_at_a_time);
        }
        for reply in backups {
            let _ = reply.send(self.backup_state());
        }
        for reply in statuses {
            let hash = self.build.hash.clone();
            let status = match self.guest.as_mut() {
                Some(guest) => guest.status().map(|json| (json, hash)).map_err(|e| e.to_string()),
                None => Err("guest down".to_string()),
            };
            if let Err(reason) = &status {
                if reason != "guest down" {
                    self.guest = None;
                    tracing::error!("{reason}");
                }
            }
            let _ = reply.send(status);
        }
        if self.last_sweep.elapsed() >= Duration::from_secs(1) {
            self.last_sweep = Instant::now();
            self.waiting.retain(|_, reply| !reply.is_closed());
        }
        self.sample_for_metrics();
    }

    /// Every `metrics::GUEST_SAMPLE_MS`, the guest's status for the metrics (leader, ballot,
    /// slots) and the health service (`health`): a few microseconds.
    fn sample_for_metrics(&mut self) {
        if self.last_sample.elapsed() < Duration::from_millis(crate::metrics::GUEST_SAMPLE_MS) {
            return;
        }
        self.last_sample = Instant::now();
        match self.guest.as_mut().map(|guest| guest.status()) {
            Some(Ok(json)) => crate::metrics::observe_guest_status(&json),
            Some(Err(crash)) => self.on_crash(crash),
            None => crate::metrics::guest_up(false),
        }
    }

    /// Makes every appended record durable. Without durable storage this acceptor would break
    /// Paxos safety by answering: the host stops rather than send anything.
    fn make_durable(&mut self) {
        if let Err(e) = self.storage.wal.sync() {
            self.stop_host_disk(format!("cannot make the WAL durable: {e:#}"));
        }
    }

    /// Stops the host because the disk failed a write or sync. What the WAL holds can no
    /// longer be trusted (the kernel may have dropped the pages whose fdatasync failed, or may
    /// still serve them from its cache to a restart), so the data dir is marked: the next
    /// start sets the state aside and rejoins rather than replay it.
    fn stop_host_disk(&self, reason: String) -> ! {
        if let Err(e) = self.storage.mark_wal_failed(&reason) {
            tracing::error!("cannot mark the data dir as needing a rejoin either: {e:#}");
        }
        stop_host(format!("{reason}; stopping the host (the next start rejoins)"))
    }

    /// Persist, then send and reply: never the other way round. Lazy records go into the log in
    /// order with the others; a step with only lazy records (and nothing held before it) sends
    /// without waiting for them (they become durable with the next sync).
    fn carry_out(&mut self, effects: Vec<Effect>) {
        let mut persisted = 0;
        for effect in &effects {
            match effect {
                Effect::PersistLazy(record) => {
                    self.storage.wal.append(record);
                    self.storage.records_since_snapshot += 1;
                    if let Some(staged) = self.staged_swap.as_mut() {
                        staged.keep(record);
                    }
                }
                Effect::Persist(record) => {
                    self.storage.wal.append(record);
                    if let Some(staged) = self.staged_swap.as_mut() {
                        staged.keep(record);
                    }
                    self.storage.records_since_snapshot += 1;
                    persisted += 1;
                    if self.sync_every_record {
                        self.drain_syncs();
                    }
                }
                Effect::Send(_) | Effect::Reply(_) | Effect::Log(_) | Effect::Members(_) => {}
            }
        }
        if !self.pipeline.pipelined() || self.sync_every_record {
            if persisted > 0 {
                self.make_durable();
            }
            self.release(effects);
        } else {
            // This step's records go with the next hand-off; a step without any still waits for
            // the steps before it (their effects leave first).
            match self.pipeline.admit(&mut self.storage.wal, effects, persisted > 0) {
                Ok(Some(free)) => self.release(free),
                Ok(None) => {}
                Err(failure) => self.stop_host_disk(failure),
            }
        }
        if self.storage.records_since_snapshot >= self.snapshot_every {
            if self.pipeline.in_flight() {
                // Not now: that would wait on the disk. Right after the sync in flight reports.
                self.pipeline.compaction_due = true;
            } else {
                self.compact();
            }
        }
    }

    /// Hands the effects of a step whose records are durable on: messages to the peer transport
    /// (or back into the loop, for the guest's messages to itself), replies to their callers.
    fn release(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(envelope) if envelope.dst == self.config.me => self.loopback.push(envelope),
                Effect::Send(envelope) => self.peers.send(envelope),
                Effect::Reply((id, outcome)) => {
                    if let Some(reply) = self.waiting.remove(&id) {
                        let _ = reply.send(outcome);
                    }
                }
                Effect::Log(line) => tracing::info!("guest: {line}"),
                Effect::Members(members) => self.peers.follow(&members),
                Effect::Persist(_) | Effect::PersistLazy(_) => {}
            }
        }
    }

    /// Starts a sync of what the WAL buffered, unless one is running (the next one will then
    /// carry it) or nothing is buffered.
    fn hand_off(&mut self) {
        if let Err(failure) = self.pipeline.hand_off(&mut self.storage.wal) {
            self.stop_host_disk(failure);
        }
    }

    /// Takes the syncs reported finished: releases what they made durable, starts the next.
    fn collect_syncs(&mut self) {
        match self.pipeline.collect(&mut self.storage.wal) {
            Ok(released) => released.into_iter().for_each(|effects| self.release(effects)),
            Err(failure) => self.stop_host_disk(failure),
        }
    }

    /// Waits until every record appended so far is durable and every held effect released
    /// (before compaction, a restart from disk, or a per-record sync).
    fn drain_syncs(&mut self) {
        match self.pipeline.drain(&mut self.storage.wal) {
            Ok(released) => released.into_iter().for_each(|effects| self.release(effects)),
            Err(failure) => self.stop_host_disk(failure),
        }
    }

    /// The guest's snapshot becomes the new base; covered WAL segments go. Called when no sync
    /// is in flight, so the wait for the disk is this compaction's own.
    fn compact(&mut self) {
        self.pipeline.compaction_due = false;
        if self.background.is_some() {
            return self.compact_off_loop();
        }
        self.drain_syncs();
        let Some(guest) = self.guest.as_mut() else { return };
        let started = Instant::now();
        let snapshot = match guest.snapshot(false) {
            Ok(snapshot) => snapshot,
            Err(crash) => return self.on_crash(crash),
        };
        let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
        let bytes = snapshot.len();
        let records = self.storage.records_since_snapshot;
        let compacted = self.storage.compact(snapshot);
        crate::metrics::snapshot(bytes, started.elapsed());
        match compacted {
            Ok(()) => tracing::info!(
                "compacted {records} WAL records into a {bytes}-byte snapshot ({snapshot_ms:.1} ms in the guest, {:.1} ms in all)",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => self.stop_host_disk(format!("cannot write the snapshot: {e:#}")),
        }
    }

    /// The guest's snapshot and status, for a backup (`crate::backup`).
    fn backup_state(&mut self) -> Result<(Vec<u8>, String), String> {
        let guest = self.guest.as_mut().ok_or("the replica's guest is down (restarting); retry")?;
        match guest.snapshot(false).and_then(|snapshot| Ok((snapshot, guest.status()?))) {
            Ok(taken) => Ok(taken),
            Err(crash) => {
                let reason = format!("{crash}; retry");
                self.on_crash(crash);
                Err(reason)
            }
        }
    }

    /// Hot swap, between two steps: hand-over snapshot of the old instance, `start` of the new
    /// one from it, replace. If anything fails the old instance keeps running untouched.
    fn swap(&mut self, build: GuestBuild) -> Result<SwapReport, String> {
        let next = self.guest_dir.join("next.wasm");
        let refuse = |reason: String| {
            let _ = std::fs::remove_file(&next);
            let _ = std::fs::remove_file(crate::signing::signature_path(&next));
            tracing::warn!("swap to {} refused: {reason}", build.hash);
            Err(reason)
        };
        let Some(old) = self.guest.as_mut() else {
            return refuse("the current guest is down (restarting); retry the swap".into());
        };
        let old_version = version_of(&old.status().unwrap_or_default());
        let started = Instant::now();
        let handover = match old.snapshot(true) {
            Ok(bytes) => bytes,
            Err(crash) => {
                let reason = format!("the current guest failed its hand-over snapshot: {crash}");
                self.on_crash(crash);
                return refuse(reason);
            }
        };
        let snapshot_done = started.elapsed();
        let mut new = match build.instantiate() {
            Ok(new) => new,
            Err(crash) => return refuse(format!("the new build cannot be instantiated: {crash}")),
        };
        let instantiate_done = started.elapsed();
        let effects = match new.start(&self.config, Some(&handover), &[]) {
            Ok(Ok(effects)) => effects,
            Ok(Err(refused)) => return refuse(format!("the new build refused the current state: {refused}")),
            Err(crash) => return refuse(format!("the new build crashed in start: {crash}")),
        };
        let start_done = started.elapsed();
        let new_version = match new.status() {
            Ok(json) => version_of(&json),
            Err(crash) => return refuse(format!("the new build crashed in status: {crash}")),
        };
        let pause = started.elapsed();
        self.install_build(&build)?;
        self.guest = Some(new);
        let report = SwapReport { old_version, new_version, build_hash: build.hash.clone(), pause };
        self.build = build;
        self.carry_out(effects);
        tracing::info!(
            "hot swap: {} -> {} (build {}), pause {:.2} ms (hand-over snapshot of {} bytes {:.2} ms, instantiate {:.2} ms, start {:.2} ms)",
            report.old_version,
            report.new_version,
            report.build_hash,
            pause.as_secs_f64() * 1e3,
            handover.len(),
            snapshot_done.as_secs_f64() * 1e3,
            (instantiate_done - snapshot_done).as_secs_f64() * 1e3,
            (start_done - instantiate_done).as_secs_f64() * 1e3,
        );
        Ok(report)
    }

    /// Persists the choice of `build`: a restarted host runs it. The build and its signature
    /// (`signing::install_next`).
    fn install_build(&self, build: &GuestBuild) -> Result<(), String> {
        crate::signing::install_next(&self.guest_dir)
            .and_then(|_| {
                crate::crash_point::reach("swap.after_install");
                crate::storage::sync_dir(&self.guest_dir)
            })
            .map_err(|e| {
                // Not a refusal: the signature may be installed already, and deleting
                // `next.wasm` would leave the old build with the new signature. As after a
                // crash at the same point, the next start finishes the install (`signing`);
                // until then the old build runs.
                tracing::error!("swap to {} not persisted (the old build keeps running): {e:#}", build.hash);
                format!("cannot persist the new build: {e:#}")
            })
    }

    /// Compaction with the staging thread: roll the WAL here (everything before the new segment
    /// is durable), and let the thread snapshot a fresh instance started from the disk.
    fn compact_off_loop(&mut self) {
        let busy = self.background.as_ref().is_none_or(Background::busy);
        if busy || self.compaction_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let started = Instant::now();
        self.drain_syncs();
        let boundary = match self.storage.wal.roll() {
            Ok(boundary) => boundary,
            Err(e) => self.stop_host_disk(format!("cannot start a new WAL segment for a compaction: {e:#}")),
        };
        crate::crash_point::reach("compact.after_roll");
        self.compacting_records = self.storage.records_since_snapshot;
        self.storage.records_since_snapshot = 0;
        let (build, config, dir) = (self.build.clone(), self.config.clone(), self.storage.dir().to_path_buf());
        if let Some(background) = self.background.as_mut() {
            background.compact(build, config, dir, boundary);
        }
        tracing::info!(
            "compacting {} WAL records off the step loop (on the loop: WAL rolled to segment {boundary} in {:.1} ms)",
            self.compacting_records,
            started.elapsed().as_secs_f64() * 1e3
        );
    }

    /// Takes what the staging thread finished: a compaction (drop the covered segments), a
    /// staged instance (another round, or the switch), a failure.
    fn collect_background(&mut self) {
        let Some(done) = self.background.as_mut().and_then(Background::try_done) else { return };
        match done {
            Done::Compacted { boundary, records, bytes, timings } => {
                let started = Instant::now();
                if let Err(e) = self.storage.wal.drop_segments_before(boundary) {
                    // The snapshot is durable: segments left behind are skipped on every read.
                    tracing::warn!("cannot delete the WAL segments the new snapshot covers: {e:#}");
                }
                crate::crash_point::reach("compact.after_drop");
                let total = timings.read_ms + timings.start_ms + timings.snapshot_ms + timings.save_ms;
                crate::metrics::snapshot(bytes, Duration::from_secs_f64(total / 1e3));
                self.compaction_retry_at = None;
                tracing::info!(
                    "compacted {} WAL records into a {bytes}-byte snapshot off the step loop ({records} replayed by a fresh instance: read {:.1} ms, start {:.1} ms, snapshot {:.1} ms, save {:.1} ms; on the loop: {:.1} ms)",
                    self.compacting_records,
                    timings.read_ms,
                    timings.start_ms,
                    timings.snapshot_ms,
                    timings.save_ms,
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            Done::Failed { reason, build: None } => {
                self.storage.records_since_snapshot += self.compacting_records;
                self.compaction_retry_at = Some(Instant::now() + Duration::from_millis(COMPACTION_RETRY_MS));
                tracing::warn!("{reason}; trying again in {} s", COMPACTION_RETRY_MS / 1000);
            }
            Done::Failed { reason, build: Some(build) } => {
                if let Some(staged) = self.staged_swap.take() {
                    tracing::warn!("swap to {} refused: {reason}", build.hash);
                    let _ = std::fs::remove_file(self.guest_dir.join("next.wasm"));
                    let _ = std::fs::remove_file(crate::signing::signature_path(&self.guest_dir.join("next.wasm")));
                    let _ = staged.reply.send(Err(reason));
                }
            }
            Done::Staged { build, guest, timings } => self.on_staged(build, guest, timings),
        }
        if !self.background.as_ref().is_some_and(Background::busy) {
            if let Some((build, reply, one_at_a_time)) = self.swap_waiting.take() {
                self.begin_swap(build, reply, one_at_a_time);
            }
        }
    }

    /// A swap asked for: staged when both builds can (and the staging thread runs), else at
    /// once with a hand-over snapshot.
    fn begin_swap(
        &mut self,
        build: GuestBuild,
        reply: oneshot::Sender<Result<SwapReport, String>>,
        one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let stageable = self.background.is_some()
            && build.supports_staging()
            && self.build.supports_staging()
            && self.guest.is_some()
            && self.staged_swap.is_none();
        if !stageable {
            return self.swap_now(build, reply, one_at_a_time);
        }
        if self.background.as_ref().is_some_and(Background::busy) {
            // A compaction runs: the swap is staged once it is done.
            self.swap_waiting = Some((build, reply, one_at_a_time));
            return;
        }
        self.drain_syncs();
        let boundary = match self.storage.wal.roll() {
            Ok(boundary) => boundary,
            Err(e) => self.stop_host_disk(format!("cannot start a new WAL segment for a swap: {e:#}")),
        };
        tracing::info!(
            "hot swap to {}: preparing the new build off the step loop from the durable state (WAL rolled to segment {boundary})",
            build.hash
        );
        self.staged_swap = Some(StagedSwap {
            reply,
            one_at_a_time,
            tail: Vec::new(),
            tail_bytes: 0,
            rounds: 0,
            asked: Instant::now(),
            abandoned: None,
        });
        let (config, dir) = (self.config.clone(), self.storage.dir().to_path_buf());
        if let Some(background) = self.background.as_mut() {
            background.stage(build, config, dir, boundary);
        }
    }

    /// The swap with one hand-over snapshot (`swap`), answered.
    fn swap_now(
        &mut self,
        build: GuestBuild,
        reply: oneshot::Sender<Result<SwapReport, String>>,
        one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let swapped = self.swap(build);
        crate::metrics::swap(swapped.as_ref().ok().map(|report| report.pause));
        let _ = reply.send(swapped);
        drop(one_at_a_time);
    }

    /// A round of a staged swap is done: another round off the loop while many records arrived
    /// meanwhile, else the switch.
    fn on_staged(&mut self, build: GuestBuild, guest: Box<Guest>, timings: Timings) {
        let Some(staged) = self.staged_swap.as_mut() else { return };
        staged.rounds += 1;
        tracing::debug!("staged swap round {}: {:.1} ms; {} records since", staged.rounds, timings.start_ms, staged.tail.len());
        if let Some(why) = staged.abandoned.clone() {
            let Some(staged) = self.staged_swap.take() else { return };
            tracing::warn!("staged swap to {} abandoned ({why}): swapping with a hand-over snapshot", build.hash);
            return self.swap_now(build, staged.reply, staged.one_at_a_time);
        }
        if staged.tail.len() > crate::staging::SWITCH_RECORDS_MAX && staged.rounds < crate::staging::CATCH_UP_ROUNDS_MAX {
            let records = staged.take_tail();
            if let Some(background) = self.background.as_mut() {
                background.replay(build, guest, records);
            }
            return;
        }
        let Some(staged) = self.staged_swap.take() else { return };
        match self.switch_to_staged(&build, *guest, staged.tail, staged.asked) {
            Ok(report) => {
                self.build = build;
                crate::metrics::swap(Some(report.pause));
                let _ = staged.reply.send(Ok(report));
            }
            Err(Fallback::OldWay(why)) => {
                tracing::warn!("staged swap to {} not possible ({why}): swapping with a hand-over snapshot", build.hash);
                return self.swap_now(build, staged.reply, staged.one_at_a_time);
            }
            Err(Fallback::Refused(reason)) => {
                let _ = std::fs::remove_file(self.guest_dir.join("next.wasm"));
                let _ = std::fs::remove_file(crate::signing::signature_path(&self.guest_dir.join("next.wasm")));
                let _ = staged.reply.send(Err(reason));
            }
        }
        drop(staged.one_at_a_time);
    }

    /// The switch of a staged swap: the last records replayed, the old instance's volatile state
    /// adopted by the new one, the choice persisted. On `Fallback::OldWay` nothing changed.
    fn switch_to_staged(
        &mut self,
        build: &GuestBuild,
        mut new: Guest,
        tail: Vec<Vec<u8>>,
        asked: Instant,
    ) -> Result<SwapReport, Fallback> {
        let started = Instant::now();
        let Some(old) = self.guest.as_mut() else {
            return Err(Fallback::OldWay("the running guest is down".into()));
        };
        match new.replay(&tail) {
            Ok(Ok(_logs)) => {}
            Ok(Err(refused)) => return Err(Fallback::OldWay(format!("the new build refused a record: {refused}"))),
            Err(crash) => return Err(Fallback::OldWay(crash.to_string())),
        }
        let replayed = started.elapsed();
        let old_version = version_of(&old.status().unwrap_or_default());
        let volatile = match old.handover_volatile() {
            Ok(volatile) => volatile,
            Err(crash) => {
                let reason = format!("the current guest failed its hand-over: {crash}");
                self.on_crash(crash);
                return Err(Fallback::Refused(reason));
            }
        };
        let handed = started.elapsed();
        let effects = match new.adopt(&volatile) {
            Ok(Ok(effects)) => effects,
            Ok(Err(refused)) => return Err(Fallback::OldWay(refused)),
            Err(crash) => return Err(Fallback::OldWay(crash.to_string())),
        };
        let adopted = started.elapsed();
        let new_version = match new.status() {
            Ok(json) => version_of(&json),
            Err(crash) => return Err(Fallback::OldWay(format!("the new build crashed in status: {crash}"))),
        };
        let pause = started.elapsed();
        self.install_build(build).map_err(Fallback::Refused)?;
        self.guest = Some(new);
        let report = SwapReport { old_version, new_version, build_hash: build.hash.clone(), pause };
        self.carry_out(effects);
        tracing::info!(
            "hot swap (staged): {} -> {} (build {}), pause {:.2} ms (replay of {} records {:.2} ms, hand-over of {} bytes {:.2} ms, adopt {:.2} ms); prepared off the step loop in {} ms",
            report.old_version,
            report.new_version,
            report.build_hash,
            pause.as_secs_f64() * 1e3,
            tail.len(),
            replayed.as_secs_f64() * 1e3,
            volatile.len(),
            (handed - replayed).as_secs_f64() * 1e3,
            (adopted - handed).as_secs_f64() * 1e3,
            (started - asked).as_millis()
        );
        Ok(report)
    }

    fn run_chaos(&mut self) {
        let now = self.now_ms();
        for event in self.chaos.poll(now) {
            crate::metrics::chaos_event(event.name());
            match event {
                ChaosEvent::OutageStart { ms } => {
                    tracing::warn!("chaos: acceptor outage starts: acceptor messages dropped for {ms} ms")
                }
                ChaosEvent::OutageEnd { ms } => {
                    tracing::warn!(
                        "chaos: acceptor outage ends after {ms} ms ({} acceptor messages dropped)",
                        self.dropped_for_outage
                    );
                    self.dropped_for_outage = 0;
                }
                ChaosEvent::CrashStart { ms } => {
                    tracing::warn!("chaos: guest crash injected: instance discarded, silent for {ms} ms");
                    self.discard_guest("the replica's guest crashed (injected) and is restarting; retry");
                }
                ChaosEvent::CrashEnd { ms } => {
                    let started = Instant::now();
                    self.last_restart_attempt = None;
                    self.try_restart();
                    if self.guest.is_some() {
                        tracing::warn!(
                            "chaos: guest crash recovered: down {ms} ms, restart took {} ms",
                            started.elapsed().as_millis()
                        );
                    }
                }
            }
        }
    }

    fn discard_guest(&mut self, reason: &str) {
        if let Some(staged) = self.staged_swap.as_mut() {
            staged.abandon("the running guest crashed while the new build was prepared".into());
        }
        self.guest = None;
        crate::metrics::guest_up(false);
        self.loopback.clear();
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Outcome::Rejected(reason.to_string()));
        }
    }

    fn on_crash(&mut self, crash: GuestCrash) {
        crate::metrics::guest_crashed();
        tracing::error!("{crash}; discarding the instance and restarting it from its snapshot and WAL");
        self.discard_guest("the replica's guest crashed and is restarting; retry");
        self.try_restart();
    }

    fn try_restart(&mut self) {
        if self.last_restart_attempt.is_some_and(|t| t.elapsed() < Duration::from_millis(RESTART_RETRY_MS)) {
            return;
        }
        self.last_restart_attempt = Some(Instant::now());
        let started = Instant::now();
        // Records still buffered or being synced belong to what the restart replays.
        self.drain_syncs();
        let durable = match self.storage.read_durable() {
            Ok(durable) => durable,
            Err(e) => {
                tracing::error!("cannot read durable state to restart the guest: {e:#}");
                return;
            }
        };
        match self.start_guest(&durable) {
            Ok(guest) => {
                self.guest = Some(guest);
                self.last_restart_attempt = None;
                crate::metrics::guest_restarted();
                tracing::info!(
                    "guest restarted from {} + {} WAL records; recovery took {} ms",
                    describe_snapshot(&durable),
                    durable.records.len(),
                    started.elapsed().as_millis()
                );
            }
            Err(e) => {
                tracing::error!("guest restart failed: {e}; retrying in {RESTART_RETRY_MS} ms")
            }
        }
    }
}

/// Why a staged switch did not happen.
enum Fallback {
    /// Nothing changed: swap with a hand-over snapshot instead.
    OldWay(String),
    /// The swap is refused (the old instance crashed, the choice could not be persisted).
    Refused(String),
}

/// Exit code of a host stopped because its disk failed a write or sync.
pub const EXIT_DISK_FAILED: i32 = 70;

/// Stops the process after logging why: without durable storage this acceptor would break
/// Paxos safety by answering, so the host stops rather than send anything.
fn stop_host(reason: String) -> ! {
    tracing::error!("{reason}");
    waxos_proto::logging::flush();
    std::process::exit(EXIT_DISK_FAILED);
}

/// Marks the handle ready (the guest is running).
pub fn mark_ready(handle: &StepLoopHandle) {
    handle.ready.store(true, Ordering::Release);
}

fn describe_snapshot(durable: &Durable) -> String {
    durable.snapshot.as_ref().map_or("no snapshot".to_string(), |s| format!("a {}-byte snapshot", s.len()))
}

/// The `version` field of a guest status JSON.
fn version_of(status_json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(status_json)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
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
}
