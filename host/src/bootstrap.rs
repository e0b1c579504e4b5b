//! Start-up membership (DESIGN §8): who the replicas are and which one this host is.
//!
//! The host whose listen port is the coordinator port keeps the roster: it is node 1, and it
//! hands out ids to hosts that register, in order, until `replicas` are known. The others
//! register and poll until the roster is complete. Every host then persists the roster in its
//! data dir, so a restarted host needs no coordinator. Registration is idempotent by address,
//! so a host restarted with a wiped disk gets its old id back. After start-up the coordinator
//! is a replica like any other.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use waxos_proto::peer_client::PeerClient;
use waxos_proto::{Member, RegisterRequest, RegisterResponse};

/// The replicas of the cluster and this host's place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    /// This host's node id.
    pub me: u32,
    /// Every member, by id.
    pub members: Vec<(u32, String)>,
}

impl Roster {
    /// Member ids.
    pub fn ids(&self) -> Vec<u32> {
        self.members.iter().map(|(id, _)| *id).collect()
    }

    /// As gRPC members.
    pub fn to_proto(&self) -> Vec<Member> {
        self.members.iter().map(|(id, address)| Member { id: *id, address: address.clone() }).collect()
    }

    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("roster.json")
    }

    /// Reads a persisted roster, if there is one.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Roster>> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let me = value["me"].as_u64().and_then(|v| u32::try_from(v).ok());
        let members = value["members"].as_array().map(|ms| {
            ms.iter()
                .filter_map(|m| Some((u32::try_from(m["id"].as_u64()?).ok()?, m["address"].as_str()?.to_string())))
                .collect::<Vec<_>>()
        });
        match (me, members) {
            (Some(me), Some(members)) if members.iter().any(|(id, _)| *id == me) => Ok(Some(Roster { me, members })),
            _ => bail!("{} is not a valid roster (delete it to register again)", path.display()),
        }
    }

    /// Writes the roster atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let members: Vec<_> = self.members.iter().map(|(id, a)| json!({"id": id, "address": a})).collect();
        let text = serde_json::to_string_pretty(&json!({"me": self.me, "members": members}))?;
        crate::storage::write_atomically(&Self::path(data_dir), text.as_bytes())
    }
}

/// The coordinator's registration book, shared with the `Peer.Register` handler.
#[derive(Debug, Default)]
pub struct Registry {
    /// Members so far, in id order.
    pub members: Vec<(u32, String)>,
    /// The incarnation each member registered with (0: unknown, e.g. after a restart).
    pub incarnations: std::collections::HashMap<String, u64>,
    /// How many the cluster has (0: this host is not the coordinator).
    pub replicas: u32,
    /// Whether this host knows yet if it coordinates. The server listens before the roster is
    /// read, so a registration can arrive first; it is told to retry rather than refused.
    pub settled: bool,
}

/// Why a registration was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// This host is still starting; ask again shortly.
    NotYet,
    /// A permanent refusal: not the coordinator, or the roster is full.
    Refused(String),
}

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterError::NotYet => write!(f, "this host is still starting; retry"),
            RegisterError::Refused(reason) => write!(f, "{reason}"),
        }
    }
}

/// Shared registry.
pub type SharedRegistry = Arc<Mutex<Registry>>;

impl Registry {
    /// Registers `address` (idempotent) and answers with the roster so far.
    pub fn register(&mut self, address: &str, incarnation: u64) -> Result<RegisterResponse, RegisterError> {
        if !self.settled {
            return Err(RegisterError::NotYet);
        }
        if self.replicas == 0 {
            return Err(RegisterError::Refused("this host is not the coordinator".into()));
        }
        let complete = self.members.len() as u32 >= self.replicas;
        let known = self.incarnations.insert(address.to_string(), incarnation);
        let mut rejoin = false;
        let id = match self.members.iter().find(|(_, a)| a == address) {
            Some((id, _)) => {
                rejoin = complete && known != Some(incarnation);
                if rejoin {
                    tracing::warn!(
                        "{address} (node {id}) registers again with a new incarnation: it lost its state and rejoins"
                    );
                }
                *id
            }
            None => {
                if self.members.len() as u32 >= self.replicas {
                    return Err(RegisterError::Refused(format!(
                        "the roster is full ({} replicas); {address} is not a member",
                        self.replicas
                    )));
                }
                let id = self.members.len() as u32 + 1;
                self.members.push((id, address.to_string()));
                tracing::info!("registered {address} as node {id} ({}/{})", self.members.len(), self.replicas);
                id
            }
        };
        Ok(RegisterResponse {
            assigned_id: id,
            members: self.members.iter().map(|(id, a)| Member { id: *id, address: a.clone() }).collect(),
            replicas: self.replicas,
            rejoin,
        })
    }
}

