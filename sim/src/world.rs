//! The simulated world: N instances of the real guest build on a virtual clock, driven as the
//! host drives them, with clients whose history is checked.
//!
//! It owns the run loop and the replicas' life cycle: boot (`start(snapshot, wal)`, with
//! `rejoining` when the disk was wiped, as `host/src/main.rs` does), stepping (inbox batches,
//! the guest's messages to itself looped back into its next step, the effects handed to the
//! replica's `Disk`, which holds them until their sync, compaction every few records, on the
//! step loop or off it, with staged hot swaps: `background`), and the
//! clients (random puts, gets and deletes, retried on a random replica, given up after a
//! while). The network is `net`, storage is `disk`, the fault schedule is `faults`, and the
//! checks are `checker` (linearizability) and `agreement` (no slot with two values; replicas
//! converge). Everything is drawn from one seed: the same seed replays the same history, bit
//! for bit.

use waxos_host::runtime::{Command, Effect, Envelope, Event, Guest, GuestBuild, GuestConfig, Outcome, Request};

use crate::agreement::Agreement;
use crate::checker::{Entry, Op, Ret};
use crate::disk::Disk;
use crate::net::Net;
pub use crate::rng::Rng;
pub use crate::stats::Stats;

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
    /// Inject faults (crashes, wipes, pauses, partitions, cuts, outages, loss, delays, swaps).
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
            ops_per_client: 50,
            keys: 6,
            faults: true,
            fault_window_ms: 12_000,
            liveness_ms: 20_000,
        }
    }
}

/// One simulated host: its guest, its disk and what waits for its next step.
pub(crate) struct Node {
    pub(crate) guest: Option<Guest>,
    /// Which of the builds runs.
    pub(crate) build: usize,
    pub(crate) config: GuestConfig,
    pub(crate) disk: Disk,
    /// Compaction every this many records (the host's `--snapshot-every`).
    pub(crate) snapshot_every_records: u64,
    pub(crate) inbox: Vec<Event>,
    /// The guest's messages to itself: the first events of its next step.
    pub(crate) loopback: Vec<Envelope>,
    /// Crashed (or wiped) until then.
    pub(crate) down_until_ms: Option<u64>,
    /// When it last came back from a crash or a pause.
    pub(crate) back_at_ms: u64,
    /// Not stepped before this time (its inbox keeps filling).
    pub(crate) paused_until_ms: u64,
    pub(crate) acceptor_out_until_ms: u64,
    /// The disk was wiped once: a restart with nothing on it rejoins.
    pub(crate) wiped: bool,
    /// Wiped and not voting again yet: without state.
    pub(crate) rejoining: bool,
    /// A crash planned for then: a rejoiner killed right after its restart, before its first
    /// record is durable (the host's crash point `rejoin.after_roster_saved`).
    pub(crate) crash_at_ms: Option<u64>,
    /// When the last hot swap happened.
    pub(crate) swapped_at_ms: Option<u64>,
    /// No compaction before this time (a scenario keeps an early snapshot on the disk).
    pub(crate) compact_hold_until_ms: u64,
    /// Stopped for good (dead for good, or removed and stopped by its operator, or an id
    /// given to a member that never started): never stepped or restarted again.
    pub(crate) retired: bool,
    /// The host's job off its step loop, if one runs (see `background`).
    pub(crate) background: Option<crate::background::Job>,
    /// A staged swap asked for during a compaction off the loop: its preparation time.
    pub(crate) swap_waiting: Option<u64>,
    /// The members its guest last announced (`Effect::Members`): what a joining host is given.
    pub(crate) known_members: Vec<waxos_host::runtime::GuestMember>,
}

impl Node {
    /// A host not started yet, with an empty disk.
    pub(crate) fn new(config: GuestConfig, snapshot_every_records: u64) -> Node {
        Node {
            guest: None,
            build: 0,
            config,
            disk: Disk::default(),
            snapshot_every_records,
            inbox: Vec::new(),
            loopback: Vec::new(),
            down_until_ms: None,
            back_at_ms: 0,
            paused_until_ms: 0,
            acceptor_out_until_ms: 0,
            wiped: false,
            rejoining: false,
            crash_at_ms: None,
            swapped_at_ms: None,
            compact_hold_until_ms: 0,
            retired: false,
            background: None,
            swap_waiting: None,
            known_members: Vec::new(),
        }
    }
}

