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
//! Every `snapshot_every` records it compacts, and it carries out hot swaps: both are in
//! `housekeeping`, which keeps the work that grows with the state off this loop. It also runs the
//! chaos schedule (acceptor outages, injected guest crashes).

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
use crate::staging::{Background, StagedSwap};
use crate::storage::syncer::Syncer;
use crate::storage::{Durable, Storage};
use crate::sync_pipeline::SyncPipeline;
use turn_phases::TurnPhases;

mod housekeeping;
mod turn_phases;

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
/// A turn of the step loop this long is logged: nobody got an answer meanwhile, and an election
/// timeout is 300 ms.
const TURN_LOGGED_MS: u64 = 100;
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
    /// Records and bytes the compaction in progress covers (counted again if it fails).
    compacting: (u64, u64),
    /// After a failed compaction off the loop, the next one waits until then.
    compaction_retry_at: Option<Instant>,
    /// A staged hot swap in progress.
    staged_swap: Option<StagedSwap>,
    /// A swap that arrived while a compaction ran: it is staged once that is done.
    swap_waiting: Option<SwapAsked>,
    /// A WAL roll asked for, and the background job that starts once it is made.
    awaiting_roll: Option<housekeeping::AwaitingRoll>,
    /// Where the turn in progress spends its time (logged when it is slow).
    phases: TurnPhases,
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
            compacting: (0, 0),
            compaction_retry_at: None,
            staged_swap: None,
            swap_waiting: None,
            awaiting_roll: None,
            phases: TurnPhases::default(),
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
            let started = Instant::now();
            let inputs = batch.len();
            self.phases.start();
            self.turn(batch);
            let took = started.elapsed();
            crate::metrics::turn(took);
            if took >= Duration::from_millis(TURN_LOGGED_MS) {
                tracing::info!(
                    "a step-loop turn took {} ms ({inputs} inputs; {})",
                    took.as_millis(),
                    self.phases.describe()
                );
            }
        }
    }

    fn turn(&mut self, inputs: Vec<Input>) {
        self.collect_syncs();
        if self.storage.wal.roll_pending() && !self.pipeline.in_flight() {
            // A roll asked for is made at a hand-off; a replica whose steps persist nothing
            // strictly would otherwise never make one.
            self.hand_off();
        }
        self.phases.mark("syncs collected");
        self.collect_background();
        self.phases.mark("background work collected");
        if self.pipeline.compaction_due && !self.pipeline.in_flight() {
            self.compact();
        }
        self.phases.mark("compaction started");
        self.run_chaos();
        // A disk that is behind (stalled, failing slowly) must not cost memory without end:
        // take no new work until it catches up.
        let backlog = self.pipeline.backlog_bytes(&self.storage.wal);
        let overloaded = self.pipeline.disk_behind(&self.storage.wal);
        if self.guest.is_none() && !self.chaos.guest_held_down() {
            self.try_restart();
        }
        self.phases.mark("chaos and restarts");
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
        self.phases.mark("inputs sorted (and idle syncs)");
        let now_ms = self.now_ms();
        if let Some(guest) = self.guest.as_mut() {
            let started = Instant::now();
            let stepped = guest.step(now_ms, &events);
            crate::metrics::step(started.elapsed(), events.len());
            self.phases.mark("guest step");
            match stepped {
                Ok(effects) => self.carry_out(effects),
                Err(crash) => self.on_crash(crash),
            }
            self.phases.mark("effects carried out");
        }
        for (build, reply, one_at_a_time) in swaps {
            self.begin_swap(build, reply, one_at_a_time);
        }
        self.phases.mark("swaps");
        for reply in backups {
            let _ = reply.send(self.backup_state());
        }
        for reply in statuses {
            let hash = self.build.hash.clone();
            let status = match self.guest.as_mut().map(Guest::status) {
                Some(Ok(json)) => Ok((json, hash)),
                Some(Err(crash)) => {
                    let reason = crash.to_string();
                    // A crash like any other: waiting callers answered, a staged swap abandoned.
                    self.on_crash(crash);
                    Err(reason)
                }
                None => Err("guest down".to_string()),
            };
            let _ = reply.send(status);
        }
        if self.last_sweep.elapsed() >= Duration::from_secs(1) {
            self.last_sweep = Instant::now();
            self.waiting.retain(|_, reply| !reply.is_closed());
        }
        self.phases.mark("backups and statuses");
        self.sample_for_metrics();
        self.phases.mark("metrics sample");
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
                    self.storage.note_appended(record);
                    if let Some(staged) = self.staged_swap.as_mut() {
                        staged.keep(record);
                    }
                }
                Effect::Persist(record) => {
                    self.storage.wal.append(record);
                    if let Some(staged) = self.staged_swap.as_mut() {
                        staged.keep(record);
                    }
                    self.storage.note_appended(record);
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
            self.start_after_roll();
        }
        if self.storage.compaction_due(self.snapshot_every) {
            if self.background.is_some() {
                // Nothing waits on the disk: a roll is asked for (`housekeeping`).
                self.compact();
            } else if self.pipeline.in_flight() {
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
        self.start_after_roll();
    }

    /// Takes the syncs reported finished: releases what they made durable, starts the next.
    fn collect_syncs(&mut self) {
        match self.pipeline.collect(&mut self.storage.wal) {
            Ok(released) => released.into_iter().for_each(|effects| self.release(effects)),
            Err(failure) => self.stop_host_disk(failure),
        }
        self.start_after_roll();
    }

    /// Waits until every record appended so far is durable and every held effect released
    /// (before compaction, a restart from disk, or a per-record sync).
    fn drain_syncs(&mut self) {
        match self.pipeline.drain(&mut self.storage.wal) {
            Ok(released) => released.into_iter().for_each(|effects| self.release(effects)),
            Err(failure) => self.stop_host_disk(failure),
        }
        self.start_after_roll();
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
        if let Some(old) = self.guest.take() {
            crate::runtime::dispose(old);
        }
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
        self.finish_background_job();
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
mod tests;
