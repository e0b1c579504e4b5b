//! Admission of inbound connections: how many a host holds at once, how many may be half open
//! (mid-handshake), from one source and in all, and how long an idle one is kept.
//!
//! Why: every connection costs a file descriptor, and the host needs descriptors of its own —
//! a WAL segment, a snapshot being written, a compiled guest, its connections to peers. Without
//! a cap, anyone who can reach the port could open silent connections until the process ran
//! out (a review of issue 12 did: the next WAL hand-off failed and the host stopped as if its
//! disk had failed). So:
//! - at start the soft `RLIMIT_NOFILE` is raised to the hard one, and `RESERVED_DESCRIPTORS`
//!   of it are kept back from the network; every other cap fits in the rest;
//! - a connection is accepted into a *handshake* slot (a global cap, and a smaller one per
//!   source IP, so one flooding address cannot take every slot); one that finds none is closed
//!   at once. The TLS handshake and the HTTP/2 preface must finish within `net`'s deadline;
//! - once its handshake is done it moves to a *connection* slot: certified members draw from a
//!   pool of their own first (a flood of clients cannot lock peers out of a host), everyone
//!   else from the client pool (`--max-connections`); one that finds none is closed;
//! - a connection on which nothing arrives (not a request, not an HTTP/2 ping or window
//!   update) for `idle_timeout` is closed (`net::Accepted`), giving its slot back;
//! - refusals are logged, but at most `REFUSAL_LOGS_PER_SECOND` lines a second, then one line
//!   saying how many were not logged — a flood must not become a flood of log lines.
//!
//! A slot is a `tokio::sync::OwnedSemaphorePermit` held by the connection's stream, so it is
//! given back whenever the connection ends, however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors never handed to inbound connections: storage, the guest, outbound peer
/// connections, logs, and a margin.
pub const RESERVED_DESCRIPTORS: u64 = 256;
/// The most refusal lines logged per second; the rest are counted.
const REFUSAL_LOGS_PER_SECOND: u32 = 20;
/// Default `--max-connections`: client connections held at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default idle timeout of an established connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The caps, in connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections mid-handshake, in all.
    pub handshakes: usize,
    /// Connections mid-handshake from one source IP.
    pub handshakes_per_source: usize,
    /// Established connections of certified members (beyond these they use the client pool).
    pub members: usize,
    /// Established connections of everyone else.
    pub clients: usize,
    /// How long an established connection may stay silent.
    pub idle_timeout: Duration,
}

impl Limits {
    /// The caps for `descriptors` usable file descriptors (the soft limit) and at most
    /// `max_connections` client connections: every cap fits in what `RESERVED_DESCRIPTORS`
    /// leaves, so the network can never take the host's own descriptors.
    pub fn for_descriptors(descriptors: u64, max_connections: usize) -> Limits {
        let budget = descriptors.saturating_sub(RESERVED_DESCRIPTORS).max(8) as usize;
        let handshakes = (budget / 4).clamp(2, 512);
        let members = (budget / 8).clamp(2, 64);
        let clients = budget.saturating_sub(handshakes + members).clamp(1, max_connections.max(1));
        let handshakes_per_source = (handshakes / 4).max(1);
        Limits { handshakes, handshakes_per_source, members, clients, idle_timeout: DEFAULT_IDLE_TIMEOUT }
    }
}

impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} client and {} member connections, {} handshakes at once ({} per source), idle {} s",
            self.clients,
            self.members,
            self.handshakes,
            self.handshakes_per_source,
            self.idle_timeout.as_secs()
        )
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force
/// (and a note when it could not be raised).
pub fn raise_descriptor_limit() -> (u64, Option<String>) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (1024, Some(format!("cannot read RLIMIT_NOFILE: {}", std::io::Error::last_os_error())));
    }
    let soft = limit.rlim_cur;
    // No more than a million: a hard limit of "unlimited" would make every cap meaningless.
    let wanted = limit.rlim_max.min(1 << 20);
    if wanted <= soft {
        return (soft, None);
    }
    let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let error = std::io::Error::last_os_error();
        return (soft, Some(format!("cannot raise RLIMIT_NOFILE from {soft} to {wanted}: {error}")));
    }
    (wanted, None)
}

/// The slots, shared by the accept loop and every connection.
pub struct Admission {
    limits: Limits,
    handshakes: Arc<Semaphore>,
    members: Arc<Semaphore>,
    clients: Arc<Semaphore>,
    pending_by_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    refusals: RefusalLog,
}

/// A handshake slot: held from accept until the handshake ends either way.
pub struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    pending_by_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut pending = self.pending_by_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = pending.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.source);
            }
        }
    }
}

