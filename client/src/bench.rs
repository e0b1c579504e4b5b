//! `waxos bench`: a bounded closed-loop load generator.
//!
//! N clients, each with its own connection, identity and sequence numbers, run requests back
//! to back for a fixed duration, with an operation mix over a fixed key space. Load is spread
//! over every member (learned from `Admin.Status`) or aimed at one (`--target`). It prints
//! ops/s, latency percentiles and errors, or one line of JSON. Every request has a deadline, so
//! the run always ends. A client whose member does not answer (down, no leader, too slow)
//! retries the request at the next member with the same client id and seq, as the `waxos`
//! client does; it counts as an error only once every member was tried twice, and its latency
//! runs from the first attempt.

use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use waxos_proto::key_value_client::KeyValueClient;
use waxos_proto::tls::Dialer;
use waxos_proto::{DeleteRequest, GetRequest, PutRequest};

use crate::session::Session;

/// What `bench` was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Concurrent clients (one connection each).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Size of the key space.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Operation mix in percent, e.g. put=50,get=50 or put=40,get=40,delete=20.
    #[arg(long, default_value = "put=50,get=50")]
    pub mix: String,
    /// Send everything to one member — a node id, or `leader` — instead of spreading the
    /// clients over all members.
    #[arg(long)]
    pub target: Option<String>,
    /// Seconds of load before the measured window starts (not counted).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Write every key once (untimed, by the same clients) before the run, so GETs find values.
    #[arg(long)]
    pub prefill: bool,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Put,
    Get,
    Delete,
}

fn parse_mix(mix: &str) -> Result<Vec<(Kind, u32)>, String> {
    let mut out = Vec::new();
    for part in mix.split(',').filter(|p| !p.is_empty()) {
        let (name, pct) = part.split_once('=').ok_or_else(|| format!("bad --mix part {part:?}: use op=percent"))?;
        let pct: u32 = pct.trim().parse().map_err(|_| format!("bad percentage in {part:?}"))?;
        let kind = match name.trim() {
            "put" => Kind::Put,
            "get" => Kind::Get,
            "delete" => Kind::Delete,
            other => return Err(format!("unknown operation {other:?} in --mix (put, get, delete)")),
        };
        out.push((kind, pct));
    }
    let total: u32 = out.iter().map(|(_, p)| p).sum();
    if total != 100 {
        return Err(format!("--mix percentages add up to {total}, not 100"));
    }
    Ok(out)
}

/// Results of one run.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the benchmark; returns the exit status.
pub async fn run(session: &mut Session, args: &BenchArgs, json: bool, timeout: Duration, stale: bool) -> i32 {
    let mix = match parse_mix(&args.mix) {
        Ok(mix) => mix,
        Err(e) => {
            eprintln!("waxos: {e}");
            return 1;
        }
    };
    if args.clients == 0 || args.duration <= 0.0 || args.keys == 0 || !(0.0..=3600.0).contains(&args.warmup) {
        eprintln!("waxos: --clients, --duration and --keys must be positive, --warmup 0..3600 s");
        return 1;
    }
    let first = session.server().to_string();
    let status = match session.status_of(&first).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("waxos: cannot get the members from {first}: {}", e.message());
            return 1;
        }
    };
    let target = match args.target.as_deref() {
        None => None,
        Some("leader") => {
            let guest: serde_json::Value = serde_json::from_str(&status.guest_status_json).unwrap_or_default();
            match guest.get("leader").and_then(serde_json::Value::as_u64) {
                Some(id) => Some(id as u32),
                None => {
                    eprintln!("waxos: {first} knows no leader yet; try again, or give a node id");
                    return 1;
                }
            }
        }
        Some(id) => match id.parse::<u32>() {
            Ok(id) => Some(id),
            Err(_) => {
                eprintln!("waxos: --target takes a node id or `leader`, not {id:?}");
                return 1;
            }
        },
    };
    let mut targets: Vec<String> = match target {
        Some(id) => status.members.iter().filter(|m| m.id == id).map(|m| m.address.clone()).collect(),
        None => status.members.iter().map(|m| m.address.clone()).collect(),
    };
    if targets.is_empty() {
        if let Some(id) = target {
            eprintln!("waxos: no member with id {id}");
            return 1;
        }
        targets.push(first);
    }
    let value = vec![b'x'; args.value_size];
    if args.prefill {
        if let Err(e) = prefill(session.dialer(), &targets, args.clients, args.keys, &value, timeout).await {
            eprintln!("waxos: prefill failed: {e}");
            return 1;
        }
    }
    let measured_from = Instant::now() + Duration::from_secs_f64(args.warmup);
    let deadline = measured_from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        // Each client starts at its own member and fails over to the others, in order.
        let (targets, first) = (targets.clone(), c % targets.len().max(1));
        let mix = mix.clone();
        let value = value.clone();
        let keys = args.keys;
        let window = (measured_from, deadline);
        let dialer = session.dialer().clone();
        tasks.push(tokio::spawn(async move {
            client_loop(&dialer, targets, first, mix, value, keys, window, timeout, stale).await
        }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            tally.latencies_us.extend(t.latencies_us);
            tally.errors += t.errors;
            if tally.first_error.is_none() {
                tally.first_error = t.first_error;
            }
        }
    }
    let elapsed = measured_from.elapsed().as_secs_f64();
    report(args, &targets, tally, elapsed, json, stale);
    0
}

