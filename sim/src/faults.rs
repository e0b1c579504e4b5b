//! The fault schedule: which faults start, where, and for how long, and when they heal; and
//! the progress check that only makes sense against it.
//!
//! Faults are drawn from the run's seed every tick of the fault window, each kind at its own
//! rate, so that production's whole fault model is covered:
//! - *crash*: the host dies; its disk keeps what was durable (see `disk`), it restarts from
//!   `start(snapshot, wal)` after a while;
//! - *wipe*: the host loses its disk and comes back with nothing, `rejoining` (as
//!   `host/src/main.rs` starts a host whose coordinator says it lost its state); never more
//!   than a minority is without state at once; a third of rejoiners crash again within a
//!   sync's time of their restart, between the roster and the first durable record (the host's
//!   `rejoin.after_roster_saved` crash point): the roster's flag alone must keep them silent;
//! - *pause*: the host stops stepping for up to seconds while its inbox fills, then resumes
//!   with a queue of old messages;
//! - *partitions*: symmetric (two sides, often the leader with one follower), asymmetric (one
//!   side hears the other, not the reverse), a single link cut one way, a *deaf leader* (what a
//!   majority of followers send the leader is lost; it can still send), a slow link;
//! - *acceptor outage* (the host's chaos: envelopes to the acceptor role dropped);
//! - *hot swap* to the other build, half the time at the leader; the old way (a hand-over
//!   snapshot) or staged (`background`), a share of each per seed.
//!
//! At the end of the window everything heals at once. The progress check: while a majority of
//! replicas is up, unpaused, voting, free of outages, fully connected among itself (both
//! directions, no slow link) and not flooded with stale messages from outside (a slow link into
//! it, or one within the longest delay from a replica that was down or paused meanwhile: a
//! stream of seconds-old heartbeats from a dead leader is indistinguishable from a slow live
//! one), some client operation must complete within `PROGRESS_MS` — a
//! cluster that could make progress but does not (a leader nobody can depose) is a failure even
//! before the faults heal.

use crate::world::{Failure, World};

/// With a healthy connected majority, some operation must complete within this time (several
/// election timeouts, plus a client's retry at another replica).
pub const PROGRESS_MS: u64 = 4_000;
/// How often a rejoining replica's status is looked at (is it voting again?).
const REJOIN_POLL_MS: u64 = 100;

/// Per-tick probability of each fault kind, and how long each lasts (ms).
mod rate {
    pub const CRASH: f64 = 0.003;
    pub const CRASH_DURING_PARTITION: f64 = 0.006;
    pub const CRASH_DOWN_MS: (u64, u64) = (50, 800);
    pub const WIPE: f64 = 0.0005;
    pub const WIPE_DOWN_MS: (u64, u64) = (100, 1_500);
    pub const PAUSE: f64 = 0.0008;
    pub const PAUSE_MS: (u64, u64) = (300, 4_000);
    pub const PARTITION: f64 = 0.002;
    pub const PARTITION_MS: (u64, u64) = (200, 2_000);
    pub const ASYMMETRIC_PARTITION: f64 = 0.0008;
    pub const ASYMMETRIC_PARTITION_MS: (u64, u64) = (300, 3_000);
    pub const ONE_WAY_CUT: f64 = 0.002;
    pub const ONE_WAY_CUT_MS: (u64, u64) = (200, 3_000);
    pub const DEAF_LEADER: f64 = 0.0012;
    pub const DEAF_LEADER_MS: (u64, u64) = (4_500, 7_500);
    pub const SLOW_LINK: f64 = 0.001;
    pub const SLOW_LINK_MS: (u64, u64) = (300, 3_000);
    pub const OUTAGE: f64 = 0.003;
    pub const OUTAGE_MS: (u64, u64) = (100, 1_000);
    pub const SWAP: f64 = 0.003;
    /// A rejoiner's restart is followed by a crash within a sync's time (before its first
    /// record is durable) this often.
    pub const CRASH_REJOINER_ON_START: f64 = 0.3;
}

