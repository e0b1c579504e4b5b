//! Data-dir identity: which cluster a data dir belongs to, which member it is, and which life.
//!
//! A data dir holds one member's promises and accepts *for one cluster*. Started anywhere else —
//! copied to another host or port, or left behind when a cluster was rebuilt on the same ports —
//! it would vote with memories of another cluster's log, and Paxos safety is gone. So the roster
//! file carries an identity, written at bootstrap in the same atomic rename as the roster: the
//! cluster id (128 random bits, made by the coordinator when it first bootstraps the roster and
//! handed to every registering host), the member id (`me`) and an incarnation (random per data
//! dir, made when it first gets its roster). It is checked at every start and on every peer
//! batch: a persisted roster whose entry for `me` is not this host's address is refused at once
//! (`bootstrap`); every envelope batch carries the sender's cluster id, a receiver refuses one
//! from another cluster (nothing of it reaches the guest, so a foreign data dir never votes),
//! and a host that a majority of the other members refuse as foreign stops with exit code 78
//! (`EX_CONFIG`). A roster written before ids existed loads with the cluster id unknown and
//! adopts the first one it learns (from a peer's batch, or the coordinator makes one); an empty
//! id on the wire (an older build) is accepted, so a rolling upgrade works.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bootstrap::Roster;

/// Exit code of a host that refuses to serve a data dir that is not its own (`EX_CONFIG`).
pub const EXIT_FOREIGN: i32 = 78;
/// Hex digits of a cluster id (128 bits).
pub const CLUSTER_ID_HEX_LEN: usize = 32;
/// How every foreign-cluster refusal of a peer stream begins (`peer` recognises it by this).
pub const FOREIGN_CLUSTER: &str = "foreign cluster id";
/// A peer's refusal counts towards the majority that stops this host for this long.
const REFUSAL_WINDOW: Duration = Duration::from_secs(30);
/// At most one log line per peer and direction in this interval (a refused peer reconnects).
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A new cluster id: 128 random bits in lowercase hex.
pub fn new_cluster_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A new incarnation (never 0, which the coordinator's registry reads as "unknown").
pub fn new_incarnation() -> u64 {
    rand::random::<u64>().max(1)
}

/// Whether `id` is a cluster id as this build makes them (anything else is never adopted).
pub fn valid_cluster_id(id: &str) -> bool {
    id.len() == CLUSTER_ID_HEX_LEN && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Network-controlled text as it may appear in a log line: escaped and cut to 64 characters.
fn shown(text: &str) -> String {
    text.escape_debug().take(64).collect()
}

/// Why this host refuses to serve its data dir. `waxosd` exits with [`EXIT_FOREIGN`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Foreign {
    /// A majority of the other members are another cluster.
    #[error(
        "data dir {data_dir} belongs to cluster {mine}, but the members of this roster are cluster {theirs}: \
         refusing to serve (it was copied from another cluster, or this host was started with another \
         cluster's ports; give it its own data dir)"
    )]
    Cluster { data_dir: PathBuf, mine: String, theirs: String },
    /// The roster names another address for this member.
    #[error(
        "data dir {data_dir} is node {me} at {recorded}, but this host serves as {my_address}: refusing to start \
         (a data dir copied to another host or port; start it with its own --host and port, or give this host \
         a data dir of its own)"
    )]
    Address { data_dir: PathBuf, me: u32, recorded: String, my_address: String },
}

/// The identity of this host's data dir once its roster is known, shared by the peer service
/// (which checks incoming batches), the peer senders (which label theirs and hear refusals) and
/// `main` (which stops when a majority refuses). After start-up it is the roster file's only
/// writer, so an adopted cluster id and the rejoin flag cannot overwrite each other.
pub struct Identity {
    data_dir: PathBuf,
    /// Set once: from the roster, or adopted from the first peer that names one.
    cluster_id: OnceLock<String>,
    /// The roster as persisted (`None` until start-up found it).
    roster: Mutex<Option<Roster>>,
    /// Peers that refused our stream as another cluster's: when, and the id they named.
    refusals: Mutex<HashMap<u32, (Instant, String)>>,
    /// Last log line per (peer, refused by us), for rate limiting.
    logged: Mutex<HashMap<(u32, bool), Instant>>,
    /// Set when a majority of the other members refused us.
    stop: tokio::sync::watch::Sender<Option<Foreign>>,
}

