//! Reconfiguration: an operator adds, promotes, removes and replaces members of the running
//! cluster while every fault of `faults` goes on, as `waxos … member …` and `waxosd --join`
//! do with real hosts.
//!
//! A seed that reconfigures (drawn from a stream of its own, so that the seeds that do not play
//! out exactly as before) runs one program:
//! - *replace*: a voter (the leader a third of the time) dies for good; a new member is added,
//!   promoted, and the dead one removed;
//! - *shrink and grow*: 5 → 3 → 5; *grow and shrink*: 5 → 7 → 5; *the whole tour*:
//!   5 → 3 → 7 → 5;
//! - each removal takes the leader a third of the time (leadership must move on);
//! - half the time a shrink's two removals are a *split*: what the leader chooses is held back
//!   from the learners of every member but one (they accept, but learn nothing), both removals
//!   go to the leader, and once the second is chosen the leader and that one member are cut off
//!   from the rest, clients writing on both sides. The leader's side has a majority of the new
//!   voters and the rest a majority of the old ones, none of which applied a removal: a change
//!   that governed at once, without α, would let each side choose a slot on its own.
//!
//! Each change is a request with the operator's own (client, seq), sent to a random member and
//! sent again, to the leader it names or to another member, until it is answered: a retry is
//! answered as the first was (exactly once). An added member gets a new node here, started as
//! `waxosd --join` starts one: its id from the answer, the members as the answering replica
//! announced them (the new one a learner), an empty disk; it catches up by snapshot transfer.
//! It is promoted at once half the time (allowed: it only costs availability), else once it
//! applied as far as the leader. A removed member's host keeps running for a while, refusing
//! requests as a real one does until its operator stops it, then stops for good; its id is
//! never reused.
//!
//! The progress check and the wipe bound count a majority of *every* voter set that may
//! govern: the operator keeps each set it asked for until well after its successor was chosen
//! and took effect, so a set that is a quorum of each of them is a quorum whatever the log
//! reached.

use std::collections::VecDeque;

use waxos_host::runtime::{Command, GuestConfig, GuestMember, MemberChange, Outcome, Request};

use crate::rng::Rng;
use crate::world::{Node, World};

/// Share of seeds that reconfigure.
const RECONFIGURE_CHANCE: f64 = 0.4;
/// The program starts within this time range (virtual ms).
const START_MS: (u64, u64) = (1_500, 3_500);
/// Pause between two steps.
const BETWEEN_STEPS_MS: (u64, u64) = (0, 800);
/// An attempt unanswered for this long goes to another member.
const ATTEMPT_MS: u64 = 1_000;
/// A removed member's host runs on for up to this long before its operator stops it.
const STOP_REMOVED_MS: u64 = 2_000;
/// A voter set stays in the progress check this long after its successor was chosen: the
/// successor takes effect α slots later, and a replica behind still uses the old one.
const KEEP_SUPERSEDED_MS: u64 = 3_000;
/// A learner is promoted without waiting any longer than this for it to catch up.
const CATCH_UP_MS_MAX: u64 = 3_000;
/// The operator's client id (the simulated clients are 10 000 and up).
const OPERATOR_CLIENT: u64 = 9_000;
/// Removals take the leader this often.
const REMOVE_LEADER_CHANCE: f64 = 1.0 / 3.0;
/// A shrink's two removals are a split this often.
const SPLIT_CHANCE: f64 = 0.5;
/// A split holds back the leader's chosen values from the other side for this long…
const SPLIT_HOLD_MS: u64 = 4_000;
/// …and cuts the sides apart for this long once the second removal is chosen.
const SPLIT_CUT_MS: (u64, u64) = (800, 2_000);

/// One step of a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A voter's host dies for good (never restarted).
    Kill,
    /// A new member, as a learner.
    Add,
    /// The member added last becomes a voter (after it caught up, or at once).
    Promote,
    /// A voter leaves: a dead one if any, else the leader or a random one.
    Remove,
    /// The next two removals are a split (see the module doc).
    Split,
}

