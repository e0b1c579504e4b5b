//! The learner role: the log of chosen values, applied strictly in slot order.
//!
//! Reference: "Paxos Made Simple" §2.3 and §3. A slot's value is learned once a majority of
//! acceptors accepted it under one ballot (the leader counts, then tells every learner). Learned
//! slots may arrive out of order; they are applied to the state machine only when every slot
//! before them has been applied, so all replicas apply the same sequence. The applied prefix is
//! kept for a while (to serve peers catching up) and then dropped; a peer behind that point
//! gets the whole state machine instead (`AppState`, sent in chunks).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kv::Kv;
use crate::message::{ClientCommand, Value};
use crate::types::Outcome;

/// The state machine as a snapshot transfer carries it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppState {
    /// Every slot below this is applied in `kv`.
    pub next_apply: u64,
    /// The state machine.
    pub kv: Kv,
}

/// Applies one slot's commands to the state machine.
fn apply_value(kv: &mut Kv, slot: u64, value: &Value, applied: &mut Vec<(ClientCommand, Outcome)>) {
    if let Value::Batch(commands) = value {
        for cmd in commands {
            let outcome = kv.apply(slot, cmd.client, cmd.seq, &cmd.command);
            applied.push((cmd.clone(), outcome));
        }
    }
}

/// A learner and the state machine it feeds.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    /// Chosen values by slot, from `log_start` on (the applied prefix is kept to serve catch-up).
    pub chosen: BTreeMap<u64, Value>,
    /// The next slot to apply: every slot below it is chosen and applied.
    pub next_apply: u64,
    /// Chosen values below this slot were dropped.
    pub log_start: u64,
    /// The state machine.
    pub kv: Kv,
}

impl Learner {
    /// Records that `value` was chosen at `slot`. Returns false when it was already known.
    pub fn learn(&mut self, slot: u64, value: Value) -> bool {
        if slot < self.next_apply || self.chosen.contains_key(&slot) {
            return false;
        }
        self.chosen.insert(slot, value);
        true
    }

    /// Applies every chosen slot that is next in order; returns each command applied with its
    /// outcome, in order.
    pub fn apply_ready(&mut self) -> Vec<(ClientCommand, Outcome)> {
        let mut applied = Vec::new();
        while let Some(value) = self.chosen.get(&self.next_apply) {
            apply_value(&mut self.kv, self.next_apply, value, &mut applied);
            self.next_apply += 1;
        }
        if cfg!(feature = "bug-apply-out-of-order") {
            // Planted bug (simulator test builds only): apply whatever is chosen, gaps or not.
            while let Some((&slot, value)) = self.chosen.range(self.next_apply..).next() {
                apply_value(&mut self.kv, slot, value, &mut applied);
                self.next_apply = slot + 1;
            }
        }
        applied
    }

    /// Whether `slot` is known chosen.
    pub fn is_chosen(&self, slot: u64) -> bool {
        slot < self.next_apply || self.chosen.contains_key(&slot)
    }

    /// The highest slot known chosen, if any.
    pub fn highest_chosen(&self) -> Option<u64> {
        self.chosen.last_key_value().map(|(s, _)| *s).or(self.next_apply.checked_sub(1))
    }

    /// Chosen values from `from_slot` on, at most `max` of them (for catch-up); `None` when
    /// `from_slot` was already dropped (the peer needs a snapshot).
    pub fn chosen_from(&self, from_slot: u64, max_slots: usize, max_bytes: usize) -> Option<Vec<(u64, Value)>> {
        if from_slot < self.log_start {
            return None;
        }
        let mut bytes = 0;
        let mut entries = Vec::new();
        // A peer may be ahead of this learner (e.g. after a crash lost lazily kept records).
        if from_slot >= self.next_apply {
            return Some(entries);
        }
        for (slot, value) in self.chosen.range(from_slot..self.next_apply).take(max_slots) {
            let size = match value {
                Value::Noop => 8,
                Value::Batch(commands) => commands.iter().map(crate::proposer::command_bytes).sum(),
            };
            if !entries.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            entries.push((*slot, value.clone()));
        }
        Some(entries)
    }

    /// Drops applied values below `slot`.
    pub fn forget_below(&mut self, slot: u64) {
        let slot = slot.min(self.next_apply);
        if slot > self.log_start {
            self.chosen = self.chosen.split_off(&slot);
            self.log_start = slot;
        }
    }

    /// The state machine for a snapshot transfer.
    pub fn app_state(&self) -> AppState {
        AppState { next_apply: self.next_apply, kv: self.kv.clone() }
    }

    /// Installs a transferred state machine if it is ahead of ours. Returns whether it was.
    pub fn install(&mut self, state: AppState) -> bool {
        if state.next_apply <= self.next_apply {
            return false;
        }
        self.kv = state.kv;
        self.kv.rebuild_index();
        self.next_apply = state.next_apply;
        self.chosen = self.chosen.split_off(&state.next_apply);
        self.log_start = state.next_apply;
        true
    }
}
