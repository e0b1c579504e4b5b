//! Backup and restore on real processes over TLS (issue 13, part 5): `waxos … snapshot save
//! FILE` under concurrent writes, `waxosd … --restore FILE` on all five hosts of a new cluster,
//! damaged files refused, and the old cluster's peers refused by the new one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, Cluster};
use waxos_proto::key_value_client::KeyValueClient;

/// Waits until host `i`'s log (written by a batching thread) holds a line with `needle`.
fn wait_for_log(cluster: &Cluster, i: usize, needle: &str, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while !cluster.log_of(i).contains(needle) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Whether the client left `FILE.part` behind.
fn part_exists(file: &Path) -> bool {
    file.with_file_name(format!("{}.part", file.file_name().and_then(|n| n.to_str()).unwrap_or_default())).exists()
}

/// A write acknowledged at a known moment.
struct Acked {
    key: String,
    value: Vec<u8>,
    at: Instant,
}

/// Writes `count` keys of writer `w` one after another (a failed attempt is retried on the next
/// host with the same (client, seq), as the real client does); the acknowledged ones.
async fn write_timed(addrs: Vec<String>, w: u64, count: usize, pause: Duration) -> Vec<Acked> {
    let mut acked = Vec::new();
    let mut host = w as usize % addrs.len();
    for i in 0..count {
        let (key, value) = (format!("w{w}-{i}"), format!("value {w} {i}").into_bytes());
        let request =
            waxos_proto::PutRequest { key: key.clone(), value: value.clone(), client_id: 7_000 + w, seq: i as u64 + 1 };
        for _attempt in 0..40 {
            let result = common::put_once(&addrs[host], &request).await;
            if result.is_ok() {
                acked.push(Acked { key: key.clone(), value: value.clone(), at: Instant::now() });
                break;
            }
            host = (host + 1) % addrs.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(pause).await;
    }
    acked
}

/// Linearizable reads of `keys` spread over `addrs`, one connection per host: the keys whose
/// value differs from the expected one, with what was read.
async fn missing(addrs: &[String], expected: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut clients = Vec::new();
    for addr in addrs {
        clients.push(KeyValueClient::new(common::endpoint(addr).connect().await.expect("connect")));
    }
    let mut wrong = Vec::new();
    for (n, (key, value)) in expected.iter().enumerate() {
        let client = &mut clients[n % addrs.len()];
        let mut got = None;
        for _attempt in 0..20 {
            let mut r =
                tonic::Request::new(waxos_proto::GetRequest { key: key.clone(), client_id: 0, seq: 0, stale: false });
            r.set_timeout(Duration::from_secs(2));
            match client.get(r).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    got = Some(answer.found.then_some(answer.value));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if got.as_ref() != Some(&Some(value.clone())) {
            wrong.push(format!("{key}: {got:?}"));
        }
    }
    wrong
}

/// The cluster id in a host's roster.
fn cluster_id_of(data_dir: &Path) -> String {
    let roster = std::fs::read_to_string(data_dir.join("roster.json")).expect("a roster");
    let value: serde_json::Value = serde_json::from_str(&roster).expect("roster JSON");
    value["cluster_id"].as_str().expect("a cluster id").to_string()
}

/// Starts one `waxosd` of `cluster`'s build with `--restore file` in a fresh data dir (its own
/// coordinator) and waits for it to exit: (exit code, log, data dir).
fn restore_alone(cluster: &Cluster, file: &Path, name: &str) -> (Option<i32>, String, PathBuf) {
    let port = common::free_port();
    let data_dir = cluster.dir.path().join(format!("alone-{name}"));
    let file = file.to_str().expect("utf-8 path");
    let (code, log) = run_host_once(cluster, port, port, &data_dir, &["--restore", file], &format!("alone-{name}"));
    (code, log, data_dir)
}

/// Writes keys, then takes `snapshot save` while four writers keep writing. The file checks
/// out and names the old cluster; a corrupted and a truncated copy are refused by `--restore`
/// with the reason (exit 1, nothing written, no panic). A new five-host cluster on the same
/// ports, every host started with `--restore FILE`, holds every write acknowledged before the
/// save began, has a new cluster id, and refuses a host of the old cluster (exit 78).
#[test]
fn a_backup_taken_under_writes_restores_a_new_cluster_that_refuses_the_old_one() {
    let mut old = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs: Vec<String> = (0..5).map(|i| old.addr(i)).collect();
    let preload = runtime.block_on(write_timed(addrs.clone(), 100, 200, Duration::ZERO));
    assert_eq!(preload.len(), 200, "the preload was acknowledged");
    let writers: Vec<_> =
        (0..4u64).map(|w| runtime.spawn(write_timed(addrs.clone(), w, 120, Duration::from_millis(15)))).collect();
    std::thread::sleep(Duration::from_millis(800));

    let file = old.dir.path().join("backup.waxos");
    let save_started = Instant::now();
    let out = old.client(1, &["snapshot", "save", file.to_str().expect("utf-8 path")]);
    let save_ms = save_started.elapsed().as_millis();
    assert!(out.status.success(), "snapshot save: {}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("saved ") && stdout(&out).contains("slot"), "{}", stdout(&out));
    assert!(!part_exists(&file), "no partial file is left behind");
    let acked: Vec<Acked> =
        preload.into_iter().chain(writers.into_iter().flat_map(|w| runtime.block_on(w).expect("writer"))).collect();
    let before: Vec<(String, Vec<u8>)> =
        acked.iter().filter(|a| a.at < save_started).map(|a| (a.key.clone(), a.value.clone())).collect();
    let during_or_after = acked.len() - before.len();
    assert!(during_or_after > 0 && before.len() > 200, "writes ran before and during the save");

    let bytes = std::fs::read(&file).expect("the backup");
    let (header, _) = waxos_proto::backup::verify(&bytes).expect("the file checks out");
    let old_id = cluster_id_of(&old.hosts[0].data_dir);
    assert_eq!(header.cluster_id, old_id, "the file names the cluster it came from");
    assert!(header.next_apply > 0);
    eprintln!(
        "saved {} bytes at slot {} in {save_ms} ms; {} writes acknowledged before the save, {during_or_after} during or after",
        bytes.len(),
        header.next_apply,
        before.len()
    );
    for needle in ["request received op=snapshot-save", "response sent op=snapshot-save slot="] {
        assert!(wait_for_log(&old, 1, needle, Duration::from_secs(5)), "{needle}:\n{}", old.log_of(1));
    }

    // Damaged copies are refused before anything is written.
    let corrupted = old.dir.path().join("corrupted.waxos");
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    std::fs::write(&corrupted, &flipped).expect("write");
    let truncated = old.dir.path().join("truncated.waxos");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("write");
    for (name, path, reason) in [("corrupted", &corrupted, "checksum mismatch"), ("truncated", &truncated, "truncated")]
    {
        let (code, log, data_dir) = restore_alone(&old, path, name);
        assert_eq!(code, Some(1), "{name}: refused with exit 1; log:\n{log}");
        assert!(log.contains(reason) && log.contains("refusing to start"), "{name}: the reason is logged:\n{log}");
        assert!(!log.contains("panicked"), "{name}: {log}");
        assert!(
            !data_dir.join("roster.json").exists() && !data_dir.join("snapshot").exists(),
            "{name}: nothing written"
        );
    }

    // The new cluster: the old one stopped, five hosts on its ports, each restored from the file.
    let ports = old.ports();
    for i in 0..5 {
        old.kill(i);
    }
    let file_arg = file.to_str().expect("utf-8 path").to_string();
    let restore_started = Instant::now();
    let mut new = Cluster::start_on(&ports, &["--restore", &file_arg]);
    eprintln!(
        "the restored cluster served its first write {} ms after its hosts started",
        restore_started.elapsed().as_millis()
    );
    for i in 0..5 {
        assert!(new.log_of(i).contains("restored from"), "host {i} restored:\n{}", new.log_of(i));
    }
    let new_addrs: Vec<String> = (0..5).map(|i| new.addr(i)).collect();
    let wrong = runtime.block_on(missing(&new_addrs, &before));
    assert!(
        wrong.is_empty(),
        "{} writes acknowledged before the save are missing: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let new_id = cluster_id_of(&new.hosts[0].data_dir);
    assert_ne!(new_id, old_id, "a restore starts a new cluster");
    for i in 1..5 {
        assert_eq!(cluster_id_of(&new.hosts[i].data_dir), new_id);
    }
    // It takes writes of its own, and a restart with --restore still on the command line is
    // an ordinary restart.
    let out = new.client(2, &["put", "after-restore", "yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    new.restart(3);
    new.wait_ready(3);
    assert!(
        wait_for_log(&new, 3, "was restored from this backup already", Duration::from_secs(5)),
        "{}",
        new.log_of(3)
    );

    // A host of the old cluster is refused by the new one. With --restore (as the new hosts
    // are started) it does not even start: its data dir holds a replica already.
    new.kill(4);
    new.hosts[4].data_dir = old.hosts[4].data_dir.clone();
    let log_before = new.log_of(4).len();
    new.restart(4);
    let status = new.wait_exit(4, Duration::from_secs(30));
    let log = new.log_of(4)[log_before..].to_string();
    assert_eq!(status, Some(1), "{log}");
    assert!(log.contains("already holds a replica"), "{log}");
    // Without --restore it starts, and the new cluster's members refuse its streams: it stops
    // with 78 and says why.
    let port = new.hosts[4].port;
    let (status, log) = run_host_once(&new, ports[0], port, &old.hosts[4].data_dir, &[], "old-host");
    assert_eq!(status, Some(78), "the old cluster's host must stop with 78 in the new one; its log:\n{log}");
    assert!(log.contains(&old_id) && log.contains(&new_id), "{log}");
    let refused = (0..4).any(|i| wait_for_log(&new, i, "refused a peer stream from node", Duration::from_secs(1)));
    assert!(refused, "a new member says why it refused the old host");
    let got = runtime.block_on(common::read_eventually(&new.addr(0), "after-restore", Duration::from_secs(10)));
    assert_eq!(got, Ok(Some(b"yes".to_vec())), "the new cluster still serves");
}

/// Runs one waxosd of `cluster`'s build on `port` (coordinator on `coordinator`) with
/// `data_dir` and `args` until it exits (or 30 s): its exit code and log.
fn run_host_once(
    cluster: &Cluster,
    coordinator: u16,
    port: u16,
    data_dir: &Path,
    args: &[&str],
    name: &str,
) -> (Option<i32>, String) {
    let log = cluster.dir.path().join(format!("{name}.log"));
    let mut child = Command::new(common::waxosd_path())
        .args([coordinator.to_string(), port.to_string()])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--guest")
        .arg(&cluster.guest)
        .arg("--trusted-keys")
        .arg(&cluster.trusted_keys)
        .args(common::member_tls_args(port))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn waxosd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// An operator's mistake at a restore: members started from different backups, or fresh
/// next to restored ones, would each be at a slot of another history (catching up from one
/// another loses acknowledged writes: a review's break). The coordinator refuses them at
/// registration with the reason, and the members restored from its backup form the cluster.
#[test]
fn members_restored_from_different_backups_are_refused_at_the_first_start() {
    let mut old = Cluster::start(3, &[]);
    let save = |old: &Cluster, name: &str| {
        let file = old.dir.path().join(name);
        let out = old.client(0, &["snapshot", "save", file.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "snapshot save: {}", stderr(&out));
        file.to_str().expect("utf-8 path").to_string()
    };
    assert!(old.client(0, &["put", "early", "1"]).status.success());
    let a = save(&old, "a.waxos");
    assert!(old.client(0, &["put", "late", "2"]).status.success());
    let b = save(&old, "b.waxos");
    let ports = old.ports();
    for i in 0..3 {
        old.kill(i);
    }
    // The coordinator restores A; a member with B, and one with no backup at all, are refused.
    let mut new = Cluster::start_without_waiting(&ports, &["--restore", &a], &[0]);
    for (name, args) in [("from-b", vec!["--restore", b.as_str()]), ("fresh", vec![])] {
        let dir = new.dir.path().join(format!("data-{name}"));
        let (status, log) = run_host_once(&new, ports[0], ports[1], &dir, &args, name);
        assert_eq!(status, Some(1), "{name}: refused; log:\n{log}");
        assert!(log.contains("same --restore FILE"), "{name}: the reason is logged:\n{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    new.spawn_host(1);
    new.spawn_host(2);
    for i in 0..3 {
        new.wait_ready(i);
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let got = runtime.block_on(common::read_eventually(&new.addr(2), "early", Duration::from_secs(10)));
    assert_eq!(got, Ok(Some(b"1".to_vec())), "the cluster restored from A");
    let got = runtime.block_on(common::read_eventually(&new.addr(1), "late", Duration::from_secs(10)));
    assert_eq!(got, Ok(None), "and from A only");
}

/// `snapshot save` is an operator action: a client certificate without the operator role is
/// refused, and no file is written.
#[test]
fn only_operators_save_snapshots() {
    let cluster = Cluster::start(3, &[]);
    let client = waxos_proto::pki::client(&common::pki_dir());
    let file = cluster.dir.path().join("stolen.waxos");
    let out = cluster.client_as(Some(&client), 0, &["snapshot", "save", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("operator"), "{}", stderr(&out));
    assert!(!file.exists() && !part_exists(&file));
    assert!(wait_for_log(&cluster, 0, "refused op=snapshot save", Duration::from_secs(5)), "{}", cluster.log_of(0));
}
