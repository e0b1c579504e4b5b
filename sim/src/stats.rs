//! What a run did, counted: the load, the network, and every fault by kind. The summary line
//! of `waxos-sim` prints them, so a change of the fault model shows in the numbers (a fault
//! kind that is never injected proves nothing).

use std::fmt;

/// Counts of what a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Guest steps.
    pub steps: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages lost (at random, to a cut link, to a crashed node, to an acceptor outage).
    pub lost: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Messages held back for long (a long delay, or a slow link).
    pub long_delays: u64,
    /// Crashes (and restarts from the durable records).
    pub crashes: u64,
    /// Disks wiped (the replica rejoins with nothing).
    pub wipes: u64,
    /// Restarts that began from a snapshot (compaction had happened).
    pub snapshot_restarts: u64,
    /// Compactions (snapshot taken, covered records dropped).
    pub compactions: u64,
    /// Of those, made off the step loop (a fresh instance's snapshot, the node stepping on).
    pub compactions_off_loop: u64,
    /// Snapshots received from a peer and installed (catch-up by snapshot transfer).
    pub snapshot_installs: u64,
    /// Symmetric partitions.
    pub partitions: u64,
    /// Asymmetric partitions (one side hears the other, not the reverse).
    pub asymmetric_partitions: u64,
    /// Single links cut one way.
    pub one_way_cuts: u64,
    /// Leaders cut off from what a majority of followers sends them (they can still send).
    pub deaf_leaders: u64,
    /// Links made slow for a while.
    pub slow_links: u64,
    /// Replicas paused (not stepped for a while; their inbox keeps filling).
    pub pauses: u64,
    /// Acceptor outages.
    pub outages: u64,
    /// Hot swaps.
    pub swaps: u64,
    /// Composed fault scenarios started (their faults are counted by kind too).
    pub scenarios: u64,
    /// Hot swaps of the replica that led at the time.
    pub leader_swaps: u64,
    /// Hot swaps made the staged way (prepared off the loop, volatile state adopted).
    pub staged_swaps: u64,
    /// Staged swaps abandoned (the node crashed, was wiped or stopped meanwhile).
    pub staged_swaps_abandoned: u64,
    /// Rounds of catching a staged instance up off the loop (`replay`), before the switch's.
    pub staged_catch_up_rounds: u64,
    /// Messages sent before their receiver was hot-swapped and delivered after.
    pub late_after_swap: u64,
    /// Accepts refused because the acceptor had compacted the slot away (`Forgotten`): a
    /// proposer behind the acceptor's log, the case a silent refusal would stall.
    pub forgotten: u64,
    /// Records lost in crashes (appended, not yet durable).
    pub records_lost: u64,
    /// Steps whose held effects a crash dropped (they never left).
    pub held_steps_lost: u64,
    /// Membership changes the operator saw chosen (adds, promotions, removals).
    pub member_changes: u64,
    /// New members started (joined as learners).
    pub members_joined: u64,
    /// Removals of the member that led at the time.
    pub leader_removals: u64,
    /// Client operations completed.
    pub completed: u64,
    /// Client operations given up on (outcome unknown).
    pub unknown: u64,
}

impl Stats {
    /// Adds another run's counts.
    pub fn add(&mut self, s: &Stats) {
        let Stats {
            steps,
            delivered,
            lost,
            duplicated,
            long_delays,
            crashes,
            wipes,
            snapshot_restarts,
            compactions,
            compactions_off_loop,
            snapshot_installs,
            partitions,
            asymmetric_partitions,
            one_way_cuts,
            deaf_leaders,
            slow_links,
            pauses,
            outages,
            swaps,
            scenarios,
            leader_swaps,
            staged_swaps,
            staged_swaps_abandoned,
            staged_catch_up_rounds,
            late_after_swap,
            forgotten,
            records_lost,
            held_steps_lost,
            member_changes,
            members_joined,
            leader_removals,
            completed,
            unknown,
        } = s;
        self.steps += steps;
        self.delivered += delivered;
        self.lost += lost;
        self.duplicated += duplicated;
        self.long_delays += long_delays;
        self.crashes += crashes;
        self.wipes += wipes;
        self.snapshot_restarts += snapshot_restarts;
        self.compactions += compactions;
        self.compactions_off_loop += compactions_off_loop;
        self.snapshot_installs += snapshot_installs;
        self.partitions += partitions;
        self.asymmetric_partitions += asymmetric_partitions;
        self.one_way_cuts += one_way_cuts;
        self.deaf_leaders += deaf_leaders;
        self.slow_links += slow_links;
        self.pauses += pauses;
        self.outages += outages;
        self.swaps += swaps;
        self.scenarios += scenarios;
        self.leader_swaps += leader_swaps;
        self.staged_swaps += staged_swaps;
        self.staged_swaps_abandoned += staged_swaps_abandoned;
        self.staged_catch_up_rounds += staged_catch_up_rounds;
        self.late_after_swap += late_after_swap;
        self.forgotten += forgotten;
        self.records_lost += records_lost;
        self.held_steps_lost += held_steps_lost;
        self.member_changes += member_changes;
        self.members_joined += members_joined;
        self.leader_removals += leader_removals;
        self.completed += completed;
        self.unknown += unknown;
    }

    /// Injected faults of every kind (not counting random loss, duplication and delays).
    pub fn faults(&self) -> u64 {
        self.crashes
            + self.wipes
            + self.partitions
            + self.asymmetric_partitions
            + self.one_way_cuts
            + self.deaf_leaders
            + self.slow_links
            + self.pauses
            + self.outages
            + self.swaps
    }
}

impl fmt::Display for Stats {
    /// The faults, one `kind count` per kind, then what they did.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "faults: {} crashes, {} wipes, {} pauses, {} partitions, {} asymmetric partitions, {} one-way cuts, \
             {} deaf leaders, {} slow links, {} acceptor outages, {} hot swaps ({} at the leader; {} staged, {} staged abandoned, \
             {} catch-up rounds), {} composed scenarios; \
             network: {} delivered, {} lost, {} duplicated, {} long-delayed, {} late after a swap, {} accepts refused as forgotten; \
             disk: {} compactions ({} off the step loop), {} restarts from a snapshot, {} snapshot installs, {} records lost in crashes, \
             {} steps' held effects dropped; membership: {} changes chosen, {} members joined, {} leaders removed",
            self.crashes,
            self.wipes,
            self.pauses,
            self.partitions,
            self.asymmetric_partitions,
            self.one_way_cuts,
            self.deaf_leaders,
            self.slow_links,
            self.outages,
            self.swaps,
            self.leader_swaps,
            self.staged_swaps,
            self.staged_swaps_abandoned,
            self.staged_catch_up_rounds,
            self.scenarios,
            self.delivered,
            self.lost,
            self.duplicated,
            self.long_delays,
            self.late_after_swap,
            self.forgotten,
            self.compactions,
            self.compactions_off_loop,
            self.snapshot_restarts,
            self.snapshot_installs,
            self.records_lost,
            self.held_steps_lost,
            self.member_changes,
            self.members_joined,
            self.leader_removals,
        )
    }
}
