//! Where a slow step-loop turn's time went. A turn over `TURN_LOGGED_MS` is logged with the
//! time of each of its phases (syncs collected, background work collected, guest step, effects
//! carried out, …), so that a stall seen in `waxos_turn_longest_seconds` can be attributed from
//! the log alone. Marking costs a clock read per phase.
//!
//! It also tells a slow turn's own work from the machine's: the step loop thread's CPU time and
//! its time waiting for a CPU (the kernel's `/proc/thread-self/schedstat`, read at the start of
//! every turn: under a microsecond). Wall time that is neither was spent blocked (disk, locks).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// The marks of the turn in progress.
#[derive(Default)]
pub struct TurnPhases {
    started: Option<Instant>,
    marks: Vec<(&'static str, Instant)>,
    /// This thread's schedstat, opened by the thread that runs the turns (None: not available).
    schedstat: Option<Option<File>>,
    /// Nanoseconds on a CPU and waiting for one, at the start of the turn.
    sched_at_start: Option<(u64, u64)>,
}

impl TurnPhases {
    /// A turn starts (on the thread whose turns these are).
    pub fn start(&mut self) {
        self.marks.clear();
        self.started = Some(Instant::now());
        self.sched_at_start = self.read_schedstat();
    }

    /// (ns on a CPU, ns runnable but waiting for a CPU) of this thread so far.
    fn read_schedstat(&mut self) -> Option<(u64, u64)> {
        let file = self.schedstat.get_or_insert_with(|| File::open("/proc/thread-self/schedstat").ok()).as_ref()?;
        let mut buf = [0u8; 96];
        let n = file.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(buf.get(..n)?).ok()?;
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        Some((fields.next()??, fields.next()??))
    }

    /// The phase `name` ends now.
    pub fn mark(&mut self, name: &'static str) {
        self.marks.push((name, Instant::now()));
    }

    /// Each phase of at least a millisecond with its time, e.g. `step 3.1 ms, carry-out 250.2 ms`;
    /// "all under 1 ms" when none was (the time went between phases: the thread waited to run).
    pub fn describe(&mut self) -> String {
        let sched = match (self.sched_at_start, self.read_schedstat()) {
            (Some((cpu0, wait0)), Some((cpu1, wait1))) => format!(
                "; on a CPU {:.1} ms, waiting for one {:.1} ms",
                cpu1.saturating_sub(cpu0) as f64 / 1e6,
                wait1.saturating_sub(wait0) as f64 / 1e6
            ),
            _ => String::new(),
        };
        self.phases() + &sched
    }

    fn phases(&self) -> String {
        let Some(mut previous) = self.started else { return String::new() };
        let mut parts = Vec::new();
        for (name, at) in &self.marks {
            let ms = at.duration_since(previous).as_secs_f64() * 1e3;
            if ms >= 1.0 {
                parts.push(format!("{name} {ms:.1} ms"));
            }
            previous = *at;
        }
        if parts.is_empty() {
            "every phase under 1 ms".to_string()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_phase_is_named_with_its_time_and_fast_ones_are_left_out() {
        let mut phases = TurnPhases::default();
        phases.start();
        phases.mark("fast");
        std::thread::sleep(std::time::Duration::from_millis(5));
        phases.mark("slow");
        let described = phases.describe();
        assert!(described.starts_with("slow "), "{described}");
        assert!(!described.contains("fast"), "{described}");
        assert!(described.contains("; on a CPU "), "a sleep is told from work: {described}");
        phases.start();
        assert!(phases.describe().starts_with("every phase under 1 ms"));
    }
}
