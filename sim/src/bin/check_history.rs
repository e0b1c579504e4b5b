//! `waxos-check-history FILE`: checks a key-value history recorded against real hosts (`just
//! test-net`) for linearizability with the simulator's checker (`waxos_sim::checker`).
//!
//! FILE holds one JSON object per line, Jepsen's shape: every operation is an `invoke` event
//! followed, for the same `process`, by its completion — `ok`, `fail` (it certainly did not take
//! effect) or `info` (unknown: a timeout, a connection lost mid-call). Times are integers from one
//! clock (nanoseconds of the test driver's monotonic clock).
//!
//! ```json
//! {"process": 3, "type": "invoke", "f": "put", "key": "k7", "value": "3-12", "time": 1000}
//! {"process": 3, "type": "ok", "f": "put", "key": "k7", "value": "3-12", "time": 2000}
//! {"process": 4, "type": "ok", "f": "get", "key": "k7", "value": null, "time": 2500}
//! {"process": 5, "type": "ok", "f": "delete", "key": "k7", "existed": true, "time": 2600}
//! ```
//!
//! A `fail`ed operation is left out; an `info` one (or one never completed) may have taken
//! effect at any point after its invocation, or never. Prints the counts; exits 0 when the
//! history is linearizable, 1 when it is not (naming the first key that is not), 2 on a malformed
//! file.

use std::collections::HashMap;
use std::process::ExitCode;

use serde_json::Value;
use waxos_sim::checker::{check, Entry, Op, Ret};

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: waxos-check-history FILE  (JSON lines: invoke/ok/fail/info events)");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("check-history: cannot read {}: {e}", path.to_string_lossy());
            return ExitCode::from(2);
        }
    };
    match parse(&text) {
        Err(e) => {
            eprintln!("check-history: {e}");
            ExitCode::from(2)
        }
        Ok((history, counts)) => {
            println!(
                "history: {} operations ({} ok, {} failed, {} indeterminate) on {} keys",
                counts.ok + counts.fail + counts.info,
                counts.ok,
                counts.fail,
                counts.info,
                counts.keys
            );
            match check(&history) {
                Ok(()) => {
                    println!("linearizable");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("NOT linearizable: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    ok: usize,
    fail: usize,
    info: usize,
    keys: usize,
}

/// Most operations one key's history may hold (the checker's limit).
const MAX_OPS_PER_KEY: usize = 128;

fn parse(text: &str) -> Result<(Vec<Entry>, Counts), String> {
    let mut history: Vec<Entry> = Vec::new();
    // process -> index in `history` of its operation in flight
    let mut open: HashMap<u64, usize> = HashMap::new();
    let mut failed: Vec<usize> = Vec::new();
    let mut counts = Counts::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: String| format!("line {}: {e}", n + 1);
        let event: Value = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let field = |name: &str| event.get(name).ok_or_else(|| at(format!("no {name:?}")));
        let process = field("process")?.as_u64().ok_or_else(|| at("process is not an integer".into()))?;
        let kind = field("type")?.as_str().ok_or_else(|| at("type is not a string".into()))?;
        let f = field("f")?.as_str().ok_or_else(|| at("f is not a string".into()))?;
        let key = field("key")?.as_str().ok_or_else(|| at("key is not a string".into()))?;
        let time = field("time")?.as_u64().ok_or_else(|| at("time is not an integer".into()))?;
        let value = || -> Result<Option<Vec<u8>>, String> {
            match event.get("value") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_bytes().to_vec())),
                Some(_) => Err(at("value is not a string or null".into())),
            }
        };
        match kind {
            "invoke" => {
                let op = match f {
                    "put" => Op::Put(value()?.ok_or_else(|| at("a put needs a value".into()))?),
                    "get" => Op::Get,
                    "delete" => Op::Delete,
                    other => return Err(at(format!("unknown f {other:?}"))),
                };
                if open.contains_key(&process) {
                    return Err(at(format!("process {process} invokes while an operation of it is open")));
                }
                open.insert(process, history.len());
                history.push(Entry { client: process as u32, key: key.to_string(), op, call: time, ret: None });
            }
            "ok" | "fail" | "info" => {
                let i = open.remove(&process).ok_or_else(|| at(format!("process {process} completes nothing")))?;
                if history[i].key != key {
                    return Err(at(format!("process {process} completes another key than it invoked")));
                }
                match kind {
                    "ok" => {
                        counts.ok += 1;
                        let ret = match &history[i].op {
                            Op::Put(_) => Ret::Done,
                            Op::Get => Ret::Value(value()?),
                            Op::Delete => Ret::Removed(
                                field("existed")?.as_bool().ok_or_else(|| at("existed is not a boolean".into()))?,
                            ),
                        };
                        history[i].ret = Some((time, ret));
                    }
                    "fail" => {
                        counts.fail += 1;
                        failed.push(i);
                    }
                    _ => counts.info += 1,
                }
            }
            other => return Err(at(format!("unknown type {other:?}"))),
        }
    }
    // Never completed: as indeterminate as an `info`.
    counts.info += open.len();
    failed.sort_unstable();
    for i in failed.into_iter().rev() {
        history.remove(i);
    }
    {
        let mut per_key: HashMap<&str, usize> = HashMap::new();
        for e in &history {
            *per_key.entry(&e.key).or_default() += 1;
        }
        if let Some((key, n)) = per_key.iter().find(|(_, n)| **n > MAX_OPS_PER_KEY) {
            return Err(format!("key {key:?} has {n} operations; the checker takes at most {MAX_OPS_PER_KEY} per key"));
        }
        counts.keys = per_key.len();
    }
    Ok((history, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(process: u64, kind: &str, f: &str, value: Option<&str>, time: u64) -> String {
        let value = value.map_or("null".to_string(), |v| format!("{v:?}"));
        format!(
            r#"{{"process": {process}, "type": "{kind}", "f": "{f}", "key": "k", "value": {value}, "time": {time}}}"#
        )
    }

    #[test]
    fn fail_is_dropped_info_stays_open() {
        let text = [
            line(1, "invoke", "put", Some("a"), 1),
            line(1, "fail", "put", None, 2),
            line(2, "invoke", "put", Some("b"), 3),
            line(2, "info", "put", None, 4),
            line(3, "invoke", "get", None, 5),
            line(3, "ok", "get", Some("b"), 6),
        ]
        .join("\n");
        let (history, counts) = parse(&text).unwrap();
        assert_eq!((counts.ok, counts.fail, counts.info, counts.keys), (1, 1, 1, 1));
        assert_eq!(history.len(), 2);
        assert!(history[0].ret.is_none());
        assert!(check(&history).is_ok());
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let text = [
            line(1, "invoke", "put", Some("a"), 1),
            line(1, "ok", "put", None, 2),
            line(2, "invoke", "get", None, 3),
            line(2, "ok", "get", None, 4),
        ]
        .join("\n");
        let (history, _) = parse(&text).unwrap();
        assert!(check(&history).is_err());
    }

    #[test]
    fn malformed_histories_are_refused() {
        assert!(parse(&line(1, "ok", "get", None, 1)).is_err());
        assert!(parse(&[line(1, "invoke", "get", None, 1), line(1, "invoke", "get", None, 2)].join("\n")).is_err());
        assert!(parse(r#"{"process": 1}"#).is_err());
    }
}
