//! The sync pipeline between the step loop and the disk: which step's effects may leave the
//! host, and when.
//!
//! Rule (DESIGN §2): a step's messages and replies leave only once its `persist` records, and
//! every earlier one, are durable. The `fdatasync` runs on the WAL's writer thread
//! (`storage::syncer`); the pipeline numbers each hand-off to it (a ticket), holds each step's
//! effects with the ticket that must be durable first, and gives them back in step order as
//! reports arrive. Meanwhile the step loop keeps stepping and buffering, so the next hand-off
//! carries every step that ran during this one's fsync (group commit across steps).
//!
//! It also keeps what a stalled disk costs bounded: `disk_behind` says when the WAL bytes not
//! yet durable (buffered, being written) pass `BACKLOG_BYTES_MAX`, or the effects held for them
//! pass `HELD_BYTES_MAX` (a leader's held accepts fan out to every follower, so they are
//! bounded apart and higher: counting them against the WAL's bound made a leader under 256 KiB
//! writes shed its followers' answers and collapse); then the step loop stops taking work in
//! (requests are answered "overloaded", peer messages dropped — Paxos tolerates loss) instead
//! of growing without end, and it never waits on the disk itself: a compaction that comes due
//! while a sync is in flight waits for its report (`compaction_due`) rather than for the disk.

use std::collections::VecDeque;

use crate::runtime::Effect;
use crate::storage::syncer::{Synced, Syncer};
use crate::storage::Wal;

/// WAL bytes buffered and being synced above which the step loop takes no new work.
pub const BACKLOG_BYTES_MAX: usize = 64 << 20;
/// Bytes of effects held for the disk above which the step loop takes no new work.
pub const HELD_BYTES_MAX: usize = 512 << 20;

/// Effects of one step waiting for a sync, with the ticket that must be durable first.
struct Held {
    ticket: u64,
    effects: Vec<Effect>,
    bytes: usize,
}

/// The pipeline's state (see the module doc).
pub struct SyncPipeline {
    syncer: Option<Syncer>,
    /// Hand-offs numbered so far, and the last one known durable.
    issued: u64,
    durable: u64,
    in_flight_bytes: usize,
    held: VecDeque<Held>,
    held_bytes: usize,
    /// A compaction is waiting for the sync in flight to finish.
    pub compaction_due: bool,
}

/// Why the disk failed us: the host must stop (see `step_loop::stop_host_disk`).
pub type DiskFailure = String;

impl SyncPipeline {
    /// A pipeline writing on `syncer`'s thread, or, without one, none (every step syncs inline).
    pub fn new(syncer: Option<Syncer>) -> SyncPipeline {
        SyncPipeline {
            syncer,
            issued: 0,
            durable: 0,
            in_flight_bytes: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            compaction_due: false,
        }
    }

    /// Whether syncs run on the writer thread.
    pub fn pipelined(&self) -> bool {
        self.syncer.is_some()
    }

    /// Whether a hand-off is being written.
    pub fn in_flight(&self) -> bool {
        self.issued > self.durable
    }

    /// WAL bytes not yet durable: buffered, being written.
    pub fn backlog_bytes(&self, wal: &Wal) -> usize {
        wal.buffered_bytes() + self.in_flight_bytes
    }

    /// Whether the disk is so far behind that no new work may be taken in (see the module doc).
    pub fn disk_behind(&self, wal: &Wal) -> bool {
        self.backlog_bytes(wal) > BACKLOG_BYTES_MAX || self.held_bytes > HELD_BYTES_MAX
    }

