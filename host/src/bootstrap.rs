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
//!
//! Identity. The roster file also says whose data dir this is: the cluster id (made here by
//! the coordinator when it first bootstraps the roster, handed out with every registration and
//! adopted with an announced roster), `me`, and the data dir's incarnation. A persisted roster
//! that does not name this host's address for `me` is refused at start; the rest of the
//! checking is `identity`'s.

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
    /// Every member of the configuration the guest starts from (`membership`), by id: the
    /// first start's roster, or the members a joining host was given. Never the current
    /// members: a restart replays the log from this same starting point.
    pub members: Vec<(u32, String)>,
    /// Which of `members` are learners (a joining host is one; the first start has none).
    pub learners: Vec<u32>,
    /// This data dir started without the state its member had (wiped or lost): the guest
    /// rejoins instead of voting from empty state. Never cleared: once the guest has caught up,
    /// its own log says it votes again.
    pub rejoining: bool,
    /// The cluster this data dir belongs to (`None`: written before cluster ids existed, or
    /// registered with a coordinator that knew none; adopted from the first peer that names one).
    pub cluster_id: Option<String>,
    /// Random per data dir, made when it first got its roster (0: not yet; a roster written
    /// before incarnations existed gets one when loaded). A host registers with it, so the
    /// coordinator tells a wiped host (new incarnation) from a retry (same one).
    pub incarnation: u64,
}

impl Roster {
    /// Member ids.
    pub fn ids(&self) -> Vec<u32> {
        self.members.iter().map(|(id, _)| *id).collect()
    }

    /// The roster of a host that joins a running cluster (`membership::join`).
    pub fn joined(me: u32, members: Vec<(u32, String)>, learners: Vec<u32>) -> Roster {
        Roster { me, members, learners, rejoining: false, cluster_id: None, incarnation: rand::random() }
    }

    /// Whether `id` starts as a learner.
    pub fn is_learner(&self, id: u32) -> bool {
        self.learners.contains(&id)
    }

    /// As the guest's first configuration.
    pub fn guest_members(&self) -> Vec<crate::runtime::GuestMember> {
        self.members
            .iter()
            .map(|(id, address)| crate::runtime::GuestMember {
                id: *id,
                address: address.clone(),
                voter: !self.is_learner(*id),
            })
            .collect()
    }

    /// As gRPC members.
    pub fn to_proto(&self) -> Vec<Member> {
        self.members
            .iter()
            .map(|(id, address)| Member { id: *id, address: address.clone(), voter: !self.is_learner(*id) })
            .collect()
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
        // Both absent in a roster written before identities existed.
        let cluster_id = match &value["cluster_id"] {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(id) if crate::identity::valid_cluster_id(id) => Ok(Some(id.clone())),
            _ => Err(()),
        };
        let incarnation = match &value["incarnation"] {
            serde_json::Value::Null => Ok(0),
            serde_json::Value::String(hex) => u64::from_str_radix(hex, 16).map_err(|_| ()),
            _ => Err(()),
        };
        match (me, members, cluster_id, incarnation) {
            (Some(me), Some(members), Ok(cluster_id), Ok(incarnation)) if members.iter().any(|(id, _)| *id == me) => {
                let rejoining = value["rejoining"].as_bool().unwrap_or(false);
                // Absent in a roster written before membership changes: no learners.
                let learners = value["learners"]
                    .as_array()
                    .map(|ids| ids.iter().filter_map(|id| u32::try_from(id.as_u64()?).ok()).collect())
                    .unwrap_or_default();
                Ok(Some(Roster { me, members, learners, rejoining, cluster_id, incarnation }))
            }
            _ => bail!("{} is not a valid roster (delete it to register again)", path.display()),
        }
    }

    /// Refuses a roster whose entry for `me` is not `my_address`: the data dir was copied to
    /// another host or port, and would vote there with another member's memory.
    pub fn check_address(&self, data_dir: &Path, my_address: &str) -> Result<(), crate::identity::Foreign> {
        let recorded = self.members.iter().find(|(id, _)| *id == self.me).map(|(_, a)| a.as_str()).unwrap_or("");
        if recorded == my_address {
            return Ok(());
        }
        Err(crate::identity::Foreign::Address {
            data_dir: data_dir.to_path_buf(),
            me: self.me,
            recorded: recorded.to_string(),
            my_address: my_address.to_string(),
        })
    }

