//! The simulated world: N instances of one guest build on a virtual clock and network.
//!
//! Everything is drawn from one seed: message delays, loss, duplication and reordering,
//! partitions, crashes (a crashed node keeps exactly the records of the steps it completed, and
//! restarts through `start(snapshot, wal)`), acceptor outages, hot swaps between two builds, and
//! the clients' operations. The same seed replays the same history, bit for bit.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use waxos_host::runtime::{Command, Effect, Envelope, Event, Guest, GuestBuild, GuestConfig, Outcome, Request, Role};

use crate::checker::{Entry, Op, Ret};

/// SplitMix64: the simulator's only source of randomness.
pub struct Rng(u64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// In `low..high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low).max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Replicas.
    pub nodes: u32,
    /// Concurrent clients.
    pub clients: u32,
    /// Operations per client.
    pub ops_per_client: u32,
    /// Key space.
    pub keys: u32,
    /// Inject faults (crashes, partitions, outages, loss, duplication, swaps).
    pub faults: bool,
    /// Virtual time during which faults happen; then everything heals.
    pub fault_window_ms: u64,
    /// After healing, every pending request must complete within this virtual time.
    pub liveness_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 5,
            clients: 5,
            ops_per_client: 40,
            keys: 6,
            faults: true,
            fault_window_ms: 8_000,
            liveness_ms: 20_000,
        }
    }
}

/// Counts of what a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Guest steps.
    pub steps: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages lost (dropped, partitioned, to a crashed node).
    pub lost: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Crashes (and restarts).
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
    /// Acceptor outages.
    pub outages: u64,
    /// Hot swaps.
    pub swaps: u64,
    /// Client operations completed.
    pub completed: u64,
    /// Client operations given up on (outcome unknown).
    pub unknown: u64,
}

struct Node {
    guest: Option<Guest>,
    build: usize,
    config: GuestConfig,
    /// Records made durable: what survives a crash.
    durable: Vec<Vec<u8>>,
    /// Lazily persisted records not yet synced (the host's WAL buffer): a crash loses them.
    unsynced: Vec<Vec<u8>>,
    inbox: Vec<Event>,
    down_until: Option<u64>,
    acceptor_out_until: u64,
}

struct ClientOp {
    key: String,
    op: Op,
    seq: u64,
    attempt_deadline: u64,
    give_up_at: u64,
    request_id: u64,
}

struct Client {
    done: u32,
    /// The next operation starts no earlier than this (think time).
    idle_until: u64,
    current: Option<ClientOp>,
    history_index: Option<usize>,
}

/// Why a run failed.
#[derive(Debug)]
pub enum Failure {
    /// A guest crashed on its own (not injected), or refused its state.
    GuestCrash(String),
    /// The history is not linearizable.
    NotLinearizable(String),
    /// Requests still pending long after every fault healed.
    Liveness(String),
}

/// A finished run.
pub struct Run {
    /// Counts.
    pub stats: Stats,
    /// The client history.
    pub history: Vec<Entry>,
    /// The trace, if asked for.
    pub trace: Vec<String>,
}

/// One simulation.
pub struct World<'a> {
    builds: &'a [GuestBuild],
    config: SimConfig,
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, Envelope>,
    next_seq: u64,
    /// Partition: node index -> side; empty = none.
    sides: Vec<u8>,
    partition_until: u64,
    clients: Vec<Client>,
    /// request id -> (client index, seq).
    requests: BTreeMap<u64, (usize, u64)>,
    next_request: u64,
    history: Vec<Entry>,
    stats: Stats,
    trace: Option<Vec<String>>,
    liveness: Option<String>,
}

const TICK_MS: u64 = 5;
const ATTEMPT_TIMEOUT_MS: u64 = 400;
const GIVE_UP_MS: u64 = 4_000;
/// Time allowed after the fault window for the cluster to settle (elections, catch-up).
const RECOVERY_MS: u64 = 2_000;
/// Mean pause between a client's operations, so a run spans the fault window.
const THINK_MS: u64 = 120;

