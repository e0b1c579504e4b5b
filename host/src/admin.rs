//! The `Admin` gRPC service: status, hot swap of the guest, membership changes, and backups
//! (`SaveSnapshot`, whose work is `backup`'s).
//!
//! `SwapGuest`, `ChangeMembers` and `SaveSnapshot` are operator actions (a client certificate with the operator role, see `tls`);
//! `Status` needs any certificate of the cluster's CA. Refusals are `PERMISSION_DENIED` and
//! logged with the caller; every call is logged with who made it.
//!
//! A swap is prepared here, off the step loop: the build is compiled (or fetched from the
//! compiled-build cache), linked, and checked to export the `replica-node` world, and its bytes
//! are written durably next to the data dir. Only then is it handed to the step loop, which
//! swaps it in between two steps. `--watch` uses the same path when the guest file changes.
//!
//! Every build is checked against the host's signing policy (`signing`) before anything
//! compiles it: a swap whose signature is missing or does not verify gets `PERMISSION_DENIED`
//! with the reason, and the old guest keeps serving. The signature is kept as `next.wasm.sig`
//! with the build and installed with it as `current.wasm.sig`.
//!
//! One swap at a time per host (`SWAP_IN_PROGRESS`, held until the step loop is done with it,
//! even when the caller gave up): every swap writes the same `next.wasm`,
//! and the step loop renames it to `current.wasm` on success or deletes it on refusal, so two
//! concurrent swaps could install the refused build, or delete the other's file (issue 17, 4).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use waxos_proto::admin_server::Admin;
use waxos_proto::{
    ChangeMembersRequest, ChangeMembersResponse, SaveSnapshotRequest, SnapshotChunk, StatusRequest, StatusResponse,
    SwapGuestRequest, SwapGuestResponse,
};

use crate::membership::Members;
use crate::runtime::{Outcome, Runtime};
use crate::signing::{signature_path, Policy};
use crate::step_loop::{Input, StepLoopHandle, SwapReport};

/// Largest build accepted by `SwapGuest`.
pub const GUEST_BYTES_MAX: usize = 64 << 20;

/// Held for the whole of a swap, from writing `next.wasm` until the step loop has carried it
/// out or refused it. The guard travels with the swap (into the blocking write, then inside
/// `Input::Swap`), so a caller that gives up (a deadline, Ctrl-C) does not release it while
/// its swap is still being written or waits at the step loop.
static SWAP_IN_PROGRESS: std::sync::LazyLock<Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Mutex::new(())));

/// Why a swap did not happen; either way the old guest keeps running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapError {
    /// The build's signature is missing or does not verify (`PERMISSION_DENIED`).
    Unverified(String),
    /// The build, or the host's state, refused it (`FAILED_PRECONDITION`).
    Refused(String),
}

impl std::fmt::Display for SwapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwapError::Unverified(reason) => write!(f, "the build is not trusted: {reason}"),
            SwapError::Refused(reason) => f.write_str(reason),
        }
    }
}

/// Checks the signature of `bytes`, compiles them, keeps them (and the signature) durably as
/// the next build, and swaps them in. The error says why the build was refused; the old guest
/// then keeps running.
pub async fn swap_in(
    runtime: Arc<Runtime>,
    policy: Arc<Policy>,
    guest_dir: PathBuf,
    step_loop: &StepLoopHandle,
    bytes: Vec<u8>,
    signature: Option<Vec<u8>>,
    source: String,
) -> Result<SwapReport, SwapError> {
    if !step_loop.ready.load(Ordering::Acquire) {
        return Err(SwapError::Refused("the replica is still starting; retry the swap".into()));
    }
    // First of all, before waiting for another swap or parsing a byte of the build.
    let checked_source = source.clone();
    let (bytes, signature) = tokio::task::spawn_blocking(move || {
        policy.verify(&bytes, signature.as_deref(), &checked_source).map(|_| (bytes, signature))
    })
    .await
    .map_err(|e| SwapError::Refused(format!("checking the signature failed: {e}")))?
    .map_err(|refusal| SwapError::Unverified(refusal.to_string()))?;
    let one_at_a_time = SWAP_IN_PROGRESS.clone().lock_owned().await;
    let (build, one_at_a_time) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let build = runtime.compile(&bytes, &source)?;
        let next = guest_dir.join("next.wasm");
        match &signature {
            Some(signature) => crate::storage::write_atomically(&signature_path(&next), signature)?,
            None => match std::fs::remove_file(signature_path(&next)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
        }
        crate::storage::write_atomically(&next, &bytes)?;
        Ok((build, one_at_a_time))
    })
    .await
    .map_err(|e| SwapError::Refused(format!("compiling the build failed: {e}")))?
    .map_err(|e| SwapError::Refused(format!("{e:#}")))?;
    let (reply, answer) = oneshot::channel();
    step_loop.offer(Input::Swap { build, reply, one_at_a_time });
    answer
        .await
        .map_err(|_| SwapError::Refused("the step loop dropped the swap".to_string()))?
        .map_err(SwapError::Refused)
}

