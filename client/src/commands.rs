//! What each command does, prints and exits with. Results go to stdout, logs to stderr.

use std::time::Instant;

use crate::session::{Op, Reply, RequestError, Session};
use crate::{Args, Cmd};

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: any failure (timeout, unreachable, no quorum, invalid input).
pub const EXIT_FAILURE: i32 = 1;
/// Exit status: the key was not found (get, delete).
pub const EXIT_NOT_FOUND: i32 = 2;

/// Runs the command of `args` and returns the exit status.
pub async fn run(args: Args) -> i32 {
    let dialer = match crate::security::dialer(&args.tls) {
        Ok(dialer) => dialer,
        Err(e) => {
            eprintln!("waxos: {e}");
            return EXIT_FAILURE;
        }
    };
    let mut session = Session::new(&args.host, args.port, args.timeout_ms, dialer);
    session.stale_reads = args.stale;
    match args.command.clone() {
        Some(Cmd::Put { key, value }) => single(&mut session, Op::Put(key, value.into_bytes())).await,
        Some(Cmd::Get { key }) => single(&mut session, Op::Get(key)).await,
        Some(Cmd::Delete { key }) => single(&mut session, Op::Delete(key)).await,
        Some(Cmd::Demo) => demo(&mut session).await,
        Some(Cmd::Status) => status(&mut session, args.json).await,
        Some(Cmd::Bench(bench)) => {
            let timeout = std::time::Duration::from_millis(args.timeout_ms);
            crate::bench::run(&mut session, &bench, args.json, timeout, args.stale).await
        }
        Some(Cmd::Swap { path }) => swap(&session, &path, args.json).await,
        Some(Cmd::Member { action }) => crate::members::run(&mut session, action).await,
        Some(Cmd::Snapshot { action }) => crate::backup::run(&session, action, args.json).await,
        None => crate::shell::run(&mut session, args.json).await,
    }
}

/// Runs one operation and maps its result to output and an exit status.
pub async fn single(session: &mut Session, op: Op) -> i32 {
    match session.request(&op).await {
        Ok(Reply::Stored) => EXIT_OK,
        Ok(Reply::Value(Some(value))) => {
            outln!("{}", String::from_utf8_lossy(&value));
            EXIT_OK
        }
        Ok(Reply::Value(None)) => {
            eprintln!("waxos: key {:?} not found", op.key());
            EXIT_NOT_FOUND
        }
        Ok(Reply::Deleted(true)) => EXIT_OK,
        Ok(Reply::Deleted(false)) => {
            eprintln!("waxos: key {:?} not found", op.key());
            EXIT_NOT_FOUND
        }
        Err(e) => fail(&op, &e),
    }
}

fn fail(op: &Op, e: &RequestError) -> i32 {
    eprintln!("waxos: {} {:?} failed: {e}", op.name(), op.key());
    EXIT_FAILURE
}

/// Pre-populates five keys, then runs five or more of each of PUT, GET and DELETE (a GET and a
/// DELETE of a missing key among them), logging each one.
async fn demo(session: &mut Session) -> i32 {
    let mut ops = Vec::new();
    for i in 1..=5 {
        ops.push(("prepopulate", Op::Put(format!("demo:key{i}"), format!("value-{i}").into_bytes())));
    }
    for i in 1..=5 {
        ops.push(("run", Op::Put(format!("demo:key{i}"), format!("updated-{i}").into_bytes())));
    }
    for i in 1..=5 {
        ops.push(("run", Op::Get(format!("demo:key{i}"))));
    }
    ops.push(("run", Op::Get("demo:missing".into())));
    for i in 1..=5 {
        ops.push(("run", Op::Delete(format!("demo:key{i}"))));
    }
    ops.push(("run", Op::Delete("demo:missing".into())));
    let (mut ok, mut failed) = (0, 0);
    let started = Instant::now();
    for (phase, op) in &ops {
        let t = Instant::now();
        let result = session.request(op).await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(reply) => {
                ok += 1;
                let outcome = match reply {
                    Reply::Stored => "stored".to_string(),
                    Reply::Value(Some(v)) => format!("value {:?}", String::from_utf8_lossy(&v)),
                    Reply::Value(None) => "not found".to_string(),
                    Reply::Deleted(true) => "deleted".to_string(),
                    Reply::Deleted(false) => "not found".to_string(),
                };
                tracing::info!(
                    "{phase} {} {} -> {outcome} ({ms:.2} ms, via {})",
                    op.name(),
                    op.key(),
                    session.server()
                );
            }
            Err(e) => {
                failed += 1;
                tracing::error!("{phase} {} {} -> FAILED: {e} ({ms:.2} ms)", op.name(), op.key());
            }
        }
    }
    let summary = format!(
        "demo: {} requests, {ok} ok, {failed} failed, {:.1} ms",
        ops.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    outln!("{summary}");
    if failed == 0 {
        EXIT_OK
    } else {
        EXIT_FAILURE
    }
}