    /// Takes a step's effects (its records already appended to `wal`): returns them when they
    /// may leave now (nothing of theirs or before them awaits the disk), or holds them.
    pub fn admit(
        &mut self,
        wal: &mut Wal,
        effects: Vec<Effect>,
        persisted: bool,
    ) -> Result<Option<Vec<Effect>>, DiskFailure> {
        let needs = if persisted { Some(self.issued + 1) } else { self.held.back().map(|h| h.ticket) };
        let Some(ticket) = needs else { return Ok(Some(effects)) };
        // The records are in the WAL's buffer already: hold only what leaves afterwards.
        let effects: Vec<Effect> =
            effects.into_iter().filter(|e| !matches!(e, Effect::Persist(_) | Effect::PersistLazy(_))).collect();
        let bytes = effects.iter().map(effect_bytes).sum();
        self.held_bytes += bytes;
        self.held.push_back(Held { ticket, effects, bytes });
        self.hand_off(wal)?;
        Ok(None)
    }

    /// Starts a sync of what the WAL buffered, unless one is running (the next one will then
    /// carry it), a compaction waits for the disk to be idle, or nothing is buffered.
    pub fn hand_off(&mut self, wal: &mut Wal) -> Result<(), DiskFailure> {
        let Some(syncer) = self.syncer.as_ref() else { return Ok(()) };
        if self.in_flight() || self.compaction_due {
            return Ok(());
        }
        match wal.take_for_sync() {
            Ok(None) => Ok(()),
            Ok(Some(hand_off)) => {
                self.issued += 1;
                self.in_flight_bytes = hand_off.bytes.len();
                if syncer.submit(self.issued, hand_off) {
                    Ok(())
                } else {
                    Err("the WAL writer thread is gone".into())
                }
            }
            Err(e) => Err(format!("cannot hand the WAL over for syncing: {e:#}")),
        }
    }

    /// Takes the syncs reported finished; returns the effects they made free to leave, in
    /// step order, and starts the next sync.
    pub fn collect(&mut self, wal: &mut Wal) -> Result<Vec<Vec<Effect>>, DiskFailure> {
        let mut released = Vec::new();
        while let Some(done) = self.syncer.as_ref().and_then(Syncer::try_done) {
            self.on_synced(done, &mut released)?;
        }
        if !released.is_empty() && !self.held.is_empty() {
            self.hand_off(wal)?;
        }
        Ok(released)
    }

    fn on_synced(&mut self, done: Synced, released: &mut Vec<Vec<Effect>>) -> Result<(), DiskFailure> {
        done.result.map_err(|e| format!("cannot make the WAL durable: {e}"))?;
        self.durable = self.durable.max(done.ticket);
        if !self.in_flight() {
            self.in_flight_bytes = 0;
        }
        while self.held.front().is_some_and(|h| h.ticket <= self.durable) {
            if let Some(h) = self.held.pop_front() {
                self.held_bytes -= h.bytes;
                released.push(h.effects);
            }
        }
        Ok(())
    }

    /// Waits until every record appended so far is durable; returns every held effect, in
    /// order (before compaction, a restart from disk, or a per-record sync). Blocks on the
    /// disk: callers avoid it while a sync is in flight, except where the disk must be waited
    /// for anyway.
    pub fn drain(&mut self, wal: &mut Wal) -> Result<Vec<Vec<Effect>>, DiskFailure> {
        let mut released = Vec::new();
        while self.in_flight() {
            match self.syncer.as_ref().and_then(Syncer::wait_done) {
                Some(done) => self.on_synced(done, &mut released)?,
                None => return Err("the WAL writer thread is gone".into()),
            }
        }
        wal.sync().map_err(|e| format!("cannot make the WAL durable: {e:#}"))?;
        released.extend(self.held.drain(..).map(|h| h.effects));
        self.held_bytes = 0;
        Ok(released)
    }
}

/// What an effect held in memory costs, roughly.
fn effect_bytes(effect: &Effect) -> usize {
    64 + match effect {
        Effect::Send(envelope) => envelope.payload.len(),
        Effect::Reply(_) => 64,
        Effect::Log(line) => line.len(),
        Effect::Members(members) => members.iter().map(|m| 16 + m.address.len()).sum(),
        Effect::Persist(r) | Effect::PersistLazy(r) => r.len(),
    }
}
