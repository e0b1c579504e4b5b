//! Composed faults: a few of the primitive faults of `faults`, placed together around the
//! current leader with random timing, in the shapes known to break Paxos implementations.
//!
//! Random faults alone reach these shapes too rarely to matter (each needs three or four faults
//! in the right order within a second or two). A scenario is still only a schedule of ordinary
//! faults — acceptor outages, wipes, partitions, slow links, crashes, hot swaps — so a correct
//! replica survives it like any other run; it just makes the dangerous interleavings common:
//! - *wipe during outages*: the leader's accepts to three followers are held back (their other
//!   traffic flows, so CheckQuorum keeps it leading), so only the leader and one follower
//!   accept; that follower is wiped and rejoins; the leader stalls (paused) and is cut off with
//!   one follower, which gets the held accepts, while the other side elects and writes (a
//!   rejoined acceptor whose old vote still counts lets both succeed);
//! - *read across a swap*: one follower's answers to the leader are slowed (its answers to
//!   read rounds held back until just after the late read below), the leader is
//!   hot-swapped, then stalls (paused, with one follower) cut off with that follower while the
//!   rest elect another leader and write; it is swapped again as it resumes (a swap's
//!   CheckQuorum grace keeps it leading) and a client reads there at once (a late confirmation
//!   from before a swap must not complete a read after it). Clients are steered to the
//!   majority side for the while, except that reader, and pause just before the cut: a write
//!   in flight at the old leader would hold every later read there behind its unchosen slot
//!   (the read index), which is safe and hides the question;
//! - *lagging majority*: the leader's messages to three followers are slowed (their learners
//!   fall behind, its announcements arrive late), the leader crashes and the one up-to-date
//!   follower is cut off, so a lagging replica leads a lagging majority while late
//!   announcements make some of them compact what it still needs;
//! - *fence replay*: a rejoiner's fence answers are duplicated and held back; it votes, is
//!   wiped again while cut off from the leader's side, and the old answers arrive during its
//!   new fence (they must not complete it);
//! - *snapshot rejoin*: a rejoiner is compacted before its fence completes (the snapshot says
//!   "not voting"), votes, and restarts from that snapshot cut off with two replicas that are
//!   behind its fence's log start, its pre-votes lost, so one of them is elected;
//! - *missed heartbeats*: in a calm cluster one follower misses the leader's heartbeats for
//!   more than an election timeout; the leader must keep leading at its ballot (a stability
//!   check: without pre-vote the follower's own acceptor deposes it);
//! - *restart after promise*: the leader's accepts to three followers are held back, it stalls
//!   cut off with the fourth, the three elect another leader that fills the slot, and one of
//!   them restarts from its WAL just as the held accepts reach it (it must refuse them);
//! - *compacted past the leader*: one follower stops hearing the leader (its learner falls
//!   behind) while two others accept but learn late; the leader crashes, the fifth replica is
//!   cut off and the lagging follower is elected by the two; they learn and forget the slots
//!   it proposes again before its accepts reach them: they must say so (`Forgotten`), so that
//!   it catches up from them instead of waiting for answers that never come.
//!
//! The scenarios added after the first three draw whether they start from their own random
//! stream, so the seeds of runs without them play out as before.

use crate::faults::Kind;
use crate::net::Held;
use crate::world::World;

