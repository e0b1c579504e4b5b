//! Start-up membership (DESIGN §8): who the replicas are and which one this host is.
//!
//! The host whose listen port is the coordinator port keeps the roster: it is node 1, and it
//! hands out ids to hosts that register, in order, until `replicas` are known. The others
//! register and poll until the roster is complete. Every host then persists the roster in its
//! data dir, so a restarted host needs no coordinator. Registration is idempotent by address,
//! so a host restarted with a wiped disk gets its old id back. After start-up the coordinator
//! is a replica like any other.
//!
//! Lost state. A host that lost its state must not vote as if it remembered its promises: it
//! *rejoins* (its guest stays silent as an acceptor until it has caught up; see the guest's
//! rejoin rule). The flag is part of the roster file, written in the same atomic rename as the
//! roster itself, so a crash between the two cannot bring the host back as a voter with no state.
//! Three ways in: the coordinator says so (a registration with a new incarnation); the data dir
//! holds a roster but neither WAL nor snapshot (`main` checks); or this host is the coordinator
//! and lost everything — it then learns the roster from any member, which *announces* its
//! roster when its peer stream to the coordinator is refused for want of one.

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
    /// This data dir started without the state its member had (wiped or lost): the guest
    /// rejoins instead of voting from empty state. Never cleared: once the guest has caught up,
    /// its own log says it votes again.
    pub rejoining: bool,
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
            (Some(me), Some(members)) if members.iter().any(|(id, _)| *id == me) => {
                let rejoining = value["rejoining"].as_bool().unwrap_or(false);
                Ok(Some(Roster { me, members, rejoining }))
            }
            _ => bail!("{} is not a valid roster (delete it to register again)", path.display()),
        }
    }

    /// Writes the roster atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let members: Vec<_> = self.members.iter().map(|(id, a)| json!({"id": id, "address": a})).collect();
        let text =
            serde_json::to_string_pretty(&json!({"me": self.me, "members": members, "rejoining": self.rejoining}))?;
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
    /// This host's own address (set when it coordinates).
    pub my_address: String,
    /// A roster announced by an existing member while this coordinator had none (it lost its
    /// data dir): the coordinator adopts it and rejoins.
    pub adopted: Option<Roster>,
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
    /// An existing member (`from`) announces the cluster's roster to a coordinator that has
    /// none. Adopted when this host's own address is in it; ignored once a roster is known.
    pub fn announce(&mut self, from: u32, members: Vec<(u32, String)>) -> Result<RegisterResponse, RegisterError> {
        if !self.settled {
            return Err(RegisterError::NotYet);
        }
        if self.replicas == 0 {
            return Err(RegisterError::Refused("this host is not the coordinator".into()));
        }
        let mut ids: Vec<u32> = members.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let valid = ids.len() == members.len() && members.iter().any(|(id, _)| *id == from);
        let mine = members.iter().find(|(_, address)| *address == self.my_address).map(|(id, _)| *id);
        match mine {
            Some(me) if valid && self.adopted.is_none() && (self.members.len() as u32) < self.replicas => {
                tracing::warn!(
                    "node {from} announces a roster of {} members that names this host as node {me}: \
                     this coordinator lost its state and rejoins",
                    members.len()
                );
                self.adopted = Some(Roster { me, members: members.clone(), rejoining: true });
            }
            Some(_) if valid => {}
            _ => {
                return Err(RegisterError::Refused(format!(
                    "the announced roster is not valid or does not name this host ({})",
                    self.my_address
                )))
            }
        }
        Ok(RegisterResponse {
            assigned_id: from,
            members: members.iter().map(|(id, a)| Member { id: *id, address: a.clone() }).collect(),
            replicas: members.len() as u32,
            rejoin: false,
        })
    }

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

/// Where a roster came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RosterSource {
    /// Read from the data dir (a restart).
    Persisted,
    /// Made now, at registration (or adopted from a member's announcement).
    Registered,
}