/// A connection slot: held by an established connection for as long as it lives.
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// Slots for `limits`.
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            handshakes: Arc::new(Semaphore::new(limits.handshakes)),
            members: Arc::new(Semaphore::new(limits.members)),
            clients: Arc::new(Semaphore::new(limits.clients)),
            pending_by_source: Arc::new(Mutex::new(HashMap::new())),
            refusals: RefusalLog::new(REFUSAL_LOGS_PER_SECOND),
            limits,
        })
    }

    /// The caps in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A handshake slot for a connection from `source`, or why there is none.
    pub fn begin_handshake(&self, source: IpAddr) -> Result<HandshakeSlot, String> {
        let mut pending = self.pending_by_source.lock().unwrap_or_else(|e| e.into_inner());
        let from_source = pending.get(&source).copied().unwrap_or(0);
        if from_source >= self.limits.handshakes_per_source {
            return Err(format!(
                "{from_source} connections from {source} are mid-handshake, the most one source may have"
            ));
        }
        let permit = Arc::clone(&self.handshakes).try_acquire_owned().map_err(|_| {
            format!("{} connections are mid-handshake, the most this host takes", self.limits.handshakes)
        })?;
        *pending.entry(source).or_insert(0) += 1;
        Ok(HandshakeSlot { _permit: permit, source, pending_by_source: Arc::clone(&self.pending_by_source) })
    }

    /// A connection slot for an established connection (`member`: its certificate names a
    /// member), or why there is none.
    pub fn establish(&self, member: bool) -> Result<ConnectionSlot, String> {
        if member {
            if let Ok(permit) = Arc::clone(&self.members).try_acquire_owned() {
                return Ok(ConnectionSlot { _permit: permit });
            }
        }
        Arc::clone(&self.clients).try_acquire_owned().map(|permit| ConnectionSlot { _permit: permit }).map_err(|_| {
            format!("{} connections are open, the most this host holds (--max-connections)", self.limits.clients)
        })
    }

    /// Logs a refused or failed connection, within the log budget.
    pub fn log_refusal(&self, line: std::fmt::Arguments<'_>) {
        self.refusals.warn(line);
    }
}

/// At most `per_second` warnings a second; the rest are counted and reported in one line.
struct RefusalLog {
    per_second: u32,
    window: Mutex<(Instant, u32, u64)>,
}

impl RefusalLog {
    fn new(per_second: u32) -> RefusalLog {
        RefusalLog { per_second, window: Mutex::new((Instant::now(), 0, 0)) }
    }

    fn warn(&self, line: std::fmt::Arguments<'_>) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (started, logged, suppressed) = &mut *window;
        if started.elapsed() >= Duration::from_secs(1) {
            if *suppressed > 0 {
                tracing::warn!("{suppressed} more refused or failed connections in the last second were not logged");
            }
            *started = Instant::now();
            *logged = 0;
            *suppressed = 0;
        }
        if *logged < self.per_second {
            *logged += 1;
            tracing::warn!("{line}");
        } else {
            *suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_in_the_descriptors_left_after_the_reserve() {
        for descriptors in [64, 300, 1024, 4096, 65_536, 1 << 20] {
            let limits = Limits::for_descriptors(descriptors, DEFAULT_MAX_CONNECTIONS);
            let network = (limits.handshakes + limits.members + limits.clients) as u64;
            assert!(
                descriptors < RESERVED_DESCRIPTORS + 16 || network + RESERVED_DESCRIPTORS <= descriptors,
                "{descriptors} descriptors: {limits}"
            );
            assert!(limits.clients <= DEFAULT_MAX_CONNECTIONS && limits.clients >= 1, "{limits}");
            assert!(limits.handshakes_per_source < limits.handshakes || limits.handshakes == 2, "{limits}");
        }
        assert_eq!(Limits::for_descriptors(1 << 20, 100).clients, 100, "--max-connections caps clients");
    }

    #[test]
    fn one_source_cannot_take_every_handshake_slot() {
        let admission = Admission::new(Limits {
            handshakes: 4,
            handshakes_per_source: 2,
            members: 1,
            clients: 1,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        });
        let flooder: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = admission.begin_handshake(flooder).expect("first");
        let _second = admission.begin_handshake(flooder).expect("second");
        assert!(admission.begin_handshake(flooder).is_err(), "a third from one source is refused");
        let _from_other = admission.begin_handshake(other).expect("another source still gets a slot");
        drop(first);
        assert!(admission.begin_handshake(flooder).is_ok(), "a slot given back is usable again");
    }

    #[test]
    fn members_have_slots_clients_cannot_take() {
        let admission = Admission::new(Limits {
            handshakes: 4,
            handshakes_per_source: 4,
            members: 1,
            clients: 1,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        });
        let client = admission.establish(false).expect("one client");
        assert!(admission.establish(false).is_err(), "the client pool is full");
        let member = admission.establish(true).expect("a member still gets in");
        assert!(admission.establish(true).is_err(), "both pools are full");
        drop(client);
        assert!(admission.establish(true).is_ok(), "a member falls back on the client pool");
        drop(member);
    }
}