    /// Writes the roster atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let members: Vec<_> = self.members.iter().map(|(id, a)| json!({"id": id, "address": a})).collect();
        let text = serde_json::to_string_pretty(&json!({
            "cluster_id": self.cluster_id,
            "incarnation": format!("{:016x}", self.incarnation),
            "me": self.me,
            "members": members,
            "learners": self.learners,
            "rejoining": self.rejoining,
        }))?;
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
    /// The cluster id handed out with every registration: made when this coordinator first
    /// bootstraps the roster, read from the persisted roster, or adopted with an announced one.
    pub cluster_id: Option<String>,
    /// The backup this host starts from (`--restore`: the file's id), empty if none. A first
    /// start's members must all name the same one (see `register`).
    pub restored_from: String,
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
    /// none. Adopted, with the announcer's cluster id (`None`: it knows none), when this host's
    /// own address is in it; ignored once a roster is known.
    pub fn announce(
        &mut self,
        from: u32,
        members: Vec<(u32, String)>,
        cluster_id: Option<String>,
    ) -> Result<RegisterResponse, RegisterError> {
        if !self.settled {
            return Err(RegisterError::NotYet);
        }
        if self.replicas == 0 {
            return Err(RegisterError::Refused("this host is not the coordinator".into()));
        }
        let mut ids: Vec<u32> = members.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut addresses: Vec<&str> = members.iter().map(|(_, address)| address.as_str()).collect();
        addresses.sort_unstable();
        addresses.dedup();
        // One address per member (else one member certificate would speak for two ids), and as
        // many members as this cluster has (else an announcement could shrink it).
        let valid = ids.len() == members.len()
            && addresses.len() == members.len()
            && members.len() as u32 == self.replicas
            && members.iter().any(|(id, _)| *id == from);
        let mine = members.iter().find(|(_, address)| *address == self.my_address).map(|(id, _)| *id);
        match mine {
            Some(me) if valid && self.adopted.is_none() && (self.members.len() as u32) < self.replicas => {
                tracing::warn!(
                    "node {from} announces a roster of {} members that names this host as node {me}: \
                     this coordinator lost its state and rejoins",
                    members.len()
                );
                // The id this coordinator made when it started without a roster is not the
                // cluster's: take the announcer's, or none (learned later from a peer).
                self.cluster_id = cluster_id;
                self.adopted = Some(Roster {
                    me,
                    members: members.clone(),
                    learners: Vec::new(),
                    rejoining: true,
                    cluster_id: self.cluster_id.clone(),
                    incarnation: 0,
                });
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
            members: members.iter().map(|(id, a)| Member { id: *id, address: a.clone(), voter: true }).collect(),
            replicas: members.len() as u32,
            rejoin: false,
            cluster_id: self.cluster_id.clone().unwrap_or_default(),
        })
    }

