//! Failure on purpose (DESIGN §5): the host knocks out its own acceptor, or its whole guest,
//! now and then, so that recovery is exercised all the time rather than on the worst day.
//!
//! - *Acceptor outage*: for a random while, envelopes addressed to this host's acceptor role
//!   are dropped (the rest of the replica keeps working).
//! - *Guest crash*: the wasm instance is thrown away (its memory is gone), the host stays
//!   silent for a random while, then restarts the guest from its snapshot and WAL.
//!
//! Everything is drawn from a seeded PRNG, so a run's schedule is reproducible from its seed.
//! Intervals are uniform in [½, 1½] × the configured mean.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Rates and durations of injected failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChaosConfig {
    /// Mean time between acceptor outages (0: never).
    pub outage_every_ms: u64,
    /// Shortest and longest outage.
    pub outage_ms: (u64, u64),
    /// Mean time between guest crashes (0: never).
    pub crash_every_ms: u64,
    /// Shortest and longest silence after a crash, before the restart.
    pub crash_down_ms: (u64, u64),
    /// PRNG seed.
    pub seed: u64,
}

impl ChaosConfig {
    /// A named preset: `off`, `low` (what `just cluster` runs) or `high` (something every few
    /// seconds).
    pub fn preset(name: &str, seed: u64) -> Result<ChaosConfig, String> {
        let (outage_every_ms, outage_ms, crash_every_ms, crash_down_ms) = match name {
            "off" => (0, (0, 0), 0, (0, 0)),
            "low" => (90_000, (1_000, 4_000), 180_000, (500, 2_000)),
            "high" => (4_000, (500, 2_000), 7_000, (200, 1_000)),
            other => return Err(format!("unknown --chaos preset {other:?}: use off, low or high")),
        };
        Ok(ChaosConfig { outage_every_ms, outage_ms, crash_every_ms, crash_down_ms, seed })
    }

    /// True when nothing is ever injected.
    pub fn is_off(&self) -> bool {
        self.outage_every_ms == 0 && self.crash_every_ms == 0
    }
}

/// Something chaos does now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChaosEvent {
    /// The acceptor goes offline for `ms`.
    OutageStart { ms: u64 },
    /// The acceptor is back after `ms`.
    OutageEnd { ms: u64 },
    /// The guest is discarded and stays down for `ms`.
    CrashStart { ms: u64 },
    /// The guest's silence is over (`ms` long): restart it.
    CrashEnd { ms: u64 },
}

impl ChaosEvent {
    /// The event's kind, as the metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            ChaosEvent::OutageStart { .. } => "outage_start",
            ChaosEvent::OutageEnd { .. } => "outage_end",
            ChaosEvent::CrashStart { .. } => "crash_start",
            ChaosEvent::CrashEnd { .. } => "crash_end",
        }
    }
}

/// The schedule.
pub struct Chaos {
    rng: StdRng,
    outage: Schedule,
    crash: Schedule,
}

/// One kind of failure: when the next one starts, and the one in progress (start, end).
struct Schedule {
    every_ms: u64,
    duration_ms: (u64, u64),
    next_ms: Option<u64>,
    active: Option<(u64, u64)>,
}

/// A failure starting (lasting `ms`) or ending (after `ms`).
enum Change {
    Start(u64),
    End(u64),
}

impl Schedule {
    fn new(every_ms: u64, duration_ms: (u64, u64), rng: &mut StdRng, now_ms: u64) -> Schedule {
        let mut schedule = Schedule { every_ms, duration_ms, next_ms: None, active: None };
        schedule.next_ms = schedule.after(rng, now_ms);
        schedule
    }

    /// Uniform in [½, 1½] × the mean from now; never when the mean is 0.
    fn after(&self, rng: &mut StdRng, now_ms: u64) -> Option<u64> {
        let mean = self.every_ms;
        (mean > 0).then(|| now_ms + rng.random_range(mean / 2..=mean + mean / 2))
    }

    fn poll(&mut self, rng: &mut StdRng, now_ms: u64) -> Option<Change> {
        if let Some((start, until)) = self.active {
            if now_ms < until {
                return None;
            }
            self.active = None;
            self.next_ms = self.after(rng, now_ms);
            return Some(Change::End(now_ms - start));
        }
        if self.next_ms.is_none_or(|t| now_ms < t) {
            return None;
        }
        let (low, high) = self.duration_ms;
        let ms = rng.random_range(low.min(high)..=high.max(low));
        self.active = Some((now_ms, now_ms + ms));
        self.next_ms = None;
        Some(Change::Start(ms))
    }
}

impl Chaos {
    /// A schedule starting at `now_ms`.
    pub fn new(config: ChaosConfig, now_ms: u64) -> Chaos {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let outage = Schedule::new(config.outage_every_ms, config.outage_ms, &mut rng, now_ms);
        let crash = Schedule::new(config.crash_every_ms, config.crash_down_ms, &mut rng, now_ms);
        Chaos { rng, outage, crash }
    }

    /// What starts or ends at `now_ms`.
    pub fn poll(&mut self, now_ms: u64) -> Vec<ChaosEvent> {
        let mut events = Vec::new();
        match self.outage.poll(&mut self.rng, now_ms) {
            Some(Change::Start(ms)) => events.push(ChaosEvent::OutageStart { ms }),
            Some(Change::End(ms)) => events.push(ChaosEvent::OutageEnd { ms }),
            None => {}
        }
        match self.crash.poll(&mut self.rng, now_ms) {
            Some(Change::Start(ms)) => events.push(ChaosEvent::CrashStart { ms }),
            Some(Change::End(ms)) => events.push(ChaosEvent::CrashEnd { ms }),
            None => {}
        }
        events
    }

    /// True while the acceptor is offline.
    pub fn acceptor_down(&self) -> bool {
        self.outage.active.is_some()
    }

    /// True while the guest is held down after an injected crash.
    pub fn guest_held_down(&self) -> bool {
        self.crash.active.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: ChaosConfig, until_ms: u64) -> Vec<(u64, ChaosEvent)> {
        let mut chaos = Chaos::new(config, 0);
        (0..until_ms).step_by(10).flat_map(|t| chaos.poll(t).into_iter().map(move |e| (t, e))).collect()
    }

    #[test]
    fn off_never_injects_anything() {
        assert!(run(ChaosConfig::preset("off", 1).expect("preset"), 600_000).is_empty());
    }

    #[test]
    fn high_injects_outages_and_crashes_that_end() {
        let events = run(ChaosConfig::preset("high", 7).expect("preset"), 60_000);
        let count = |f: fn(&ChaosEvent) -> bool| events.iter().filter(|(_, e)| f(e)).count();
        assert!(count(|e| matches!(e, ChaosEvent::OutageStart { .. })) >= 5, "{events:?}");
        assert!(count(|e| matches!(e, ChaosEvent::CrashStart { .. })) >= 3, "{events:?}");
        // Every start is followed by its end before the next start.
        let outages: Vec<_> = events
            .iter()
            .filter(|(_, e)| matches!(e, ChaosEvent::OutageStart { .. } | ChaosEvent::OutageEnd { .. }))
            .collect();
        for pair in outages.windows(2) {
            assert_ne!(std::mem::discriminant(&pair[0].1), std::mem::discriminant(&pair[1].1));
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = run(ChaosConfig::preset("high", 42).expect("preset"), 30_000);
        let b = run(ChaosConfig::preset("high", 42).expect("preset"), 30_000);
        let c = run(ChaosConfig::preset("high", 43).expect("preset"), 30_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn unknown_preset_is_refused() {
        assert!(ChaosConfig::preset("extreme", 1).is_err());
    }
}