/// A split in progress: the leader, the member on its side, and the two to remove.
struct Split {
    leader: usize,
    buddy: usize,
    victims: Vec<usize>,
    chosen: usize,
}

/// A change asked for and not answered yet.
struct Asked {
    change: MemberChange,
    seq: u64,
    request_id: u64,
    /// The next attempt is due then.
    retry_at_ms: u64,
    /// Where the next attempt goes (the leader a refusal named), if anywhere in particular.
    to: Option<usize>,
    /// The voter set if it is chosen (a removal or promotion), for the progress check.
    voters_after: Option<Vec<usize>>,
    /// Removing the leader of the time.
    of_leader: bool,
}

/// The operator of a reconfiguring seed.
pub(crate) struct Operator {
    rng: Rng,
    name: &'static str,
    program: VecDeque<Step>,
    /// The next step starts no earlier than this.
    next_at_ms: u64,
    asked: Option<Asked>,
    seq: u64,
    /// Waiting for the member added last to catch up before its promotion, until then.
    catch_up_until_ms: Option<u64>,
    /// Node index of the member added last.
    added: Option<usize>,
    /// Voters (node indexes) as the operator expects them after every change so far.
    voters: Vec<usize>,
    /// Voter sets that may still govern somewhere, each with the time it stops counting
    /// (`u64::MAX`: not superseded yet).
    governing: Vec<(Vec<usize>, u64)>,
    /// Voters dead for good and not removed yet.
    dead: Vec<usize>,
    /// Removed members still running, and when their operator stops them.
    to_stop: Vec<(usize, u64)>,
    /// Every member removed (or asked to be: it may be chosen any moment).
    removed: Vec<usize>,
    split: Option<Split>,
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<String> = self.program.iter().map(|s| format!("{s:?}").to_lowercase()).collect();
        write!(f, "{} from {} ms: {}", self.name, self.next_at_ms, steps.join(", "))
    }
}

impl Operator {
    /// The operator of seed `seed`, if it reconfigures (five voters, ids 1–5, to start).
    pub(crate) fn draw(seed: u64, voters: usize) -> Option<Operator> {
        let mut rng = Rng::new(seed ^ 0x3E3B_E125_C0DE_0002);
        if !rng.chance(RECONFIGURE_CHANCE) {
            return None;
        }
        use Step::*;
        let (name, program): (&str, Vec<Step>) = match rng.range(0, 4) {
            0 => ("replace a dead member", vec![Kill, Add, Promote, Remove]),
            1 => ("shrink and grow", vec![Remove, Remove, Add, Promote, Add, Promote]),
            2 => ("grow and shrink", vec![Add, Promote, Add, Promote, Remove, Remove]),
            _ => (
                "5 -> 3 -> 7 -> 5",
                vec![Remove, Remove, Add, Promote, Add, Promote, Add, Promote, Add, Promote, Remove, Remove],
            ),
        };
        let mut program = program;
        if program.starts_with(&[Remove, Remove]) && rng.chance(SPLIT_CHANCE) {
            program.insert(0, Split);
        }
        let next_at_ms = rng.range(START_MS.0, START_MS.1);
        let all: Vec<usize> = (0..voters).collect();
        Some(Operator {
            rng,
            name,
            program: program.into(),
            next_at_ms,
            asked: None,
            seq: 0,
            catch_up_until_ms: None,
            added: None,
            voters: all.clone(),
            governing: vec![(all, u64::MAX)],
            dead: Vec::new(),
            to_stop: Vec::new(),
            removed: Vec::new(),
            split: None,
        })
    }

    /// Whether request `id` is one of the operator's.
    pub(crate) fn asked(&self, id: u64) -> bool {
        self.asked.as_ref().is_some_and(|a| a.request_id == id)
    }
}