struct ClientOp {
    key: String,
    op: Op,
    seq: u64,
    attempt_deadline: u64,
    give_up_at: u64,
    request_id: u64,
}

/// Where clients go while a scenario steers them (see `scenarios`): away from `avoid`, except
/// one client that only reads, at `reader_node`.
pub(crate) struct Steer {
    pub(crate) avoid: Vec<usize>,
    pub(crate) reader: usize,
    pub(crate) reader_node: usize,
    pub(crate) until_ms: u64,
}

pub(crate) struct Client {
    done: u32,
    /// The next operation starts no earlier than this (think time).
    pub(crate) idle_until: u64,
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
    /// Requests still pending long after every fault healed, or no progress while a majority
    /// was healthy and connected.
    Liveness(String),
    /// Replicas disagree: a slot learned with two values, or different states at one slot.
    Divergence(String),
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
    pub(crate) builds: &'a [GuestBuild],
    pub(crate) config: SimConfig,
    pub(crate) rng: Rng,
    pub(crate) now: u64,
    pub(crate) nodes: Vec<Node>,
    pub(crate) net: Net,
    pub(crate) clients: Vec<Client>,
    /// Clients steered by a scenario.
    pub(crate) steer: Option<Steer>,
    /// request id -> (client index, seq).
    requests: std::collections::BTreeMap<u64, (usize, u64)>,
    pub(crate) next_request: u64,
    /// The operator reconfiguring the cluster, in a seed that does (see `membership`).
    pub(crate) operator: Option<crate::membership::Operator>,
    history: Vec<Entry>,
    pub(crate) stats: Stats,
    trace: Option<Vec<String>>,
    pub(crate) liveness: Option<String>,
    pub(crate) agreement: Agreement,
    /// A safety failure found while stepping (a slot with two values).
    pub(crate) divergence: Option<String>,
    /// Per set of replicas (a bit mask), since when it has been healthy and fully connected
    /// (see `faults`).
    pub(crate) healthy_since_ms: Vec<Option<u64>>,
    /// A symmetric partition lasts until then.
    pub(crate) partition_until_ms: u64,
    /// The fault window is over and everything healed.
    pub(crate) healed: bool,
    /// The steps of the scenario in progress (see `scenarios`), by time.
    pub(crate) script: Vec<(u64, crate::scenarios::Action)>,
    /// Random faults other than hot swaps wait until then (a scenario plays out).
    pub(crate) quiet_until_ms: u64,
    /// Which fault kinds this seed injects, how often.
    pub(crate) mix: crate::faults::FaultMix,
    /// The last time a client operation completed, or no client waited.
    pub(crate) progress_ms: u64,
    /// The draws of the fault kinds added later (see `faults::FIRST_KINDS`): their own
    /// stream, so that a seed without them runs as it did before they existed.
    pub(crate) later_rng: Rng,
    /// The draws of the work off the step loop (see `background`): a stream of its own too.
    pub(crate) staging_rng: Rng,
    /// Which share of compactions and swaps this seed makes off the step loop.
    pub(crate) staging_mix: crate::background::StagingMix,
    /// A failure found off the step loop (or at a staged switch): the tick ends the run with it.
    pub(crate) background_failure: Option<Failure>,
}

