//! Storage and restart figures for this machine (a benchmark, not a test):
//! - write + fdatasync latency of a small append;
//! - WAL throughput with one fdatasync per record vs. group commit (100 records per sync);
//! - guest restart from a snapshot of 100k and 1M keys (instantiate + `start`), and from the 1M-key
//!   snapshot plus a WAL of 20,000 slots of 25 puts each (what a restart replays on top of it).
//!
//! Run with `just bench-storage` (or `cargo run --release -p waxos-host --example storage_bench`).

use std::io::Write;
use std::time::Instant;

use waxos_guest::types::{Command, Config};
use waxos_host::runtime::{GuestConfig, Runtime};
use waxos_host::storage::Wal;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-storage");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;

    // 1. fdatasync latency of a 128-byte append.
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(root.join("fsync.dat"))?;
    let mut samples = Vec::new();
    for _ in 0..2_000 {
        let t = Instant::now();
        file.write_all(&[7u8; 128])?;
        file.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "fdatasync of a 128-byte append: median {:.3} ms, p99 {:.3} ms (n=2000)",
        percentile(&samples, 50.0),
        percentile(&samples, 99.0)
    );

    // 2. WAL: one sync per record vs. group commit.
    let record = vec![42u8; 150];
    for per_sync in [1usize, 100] {
        let dir = root.join(format!("wal-{per_sync}"));
        let (mut wal, _) = Wal::open(&dir, 0, false, 64 << 20)?;
        let total = if per_sync == 1 { 3_000 } else { 100_000 };
        let t = Instant::now();
        for i in 0..total {
            wal.append(&record);
            if (i + 1) % per_sync == 0 {
                wal.sync()?;
            }
        }
        wal.sync()?;
        let secs = t.elapsed().as_secs_f64();
        println!("WAL, {per_sync} record(s) per fdatasync: {:.0} records/s", total as f64 / secs);
    }

    // 3. Restart from a snapshot.
    let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/guest/waxos_guest.wasm");
    let runtime = Runtime::new(&root.join("cache"))?;
    let build = runtime.load(&guest)?;
    for keys in [100_000u64, 1_000_000] {
        let config = Config {
            me: 1,
            members: waxos_guest::membership::voters(&[1, 2, 3]),
            seed: 1,
            test_hooks: false,
            retain_slots: 2_000,
            rejoining: false,
        };
        let mut replica = waxos_guest::replica::Replica::start(config, None, &[]).map_err(anyhow::Error::msg)?;
        for k in 0..keys {
            let command = Command::Put(format!("key-{k:09}"), vec![b'v'; 100]);
            replica.learner.kv.apply(k, 1_000 + (k % 1_000), k + 1, &command);
        }
        let snapshot = replica.snapshot(false);
        std::fs::write(root.join("snapshot"), &snapshot)?;
        let t = Instant::now();
        let bytes = std::fs::read(root.join("snapshot"))?;
        let mut instance = build.instantiate().map_err(anyhow::Error::from)?;
        let config = GuestConfig {
            me: 1,
            members: waxos_host::runtime::voters(&[1, 2, 3]),
            seed: 1,
            test_hooks: false,
            retain_slots: 2_000,
            rejoining: false,
        };
        instance.start(&config, Some(&bytes), &[]).map_err(anyhow::Error::from)?.map_err(anyhow::Error::msg)?;
        let restart_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let again = instance.snapshot(false).map_err(anyhow::Error::from)?;
        println!(
            "{keys} keys: snapshot {} MB; restart (read + instantiate + start) {restart_ms:.0} ms; snapshot() in the guest {:.0} ms",
            snapshot.len() / 1_000_000,
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(again.len(), snapshot.len());
        if keys == 1_000_000 {
            let records = wal_of_puts(20_000, 25);
            let wal_bytes: usize = records.iter().map(Vec::len).sum();
            let t = Instant::now();
            let mut instance = build.instantiate().map_err(anyhow::Error::from)?;
            instance
                .start(&config, Some(&bytes), &records)
                .map_err(anyhow::Error::from)?
                .map_err(anyhow::Error::msg)?;
            println!(
                "{keys} keys + {} WAL records ({} MB, 500,000 puts): restart (instantiate + start) {:.0} ms",
                records.len(),
                wal_bytes / 1_000_000,
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}

/// A WAL as a leader's accepts make it: per slot an `Accepted` record of a batch of `per_slot`
/// 100-byte puts, then the `ChosenAccepted` record that names it.
fn wal_of_puts(slots: u64, per_slot: u64) -> Vec<Vec<u8>> {
    use waxos_guest::message::{encode, Ballot, ClientCommand, Record, Value};
    let ballot = Ballot { round: 3, node: 2 };
    let mut records = Vec::new();
    for slot in 0..slots {
        let batch = (0..per_slot)
            .map(|i| ClientCommand {
                origin: 2,
                request_id: slot * per_slot + i,
                client: 10_000 + i,
                seq: slot + 1,
                command: Command::Put(format!("key-{:09}", (slot * per_slot + i) % 1_000_000), vec![b'w'; 100]),
            })
            .collect();
        records.push(encode(&Record::Accepted { slot, ballot, value: Value::Batch(batch) }));
        records.push(encode(&Record::ChosenAccepted { slot, ballot }));
    }
    records
}
