//! The disk misbehaving under real processes (issue 17): zero-filled and torn WAL tails, a
//! snapshot whose WAL is gone, a failing and a stalled `fdatasync`, short writes. Faults come
//! from outside the host's code: files damaged on disk between runs, and the fault-injecting
//! disk (`tests/faultdisk/faultdisk.c`, an `LD_PRELOAD` shim over fdatasync/fsync/write).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{faultdisk_env, read_eventually, rss_mib, write_with_retries, Cluster};

fn keys(prefix: &str, count: usize, value_bytes: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let mut value = format!("{prefix} value {i} ").into_bytes();
            value.resize(value_bytes.max(value.len()), b'.');
            (format!("{prefix}-k{i}"), value)
        })
        .collect()
}

fn assert_readable_at(cluster: &Cluster, runtime: &tokio::runtime::Runtime, host: usize, acked: &[(String, Vec<u8>)]) {
    runtime.block_on(async {
        for (key, value) in acked {
            let got = read_eventually(&cluster.addr(host), key, Duration::from_secs(20)).await.expect("answer");
            assert_eq!(got.as_deref(), Some(&value[..]), "{key} at host {host}");
        }
    });
}

fn wait_for_log(cluster: &Cluster, host: usize, needle: &str, patience: Duration) {
    let deadline = Instant::now() + patience;
    while !cluster.log_of(host).contains(needle) {
        assert!(Instant::now() < deadline, "host {host} never logged {needle:?}:\n{}", cluster.log_of(host));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn last_segment(data_dir: &Path) -> PathBuf {
    common::last_wal_segment(data_dir)
}

/// Proven bug 3: a WAL whose tail is zeros (preallocated space, or a group commit whose first
/// page never reached the disk while a later one did) is a crash, not corruption: the host
/// cuts the unsynced tail, starts and serves every acknowledged write.
#[test]
fn zero_filled_and_torn_wal_tails_are_cut_and_the_host_serves() {
    let mut cluster = Cluster::start(3, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(0)], 31, keys("z", 40, 100), Duration::ZERO));
    assert_eq!(acked.len(), 40);
    let host = 1;
    for (round, damage) in ["zero-filled tail", "torn write"].iter().enumerate() {
        cluster.kill(host);
        let segment = last_segment(&cluster.hosts[host].data_dir);
        let mut bytes = std::fs::read(&segment).expect("read segment");
        let valid = bytes.len();
        if round == 0 {
            bytes.extend_from_slice(&[0u8; 4096]);
        } else {
            // A torn group commit: a zeroed page, then a page of records of the same write.
            bytes.extend_from_slice(&[0u8; 4096]);
            let payload = b"a record of a group commit that never completed";
            for _ in 0..60 {
                bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&crc32c(payload).to_le_bytes());
                bytes.extend_from_slice(payload);
            }
        }
        std::fs::write(&segment, &bytes).expect("damage segment");
        cluster.restart(host);
        wait_for_log(&cluster, host, damage, Duration::from_secs(15));
        cluster.wait_ready(host);
        let now = std::fs::read(last_segment(&cluster.hosts[host].data_dir)).expect("read segment");
        assert!(now.len() < valid || !now[valid..].starts_with(&[0u8; 512]), "the unsynced tail is gone");
        assert_readable_at(&cluster, &runtime, host, &acked);
    }
}

/// crc32c, as the WAL writes it (Castagnoli, reflected), for records made by hand.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Proven bug 2: a snapshot whose `wal/` is gone means records after it were lost. The host
/// refuses to start, with an error naming what is missing, instead of serving without them.
#[test]
fn a_snapshot_without_its_wal_refuses_to_start() {
    let mut cluster = Cluster::start(3, &["--snapshot-every", "20", "--compact-log-ratio", "0"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(0)], 32, keys("s", 60, 100), Duration::ZERO));
    assert_eq!(acked.len(), 60);
    let host = 2;
    cluster.kill(host);
    let dir = cluster.hosts[host].data_dir.clone();
    assert!(dir.join("snapshot").exists(), "compaction ran");
    std::fs::remove_dir_all(dir.join("wal")).expect("remove wal");
    let before = cluster.log_of(host).len();
    cluster.restart(host);
    let code = cluster.wait_exit(host, Duration::from_secs(20));
    assert_eq!(code, Some(1), "must refuse to start:\n{}", cluster.log_of(host));
    let log = cluster.log_of(host)[before..].to_string();
    assert!(log.contains("is missing") && log.contains("refusing to start"), "{log}");
    assert!(!log.contains("serving as one of"), "{log}");
}