/// Fault kinds, for the per-seed mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Crash and restart from disk.
    Crash,
    /// Disk lost, rejoin.
    Wipe,
    /// Not stepped for a while.
    Pause,
    /// Two sides, both directions cut.
    Partition,
    /// One side cannot hear the other.
    AsymmetricPartition,
    /// One link cut one way.
    OneWayCut,
    /// What followers send the leader is lost.
    DeafLeader,
    /// Every message on a link delayed long.
    SlowLink,
    /// The acceptor role's envelopes dropped.
    Outage,
    /// Hot swap to the other build.
    Swap,
    /// Scenario (see `scenarios`): a wipe while most acceptors are out, then a partition.
    WipeDuringOutages,
    /// Scenario: slow confirmations, a hot swap of the leader, then a partition.
    ReadAcrossSwap,
    /// Scenario: three followers' learners fall behind, the leader crashes.
    LaggingMajority,
    /// Scenario: a rejoiner's fence answers replayed into its next life's fence.
    FenceReplay,
    /// Scenario: a rejoiner compacted before its fence completes restarts from that snapshot.
    SnapshotRejoin,
    /// Scenario: one follower misses the leader's heartbeats while everything else is fine;
    /// the leader must stay.
    MissedHeartbeats,
    /// Scenario: an acceptor that promised a new leader's ballot restarts, as the stalled old
    /// leader's accepts reach it.
    RestartAfterPromise,
    /// Scenario: a lagging replica is elected, and the acceptors it needs compact the slots it
    /// proposes again before its accepts reach them.
    CompactedPastLeader,
}

/// Every kind, in the order the mix is drawn.
pub const KINDS: [Kind; 18] = [
    Kind::Crash,
    Kind::Wipe,
    Kind::Pause,
    Kind::Partition,
    Kind::AsymmetricPartition,
    Kind::OneWayCut,
    Kind::DeafLeader,
    Kind::SlowLink,
    Kind::Outage,
    Kind::Swap,
    Kind::WipeDuringOutages,
    Kind::ReadAcrossSwap,
    Kind::LaggingMajority,
    Kind::FenceReplay,
    Kind::SnapshotRejoin,
    Kind::MissedHeartbeats,
    Kind::RestartAfterPromise,
    Kind::CompactedPastLeader,
];

/// The kinds of `KINDS` whose mix (and scenario starts) draw from the run's main stream; the
/// later ones draw from `World::later_rng`.
pub const FIRST_KINDS: usize = 13;

/// Each fault kind is on in a seed with this probability…
const KIND_ON_CHANCE: f64 = 0.7;
/// …at its base rate times a factor in this range (percent).
const KIND_RATE_PERCENT: (u64, u64) = (40, 250);

/// Which fault kinds a seed injects, and how often relative to their base rate: seeds differ
/// in kind, not only in timing (as Jepsen combines nemeses), so that a fault whose effect
/// another kind would mask (a deaf leader that crashes soon after) also runs on its own.
#[derive(Clone, Debug)]
pub struct FaultMix {
    /// Rate factor per kind, in `KINDS` order (0: off).
    factor: [f64; KINDS.len()],
}

impl FaultMix {
    /// Draws a mix.
    pub fn draw(rng: &mut crate::rng::Rng, later: &mut crate::rng::Rng) -> FaultMix {
        let mut factor = [0.0; KINDS.len()];
        for (k, f) in factor.iter_mut().enumerate() {
            // The kinds added after the first `FIRST_KINDS` draw from their own stream, so
            // that the seeds of the earlier kinds keep their mixes.
            let rng = if k < FIRST_KINDS { &mut *rng } else { &mut *later };
            // Crashes are the bread and butter of every run (most safety bugs need one).
            let on = rng.chance(KIND_ON_CHANCE) || KINDS[k] == Kind::Crash;
            let percent = rng.range(KIND_RATE_PERCENT.0, KIND_RATE_PERCENT.1);
            *f = if on { percent as f64 / 100.0 } else { 0.0 };
        }
        FaultMix { factor }
    }

    /// Every kind at its base rate.
    pub fn all() -> FaultMix {
        FaultMix { factor: [1.0; KINDS.len()] }
    }

    /// The per-tick probability of `kind`, from its base rate.
    pub fn rate(&self, kind: Kind, base: f64) -> f64 {
        let k = KINDS.iter().position(|&x| x == kind).unwrap_or(0);
        base * self.factor[k]
    }
}

impl std::fmt::Display for FaultMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on: Vec<String> =
            KINDS.iter().zip(self.factor).filter(|(_, x)| *x > 0.0).map(|(k, x)| format!("{k:?} x{x:.1}")).collect();
        write!(f, "{}", on.join(", "))
    }
}