/// The `Admin` service.
pub struct AdminService {
    /// Where status questions and swaps go.
    pub step_loop: StepLoopHandle,
    /// The members as this host knows them (empty until its roster is known).
    pub members: Members,
    /// Compiles swapped-in builds.
    pub runtime: Arc<Runtime>,
    /// Where swapped-in builds are kept.
    pub guest_dir: PathBuf,
    /// Which builds may be swapped in.
    pub signing: Arc<Policy>,
    /// Whose data dir this is: the cluster id a backup names as its origin.
    pub identity: Arc<crate::identity::Identity>,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let caller = crate::tls::require_certificate(&request, "status")?;
        tracing::info!("request received op=status caller=\"{caller}\"");
        let (guest_status_json, guest_build, guest_down) = if self.step_loop.ready.load(Ordering::Acquire) {
            let (reply, answer) = oneshot::channel();
            self.step_loop.offer(Input::Status(reply));
            match tokio::time::timeout(Duration::from_secs(2), answer).await {
                Ok(Ok(Ok((json, build)))) => (json, build, false),
                Ok(Ok(Err(reason))) => (format!("{{\"down\":{reason:?}}}"), String::new(), true),
                _ => ("{\"down\":\"no answer\"}".to_string(), String::new(), true),
            }
        } else {
            ("{\"starting\":true}".to_string(), String::new(), true)
        };
        let response = StatusResponse {
            node_id: self.members.get().map_or(0, |k| k.me),
            members: self.members.to_proto(),
            guest_status_json,
            guest_down,
            guest_build,
        };
        tracing::info!(
            "response sent op=status guest_down={guest_down} latency_ms={:.2}",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(Response::new(response))
    }

    async fn change_members(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ChangeMembersResponse>, Status> {
        let started = Instant::now();
        let caller = crate::tls::require_operator(&request, "membership change")?;
        let request = request.into_inner();
        let command = crate::membership::command_of(&request);
        let shown = command.as_ref().map_or_else(|_| "nothing".to_string(), crate::membership::describe);
        tracing::info!(
            "request received op=member change={shown:?} client={:#x} seq={} caller=\"{caller}\"",
            request.client_id,
            request.seq
        );
        let answer = match command {
            Ok(command) => self.submit_change(command, request.client_id, request.seq).await,
            Err(status) => Err(status),
        };
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        match &answer {
            Ok(id) => tracing::info!("response sent op=member change={shown:?} member={id} latency_ms={latency_ms:.2}"),
            Err(status) => tracing::info!(
                "response sent op=member change={shown:?} error={:?} {:?} latency_ms={latency_ms:.2}",
                status.code(),
                status.message()
            ),
        }
        answer.map(|member_id| Response::new(ChangeMembersResponse { member_id }))
    }

    type SaveSnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotChunk, Status>>;

    async fn save_snapshot(
        &self,
        request: Request<SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        let started = Instant::now();
        // A backup holds every value of the store: operators only, like the other actions.
        let caller = crate::tls::require_operator(&request, "snapshot save")?;
        tracing::info!("request received op=snapshot-save caller=\"{caller}\"");
        let cluster_id = self.identity.cluster_id().unwrap_or_default().to_string();
        match crate::backup::save(&self.step_loop, &cluster_id).await {
            Ok(saved) => {
                let chunks = crate::backup::stream(saved, started);
                Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(chunks)))
            }
            Err(status) => {
                tracing::info!(
                    "response sent op=snapshot-save error={:?} {:?} latency_ms={:.2}",
                    status.code(),
                    status.message(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                Err(status)
            }
        }
    }

    async fn swap_guest(&self, request: Request<SwapGuestRequest>) -> Result<Response<SwapGuestResponse>, Status> {
        let started = Instant::now();
        // Replacing the consensus core is the most powerful call there is: operators only, and
        // before a byte of the build is looked at.
        let caller = crate::tls::require_operator(&request, "swap")?;
        let request = request.into_inner();
        let (bytes, signature) = (request.wasm, Some(request.signature).filter(|s| !s.is_empty()));
        tracing::info!(
            "request received op=swap bytes={} signature_bytes={} caller=\"{caller}\"",
            bytes.len(),
            signature.as_ref().map_or(0, Vec::len)
        );
        if bytes.len() > GUEST_BYTES_MAX {
            let status =
                Status::invalid_argument(format!("build is {} bytes; the limit is {GUEST_BYTES_MAX}", bytes.len()));
            tracing::info!("response sent op=swap error={:?}", status.message());
            return Err(status);
        }
        let result = swap_in(
            self.runtime.clone(),
            self.signing.clone(),
            self.guest_dir.clone(),
            &self.step_loop,
            bytes,
            signature,
            "swap".into(),
        )
        .await;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(r) => {
                tracing::info!(
                    "response sent op=swap outcome=swapped {} -> {} pause_ms={:.2} latency_ms={latency_ms:.2}",
                    r.old_version,
                    r.new_version,
                    r.pause.as_secs_f64() * 1e3
                );
                Ok(Response::new(SwapGuestResponse {
                    old_version: r.old_version,
                    new_version: r.new_version,
                    build_hash: r.build_hash,
                    pause_us: r.pause.as_micros() as u64,
                }))
            }
            Err(SwapError::Unverified(reason)) => {
                tracing::warn!("response sent op=swap error=PERMISSION_DENIED {reason:?} latency_ms={latency_ms:.2}");
                Err(Status::permission_denied(format!(
                    "swap refused, the old guest keeps running: the build is not trusted: {reason}"
                )))
            }
            Err(SwapError::Refused(reason)) => {
                tracing::info!("response sent op=swap error={reason:?} latency_ms={latency_ms:.2}");
                Err(Status::failed_precondition(format!("swap refused, the old guest keeps running: {reason}")))
            }
        }
    }
}