/// A failed fdatasync stops the host (it must not answer for records that may not be on disk)
/// and marks the data dir; the next start does not replay what the page cache may still hold:
/// it sets the state aside and rejoins, and the cluster brings it back.
#[test]
fn a_failed_fdatasync_stops_the_host_and_the_next_start_rejoins() {
    let mut cluster = Cluster::start(3, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let host = 1;
    cluster.hosts[host].env = faultdisk_env("/wal/", "eio", 30);
    cluster.restart(host);
    cluster.wait_ready(host);
    let addrs: Vec<String> = (0..3).map(|i| cluster.addr(i)).collect();
    let acked = runtime.block_on(write_with_retries(addrs, 33, keys("e", 120, 100), Duration::ZERO));
    assert_eq!(acked.len(), 120, "the other two carry on");
    assert_eq!(cluster.wait_exit(host, Duration::from_secs(20)), Some(70), "{}", cluster.log_of(host));
    let dir = cluster.hosts[host].data_dir.clone();
    assert!(dir.join("wal-failed").exists(), "the data dir is marked");
    assert!(cluster.log_of(host).contains("cannot make the WAL durable"), "{}", cluster.log_of(host));
    cluster.hosts[host].env.clear();
    cluster.restart(host);
    wait_for_log(&cluster, host, "is set aside in", Duration::from_secs(15));
    wait_for_log(&cluster, host, "rejoining with no state", Duration::from_secs(15));
    assert!(!dir.join("wal-failed").exists(), "the mark goes once the state is aside");
    assert_readable_at(&cluster, &runtime, host, &acked);
    wait_for_log(&cluster, host, "voting again", Duration::from_secs(20));
}

/// Writes that the kernel takes only in part are carried on until whole (short writes on the
/// WAL): nothing is cut or refused at the next start.
#[test]
fn short_writes_lose_nothing() {
    let mut cluster = Cluster::start(3, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let host = 2;
    cluster.hosts[host].env = faultdisk_env("/wal/", "short-writes", 0);
    cluster.restart(host);
    cluster.wait_ready(host);
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(host)], 34, keys("w", 80, 3000), Duration::ZERO));
    assert_eq!(acked.len(), 80);
    cluster.kill(host);
    cluster.hosts[host].env.clear();
    cluster.restart(host);
    cluster.wait_ready(host);
    let log = cluster.log_of(host);
    assert!(!log.contains("cut off") && !log.contains("refusing"), "{log}");
    assert_readable_at(&cluster, &runtime, host, &acked);
}

/// A follower whose fdatasync stalls under load: its step loop keeps running (status answers,
/// it is not called down), it turns work away once the backlog bound is reached instead of
/// growing (clients get RESOURCE_EXHAUSTED, with a reason), its memory stays bounded, and when
/// the disk comes back it catches up with every acknowledged write.
#[test]
fn a_stalled_disk_turns_work_away_instead_of_growing() {
    let mut cluster = Cluster::start(3, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let leader = common::leader_index(&cluster, 0).unwrap_or(0);
    let host = (leader + 1) % 3;
    let stall = cluster.dir.path().join("stall");
    cluster.hosts[host].env = faultdisk_env("/wal/", &format!("stall-while:{}", stall.display()), 0);
    cluster.restart(host);
    cluster.wait_ready(host);
    std::fs::write(&stall, b"").expect("stall the disk");
    let others: Vec<String> = (0..3).filter(|&i| i != host).map(|i| cluster.addr(i)).collect();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            runtime.spawn(write_with_retries(
                others.clone(),
                40 + w,
                keys(&format!("st{w}"), 160, 64 << 10),
                Duration::ZERO,
            ))
        })
        .collect();
    wait_for_log(&cluster, host, "disk behind", Duration::from_secs(60));
    // The step loop is not frozen: the stalled host answers status and refuses writes with a reason.
    let status = cluster.guest_status(host).expect("the stalled host answers status");
    assert!(status["role"].is_string(), "{status}");
    let refused = runtime.block_on(async {
        let mut kv = cluster.grpc(host).await;
        kv.put(waxos_proto::PutRequest { key: "on-a-stalled-disk".into(), value: vec![1; 10], client_id: 49, seq: 1 })
            .await
    });
    let status = refused.expect_err("a write through the stalled host must not be acknowledged");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("disk is behind"), "{status:?}");
    let pid = cluster.hosts[host].child.as_ref().map(|c| c.id()).expect("running");
    let rss = rss_mib(pid).expect("rss");
    assert!(rss < 700, "a stalled disk must not cost memory without end: {rss} MiB");
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(runtime.block_on(w).expect("writer"));
    }
    assert_eq!(acked.len(), 8 * 160, "the other two carry on");
    std::fs::remove_file(&stall).expect("unstall the disk");
    assert_readable_at(&cluster, &runtime, host, &acked);
}
