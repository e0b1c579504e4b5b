//! `waxos <host> <port> snapshot save FILE`: a backup of the cluster's state, from the host
//! named (an operator action, `Admin.SaveSnapshot`).
//!
//! The host first makes sure it has applied every write acknowledged before the call (a
//! linearizable read barrier), then streams its state as a backup file (format:
//! `waxos_proto::backup`). The client writes the chunks to `FILE.part` as they arrive and
//! checks the file while it does (header, length, CRC32C); only a whole file that checks out is
//! synced and renamed to `FILE`, so `FILE` is never a partial backup. `waxosd … --restore FILE`
//! starts a new cluster from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use waxos_proto::admin_client::AdminClient;
use waxos_proto::backup::{Header, Verifier};
use waxos_proto::SaveSnapshotRequest;

use crate::commands::{EXIT_FAILURE, EXIT_OK};
use crate::session::Session;

/// The longest a save may stream (a state of several GiB over a slow link).
const SAVE_DEADLINE: Duration = Duration::from_secs(3600);
/// Largest chunk accepted from a host (it sends 1 MiB).
const CHUNK_BYTES_MAX: usize = 16 << 20;

/// Backup commands.
#[derive(Subcommand, Debug, Clone)]
pub enum SnapshotCmd {
    /// Write a consistent backup of the state to FILE (every write acknowledged before the
    /// call is in it); `waxosd … --restore FILE` starts a new cluster from it.
    Save {
        /// Where to write the backup (replaced if it exists, only once the new one is whole).
        file: PathBuf,
    },
}

/// Runs a backup command; the exit code.
pub async fn run(session: &Session, command: SnapshotCmd, json: bool) -> i32 {
    match command {
        SnapshotCmd::Save { file } => match save(session, &file).await {
            Ok((header, bytes, elapsed)) => {
                let ms = elapsed.as_secs_f64() * 1e3;
                let origin = if header.cluster_id.is_empty() { "unknown" } else { header.cluster_id.as_str() };
                if json {
                    outln!(
                        "{}",
                        serde_json::json!({"file": file.display().to_string(), "bytes": bytes, "slot": header.next_apply,
                            "cluster_id": origin, "node": header.node_id, "crc32c": format!("{:08x}", header.state_crc32c),
                            "ms": ms})
                    );
                } else {
                    outln!(
                        "saved {}: {bytes} bytes, the state at slot {} (every slot below it applied) of cluster {origin}, from node {}, crc32c {:08x}, in {ms:.0} ms",
                        file.display(),
                        header.next_apply,
                        header.node_id,
                        header.state_crc32c
                    );
                }
                EXIT_OK
            }
            Err(reason) => {
                eprintln!("waxos: snapshot save from {} failed: {reason}", session.server());
                EXIT_FAILURE
            }
        },
    }
}

/// `FILE.part`, where a save is written until it is whole.
fn part_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    file.with_file_name(name)
}

/// Streams a backup from the session's server into `file`; its header, size and duration.
async fn save(session: &Session, file: &Path) -> Result<(Header, u64, Duration), String> {
    let started = Instant::now();
    let address = session.server().to_string();
    let endpoint = session
        .dialer()
        .endpoint(&address)
        .map_err(|e| format!("bad server address {address}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| format!("cannot connect: {e}"))?;
    let mut request = tonic::Request::new(SaveSnapshotRequest {});
    request.set_timeout(SAVE_DEADLINE);
    tracing::info!("snapshot save: asking {address} for a consistent backup");
    let mut client = AdminClient::new(channel).max_decoding_message_size(CHUNK_BYTES_MAX);
    let mut stream = client
        .save_snapshot(request)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    let part = part_path(file);
    let mut out = std::fs::File::create(&part).map_err(|e| format!("cannot create {}: {e}", part.display()))?;
    let written = async {
        let mut verifier = Verifier::default();
        let mut bytes = 0u64;
        while let Some(chunk) =
            stream.message().await.map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        {
            verifier.feed(&chunk.data).map_err(|e| format!("the host sent {e}"))?;
            out.write_all(&chunk.data).map_err(|e| format!("cannot write {}: {e}", part.display()))?;
            bytes += chunk.data.len() as u64;
        }
        let header = verifier.finish().map_err(|e| format!("the stream ended early: {e}"))?;
        out.sync_all().map_err(|e| format!("cannot sync {}: {e}", part.display()))?;
        Ok::<_, String>((header, bytes))
    }
    .await;
    let (header, bytes) = match written {
        Ok(written) => written,
        Err(reason) => {
            let _ = std::fs::remove_file(&part);
            return Err(reason);
        }
    };
    std::fs::rename(&part, file).map_err(|e| format!("cannot rename {} to {}: {e}", part.display(), file.display()))?;
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    Ok((header, bytes, started.elapsed()))
}
