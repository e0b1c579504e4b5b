//! A deterministic in-memory network of replicas for protocol tests: no sockets, no clock.
//! Time advances in 10 ms ticks; messages sent in one tick arrive in the next; nodes can be
//! isolated or crashed (and restarted from the records they persisted), links cut both ways or
//! one way, acceptors taken offline (as the host's chaos does), disks wiped, builds hot-swapped,
//! and single messages dropped or held back to be delivered late (a `filter`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use waxos_guest::membership::Member;
use waxos_guest::replica::Replica;
use waxos_guest::types::{Command, Config, Effect, Envelope, Event, NodeId, Outcome, Request, Role};

/// What the network does with one message (see `Sim::filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Deliver,
    Drop,
    /// Kept in `Sim::held` until a test releases it (a message delayed arbitrarily long).
    Hold,
}

pub type Filter = Box<dyn FnMut(&Envelope) -> Fate>;

pub const TICK_MS: u64 = 10;

pub struct Sim {
    pub nodes: BTreeMap<NodeId, Replica>,
    pub now_ms: u64,
    inbox: BTreeMap<NodeId, Vec<Event>>,
    pub isolated: BTreeSet<NodeId>,
    /// Links cut in both directions.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Links cut in one direction only: `(src, dst)`.
    pub cut_one_way: BTreeSet<(NodeId, NodeId)>,
    /// Acceptor outage: envelopes for the acceptor role of these nodes are dropped (the host's
    /// chaos does exactly this).
    pub acceptor_down: BTreeSet<NodeId>,
    /// Decides the fate of every message that the cuts let through.
    pub filter: Option<Filter>,
    /// Messages held back by the filter.
    pub held: Vec<Envelope>,
    pub crashed: BTreeSet<NodeId>,
    /// Messages for the learner role of these nodes are lost (they cannot catch up).
    pub learner_blocked: BTreeSet<NodeId>,
    /// Paused replicas (a stalled VM or process): not stepped, memory kept, messages to them
    /// queue up and arrive when they resume.
    pub paused: BTreeSet<NodeId>,
    pub replies: BTreeMap<u64, Outcome>,
    /// The members each node last told its host of (`Effect::Members`).
    pub members: BTreeMap<NodeId, Vec<Member>>,
    /// Durable records per node (what a restart replays).
    pub wal: BTreeMap<NodeId, Vec<Vec<u8>>>,
    /// Lazily persisted records not yet synced, as in the host's WAL buffer: a crash loses them.
    pub unsynced: BTreeMap<NodeId, Vec<Vec<u8>>>,
    pub sent: usize,
    next_id: u64,
    seed: u64,
}

impl Sim {
    pub fn new(n: u32, seed: u64) -> Sim {
        Sim::with_retain(n, seed, 1_000)
    }

    /// A cluster whose replicas keep only `retain_slots` applied slots for catch-up.
    pub fn with_retain(n: u32, seed: u64, retain_slots: u64) -> Sim {
        let members: Vec<NodeId> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for &me in &members {
            let config = Config {
                me,
                members: waxos_guest::membership::voters(&members),
                seed,
                test_hooks: false,
                retain_slots,
                rejoining: false,
            };
            nodes.insert(me, Replica::start(config, None, &[]).expect("start"));
        }
        Sim {
            nodes,
            now_ms: 1_000,
            inbox: BTreeMap::new(),
            isolated: BTreeSet::new(),
            cut: BTreeSet::new(),
            cut_one_way: BTreeSet::new(),
            acceptor_down: BTreeSet::new(),
            filter: None,
            members: BTreeMap::new(),
            held: Vec::new(),
            crashed: BTreeSet::new(),
            learner_blocked: BTreeSet::new(),
            paused: BTreeSet::new(),
            replies: BTreeMap::new(),
            wal: BTreeMap::new(),
            unsynced: BTreeMap::new(),
            sent: 0,
            next_id: 1,
            seed,
        }
    }

