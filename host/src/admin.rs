//! The `Admin` gRPC service: status, and hot swap of the guest.
//!
//! A swap is prepared here, off the step loop: the build is compiled (or fetched from the
//! compiled-build cache), linked, and checked to export the `replica-node` world, and its bytes
//! are written durably next to the data dir. Only then is it handed to the step loop, which
//! swaps it in between two steps. `--watch` uses the same path when the guest file changes.
//!
//! One swap at a time per host (`SWAP_IN_PROGRESS`): every swap writes the same `next.wasm`,
//! and the step loop renames it to `current.wasm` on success or deletes it on refusal, so two
//! concurrent swaps could install the refused build, or delete the other's file (issue 17, 4).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use waxos_proto::admin_server::Admin;
use waxos_proto::{StatusRequest, StatusResponse, SwapGuestRequest, SwapGuestResponse};

use crate::bootstrap::Roster;
use crate::runtime::Runtime;
use crate::step_loop::{Input, StepLoopHandle, SwapReport};

/// Largest build accepted by `SwapGuest`.
pub const GUEST_BYTES_MAX: usize = 64 << 20;

/// Held for the whole of a swap, from writing `next.wasm` to the step loop's answer.
static SWAP_IN_PROGRESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Compiles `bytes`, keeps them durably as the next build, and swaps them in. The error says
/// why the build was refused; the old guest then keeps running.
pub async fn swap_in(
    runtime: Arc<Runtime>,
    guest_dir: PathBuf,
    step_loop: &StepLoopHandle,
    bytes: Vec<u8>,
    source: String,
) -> Result<SwapReport, String> {
    if !step_loop.ready.load(Ordering::Acquire) {
        return Err("the replica is still starting; retry the swap".into());
    }
    let _one_at_a_time = SWAP_IN_PROGRESS.lock().await;
    let build = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let build = runtime.compile(&bytes, &source)?;
        crate::storage::write_atomically(&guest_dir.join("next.wasm"), &bytes)?;
        Ok(build)
    })
    .await
    .map_err(|e| format!("compiling the build failed: {e}"))?
    .map_err(|e| format!("{e:#}"))?;
    let (reply, answer) = oneshot::channel();
    step_loop.offer(Input::Swap { build, reply });
    answer.await.map_err(|_| "the step loop dropped the swap".to_string())?
}

/// The guest build a host starts with: the one a swap installed, if any, else `default`.
pub fn installed_build(guest_dir: &Path, default: PathBuf) -> PathBuf {
    let current = guest_dir.join("current.wasm");
    if current.exists() {
        tracing::info!(
            "running the guest build installed by a hot swap ({}); swap again to change it",
            current.display()
        );
        current
    } else {
        default
    }
}

/// The `Admin` service.
pub struct AdminService {
    /// Where status questions and swaps go.
    pub step_loop: StepLoopHandle,
    /// This host's roster, once known.
    pub roster: Arc<OnceLock<Roster>>,
    /// Compiles swapped-in builds.
    pub runtime: Arc<Runtime>,
    /// Where swapped-in builds are kept.
    pub guest_dir: PathBuf,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        tracing::info!("request received op=status");
        let roster = self.roster.get();
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
            node_id: roster.map_or(0, |r| r.me),
            members: roster.map(Roster::to_proto).unwrap_or_default(),
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

    async fn swap_guest(&self, request: Request<SwapGuestRequest>) -> Result<Response<SwapGuestResponse>, Status> {
        let started = Instant::now();
        let bytes = request.into_inner().wasm;
        tracing::info!("request received op=swap bytes={}", bytes.len());
        if bytes.len() > GUEST_BYTES_MAX {
            let status =
                Status::invalid_argument(format!("build is {} bytes; the limit is {GUEST_BYTES_MAX}", bytes.len()));
            tracing::info!("response sent op=swap error={:?}", status.message());
            return Err(status);
        }
        let result = swap_in(self.runtime.clone(), self.guest_dir.clone(), &self.step_loop, bytes, "swap".into()).await;
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
            Err(reason) => {
                tracing::info!("response sent op=swap error={reason:?} latency_ms={latency_ms:.2}");
                Err(Status::failed_precondition(format!("swap refused, the old guest keeps running: {reason}")))
            }
        }
    }
}

/// `--watch`: swaps the guest in again whenever the file at `path` changes.
pub async fn watch(path: PathBuf, runtime: Arc<Runtime>, guest_dir: PathBuf, step_loop: StepLoopHandle) {
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut last = stamp(&path);
    tracing::info!("watching {} for new builds", path.display());
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stamp(&path);
        if now == last || now.is_none() {
            continue;
        }
        // Let the writer finish: the file must be stable for one more interval.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stamp(&path) != now {
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
        tracing::info!("watch: {} changed; swapping it in", path.display());
        match swap_in(runtime.clone(), guest_dir.clone(), &step_loop, bytes, path.display().to_string()).await {
            Ok(r) => tracing::info!("watch: now running {} (build {})", r.new_version, r.build_hash),
            Err(reason) => tracing::warn!("watch: swap refused, the old guest keeps running: {reason}"),
        }
    }
}
