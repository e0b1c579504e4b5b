//! The step loop: the one thread that owns the guest instance (a wasmtime `Store` is not
//! `Sync`) and the write-ahead log.
//!
//! gRPC handlers and peer streams only push `Input`s into its bounded channel. Each turn it
//! drains what is queued (up to `STEP_EVENTS_MAX`), calls the guest's `step` once, appends
//! every `persist` record to the WAL and makes them durable with one `fdatasync` (group
//! commit), and only then hands `send` effects to the peer transport and `reply` effects to the
//! waiting callers. That order is the rule that keeps an acceptor's promises and accepts
//! across a crash (DESIGN §2). A guest crash (trap, deadline, memory) is logged; the instance is
//! thrown away and a new one started from the WAL, while the host keeps serving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::peer::Peers;
use crate::runtime::{
    Command, Effect, Event, Guest, GuestConfig, GuestCrash, Outcome, Request, Runtime,
};
use crate::storage::Wal;

/// The guest is stepped at least this often (its timers: heartbeats, elections, re-sends).
pub const TICK_MS: u64 = 10;
/// Bound on inputs waiting for the step loop.
pub const INPUT_QUEUE_MAX: usize = 65_536;
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
    /// The guest's status JSON (or why there is none).
    Status(oneshot::Sender<Result<String, String>>),
}

/// The sending side, cloned into every handler.
#[derive(Clone)]
pub struct StepLoopHandle {
    tx: SyncSender<Input>,
    /// True once the guest runs (the roster is complete).
    pub ready: Arc<AtomicBool>,
}

impl StepLoopHandle {
    /// Offers an input; if the queue is full, a request is answered "overloaded" and a message
    /// dropped (Paxos tolerates loss).
    pub fn offer(&self, input: Input) {
        match self.tx.try_send(input) {
            Ok(()) => {}
            Err(TrySendError::Full(Input::Request { reply, .. })) => {
                let _ = reply.send(Outcome::Rejected(
                    "overloaded: the replica's input queue is full".into(),
                ));
            }
            Err(TrySendError::Full(Input::Status(reply))) => {
                let _ = reply.send(Err("overloaded".into()));
            }
            Err(TrySendError::Full(Input::Message(_))) => {
                tracing::debug!("input queue full: envelope dropped")
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("step loop is gone: input dropped")
            }
        }
    }
}

/// A new channel: the handle for producers, the receiver for `StepLoop::run`.
pub fn channel() -> (StepLoopHandle, Receiver<Input>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(INPUT_QUEUE_MAX);
    (
        StepLoopHandle {
            tx,
            ready: Arc::new(AtomicBool::new(false)),
        },
        rx,
    )
}

/// The loop's state.
pub struct StepLoop {
    runtime: Arc<Runtime>,
    guest: Option<Guest>,
    config: GuestConfig,
    wal: Wal,
    peers: Peers,
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
    next_request_id: u64,
    clock: Instant,
    last_restart_attempt: Option<Instant>,
    last_sweep: Instant,
}