impl Identity {
    /// An identity with no roster yet (the server listens before the roster is known).
    pub fn new(data_dir: &Path) -> Identity {
        Identity {
            data_dir: data_dir.to_path_buf(),
            cluster_id: OnceLock::new(),
            roster: Mutex::new(None),
            refusals: Mutex::new(HashMap::new()),
            logged: Mutex::new(HashMap::new()),
            stop: tokio::sync::watch::channel(None).0,
        }
    }

    /// The roster is known (and persisted): take its identity.
    pub fn start(&self, roster: &Roster) {
        if let Some(id) = &roster.cluster_id {
            let _ = self.cluster_id.set(id.clone());
        }
        tracing::info!(
            "data dir {}: cluster {}, node {}, incarnation {:016x}",
            self.data_dir.display(),
            roster.cluster_id.as_deref().unwrap_or("unknown (adopted from the first peer that names one)"),
            roster.me,
            roster.incarnation
        );
        if let Ok(mut persisted) = self.roster.lock() {
            *persisted = Some(roster.clone());
        }
    }

    /// This cluster's id, if known.
    pub fn cluster_id(&self) -> Option<&str> {
        self.cluster_id.get().map(String::as_str)
    }

    /// Changes the persisted roster and saves it (atomically) before returning.
    pub fn update_roster(&self, change: impl FnOnce(&mut Roster)) -> anyhow::Result<()> {
        let mut persisted = self.roster.lock().map_err(|_| anyhow::anyhow!("roster lock poisoned"))?;
        let roster = persisted.as_mut().ok_or_else(|| anyhow::anyhow!("no roster yet"))?;
        change(roster);
        roster.save(&self.data_dir)
    }

    /// Checks the cluster id on a batch from node `src` (`member`: a member other than this
    /// host). Empty (an older build, or a sender that knows none): accepted. Unknown here:
    /// adopted and persisted, from a member only. Another cluster's: the refusal, for a
    /// `FAILED_PRECONDITION` that names both ids (logged, rate-limited).
    pub fn check_batch(&self, src: u32, theirs: &str, member: bool) -> Result<(), String> {
        if theirs.is_empty() {
            return Ok(());
        }
        if member && self.cluster_id().is_none() && valid_cluster_id(theirs) {
            self.adopt(src, theirs);
        }
        match self.cluster_id() {
            Some(mine) if mine == theirs => Ok(()),
            None => Ok(()), // an id this build would not make; nothing to compare it with
            Some(mine) => {
                let theirs = shown(theirs);
                // Non-members share one rate limit: `src` is the sender's word, and one entry
                // per claimed id would let it grow the table without bound.
                if self.may_log(if member { src } else { u32::MAX }, true) {
                    tracing::error!(
                        "refused a peer stream from node {src}: it is cluster {theirs}, but this host's data dir {} \
                         belongs to cluster {mine} (one of the two data dirs is foreign)",
                        self.data_dir.display()
                    );
                }
                Err(format!("{FOREIGN_CLUSTER}: this host is in cluster {mine}; the stream is from cluster {theirs}"))
            }
        }
    }

    fn adopt(&self, src: u32, id: &str) {
        // Under the roster lock, so that two peers naming ids at once persist only the first.
        let Ok(mut persisted) = self.roster.lock() else { return };
        let Some(roster) = persisted.as_mut() else { return };
        if self.cluster_id.set(id.to_string()).is_err() {
            return;
        }
        roster.cluster_id = Some(id.to_string());
        match roster.save(&self.data_dir) {
            Ok(()) => {
                tracing::info!("adopted cluster id {id} from node {src} (this data dir's roster predates cluster ids)")
            }
            Err(e) => tracing::error!("adopted cluster id {id} from node {src}, but saving the roster failed: {e:#}"),
        }
    }