pub(crate) const TICK_MS: u64 = 5;
const ATTEMPT_TIMEOUT_MS: u64 = 400;
const GIVE_UP_MS: u64 = 4_000;
/// Time allowed after the fault window for the cluster to settle (elections, catch-up, and the
/// long-delayed messages still in flight).
const RECOVERY_MS: u64 = 3_000;
/// Mean pause between a client's operations, so a run spans the fault window.
const THINK_MS: u64 = 150;
/// Bound on events handed to one `step` (the host's `STEP_EVENTS_MAX`).
const STEP_EVENTS_MAX: usize = 4_096;
/// Compaction every `SNAPSHOT_EVERY_RECORDS` records (drawn per replica): small, so restarts
/// from a snapshot are common.
pub(crate) const SNAPSHOT_EVERY_RECORDS: (u64, u64) = (20, 61);
/// Retained applied slots (drawn per run): small, so catch-up by snapshot transfer happens.
const RETAIN_SLOTS: (u64, u64) = (8, 41);
/// Retained applied slots in a run with the lagging-majority scenario, and in half the others.
const RETAIN_SLOTS_LAGGING: (u64, u64) = (5, 12);

impl<'a> World<'a> {
    /// A world of `config.nodes` instances of `builds[0]` (a second build, if given, is swapped
    /// in and out at random).
    pub fn new(builds: &'a [GuestBuild], config: SimConfig, seed: u64, trace: bool) -> Result<World<'a>, Failure> {
        let mut rng = Rng::new(seed);
        let members: Vec<u32> = (1..=config.nodes).collect();
        let mut later_rng = Rng::new(seed ^ 0x5CE7_A210_F00D_0001);
        let mix = crate::faults::FaultMix::draw(&mut rng, &mut later_rng);
        let mut staging_rng = Rng::new(seed ^ 0x57A6_ED5A_0FF1_0003);
        let staging_mix = crate::background::StagingMix::draw(&mut staging_rng);
        let retain_slots = if !config.faults {
            50
        } else if (mix.rate(crate::faults::Kind::LaggingMajority, 1.0) > 0.0 || rng.chance(0.5))
            || mix.rate(crate::faults::Kind::SnapshotRejoin, 1.0) > 0.0
        {
            // Tiny: lagging replicas fall behind what the others retain all the time.
            rng.range(RETAIN_SLOTS_LAGGING.0, RETAIN_SLOTS_LAGGING.1)
        } else {
            rng.range(RETAIN_SLOTS.0, RETAIN_SLOTS.1)
        };
        let mut nodes = Vec::new();
        for &me in &members {
            let guest_config = GuestConfig {
                me,
                members: waxos_host::runtime::voters(&members),
                seed: rng.next_u64(),
                test_hooks: false,
                retain_slots,
                rejoining: false,
            };
            let snapshot_every_records =
                if config.faults { rng.range(SNAPSHOT_EVERY_RECORDS.0, SNAPSHOT_EVERY_RECORDS.1) } else { u64::MAX };
            nodes.push(Node::new(guest_config, snapshot_every_records));
        }
        let clients = (0..config.clients)
            .map(|_| Client { done: 0, idle_until: 0, current: None, history_index: None })
            .collect();
        // One clock per set of replicas for the progress check (five replicas: 32 sets).
        let sets = 1usize << nodes.len().min(16);
        let operator = crate::membership::Operator::draw(seed, nodes.len());
        let mut world = World {
            builds,
            net: Net::new(nodes.len(), config.faults),
            config,
            rng,
            now: 1_000,
            nodes,
            clients,
            steer: None,
            requests: std::collections::BTreeMap::new(),
            next_request: 1,
            operator,
            history: Vec::new(),
            stats: Stats::default(),
            trace: trace.then(Vec::new),
            liveness: None,
            agreement: Agreement::default(),
            divergence: None,
            healthy_since_ms: vec![None; sets],
            partition_until_ms: 0,
            healed: false,
            script: Vec::new(),
            quiet_until_ms: 0,
            mix,
            progress_ms: 1_000,
            later_rng,
            staging_rng,
            staging_mix,
            background_failure: None,
        };
        let mix = world.mix.to_string();
        world.note(|| format!("retain_slots {retain_slots}; faults: {mix}"));
        let staging = world.staging_mix.to_string();
        world.note(|| format!("off the step loop: {staging}"));
        if let Some(program) = world.operator.as_ref().map(|o| o.to_string()) {
            world.note(|| format!("membership: {program}"));
        }
        for i in 0..world.nodes.len() {
            world.boot(i)?;
        }
        Ok(world)
    }

    /// Every replica's status, into the trace (when a run fails).
    pub(crate) fn note_statuses(&mut self) {
        if self.tracing() {
            for i in 0..self.nodes.len() {
                let status = self.status(i).unwrap_or_else(|| "down".into());
                self.note(|| format!("node {} status: {status}", i + 1));
            }
        }
    }

    /// Whether a trace is kept (what only the trace needs is computed only then).
    pub(crate) fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    pub(crate) fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!("{:>7} ms  {}", self.now, line()));
        }
    }

    /// Starts node `i` from its disk: the snapshot and the records after it; with nothing on a
    /// disk that was wiped, as a rejoining replica.
    pub(crate) fn boot(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        // A compaction off the loop saved its snapshot but did not drop what it covers: the
        // host reads past it (and deletes it with the next compaction).
        node.disk.drop_covered();
        let empty = node.disk.snapshot.is_none() && node.disk.durable.is_empty();
        node.config.rejoining = node.wiped && empty;
        if node.disk.snapshot.is_some() {
            self.stats.snapshot_restarts += 1;
        }
        let mut guest = self.builds[node.build].instantiate().map_err(|e| Failure::GuestCrash(e.to_string()))?;
        let effects = match guest.start(&node.config, node.disk.snapshot.as_deref(), node.disk.records_after_snapshot())
        {
            Ok(Ok(effects)) => effects,
            Ok(Err(refused)) => {
                return Err(Failure::GuestCrash(format!("node {} refused its state: {refused}", i + 1)))
            }
            Err(crash) => return Err(Failure::GuestCrash(format!("node {}: {crash}", i + 1))),
        };
        node.guest = Some(guest);
        self.carry_out(i, effects);
        Ok(())
    }

    /// The status JSON of node `i`'s guest, if it runs.
    pub(crate) fn status(&mut self, i: usize) -> Option<String> {
        self.nodes[i].guest.as_mut().and_then(|g| g.status().ok())
    }

    /// The node whose guest says it leads, if any.
    pub(crate) fn leader(&mut self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.status(i).is_some_and(|s| s.contains("\"role\":\"leader\"")))
    }

    /// Hands a message to the network (or, to the sender itself, to its next step).
    fn send(&mut self, envelope: Envelope) {
        let src = envelope.src as usize - 1;
        if envelope.dst == envelope.src {
            self.nodes[src].loopback.push(envelope);
            return;
        }
        match self.net.send(envelope, self.now, &mut self.rng) {
            crate::net::Fate::Lost => self.stats.lost += 1,
            crate::net::Fate::Sent { copies, long } => {
                self.stats.duplicated += u64::from(copies - 1);
                self.stats.long_delays += u64::from(long);
            }
        }
    }

    fn deliver_due(&mut self) {
        while let Some(due) = self.net.next_due(self.now) {
            let (envelope, sent_ms) = match due {
                Ok(delivery) => delivery,
                Err(_) => {
                    self.stats.lost += 1;
                    continue;
                }
            };
            let dst = envelope.dst as usize - 1;
            let node = &mut self.nodes[dst];
            let outage = envelope.role == waxos_host::runtime::Role::Acceptor && self.now < node.acceptor_out_until_ms;
            if node.guest.is_none() || outage {
                self.stats.lost += 1;
                continue;
            }
            if node.swapped_at_ms.is_some_and(|t| sent_ms < t) {
                self.stats.late_after_swap += 1;
            }
            self.stats.delivered += 1;
            if crate::net::is_forgotten(&envelope) {
                self.stats.forgotten += 1;
            }
            node.inbox.push(Event::Message(envelope));
        }
    }

    fn drive_clients(&mut self) {
        let n = self.nodes.len() as u64;
        if self.clients.iter().all(|c| c.current.is_none()) {
            self.progress_ms = self.now;
        }
        for c in 0..self.clients.len() {
            if self.clients[c].current.is_none()
                && self.clients[c].done < self.config.ops_per_client
                && self.now >= self.clients[c].idle_until
            {
                let mut key = format!("k{}", self.rng.range(0, u64::from(self.config.keys)));
                let mut op = match self.rng.range(0, 10) {
                    0..=3 => Op::Put(format!("c{c}-{}", self.clients[c].done).into_bytes()),
                    4..=7 => Op::Get,
                    _ => Op::Delete,
                };
                if self.steer.as_ref().is_some_and(|s| s.reader == c && self.now < s.until_ms) {
                    // The steered reader reads what was written last (on the side it is cut off
                    // from, while a scenario runs): a stale answer then shows, whatever the key.
                    op = Op::Get;
                    if let Some(last) = self.last_acknowledged_put(c) {
                        key = last;
                    }
                }
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
                // The first attempt goes to the client's own replica (as a client process bound
                // to one host); retries to a random one.
                // Hosts stopped for good are gone from the clients' lists too (the members known).
                let first = current.attempt_deadline == 0;
                let live: Vec<usize> = (0..n as usize).filter(|&i| !self.nodes[i].retired).collect();
                let mut node =
                    if first { live[c % live.len()] } else { live[self.rng.range(0, live.len() as u64) as usize] };
                if let Some(steer) = self.steer.as_ref().filter(|s| now < s.until_ms) {
                    if first && c == steer.reader {
                        node = steer.reader_node;
                    } else if steer.avoid.contains(&node) {
                        let allowed: Vec<usize> = live.iter().copied().filter(|i| !steer.avoid.contains(i)).collect();
                        node = allowed[(c + self.rng.range(0, allowed.len() as u64) as usize) % allowed.len()];
                    }
                }
                let id = self.next_request;
                self.next_request += 1;
                let Some(current) = self.clients[c].current.as_mut() else { continue };
                current.attempt_deadline = now + ATTEMPT_TIMEOUT_MS;
                current.request_id = id;
                let command = match &current.op {
                    Op::Put(v) => Command::Put((current.key.clone(), v.clone())),
                    Op::Get => Command::Get(current.key.clone()),
                    Op::Delete => Command::Delete(current.key.clone()),
                };
                let request = Request { id, client: 10_000 + c as u64, seq: current.seq, command };
                let seq = current.seq;
                if self.trace.is_some() {
                    let line = format!("client {c} sends {:?} to node {}", request.command, node + 1);
                    self.note(|| line);
                }
                self.requests.insert(id, (c, seq));
                // A paused host still queues requests; a crashed one refuses the connection.
                if self.nodes[node].guest.is_some() {
                    self.nodes[node].inbox.push(Event::Request(request));
                }
            }
        }
    }

    fn on_reply(&mut self, node: usize, id: u64, outcome: Outcome) {
        if self.operator.as_ref().is_some_and(|o| o.asked(id)) {
            self.on_operator_reply(node, id, outcome);
            return;
        }
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
            // Only the operator (`membership`) sends membership changes.
            Outcome::Member(_) => return,
        };
        if let Some(index) = self.clients[c].history_index.take() {
            let entry = &self.history[index];
            let line = format!(
                "client {c} {} {:?} -> {ret:?} from node {} (called at {} ms)",
                entry.key,
                entry.op,
                node + 1,
                entry.call
            );
            self.note(|| line);
            self.history[index].ret = Some((self.now, ret));
        }
        self.clients[c].current = None;
        self.clients[c].done += 1;
        // Think time, unless a scenario holds the client back for longer.
        let think = self.now + self.rng.range(0, 2 * THINK_MS);
        self.clients[c].idle_until = self.clients[c].idle_until.max(think);
        self.stats.completed += 1;
        self.progress_ms = self.now;
    }

    /// Effects node `i`'s disk lets go: messages out, replies to clients, logs to the trace.
    pub(crate) fn release(&mut self, i: usize, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(envelope) => self.send(envelope),
                Effect::Reply((id, outcome)) => self.on_reply(i, id, outcome),
                Effect::Log(line) => self.note(|| format!("node {}: {line}", i + 1)),
                Effect::Members(members) => self.nodes[i].known_members = members,
                Effect::Persist(_) | Effect::PersistLazy(_) => {}
            }
        }
    }

    /// Records of node `i` that became durable are checked for agreement (a record lost in a
    /// crash never had an effect outside: everything after it was held).
    pub(crate) fn observe_durable(&mut self, i: usize) {
        for record in self.nodes[i].disk.take_newly_durable() {
            match self.agreement.observe(i, &record) {
                Ok(installed) => self.stats.snapshot_installs += u64::from(installed),
                Err(problem) => {
                    if self.divergence.is_none() {
                        self.divergence = Some(problem);
                    }
                }
            }
        }
    }

    /// A step's (or a start's) effects, as the host's `carry_out`: records appended (checked
    /// for agreement once durable, and kept for a staged instance being prepared); sends and
    /// replies held until their sync; compaction when due.
    pub(crate) fn carry_out(&mut self, i: usize, effects: Vec<Effect>) {
        self.keep_for_staged(i, &effects);
        let released = self.nodes[i].disk.carry_out(effects, self.now, &mut self.rng);
        self.release(i, released);
        if self.nodes[i].disk.records_since_snapshot >= self.nodes[i].snapshot_every_records
            && self.now >= self.nodes[i].compact_hold_until_ms
        {
            self.compaction_due(i);
        }
    }

    /// The host's compaction on its step loop: drain the syncs (releasing what they held), then
    /// the guest's snapshot replaces the records it covers. Not while a job off the loop works
    /// from the disk.
    pub(crate) fn compact(&mut self, i: usize) {
        if self.nodes[i].background.is_some() {
            return;
        }
        let released = self.nodes[i].disk.drain();
        self.observe_durable(i);
        self.release(i, released);
        let Some(guest) = self.nodes[i].guest.as_mut() else { return };
        match guest.snapshot(false) {
            Ok(snapshot) => {
                self.nodes[i].disk.compact(snapshot);
                self.stats.compactions += 1;
            }
            Err(crash) => {
                self.nodes[i].guest = None;
                if self.divergence.is_none() {
                    self.divergence = Some(format!("node {} crashed in snapshot: {crash}", i + 1));
                }
            }
        }
    }

    fn step_nodes(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].guest.is_none() || self.now < self.nodes[i].paused_until_ms {
                continue;
            }
            self.collect_background(i);
            let released = self.nodes[i].disk.poll(self.now, &mut self.rng);
            self.observe_durable(i);
            self.release(i, released);
            let node = &mut self.nodes[i];
            let mut events: Vec<Event> = node.loopback.drain(..).map(Event::Message).collect();
            let take = node.inbox.len().min(STEP_EVENTS_MAX.saturating_sub(events.len()));
            events.extend(node.inbox.drain(..take));
            if events.is_empty() {
                events.push(Event::Tick);
                // As the host: an idle step makes lazily persisted records durable.
                node.disk.on_idle(self.now, &mut self.rng);
            }
            let Some(guest) = node.guest.as_mut() else { continue };
            let effects =
                guest.step(self.now, &events).map_err(|e| Failure::GuestCrash(format!("node {}: {e}", i + 1)))?;
            self.stats.steps += 1;
            self.carry_out(i, effects);
        }
        Ok(())
    }

    fn all_done(&self) -> bool {
        self.clients.iter().all(|c| c.done >= self.config.ops_per_client && c.current.is_none())
    }

    /// One tick of virtual time: faults heal and start, messages arrive, clients act, replicas
    /// step.
    pub(crate) fn tick(&mut self) -> Result<(), Failure> {
        self.now += TICK_MS;
        self.heal()?;
        self.run_background();
        self.inject_faults();
        self.operate();
        self.deliver_due();
        self.drive_clients();
        self.step_nodes()?;
        self.check_progress();
        match self.background_failure.take() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Runs to the end and checks the history, then that the replicas agree.
    pub fn run(mut self) -> Result<Run, (Failure, Vec<String>)> {
        let end = self.config.fault_window_ms + self.config.liveness_ms;
        while !self.all_done() {
            if let Some(problem) = self.divergence.take() {
                return Err((Failure::Divergence(problem), self.trace.unwrap_or_default()));
            }
            if let Some(problem) = self.liveness.take() {
                self.note_statuses();
                return Err((Failure::Liveness(problem), self.trace.unwrap_or_default()));
            }
            if self.now > end {
                self.note_statuses();
                let pending =
                    self.clients.iter().filter(|c| c.current.is_some() || c.done < self.config.ops_per_client).count();
                let failure = Failure::Liveness(format!(
                    "{pending} clients still not done {} ms after faults healed",
                    self.config.liveness_ms
                ));
                return Err((failure, self.trace.unwrap_or_default()));
            }
            if let Err(f) = self.tick() {
                return Err((f, self.trace.unwrap_or_default()));
            }
        }
        if let Err(e) = crate::checker::check(&self.history) {
            return Err((Failure::NotLinearizable(e), self.trace.unwrap_or_default()));
        }
        if let Err(f) = self.converge_and_compare() {
            return Err((f, self.trace.unwrap_or_default()));
        }
        Ok(Run { stats: self.stats, history: self.history, trace: self.trace.unwrap_or_default() })
    }

    /// Reads `keys` from node `i`'s applied state with `get-stale` (no quorum, no log), in one
    /// step of its own; the step's other effects are carried out as usual.
    pub(crate) fn read_stale(&mut self, i: usize, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Failure> {
        const STALE_ID_BASE: u64 = 1 << 62;
        let mut events: Vec<Event> = self.nodes[i].loopback.drain(..).map(Event::Message).collect();
        events.append(&mut self.nodes[i].inbox);
        events.extend(keys.iter().enumerate().map(|(k, key)| {
            Event::Request(Request {
                id: STALE_ID_BASE + k as u64,
                client: 1,
                seq: 1,
                command: Command::GetStale(key.clone()),
            })
        }));
        let Some(guest) = self.nodes[i].guest.as_mut() else {
            return Err(Failure::GuestCrash(format!("node {} is down after every fault healed", i + 1)));
        };
        let effects = guest.step(self.now, &events).map_err(|e| Failure::GuestCrash(format!("node {}: {e}", i + 1)))?;
        let mut values = vec![None; keys.len()];
        for effect in &effects {
            if let Effect::Reply((id, Outcome::Value(value))) = effect {
                if let Some(k) = id.checked_sub(STALE_ID_BASE) {
                    if let Some(slot) = values.get_mut(k as usize) {
                        *slot = value.clone();
                    }
                }
            }
        }
        self.carry_out(i, effects);
        Ok(values)
    }

    /// Client `c`'s read in progress, if any, is sent again now as a first attempt.
    /// Any other operation in progress is given up (its outcome stays unknown, as when a client
    /// times out), so the next one, a read, starts now.
    pub(crate) fn retry_read(&mut self, c: usize) {
        let Some(current) = self.clients[c].current.as_mut() else { return };
        if current.op == Op::Get {
            current.attempt_deadline = 0;
        } else {
            current.give_up_at = self.now;
        }
    }

    /// The key of the latest acknowledged PUT by a client other than `c`.
    fn last_acknowledged_put(&self, c: usize) -> Option<String> {
        self.history
            .iter()
            .filter(|e| e.client as usize != c && matches!(e.op, Op::Put(_)) && e.ret.is_some())
            .max_by_key(|e| e.ret.as_ref().map(|(t, _)| *t))
            .map(|e| e.key.clone())
    }

    /// Every client key name of this run.
    pub(crate) fn key_names(&self) -> Vec<String> {
        (0..self.config.keys).map(|k| format!("k{k}")).collect()
    }
}

/// The number in `"field":N` of a status JSON.
pub(crate) fn status_number(status: &str, field: &str) -> Option<u64> {
    let at = status.find(&format!("\"{field}\":"))? + field.len() + 3;
    let digits: String = status[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
