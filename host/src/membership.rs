//! Membership on the host. The guest decides who the members are (a change goes through the log:
//! the guest's `membership`); this module keeps what the guest last said (its `members` effect)
//! where the host's parts need it: the peer transport dials those members, the peer service
//! accepts each at the address its certificate must name, and `Admin` reports them and submits
//! operators' changes. It also holds `--join`: a new host asks a member for the members, finds
//! the id an operator's `member add` gave its address, and writes its roster from that.
//!
//! The roster file keeps the configuration the guest *started* from (the first start's roster,
//! or the members a joining host was given), never the current one: a restart replays the log
//! from that same starting point, so every change applies again exactly as it did.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use tonic::Status;
use waxos_proto::admin_client::AdminClient;
use waxos_proto::change_members_request::Change;
use waxos_proto::tls::Dialer;
use waxos_proto::{ChangeMembersRequest, StatusRequest};

use crate::bootstrap::Roster;
use crate::peer::MemberAddresses;
use crate::runtime::{Command, GuestMember, MemberChange};

/// What the host knows of the members: this host's id, and every member with its address and
/// whether it votes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    /// This host's node id.
    pub me: u32,
    /// `(id, address, voter)`, in id order.
    pub members: Vec<(u32, String, bool)>,
}

/// The members as the host knows them, shared (empty until the roster is known).
#[derive(Clone, Debug, Default)]
pub struct Members(Arc<RwLock<Option<Known>>>);

impl Members {
    /// The roster is known: its members, until the guest says otherwise.
    pub fn start(&self, roster: &Roster) {
        let members =
            roster.members.iter().map(|(id, address)| (*id, address.clone(), !roster.is_learner(*id))).collect();
        self.set(Known { me: roster.me, members });
    }

    /// The guest announced its members. Returns what changed, for the log (None: nothing).
    pub fn update(&self, from_guest: &[GuestMember]) -> Option<Known> {
        let me = self.get()?.me;
        let mut members: Vec<(u32, String, bool)> =
            from_guest.iter().map(|m| (m.id, m.address.clone(), m.voter)).collect();
        members.sort();
        let known = Known { me, members };
        if self.get().as_ref() == Some(&known) {
            return None;
        }
        self.set(known.clone());
        Some(known)
    }

    fn set(&self, known: Known) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(known);
        }
    }

    /// What is known now (None before the roster is).
    pub fn get(&self) -> Option<Known> {
        self.0.read().ok().and_then(|k| k.clone())
    }

    /// This host's id and every member's address (what the peer service checks batches by).
    pub fn addresses(&self) -> Option<MemberAddresses> {
        self.get().map(|k| (k.me, k.members.into_iter().map(|(id, address, _)| (id, address)).collect()))
    }

    /// As gRPC members.
    pub fn to_proto(&self) -> Vec<waxos_proto::Member> {
        self.get()
            .map(|k| {
                k.members.into_iter().map(|(id, address, voter)| waxos_proto::Member { id, address, voter }).collect()
            })
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Known {
    /// `1 at a:1, 4 (learner) at d:4`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let named: Vec<String> = self
            .members
            .iter()
            .map(|(id, address, voter)| format!("{id}{} at {address}", if *voter { "" } else { " (learner)" }))
            .collect();
        f.write_str(&named.join(", "))
    }
}

/// An Admin `ChangeMembers` request as the guest's command; refuses one that names no change.
pub fn command_of(request: &ChangeMembersRequest) -> Result<Command, Status> {
    let change = match &request.change {
        Some(Change::Add(address)) => {
            check_address(address).map_err(Status::invalid_argument)?;
            MemberChange::Add(address.clone())
        }
        Some(Change::Promote(id)) => MemberChange::Promote(*id),
        Some(Change::Remove(id)) => MemberChange::Remove(*id),
        None => return Err(Status::invalid_argument("a membership change must say add, promote or remove")),
    };
    Ok(Command::ChangeMembers(change))
}

/// How a change reads in the log.
pub fn describe(command: &Command) -> String {
    match command {
        Command::ChangeMembers(MemberChange::Add(address)) => format!("add {}", shown(address)),
        Command::ChangeMembers(MemberChange::Promote(id)) => format!("promote {id}"),
        Command::ChangeMembers(MemberChange::Remove(id)) => format!("remove {id}"),
        _ => "not a membership change".to_string(),
    }
}