    /// Peer `peer` at `address` refused our stream as another cluster's (`message`: its
    /// refusal). Logs it (rate-limited), and once a majority of the other members refused us
    /// within the window, tells `main` to stop (see [`Identity::refused`]).
    pub fn peer_refused(&self, peer: u32, address: &str, message: &str) {
        let theirs = message
            .split("this host is in cluster ")
            .nth(1)
            .and_then(|rest| rest.get(..CLUSTER_ID_HEX_LEN))
            .filter(|id| valid_cluster_id(id))
            .unwrap_or("unknown")
            .to_string();
        let mine = self.cluster_id().unwrap_or("unknown").to_string();
        let others = self.roster.lock().ok().and_then(|r| r.as_ref().map(|r| r.members.len().saturating_sub(1)));
        let others = others.unwrap_or(0);
        let majority = others / 2 + 1;
        let now = Instant::now();
        let refusing = match self.refusals.lock() {
            Ok(mut refusals) => {
                refusals.insert(peer, (now, theirs.clone()));
                refusals.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_WINDOW);
                refusals.len()
            }
            Err(_) => 0,
        };
        if self.may_log(peer, false) {
            tracing::error!(
                "peer {peer} at {address} refused our stream: it is cluster {theirs}, but this host's data dir {} \
                 belongs to cluster {mine} ({refusing} of {others} other members refuse it; at {majority} this \
                 host stops)",
                self.data_dir.display()
            );
        }
        if others > 0 && refusing >= majority {
            let foreign = Foreign::Cluster { data_dir: self.data_dir.clone(), mine, theirs };
            self.stop.send_if_modified(|stop| {
                let first = stop.is_none();
                if first {
                    *stop = Some(foreign);
                }
                first
            });
        }
    }

    /// Resolves once a majority of the other members refused this host as another cluster's.
    pub async fn refused(&self) -> Foreign {
        let mut watch = self.stop.subscribe();
        loop {
            if let Some(foreign) = watch.borrow_and_update().clone() {
                return foreign;
            }
            if watch.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn may_log(&self, peer: u32, inbound: bool) -> bool {
        let Ok(mut logged) = self.logged.lock() else { return false };
        let now = Instant::now();
        match logged.get(&(peer, inbound)) {
            Some(at) if now.duration_since(*at) < LOG_INTERVAL => false,
            _ => {
                logged.insert((peer, inbound), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(cluster_id: Option<&str>) -> Roster {
        Roster {
            me: 1,
            members: (1..=5).map(|id| (id, format!("127.0.0.1:{id}"))).collect(),
            learners: Vec::new(),
            rejoining: false,
            cluster_id: cluster_id.map(str::to_string),
            incarnation: 7,
        }
    }

    const X: &str = "0123456789abcdef0123456789abcdef";
    const Y: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn a_batch_from_another_cluster_is_refused_naming_both_ids_and_an_empty_id_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::new(dir.path());
        identity.start(&roster(Some(X)));
        assert_eq!(identity.check_batch(2, X, true), Ok(()));
        assert_eq!(identity.check_batch(2, "", true), Ok(()), "an older build sends no id");
        let refusal = identity.check_batch(2, Y, true).expect_err("foreign");
        assert!(refusal.starts_with(FOREIGN_CLUSTER) && refusal.contains(X) && refusal.contains(Y), "{refusal}");
        // Network-controlled text is escaped before it reaches a log line or a reply.
        let refusal = identity.check_batch(2, "evil\nline", true).expect_err("foreign");
        assert!(refusal.contains("evil\\nline"), "{refusal}");
    }

    #[test]
    fn a_data_dir_without_a_cluster_id_adopts_the_first_one_a_peer_names_and_persists_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::new(dir.path());
        let old = roster(None);
        old.save(dir.path()).expect("save");
        identity.start(&old);
        assert_eq!(identity.check_batch(2, "not an id", true), Ok(()));
        assert_eq!(identity.cluster_id(), None, "only a well-formed id is adopted");
        assert_eq!(identity.check_batch(9, X, false), Ok(()));
        assert_eq!(identity.cluster_id(), None, "only from a member");
        assert_eq!(identity.check_batch(2, X, true), Ok(()));
        assert_eq!(identity.cluster_id(), Some(X));
        let saved = Roster::load(dir.path()).expect("load").expect("roster");
        assert_eq!(saved.cluster_id.as_deref(), Some(X));
        assert!(identity.check_batch(3, Y, true).is_err(), "once adopted, another id is foreign");
    }

    #[test]
    fn a_host_stops_once_a_majority_of_the_other_members_refuse_it_as_foreign() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::new(dir.path());
        identity.start(&roster(Some(X)));
        let refusal = format!("{FOREIGN_CLUSTER}: this host is in cluster {Y}; the stream is from cluster {X}");
        identity.peer_refused(2, "127.0.0.1:2", &refusal);
        identity.peer_refused(2, "127.0.0.1:2", &refusal);
        identity.peer_refused(3, "127.0.0.1:3", &refusal);
        assert!(identity.stop.borrow().is_none(), "2 of 4 others is not a majority");
        identity.peer_refused(4, "127.0.0.1:4", &refusal);
        let foreign =
            tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(identity.refused());
        let message = foreign.to_string();
        assert!(
            message.contains(&format!("belongs to cluster {X}, but the members of this roster are cluster {Y}"))
                && message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }
}
