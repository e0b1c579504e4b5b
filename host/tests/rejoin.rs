//! Hosts that lost their state come back as rejoiners, never as voters with empty memory:
//! a data dir with a roster but no log, a wiped coordinator, and a crash in the middle of a
//! rejoin (real processes).

mod common;

use std::time::{Duration, Instant};

use common::{read_eventually, write_with_retries, Cluster};

fn keys(count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count).map(|i| (format!("r-k{i}"), format!("value {i}").into_bytes())).collect()
}

fn wait_for_log(cluster: &Cluster, host: usize, needle: &str, patience: Duration) {
    let deadline = Instant::now() + patience;
    while !cluster.log_of(host).contains(needle) {
        assert!(Instant::now() < deadline, "host {host} never logged {needle:?}:\n{}", cluster.log_of(host));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_readable_at(cluster: &Cluster, runtime: &tokio::runtime::Runtime, host: usize, acked: &[(String, Vec<u8>)]) {
    runtime.block_on(async {
        for (key, value) in acked {
            let got = read_eventually(&cluster.addr(host), key, Duration::from_secs(20)).await.expect("answer");
            assert_eq!(got.as_deref(), Some(&value[..]), "{key} at host {host}");
        }
    });
}

/// Issue 11 (host side): a data dir whose roster survived but whose `wal/` and `snapshot` did
/// not must rejoin: its promises are gone.
#[test]
fn a_data_dir_with_a_roster_but_no_log_rejoins_instead_of_voting() {
    let mut cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(0)], 11, keys(50), Duration::ZERO));
    assert_eq!(acked.len(), 50);
    let lost = 2;
    cluster.kill(lost);
    let dir = cluster.hosts[lost].data_dir.clone();
    std::fs::remove_dir_all(dir.join("wal")).expect("remove wal");
    let _ = std::fs::remove_file(dir.join("snapshot"));
    assert!(dir.join("roster.json").exists());
    cluster.restart(lost);
    wait_for_log(&cluster, lost, "lost its state and rejoins", Duration::from_secs(10));
    let roster = std::fs::read_to_string(dir.join("roster.json")).expect("roster");
    assert!(roster.contains("\"rejoining\": true"), "the flag must be durable with the roster: {roster}");
    assert_readable_at(&cluster, &runtime, lost, &acked);
}

/// Issue 17, proven bug 1: a wiped host killed right after it saved its roster (before its
/// guest's first record) must come back rejoining, not voting. The flag is in the roster file
/// itself, so whenever that file exists, the flag is there.
#[test]
fn a_wiped_host_killed_as_soon_as_its_roster_exists_still_rejoins() {
    let mut cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(0)], 12, keys(20), Duration::ZERO));
    let wiped = 3;
    cluster.kill(wiped);
    let dir = cluster.hosts[wiped].data_dir.clone();
    std::fs::remove_dir_all(&dir).expect("wipe");
    cluster.restart(wiped);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("roster.json").exists() {
        assert!(Instant::now() < deadline, "no roster written:\n{}", cluster.log_of(wiped));
        std::thread::sleep(Duration::from_millis(1));
    }
    cluster.kill(wiped);
    let roster = std::fs::read_to_string(dir.join("roster.json")).expect("roster");
    assert!(roster.contains("\"rejoining\": true"), "{roster}");
    cluster.restart(wiped);
    wait_for_log(&cluster, wiped, "rejoining", Duration::from_secs(10));
    assert_readable_at(&cluster, &runtime, wiped, &acked);
}

/// Issue 11 (host side): a coordinator that lost its whole data dir cannot register with
/// itself; a member announces the roster to it, and it rejoins under its old id.
#[test]
fn a_wiped_coordinator_learns_the_roster_from_a_member_and_rejoins() {
    let mut cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = runtime.block_on(write_with_retries(vec![cluster.addr(1)], 13, keys(30), Duration::ZERO));
    assert_eq!(acked.len(), 30);
    cluster.kill(0);
    std::fs::remove_dir_all(&cluster.hosts[0].data_dir).expect("wipe the coordinator");
    cluster.restart(0);
    wait_for_log(&cluster, 0, "this coordinator lost its state and rejoins", Duration::from_secs(20));
    // The roster is saved once adopted (just after that line; the log file also holds the
    // first life's lines, so wait for the file itself).
    let path = cluster.hosts[0].data_dir.join("roster.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the adopted roster was never saved:\n{}", cluster.log_of(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let roster = std::fs::read_to_string(&path).expect("roster");
    assert!(roster.contains("\"me\": 1") && roster.contains("\"rejoining\": true"), "{roster}");
    // It adopted the cluster's id with the roster, not the one it made when it started empty.
    let cluster_id = |text: &str| -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        value["cluster_id"].as_str().map(str::to_string)
    };
    let member = std::fs::read_to_string(cluster.hosts[1].data_dir.join("roster.json")).expect("member's roster");
    assert!(cluster_id(&member).is_some(), "{member}");
    assert_eq!(cluster_id(&roster), cluster_id(&member), "{roster}\n{member}");
    cluster.wait_ready(0);
    assert_readable_at(&cluster, &runtime, 0, &acked);
}