/// One fault of a scenario, due at a time.
#[derive(Clone, Debug)]
pub enum Action {
    /// Envelopes to node's acceptor dropped for `ms`.
    Outage { node: usize, ms: u64 },
    /// Node loses its disk and restarts, rejoining, after `down_ms`.
    Wipe { node: usize, down_ms: u64 },
    /// Node crashes and restarts from its disk after `down_ms`.
    Crash { node: usize, down_ms: u64 },
    /// Both directions between `side` and the rest cut for `ms`.
    Isolate { side: Vec<usize>, ms: u64 },
    /// As `Isolate`, but only once `leader` has nothing in flight (every slot it proposed is
    /// applied and no request of its own waits), polling until `give_up_ms`; the rest of the
    /// scenario moves later by as much.
    /// The nodes of `pause` are paused (each for its ms) at the moment of the cut.
    IsolateIdle { side: Vec<usize>, ms: u64, leader: usize, give_up_ms: u64, pause: Vec<(usize, u64)> },
    /// Node not stepped for `ms` (a stalled process; its inbox keeps filling).
    Pause { node: usize, ms: u64 },
    /// Both directions between every node of `a` and every node of `b` cut for `ms`.
    Cut { a: Vec<usize>, b: Vec<usize>, ms: u64 },
    /// Every `Fenced` answer to `dst` sent within `ms` is delivered once more `at_ms` later.
    ReplayFenced { dst: usize, ms: u64, after_ms: u64 },
    /// The link src→dst cut (one way) for `ms`.
    CutOneWay { src: usize, dst: usize, ms: u64 },
    /// The node must still lead, at the same ballot (nothing but a follower's missed
    /// heartbeats happened since): otherwise the run fails.
    ExpectLeader { node: usize, ballot: String },
    /// The node compacts now and then not again for `hold_ms`.
    Compact { node: usize, hold_ms: u64 },
    /// Every `PreVote` the node sends is lost for `ms`.
    MutePreVotes { node: usize, ms: u64 },
    /// Every message of a kind src→dst held back for `ms`, then delivered (unless cut off by
    /// then).
    HoldBack { kind: Held, src: usize, dst: usize, ms: u64 },
    /// Messages src→dst long-delayed for `ms`.
    Slow { src: usize, dst: usize, ms: u64 },
    /// Hot swap of the node on this very tick: the old way, or staged with no preparation time
    /// (`World::swap_at_once`), a share of each per seed.
    Swap { node: usize },
    /// Clients go to other replicas than `avoid`, except `reader`, which only reads, at
    /// `reader_node`, until `until_ms`.
    Steer { avoid: Vec<usize>, reader: usize, reader_node: usize, until_ms: u64 },
    /// The client starts no new operation before `until_ms`.
    Hold { client: usize, until_ms: u64 },
    /// The client's read in progress is sent again at once, as a first attempt.
    Retry { client: usize },
    /// Nothing: random faults wait until this step (and `QUIET_AFTER_MS` more), so that what
    /// the scenario set up plays out in a healthy cluster, where a stall shows as one.
    Calm,
}

/// Random crashes, wipes, pauses and cuts wait this long after a scenario's last step.
const QUIET_AFTER_MS: u64 = 2_500;

/// Per-tick base rate of starting a scenario (when its kind is on in the seed's mix and no
/// other scenario runs).
const SCENARIO_RATE: f64 = 0.0012;

