//! The crash-point harness (issue 17): for every named crash point of the host's storage
//! (`waxos_host::crash_point::ALL`), a real host of a three-replica cluster under load is made
//! to die exactly there, then restarted. Each time it proves three things: the restart starts
//! and serves (no valid state refused), every write acknowledged so far is readable through
//! it (no acknowledged write lost), and its acceptor's promise is at least the one it had last
//! reported before dying (no promise forgotten). Needs a build with the `crash-points`
//! feature, which `just test` uses.
#![cfg(feature = "crash-points")]

mod common;

use std::time::{Duration, Instant};

use common::{parse_ballot, read_eventually, write_with_retries, Cluster};
use waxos_host::crash_point;

/// How a point is made to happen.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Trigger {
    /// Writes through the cluster: syncs, rolls, compactions.
    Load,
    /// A hot swap of the host's guest.
    Swap,
    /// The host's data dir is wiped: it registers again, saves its roster and rejoins.
    Wipe,
    /// An unsynced tail is left in its WAL: the start cuts it.
    TornTail,
}

fn trigger(point: &str) -> (Trigger, u64) {
    match point {
        p if p.starts_with("roster.") || p.starts_with("rejoin.") => (Trigger::Wipe, 1),
        p if p.starts_with("next.") || p.starts_with("swap.") => (Trigger::Swap, 1),
        "wal.open.after_cut" => (Trigger::TornTail, 1),
        p if p.starts_with("wal.sync.") => (Trigger::Load, 25),
        _ => (Trigger::Load, 2),
    }
}

#[test]
fn every_crash_point_keeps_acknowledged_writes_promises_and_a_valid_start() {
    // Compaction every 30 records and 64 KiB segments: every point is reached within a round.
    let mut cluster =
        Cluster::start(3, &["--snapshot-every", "30", "--compact-log-ratio", "0", "--wal-segment-bytes", "65536"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs: Vec<String> = (0..3).map(|i| cluster.addr(i)).collect();
    let target = 1;
    let mut acked_all: Vec<(String, Vec<u8>)> = Vec::new();
    for (round, point) in crash_point::ALL.iter().enumerate() {
        let (how, nth) = trigger(point);
        let started = Instant::now();
        cluster.kill(target);
        match how {
            Trigger::Wipe => std::fs::remove_dir_all(&cluster.hosts[target].data_dir).expect("wipe"),
            Trigger::TornTail => append_unsynced_tail(&cluster.hosts[target].data_dir),
            Trigger::Load | Trigger::Swap => {}
        }
        cluster.hosts[target].env = vec![("WAXOS_CRASH_AT".into(), format!("{point}@{nth}"))];
        cluster.restart(target);
        // Load for every round, in batches until the host dies: the point is reached under it
        // however the writes are grouped into syncs (or, for start-up points, the rest of the
        // cluster keeps working meanwhile).
        let load = |batch: usize| -> Vec<_> {
            let keys: Vec<(String, Vec<u8>)> = (0..150)
                .map(|i| {
                    (format!("cp{round}-b{batch}-k{i}"), format!("{point} value {i} {}", "x".repeat(2000)).into_bytes())
                })
                .collect();
            keys.chunks(50)
                .enumerate()
                .map(|(w, chunk)| {
                    runtime.spawn(write_with_retries(
                        addrs.clone(),
                        1000 + 100 * round as u64 + 10 * batch as u64 + w as u64,
                        chunk.to_vec(),
                        Duration::from_millis(2),
                    ))
                })
                .collect()
        };
        let mut batches = 1;
        let mut writers = load(0);
        if how == Trigger::Swap {
            // Until the host takes the swap (it refuses one while starting) or dies at the point.
            let deadline = Instant::now() + Duration::from_secs(30);
            let signed = cluster.sign(&common::guest_path()).display().to_string();
            while cluster.alive(target) && Instant::now() < deadline {
                if cluster.client(target, &["--timeout-ms", "20000", "swap", &signed]).status.success() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // The last promise the host reported before it died.
        let mut promised = None;
        let code = loop {
            if let Some(code) = cluster.wait_exit(target, Duration::from_millis(50)) {
                break Some(code);
            }
            if started.elapsed() > Duration::from_secs(60) {
                break None;
            }
            if how == Trigger::Load && writers.iter().all(|w| w.is_finished()) {
                writers.extend(load(batches));
                batches += 1;
            }
            if how == Trigger::Load {
                if let Some(p) = cluster.guest_status(target).and_then(|g| parse_ballot(g["promised"].as_str()?)) {
                    promised = Some(p);
                }
            }
        };
        let log = cluster.log_of(target);
        assert_eq!(code, Some(crash_point::EXIT_CODE), "crash point {point} never reached in 60 s:\n{log}");
        assert!(log.contains(&format!("crash point {point} reached")), "{point}:\n{log}");
        for w in writers {
            acked_all.extend(runtime.block_on(w).expect("writer"));
        }
        // Restart as an operator would: no crash point armed.
        cluster.hosts[target].env.clear();
        cluster.restart(target);
        cluster.wait_ready(target);
        if let Some(before) = promised {
            let after = cluster.guest_status(target).and_then(|g| parse_ballot(g["promised"].as_str()?));
            assert!(after.is_some_and(|a| a >= before), "{point}: promise {before:?} forgotten, now {after:?}");
        }
        assert_readable_at(&cluster, &runtime, target, &acked_all);
        eprintln!(
            "crash point {point}: ok ({} ms, {} writes acknowledged so far)",
            started.elapsed().as_millis(),
            acked_all.len()
        );
    }
}

/// A zero-filled page after the last record: what a crash leaves where a write never landed.
fn append_unsynced_tail(data_dir: &std::path::Path) {
    let last = common::last_wal_segment(data_dir);
    let mut file = std::fs::OpenOptions::new().append(true).open(&last).expect("open segment");
    std::io::Write::write_all(&mut file, &[0u8; 4096]).expect("append zeros");
}

fn assert_readable_at(cluster: &Cluster, runtime: &tokio::runtime::Runtime, host: usize, acked: &[(String, Vec<u8>)]) {
    runtime.block_on(async {
        let addr = cluster.addr(host);
        let mut tasks = Vec::new();
        for chunk in acked.chunks(acked.len().div_ceil(8).max(1)) {
            let (chunk, addr) = (chunk.to_vec(), addr.clone());
            tasks.push(tokio::spawn(async move {
                for (key, value) in chunk {
                    let got = read_eventually(&addr, &key, Duration::from_secs(20)).await.expect("answer");
                    assert_eq!(got.as_deref(), Some(&value[..]), "{key} at {addr}");
                }
            }));
        }
        for t in tasks {
            t.await.expect("reader");
        }
    });
}
