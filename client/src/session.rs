//! One logical client of the cluster: its identity, its sequence numbers, and the request path.
//!
//! Every request carries `(client_id, seq)`. A request that times out (or finds its server
//! unreachable or unavailable) is logged — `server HOST:PORT unresponsive after N ms` — and sent
//! again, with the same pair, to the next member learned from `Admin.Status`; the cluster applies
//! a write once however many times it arrives. Errors that retrying cannot fix (invalid input,
//! `FAILED_PRECONDITION`: a pair already used for another request) are returned at once.

use std::time::{Duration, Instant};

use rand::RngExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use waxos_proto::admin_client::AdminClient;
use waxos_proto::key_value_client::KeyValueClient;
use waxos_proto::tls::Dialer;
use waxos_proto::{DeleteRequest, GetRequest, PutRequest, StatusRequest, StatusResponse};

/// What a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A put applied.
    Stored,
    /// A get's value (None: not found).
    Value(Option<Vec<u8>>),
    /// A delete applied; false when the key was absent.
    Deleted(bool),
}

/// What a client can ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put.
    Put(String, Vec<u8>),
    /// Get.
    Get(String),
    /// Delete.
    Delete(String),
}

impl Op {
    /// Operation name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Put(..) => "PUT",
            Op::Get(_) => "GET",
            Op::Delete(_) => "DELETE",
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        match self {
            Op::Put(k, _) | Op::Get(k) | Op::Delete(k) => k,
        }
    }
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The server refused the input; retrying will not help.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No member answered in time.
    #[error("no server answered: {0}")]
    Exhausted(String),
}

/// A client session.
pub struct Session {
    /// Addresses to try, the given one first.
    pub servers: Vec<String>,
    current: usize,
    channel: Option<Channel>,
    client_id: u64,
    seq: u64,
    timeout: Duration,
    learned_members: bool,
    /// GETs are serializable (`--stale`) instead of linearizable.
    pub stale_reads: bool,
    /// TLS (or `--insecure`) to every server.
    dialer: Dialer,
}

impl Session {
    /// A session that talks to `host:port` first.
    pub fn new(host: &str, port: u16, timeout_ms: u64, dialer: Dialer) -> Self {
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
        Session {
            servers: vec![format!("{host}:{port}")],
            current: 0,
            channel: None,
            client_id: rand::rng().random::<u64>() | 1,
            seq: 0,
            timeout: Duration::from_millis(timeout_ms.max(1)),
            learned_members: false,
            stale_reads: false,
            dialer,
        }
    }

    /// The server currently used.
    pub fn server(&self) -> &str {
        &self.servers[self.current]
    }

