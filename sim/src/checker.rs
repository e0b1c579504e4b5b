//! Linearizability of key-value histories (Wing & Gong's search with Lowe's memoization, as in
//! Porcupine), decomposed per key: a KV history is linearizable iff each key's sub-history is.
//!
//! An operation that never returned (the client gave up) may have taken effect at any point
//! after its call, or never: it can be linearized anywhere after its call, or left out.

use std::collections::{BTreeMap, HashSet};

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Store a value.
    Put(Vec<u8>),
    /// Read.
    Get,
    /// Remove.
    Delete,
}

/// What it got back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A put applied.
    Done,
    /// A get's answer.
    Value(Option<Vec<u8>>),
    /// A delete's answer: whether the key existed.
    Removed(bool),
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Which client.
    pub client: u32,
    /// The key.
    pub key: String,
    /// The operation.
    pub op: Op,
    /// When it was invoked.
    pub call: u64,
    /// When it returned and with what; `None` if it never did (outcome unknown).
    pub ret: Option<(u64, Ret)>,
}

/// Checks a whole history; the error names the first key whose history is not linearizable.
pub fn check(history: &[Entry]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in history {
        by_key.entry(&e.key).or_default().push(e);
    }
    for (key, ops) in by_key {
        if !check_key(&ops) {
            let mut lines = vec![format!("key {key:?} is not linearizable:")];
            for e in &ops {
                lines.push(format!(
                    "  client {} {:?} [{}, {}] -> {:?}",
                    e.client,
                    e.op,
                    e.call,
                    e.ret.as_ref().map_or("?".into(), |r| r.0.to_string()),
                    e.ret.as_ref().map(|r| &r.1)
                ));
            }
            return Err(lines.join("\n"));
        }
    }
    Ok(())
}

fn apply(state: &Option<Vec<u8>>, op: &Op, ret: Option<&Ret>) -> Option<Option<Vec<u8>>> {
    match op {
        Op::Put(v) => match ret {
            None | Some(Ret::Done) => Some(Some(v.clone())),
            _ => None,
        },
        Op::Get => match ret {
            None => Some(state.clone()),
            Some(Ret::Value(v)) if v == state => Some(state.clone()),
            _ => None,
        },
        Op::Delete => match ret {
            None => Some(None),
            Some(Ret::Removed(existed)) if *existed == state.is_some() => Some(None),
            _ => None,
        },
    }
}

/// One key's history (at most 128 operations).
fn check_key(ops: &[&Entry]) -> bool {
    assert!(ops.len() <= 128, "per-key histories above 128 operations are not supported");
    let n = ops.len();
    let done_mask: u128 = ops.iter().enumerate().filter(|(_, e)| e.ret.is_some()).fold(0, |m, (i, _)| m | (1 << i));
    let mut failed: HashSet<(u128, Option<Vec<u8>>)> = HashSet::new();
    fn search(
        ops: &[&Entry],
        n: usize,
        done_mask: u128,
        linearized: u128,
        state: Option<Vec<u8>>,
        failed: &mut HashSet<(u128, Option<Vec<u8>>)>,
    ) -> bool {
        if linearized & done_mask == done_mask {
            return true;
        }
        if failed.contains(&(linearized, state.clone())) {
            return false;
        }
        // An operation can go next only if it was called before every pending completed
        // operation returned.
        let horizon = (0..n)
            .filter(|&i| linearized & (1 << i) == 0)
            .filter_map(|i| ops[i].ret.as_ref().map(|r| r.0))
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            if linearized & (1 << i) != 0 || ops[i].call > horizon {
                continue;
            }
            if let Some(next) = apply(&state, &ops[i].op, ops[i].ret.as_ref().map(|r| &r.1)) {
                if search(ops, n, done_mask, linearized | (1 << i), next, failed) {
                    return true;
                }
            }
        }
        failed.insert((linearized, state));
        false
    }
    search(ops, n, done_mask, 0, None, &mut failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(client: u32, op: Op, call: u64, ret: Option<(u64, Ret)>) -> Entry {
        Entry { client, key: "k".into(), op, call, ret }
    }
    fn put(v: &str) -> Op {
        Op::Put(v.as_bytes().to_vec())
    }
    fn val(v: Option<&str>) -> Ret {
        Ret::Value(v.map(|s| s.as_bytes().to_vec()))
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            e(1, put("a"), 0, Some((1, Ret::Done))),
            e(1, Op::Get, 2, Some((3, val(Some("a"))))),
            e(1, Op::Delete, 4, Some((5, Ret::Removed(true)))),
            e(1, Op::Get, 6, Some((7, val(None)))),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn concurrent_writes_may_be_ordered_either_way() {
        let h = vec![
            e(1, put("a"), 0, Some((10, Ret::Done))),
            e(2, put("b"), 1, Some((9, Ret::Done))),
            e(3, Op::Get, 11, Some((12, val(Some("a"))))),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn stale_read_is_caught() {
        let h = vec![
            e(1, put("a"), 0, Some((1, Ret::Done))),
            e(1, put("b"), 2, Some((3, Ret::Done))),
            e(2, Op::Get, 4, Some((5, val(Some("a"))))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn read_of_a_value_never_written_is_caught() {
        let h = vec![e(1, put("a"), 0, Some((1, Ret::Done))), e(2, Op::Get, 2, Some((3, val(Some("zzz")))))];
        assert!(check(&h).is_err());
    }

    #[test]
    fn double_delete_success_is_caught() {
        let h = vec![
            e(1, put("a"), 0, Some((1, Ret::Done))),
            e(1, Op::Delete, 2, Some((3, Ret::Removed(true)))),
            e(2, Op::Delete, 4, Some((5, Ret::Removed(true)))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_unknown_outcome_may_or_may_not_have_happened() {
        let took_effect = vec![e(1, put("a"), 0, None), e(2, Op::Get, 5, Some((6, val(Some("a")))))];
        assert!(check(&took_effect).is_ok());
        let did_not = vec![e(1, put("a"), 0, None), e(2, Op::Get, 5, Some((6, val(None))))];
        assert!(check(&did_not).is_ok());
        // But it cannot take effect before it was invoked.
        let too_early = vec![e(2, Op::Get, 0, Some((1, val(Some("a"))))), e(1, put("a"), 5, None)];
        assert!(check(&too_early).is_err());
    }
}