/// Uploads a build to the host and swaps it in; prints the versions and the pause.
async fn swap(session: &Session, path: &std::path::Path, json: bool) -> i32 {
    let server = session.server().to_string();
    let wasm = match std::fs::read(path) {
        Ok(wasm) => wasm,
        Err(e) => {
            eprintln!("waxos: cannot read {}: {e}", path.display());
            return EXIT_FAILURE;
        }
    };
    let signature_path = waxos_proto::signature::signature_path(path);
    let signature = match std::fs::read(&signature_path) {
        Ok(signature) => signature,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "no {}: sending the build unsigned (sign it with `waxos sign --key KEY {}`)",
                signature_path.display(),
                path.display()
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("waxos: cannot read {}: {e}", signature_path.display());
            return EXIT_FAILURE;
        }
    };
    match session.swap(wasm, signature).await {
        Ok(r) => {
            let pause_ms = r.pause_us as f64 / 1e3;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"server": server, "old_version": r.old_version, "new_version": r.new_version,
                        "build": r.build_hash, "pause_ms": pause_ms})
                );
            } else {
                outln!(
                    "{server}: swapped {} -> {} (build {}), pause {pause_ms:.2} ms",
                    r.old_version,
                    r.new_version,
                    r.build_hash
                );
            }
            EXIT_OK
        }
        Err(status) => {
            let code = if status.code() == tonic::Code::PermissionDenied { " (permission denied)" } else { "" };
            eprintln!("waxos: swap on {server} failed{code}: {}", status.message());
            EXIT_FAILURE
        }
    }
}

/// A table (or JSON) of every member's state.
pub async fn status(session: &mut Session, json: bool) -> i32 {
    let first = session.server().to_string();
    let members = match session.status_of(&first).await {
        Ok(status) => status.members,
        Err(e) => {
            tracing::warn!("server {first} unresponsive: {}", e.message());
            eprintln!("waxos: cannot get status from {first}: {}", e.message());
            return EXIT_FAILURE;
        }
    };
    let mut rows = Vec::new();
    for m in &members {
        let row = match session.status_of(&m.address).await {
            Ok(s) => {
                let guest: serde_json::Value =
                    serde_json::from_str(&s.guest_status_json).unwrap_or(serde_json::Value::Null);
                serde_json::json!({"id": m.id, "address": m.address, "voter": m.voter, "up": !s.guest_down, "guest": guest, "build": s.guest_build})
            }
            Err(e) => {
                serde_json::json!({"id": m.id, "address": m.address, "voter": m.voter, "up": false, "error": e.message()})
            }
        };
        rows.push(row);
    }
    if json {
        outln!("{}", serde_json::json!({ "members": rows }));
        return EXIT_OK;
    }
    outln!(
        "{:<4} {:<22} {:<5} {:<10} {:<8} {:>10} {:>10} {:>8} {:<16} {:<16}",
        "ID",
        "ADDRESS",
        "UP",
        "ROLE",
        "BALLOT",
        "CHOSEN",
        "APPLIED",
        "KEYS",
        "VERSION",
        "BUILD"
    );
    for r in &rows {
        let g = &r["guest"];
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        outln!(
            "{:<4} {:<22} {:<5} {:<10} {:<8} {:>10} {:>10} {:>8} {:<16} {:<16}",
            text(&r["id"]),
            text(&r["address"]),
            if r["up"].as_bool() == Some(true) { "up" } else { "down" },
            if r["voter"].as_bool() == Some(false) { "learner".to_string() } else { text(&g["role"]) },
            text(&g["ballot"]),
            text(&g["highest_chosen"]),
            text(&g["applied"]),
            text(&g["keys"]),
            text(&g["version"]),
            text(&r["build"]),
        );
    }
    EXIT_OK
}
