//! `waxos <host> <port> member …`: list the members, add one, promote a learner, remove one.
//! Changes are Admin calls (operators only) that go through the cluster's log; the client
//! retries a member that does not answer at another, with the same (client, seq), so a change
//! applies once.
//!
//! `member add ADDR` without `--learner` adds a learner and then promotes it once it has caught
//! up (its applied slot within a window of the member it was added through), as etcd's
//! `member add` followed by `member promote` would; with `--learner` it stays a learner until
//! `member promote ID`. Promoting a member that has not caught up would count a voter that
//! cannot answer yet, so the automatic promotion waits for it.

use std::time::{Duration, Instant};

use clap::Subcommand;
use tonic::Code;
use waxos_proto::change_members_request::Change;
use waxos_proto::ChangeMembersRequest;

use crate::commands::{EXIT_FAILURE, EXIT_OK};
use crate::session::Session;

/// How far behind (in slots) a learner may be to be promoted automatically.
const CAUGHT_UP_SLOTS: u64 = 64;

/// Membership commands.
#[derive(Subcommand, Debug, Clone)]
pub enum MemberCmd {
    /// Every member: id, address, voter or learner.
    List,
    /// Add a member at ADDR (host:port, as its certificate names it), then start its host with
    /// `waxosd … --join <a member>`. Promoted to voter once caught up, unless --learner.
    Add {
        /// The new member's host:port.
        address: String,
        /// Stay a learner (promote later with `member promote ID`).
        #[arg(long)]
        learner: bool,
        /// How long to wait for the new member to catch up before promoting it.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
    /// Make learner ID a voter.
    Promote {
        /// The learner's node id.
        id: u32,
    },
    /// Remove member ID (a voter or a learner).
    Remove {
        /// The member's node id.
        id: u32,
    },
}

/// Runs a membership command.
pub async fn run(session: &mut Session, command: MemberCmd) -> i32 {
    match command {
        MemberCmd::List => list(session).await,
        MemberCmd::Add { address, learner, wait_secs } => add(session, &address, learner, wait_secs).await,
        MemberCmd::Promote { id } => change(session, Change::Promote(id), 1).await.map_or(EXIT_FAILURE, |_| EXIT_OK),
        MemberCmd::Remove { id } => change(session, Change::Remove(id), 1).await.map_or(EXIT_FAILURE, |_| EXIT_OK),
    }
}

async fn list(session: &mut Session) -> i32 {
    let first = session.server().to_string();
    match session.status_of(&first).await {
        Ok(status) => {
            for m in status.members {
                outln!("{:<4} {:<22} {}", m.id, m.address, if m.voter { "voter" } else { "learner" });
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("waxos: cannot get the members from {first}: {}", e.message());
            EXIT_FAILURE
        }
    }
}

async fn add(session: &mut Session, address: &str, stay_learner: bool, wait_secs: u64) -> i32 {
    let Some(id) = change(session, Change::Add(address.to_string()), 1).await else {
        return EXIT_FAILURE;
    };
    if stay_learner {
        outln!("start its host with `waxosd … --join {}`; promote it with `member promote {id}`", session.server());
        return EXIT_OK;
    }
    eprintln!(
        "waxos: waiting for node {id} at {address} to start (`waxosd … --join {}`) and catch up",
        session.server()
    );
    let deadline = Instant::now() + Duration::from_secs(wait_secs);
    loop {
        if caught_up(session, address).await {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("waxos: node {id} has not caught up within {wait_secs} s: it stays a learner (`member promote {id}` later)");
            return EXIT_FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match change(session, Change::Promote(id), 2).await {
        Some(_) => EXIT_OK,
        None => EXIT_FAILURE,
    }
}

/// Whether the member at `address` applied within `CAUGHT_UP_SLOTS` of the current server.
async fn caught_up(session: &mut Session, address: &str) -> bool {
    let applied = |json: &str| serde_json::from_str::<serde_json::Value>(json).ok().and_then(|v| v["applied"].as_u64());
    let here = session.server().to_string();
    let (Ok(theirs), Ok(ours)) = (session.status_of(address).await, session.status_of(&here).await) else {
        return false;
    };
    match (applied(&theirs.guest_status_json), applied(&ours.guest_status_json)) {
        (Some(theirs), Some(ours)) => theirs + CAUGHT_UP_SLOTS >= ours,
        _ => false,
    }
}

/// Sends one change, at another member when one does not answer (same client and seq), until
/// it is chosen or refused. Prints the outcome; returns the member it was about.
async fn change(session: &mut Session, change: Change, seq: u64) -> Option<u32> {
    let what = match &change {
        Change::Add(address) => format!("add {address}"),
        Change::Promote(id) => format!("promote {id}"),
        Change::Remove(id) => format!("remove {id}"),
    };
    let request = ChangeMembersRequest { change: Some(change), client_id: session.client_id(), seq };
    let deadline = Instant::now() + Duration::from_secs(60);
    session.learn_members().await;
    loop {
        let server = session.server().to_string();
        match session.change_members(request.clone()).await {
            Ok(answer) => {
                tracing::info!("member {what} -> OK (node {}) via {server}", answer.member_id);
                outln!("{what}: done (node {})", answer.member_id);
                return Some(answer.member_id);
            }
            Err(e) if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded) && Instant::now() < deadline => {
                tracing::warn!(
                    "member {what}: server {server} unresponsive or not ready ({}); trying another",
                    e.message()
                );
                session.next_server();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                tracing::error!("member {what} -> FAILED via {server}: {}", e.message());
                eprintln!("waxos: member {what} failed: {}", e.message());
                return None;
            }
        }
    }
}