/// Finds this host's roster: persisted, or made by (or obtained from) the coordinator. The flag
/// is true when this host was a member already and lost its state (it rejoins).
pub async fn roster(
    data_dir: &Path,
    my_address: &str,
    coordinator_address: Option<&str>,
    replicas: u32,
    registry: &SharedRegistry,
) -> anyhow::Result<(Roster, bool)> {
    if let Some(roster) = Roster::load(data_dir)? {
        tracing::info!("roster from {}: node {} of {:?}", data_dir.display(), roster.me, roster.ids());
        if let Ok(mut reg) = registry.lock() {
            reg.members = roster.members.clone();
            reg.replicas = roster.members.len() as u32;
            reg.settled = true;
        }
        return Ok((roster, false));
    }
    let (roster, rejoin) = match coordinator_address {
        None => {
            {
                let mut reg = registry.lock().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
                reg.replicas = replicas;
                reg.settled = true;
                reg.register(my_address, rand::random()).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            tracing::info!("coordinating: waiting for {replicas} replicas to register");
            loop {
                {
                    let reg = registry.lock().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
                    if reg.members.len() as u32 >= replicas {
                        break (Roster { me: 1, members: reg.members.clone() }, false);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(coordinator) => {
            if let Ok(mut reg) = registry.lock() {
                reg.settled = true;
            }
            register_with(coordinator, my_address, replicas).await?
        }
    };
    roster.save(data_dir)?;
    tracing::info!("roster complete: node {} of {:?}", roster.me, roster.ids());
    Ok((roster, rejoin))
}

async fn register_with(coordinator: &str, my_address: &str, replicas: u32) -> anyhow::Result<(Roster, bool)> {
    let mut logged_wait = false;
    let incarnation: u64 = rand::random();
    loop {
        let answer = async {
            let channel = crate::net::endpoint(coordinator, Duration::from_secs(2))?.connect().await?;
            let mut client = PeerClient::new(channel);
            let request = RegisterRequest { address: my_address.to_string(), replicas, incarnation };
            anyhow::Ok(client.register(request).await?.into_inner())
        }
        .await;
        match answer {
            Ok(r) if r.members.len() as u32 >= r.replicas && r.replicas > 0 => {
                let members = r.members.into_iter().map(|m| (m.id, m.address)).collect();
                return Ok((Roster { me: r.assigned_id, members }, r.rejoin));
            }
            Ok(r) => {
                if !logged_wait {
                    tracing::info!("registered with {coordinator} as node {}; waiting for the roster", r.assigned_id);
                    logged_wait = true;
                }
            }
            Err(e) => {
                if let Some(status) = e.downcast_ref::<tonic::Status>() {
                    if status.code() == tonic::Code::FailedPrecondition {
                        bail!("coordinator {coordinator} refused registration: {}", status.message());
                    }
                }
                tracing::debug!("coordinator {coordinator} not reachable yet: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_before_the_role_is_known_is_told_to_retry_not_refused() {
        let mut registry = Registry::default();
        assert_eq!(registry.register("127.0.0.1:2", 7).err(), Some(RegisterError::NotYet));
        registry.settled = true;
        assert!(matches!(registry.register("127.0.0.1:2", 7), Err(RegisterError::Refused(_))));
        registry.replicas = 2;
        let first = registry.register("127.0.0.1:2", 7).expect("registers");
        let again = registry.register("127.0.0.1:2", 7).expect("idempotent");
        assert_eq!((first.assigned_id, again.assigned_id), (1, 1));
        assert_eq!(registry.register("127.0.0.1:3", 8).expect("second").assigned_id, 2);
        assert!(matches!(registry.register("127.0.0.1:4", 9), Err(RegisterError::Refused(_))));
    }
}
