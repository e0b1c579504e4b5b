//! Host-to-host transport of Paxos envelopes, and the `Peer` gRPC service.
//!
//! Outbound: one task per peer owns one long-lived client stream (`Peer.Exchange`) to it, fed
//! by a bounded queue; it batches what is queued into one gRPC message, and reconnects with
//! exponential back-off when the stream breaks. A full queue drops envelopes: Paxos tolerates
//! loss (the proposer re-sends), memory does not tolerate unbounded growth.
//! Inbound: a stream is served only to a connection whose certificate names a member (`tls`);
//! every batch must come from the member that certificate names (its `src` has that address in
//! the roster), else the whole stream is refused with `PERMISSION_DENIED`, as is a registration
//! of an address other than the certificate's. Envelopes are then checked (sender in the roster,
//! addressed to us) and handed to the step loop; anything else is logged and dropped. A host that has no roster yet
//! refuses streams with `NO_ROSTER`; a member that meets that refusal at another member (a
//! coordinator that lost its data dir) announces the roster to it (see `bootstrap`).
//! Every batch carries the sender's cluster id; a batch from another cluster is refused with
//! the whole stream, and a sender refused that way tells `identity`, which stops this host
//! once a majority of the other members refused it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use waxos_proto::peer_client::PeerClient;
use waxos_proto::peer_server::Peer;
use waxos_proto::{EnvelopeBatch, ExchangeClosed, RegisterRequest, RegisterResponse};

use crate::bootstrap::{RegisterError, Roster, SharedRegistry};
use crate::identity::{Identity, FOREIGN_CLUSTER};
use crate::runtime::{Envelope, Role};
use crate::step_loop::{Input, StepLoopHandle};
use crate::tls::{refuse_impersonation, require_member};
use waxos_proto::tls::Dialer;

/// Envelopes queued per peer before new ones are dropped.
pub const PEER_QUEUE_ENVELOPES_MAX: usize = 8_192;
/// Envelopes per gRPC message.
pub const BATCH_ENVELOPES_MAX: usize = 512;
/// Payload bytes per gRPC message (a batch closes when it passes this).
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// Largest gRPC message between hosts (one envelope may exceed the batch bound).
pub const PEER_MESSAGE_BYTES_MAX: usize = 512 << 20;
/// The refusal of a peer stream by a host that has no roster yet.
pub const NO_ROSTER: &str = "no roster: this host has not joined the cluster yet";
/// Reconnect back-off bounds.
const BACKOFF_MIN_MS: u64 = 50;
const BACKOFF_MAX_MS: u64 = 1_000;

/// Where the step loop hands envelopes to be sent (the real one is `Peers`; tests watch it).
pub trait Transport: Send {
    /// Sends, or drops when that is not possible; never blocks.
    fn send(&self, envelope: Envelope);

    /// The guest announced its members (`Peers::follow`). Test transports ignore it.
    fn follow(&self, _members: &[crate::runtime::GuestMember]) {}
}

impl Transport for Peers {
    fn send(&self, envelope: Envelope) {
        Peers::send(self, envelope)
    }

    fn follow(&self, members: &[crate::runtime::GuestMember]) {
        Peers::follow(self, members)
    }
}

/// One sender queue per peer, keyed by member id, with the address it dials.
type Queues = std::sync::Arc<std::sync::Mutex<HashMap<u32, (String, mpsc::Sender<Envelope>)>>>;

/// Outbound queues, one per peer; the set follows the members (`follow`).
#[derive(Clone)]
pub struct Peers {
    queues: Queues,
    roster: Roster,
    identity: std::sync::Arc<Identity>,
    dialer: Dialer,
    /// The members as this host knows them, shared with the peer service and Admin.
    known: crate::membership::Members,
    /// The runtime sender tasks run on: `follow` is called from the step loop's own thread.
    runtime: tokio::runtime::Handle,
}