    /// How this session dials servers.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    fn endpoint(&self, address: &str) -> Result<Endpoint, Status> {
        self.dialer
            .endpoint(address)
            .map(|e| e.connect_timeout(self.timeout).timeout(self.timeout).tcp_nodelay(true))
            .map_err(|e| Status::invalid_argument(format!("bad server address {address}: {e}")))
    }

    async fn channel(&mut self) -> Result<Channel, Status> {
        if let Some(channel) = &self.channel {
            return Ok(channel.clone());
        }
        let address = self.server().to_string();
        let endpoint = self.endpoint(&address)?;
        let channel = tokio::time::timeout(self.timeout, endpoint.connect())
            .await
            .map_err(|_| Status::deadline_exceeded("connect timed out"))?
            .map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
        self.channel = Some(channel.clone());
        Ok(channel)
    }

    /// `Admin.Status` of one address.
    pub async fn status_of(&self, address: &str) -> Result<StatusResponse, Status> {
        let endpoint = self.endpoint(address)?;
        let channel = tokio::time::timeout(self.timeout, endpoint.connect())
            .await
            .map_err(|_| Status::deadline_exceeded("connect timed out"))?
            .map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
        let mut request = tonic::Request::new(StatusRequest {});
        request.set_timeout(self.timeout);
        Ok(AdminClient::new(channel).status(request).await?.into_inner())
    }

    /// `Admin.SwapGuest` on the current server (compiling a build takes a while: the deadline
    /// is at least 60 s).
    pub async fn swap(&self, wasm: Vec<u8>, signature: Vec<u8>) -> Result<waxos_proto::SwapGuestResponse, Status> {
        let address = self.server().to_string();
        let timeout = self.timeout.max(Duration::from_secs(60));
        let endpoint = self.endpoint(&address)?.timeout(timeout);
        let channel = tokio::time::timeout(self.timeout, endpoint.connect())
            .await
            .map_err(|_| Status::deadline_exceeded("connect timed out"))?
            .map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
        let mut request = tonic::Request::new(waxos_proto::SwapGuestRequest { wasm, signature });
        request.set_timeout(timeout);
        let mut client = AdminClient::new(channel).max_encoding_message_size(128 << 20);
        Ok(client.swap_guest(request).await?.into_inner())
    }

    /// `Admin.ChangeMembers` on the current server (a change may take a few seconds to be
    /// chosen: the deadline is at least 15 s).
    pub async fn change_members(
        &self,
        request: waxos_proto::ChangeMembersRequest,
    ) -> Result<waxos_proto::ChangeMembersResponse, Status> {
        let address = self.server().to_string();
        let timeout = self.timeout.max(Duration::from_secs(15));
        let endpoint = self.endpoint(&address)?.timeout(timeout);
        let channel = tokio::time::timeout(self.timeout, endpoint.connect())
            .await
            .map_err(|_| Status::unavailable("connect timed out"))?
            .map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        Ok(AdminClient::new(channel).change_members(request).await?.into_inner())
    }

    /// Moves on to the next known server (after one did not answer).
    pub fn next_server(&mut self) {
        self.current = (self.current + 1) % self.servers.len().max(1);
        self.channel = None;
    }

    /// This session's client identity (for exactly-once across retries).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Learns the other members from the first server that answers `Status`, so a failed
    /// request can go elsewhere.
    pub async fn learn_members(&mut self) {
        if self.learned_members {
            return;
        }
        for address in self.servers.clone() {
            if let Ok(status) = self.status_of(&address).await {
                for m in status.members {
                    if !self.servers.contains(&m.address) {
                        self.servers.push(m.address);
                    }
                }
                self.learned_members = true;
                return;
            }
        }
    }

    /// Runs one operation, failing over on timeouts and unavailability, with one `(client, seq)`.
    pub async fn request(&mut self, op: &Op) -> Result<Reply, RequestError> {
        self.seq += 1;
        let seq = self.seq;
        let mut failures = Vec::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = Instant::now();
            let result = self.attempt(op, seq).await;
            match result {
                Ok(reply) => {
                    // Learn where else to go while the cluster answers, so that a member that
                    // dies later (even this one) can be failed over from.
                    self.learn_members().await;
                    return Ok(reply);
                }
                // Invalid input, or a (client, seq) already used for another request (this
                // client never reuses one; a retry of the same request is answered, not refused).
                Err(status) if matches!(status.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                    return Err(RequestError::Invalid(status.message().to_string()));
                }
                Err(status) => {
                    let server = self.server().to_string();
                    let waited = started.elapsed().as_millis();
                    if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled)
                        || waited >= self.timeout.as_millis()
                    {
                        tracing::warn!("server {server} unresponsive after {waited} ms");
                    } else {
                        tracing::warn!(
                            "server {server} failed {} {}: {} ({:?})",
                            op.name(),
                            op.key(),
                            status.message(),
                            status.code()
                        );
                    }
                    failures.push(format!("{server}: {}", describe(&status)));
                    self.channel = None;
                    self.learn_members().await;
                    if attempts >= self.servers.len() {
                        return Err(RequestError::Exhausted(failures.join("; ")));
                    }
                    self.current = (self.current + 1) % self.servers.len();
                    tracing::info!("retrying {} {} on {} with the same seq {seq}", op.name(), op.key(), self.server());
                }
            }
        }
    }

    async fn attempt(&mut self, op: &Op, seq: u64) -> Result<Reply, Status> {
        let channel = self.channel().await?;
        let mut client = KeyValueClient::new(channel);
        let client_id = self.client_id;
        let timeout = self.timeout;
        let stale = self.stale_reads;
        let call = async move {
            match op {
                Op::Put(key, value) => {
                    let mut r =
                        tonic::Request::new(PutRequest { key: key.clone(), value: value.clone(), client_id, seq });
                    r.set_timeout(timeout);
                    client.put(r).await.map(|_| Reply::Stored)
                }
                Op::Get(key) => {
                    let mut r = tonic::Request::new(GetRequest { key: key.clone(), client_id, seq, stale });
                    r.set_timeout(timeout);
                    let g = client.get(r).await?.into_inner();
                    Ok(Reply::Value(g.found.then_some(g.value)))
                }
                Op::Delete(key) => {
                    let mut r = tonic::Request::new(DeleteRequest { key: key.clone(), client_id, seq });
                    r.set_timeout(timeout);
                    client.delete(r).await.map(|d| Reply::Deleted(d.into_inner().existed))
                }
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis()))),
        }
    }
}

fn describe(status: &Status) -> String {
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => format!("unresponsive ({})", status.message()),
        _ => status.message().to_string(),
    }
}
