//! Durability end to end: SIGKILL under load, wiped disks, and chaos, with real processes.

mod common;

use std::time::Duration;

use common::{leader_index, read_eventually, write_with_retries, Cluster};

fn keys(writer: u64, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count).map(|i| (format!("w{writer}-k{i}"), format!("value {writer}/{i}").into_bytes())).collect()
}

/// Every acknowledged write is readable, with its value, from every host.
fn assert_all_readable(cluster: &Cluster, runtime: &tokio::runtime::Runtime, acked: &[(String, Vec<u8>)]) {
    runtime.block_on(async {
        for host in 0..cluster.hosts.len() {
            let addr = cluster.addr(host);
            let mut tasks = Vec::new();
            for chunk in acked.chunks(acked.len().div_ceil(16).max(1)) {
                let chunk = chunk.to_vec();
                let addr = addr.clone();
                tasks.push(tokio::spawn(async move {
                    for (key, value) in chunk {
                        let got = read_eventually(&addr, &key, Duration::from_secs(20))
                            .await
                            .unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(got.as_deref(), Some(&value[..]), "{key} on {addr}");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("reader");
            }
        }
    });
}

#[test]
fn sigkilled_hosts_lose_no_acknowledged_write() {
    let mut cluster = Cluster::start(5, &["--snapshot-every", "300", "--compact-log-ratio", "0"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs: Vec<String> = (0..5).map(|i| cluster.addr(i)).collect();
    let writers: Vec<_> = (0..16u64)
        .map(|w| runtime.spawn(write_with_retries(addrs.clone(), 100 + w, keys(w, 150), Duration::from_millis(5))))
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let leader = leader_index(&cluster, 0).unwrap_or(0);
    cluster.kill(leader);
    std::thread::sleep(Duration::from_millis(800));
    let follower = (leader + 2) % 5;
    cluster.kill(follower);
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart(leader);
    cluster.restart(follower);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(runtime.block_on(w).expect("writer"));
    }
    assert!(acked.len() > 1000, "too few writes acknowledged: {}", acked.len());
    assert_all_readable(&cluster, &runtime, &acked);
    let log = cluster.log_of(leader);
    assert!(log.contains("started from"), "{log}");
}

#[test]
fn wiped_host_rejoins_through_snapshot_transfer() {
    let mut cluster =
        Cluster::start(5, &["--retain-slots", "20", "--snapshot-every", "100", "--compact-log-ratio", "0"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(0)], 7, keys(7, 300), Duration::ZERO));
    assert_eq!(acked.len(), 300);
    let wiped = 3;
    cluster.kill(wiped);
    std::fs::remove_dir_all(&cluster.hosts[wiped].data_dir).expect("wipe");
    cluster.restart(wiped);
    assert_all_readable(&cluster, &runtime, &acked);
    let log = cluster.log_of(wiped);
    assert!(log.contains("rejoining with no state"), "{log}");
    assert!(log.contains("installed a snapshot"), "{log}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cluster.log_of(wiped).contains("voting again") {
        assert!(std::time::Instant::now() < deadline, "never voted again: {}", cluster.log_of(wiped));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its data dir holds state again, and a restart no longer counts as a rejoin.
    cluster.restart(wiped);
    cluster.wait_ready(wiped);
}

#[test]
fn chaos_at_a_high_rate_loses_no_acknowledged_write() {
    let cluster = Cluster::start(
        5,
        &["--chaos", "high", "--chaos-seed", "20261125", "--snapshot-every", "500", "--compact-log-ratio", "0"],
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs: Vec<String> = (0..5).map(|i| cluster.addr(i)).collect();
    // Bounded load: 8 writers, a write every ~10 ms each, for about 30 s.
    let started = std::time::Instant::now();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let addrs = addrs.clone();
            runtime.spawn(async move {
                let mut acked = Vec::new();
                let mut round = 0;
                while started.elapsed() < Duration::from_secs(30) {
                    let batch = keys(w * 1000 + round, 50);
                    acked.extend(
                        write_with_retries(addrs.clone(), 5000 + w * 1000 + round, batch, Duration::from_millis(10))
                            .await,
                    );
                    round += 1;
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(runtime.block_on(w).expect("writer"));
    }
    assert!(acked.len() > 500, "too few writes acknowledged under chaos: {}", acked.len());
    assert_all_readable(&cluster, &runtime, &acked);
    let logs: String = (0..5).map(|i| cluster.log_of(i)).collect();
    let outages = logs.matches("chaos: acceptor outage starts").count();
    let recoveries = logs.matches("chaos: guest crash recovered").count();
    eprintln!("chaos: {} writes acknowledged, {outages} acceptor outages, {recoveries} guest restarts", acked.len());
    assert!(outages > 0, "no acceptor outage happened");
    assert!(recoveries > 0, "no guest crash was recovered");
}
