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

/// The schedule.
pub struct Chaos {
    config: ChaosConfig,
    rng: StdRng,
    next_outage_ms: Option<u64>,
    outage: Option<(u64, u64)>,
    next_crash_ms: Option<u64>,
    crash: Option<(u64, u64)>,
}

impl Chaos {
    /// A schedule starting at `now_ms`.
    pub fn new(config: ChaosConfig, now_ms: u64) -> Chaos {
        let mut chaos = Chaos {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            next_outage_ms: None,
            outage: None,
            next_crash_ms: None,
            crash: None,
        };
        chaos.next_outage_ms = chaos.after(now_ms, chaos.config.outage_every_ms);
        chaos.next_crash_ms = chaos.after(now_ms, chaos.config.crash_every_ms);
        chaos
    }

    fn after(&mut self, now_ms: u64, mean_ms: u64) -> Option<u64> {
        (mean_ms > 0).then(|| now_ms + self.rng.random_range(mean_ms / 2..=mean_ms + mean_ms / 2))
    }

    fn duration(&mut self, (low, high): (u64, u64)) -> u64 {
        self.rng.random_range(low.min(high)..=high.max(low))
    }

    /// What starts or ends at `now_ms`.
    pub fn poll(&mut self, now_ms: u64) -> Vec<ChaosEvent> {
        let mut events = Vec::new();
        if let Some((start, until)) = self.outage {
            if now_ms >= until {
                self.outage = None;
                events.push(ChaosEvent::OutageEnd { ms: now_ms - start });
                self.next_outage_ms = self.after(now_ms, self.config.outage_every_ms);
            }
        } else if self.next_outage_ms.is_some_and(|t| now_ms >= t) {
            let ms = self.duration(self.config.outage_ms);
            self.outage = Some((now_ms, now_ms + ms));
            self.next_outage_ms = None;
            events.push(ChaosEvent::OutageStart { ms });
        }
        if let Some((start, until)) = self.crash {
            if now_ms >= until {
                self.crash = None;
                events.push(ChaosEvent::CrashEnd { ms: now_ms - start });
                self.next_crash_ms = self.after(now_ms, self.config.crash_every_ms);
            }
        } else if self.next_crash_ms.is_some_and(|t| now_ms >= t) {
            let ms = self.duration(self.config.crash_down_ms);
            self.crash = Some((now_ms, now_ms + ms));
            self.next_crash_ms = None;
            events.push(ChaosEvent::CrashStart { ms });
        }
        events
    }

    /// True while the acceptor is offline.
    pub fn acceptor_down(&self) -> bool {
        self.outage.is_some()
    }

    /// True while the guest is held down after an injected crash.
    pub fn guest_held_down(&self) -> bool {
        self.crash.is_some()
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
