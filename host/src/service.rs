//! The client-facing `KeyValue` gRPC service (PUT/GET/DELETE).
//!
//! Each handler validates its input (bad input is `INVALID_ARGUMENT` and never reaches the
//! guest), logs the request, hands it to the step loop, waits for the outcome until just before
//! the caller's own gRPC deadline, and logs the response with its latency. When consensus does
//! not answer in time (no quorum), the caller gets `UNAVAILABLE` with the reason rather than
//! its own timeout.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use waxos_proto::key_value_server::KeyValue;
use waxos_proto::{DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest, PutResponse};

use crate::runtime::{Command, Outcome};
use crate::step_loop::{Input, StepLoopHandle};

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest value accepted, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// How long a request waits for consensus when the caller set no deadline.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// The `KeyValue` service.
pub struct KeyValueService {
    /// Where requests go.
    pub step_loop: StepLoopHandle,
    /// Replica count (for messages).
    pub replicas: u32,
    /// Callers need a client certificate (`--client-cert-auth`); otherwise anyone who completes
    /// the TLS handshake may read and write.
    pub client_cert_auth: bool,
}

impl KeyValueService {
    /// Refuses a caller without a certificate when `--client-cert-auth` asks for one.
    fn authorize<T>(&self, request: &Request<T>, op: &str) -> Result<(), Status> {
        if self.client_cert_auth {
            crate::tls::require_certificate(request, op)?;
        }
        Ok(())
    }
}

/// How a request is shown in the log: the key escaped and cut to 64 characters.
fn show_key(key: &str) -> String {
    let shown: String = key.escape_debug().take(64).collect();
    if shown.len() < key.len() && key.len() > 64 {
        format!("{shown}…")
    } else {
        shown
    }
}

/// The caller's deadline from its `grpc-timeout` header, less a margin to answer in time.
fn deadline_of<T>(request: &Request<T>) -> Duration {
    let parsed = request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(|v| {
        let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
        let n: u64 = digits.parse().ok()?;
        Some(match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        })
    });
    match parsed {
        Some(d) => d.saturating_sub((d / 10).min(Duration::from_millis(200))),
        None => DEFAULT_DEADLINE,
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("key must not be empty"));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "key is {} bytes; the limit is {KEY_BYTES_MAX} bytes",
            key.len()
        )));
    }
    Ok(())
}

impl KeyValueService {
    async fn submit(&self, command: Command, client: u64, seq: u64, deadline: Duration) -> Result<Outcome, Status> {
        if !self.step_loop.ready.load(Ordering::Acquire) {
            return Err(Status::unavailable("replica is starting: the cluster roster is not complete yet"));
        }
        let (reply, outcome) = oneshot::channel();
        self.step_loop.offer(Input::Request { command, client, seq, reply });
        match tokio::time::timeout(deadline, outcome).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(Status::unavailable("replica dropped the request (restarting); retry")),
            Err(_) => Err(Status::unavailable(format!(
                "no quorum: the request was not chosen within {} ms (is a majority of the {} replicas up?)",
                deadline.as_millis(),
                self.replicas
            ))),
        }
    }
}

/// Maps outcomes a request cannot expect (or refusals) to a gRPC status. `expected` says whose
/// answer the request expects ("a put's"), for the message.
///
/// A `(client, seq)` pair that was already used for another request is `FAILED_PRECONDITION`:
/// the request was not applied, and retrying it cannot help (only a new seq can). Not
/// `ALREADY_EXISTS`, which says an entity (here it would read as the key) exists, nor
/// `UNAVAILABLE`/`ABORTED`, which clients retry. That covers this guest's refusal (`reused`),
/// an older guest build's (`seq N was already used by a read`), and an older build's habit of
/// answering with the outcome remembered for the pair even when it belongs to another kind of
/// operation (a `Done` to a GET): an outcome of another operation always means the pair was
/// used for another request, never an internal error.
fn unexpected(outcome: Outcome, client: u64, seq: u64, expected: &str) -> Status {
    let reused = |detail: &str| {
        Status::failed_precondition(format!(
            "reused seq: (client {client:#x}, seq {seq}) was already used for another request: use a new seq{detail}"
        ))
    };
    match outcome {
        Outcome::Rejected(reason) if reason.starts_with("reused") => Status::failed_precondition(reason),
        Outcome::Rejected(reason) if reason.starts_with("seq ") && reason.contains("already used") => reused(""),
        Outcome::Rejected(reason) if reason.starts_with("stale") => Status::aborted(reason),
        Outcome::Rejected(reason) if reason.starts_with("key") || reason.starts_with("value") => {
            Status::invalid_argument(reason)
        }
        // Backpressure (a full input queue, a disk that is behind): try another replica or later.
        Outcome::Rejected(reason) if reason.starts_with("overloaded") => Status::resource_exhausted(reason),
        Outcome::Rejected(reason) => Status::unavailable(reason),
        Outcome::Redirect(Some(leader)) => Status::unavailable(format!("not the leader: try node {leader}")),
        Outcome::Redirect(None) => Status::unavailable("no leader known yet; retry"),
        Outcome::Done => reused(&format!(" (the answer remembered for it is a put's, not {expected})")),
        Outcome::Removed(_) => reused(&format!(" (the answer remembered for it is a delete's, not {expected})")),
        Outcome::Value(_) => reused(&format!(" (the answer is a get's, not {expected})")),
        Outcome::Member(_) => reused(&format!(" (the answer is a membership change's, not {expected})")),
    }
}