impl AdminService {
    /// Hands a membership change to the guest and waits until it is chosen (or refused).
    async fn submit_change(&self, command: crate::runtime::Command, client: u64, seq: u64) -> Result<u32, Status> {
        if !self.step_loop.ready.load(Ordering::Acquire) {
            return Err(Status::unavailable("the replica is still starting; retry"));
        }
        let (reply, outcome) = oneshot::channel();
        self.step_loop.offer(Input::Request { command, client, seq, reply });
        match tokio::time::timeout(MEMBER_CHANGE_DEADLINE, outcome).await {
            Ok(Ok(Outcome::Member(id))) => Ok(id),
            Ok(Ok(Outcome::Rejected(reason))) if reason.starts_with("membership:") => {
                Err(Status::failed_precondition(reason))
            }
            Ok(Ok(Outcome::Rejected(reason))) if reason.starts_with("reused") => Err(Status::failed_precondition(reason)),
            Ok(Ok(Outcome::Rejected(reason))) => Err(Status::unavailable(reason)),
            Ok(Ok(Outcome::Redirect(_))) => Err(Status::unavailable("no leader known yet; retry")),
            Ok(Ok(other)) => Err(Status::failed_precondition(format!(
                "reused seq: (client {client:#x}, seq {seq}) was already used for another request ({other:?}): use a new seq"
            ))),
            Ok(Err(_)) => Err(Status::unavailable("the replica dropped the request (restarting); retry")),
            Err(_) => Err(Status::unavailable(format!(
                "the change was not chosen within {} s (is a majority of the voters up?); retry with the same seq",
                MEMBER_CHANGE_DEADLINE.as_secs()
            ))),
        }
    }
}

/// How long a membership change may take to be chosen.
const MEMBER_CHANGE_DEADLINE: Duration = Duration::from_secs(10);

/// `--watch`: swaps the guest in again whenever the file at `path` (or its signature,
/// `<path>.sig`) changes. A build whose signature does not verify is refused and logged; the
/// next change of either file tries again.
pub async fn watch(
    path: PathBuf,
    runtime: Arc<Runtime>,
    policy: Arc<Policy>,
    guest_dir: PathBuf,
    step_loop: StepLoopHandle,
) {
    let signature = signature_path(&path);
    let stamp_of = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let stamp = || (stamp_of(&path), stamp_of(&signature));
    let mut last = stamp();
    tracing::info!("watching {} (and {}) for new builds", path.display(), signature.display());
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stamp();
        if now == last || now.0.is_none() {
            continue;
        }
        // Let the writer finish: the files must be stable for one more interval.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stamp() != now {
            continue;
        }
        last = now;
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!("watch: cannot read {}: {e}", path.display());
                continue;
            }
        };
        let sig = match crate::signing::read_signature(&path) {
            Ok(sig) => sig,
            Err(e) => {
                tracing::warn!("watch: {e:#}");
                continue;
            }
        };
        tracing::info!("watch: {} changed; swapping it in", path.display());
        let source = path.display().to_string();
        match swap_in(runtime.clone(), policy.clone(), guest_dir.clone(), &step_loop, bytes, sig, source).await {
            Ok(r) => tracing::info!("watch: now running {} (build {})", r.new_version, r.build_hash),
            Err(reason) => tracing::warn!("watch: swap refused, the old guest keeps running: {reason}"),
        }
    }
}