impl World<'_> {
    /// Starts this tick's faults (none outside the fault window).
    pub(crate) fn inject_faults(&mut self) {
        if !self.config.faults || self.now >= self.config.fault_window_ms {
            return;
        }
        let n = self.nodes.len();
        self.run_scenarios();
        if self.now < self.quiet_until_ms {
            // A scenario plays out: random crashes, wipes, pauses and cuts would only blur it.
            if self.builds.len() > 1 && self.rng.chance(self.mix.rate(Kind::Swap, rate::SWAP)) {
                let i = self.rng.range(0, n as u64) as usize;
                self.swap(i);
            }
            return;
        }
        let partitioned = self.now < self.partition_until_ms;
        if self
            .rng
            .chance(self.mix.rate(Kind::Crash, if partitioned { rate::CRASH_DURING_PARTITION } else { rate::CRASH }))
        {
            let i = self.rng.range(0, n as u64) as usize;
            self.crash(i, false);
        }
        if self.rng.chance(self.mix.rate(Kind::Wipe, rate::WIPE)) {
            let i = self.rng.range(0, n as u64) as usize;
            if self.may_wipe(i) {
                self.crash(i, true);
            }
        }
        if self.rng.chance(self.mix.rate(Kind::Pause, rate::PAUSE)) {
            let i = self.rng.range(0, n as u64) as usize;
            if self.nodes[i].guest.is_some() && self.now >= self.nodes[i].paused_until_ms {
                let ms = self.rng.range(rate::PAUSE_MS.0, rate::PAUSE_MS.1);
                self.pause(i, ms);
            }
        }
        if !partitioned && self.rng.chance(self.mix.rate(Kind::Partition, rate::PARTITION)) {
            self.partition();
        }
        if self.rng.chance(self.mix.rate(Kind::AsymmetricPartition, rate::ASYMMETRIC_PARTITION)) {
            let ms = self.rng.range(rate::ASYMMETRIC_PARTITION_MS.0, rate::ASYMMETRIC_PARTITION_MS.1);
            let deaf: Vec<bool> = (0..n).map(|_| self.rng.chance(0.5)).collect();
            for a in 0..n {
                for b in 0..n {
                    if deaf[b] && !deaf[a] {
                        self.net.cut(a, b, self.now + ms);
                    }
                }
            }
            self.stats.asymmetric_partitions += 1;
            self.note(|| format!("asymmetric partition for {ms} ms: {deaf:?} hear nothing from the others"));
        }
        if self.rng.chance(self.mix.rate(Kind::OneWayCut, rate::ONE_WAY_CUT)) {
            let src = self.rng.range(0, n as u64) as usize;
            let dst = (src + 1 + self.rng.range(0, n as u64 - 1) as usize) % n;
            let ms = self.rng.range(rate::ONE_WAY_CUT_MS.0, rate::ONE_WAY_CUT_MS.1);
            self.net.cut(src, dst, self.now + ms);
            self.stats.one_way_cuts += 1;
            self.note(|| format!("cut {} -> {} for {ms} ms", src + 1, dst + 1));
        }
        // Early enough that it outlasts the progress check before the window ends.
        let early = self.now + PROGRESS_MS + 1_500 < self.config.fault_window_ms;
        if early && self.rng.chance(self.mix.rate(Kind::DeafLeader, rate::DEAF_LEADER)) {
            self.deafen_leader();
        }
        if self.rng.chance(self.mix.rate(Kind::SlowLink, rate::SLOW_LINK)) {
            let src = self.rng.range(0, n as u64) as usize;
            let dst = (src + 1 + self.rng.range(0, n as u64 - 1) as usize) % n;
            let ms = self.rng.range(rate::SLOW_LINK_MS.0, rate::SLOW_LINK_MS.1);
            self.slow_link(src, dst, ms);
        }
        if self.rng.chance(self.mix.rate(Kind::Outage, rate::OUTAGE)) {
            let i = self.rng.range(0, n as u64) as usize;
            let ms = self.rng.range(rate::OUTAGE_MS.0, rate::OUTAGE_MS.1);
            self.outage(i, ms);
        }
        if self.builds.len() > 1 && self.rng.chance(self.mix.rate(Kind::Swap, rate::SWAP)) {
            let at_leader = self.rng.chance(0.5);
            let i = match at_leader.then(|| self.leader()).flatten() {
                Some(leader) => leader,
                None => self.rng.range(0, n as u64) as usize,
            };
            self.swap(i);
        }
    }

    /// Node `i` is not stepped for `ms` (its inbox keeps filling).
    pub(crate) fn pause(&mut self, i: usize, ms: u64) {
        if self.nodes[i].guest.is_none() {
            return;
        }
        let node = &mut self.nodes[i];
        node.paused_until_ms = node.paused_until_ms.max(self.now + ms);
        node.back_at_ms = node.paused_until_ms;
        self.stats.pauses += 1;
        self.note(|| format!("pause node {} for {ms} ms", i + 1));
    }

    /// Envelopes to node `i`'s acceptor are dropped for `ms`.
    pub(crate) fn outage(&mut self, i: usize, ms: u64) {
        let until = &mut self.nodes[i].acceptor_out_until_ms;
        *until = (*until).max(self.now + ms);
        self.stats.outages += 1;
        self.note(|| format!("acceptor outage on node {} for {ms} ms", i + 1));
    }

    /// Every message src→dst is long-delayed for `ms`.
    pub(crate) fn slow_link(&mut self, src: usize, dst: usize, ms: u64) {
        self.net.slow(src, dst, self.now + ms);
        self.stats.slow_links += 1;
        self.note(|| format!("slow link {} -> {} for {ms} ms", src + 1, dst + 1));
    }

    /// Crashes node `i` (with `wipe`, its disk is lost too); it restarts after a while.
    fn crash(&mut self, i: usize, wipe: bool) {
        let (low, high) = if wipe { rate::WIPE_DOWN_MS } else { rate::CRASH_DOWN_MS };
        let down_ms = self.rng.range(low, high);
        self.crash_for(i, wipe, down_ms);
    }

    /// Crashes node `i` for `down_ms` (with `wipe`, its disk is lost too).
    pub(crate) fn crash_for(&mut self, i: usize, wipe: bool, down_ms: u64) {
        if self.nodes[i].guest.is_none() {
            return;
        }
        self.drop_background(i, if wipe { "wiped" } else { "crashed" });
        let node = &mut self.nodes[i];
        node.guest = None;
        node.inbox.clear();
        node.loopback.clear();
        node.paused_until_ms = 0;
        node.down_until_ms = Some(self.now + down_ms);
        if wipe {
            node.disk.wipe();
            node.wiped = true;
            node.rejoining = true;
            self.stats.wipes += 1;
            self.note(|| format!("wipe node {} (disk lost) and restart it in {down_ms} ms", i + 1));
        } else {
            let loss = node.disk.crash(&mut self.rng);
            self.stats.crashes += 1;
            self.stats.records_lost += loss.lost as u64;
            self.stats.held_steps_lost += loss.held_steps as u64;
            self.note(|| {
                format!(
                    "crash node {} for {down_ms} ms ({} records not durable lost, {} kept from a torn sync, {} steps' effects never sent)",
                    i + 1,
                    loss.lost,
                    loss.kept,
                    loss.held_steps
                )
            });
            // A torn sync's kept prefix is durable now.
            self.observe_durable(i);
        }
    }

    /// A symmetric partition: random sides, or (half the time) the leader with one follower
    /// against the rest — the classic nemesis, where the old leader keeps proposing in the
    /// minority while the majority elects another.
    fn partition(&mut self) {
        let n = self.nodes.len();
        // Random sides, both non-empty.
        let cut = self.rng.range(1, (1 << n) - 1);
        let mut sides: Vec<u8> = (0..n).map(|i| ((cut >> i) & 1) as u8).collect();
        if self.rng.chance(0.5) {
            if let Some(leader) = self.leader() {
                let buddy = (leader + 1 + self.rng.range(0, n as u64 - 1) as usize) % n;
                sides = (0..n).map(|i| u8::from(i == leader || i == buddy)).collect();
            }
        }
        let ms = self.rng.range(rate::PARTITION_MS.0, rate::PARTITION_MS.1);
        self.partition_sides(sides, ms);
    }

    /// Cuts both directions between nodes of different `sides` for `ms`.
    pub(crate) fn partition_sides(&mut self, sides: Vec<u8>, ms: u64) {
        let n = self.nodes.len();
        self.partition_until_ms = self.partition_until_ms.max(self.now + ms);
        for a in 0..n {
            for b in 0..n {
                if sides[a] != sides[b] {
                    self.net.cut(a, b, self.now + ms);
                }
            }
        }
        self.stats.partitions += 1;
        self.note(|| format!("partition {sides:?} for {ms} ms"));
    }

    /// The leader can send but not receive: what a majority of its followers (or all) send it
    /// is lost.
    fn deafen_leader(&mut self) {
        let Some(leader) = self.leader() else { return };
        let n = self.nodes.len();
        let followers: Vec<usize> = (0..n).filter(|&i| i != leader).collect();
        let skip = if self.rng.chance(0.5) { None } else { Some(self.rng.range(0, followers.len() as u64) as usize) };
        let ms = self.rng.range(rate::DEAF_LEADER_MS.0, rate::DEAF_LEADER_MS.1);
        let mut deaf_to = Vec::new();
        for (k, &f) in followers.iter().enumerate() {
            if Some(k) != skip {
                self.net.cut(f, leader, self.now + ms);
                deaf_to.push(f + 1);
            }
        }
        self.stats.deaf_leaders += 1;
        // Other random faults would depose the leader for other reasons and hide whether the
        // cluster gets past one that can no longer hear: they wait.
        self.quiet_until_ms = self.quiet_until_ms.max(self.now + ms);
        self.note(|| format!("deaf leader: node {} hears nothing from {deaf_to:?} for {ms} ms", leader + 1));
    }

    /// Hot swap node `i` to the other build the old way: hand-over snapshot, start, replace. Its
    /// held effects stay held (they belong to steps already taken); messages in flight to it
    /// arrive at the new build. (`swap`, in `background`, chooses this or a staged swap.)
    pub(crate) fn swap_old_way(&mut self, i: usize) {
        if self.builds.len() < 2 || self.now < self.nodes[i].paused_until_ms {
            return;
        }
        let other = 1 - self.nodes[i].build;
        let Some(old) = self.nodes[i].guest.as_mut() else { return };
        let leading = old.status().is_ok_and(|s| s.contains("\"role\":\"leader\""));
        let Ok(handover) = old.snapshot(true) else { return };
        let Ok(mut new) = self.builds[other].instantiate() else { return };
        if let Ok(Ok(effects)) = new.start(&self.nodes[i].config, Some(&handover), &[]) {
            self.nodes[i].guest = Some(new);
            self.nodes[i].build = other;
            self.nodes[i].swapped_at_ms = Some(self.now);
            self.stats.swaps += 1;
            self.stats.leader_swaps += u64::from(leading);
            self.note(|| format!("hot swap node {} to build {other}{}", i + 1, if leading { " (leader)" } else { "" }));
            self.carry_out(i, effects);
        }
    }

    /// Ends faults whose time is up; at the end of the fault window, every fault.
    pub(crate) fn heal(&mut self) -> Result<(), Failure> {
        let over = self.now >= self.config.fault_window_ms;
        if over && !self.healed {
            self.healed = true;
            self.net.heal_all();
            self.partition_until_ms = 0;
            for node in &mut self.nodes {
                node.paused_until_ms = 0;
                node.acceptor_out_until_ms = 0;
            }
            self.note(|| "fault window over: every fault healed".into());
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].crash_at_ms.is_some_and(|t| self.now >= t) {
                self.nodes[i].crash_at_ms = None;
                if !over {
                    self.note(|| format!("node {} crashes before its rejoin's first record is durable", i + 1));
                    self.crash(i, false);
                }
            }
        }
        for i in 0..self.nodes.len() {
            let due = self.nodes[i].down_until_ms.is_some_and(|t| self.now >= t || over);
            if due {
                self.nodes[i].down_until_ms = None;
                self.nodes[i].back_at_ms = self.now;
                self.boot(i)?;
                if self.nodes[i].config.rejoining && !over && self.rng.chance(rate::CRASH_REJOINER_ON_START) {
                    self.nodes[i].crash_at_ms = Some(self.now + self.rng.range(0, crate::disk::SYNC_MS_MAX));
                }
                let how = if self.nodes[i].config.rejoining {
                    "with an empty disk, rejoining"
                } else if self.nodes[i].disk.snapshot.is_some() {
                    "from its snapshot and WAL"
                } else {
                    "from its WAL"
                };
                self.note(|| format!("restart node {} {how}", i + 1));
            }
        }
        Ok(())
    }

    /// Whether node `i` may lose its disk now: afterwards, at most a minority of each voter set
    /// that may govern is without state (a host dead for good counts as one).
    pub(crate) fn may_wipe(&self, i: usize) -> bool {
        if self.nodes[i].rejoining || self.nodes[i].retired || !self.roster_can_fence(i) {
            return false;
        }
        self.may_lose(i)
    }

    /// Whether node `i` may be without its state (wiped, or dead for good) on top of those that
    /// are: a minority of each voter set that may govern, at most.
    pub(crate) fn may_lose(&self, i: usize) -> bool {
        self.voter_sets().iter().all(|set| {
            let without_state = set.iter().filter(|&&v| self.nodes[v].rejoining || self.nodes[v].retired).count();
            without_state + usize::from(set.contains(&i)) <= set.len().saturating_sub(1) / 2
        })
    }

    /// Whether node `i` could take part in a quorum right now.
    fn healthy(&self, i: usize) -> bool {
        let node = &self.nodes[i];
        node.guest.is_some()
            && !node.rejoining
            && self.now >= node.paused_until_ms
            && self.now >= node.acceptor_out_until_ms
    }

    /// Whether messages from `x` to `a` may still arrive, seconds old, over a slow link while `x`
    /// is (or was lately) down or paused: a dead leader's heartbeats, indistinguishable from a
    /// slow live leader's.
    fn stale_from_the_dead(&self, x: usize, a: usize) -> bool {
        let node = &self.nodes[x];
        let troubled = node.guest.is_none()
            || self.now < node.paused_until_ms
            || self.now < node.back_at_ms.saturating_add(crate::net::SLOW_LINK_DELAY_MS.1);
        self.net.link_slow(x, a, self.now) || (troubled && self.net.stale(x, a, self.now))
    }

    /// Whether `set` is healthy, every link among its members up (both ways) and fast, and no
    /// stream of stale messages from a dead replica outside still reaching it.
    pub(crate) fn connected_and_healthy(&self, set: &[usize]) -> bool {
        let n = self.nodes.len();
        set.iter().all(|&a| {
            self.healthy(a)
                && set
                    .iter()
                    .all(|&b| a == b || (self.net.link_up(a, b, self.now) && !self.net.link_slow(a, b, self.now)))
                && (0..n).all(|x| set.contains(&x) || !self.stale_from_the_dead(x, a))
        })
    }

    /// The progress check (see the module doc), and rejoining replicas that vote again.
    pub(crate) fn check_progress(&mut self) {
        if self.now.is_multiple_of(REJOIN_POLL_MS) {
            for i in 0..self.nodes.len() {
                if self.nodes[i].rejoining && self.nodes[i].guest.is_some() {
                    let voting = self.status(i).is_some_and(|s| s.contains("\"voting\":true"));
                    if voting {
                        self.nodes[i].rejoining = false;
                        self.note(|| format!("node {} votes again after its wipe", i + 1));
                    }
                }
            }
        }
        // Each majority's own clock: since when it has been healthy and connected without a
        // break. The longest-standing one, measured from the last progress, is the stall.
        // A majority of every voter set that may govern (five replicas, no reconfiguration: any
        // three of them).
        let n = self.nodes.len();
        let voter_sets = self.voter_sets();
        let candidates: usize = voter_sets.iter().flatten().fold(0, |mask, &i| mask | (1 << i));
        let mut longest: Option<(u64, Vec<usize>)> = None;
        for mask in 1..(1usize << n) {
            let majority_of_each =
                voter_sets.iter().all(|set| set.iter().filter(|&&i| mask & (1 << i) != 0).count() > set.len() / 2);
            if mask & !candidates != 0 || !majority_of_each {
                continue;
            }
            let set: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
            if !self.connected_and_healthy(&set) {
                self.healthy_since_ms[mask] = None;
                continue;
            }
            let since = *self.healthy_since_ms[mask].get_or_insert(self.now);
            if longest.as_ref().is_none_or(|(t, _)| since < *t) {
                longest = Some((since, set));
            }
        }
        let Some((since, set)) = longest else { return };
        let stalled_ms = self.now - since.max(self.progress_ms);
        if stalled_ms > PROGRESS_MS && self.liveness.is_none() {
            let set: Vec<usize> = set.iter().map(|i| i + 1).collect();
            self.liveness = Some(format!(
                "no client operation completed for {stalled_ms} ms at {} ms although nodes {set:?} were up, voting and connected all that time",
                self.now
            ));
        }
    }
}