impl StepLoop {
    /// Starts the guest from `wal_records` and returns the loop, ready to `run`.
    pub fn new(
        runtime: Arc<Runtime>,
        config: GuestConfig,
        wal: Wal,
        wal_records: Vec<Vec<u8>>,
        peers: Peers,
    ) -> anyhow::Result<StepLoop> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut step_loop = StepLoop {
            runtime,
            guest: None,
            config,
            wal,
            peers,
            waiting: HashMap::new(),
            // Unique across restarts of this host, so a late reply can never match a new request.
            next_request_id: now.as_micros() as u64,
            clock: Instant::now(),
            last_restart_attempt: None,
            last_sweep: Instant::now(),
        };
        let started = Instant::now();
        let guest = step_loop
            .start_guest(&wal_records)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(
            "guest {} started from {} WAL records in {} ms",
            step_loop.runtime.guest_path.display(),
            wal_records.len(),
            started.elapsed().as_millis()
        );
        step_loop.guest = Some(guest);
        Ok(step_loop)
    }

    fn start_guest(&mut self, wal_records: &[Vec<u8>]) -> Result<Guest, String> {
        let mut guest = self.runtime.instantiate().map_err(|e| e.to_string())?;
        match guest.start(&self.config, None, wal_records) {
            Ok(Ok(effects)) => {
                for effect in effects {
                    if let Effect::Log(line) = effect {
                        tracing::info!("guest: {line}");
                    }
                }
                Ok(guest)
            }
            Ok(Err(refused)) => Err(format!("guest refused its durable state: {refused}")),
            Err(crash) => Err(crash.to_string()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Runs until every handle is dropped.
    pub fn run(mut self, inputs: Receiver<Input>) {
        loop {
            let mut batch = Vec::new();
            match inputs.recv_timeout(Duration::from_millis(TICK_MS)) {
                Ok(input) => batch.push(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < STEP_EVENTS_MAX {
                match inputs.try_recv() {
                    Ok(input) => batch.push(input),
                    Err(_) => break,
                }
            }
            self.turn(batch);
        }
    }

    fn turn(&mut self, inputs: Vec<Input>) {
        if self.guest.is_none() {
            self.try_restart();
        }
        let mut events = Vec::with_capacity(inputs.len().max(1));
        let mut statuses = Vec::new();
        for input in inputs {
            match input {
                Input::Request {
                    command,
                    client,
                    seq,
                    reply,
                } => {
                    if self.guest.is_none() {
                        let _ = reply.send(Outcome::Rejected(
                            "replica's guest is down (restarting); retry".into(),
                        ));
                        continue;
                    }
                    let id = self.next_request_id;
                    self.next_request_id += 1;
                    self.waiting.insert(id, reply);
                    events.push(Event::Request(Request {
                        id,
                        client,
                        seq,
                        command,
                    }));
                }
                Input::Message(envelope) => events.push(Event::Message(envelope)),
                Input::Status(reply) => statuses.push(reply),
            }
        }
        if events.is_empty() {
            events.push(Event::Tick);
        }
        let now_ms = self.now_ms();
        if let Some(guest) = self.guest.as_mut() {
            match guest.step(now_ms, &events) {
                Ok(effects) => self.carry_out(effects),
                Err(crash) => self.on_crash(crash),
            }
        }
        for reply in statuses {
            let status = match self.guest.as_mut() {
                Some(guest) => guest.status().map_err(|e| e.to_string()),
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
    }

    /// Persist (one fdatasync for the step), then send and reply: never the other way round.
    fn carry_out(&mut self, effects: Vec<Effect>) {
        let mut persisted = false;
        for effect in &effects {
            if let Effect::Persist(record) = effect {
                self.wal.append(record);
                persisted = true;
            }
        }
        if persisted {
            if let Err(e) = self.wal.sync() {
                // Without durable storage this acceptor would break Paxos safety by answering:
                // stop the host rather than send anything.
                tracing::error!("cannot make the WAL durable, stopping the host: {e:#}");
                std::process::exit(70);
            }
        }
        for effect in effects {
            match effect {
                Effect::Send(envelope) => self.peers.send(envelope),
                Effect::Reply((id, outcome)) => {
                    if let Some(reply) = self.waiting.remove(&id) {
                        let _ = reply.send(outcome);
                    }
                }
                Effect::Log(line) => tracing::info!("guest: {line}"),
                Effect::Persist(_) => {}
            }
        }
    }

    fn on_crash(&mut self, crash: GuestCrash) {
        tracing::error!("{crash}; discarding the instance and restarting it from the WAL");
        self.guest = None;
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Outcome::Rejected(
                "the replica's guest crashed and is restarting; retry".into(),
            ));
        }
        self.try_restart();
    }

    fn try_restart(&mut self) {
        if self
            .last_restart_attempt
            .is_some_and(|t| t.elapsed() < Duration::from_millis(RESTART_RETRY_MS))
        {
            return;
        }
        self.last_restart_attempt = Some(Instant::now());
        let started = Instant::now();
        let records = match self.wal.read_all() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("cannot read the WAL to restart the guest: {e:#}");
                return;
            }
        };
        match self.start_guest(&records) {
            Ok(guest) => {
                self.guest = Some(guest);
                self.last_restart_attempt = None;
                tracing::info!(
                    "guest restarted from {} WAL records; recovery took {} ms",
                    records.len(),
                    started.elapsed().as_millis()
                );
            }
            Err(e) => {
                tracing::error!("guest restart failed: {e}; retrying in {RESTART_RETRY_MS} ms")
            }
        }
    }
}

/// Marks the handle ready (the guest is running).
pub fn mark_ready(handle: &StepLoopHandle) {
    handle.ready.store(true, Ordering::Release);
}
