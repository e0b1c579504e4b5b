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

use crate::kv::{Kv, KvV1, KvV1Out};
use crate::membership::Membership;
use crate::message::{self, ClientCommand, DecodeError, Value};
use crate::types::Outcome;

/// The format version of an encoded `AppState` (`AppState::encode`): still 1.
pub const APP_STATE_VERSION: u8 = 1;
/// The version of the trailer after an encoded `AppState` (`AppState::encode`).
pub const APP_STATE_TRAILER_VERSION: u8 = 1;

/// The state machine as a snapshot transfer carries it (encoded by `AppState::encode` only).
#[derive(Clone, Debug)]
pub struct AppState {
    /// Every slot below this is applied in `kv`.
    pub next_apply: u64,
    /// The state machine.
    pub kv: Kv,
    /// The membership as applied up to `next_apply`; none from a build before membership
    /// changes (whose membership is still the first start's).
    pub membership: Option<Membership>,
}

/// `AppState` in format 1's layout, as every build reads it (sessions without fingerprints).
#[derive(Deserialize)]
struct AppStateV1 {
    next_apply: u64,
    kv: KvV1,
}

/// `AppState` written in format 1's layout, borrowed.
#[derive(Serialize)]
struct AppStateV1Out<'a> {
    next_apply: u64,
    kv: KvV1Out<'a>,
}