/// Attempts of one request before it counts as an error: each member twice, the way the
/// `waxos` client fails over (same client id and seq, so a write applies once).
fn attempts_for(targets: usize) -> usize {
    2 * targets.max(1)
}

/// Whether a refusal is one another member (or a moment later) may not give: the host is
/// down or unreachable, has no leader yet, or ran out of time.
fn worth_retrying(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown)
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    dialer: &Dialer,
    targets: Vec<String>,
    first: usize,
    mix: Vec<(Kind, u32)>,
    value: Vec<u8>,
    keys: u64,
    (measured_from, deadline): (Instant, Instant),
    timeout: Duration,
    stale: bool,
) -> Tally {
    let mut tally = Tally::default();
    let mut clients = Vec::with_capacity(targets.len());
    for address in &targets {
        match dialer.endpoint(address) {
            Ok(e) => clients.push(KeyValueClient::new(e.connect_timeout(timeout).tcp_nodelay(true).connect_lazy())),
            Err(e) => {
                tally.errors += 1;
                tally.first_error = Some(e.to_string());
                return tally;
            }
        }
    }
    let mut at = first % clients.len().max(1);
    let client_id: u64 = rand::rng().random::<u64>() | 1;
    let mut seq = 0u64;
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    while Instant::now() < deadline {
        seq += 1;
        let key = format!("bench:{}", rng.random_range(0..keys));
        let roll = rng.random_range(0..100u32);
        let mut acc = 0;
        let kind = mix.iter().find(|(_, p)| {
            acc += p;
            roll < acc
        });
        let kind = kind.map_or(Kind::Get, |(k, _)| *k);
        let t = Instant::now();
        let mut result = Ok(());
        for attempt in 0..attempts_for(clients.len()) {
            if attempt > 0 {
                // The member did not answer: the next one, after a breath (a dead host refuses
                // at once; without the pause a client would spin on it).
                at = (at + 1) % clients.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let client = &mut clients[at];
            result = match kind {
                Kind::Put => {
                    let mut r =
                        tonic::Request::new(PutRequest { key: key.clone(), value: value.clone(), client_id, seq });
                    r.set_timeout(timeout);
                    client.put(r).await.map(|_| ())
                }
                Kind::Get => {
                    let mut r = tonic::Request::new(GetRequest { key: key.clone(), client_id, seq, stale });
                    r.set_timeout(timeout);
                    client.get(r).await.map(|_| ())
                }
                Kind::Delete => {
                    let mut r = tonic::Request::new(DeleteRequest { key: key.clone(), client_id, seq });
                    r.set_timeout(timeout);
                    client.delete(r).await.map(|_| ())
                }
            };
            if !result.as_ref().is_err_and(worth_retrying) || Instant::now() >= deadline {
                break;
            }
        }
        if t < measured_from {
            continue;
        }
        match result {
            Ok(()) => tally.latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(format!("{:?}: {}", e.code(), e.message()));
                }
            }
        }
    }
    tally
}

/// Writes `bench:0 .. bench:(keys-1)` once, `clients` at a time.
async fn prefill(
    dialer: &Dialer,
    targets: &[String],
    clients: usize,
    keys: u64,
    value: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let mut tasks = Vec::new();
    for c in 0..clients as u64 {
        let address = targets[c as usize % targets.len()].clone();
        let value = value.to_vec();
        let stride = clients as u64;
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let endpoint = dialer.endpoint(&address).map_err(|e| e.to_string())?;
            let mut client = KeyValueClient::new(endpoint.connect_timeout(timeout).tcp_nodelay(true).connect_lazy());
            let client_id: u64 = rand::rng().random::<u64>() | 1;
            for (n, k) in (c..keys).step_by(stride as usize).enumerate() {
                let seq = n as u64 + 1;
                let mut r =
                    tonic::Request::new(PutRequest { key: format!("bench:{k}"), value: value.clone(), client_id, seq });
                r.set_timeout(timeout);
                client.put(r).await.map_err(|e| format!("{:?}: {}", e.code(), e.message()))?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1e3
}

fn report(args: &BenchArgs, targets: &[String], mut tally: Tally, elapsed: f64, json: bool, stale: bool) {
    tally.latencies_us.sort_unstable();
    let ops = tally.latencies_us.len();
    let ops_per_s = ops as f64 / elapsed.max(1e-9);
    let (p50, p90, p99) = (
        percentile(&tally.latencies_us, 50.0),
        percentile(&tally.latencies_us, 90.0),
        percentile(&tally.latencies_us, 99.0),
    );
    let max = tally.latencies_us.last().map_or(0.0, |m| f64::from(*m) / 1e3);
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "clients": args.clients, "duration_s": elapsed, "value_size": args.value_size, "keys": args.keys,
                "mix": args.mix, "stale": stale, "targets": targets, "ops": ops, "ops_per_s": ops_per_s,
                "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max, "errors": tally.errors,
                "first_error": tally.first_error,
            })
        );
    } else {
        outln!(
            "bench: {} clients, {:.1} s, mix {}, {}-byte values, {} keys, {} target(s)",
            args.clients,
            elapsed,
            args.mix,
            args.value_size,
            args.keys,
            targets.len()
        );
        outln!("  ops/s   {ops_per_s:>10.0}   ({ops} ok, {} errors)", tally.errors);
        outln!("  latency p50 {p50:.2} ms  p90 {p90:.2} ms  p99 {p99:.2} ms  max {max:.2} ms");
        if let Some(e) = tally.first_error {
            outln!("  first error: {e}");
        }
    }
}
