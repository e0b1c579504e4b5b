//! One simulated host's storage and its pipelined sync, as `host/src/step_loop.rs` does it.
//!
//! It owns what survives a crash (the snapshot and the durable WAL records), what does not
//! (records buffered, or handed to a sync still running), and the effects held behind those
//! records. The host appends every record of a step to its WAL buffer; a step with a strict
//! `persist` holds its sends and replies until the sync covering it completes, while the loop
//! keeps stepping (later steps' effects are held behind it, in step order); a step without
//! records is released at once unless something is held before it; one sync runs at a time and
//! the next one carries everything buffered meanwhile (group commit); lazy records become
//! durable only with a later sync (or an idle step's). Syncs take random virtual time. A crash
//! keeps the durable records and a random prefix of the sync in progress (a torn write, cut at
//! a record boundary as the WAL's open does), loses the rest, and nothing held ever leaves.
//! Compaction (every `snapshot_every_records` records) drains the syncs first, as the host does,
//! then makes the guest's snapshot the new base; a compaction off the step loop (`background`)
//! saves a snapshot that covers only the records before its boundary, and drops them later (a
//! restart in between skips them, as the host's reads skip the segments a snapshot covers).

use std::collections::VecDeque;

use waxos_host::runtime::Effect;

use crate::rng::Rng;

/// A sync of the WAL runs in `0..SYNC_MS_MAX` ms of virtual time…
pub const SYNC_MS_MAX: u64 = 8;
/// …except that one in `SLOW_SYNC_ONE_IN` takes up to `SLOW_SYNC_MS_MAX` ms (a slow disk).
pub const SLOW_SYNC_ONE_IN: u64 = 25;
/// Longest slow sync.
pub const SLOW_SYNC_MS_MAX: u64 = 150;

/// The sync in progress on the host's WAL writer thread.
struct Sync {
    ticket: u64,
    records: Vec<Vec<u8>>,
    done_at_ms: u64,
}

/// A host's durable state and the sync pipeline in front of it.
#[derive(Default)]
pub struct Disk {
    /// The base the WAL records follow (`None`: start from nothing).
    pub snapshot: Option<Vec<u8>>,
    /// Records on disk after the previous snapshot; a restart replays those after `covered`.
    pub durable: Vec<Vec<u8>>,
    /// Leading records of `durable` the snapshot covers (saved off the step loop, not dropped
    /// yet).
    covered: usize,
    /// Appended, not yet handed to a sync.
    buffered: Vec<Vec<u8>>,
    syncing: Option<Sync>,
    sync_issued: u64,
    sync_durable: u64,
    /// Effects of steps whose records are not durable yet, each with the sync it waits for.
    held: VecDeque<(u64, Vec<Effect>)>,
    /// Records appended since the last compaction.
    pub records_since_snapshot: u64,
    /// Records that became durable since the world last looked (`take_newly_durable`): the
    /// agreement check judges what a replica *durably* recorded, since a record lost in a crash
    /// never had an effect outside (everything after it was held).
    newly_durable: Vec<Vec<u8>>,
}

/// What a crash did to the records not yet durable.
pub struct CrashLoss {
    /// Records of the sync in progress that reached the disk anyway.
    pub kept: usize,
    /// Records lost.
    pub lost: usize,
    /// Steps whose effects were held and now never leave.
    pub held_steps: usize,
}

impl Disk {
    /// Takes a step's effects as the host's `carry_out` does: its records go into the WAL
    /// buffer; returns the effects that may leave now (this step's, when it needs no sync and
    /// nothing is held before it). `now_ms` and `rng` time a sync started here.
    pub fn carry_out(&mut self, effects: Vec<Effect>, now_ms: u64, rng: &mut Rng) -> Vec<Effect> {
        let mut strict = false;
        for effect in &effects {
            match effect {
                Effect::Persist(record) => {
                    self.buffered.push(record.clone());
                    self.records_since_snapshot += 1;
                    strict = true;
                }
                Effect::PersistLazy(record) => {
                    self.buffered.push(record.clone());
                    self.records_since_snapshot += 1;
                }
                Effect::Send(_) | Effect::Reply(_) | Effect::Log(_) | Effect::Members(_) => {}
            }
        }
        let needs = if strict { Some(self.sync_issued + 1) } else { self.held.back().map(|(t, _)| *t) };
        match needs {
            Some(ticket) => {
                self.held.push_back((ticket, effects));
                self.hand_off(now_ms, rng);
                Vec::new()
            }
            None => effects,
        }
    }

    /// An idle step makes lazily persisted records durable (starts a sync of the buffer).
    pub fn on_idle(&mut self, now_ms: u64, rng: &mut Rng) {
        self.hand_off(now_ms, rng);
    }

