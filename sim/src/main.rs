//! `waxos-sim`: runs seeds of the deterministic simulation and prints a summary; on a failure,
//! the seed and the command that replays it with a trace.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use waxos_host::runtime::Runtime;
use waxos_sim::{run_seed, SimConfig, Stats};

/// Deterministic simulation of the real guest .wasm with a linearizability checker.
#[derive(Parser, Debug)]
#[command(name = "waxos-sim")]
struct Args {
    /// How many seeds to run (from --first-seed on).
    #[arg(default_value_t = 1000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run only this seed (and print its trace with --trace).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the run's trace (faults and their timing).
    #[arg(long)]
    trace: bool,
    /// The guest build.
    #[arg(long, default_value = "target/wasm32-wasip2/guest/waxos_guest.wasm")]
    guest: PathBuf,
    /// A second build, hot-swapped in and out during the run.
    #[arg(long)]
    swap_with: Option<PathBuf>,
    /// No faults at all (a baseline).
    #[arg(long)]
    no_faults: bool,
    /// Do not stop at the first violation: run every seed and list each failing one.
    #[arg(long)]
    keep_going: bool,
}

fn main() {
    let args = Args::parse();
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("waxos-sim: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(args: &Args) -> anyhow::Result<i32> {
    let cache = std::env::temp_dir().join("waxos-sim-cache");
    let runtime = Runtime::new(&cache)?;
    let mut builds = vec![runtime.load(&args.guest)?];
    if let Some(other) = &args.swap_with {
        builds.push(runtime.load(other)?);
    }
    let config = SimConfig { faults: !args.no_faults, ..SimConfig::default() };
    let seeds: Vec<u64> = match args.seed {
        Some(seed) => vec![seed],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let started = Instant::now();
    let mut total = Stats::default();
    let mut ops = 0u64;
    let mut violations = 0u64;
    for &seed in &seeds {
        match run_seed(&builds, &config, seed, args.trace) {
            Ok(run) => {
                if args.trace {
                    run.trace.iter().for_each(|l| println!("{l}"));
                }
                ops += run.history.len() as u64;
                total.add(&run.stats);
            }
            Err((failure, trace)) => {
                trace.iter().for_each(|l| println!("{l}"));
                println!("VIOLATION at seed {seed}: {failure}");
                println!("replay: just sim --seed {seed} --trace");
                violations += 1;
                if !args.keep_going {
                    return Ok(1);
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds, {ops} client ops ({} completed, {} unknown), {} guest steps; {total}; {violations} violations; {:.1} s ({:.1} seeds/s, {:.0} steps/s)",
        seeds.len(),
        total.completed,
        total.unknown,
        total.steps,
        secs,
        seeds.len() as f64 / secs,
        total.steps as f64 / secs,
    );
    Ok(if violations > 0 { 1 } else { 0 })
}