impl Peers {
    /// Starts one sender task per other member of the roster; `known` follows the guest's
    /// members from then on (`follow`). Called within the tokio runtime.
    pub fn start(
        roster: &Roster,
        identity: std::sync::Arc<Identity>,
        dialer: Dialer,
        known: crate::membership::Members,
    ) -> Peers {
        known.start(roster);
        let runtime = tokio::runtime::Handle::current();
        let peers = Peers { queues: Default::default(), roster: roster.clone(), identity, dialer, known, runtime };
        peers.dial(&roster.members);
        let queues = peers.queues.clone();
        crate::metrics::get().on_scrape(move |m| {
            if let Ok(queues) = queues.lock() {
                let depth = |queue: &mpsc::Sender<Envelope>| queue.max_capacity() - queue.capacity();
                crate::metrics::peer_queue_depths(m, queues.iter().map(|(id, (_, queue))| (*id, depth(queue))));
            }
        });
        peers
    }

    /// The guest announced its members: the peer service accepts them, and they are dialled.
    pub fn follow(&self, members: &[crate::runtime::GuestMember]) {
        if let Some(known) = self.known.update(members) {
            tracing::info!("members now: {known}");
            let addresses: Vec<(u32, String)> = members.iter().map(|m| (m.id, m.address.clone())).collect();
            self.dial(&addresses);
        }
    }

    /// Dials every member of `members` but this host (a new one gets its own sender task) and
    /// no one else (a removed member's queue closes, and its task ends). A member whose
    /// address changed is dialled at the new one. A member with no address (a guest started
    /// without them) keeps the roster's.
    fn dial(&self, members: &[(u32, String)]) {
        let members: Vec<(u32, String)> = members
            .iter()
            .map(|(id, address)| match (address.is_empty(), self.roster.members.iter().find(|(r, _)| r == id)) {
                (true, Some((_, known))) => (*id, known.clone()),
                _ => (*id, address.clone()),
            })
            .collect();
        let Ok(mut queues) = self.queues.lock() else {
            return;
        };
        queues.retain(|id, (address, _)| members.iter().any(|(m, a)| m == id && a == address));
        for (id, address) in &members {
            if *id == self.roster.me || queues.contains_key(id) || address.is_empty() {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE_ENVELOPES_MAX);
            let (roster, identity, dialer) = (self.roster.clone(), self.identity.clone(), self.dialer.clone());
            self.runtime.spawn(sender(roster, identity, dialer, *id, address.clone(), rx));
            queues.insert(*id, (address.clone(), tx));
        }
    }

    /// Queues an envelope for its destination; drops it (logged at debug) when that is not
    /// possible.
    pub fn send(&self, envelope: Envelope) {
        let Ok(queues) = self.queues.lock() else {
            return;
        };
        match queues.get(&envelope.dst).map(|(_, queue)| queue) {
            Some(queue) => {
                if queue.try_send(envelope).is_err() {
                    tracing::debug!("peer queue full or closed: envelope dropped");
                }
            }
            None => tracing::warn!("guest sent to unknown node {}: dropped", envelope.dst),
        }
    }
}