impl AppState {
    /// Encodes for a snapshot transfer or an `Installed` record: format 1 (the bytes a build
    /// before session fingerprints writes for the same state, so that such a build, in a
    /// cluster in the middle of a rolling upgrade, can still install it), then a trailer that
    /// such builds ignore (postcard stops reading at the end of the value): its own version
    /// byte, then the sessions' fingerprints, then the membership (behind its own version
    /// byte; builds before membership changes stop reading before it). Unlike a snapshot, whose version went up to 2,
    /// a transfer must stay readable by a lagging replica of the older build, or it could
    /// never catch up until it is swapped too (the simulator found exactly that).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes =
            message::encode_as(APP_STATE_VERSION, &AppStateV1Out { next_apply: self.next_apply, kv: self.kv.as_v1() });
        bytes.extend(message::encode_as(APP_STATE_TRAILER_VERSION, &self.kv.fingerprints()));
        if let Some(membership) = &self.membership {
            bytes.extend(membership.encode());
        }
        bytes
    }

    /// Decodes what `encode` wrote, or what a build before fingerprints wrote (no trailer:
    /// its sessions' fingerprints are unknown, as are those of a newer trailer's).
    pub fn decode(bytes: &[u8]) -> Result<AppState, DecodeError> {
        let (old, trailer): (AppStateV1, &[u8]) = message::decode_with_rest(APP_STATE_VERSION, bytes)?;
        let mut kv = Kv::from(old.kv);
        let mut membership = None;
        if !trailer.is_empty() {
            match message::decode_with_rest::<Vec<(u64, u64)>>(APP_STATE_TRAILER_VERSION, trailer) {
                Ok((fingerprints, rest)) => {
                    kv.restore_fingerprints(&fingerprints);
                    if !rest.is_empty() {
                        let (decoded, _) = Membership::decode(rest).map_err(DecodeError::Malformed)?;
                        membership = Some(decoded);
                    }
                }
                Err(DecodeError::NewerVersion { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(AppState { next_apply: old.next_apply, kv, membership })
    }
}

/// Bytes a chosen value holds (keys, values, identities): what retaining it costs.
pub fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Noop => 8,
        Value::Batch(commands) => commands.iter().map(crate::proposer::command_bytes).sum(),
    }
}

/// Applies one slot's commands to the state machine (and membership changes to the membership).
fn apply_value(
    kv: &mut Kv,
    membership: &mut Membership,
    slot: u64,
    value: &Value,
    applied: &mut Vec<(ClientCommand, Outcome)>,
) {
    if let Value::Batch(commands) = value {
        for cmd in commands {
            let outcome = kv.apply_with(slot, cmd.client, cmd.seq, &cmd.command, Some(membership));
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
    /// Who votes on which slot (`membership`): replicated state, applied with the log.
    pub membership: Membership,
    /// Bytes of the applied values still kept (slots `log_start..next_apply`): the retained log
    /// is bounded by bytes as well as by slots, or large values would fill the guest's memory.
    pub applied_bytes: usize,
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
            apply_value(&mut self.kv, &mut self.membership, self.next_apply, value, &mut applied);
            self.applied_bytes += value_bytes(value);
            self.next_apply += 1;
        }
        if cfg!(feature = "bug-apply-out-of-order") {
            // Planted bug (simulator test builds only): apply whatever is chosen, gaps or not.
            while let Some((&slot, value)) = self.chosen.range(self.next_apply..).next() {
                apply_value(&mut self.kv, &mut self.membership, slot, value, &mut applied);
                self.next_apply = slot + 1;
            }
        }
        self.membership.forget_before(self.next_apply);
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
            let size = value_bytes(value);
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
            let kept = self.chosen.split_off(&slot);
            let dropped: usize = self.chosen.values().map(value_bytes).sum();
            self.applied_bytes = self.applied_bytes.saturating_sub(dropped);
            self.chosen = kept;
            self.log_start = slot;
        }
    }

    /// The first slot to keep so that at most `bytes_max` of applied values remain retained
    /// (`log_start` when they already fit).
    pub fn keep_from_for_bytes(&self, bytes_max: usize) -> u64 {
        let mut excess = self.applied_bytes.saturating_sub(bytes_max);
        if excess == 0 {
            return self.log_start;
        }
        for (&slot, value) in self.chosen.range(self.log_start..self.next_apply) {
            if excess == 0 {
                return slot;
            }
            excess = excess.saturating_sub(value_bytes(value));
        }
        self.next_apply
    }

    /// Recomputes `applied_bytes` (after the log was restored from a snapshot).
    pub fn recount_applied_bytes(&mut self) {
        self.applied_bytes = self.chosen.range(self.log_start..self.next_apply).map(|(_, v)| value_bytes(v)).sum();
    }

    /// The state machine for a snapshot transfer.
    pub fn app_state(&self) -> AppState {
        AppState { next_apply: self.next_apply, kv: self.kv.clone(), membership: Some(self.membership.clone()) }
    }

    /// Installs a transferred state machine if it is ahead of ours. Returns whether it was.
    pub fn install(&mut self, state: AppState) -> bool {
        if state.next_apply <= self.next_apply {
            return false;
        }
        self.kv = state.kv;
        self.kv.rebuild_index();
        if let Some(mut membership) = state.membership {
            membership.forget_before(state.next_apply);
            self.membership.replace_with(membership);
        }
        self.next_apply = state.next_apply;
        self.chosen = self.chosen.split_off(&state.next_apply);
        self.log_start = state.next_apply;
        self.applied_bytes = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Command;

    fn put(slot: u64, bytes: usize) -> Value {
        let command = Command::Put(format!("k{slot}"), vec![0; bytes]);
        Value::Batch(vec![ClientCommand { origin: 1, request_id: slot, client: 1, seq: slot + 1, command }])
    }

    /// The retained applied log is accounted in bytes, so large values can be trimmed by size.
    #[test]
    fn applied_bytes_follow_apply_trim_and_install() {
        let mut learner = Learner::default();
        for slot in 0..70 {
            assert!(learner.learn(slot, put(slot, 1 << 20)));
        }
        learner.apply_ready();
        let size = |from: u64| (from..70).map(|slot| value_bytes(&put(slot, 1 << 20))).sum::<usize>();
        assert_eq!(learner.applied_bytes, size(0));
        let keep_from = learner.keep_from_for_bytes(48 << 20);
        assert!(size(keep_from) <= 48 << 20 && size(keep_from - 1) > 48 << 20, "keeps the newest within the bound");
        learner.forget_below(keep_from);
        assert_eq!(learner.applied_bytes, size(keep_from));
        let recounted = {
            let mut copy = learner.clone();
            copy.recount_applied_bytes();
            copy.applied_bytes
        };
        assert_eq!(recounted, learner.applied_bytes);
        assert!(learner.install(AppState { next_apply: 100, kv: Kv::default(), membership: None }));
        assert_eq!(learner.applied_bytes, 0);
    }
}