    /// Starts a sync of what is buffered, unless one runs (the next one carries it).
    fn hand_off(&mut self, now_ms: u64, rng: &mut Rng) {
        if self.syncing.is_some() || self.buffered.is_empty() {
            return;
        }
        self.sync_issued += 1;
        let took_ms = if rng.range(0, SLOW_SYNC_ONE_IN) == 0 {
            rng.range(SYNC_MS_MAX, SLOW_SYNC_MS_MAX)
        } else {
            rng.range(0, SYNC_MS_MAX)
        };
        self.syncing = Some(Sync {
            ticket: self.sync_issued,
            records: std::mem::take(&mut self.buffered),
            done_at_ms: now_ms + took_ms,
        });
    }

    /// Completes the sync if it is done by `now_ms`; returns the effects it releases (in step
    /// order) and starts the next sync if anything is still held.
    pub fn poll(&mut self, now_ms: u64, rng: &mut Rng) -> Vec<Effect> {
        let mut released = Vec::new();
        if self.syncing.as_ref().is_some_and(|s| s.done_at_ms <= now_ms) {
            if let Some(done) = self.syncing.take() {
                self.newly_durable.extend(done.records.iter().cloned());
                self.durable.extend(done.records);
                self.sync_durable = done.ticket;
            }
            while self.held.front().is_some_and(|(ticket, _)| *ticket <= self.sync_durable) {
                if let Some((_, effects)) = self.held.pop_front() {
                    released.extend(effects);
                }
            }
            if !self.held.is_empty() {
                self.hand_off(now_ms, rng);
            }
        }
        released
    }

    /// Everything appended is durable and every held effect released (before compaction, as
    /// the host's `drain_syncs`); returns what is released.
    pub fn drain(&mut self) -> Vec<Effect> {
        if let Some(done) = self.syncing.take() {
            self.newly_durable.extend(done.records.iter().cloned());
            self.durable.extend(done.records);
        }
        self.newly_durable.extend(self.buffered.iter().cloned());
        self.durable.append(&mut self.buffered);
        self.sync_durable = self.sync_issued;
        self.held.drain(..).flat_map(|(_, effects)| effects).collect()
    }

    /// The guest's snapshot becomes the base; the records it covers go.
    pub fn compact(&mut self, snapshot: Vec<u8>) {
        self.snapshot = Some(snapshot);
        self.durable.clear();
        self.covered = 0;
        self.records_since_snapshot = 0;
    }

    /// A compaction off the step loop saves `snapshot`, which covers the first `boundary`
    /// durable records (those stay until `drop_covered`).
    pub fn save_covering(&mut self, snapshot: Vec<u8>, boundary: usize) {
        self.snapshot = Some(snapshot);
        self.covered = boundary.min(self.durable.len());
    }

    /// The records the snapshot covers are deleted.
    pub fn drop_covered(&mut self) {
        self.durable.drain(..self.covered);
        self.covered = 0;
    }

    /// What a restart replays after the snapshot.
    pub fn records_after_snapshot(&self) -> &[Vec<u8>] {
        &self.durable[self.covered..]
    }

    /// The durable records after the snapshot and before `boundary` (a background job's).
    pub fn records_before(&self, boundary: usize) -> &[Vec<u8>] {
        &self.durable[self.covered.min(boundary)..boundary.min(self.durable.len())]
    }

    /// The host dies: the durable records stay, with a random prefix of the sync in progress;
    /// the buffer and every held effect are gone.
    pub fn crash(&mut self, rng: &mut Rng) -> CrashLoss {
        let mut loss = CrashLoss { kept: 0, lost: self.buffered.len(), held_steps: self.held.len() };
        if let Some(sync) = self.syncing.take() {
            let kept = rng.range(0, sync.records.len() as u64 + 1) as usize;
            loss.kept = kept;
            loss.lost += sync.records.len() - kept;
            let kept_records: Vec<Vec<u8>> = sync.records.into_iter().take(kept).collect();
            self.newly_durable.extend(kept_records.iter().cloned());
            self.durable.extend(kept_records);
        }
        self.buffered.clear();
        self.held.clear();
        self.sync_durable = self.sync_issued;
        self.records_since_snapshot = (self.durable.len() - self.covered) as u64;
        loss
    }

    /// The records made durable since the last call, in log order.
    pub fn take_newly_durable(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.newly_durable)
    }

    /// The disk is gone: no snapshot, no records, nothing pending.
    pub fn wipe(&mut self) {
        *self = Disk::default();
    }

    /// Records not yet durable (buffered or syncing).
    pub fn not_durable(&self) -> usize {
        self.buffered.len() + self.syncing.as_ref().map_or(0, |s| s.records.len())
    }
}