/// Keeps a stream open to one peer and feeds it.
async fn sender(
    roster: Roster,
    identity: std::sync::Arc<Identity>,
    dialer: Dialer,
    peer: u32,
    address: String,
    mut queue: mpsc::Receiver<Envelope>,
) {
    let me = roster.me;
    let mut backoff_ms = BACKOFF_MIN_MS;
    // Why the last attempt failed (None: it connected): a failure is logged when its reason
    // changes (unreachable, then a TLS refusal: the second is news), not at every retry.
    let mut last_failure: Option<String> = None;
    // The last stream was refused as another cluster's: its reconnections are not news.
    let mut refused_as_foreign = false;
    // A stream opened before: the next one is a reconnection (`metrics`).
    let mut connected_before = false;
    loop {
        let expect = crate::member_dial::Expect::Member(address.clone());
        let channel = match crate::member_dial::connect(&dialer, &address, expect, Duration::from_millis(500)).await {
            Ok(channel) => channel,
            Err(e) => {
                let why = format!("{e:#}");
                if last_failure.as_deref() != Some(why.as_str()) {
                    tracing::warn!("peer {peer} at {address} unreachable ({why}); retrying with back-off");
                    last_failure = Some(why);
                }
                // Drop what queued up meanwhile: stale Paxos messages are useless, and the
                // proposer re-sends what matters. A closed queue: the peer is no longer a
                // member (`Peers::set_members`).
                loop {
                    match queue.try_recv() {
                        Ok(_) => {}
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            tracing::info!("peer {peer} at {address}: no longer a member; not dialled any more");
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
                continue;
            }
        };
        if !refused_as_foreign {
            tracing::info!("peer {peer} at {address}: connected");
        }
        last_failure = None;
        backoff_ms = BACKOFF_MIN_MS;
        if connected_before {
            crate::metrics::peer_reconnected(peer);
        }
        connected_before = true;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX);
        let (stream_tx, stream_rx) = mpsc::channel::<EnvelopeBatch>(16);
        let mut call = tokio::spawn(async move { client.exchange(ReceiverStream::new(stream_rx)).await });
        loop {
            tokio::select! {
                first = queue.recv() => {
                    let Some(first) = first else { return };
                    let mut bytes = first.payload.len();
                    let mut envelopes = vec![to_proto(first)];
                    while envelopes.len() < BATCH_ENVELOPES_MAX && bytes < BATCH_BYTES_MAX {
                        match queue.try_recv() {
                            Ok(e) => {
                                bytes += e.payload.len();
                                envelopes.push(to_proto(e));
                            }
                            Err(_) => break,
                        }
                    }
                    // Read per batch: a data dir that did not know its cluster id adopts one.
                    let cluster_id = identity.cluster_id().unwrap_or_default().to_string();
                    if stream_tx.send(EnvelopeBatch { src: me, envelopes, cluster_id }).await.is_err() {
                        break;
                    }
                }
                ended = &mut call => {
                    let refused_for_want_of_a_roster = matches!(
                        &ended,
                        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition && status.message() == NO_ROSTER
                    );
                    let foreign_refusal = match &ended {
                        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition
                            && status.message().starts_with(FOREIGN_CLUSTER) => Some(status.message().to_string()),
                        _ => None,
                    };
                    refused_as_foreign = foreign_refusal.is_some();
                    if refused_for_want_of_a_roster {
                        tracing::warn!("peer {peer} at {address} has no roster (it lost its state): announcing ours");
                        if let Some((_, my_address)) = roster.members.iter().find(|(id, _)| *id == me) {
                            crate::bootstrap::announce_roster(&dialer, &address, &roster, my_address, identity.cluster_id()).await;
                        }
                    } else if let Some(refusal) = foreign_refusal {
                        identity.peer_refused(peer, &address, &refusal);
                        // It will refuse again: no need to knock 20 times a second.
                        backoff_ms = BACKOFF_MAX_MS;
                    } else {
                        tracing::warn!("peer {peer} at {address}: stream ended ({:?}); reconnecting", ended.map(|r| r.err()));
                    }
                    break;
                }
            }
        }
        call.abort();
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
    }
}

fn to_proto(e: Envelope) -> waxos_proto::Envelope {
    let role = match e.role {
        Role::Proposer => 0,
        Role::Acceptor => 1,
        Role::Learner => 2,
    };
    waxos_proto::Envelope { src: e.src, dst: e.dst, role, payload: e.payload }
}

fn from_proto(e: waxos_proto::Envelope) -> Option<Envelope> {
    let role = match e.role {
        0 => Role::Proposer,
        1 => Role::Acceptor,
        2 => Role::Learner,
        _ => return None,
    };
    Some(Envelope { src: e.src, dst: e.dst, role, payload: e.payload })
}

/// This host's id, and every member's id with its address (what its certificate must name).
pub type MemberAddresses = (u32, Vec<(u32, String)>);

/// The `Peer` gRPC service.
pub struct PeerService {
    /// Where envelopes go.
    pub step_loop: StepLoopHandle,
    /// The coordinator's registration book.
    pub registry: SharedRegistry,
    /// This host's id and the members allowed to send, with the address each one's certificate
    /// must name (filled once the roster is known, then kept as the guest says).
    pub members: crate::membership::Members,
    /// Whose data dir this is: batches from another cluster are refused.
    pub identity: std::sync::Arc<Identity>,
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn exchange(&self, request: Request<Streaming<EnvelopeBatch>>) -> Result<Response<ExchangeClosed>, Status> {
        // Who the connection proved to be, before reading a byte of what it sends.
        let proven = require_member(&request, "peer exchange")?;
        let (_, remote) = crate::tls::caller(&request);
        if self.members.get().is_none() {
            return Err(Status::failed_precondition(NO_ROSTER));
        }
        let mut stream = request.into_inner();
        let mut refused_logged = false;
        while let Some(batch) = stream.next().await {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!("peer stream from {remote} ended: {e}");
                    break;
                }
            };
            let Some((me, members)) = self.members.addresses() else {
                continue;
            };
            let me = &me;
            let claimed = members.iter().find(|(id, _)| *id == batch.src && batch.src != *me);
            // A member whose certificate is the claimed sender's (with `--insecure`, whoever
            // claims a member id): only such a batch may teach this host its cluster id.
            let authenticated =
                claimed.is_some_and(|(_, address)| proven.as_ref().is_none_or(|proven| proven == address));
            // Before the sender check: another cluster's ids need not match ours, and its host
            // must hear why it is refused (a majority of refusals stops it).
            if let Err(refusal) = self.identity.check_batch(batch.src, &batch.cluster_id, authenticated) {
                // The whole stream: nothing of another cluster reaches the guest.
                return Err(Status::failed_precondition(refusal));
            }
            let Some((_, claimed_address)) = claimed else {
                if !refused_logged {
                    tracing::warn!("refused envelopes from unknown node {} at {remote}", batch.src);
                    refused_logged = true;
                }
                continue;
            };
            if let Some(proven) = &proven {
                if proven != claimed_address {
                    // A member speaking for another: the whole stream is refused.
                    return Err(refuse_impersonation(
                        "peer exchange",
                        proven,
                        &format!("node {} ({claimed_address})", batch.src),
                        &remote,
                    ));
                }
            }
            crate::metrics::heard_from(batch.src);
            for envelope in batch.envelopes {
                if envelope.src != batch.src || envelope.dst != *me {
                    tracing::warn!(
                        "dropped an envelope {}->{} on a stream from node {}",
                        envelope.src,
                        envelope.dst,
                        batch.src
                    );
                    continue;
                }
                match from_proto(envelope) {
                    Some(e) => self.step_loop.offer(Input::Message(e)),
                    None => tracing::warn!("dropped an envelope with an unknown role from node {}", batch.src),
                }
            }
        }
        Ok(Response::new(ExchangeClosed {}))
    }

    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let (caller, remote) = crate::tls::caller(&request);
        tracing::info!(
            "request received op=register address={:?} member_id={} roster_members={} caller=\"{caller}\" from {remote}",
            request.get_ref().address,
            request.get_ref().member_id,
            request.get_ref().members.len()
        );
        // Only members register or announce rosters (an outsider took a roster slot before).
        let proven = require_member(&request, "registration")?;
        let request = request.into_inner();
        let address = request.address;
        if let Some(proven) = &proven {
            // A registration registers the address its certificate names; an announcement comes
            // from the member of the roster it announces whose address that is.
            let claimed = if request.members.is_empty() {
                Some(address.clone())
            } else {
                request.members.iter().find(|m| m.id == request.member_id).map(|m| m.address.clone())
            };
            if claimed.as_deref() != Some(proven.as_str()) {
                let claimed = claimed.unwrap_or_else(|| format!("node {}, absent from its roster", request.member_id));
                let status = refuse_impersonation("registration", proven, &claimed, &remote);
                tracing::info!("response sent op=register address={address:?} ok=false");
                return Err(status);
            }
        }
        let mut registry = self.registry.lock().map_err(|_| Status::internal("registry lock poisoned"))?;
        let answer = if request.members.is_empty() {
            registry.register(&address, request.incarnation, &request.restored_from)
        } else {
            let members = request.members.into_iter().map(|m| (m.id, m.address)).collect();
            let cluster_id = Some(request.cluster_id).filter(|id| crate::identity::valid_cluster_id(id));
            registry.announce(request.member_id, members, cluster_id)
        };
        drop(registry);
        // A coordinator that adopted a roster without a cluster id may have learned one since.
        let answer = answer.map(|mut response| {
            if response.cluster_id.is_empty() {
                response.cluster_id = self.identity.cluster_id().unwrap_or_default().to_string();
            }
            response
        });
        let answer = answer.map_err(|e| match e {
            RegisterError::NotYet => Status::unavailable(e.to_string()),
            RegisterError::Refused(reason) => Status::failed_precondition(reason),
        });
        tracing::info!("response sent op=register address={address:?} ok={}", answer.is_ok());
        answer.map(Response::new)
    }
}