/// Finds this host's roster: persisted, or made by (or obtained from) the coordinator, or, for a
/// coordinator that lost its state, announced by a member. `Roster::rejoining` says whether this
/// host was a member already and lost its state (it rejoins); a new roster is saved, flag and
/// all, before this returns.
pub async fn roster(
    data_dir: &Path,
    my_address: &str,
    coordinator_address: Option<&str>,
    replicas: u32,
    registry: &SharedRegistry,
) -> anyhow::Result<(Roster, RosterSource)> {
    if let Some(roster) = Roster::load(data_dir)? {
        tracing::info!("roster from {}: node {} of {:?}", data_dir.display(), roster.me, roster.ids());
        if let Ok(mut reg) = registry.lock() {
            reg.members = roster.members.clone();
            reg.replicas = roster.members.len() as u32;
            reg.my_address = my_address.to_string();
            reg.settled = true;
        }
        return Ok((roster, RosterSource::Persisted));
    }
    let roster = match coordinator_address {
        None => {
            {
                let mut reg = registry.lock().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
                reg.replicas = replicas;
                reg.my_address = my_address.to_string();
                reg.settled = true;
                reg.register(my_address, rand::random()).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            tracing::info!("coordinating: waiting for {replicas} replicas to register");
            loop {
                {
                    let mut reg = registry.lock().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
                    if let Some(adopted) = reg.adopted.clone() {
                        reg.members = adopted.members.clone();
                        reg.replicas = adopted.members.len() as u32;
                        break adopted;
                    }
                    if reg.members.len() as u32 >= replicas {
                        break Roster { me: 1, members: reg.members.clone(), rejoining: false };
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
    Ok((roster, RosterSource::Registered))
}

/// Announces `roster` to the coordinator at `address`, which refused our peer stream for want
/// of a roster (it lost its data dir). Best effort: the stream's next refusal tries again.
pub async fn announce_roster(address: &str, roster: &Roster, my_address: &str) {
    let request = RegisterRequest {
        address: my_address.to_string(),
        replicas: roster.members.len() as u32,
        incarnation: 0,
        member_id: roster.me,
        members: roster.to_proto(),
    };
    let answer = async {
        let channel = crate::net::endpoint(address, Duration::from_secs(2))?.connect().await?;
        anyhow::Ok(PeerClient::new(channel).register(request).await?.into_inner())
    }
    .await;
    match answer {
        Ok(_) => tracing::info!("announced the roster to {address}, which had none"),
        Err(e) => tracing::debug!("announcing the roster to {address} failed: {e}"),
    }
}

async fn register_with(coordinator: &str, my_address: &str, replicas: u32) -> anyhow::Result<Roster> {
    let mut logged_wait = false;
    let incarnation: u64 = rand::random();
    loop {
        let answer = async {
            let channel = crate::net::endpoint(coordinator, Duration::from_secs(2))?.connect().await?;
            let mut client = PeerClient::new(channel);
            let request = RegisterRequest {
                address: my_address.to_string(),
                replicas,
                incarnation,
                member_id: 0,
                members: Vec::new(),
            };
            anyhow::Ok(client.register(request).await?.into_inner())
        }
        .await;
        match answer {
            Ok(r) if r.members.len() as u32 >= r.replicas && r.replicas > 0 => {
                let members = r.members.into_iter().map(|m| (m.id, m.address)).collect();
                return Ok(Roster { me: r.assigned_id, members, rejoining: r.rejoin });
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

    fn members() -> Vec<(u32, String)> {
        (1..=3).map(|id| (id, format!("127.0.0.1:{id}"))).collect()
    }

    #[test]
    fn a_coordinator_without_a_roster_adopts_one_announced_by_a_member_and_rejoins() {
        let mut registry =
            Registry { replicas: 3, settled: true, my_address: "127.0.0.1:1".into(), ..Registry::default() };
        registry.register("127.0.0.1:1", 5).expect("registers itself");
        assert!(
            matches!(registry.announce(2, vec![(2, "127.0.0.1:2".into())]), Err(RegisterError::Refused(_))),
            "a roster that does not name this host is refused"
        );
        assert!(
            matches!(registry.announce(9, members()), Err(RegisterError::Refused(_))),
            "the announcer must be in the roster it announces"
        );
        registry.announce(2, members()).expect("adopted");
        assert_eq!(registry.adopted, Some(Roster { me: 1, members: members(), rejoining: true }));
    }

    #[test]
    fn the_rejoin_flag_is_saved_with_the_roster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roster = Roster { me: 2, members: members(), rejoining: true };
        roster.save(dir.path()).expect("save");
        assert_eq!(Roster::load(dir.path()).expect("load"), Some(roster));
        // A roster written by an older build (no flag) loads as not rejoining.
        std::fs::write(dir.path().join("roster.json"), r#"{"me": 1, "members": [{"id": 1, "address": "a:1"}]}"#)
            .expect("write");
        assert_eq!(Roster::load(dir.path()).expect("load").map(|r| r.rejoining), Some(false));
    }
}
