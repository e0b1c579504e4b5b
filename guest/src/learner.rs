//! The learner role: the log of chosen values, applied strictly in slot order.
//!
//! Reference: "Paxos Made Simple" §2.3 and §3. A slot's value is learned once a majority of
//! acceptors accepted it under one ballot (the leader counts, then tells every learner). Learned
//! slots may arrive out of order; they are applied to the state machine only when every slot
//! before them has been applied, so all replicas apply the same sequence.

use std::collections::BTreeMap;

use crate::kv::Kv;
use crate::message::{ClientCommand, Value};
use crate::types::Outcome;

/// A learner and the state machine it feeds.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    /// Chosen values by slot (the applied prefix is kept to serve catch-up).
    pub chosen: BTreeMap<u64, Value>,
    /// The next slot to apply: every slot below it is chosen and applied.
    pub next_apply: u64,
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
            if let Value::Batch(commands) = value {
                for cmd in commands {
                    let outcome = self
                        .kv
                        .apply(self.next_apply, cmd.client, cmd.seq, &cmd.command);
                    applied.push((cmd.clone(), outcome));
                }
            }
            self.next_apply += 1;
        }
        applied
    }

    /// Whether `slot` is known chosen.
    pub fn is_chosen(&self, slot: u64) -> bool {
        slot < self.next_apply || self.chosen.contains_key(&slot)
    }

    /// The highest slot known chosen, if any.
    pub fn highest_chosen(&self) -> Option<u64> {
        self.chosen.last_key_value().map(|(s, _)| *s)
    }

    /// Chosen values from `from_slot` on, at most `max` of them (for catch-up).
    pub fn chosen_from(&self, from_slot: u64, max: usize) -> Vec<(u64, Value)> {
        self.chosen
            .range(from_slot..self.next_apply)
            .take(max)
            .map(|(s, v)| (*s, v.clone()))
            .collect()
    }
}