fn log_response<T: std::fmt::Debug>(op: &'static str, key: &str, started: Instant, result: &Result<T, Status>) {
    let elapsed = started.elapsed();
    crate::metrics::request(
        op,
        result.as_ref().map_or_else(|s| crate::metrics::code_name(s.code()), |_| "ok"),
        elapsed,
    );
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    match result {
        Ok(r) => tracing::info!("response sent op={op} key={} outcome={r:?} latency_ms={latency_ms:.2}", show_key(key)),
        Err(s) => tracing::info!(
            "response sent op={op} key={} error={:?} message={:?} latency_ms={latency_ms:.2}",
            show_key(key),
            s.code(),
            s.message()
        ),
    }
}

#[tonic::async_trait]
impl KeyValue for KeyValueService {
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.authorize(&request, "put")?;
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        tracing::info!(
            "request received op=put key={} value_bytes={} client={:#x} seq={}",
            show_key(&r.key),
            r.value.len(),
            r.client_id,
            r.seq
        );
        let result = async {
            check_key(&r.key)?;
            if r.value.len() > VALUE_BYTES_MAX {
                return Err(Status::invalid_argument(format!(
                    "value is {} bytes; the limit is {VALUE_BYTES_MAX} bytes",
                    r.value.len()
                )));
            }
            match self.submit(Command::Put((r.key.clone(), r.value)), r.client_id, r.seq, deadline).await? {
                Outcome::Done => Ok(PutResponse {}),
                other => Err(unexpected(other, r.client_id, r.seq, "a put's")),
            }
        }
        .await;
        log_response("put", &r.key, started, &result);
        result.map(Response::new)
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.authorize(&request, "get")?;
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        tracing::info!(
            "request received op=get key={} client={:#x} seq={}{}",
            show_key(&r.key),
            r.client_id,
            r.seq,
            if r.stale { " stale" } else { "" }
        );
        let result = async {
            check_key(&r.key)?;
            let command = if r.stale { Command::GetStale(r.key.clone()) } else { Command::Get(r.key.clone()) };
            match self.submit(command, r.client_id, r.seq, deadline).await? {
                Outcome::Value(Some(value)) => Ok(GetResponse { found: true, value }),
                Outcome::Value(None) => Ok(GetResponse { found: false, value: Vec::new() }),
                other => Err(unexpected(other, r.client_id, r.seq, "a get's")),
            }
        }
        .await;
        let shown = result
            .as_ref()
            .map(|g| if g.found { format!("found, {} bytes", g.value.len()) } else { "not found".into() })
            .map_err(Clone::clone);
        log_response("get", &r.key, started, &shown);
        result.map(Response::new)
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        self.authorize(&request, "delete")?;
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        tracing::info!("request received op=delete key={} client={:#x} seq={}", show_key(&r.key), r.client_id, r.seq);
        let result = async {
            check_key(&r.key)?;
            match self.submit(Command::Delete(r.key.clone()), r.client_id, r.seq, deadline).await? {
                Outcome::Removed(existed) => Ok(DeleteResponse { existed }),
                other => Err(unexpected(other, r.client_id, r.seq, "a delete's")),
            }
        }
        .await;
        log_response("delete", &r.key, started, &result);
        result.map(Response::new)
    }
}