impl<'a> World<'a> {
    /// A world of `config.nodes` instances of `builds[0]` (a second build, if given, is swapped
    /// in and out at random).
    pub fn new(builds: &'a [GuestBuild], config: SimConfig, seed: u64, trace: bool) -> Result<World<'a>, Failure> {
        let mut rng = Rng::new(seed);
        let members: Vec<u32> = (1..=config.nodes).collect();
        let mut nodes = Vec::new();
        for &me in &members {
            let guest_config = GuestConfig {
                me,
                members: members.clone(),
                seed: rng.next_u64(),
                test_hooks: false,
                retain_slots: 50,
                rejoining: false,
            };
            nodes.push(Node {
                guest: None,
                build: 0,
                config: guest_config,
                durable: Vec::new(),
                unsynced: Vec::new(),
                inbox: Vec::new(),
                down_until: None,
                acceptor_out_until: 0,
            });
        }
        let clients = (0..config.clients)
            .map(|_| Client { done: 0, idle_until: 0, current: None, history_index: None })
            .collect();
        let mut world = World {
            builds,
            config,
            rng,
            now: 1_000,
            nodes,
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            sides: Vec::new(),
            partition_until: 0,
            clients,
            requests: BTreeMap::new(),
            next_request: 1,
            history: Vec::new(),
            stats: Stats::default(),
            trace: trace.then(Vec::new),
            liveness: None,
        };
        for i in 0..world.nodes.len() {
            world.boot(i)?;
        }
        Ok(world)
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!("{:>7} ms  {}", self.now, line()));
        }
    }

    /// Starts node `i` from its durable records.
    fn boot(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let mut guest = self.builds[node.build].instantiate().map_err(|e| Failure::GuestCrash(e.to_string()))?;
        match guest.start(&node.config, None, &node.durable) {
            Ok(Ok(effects)) => {
                for e in effects {
                    if let Effect::Persist(r) | Effect::PersistLazy(r) = e {
                        node.durable.push(r);
                    }
                }
            }
            Ok(Err(refused)) => {
                return Err(Failure::GuestCrash(format!("node {} refused its state: {refused}", i + 1)))
            }
            Err(crash) => return Err(Failure::GuestCrash(format!("node {}: {crash}", i + 1))),
        }
        node.guest = Some(guest);
        Ok(())
    }

    /// The node whose guest says it leads, if any.
    fn leader(&mut self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .guest
                .as_mut()
                .and_then(|g| g.status().ok())
                .is_some_and(|s| s.contains("\"role\":\"leader\""))
        })
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.sides.is_empty() || self.sides[a] == self.sides[b]
    }

    fn send(&mut self, envelope: Envelope) {
        let (src, dst) = (envelope.src as usize - 1, envelope.dst as usize - 1);
        if self.config.faults && (self.rng.chance(0.02) || !self.connected(src, dst)) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.config.faults && self.rng.chance(0.01) { 2 } else { 1 };
        if copies == 2 {
            self.stats.duplicated += 1;
        }
        for _ in 0..copies {
            let delay = self.rng.range(1, if self.config.faults { 30 } else { 5 });
            self.next_seq += 1;
            self.queue.push(Reverse((self.now + delay, self.next_seq)));
            self.in_flight.insert(self.next_seq, envelope.clone());
        }
    }

    fn deliver_due(&mut self) {
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > self.now {
                break;
            }
            self.queue.pop();
            let Some(envelope) = self.in_flight.remove(&seq) else { continue };
            let dst = envelope.dst as usize - 1;
            let connected = self.connected(envelope.src as usize - 1, dst);
            let node = &mut self.nodes[dst];
            let outage = envelope.role == Role::Acceptor && self.now < node.acceptor_out_until;
            if node.guest.is_none() || outage || !connected {
                self.stats.lost += 1;
                continue;
            }
            self.stats.delivered += 1;
            node.inbox.push(Event::Message(envelope));
        }
    }

    fn inject_faults(&mut self) {
        if !self.config.faults || self.now > self.config.fault_window_ms + 1_000 {
            return;
        }
        let n = self.nodes.len();
        let crash_chance = if self.sides.is_empty() { 0.004 } else { 0.02 };
        if self.rng.chance(crash_chance) {
            let i = self.rng.range(0, n as u64) as usize;
            if self.nodes[i].guest.is_some() {
                let down = self.rng.range(50, 800);
                self.nodes[i].guest = None;
                self.nodes[i].unsynced.clear();
                self.nodes[i].inbox.clear();
                self.nodes[i].down_until = Some(self.now + down);
                self.stats.crashes += 1;
                self.note(|| format!("crash node {} for {down} ms", i + 1));
            }
        }
        if self.sides.is_empty() && self.rng.chance(0.002) {
            self.sides = (0..n).map(|_| (self.rng.next_u64() % 2) as u8).collect();
            if self.rng.chance(0.5) {
                // The classic nemesis: cut the leader off with one follower, so it keeps
                // proposing in the minority while the majority elects another.
                if let Some(leader) = self.leader() {
                    let buddy = (leader + 1 + self.rng.range(0, n as u64 - 1) as usize) % n;
                    self.sides = (0..n).map(|i| u8::from(i == leader || i == buddy)).collect();
                }
            }
            self.partition_until = self.now + self.rng.range(200, 2_000);
            self.stats.partitions += 1;
            let sides = self.sides.clone();
            self.note(|| format!("partition {sides:?}"));
        }
        if self.rng.chance(0.003) {
            let i = self.rng.range(0, n as u64) as usize;
            self.nodes[i].acceptor_out_until = self.now + self.rng.range(100, 1_000);
            self.stats.outages += 1;
            self.note(|| format!("acceptor outage on node {}", i + 1));
        }
        if self.builds.len() > 1 && self.rng.chance(0.003) {
            let i = self.rng.range(0, n as u64) as usize;
            self.swap(i);
        }
    }

    /// Hot swap node `i` to the other build: hand-over snapshot, start, replace.
    fn swap(&mut self, i: usize) {
        let other = 1 - self.nodes[i].build;
        let Some(old) = self.nodes[i].guest.as_mut() else { return };
        let Ok(handover) = old.snapshot(true) else { return };
        let Ok(mut new) = self.builds[other].instantiate() else { return };
        if let Ok(Ok(_)) = new.start(&self.nodes[i].config, Some(&handover), &[]) {
            self.nodes[i].guest = Some(new);
            self.nodes[i].build = other;
            self.stats.swaps += 1;
            self.note(|| format!("hot swap node {} to build {other}", i + 1));
        }
    }

    fn heal(&mut self) -> Result<(), Failure> {
        if !self.sides.is_empty() && (self.now >= self.partition_until || self.now > self.config.fault_window_ms) {
            self.sides.clear();
            self.note(|| "partition healed".into());
        }
        for i in 0..self.nodes.len() {
            let due = self.nodes[i].down_until.is_some_and(|t| self.now >= t || self.now > self.config.fault_window_ms);
            if due {
                self.nodes[i].down_until = None;
                self.boot(i)?;
                self.note(|| format!("restart node {}", i + 1));
            }
            if self.now > self.config.fault_window_ms {
                self.nodes[i].acceptor_out_until = 0;
            }
        }
        Ok(())
    }

    fn drive_clients(&mut self) {
        let n = self.nodes.len() as u64;
        for c in 0..self.clients.len() {
            if self.clients[c].current.is_none()
                && self.clients[c].done < self.config.ops_per_client
                && self.now >= self.clients[c].idle_until
            {
                let key = format!("k{}", self.rng.range(0, u64::from(self.config.keys)));
                let op = match self.rng.range(0, 10) {
                    0..=3 => Op::Put(format!("c{c}-{}", self.clients[c].done).into_bytes()),
                    4..=7 => Op::Get,
                    _ => Op::Delete,
                };
                let seq = u64::from(self.clients[c].done) + 1;
                self.history.push(Entry {
                    client: c as u32,
                    key: key.clone(),
                    op: op.clone(),
                    call: self.now,
                    ret: None,
                });
                self.clients[c].history_index = Some(self.history.len() - 1);
                self.clients[c].current = Some(ClientOp {
                    key,
                    op,
                    seq,
                    attempt_deadline: 0,
                    give_up_at: self.now + GIVE_UP_MS,
                    request_id: 0,
                });
            }
            let now = self.now;
            let Some(current) = self.clients[c].current.as_ref() else { continue };
            if now >= current.give_up_at {
                if now > self.config.fault_window_ms + RECOVERY_MS + GIVE_UP_MS && self.liveness.is_none() {
                    // Everything healed long ago: a request that still cannot complete is a
                    // liveness failure, not bad luck.
                    self.liveness = Some(format!(
                        "client {c} gave up on {} {:?} at {now} ms, after every fault healed",
                        current.key, current.op
                    ));
                }
                self.stats.unknown += 1;
                self.clients[c].current = None;
                self.clients[c].done += 1;
                continue;
            }
            if now >= current.attempt_deadline {
                let node = self.rng.range(0, n) as usize;
                let id = self.next_request;
                self.next_request += 1;
                let current = self.clients[c].current.as_mut().expect("current op");
                current.attempt_deadline = now + ATTEMPT_TIMEOUT_MS;
                current.request_id = id;
                let command = match &current.op {
                    Op::Put(v) => Command::Put((current.key.clone(), v.clone())),
                    Op::Get => Command::Get(current.key.clone()),
                    Op::Delete => Command::Delete(current.key.clone()),
                };
                let request = Request { id, client: 10_000 + c as u64, seq: current.seq, command };
                self.requests.insert(id, (c, current.seq));
                if self.nodes[node].guest.is_some() {
                    self.nodes[node].inbox.push(Event::Request(request));
                }
            }
        }
    }

    fn on_reply(&mut self, id: u64, outcome: Outcome) {
        let Some((c, seq)) = self.requests.remove(&id) else { return };
        let Some(current) = self.clients[c].current.as_ref() else { return };
        if current.seq != seq {
            // A late answer to an operation this client already finished or gave up on.
            return;
        }
        let ret = match outcome {
            Outcome::Done => Ret::Done,
            Outcome::Value(v) => Ret::Value(v),
            Outcome::Removed(b) => Ret::Removed(b),
            // Refused (overloaded, leader unknown...): the client's next attempt retries.
            Outcome::Redirect(_) | Outcome::Rejected(_) => return,
        };
        if let Some(index) = self.clients[c].history_index.take() {
            self.history[index].ret = Some((self.now, ret));
        }
        self.clients[c].current = None;
        self.clients[c].done += 1;
        self.clients[c].idle_until = self.now + self.rng.range(0, 2 * THINK_MS);
        self.stats.completed += 1;
    }

    fn step_nodes(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            let mut events = std::mem::take(&mut self.nodes[i].inbox);
            if self.nodes[i].guest.is_none() {
                continue;
            }
            if events.is_empty() {
                events.push(Event::Tick);
                // As the host: an idle step first makes lazily persisted records durable.
                let node = &mut self.nodes[i];
                node.durable.append(&mut node.unsynced);
            }
            let Some(guest) = self.nodes[i].guest.as_mut() else { continue };
            let effects =
                guest.step(self.now, &events).map_err(|e| Failure::GuestCrash(format!("node {}: {e}", i + 1)))?;
            self.stats.steps += 1;
            // As the host: records go into the log in order; a step with a strict record syncs
            // everything before anything of it is sent (lazy records alone are not synced).
            let node = &mut self.nodes[i];
            let mut strict = false;
            for e in &effects {
                match e {
                    Effect::Persist(r) => {
                        node.unsynced.push(r.clone());
                        strict = true;
                    }
                    Effect::PersistLazy(r) => node.unsynced.push(r.clone()),
                    Effect::Send(_) | Effect::Reply(_) | Effect::Log(_) => {}
                }
            }
            if strict {
                node.durable.append(&mut node.unsynced);
            }
            for e in effects {
                match e {
                    Effect::Send(envelope) => self.send(envelope),
                    Effect::Reply((id, outcome)) => self.on_reply(id, outcome),
                    Effect::Persist(_) | Effect::PersistLazy(_) | Effect::Log(_) => {}
                }
            }
        }
        Ok(())
    }

    fn all_done(&self) -> bool {
        self.clients.iter().all(|c| c.done >= self.config.ops_per_client && c.current.is_none())
    }

    /// Runs to the end and checks the history.
    pub fn run(mut self) -> Result<Run, (Failure, Vec<String>)> {
        let end = self.config.fault_window_ms + self.config.liveness_ms;
        while !self.all_done() {
            if let Some(problem) = self.liveness.take() {
                return Err((Failure::Liveness(problem), self.trace.unwrap_or_default()));
            }
            if self.now > end {
                let pending =
                    self.clients.iter().filter(|c| c.current.is_some() || c.done < self.config.ops_per_client).count();
                let failure = Failure::Liveness(format!(
                    "{pending} clients still not done {} ms after faults healed",
                    self.config.liveness_ms
                ));
                return Err((failure, self.trace.unwrap_or_default()));
            }
            self.now += TICK_MS;
            if let Err(f) = self.heal() {
                return Err((f, self.trace.unwrap_or_default()));
            }
            self.inject_faults();
            self.deliver_due();
            self.drive_clients();
            if let Err(f) = self.step_nodes() {
                return Err((f, self.trace.unwrap_or_default()));
            }
        }
        if let Err(e) = crate::checker::check(&self.history) {
            return Err((Failure::NotLinearizable(e), self.trace.unwrap_or_default()));
        }
        Ok(Run { stats: self.stats, history: self.history, trace: self.trace.unwrap_or_default() })
    }
}