impl World<'_> {
    /// Starts a scenario now and then; runs the steps of the one in progress that are due.
    pub(crate) fn run_scenarios(&mut self) {
        while self.script.first().is_some_and(|(at, _)| *at <= self.now) {
            let (_, action) = self.script.remove(0);
            self.act(action);
        }
        // Late enough in the window, a scenario could not play out before everything heals.
        // Nor in a seed whose members change (see `membership`).
        let busy = !self.script.is_empty() || self.now < self.quiet_until_ms || self.reconfiguring();
        if busy || self.now + 6_000 > self.config.fault_window_ms {
            return;
        }
        // The read across a swap needs the most luck (a late answer landing in a read's
        // 200 ms window): it is tried most often.
        for (kind, weight) in
            [(Kind::WipeDuringOutages, 1.5), (Kind::ReadAcrossSwap, 4.0), (Kind::LaggingMajority, 1.0)]
        {
            if self.rng.chance(self.mix.rate(kind, SCENARIO_RATE * weight)) {
                self.plan(kind);
                return;
            }
        }
        // The later scenarios draw from their own stream (see `faults::FIRST_KINDS`).
        for (kind, weight) in [
            (Kind::FenceReplay, 1.0),
            (Kind::SnapshotRejoin, 1.0),
            (Kind::MissedHeartbeats, 1.0),
            (Kind::RestartAfterPromise, 1.0),
            (Kind::CompactedPastLeader, 2.0),
        ] {
            if self.later_rng.chance(self.mix.rate(kind, SCENARIO_RATE * weight)) {
                self.plan(kind);
                return;
            }
        }
    }

    fn later(&mut self, after_ms: (u64, u64), action: Action) {
        let at = self.now + self.rng.range(after_ms.0, after_ms.1);
        self.schedule(at, action);
    }

    fn schedule(&mut self, at_ms: u64, action: Action) {
        let k = self.script.partition_point(|(t, _)| *t <= at_ms);
        self.script.insert(k, (at_ms, action));
    }

    /// Lays out a scenario of `kind` around the current leader (none: nothing happens).
    fn plan(&mut self, kind: Kind) {
        let Some(leader) = self.leader() else { return };
        let n = self.nodes.len();
        // The followers in a random order.
        let mut others: Vec<usize> = (0..n).filter(|&i| i != leader).collect();
        for k in (1..others.len()).rev() {
            let j = self.rng.range(0, k as u64 + 1) as usize;
            others.swap(k, j);
        }
        if others.len() < 4 {
            return;
        }
        let (b, c, d, e) = (others[0], others[1], others[2], others[3]);
        match kind {
            Kind::WipeDuringOutages => {
                // The leader's accepts to b, d and e are held back (their other traffic flows,
                // so CheckQuorum keeps it leading): only it and c accept what it proposes now.
                // c is wiped and rejoins; the leader stalls (paused, so CheckQuorum cannot
                // depose it) and is cut off with b; its held accepts reach b, whose answers
                // wait in its inbox while c, d and e elect another leader and write; the old
                // leader resumes and counts itself, b and c's vote from before the wipe.
                let now = self.now;
                let pause_at = now + self.rng.range(2_800, 3_800);
                let release_ms = pause_at - now + self.rng.range(20, 300);
                for x in [b, d, e] {
                    self.schedule(now, Action::HoldBack { kind: Held::Accepts, src: leader, dst: x, ms: release_ms });
                }
                let down_ms = self.rng.range(50, 400);
                self.later((300, 900), Action::Wipe { node: c, down_ms });
                let pause_ms = self.rng.range(2_000, 4_000);
                self.schedule(pause_at, Action::Pause { node: leader, ms: pause_ms });
                let ms = pause_ms + self.rng.range(500, 2_500);
                self.schedule(pause_at, Action::Isolate { side: vec![leader, b], ms });
            }
            Kind::ReadAcrossSwap => {
                // What one follower answers the leader arrives late. The leader is swapped and a
                // reader reads there (its rounds start over; the late answers are on their way);
                // the other clients pause so that nothing is left in flight at the leader (an
                // unchosen slot would hold every read there behind it, which is safe and hides
                // the question); the leader is cut off with one follower and swapped again (the
                // rounds start over once more) while the rest elect another leader and write;
                // then the reader reads at the old leader once more, as late answers arrive.
                // On ticks: the leader must resume on the very tick it is swapped (a paused
                // replica is not swapped; one tick later its CheckQuorum, stale from the pause,
                // deposes it).
                let first_at = on_tick(self.now + self.rng.range(50, 300));
                let cut_at = on_tick(first_at + self.rng.range(800, 1_300));
                let late_read_at = on_tick(cut_at + self.rng.range(1_500, 3_000));
                let cut_ms = late_read_at + 1_000 - cut_at;
                let slow_ms = late_read_at + 1_000 - self.now;
                self.schedule(self.now, Action::Slow { src: c, dst: leader, ms: slow_ms });
                let reader = self.rng.range(0, self.clients.len() as u64) as usize;
                let until_ms = late_read_at + 1_000;
                let steer = Action::Steer { avoid: vec![leader, b], reader, reader_node: leader, until_ms };
                self.schedule(self.now, steer);
                self.schedule(self.now, Action::Hold { client: reader, until_ms: first_at + 20 });
                self.schedule(first_at, Action::Swap { node: leader });
                self.schedule(first_at + 20, Action::Retry { client: reader });
                for other in (0..self.clients.len()).filter(|&k| k != reader) {
                    self.schedule(cut_at - 800, Action::Hold { client: other, until_ms: cut_at + 100 });
                }
                self.schedule(cut_at - 50, Action::Hold { client: reader, until_ms: late_read_at });
                self.schedule(late_read_at, Action::Retry { client: reader });
                // The old leader and b stall at the cut (paused, so CheckQuorum cannot depose
                // it); the leader is swapped as it resumes (a swap's CheckQuorum grace keeps it
                // leading), b resumes just after, and the reader reads there at once.
                let pause = vec![(leader, late_read_at - cut_at), (b, late_read_at - cut_at + self.rng.range(5, 40))];
                let idle = Action::IsolateIdle {
                    side: vec![leader, b],
                    ms: cut_ms,
                    leader,
                    give_up_ms: cut_at + 1_000,
                    pause,
                };
                self.schedule(cut_at, idle);
                self.schedule(late_read_at, Action::Swap { node: leader });
                // c's answers to the read rounds are also held back and arrive all at once just
                // after the late read (past the cut, as a stuck buffer's would): the first hold
                // covers the wait for an idle leader, the second (after the cut, so it moves
                // with the scenario) ends at the late read.
                let confirmations = Held::ReadConfirmations;
                self.schedule(first_at, Action::HoldBack { kind: confirmations, src: c, dst: leader, ms: 1_000 });
                let after_cut = cut_at + crate::world::TICK_MS;
                let ms = late_read_at - after_cut;
                self.schedule(after_cut, Action::HoldBack { kind: confirmations, src: c, dst: leader, ms });
            }
            Kind::LaggingMajority => {
                // The leader's messages to three followers are slowed (accepts and chosen
                // announcements arrive late and out of order); the clients write through the
                // leader; the leader crashes and the one fast follower is cut off, so a lagging
                // replica leads the lagging three while the old leader's late announcements
                // arrive and make some of them compact.
                let slow_ms = self.rng.range(3_000, 6_000);
                for x in [b, c, d] {
                    self.schedule(self.now, Action::Slow { src: leader, dst: x, ms: slow_ms });
                }
                let crash_at = self.now + self.rng.range(2_000, slow_ms);
                let reader = self.rng.range(0, self.clients.len() as u64) as usize;
                let steer = Action::Steer { avoid: vec![b, c, d], reader, reader_node: leader, until_ms: crash_at };
                self.schedule(self.now, steer);
                let down_ms = self.rng.range(1_000, 3_000);
                self.schedule(crash_at, Action::Crash { node: leader, down_ms });
                let ms = self.rng.range(2_000, 4_000);
                self.schedule(crash_at, Action::Isolate { side: vec![e], ms });
            }
            Kind::FenceReplay => {
                // u = d and w = e never hear the leader x or y = b: z = c is wiped and fences
                // (its answers are duplicated, the copies held back); z votes again and x's side
                // chooses slots with z's vote; then z is wiped again, cut off from x and y with
                // u and w, and the old answers arrive during its new fence (which must not
                // count them: z's side would elect a leader ignorant of those slots).
                let now = self.now;
                let second_at = now + self.rng.range(3_000, 4_500);
                let end_ms = second_at - now + self.rng.range(3_000, 5_000);
                self.schedule(now, Action::Cut { a: vec![leader, b], b: vec![d, e], ms: second_at - now });
                // The copies arrive right after z restarts, once its new fence is out and
                // before anyone's refusal of it (u and w promised the same fence ballot in z's
                // earlier life, so they refuse it) makes z fence higher.
                let down_ms = self.rng.range(20, 150);
                let replay_after = second_at - now + down_ms + 2 * crate::world::TICK_MS;
                self.schedule(now, Action::ReplayFenced { dst: c, ms: 2_000, after_ms: replay_after });
                let first_down_ms = self.rng.range(50, 300);
                self.later((100, 400), Action::Wipe { node: c, down_ms: first_down_ms });
                self.schedule(second_at, Action::Isolate { side: vec![leader, b], ms: end_ms - (second_at - now) });
                self.schedule(second_at, Action::Wipe { node: c, down_ms });
            }
            Kind::SnapshotRejoin => {
                // u = d and w = e hear nothing from the leader x, y = b or r = c while x writes
                // (and every replica there compacts past what u and w have); r is wiped and
                // compacted as it restarts (a snapshot saying "not voting", from before its
                // fence); r, hearing u and w again, fences, catches up and votes; r crashes and
                // restarts from that snapshot and the records after it, cut off from x and y
                // with u and w, and its pre-votes lost: u or w (behind r's fence log start) is
                // elected with r's promise, which must still say what r never knew.
                let now = self.now;
                let wipe_at = now + self.rng.range(2_500, 3_500);
                let down_ms = self.rng.range(30, 200);
                let back_at = wipe_at + down_ms;
                let crash_at = back_at + self.rng.range(1_500, 2_800);
                let crash_down_ms = self.rng.range(30, 200);
                let part_ms = self.rng.range(3_000, 5_000);
                self.schedule(now, Action::Cut { a: vec![leader, b], b: vec![d, e], ms: crash_at - now });
                self.schedule(now, Action::Cut { a: vec![c], b: vec![d, e], ms: back_at - now });
                self.schedule(wipe_at, Action::Wipe { node: c, down_ms });
                self.schedule(back_at, Action::Compact { node: c, hold_ms: crash_at + 100 - back_at });
                self.schedule(crash_at, Action::Crash { node: c, down_ms: crash_down_ms });
                self.schedule(crash_at, Action::MutePreVotes { node: c, ms: part_ms });
                self.schedule(crash_at, Action::Isolate { side: vec![leader, b], ms: part_ms });
                // u and w must still be behind when one of them is elected: what r would teach
                // them when they ask (a member that hears no leader asks for catch-up) is held
                // from r's return until just after one of them is elected.
                for x in [d, e] {
                    let ms = crash_at + 1_500 - back_at;
                    self.schedule(back_at, Action::HoldBack { kind: Held::Learned, src: c, dst: x, ms });
                }
            }
            Kind::MissedHeartbeats => {
                // Only in a calm cluster: every replica up, voting, connected and fast (random
                // faults wait while the scenario runs, except hot swaps, which keep a leader).
                let all: Vec<usize> = (0..n).collect();
                if !self.connected_and_healthy(&all) {
                    return;
                }
                let status = self.status(leader).unwrap_or_default();
                let Some(ballot) = status_ballot(&status) else { return };
                // …and a settled leader: every replica follows it and promised its ballot (no
                // election still under way).
                let follows = format!("\"leader\":{},", leader + 1);
                let promised = format!("\"promised\":\"{ballot}\"");
                for i in 0..n {
                    let s = self.status(i).unwrap_or_default();
                    if !s.contains(&follows) || !s.contains(&promised) {
                        return;
                    }
                }
                let ms = self.rng.range(800, 1_600);
                self.schedule(self.now, Action::CutOneWay { src: leader, dst: b, ms });
                let check_at = self.now + ms + self.rng.range(800, 1_500);
                self.schedule(check_at, Action::ExpectLeader { node: leader, ballot });
            }
            Kind::RestartAfterPromise => {
                // The leader x's accepts to c, d and e are held back, so what it proposes now
                // only it and b accept; x stalls (paused) cut off from the others with b; c, d
                // and e elect another leader that fills the slot; c crashes and restarts (from
                // its WAL) just as x's held accepts reach it, and its answers wait in x's inbox
                // until x resumes: a restarted acceptor must still refuse the old ballot.
                let now = self.now;
                let pause_at = now + self.rng.range(300, 700);
                let crash_at = pause_at + self.rng.range(1_300, 2_200);
                let down_ms = self.rng.range(30, 150);
                let back_at = crash_at + down_ms;
                let release_at = back_at + 2 * crate::world::TICK_MS;
                let resume_at = release_at + self.rng.range(50, 400);
                for x in [c, d, e] {
                    self.schedule(
                        now,
                        Action::HoldBack { kind: Held::Accepts, src: leader, dst: x, ms: release_at - now },
                    );
                }
                self.schedule(pause_at, Action::Pause { node: leader, ms: resume_at - pause_at });
                let end_ms = resume_at + self.rng.range(800, 1_500) - pause_at;
                self.schedule(pause_at, Action::Cut { a: vec![leader, b], b: vec![d, e], ms: end_ms });
                self.schedule(pause_at, Action::Cut { a: vec![leader, b], b: vec![c], ms: back_at - pause_at });
                self.schedule(crash_at, Action::Crash { node: c, down_ms });
            }
            Kind::CompactedPastLeader => {
                // b (the follower that applied most) stops hearing the leader x; what x has
                // chosen since is held back on its way to c's and d's learners (they accept
                // and answer heartbeats, but learn nothing, so their logs start where b's
                // learner stands); x crashes and e is cut off; only b's pre-votes count, so c
                // and d elect b, which proposes again what they accepted; its accepts to them
                // are held back until x's announcements have reached them and they have
                // applied and forgotten those slots.
                let applied = |w: &mut Self, i: usize| {
                    w.status(i).and_then(|s| crate::world::status_number(&s, "applied")).unwrap_or(0)
                };
                let leader_applied = applied(self, leader);
                let Some((k, most)) = (0..4).map(|k| (k, applied(self, others[k]))).max_by_key(|&(_, a)| a) else {
                    return;
                };
                if most + 2 < leader_applied {
                    return;
                }
                others.swap(0, k);
                let (b, c, d, e) = (others[0], others[1], others[2], others[3]);
                let now = self.now;
                let crash_at = now + self.rng.range(1_500, 3_000);
                let learned_at = crash_at + self.rng.range(1_100, 1_400);
                let accepts_at = learned_at + self.rng.range(100, 300);
                self.schedule(now, Action::CutOneWay { src: leader, dst: b, ms: crash_at - now });
                for x in [c, d] {
                    self.schedule(
                        now,
                        Action::HoldBack { kind: Held::Learned, src: leader, dst: x, ms: learned_at - now },
                    );
                    self.schedule(crash_at, Action::MutePreVotes { node: x, ms: learned_at - crash_at });
                    self.schedule(
                        crash_at,
                        Action::HoldBack { kind: Held::Accepts, src: b, dst: x, ms: accepts_at - crash_at },
                    );
                }
                let reader = self.rng.range(0, self.clients.len() as u64) as usize;
                let steer = Action::Steer { avoid: vec![b], reader, reader_node: leader, until_ms: crash_at };
                self.schedule(now, steer);
                let down_ms = self.rng.range(1_500, 3_000);
                self.schedule(crash_at, Action::Crash { node: leader, down_ms });
                let isolated_ms = accepts_at - crash_at + self.rng.range(500, 1_500);
                self.schedule(crash_at, Action::Isolate { side: vec![e], ms: isolated_ms });
                // A leader stuck on slots nobody answers for must show as a stall (the
                // progress check needs seconds of a healthy majority).
                self.schedule(accepts_at + 6_000, Action::Calm);
            }
            _ => return,
        }
        self.stats.scenarios += 1;
        self.quiet_until_ms = self.script.last().map_or(self.now, |(t, _)| *t) + QUIET_AFTER_MS;
        let names: Vec<usize> = others.iter().map(|i| i + 1).collect();
        self.note(|| format!("scenario {kind:?} around leader {} (followers {names:?})", leader + 1));
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Outage { node, ms } => self.outage(node, ms),
            Action::Wipe { node, down_ms } => {
                if self.may_wipe(node) {
                    self.crash_for(node, true, down_ms);
                }
            }
            Action::Crash { node, down_ms } => self.crash_for(node, false, down_ms),
            Action::Isolate { side, ms } => {
                let sides: Vec<u8> = (0..self.nodes.len()).map(|i| u8::from(side.contains(&i))).collect();
                self.partition_sides(sides, ms);
            }
            Action::IsolateIdle { side, ms, leader, give_up_ms, pause } => {
                let status = self.status(leader).unwrap_or_default();
                let number = |field| crate::world::status_number(&status, field);
                let idle = number("next_slot").is_some_and(|next| Some(next) == number("applied"))
                    && number("pending") == Some(0);
                if idle || self.now >= give_up_ms {
                    self.act(Action::Isolate { side, ms });
                    for (node, ms) in pause {
                        self.act(Action::Pause { node, ms });
                    }
                } else {
                    const POLL_MS: u64 = 20;
                    for (at, _) in self.script.iter_mut() {
                        *at += POLL_MS;
                    }
                    // The clients it holds back and steers move with it.
                    for client in self.clients.iter_mut().filter(|c| c.idle_until > self.now) {
                        client.idle_until += POLL_MS;
                    }
                    if let Some(steer) = self.steer.as_mut() {
                        steer.until_ms += POLL_MS;
                    }
                    self.quiet_until_ms += POLL_MS;
                    let retry = Action::IsolateIdle { side, ms, leader, give_up_ms, pause };
                    self.schedule(self.now + POLL_MS, retry);
                }
            }
            Action::Slow { src, dst, ms } => self.slow_link(src, dst, ms),
            Action::Pause { node, ms } => self.pause(node, ms),
            Action::CutOneWay { src, dst, ms } => {
                self.net.cut(src, dst, self.now + ms);
                self.stats.one_way_cuts += 1;
                self.note(|| format!("cut {} -> {} for {ms} ms", src + 1, dst + 1));
            }
            Action::ExpectLeader { node, ballot } => {
                let status = self.status(node).unwrap_or_default();
                let leads = status.contains("\"role\":\"leader\"");
                if (!leads || status_ballot(&status).as_deref() != Some(ballot.as_str())) && self.liveness.is_none() {
                    self.liveness = Some(format!(
                        "node {} led at ballot {ballot} in a healthy cluster and was deposed although only one follower missed its heartbeats for a while: {status}",
                        node + 1
                    ));
                }
            }
            Action::Compact { node, hold_ms } => {
                if self.nodes[node].guest.is_some() {
                    self.compact(node);
                    self.nodes[node].compact_hold_until_ms = self.now + hold_ms;
                    self.note(|| format!("compact node {} now, then not for {hold_ms} ms", node + 1));
                }
            }
            Action::MutePreVotes { node, ms } => {
                self.net.mute_pre_votes(node, self.now + ms);
                self.note(|| format!("pre-votes of node {} lost for {ms} ms", node + 1));
            }
            Action::Cut { a, b, ms } => {
                for &x in &a {
                    for &y in &b {
                        self.net.cut(x, y, self.now + ms);
                        self.net.cut(y, x, self.now + ms);
                    }
                }
                self.partition_until_ms = self.partition_until_ms.max(self.now + ms);
                self.stats.partitions += 1;
                self.note(|| format!("cut between {a:?} and {b:?} (indexes) for {ms} ms"));
            }
            Action::ReplayFenced { dst, ms, after_ms } => {
                for src in (0..self.nodes.len()).filter(|&s| s != dst) {
                    self.net.replay_fenced(src, dst, self.now + ms, self.now + after_ms);
                }
                self.note(|| format!("fence answers to node {} replayed in {after_ms} ms", dst + 1));
            }
            Action::HoldBack { kind, src, dst, ms } => {
                self.net.hold(kind, src, dst, self.now + ms);
                self.stats.slow_links += 1;
                self.note(|| format!("{kind:?} {} -> {} held back for {ms} ms", src + 1, dst + 1));
            }
            Action::Swap { node } => self.swap_at_once(node),
            Action::Steer { avoid, reader, reader_node, until_ms } => {
                let names: Vec<usize> = avoid.iter().map(|i| i + 1).collect();
                self.note(|| {
                    format!("clients steered away from {names:?}; client {reader} reads at node {}", reader_node + 1)
                });
                self.steer = Some(crate::world::Steer { avoid, reader, reader_node, until_ms });
            }
            Action::Retry { client } => {
                if let Some(steer) = self.steer.as_ref().filter(|_| self.tracing()) {
                    let node = steer.reader_node;
                    let status = self.status(node).unwrap_or_default();
                    self.note(|| format!("client {client} reads at node {} now; its status: {status}", node + 1));
                }
                self.retry_read(client);
            }
            Action::Hold { client, until_ms } => {
                let idle = &mut self.clients[client].idle_until;
                *idle = (*idle).max(until_ms);
            }
            Action::Calm => {}
        }
    }
}

/// `ms` rounded up to a tick of virtual time.
fn on_tick(ms: u64) -> u64 {
    ms.div_ceil(crate::world::TICK_MS) * crate::world::TICK_MS
}

/// The `"ballot":"…"` of a status JSON.
fn status_ballot(status: &str) -> Option<String> {
    let at = status.find("\"ballot\":\"")? + "\"ballot\":\"".len();
    Some(status[at..].chars().take_while(|&c| c != '"').collect())
}