    /// Registers `address` (idempotent) and answers with the roster so far. While the roster
    /// is incomplete (a first start), the registering host must start from the same backup as
    /// this coordinator (`restored_from`, both empty without `--restore`): members restored
    /// from different backups, or fresh ones next to restored ones, are each at a slot of
    /// another history, and catching up from one another would lose acknowledged writes. A
    /// host registering into a complete roster (it lost its state and rejoins) catches up from
    /// its peers whatever it was started with.
    pub fn register(
        &mut self,
        address: &str,
        incarnation: u64,
        restored_from: &str,
    ) -> Result<RegisterResponse, RegisterError> {
        if !self.settled {
            return Err(RegisterError::NotYet);
        }
        if self.replicas == 0 {
            return Err(RegisterError::Refused("this host is not the coordinator".into()));
        }
        let complete = self.members.len() as u32 >= self.replicas;
        if !complete && restored_from != self.restored_from {
            let named = |id: &str| if id.is_empty() { "no backup".to_string() } else { format!("the backup {id}") };
            return Err(RegisterError::Refused(format!(
                "this cluster starts from {}, and {address} from {}: start every member of a restore with the same --restore FILE",
                named(&self.restored_from),
                named(restored_from)
            )));
        }
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
            members: self.members.iter().map(|(id, a)| Member { id: *id, address: a.clone(), voter: true }).collect(),
            replicas: self.replicas,
            rejoin,
            cluster_id: self.cluster_id.clone().unwrap_or_default(),
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
/// identity and all, before this returns. A persisted roster that names another address for
/// this member is refused (`identity::Foreign::Address`); one written before identities existed
/// gets an incarnation, and at the coordinator a cluster id, saved before this returns.
pub async fn roster(
    data_dir: &Path,
    my_address: &str,
    coordinator_address: Option<&str>,
    replicas: u32,
    registry: &SharedRegistry,
    dialer: &waxos_proto::tls::Dialer,
) -> anyhow::Result<(Roster, RosterSource)> {
    if let Some(mut roster) = Roster::load(data_dir)? {
        tracing::info!("roster from {}: node {} of {:?}", data_dir.display(), roster.me, roster.ids());
        roster.check_address(data_dir, my_address)?;
        // Written by a build before identities (every roster this build writes has an
        // incarnation). One it wrote without a cluster id (registered with an older
        // coordinator, or adopted from a member that knew none) waits to learn the cluster's.
        let old_format = roster.incarnation == 0;
        let mut upgraded = false;
        if old_format {
            roster.incarnation = crate::identity::new_incarnation();
            upgraded = true;
        }
        if old_format && roster.cluster_id.is_none() && coordinator_address.is_none() {
            // A cluster bootstrapped before cluster ids: its coordinator makes one now, and the
            // other members adopt it from its envelopes.
            let id = crate::identity::new_cluster_id();
            tracing::info!("the roster predates cluster ids: this coordinator names the cluster {id}");
            roster.cluster_id = Some(id);
            upgraded = true;
        }
        if upgraded {
            roster.save(data_dir)?;
        }
        if let Ok(mut reg) = registry.lock() {
            reg.members = roster.members.clone();
            reg.replicas = roster.members.len() as u32;
            reg.my_address = my_address.to_string();
            reg.cluster_id = roster.cluster_id.clone();
            reg.settled = true;
        }
        return Ok((roster, RosterSource::Persisted));
    }
    let incarnation = crate::identity::new_incarnation();
    let mut roster = match coordinator_address {
        None => {
            {
                let mut reg = registry.lock().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
                reg.replicas = replicas;
                reg.my_address = my_address.to_string();
                // The cluster is named here, once; an announced roster replaces it with its own.
                reg.cluster_id = Some(crate::identity::new_cluster_id());
                reg.settled = true;
                let restored_from = reg.restored_from.clone();
                reg.register(my_address, incarnation, &restored_from).map_err(|e| anyhow::anyhow!("{e}"))?;
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
                        break Roster {
                            me: 1,
                            members: reg.members.clone(),
                            learners: Vec::new(),
                            rejoining: false,
                            cluster_id: reg.cluster_id.clone(),
                            incarnation,
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(coordinator) => {
            if let Ok(mut reg) = registry.lock() {
                reg.settled = true;
            }
            let restored_from = registry.lock().map(|reg| reg.restored_from.clone()).unwrap_or_default();
            register_with(dialer, coordinator, my_address, replicas, incarnation, &restored_from).await?
        }
    };
    roster.incarnation = incarnation;
    roster.save(data_dir)?;
    tracing::info!("roster complete: node {} of {:?}", roster.me, roster.ids());
    Ok((roster, RosterSource::Registered))
}

/// Announces `roster` to the coordinator at `address`, which refused our peer stream for want
/// of a roster (it lost its data dir). Best effort: the stream's next refusal tries again.
pub async fn announce_roster(
    dialer: &waxos_proto::tls::Dialer,
    address: &str,
    roster: &Roster,
    my_address: &str,
    cluster_id: Option<&str>,
) {
    let request = RegisterRequest {
        address: my_address.to_string(),
        replicas: roster.members.len() as u32,
        incarnation: 0,
        member_id: roster.me,
        members: roster.to_proto(),
        cluster_id: cluster_id.unwrap_or_default().to_string(),
        restored_from: String::new(),
    };
    let answer = async {
        let expect = crate::member_dial::Expect::Member(address.to_string());
        let channel = crate::member_dial::connect(dialer, address, expect, Duration::from_secs(2)).await?;
        anyhow::Ok(PeerClient::new(channel).register(request).await?.into_inner())
    }
    .await;
    match answer {
        Ok(_) => tracing::info!("announced the roster to {address}, which had none"),
        Err(e) => tracing::debug!("announcing the roster to {address} failed: {e}"),
    }
}

async fn register_with(
    dialer: &waxos_proto::tls::Dialer,
    coordinator: &str,
    my_address: &str,
    replicas: u32,
    incarnation: u64,
    restored_from: &str,
) -> anyhow::Result<Roster> {
    let mut logged_wait = false;
    loop {
        let answer = async {
            let expect = crate::member_dial::Expect::AnyMember;
            let channel = crate::member_dial::connect(dialer, coordinator, expect, Duration::from_secs(2)).await?;
            let mut client = PeerClient::new(channel);
            let request = RegisterRequest {
                address: my_address.to_string(),
                replicas,
                incarnation,
                member_id: 0,
                members: Vec::new(),
                cluster_id: String::new(),
                restored_from: restored_from.to_string(),
            };
            anyhow::Ok(client.register(request).await?.into_inner())
        }
        .await;
        match answer {
            Ok(r) if r.members.len() as u32 >= r.replicas && r.replicas > 0 => {
                let members = r.members.into_iter().map(|m| (m.id, m.address)).collect();
                let cluster_id = match r.cluster_id.as_str() {
                    "" => None,
                    id if crate::identity::valid_cluster_id(id) => Some(id.to_string()),
                    id => {
                        let shown: String = id.escape_debug().take(64).collect();
                        tracing::warn!(
                            "coordinator {coordinator} names the cluster {shown}, not a cluster id: ignored"
                        );
                        None
                    }
                };
                return Ok(Roster {
                    me: r.assigned_id,
                    members,
                    learners: Vec::new(),
                    rejoining: r.rejoin,
                    cluster_id,
                    incarnation,
                });
            }
            Ok(r) => {
                if !logged_wait {
                    tracing::info!("registered with {coordinator} as node {}; waiting for the roster", r.assigned_id);
                    logged_wait = true;
                }
            }
            Err(e) => {
                if let Some(status) = e.downcast_ref::<tonic::Status>() {
                    // Neither a refusal nor a certificate the coordinator does not accept mends itself.
                    if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied) {
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
        assert_eq!(registry.register("127.0.0.1:2", 7, "").err(), Some(RegisterError::NotYet));
        registry.settled = true;
        assert!(matches!(registry.register("127.0.0.1:2", 7, ""), Err(RegisterError::Refused(_))));
        registry.replicas = 2;
        let first = registry.register("127.0.0.1:2", 7, "").expect("registers");
        let again = registry.register("127.0.0.1:2", 7, "").expect("idempotent");
        assert_eq!((first.assigned_id, again.assigned_id), (1, 1));
        assert_eq!(registry.register("127.0.0.1:3", 8, "").expect("second").assigned_id, 2);
        assert!(matches!(registry.register("127.0.0.1:4", 9, ""), Err(RegisterError::Refused(_))));
    }

    fn members() -> Vec<(u32, String)> {
        (1..=3).map(|id| (id, format!("127.0.0.1:{id}"))).collect()
    }

    const CLUSTER: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn a_coordinator_without_a_roster_adopts_one_announced_by_a_member_and_rejoins() {
        let mut registry = Registry {
            replicas: 3,
            settled: true,
            my_address: "127.0.0.1:1".into(),
            cluster_id: Some(crate::identity::new_cluster_id()),
            ..Registry::default()
        };
        registry.register("127.0.0.1:1", 5, "").expect("registers itself");
        assert!(
            matches!(registry.announce(2, vec![(2, "127.0.0.1:2".into())], None), Err(RegisterError::Refused(_))),
            "a roster that does not name this host is refused"
        );
        assert!(
            matches!(registry.announce(9, members(), None), Err(RegisterError::Refused(_))),
            "the announcer must be in the roster it announces"
        );
        let answer = registry.announce(2, members(), Some(CLUSTER.into())).expect("adopted");
        let adopted = Roster {
            me: 1,
            members: members(),
            learners: Vec::new(),
            rejoining: true,
            cluster_id: Some(CLUSTER.into()),
            incarnation: 0,
        };
        assert_eq!(registry.adopted, Some(adopted));
        assert_eq!(answer.cluster_id, CLUSTER, "the cluster's id, not the one this coordinator made at start");
        // A host registering again (wiped) is handed the adopted cluster id.
        assert_eq!(registry.register("127.0.0.1:3", 9, "").expect("registers").cluster_id, CLUSTER);
    }

    #[test]
    fn the_rejoin_flag_and_the_identity_are_saved_with_the_roster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roster = Roster {
            me: 2,
            members: members(),
            learners: Vec::new(),
            rejoining: true,
            cluster_id: Some(CLUSTER.into()),
            incarnation: u64::MAX,
        };
        roster.save(dir.path()).expect("save");
        assert_eq!(Roster::load(dir.path()).expect("load"), Some(roster));
    }

    /// A roster written by an older build: no rejoin flag, no cluster id, no incarnation.
    fn write_old_roster(dir: &Path) {
        let old = r#"{"me": 2, "members": [{"id": 1, "address": "127.0.0.1:1"}, {"id": 2, "address": "127.0.0.1:2"}]}"#;
        std::fs::write(dir.join("roster.json"), old).expect("write");
    }

    #[test]
    fn an_old_roster_loads_with_an_unknown_cluster_id_and_no_incarnation() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old_roster(dir.path());
        let roster = Roster::load(dir.path()).expect("load").expect("roster");
        assert_eq!((roster.rejoining, roster.cluster_id, roster.incarnation), (false, None, 0));
        // But a cluster id that is there must be one.
        let bad = r#"{"me": 1, "members": [{"id": 1, "address": "a:1"}], "cluster_id": "x"}"#;
        std::fs::write(dir.path().join("roster.json"), bad).expect("write");
        assert!(Roster::load(dir.path()).is_err());
    }

    #[tokio::test]
    async fn an_old_roster_gets_an_incarnation_at_start_and_its_coordinator_names_the_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old_roster(dir.path());
        let registry = SharedRegistry::default();
        let (member, source) =
            roster(dir.path(), "127.0.0.1:2", Some("127.0.0.1:1"), 2, &registry, &waxos_proto::tls::Dialer::Insecure)
                .await
                .expect("starts");
        assert_eq!(source, RosterSource::Persisted);
        assert_eq!(member.cluster_id, None, "a member learns the id from its peers");
        assert_ne!(member.incarnation, 0);
        assert_eq!(Roster::load(dir.path()).expect("load"), Some(member.clone()), "persisted");
        let (again, _) =
            roster(dir.path(), "127.0.0.1:2", Some("127.0.0.1:1"), 2, &registry, &waxos_proto::tls::Dialer::Insecure)
                .await
                .expect("starts");
        assert_eq!(again.incarnation, member.incarnation, "made once per data dir");

        // At the coordinator, a roster this build wrote without an id (adopted from a member
        // that knew none) waits to learn the cluster's: a new one would split the cluster.
        let (adopted, _) = roster(dir.path(), "127.0.0.1:2", None, 2, &registry, &waxos_proto::tls::Dialer::Insecure)
            .await
            .expect("starts");
        assert_eq!(adopted.cluster_id, None);

        // An old roster at the coordinator (port = coordinator port): it names the cluster.
        write_old_roster(dir.path());
        let (coordinator, _) =
            roster(dir.path(), "127.0.0.1:2", None, 2, &registry, &waxos_proto::tls::Dialer::Insecure)
                .await
                .expect("starts");
        let id = coordinator.cluster_id.clone().expect("named");
        assert!(crate::identity::valid_cluster_id(&id));
        assert_eq!(Roster::load(dir.path()).expect("load").and_then(|r| r.cluster_id), Some(id.clone()));
        assert_eq!(registry.lock().expect("lock").cluster_id, Some(id), "handed out to registering hosts");
    }

    #[tokio::test]
    async fn a_data_dir_that_names_another_address_for_this_member_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        Roster {
            me: 2,
            members: members(),
            learners: Vec::new(),
            rejoining: false,
            cluster_id: Some(CLUSTER.into()),
            incarnation: 3,
        }
        .save(dir.path())
        .expect("save");
        let registry = SharedRegistry::default();
        let error =
            roster(dir.path(), "127.0.0.1:9", Some("127.0.0.1:1"), 3, &registry, &waxos_proto::tls::Dialer::Insecure)
                .await
                .expect_err("a data dir copied to another port");
        let foreign = error.downcast_ref::<crate::identity::Foreign>().expect("an identity refusal (exit 78)");
        let message = foreign.to_string();
        assert!(message.contains("node 2 at 127.0.0.1:2") && message.contains("127.0.0.1:9"), "{message}");
        assert!(roster(
            dir.path(),
            "127.0.0.1:2",
            Some("127.0.0.1:1"),
            3,
            &registry,
            &waxos_proto::tls::Dialer::Insecure
        )
        .await
        .is_ok());
    }
    #[test]
    fn a_first_start_takes_only_members_restored_from_the_coordinators_backup() {
        let mut registry =
            Registry { replicas: 3, settled: true, restored_from: "backup A".into(), ..Registry::default() };
        registry.register("127.0.0.1:1", 5, "backup A").expect("the coordinator itself");
        let fresh = registry.register("127.0.0.1:2", 6, "");
        assert!(matches!(&fresh, Err(RegisterError::Refused(why)) if why.contains("same --restore")), "{fresh:?}");
        assert!(matches!(registry.register("127.0.0.1:2", 6, "backup B"), Err(RegisterError::Refused(_))));
        registry.register("127.0.0.1:2", 6, "backup A").expect("the same backup");
        registry.register("127.0.0.1:3", 7, "backup A").expect("the same backup");
        // Complete: a member that lost its state rejoins whatever it was started with.
        assert!(registry.register("127.0.0.1:3", 8, "").expect("rejoins").rejoin);
    }
}