impl World<'_> {
    /// Voter sets (node indexes) that may govern now: without reconfiguration, every node.
    pub(crate) fn voter_sets(&self) -> Vec<Vec<usize>> {
        match &self.operator {
            Some(operator) => operator.governing.iter().map(|(set, _)| set.clone()).collect(),
            None => vec![(0..self.nodes.len()).collect()],
        }
    }

    /// Whether node `i`, wiped, could earn its vote back: its fence goes to the voters of the
    /// roster it starts from (the first start's, or the one it joined with), and needs
    /// `n - q + 1` of the others to answer. A roster most of whose voters were removed since
    /// leaves a wiped host unable to rejoin (a known limit, in the guest's `rejoin` doc): such a
    /// host is not wiped here.
    pub(crate) fn roster_can_fence(&self, i: usize) -> bool {
        let Some(operator) = &self.operator else { return true };
        let roster: Vec<usize> =
            self.nodes[i].config.members.iter().filter(|m| m.voter).map(|m| m.id as usize - 1).collect();
        let n = roster.len();
        let needed = n - (n / 2 + 1) + 1;
        let answering = roster
            .iter()
            .filter(|&&v| v != i && v < self.nodes.len() && !self.nodes[v].retired && !operator.removed.contains(&v))
            .count();
        answering >= needed
    }

    /// Whether the members change in this seed. The composed scenarios (`scenarios`) are
    /// written around five voters and a leader that stays a member: they run in the other
    /// seeds, while every random fault kind runs here too.
    pub(crate) fn reconfiguring(&self) -> bool {
        self.operator.is_some()
    }

    /// The operator's turn (every tick): stop removed hosts that are due, retry or start a
    /// change.
    pub(crate) fn operate(&mut self) {
        let Some(mut operator) = self.operator.take() else { return };
        let now = self.now;
        operator.governing.retain(|(_, until)| *until > now);
        let due: Vec<usize> = operator.to_stop.iter().filter(|(_, at)| *at <= now).map(|(i, _)| *i).collect();
        operator.to_stop.retain(|(_, at)| *at > now);
        for i in due {
            self.stop_for_good(i, "removed; its operator stops it");
        }
        if operator.asked.as_ref().is_some_and(|a| now >= a.retry_at_ms) {
            self.send_change(&mut operator);
        } else if operator.asked.is_none() {
            self.next_step(&mut operator);
        }
        self.operator = Some(operator);
    }

    /// Every removed host still running is stopped (the end of the run: its operator is done).
    pub(crate) fn retire_removed(&mut self) {
        let Some(operator) = self.operator.as_mut() else { return };
        let removed: Vec<usize> = operator.to_stop.drain(..).map(|(i, _)| i).collect();
        for i in removed {
            self.stop_for_good(i, "removed; its operator stops it");
        }
    }

    fn stop_for_good(&mut self, i: usize, why: &str) {
        self.drop_background(i, why);
        let node = &mut self.nodes[i];
        node.retired = true;
        node.guest = None;
        node.down_until_ms = None;
        node.crash_at_ms = None;
        node.inbox.clear();
        node.loopback.clear();
        self.note(|| format!("node {} stops for good ({why})", i + 1));
    }

    fn next_step(&mut self, operator: &mut Operator) {
        if self.now < operator.next_at_ms {
            return;
        }
        let Some(&step) = operator.program.front() else { return };
        if step == Step::Promote {
            let Some(added) = operator.added else {
                operator.program.pop_front();
                return;
            };
            let until = *operator.catch_up_until_ms.get_or_insert_with(|| {
                if operator.rng.chance(0.5) {
                    self.now
                } else {
                    self.now + CATCH_UP_MS_MAX
                }
            });
            if self.now < until && !self.caught_up(added) {
                return;
            }
            operator.catch_up_until_ms = None;
        }
        if step == Step::Remove && self.nodes.iter().any(|n| n.rejoining && !n.retired) {
            // A careful operator removes nobody while a member is without its state (`waxos
            // status` shows it not voting): a rejoiner's fence needs its roster's voters.
            operator.next_at_ms = self.now + 200;
            return;
        }
        if step == Step::Split {
            self.start_split(operator);
            return;
        }
        operator.program.pop_front();
        let leader = self.leader().filter(|l| operator.voters.contains(l));
        let (change, voters_after, of_leader) = match step {
            Step::Kill => {
                let victim = match leader.filter(|_| operator.rng.chance(REMOVE_LEADER_CHANCE)) {
                    Some(leader) => leader,
                    None => operator.voters[operator.rng.range(0, operator.voters.len() as u64) as usize],
                };
                if !self.may_lose(victim) || self.nodes[victim].rejoining {
                    // Too many are without their state already: later.
                    operator.program.push_front(Step::Kill);
                    operator.next_at_ms = self.now + 200;
                    return;
                }
                operator.dead.push(victim);
                self.stop_for_good(victim, "dead for good: the operator will replace it");
                operator.next_at_ms = self.now + operator.rng.range(BETWEEN_STEPS_MS.0, BETWEEN_STEPS_MS.1);
                return;
            }
            Step::Add => {
                let id = self.nodes.len() as u32 + 1;
                (MemberChange::Add(address_of(id)), None, false)
            }
            Step::Promote => {
                let Some(added) = operator.added.take() else { return };
                let mut after = operator.voters.clone();
                after.push(added);
                after.sort_unstable();
                (MemberChange::Promote(added as u32 + 1), Some(after), false)
            }
            Step::Split => return,
            Step::Remove => {
                let split_victim = operator.split.as_ref().and_then(|split| split.victims.get(split.chosen).copied());
                let victim = if let Some(victim) = split_victim {
                    victim
                } else if let Some(dead) = operator.dead.pop() {
                    dead
                } else {
                    match leader.filter(|_| operator.rng.chance(REMOVE_LEADER_CHANCE)) {
                        Some(leader) => leader,
                        None => operator.voters[operator.rng.range(0, operator.voters.len() as u64) as usize],
                    }
                };
                let after: Vec<usize> = operator.voters.iter().copied().filter(|&v| v != victim).collect();
                operator.removed.push(victim);
                (MemberChange::Remove(victim as u32 + 1), Some(after), Some(victim) == leader)
            }
        };
        operator.seq += 1;
        if let Some(after) = &voters_after {
            // It may govern as soon as it is chosen, which may be before any answer.
            operator.governing.push((after.clone(), u64::MAX));
        }
        operator.asked = Some(Asked {
            change,
            seq: operator.seq,
            request_id: 0,
            retry_at_ms: self.now,
            // A split's removals go to its leader (an answer from the other side would wait for
            // the held-back values).
            to: operator.split.as_ref().map(|split| split.leader),
            voters_after,
            of_leader,
        });
        self.send_change(operator);
    }

    /// Whether node `i` applied as far as the leader (a learner caught up).
    fn caught_up(&mut self, i: usize) -> bool {
        let applied =
            |world: &mut World, n: usize| world.status(n).and_then(|s| crate::world::status_number(&s, "applied"));
        let Some(leader) = self.leader() else { return false };
        match (applied(self, i), applied(self, leader)) {
            (Some(mine), Some(theirs)) => mine >= theirs,
            _ => false,
        }
    }

    /// Sends the change asked for (again) to a member.
    fn send_change(&mut self, operator: &mut Operator) {
        let members: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].guest.is_some()).collect();
        let Some(asked) = operator.asked.as_mut() else { return };
        asked.retry_at_ms = self.now + ATTEMPT_MS;
        if members.is_empty() {
            return;
        }
        let node = match asked.to.take().filter(|i| members.contains(i)) {
            Some(i) => i,
            None => members[operator.rng.range(0, members.len() as u64) as usize],
        };
        let id = self.next_request;
        self.next_request += 1;
        asked.request_id = id;
        let command = Command::ChangeMembers(asked.change.clone());
        let request = Request { id, client: OPERATOR_CLIENT, seq: asked.seq, command };
        let what = describe(&asked.change);
        self.note(|| format!("operator asks node {} to {what}", node + 1));
        self.nodes[node].inbox.push(waxos_host::runtime::Event::Request(request));
    }

    /// The answer to the operator's change.
    pub(crate) fn on_operator_reply(&mut self, node: usize, _id: u64, outcome: Outcome) {
        let Some(mut operator) = self.operator.take() else { return };
        self.operator_reply(&mut operator, node, outcome);
        self.operator = Some(operator);
    }

    fn operator_reply(&mut self, operator: &mut Operator, node: usize, outcome: Outcome) {
        let Some(asked) = operator.asked.as_mut() else { return };
        let what = describe(&asked.change);
        match outcome {
            Outcome::Member(id) => {
                let Some(asked) = operator.asked.take() else { return };
                self.stats.member_changes += 1;
                self.note(|| format!("operator: {what} chosen (node {id}), answered by node {}", node + 1));
                if let Some(after) = asked.voters_after {
                    for (_, until) in operator.governing.iter_mut().filter(|(set, _)| *set != after) {
                        *until = (*until).min(self.now + KEEP_SUPERSEDED_MS);
                    }
                    operator.voters = after;
                }
                match asked.change {
                    MemberChange::Add(_) => {
                        let index = id as usize - 1;
                        self.start_member(operator, node, index);
                        operator.added = Some(index);
                    }
                    MemberChange::Remove(removed) => {
                        let index = removed as usize - 1;
                        self.stats.leader_removals += u64::from(asked.of_leader);
                        self.split_removal_chosen(operator);
                        if !self.nodes[index].retired {
                            let at = self.now + operator.rng.range(0, STOP_REMOVED_MS);
                            operator.to_stop.push((index, at));
                        }
                    }
                    MemberChange::Promote(_) => {}
                }
                let pause_ms = operator.rng.range(BETWEEN_STEPS_MS.0, BETWEEN_STEPS_MS.1);
                operator.next_at_ms = self.now + if operator.split.is_some() { 0 } else { pause_ms };
            }
            Outcome::Rejected(reason) if reason.starts_with("membership:") => {
                // It makes no sense against the members (a removal of the last voter…): this
                // step is dropped, the set it would have made never governs.
                let Some(asked) = operator.asked.take() else { return };
                self.note(|| format!("operator: {what} refused: {reason}"));
                if let Some(after) = asked.voters_after {
                    operator.governing.retain(|(set, until)| *set != after || *until != u64::MAX);
                }
            }
            Outcome::Redirect(leader) => {
                asked.to = leader.map(|l| l as usize - 1).filter(|&l| l < self.nodes.len());
                asked.retry_at_ms = self.now;
            }
            // Not now (no leader, overloaded, a removed host…): again soon, elsewhere.
            _ => asked.retry_at_ms = self.now + 50,
        }
    }

    /// Sets a split up: the leader and one voter on one side, the others' learners cut off
    /// from what the leader chooses (they still accept), two victims among them.
    fn start_split(&mut self, operator: &mut Operator) {
        let leader = self.leader().filter(|l| operator.voters.contains(l) && !self.nodes[*l].retired);
        let Some(leader) = leader.filter(|_| operator.voters.len() >= 5 && operator.dead.is_empty()) else {
            // No leader to split around (or nothing to split): plain removals.
            operator.program.pop_front();
            return;
        };
        operator.program.pop_front();
        let others: Vec<usize> = operator.voters.iter().copied().filter(|&v| v != leader).collect();
        let buddy = others[operator.rng.range(0, others.len() as u64) as usize];
        let mut rest: Vec<usize> = others.iter().copied().filter(|&v| v != buddy).collect();
        let mut victims = Vec::new();
        for _ in 0..2 {
            victims.push(rest.remove(operator.rng.range(0, rest.len() as u64) as usize));
        }
        let until = self.now + SPLIT_HOLD_MS;
        let far: Vec<usize> = (0..self.nodes.len()).filter(|&i| i != leader && i != buddy).collect();
        for &dst in &far {
            self.net.hold(crate::net::Held::Learned, leader, dst, until);
        }
        // Random faults would only blur it.
        self.quiet_until_ms = self.quiet_until_ms.max(until);
        let names = |v: &[usize]| v.iter().map(|i| i + 1).collect::<Vec<_>>();
        self.note(|| {
            format!(
                "operator: split around leader {} and node {}: {:?} learn nothing from the leader; removing {:?}",
                leader + 1,
                buddy + 1,
                names(&far),
                names(&victims)
            )
        });
        operator.split = Some(Split { leader, buddy, victims, chosen: 0 });
        operator.next_at_ms = self.now;
    }

    /// A removal of a split was chosen: after the second, the sides are cut apart.
    fn split_removal_chosen(&mut self, operator: &mut Operator) {
        let Some(split) = operator.split.as_mut() else { return };
        split.chosen += 1;
        if split.chosen < split.victims.len() {
            return;
        }
        let (leader, buddy) = (split.leader, split.buddy);
        operator.split = None;
        let sides: Vec<u8> = (0..self.nodes.len()).map(|i| u8::from(i == leader || i == buddy)).collect();
        let ms = operator.rng.range(SPLIT_CUT_MS.0, SPLIT_CUT_MS.1);
        self.partition_sides(sides, ms);
    }

    /// Starts the member just added as node `index` (id `index + 1`), as `waxosd --join` does:
    /// the members as `via` announced them, itself a learner, an empty disk.
    fn start_member(&mut self, operator: &mut Operator, via: usize, index: usize) {
        if index < self.nodes.len() {
            return;
        }
        let seed = operator.rng.next_u64();
        let snapshot_every_records =
            operator.rng.range(crate::world::SNAPSHOT_EVERY_RECORDS.0, crate::world::SNAPSHOT_EVERY_RECORDS.1);
        let id = index as u32 + 1;
        let mut members = self.nodes[via].known_members.clone();
        members.retain(|m| m.id != id);
        members.push(GuestMember { id, address: address_of(id), voter: false });
        members.sort_by_key(|m| m.id);
        let config = GuestConfig {
            me: id,
            members,
            seed,
            test_hooks: false,
            retain_slots: self.nodes[0].config.retain_slots,
            rejoining: false,
        };
        // Ids an answer skipped (an add whose answer got lost… never here, but an id is an id)
        // are hosts that never start.
        while self.nodes.len() <= index {
            let placeholder = self.nodes.len();
            let mut node = Node::new(config.clone(), snapshot_every_records);
            node.retired = placeholder != index;
            node.build = self.nodes[via].build;
            self.nodes.push(node);
            self.net.add_node();
        }
        self.healthy_since_ms.resize(1 << self.nodes.len().min(16), None);
        self.stats.members_joined += 1;
        self.note(|| format!("node {id} starts, joining as a learner"));
        if let Err(failure) = self.boot(index) {
            if self.divergence.is_none() {
                self.divergence = Some(format!("node {id} could not start as a new member: {failure:?}"));
            }
        }
    }
}

/// The address a member added as node `id` registers.
fn address_of(id: u32) -> String {
    format!("sim-node-{id}:7000")
}

fn describe(change: &MemberChange) -> String {
    match change {
        MemberChange::Add(address) => format!("add {address}"),
        MemberChange::Promote(id) => format!("promote node {id}"),
        MemberChange::Remove(id) => format!("remove node {id}"),
    }
}