/// `--join`: the persisted roster when there is one (a restart needs nobody), else the one a
/// member gives (`join`), asked again every second while no member answers; refused for good
/// when the member answers that this host's address is not a learner there. The roster is
/// saved before the guest starts.
pub async fn join_or_load(
    data_dir: &std::path::Path,
    my_address: &str,
    via: &str,
    registry: &crate::bootstrap::SharedRegistry,
    dialer: &Dialer,
) -> anyhow::Result<(Roster, crate::bootstrap::RosterSource)> {
    if let Ok(mut registry) = registry.lock() {
        // Registrations are for a first start's coordinator; this host is none.
        registry.settled = true;
    }
    if let Some(roster) = Roster::load(data_dir)? {
        tracing::info!(
            "roster from {}: node {} of {:?} (--join not needed)",
            data_dir.display(),
            roster.me,
            roster.ids()
        );
        roster.check_address(data_dir, my_address)?;
        return Ok((roster, crate::bootstrap::RosterSource::Persisted));
    }
    let mut reported = None;
    loop {
        match join(dialer, via, my_address, JOIN_TIMEOUT).await {
            Ok(Ok(roster)) => {
                tracing::info!("joined through {via} as node {} (a learner) of {}", roster.me, roster.ids().len());
                roster.save(data_dir)?;
                return Ok((roster, crate::bootstrap::RosterSource::Registered));
            }
            Ok(Err(refused)) => bail!("cannot join through {via}: {refused}"),
            Err(e) => {
                let why = format!("{e:#}");
                if reported.as_deref() != Some(why.as_str()) {
                    tracing::warn!("joining through {via}: {why}; retrying every second");
                    reported = Some(why);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// How long a member has to answer a joining host.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);

/// `--join`: asks the member at `via` for the members and returns the roster this host starts
/// with: the id an operator's `member add` gave `my_address`, as a learner, and the others as
/// that member knows them. The outer error: no answer (worth asking again); the inner: the
/// member answered no (`my_address` is not a learner there: add it first).
pub async fn join(
    dialer: &Dialer,
    via: &str,
    my_address: &str,
    timeout: Duration,
) -> anyhow::Result<Result<Roster, String>> {
    let expect = crate::member_dial::Expect::AnyMember;
    let channel = crate::member_dial::connect(dialer, via, expect, timeout)
        .await
        .with_context(|| format!("joining through {via}"))?;
    let status = tokio::time::timeout(timeout, AdminClient::new(channel).status(StatusRequest {}))
        .await
        .with_context(|| format!("{via} did not answer within {} ms", timeout.as_millis()))?
        .with_context(|| format!("asking {via} for the members"))?
        .into_inner();
    if status.members.is_empty() {
        bail!("{via} knows no members yet (is it a member of a started cluster?)");
    }
    let Some(me) = status.members.iter().find(|m| m.address == my_address) else {
        let known: Vec<&str> = status.members.iter().map(|m| m.address.as_str()).collect();
        return Ok(Err(format!(
            "{my_address} is not a member there (members: {}): add it first with `waxos <host> <port> member add {my_address}`",
            known.join(", ")
        )));
    };
    if me.voter {
        return Ok(Err(format!(
            "{my_address} is a voter there already: a new host joins as a learner (remove it, then add it again)"
        )));
    }
    let members: Vec<(u32, String)> = status.members.iter().map(|m| (m.id, m.address.clone())).collect();
    let learners: Vec<u32> = status.members.iter().filter(|m| !m.voter).map(|m| m.id).collect();
    Ok(Ok(Roster::joined(me.id, members, learners)))
}

/// Network-controlled text as it may appear in a log line: escaped and cut to 64 characters.
fn shown(text: &str) -> String {
    text.escape_debug().take(64).collect()
}

/// Whether `address` can be a member's: `host:port`, printable, at most 256 bytes (the guest's
/// bound), a port that is a number.
pub fn check_address(address: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("member address {:?}: {why} (expected host:port)", shown(address)));
    if address.is_empty() || address.len() > 256 {
        return refuse("must be 1 to 256 bytes");
    }
    if address.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return refuse("has spaces or control characters");
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => refuse("has no host and port"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_addresses_are_host_and_port() {
        assert!(check_address("10.0.0.7:50051").is_ok());
        assert!(check_address("node-4.example:7000").is_ok());
        assert!(check_address("[::1]:7000").is_ok());
        for bad in ["", "host", "host:", ":80", "host:99999", "host:0", "a b:1", "evil\n:1"] {
            assert!(check_address(&bad.replace("\\n", "\n")).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_guest_members_replace_the_roster_and_unchanged_news_is_none() {
        let members = Members::default();
        let roster = Roster::joined(4, vec![(1, "a:1".into()), (4, "d:4".into())], vec![4]);
        members.start(&roster);
        assert_eq!(members.get().map(|k| k.members), Some(vec![(1, "a:1".into(), true), (4, "d:4".into(), false)]));
        let promoted = [
            GuestMember { id: 1, address: "a:1".into(), voter: true },
            GuestMember { id: 4, address: "d:4".into(), voter: true },
        ];
        assert!(members.update(&promoted).is_some());
        assert!(members.update(&promoted).is_none(), "no news");
        assert_eq!(members.addresses(), Some((4, vec![(1, "a:1".into()), (4, "d:4".into())])));
    }
}