    /// Queues a client request at `node`; returns its id.
    pub fn request(&mut self, node: NodeId, client: u64, seq: u64, command: Command) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.inbox.entry(node).or_default().push(Event::Request(Request { id, client, seq, command }));
        id
    }

    pub fn tick(&mut self) {
        self.now_ms += TICK_MS;
        let mut inbox = std::mem::take(&mut self.inbox);
        for id in &self.paused {
            if let Some(queued) = inbox.remove(id) {
                self.inbox.insert(*id, queued);
            }
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.crashed.contains(&id) || self.paused.contains(&id) {
                continue;
            }
            let mut events = inbox.get(&id).cloned().unwrap_or_default();
            if events.is_empty() {
                events.push(Event::Tick);
                self.sync(id);
            }
            let effects = self.nodes.get_mut(&id).expect("node").step(self.now_ms, events);
            self.carry_out(id, effects);
        }
    }

    fn sync(&mut self, id: NodeId) {
        let pending = self.unsynced.remove(&id).unwrap_or_default();
        self.wal.entry(id).or_default().extend(pending);
    }

    fn carry_out(&mut self, id: NodeId, effects: Vec<Effect>) {
        // As the host: a step with a strict record syncs everything appended before sending.
        for effect in &effects {
            match effect {
                Effect::Persist(record) | Effect::PersistLazy(record) => {
                    self.unsynced.entry(id).or_default().push(record.clone())
                }
                Effect::Send(_) | Effect::Reply(..) | Effect::Log(_) | Effect::Members(_) => {}
            }
        }
        if effects.iter().any(|e| matches!(e, Effect::Persist(_))) {
            self.sync(id);
        }
        for effect in effects {
            match effect {
                Effect::Persist(_) | Effect::PersistLazy(_) => {}
                Effect::Send(envelope) => {
                    self.sent += 1;
                    if self.isolated.contains(&envelope.src) || self.isolated.contains(&envelope.dst) {
                        continue;
                    }
                    let (a, b) = (envelope.src.min(envelope.dst), envelope.src.max(envelope.dst));
                    if self.cut.contains(&(a, b)) {
                        continue;
                    }
                    if self.crashed.contains(&envelope.dst) || self.cut_one_way.contains(&(envelope.src, envelope.dst))
                    {
                        continue;
                    }
                    if envelope.role == Role::Learner && self.learner_blocked.contains(&envelope.dst) {
                        continue;
                    }
                    if envelope.role == Role::Acceptor && self.acceptor_down.contains(&envelope.dst) {
                        continue;
                    }
                    match self.filter.as_mut().map_or(Fate::Deliver, |f| f(&envelope)) {
                        Fate::Deliver => self.deliver(envelope),
                        Fate::Drop => {}
                        Fate::Hold => self.held.push(envelope),
                    }
                }
                Effect::Reply(request, outcome) => {
                    self.replies.insert(request, outcome);
                }
                Effect::Log(line) => {
                    if std::env::var_os("SIM_LOG").is_some() {
                        eprintln!("{} node {id}: {line}", self.now_ms);
                    }
                }
                Effect::Members(members) => {
                    self.members.insert(id, members);
                }
            }
        }
    }

    pub fn deliver(&mut self, envelope: Envelope) {
        self.inbox.entry(envelope.dst).or_default().push(Event::Message(envelope));
    }

    /// Delivers the held messages that `which` selects, ahead of everything else queued for
    /// their receivers (they were sent long ago), whatever cuts are in place now.
    pub fn release_held(&mut self, mut which: impl FnMut(&Envelope) -> bool) -> usize {
        let held = std::mem::take(&mut self.held);
        let (release, keep): (Vec<Envelope>, Vec<Envelope>) = held.into_iter().partition(|e| which(e));
        self.held = keep;
        let count = release.len();
        for envelope in release.into_iter().rev() {
            self.inbox.entry(envelope.dst).or_default().insert(0, Event::Message(envelope));
        }
        count
    }

    /// Cuts every link between the two sides.
    pub fn partition(&mut self, left: &[NodeId], right: &[NodeId]) {
        for &a in left {
            for &b in right {
                self.cut.insert((a.min(b), a.max(b)));
            }
        }
    }

    /// Hot-swaps a node's build: the hand-over snapshot starts a new instance, as the host does.
    pub fn hot_swap(&mut self, id: NodeId) {
        let config = self.nodes[&id].config().clone();
        let handover = self.nodes[&id].snapshot(true);
        let mut replica =
            Replica::start(config, Some(&handover), &[]).expect("the new build starts from the hand-over");
        let effects = replica.take_effects();
        self.nodes.insert(id, replica);
        self.carry_out(id, effects);
    }

    /// Advances time until `done` holds (true) or `max_ms` passes (false).
    pub fn run_until(&mut self, max_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now_ms + max_ms;
        while self.now_ms < end {
            if done(self) {
                return true;
            }
            self.tick();
        }
        done(self)
    }

    pub fn run_for(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.tick();
        }
    }

    /// Live leaders (not crashed, not isolated).
    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(id, r)| r.proposer.is_leader() && !self.crashed.contains(id) && !self.isolated.contains(id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// A leader that has kept its place for a second (start-up elections can duel briefly).
    pub fn wait_for_stable_leader(&mut self) -> NodeId {
        loop {
            let leader = self.wait_for_leader();
            self.run_for(1_000);
            if self.leaders() == vec![leader] {
                return leader;
            }
            assert!(self.now_ms < 60_000, "no stable leader");
        }
    }

    pub fn wait_for_leader(&mut self) -> NodeId {
        assert!(self.run_until(10_000, |s| s.leaders().len() == 1), "no single leader within 10 s");
        self.leaders()[0]
    }

    /// Runs a request to completion and returns its outcome.
    pub fn call(&mut self, node: NodeId, client: u64, seq: u64, command: Command) -> Outcome {
        let id = self.request(node, client, seq, command);
        assert!(self.run_until(10_000, |s| s.replies.contains_key(&id)), "request {id} at node {node} got no reply");
        self.replies[&id].clone()
    }

    /// Crashes a node: its memory is gone; it restarts from what it persisted.
    pub fn crash(&mut self, id: NodeId) {
        self.crashed.insert(id);
        self.inbox.remove(&id);
        self.unsynced.remove(&id);
    }

    /// Starts a new replica `id` that joins with `members` (itself among them, as a learner),
    /// as a host started with `--join` does.
    pub fn join(&mut self, id: NodeId, members: Vec<Member>) {
        let config = Config {
            me: id,
            members,
            seed: self.seed ^ u64::from(id),
            test_hooks: false,
            retain_slots: self.nodes.values().next().map_or(1_000, |r| r.config().retain_slots),
            rejoining: false,
        };
        self.nodes.insert(id, Replica::start(config, None, &[]).expect("a joining replica starts"));
    }

    /// Takes a node out for good (its host is gone: crashed and never restarted).
    pub fn remove_node(&mut self, id: NodeId) {
        self.crash(id);
        self.nodes.remove(&id);
    }

    pub fn restart(&mut self, id: NodeId) {
        let config = self.nodes[&id].config().clone();
        let wal = self.wal.get(&id).cloned().unwrap_or_default();
        self.nodes.insert(id, Replica::start(config, None, &wal).expect("restart from WAL"));
        self.crashed.remove(&id);
    }

    /// Crashes a node and restarts it with its disk wiped: it rejoins.
    pub fn wipe_and_restart(&mut self, id: NodeId) {
        self.crash(id);
        self.wal.remove(&id);
        self.unsynced.remove(&id);
        let mut config = self.nodes[&id].config().clone();
        config.rejoining = true;
        let mut replica = Replica::start(config, None, &[]).expect("start wiped");
        let effects = replica.take_effects();
        self.nodes.insert(id, replica);
        self.crashed.remove(&id);
        self.carry_out(id, effects);
    }

    pub fn value_at(&self, node: NodeId, key: &str) -> Option<Vec<u8>> {
        self.nodes[&node].learner.kv.data.get(key).cloned()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

pub fn put(key: &str, value: &str) -> Command {
    Command::Put(key.to_string(), value.as_bytes().to_vec())
}

pub fn get(key: &str) -> Command {
    Command::Get(key.to_string())
}

pub fn delete(key: &str) -> Command {
    Command::Delete(key.to_string())
}

/// A tiny deterministic PRNG for the chaos runs (the guest's own is not public API).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Whether `n`'s acceptor takes part in votes.
pub fn voting(sim: &Sim, n: NodeId) -> bool {
    sim.nodes[&n].status().contains("\"voting\":true")
}

impl Sim {
    /// One network move of a chaos run, chosen by `what` (0..5): a partition with at most
    /// `minority_max` nodes on the small side, healing it, a one-way cut from `node`, healing
    /// those, or toggling `node`'s acceptor outage. Returns false for another `what`.
    pub fn network_fault(&mut self, what: u64, node: NodeId, minority_max: u64, rng: &mut Lcg) -> bool {
        match what {
            0 => {
                let cut = rng.below(minority_max) as usize + 1;
                let mut order: Vec<NodeId> = (1..=5).collect();
                order.rotate_left(rng.below(5) as usize);
                self.partition(&order[..cut], &order[cut..]);
            }
            1 => self.cut.clear(),
            2 => {
                let other = rng.below(5) as NodeId + 1;
                if other != node {
                    self.cut_one_way.insert((node, other));
                }
            }
            3 => self.cut_one_way.clear(),
            4 => {
                if !self.acceptor_down.remove(&node) {
                    self.acceptor_down.insert(node);
                }
            }
            _ => return false,
        }
        true
    }
}
