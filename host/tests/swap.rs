//! Hot swap of the guest in a live cluster: under load, with broken and incompatible builds, and
//! across a leader change. Variants come from `scripts/guest-variants.sh` (run by `just test`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{leader_index, read_eventually, stderr, stdout, Cluster};
use waxos_proto::key_value_client::KeyValueClient;
use waxos_proto::{GetRequest, PutRequest};

fn variant(name: &str) -> PathBuf {
    common::guest_variant(name)
}

fn versions(cluster: &Cluster) -> Vec<String> {
    let out = cluster.client(0, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["guest"]["version"].as_str().unwrap_or("down").to_string())
        .collect()
}

/// Swaps `build` in at `host`, signed with the cluster's trusted key (a copy is signed: these
/// tests are about the builds, `signing.rs` about their signatures).
fn swap(cluster: &Cluster, host: usize, build: &Path) -> std::process::Output {
    let signed = cluster.sign(build);
    cluster.client(host, &["swap", signed.to_str().expect("utf-8 path")])
}

/// Acknowledged writes: key and value.
type Writes = Vec<(String, Vec<u8>)>;

/// 32 clients writing and reading without retries; returns (acknowledged writes, failures).
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Writes>>,
}

fn start_load(cluster: &Cluster, runtime: &tokio::runtime::Runtime, clients: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let tasks = (0..clients)
        .map(|c| {
            let addr = cluster.addr(c as usize % cluster.hosts.len());
            let (stop, failures) = (stop.clone(), failures.clone());
            runtime.spawn(async move {
                let mut client = KeyValueClient::new(common::channel(&addr).await);
                let mut acked = Vec::new();
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let key = format!("load-{c}-{seq}");
                    let value = format!("{c}:{seq}").into_bytes();
                    let mut r = tonic::Request::new(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        client_id: 900 + c,
                        seq,
                    });
                    r.set_timeout(Duration::from_secs(5));
                    match client.put(r).await {
                        Ok(_) => acked.push((key.clone(), value)),
                        Err(e) => {
                            eprintln!("put {key} via {addr} failed: {e}");
                            failures.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    seq += 1;
                    let mut r =
                        tonic::Request::new(GetRequest { key: key.clone(), client_id: 900 + c, seq, stale: false });
                    r.set_timeout(Duration::from_secs(5));
                    if let Err(e) = client.get(r).await {
                        eprintln!("get {key} via {addr} failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                acked
            })
        })
        .collect();
    Load { stop, failures, tasks }
}

impl Load {
    fn finish(self, runtime: &tokio::runtime::Runtime) -> (Vec<(String, Vec<u8>)>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for t in self.tasks {
            acked.extend(runtime.block_on(t).expect("load task"));
        }
        (acked, self.failures.load(Ordering::Relaxed))
    }
}

fn assert_readable_everywhere(cluster: &Cluster, runtime: &tokio::runtime::Runtime, acked: &[(String, Vec<u8>)]) {
    runtime.block_on(async {
        for host in 0..cluster.hosts.len() {
            let addr = cluster.addr(host);
            // A sample from every writer plus the last writes, from every host.
            let step = (acked.len() / 150).max(1);
            for (key, value) in acked.iter().step_by(step).chain(acked.iter().rev().take(20)) {
                let got = read_eventually(&addr, key, Duration::from_secs(10)).await.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got.as_deref(), Some(&value[..]), "{key} on host {host}");
            }
        }
    });
}

#[test]
fn rolling_swap_under_load_fails_no_request() {
    let mut cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let load = start_load(&cluster, &runtime, 32);
    std::thread::sleep(Duration::from_millis(500));
    let relabeled = variant("relabeled");
    for host in 0..5 {
        let out = swap(&cluster, host, &relabeled);
        assert_eq!(out.status.code(), Some(0), "swap host {host}: {}", stderr(&out));
        assert!(stdout(&out).contains("-> 0.1.0+swap-test"), "{}", stdout(&out));
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (acked, failures) = load.finish(&runtime);
    assert_eq!(failures, 0, "requests failed during the rolling swap");
    assert!(acked.len() > 200, "too little load: {}", acked.len());
    assert_readable_everywhere(&cluster, &runtime, &acked);
    assert!(versions(&cluster).iter().all(|v| v == "0.1.0+swap-test"), "{:?}", versions(&cluster));
    // Both builds export `staging`: every swap was prepared off the step loop (issue 14), and
    // none fell back to a hand-over snapshot.
    for host in 0..5 {
        let log = cluster.log_of(host);
        assert!(log.contains("hot swap (staged)"), "host {host} did not stage its swap:\n{log}");
        assert!(!log.contains("swapping with a hand-over snapshot"), "host {host} fell back:\n{log}");
    }
    // The swap is persisted: a restarted host runs the new build.
    cluster.restart(2);
    cluster.wait_ready(2);
    let out = cluster.client(2, &["status"]);
    assert_eq!(stdout(&out).matches("0.1.0+swap-test").count(), 5, "{}", stdout(&out));
}

#[test]
fn broken_builds_are_refused_and_the_old_guest_keeps_serving() {
    let cluster = Cluster::start(3, &[]);
    for (name, reason) in [
        ("trap-on-start", "crashed in start"),
        ("not-a-world", "does not export the waxos replica-node world"),
        ("not-wasm", "is not a valid wasm component"),
    ] {
        let out = swap(&cluster, 1, &variant(name));
        assert_eq!(out.status.code(), Some(1), "{name} must be refused");
        assert!(stderr(&out).contains(reason), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("the old guest keeps running"), "{name}: {}", stderr(&out));
        let out = cluster.client(1, &["put", "still", name]);
        assert_eq!(out.status.code(), Some(0), "after {name}: {}", stderr(&out));
    }
    assert!(versions(&cluster).iter().all(|v| v == "0.1.0"), "{:?}", versions(&cluster));
    assert!(cluster.log_of(1).contains("swap to"), "refusals are logged");
}

/// Issue 17, proven bug 4: two swaps at once (a good build and one that traps in `start`) both
/// wrote `next.wasm`; the refused build could end up installed, and the host then could not
/// restart. Swaps are one at a time: whatever order they run in, the installed build is the good
/// one, and a restart comes back serving.
#[test]
fn two_swaps_at_once_never_install_the_refused_build() {
    let mut cluster = Cluster::start(3, &[]);
    for _round in 0..3 {
        let good = variant("relabeled");
        let bad = variant("trap-on-start");
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| swap(&cluster, 1, &good));
            let b = s.spawn(|| swap(&cluster, 1, &bad));
            (a.join().expect("swap thread"), b.join().expect("swap thread"))
        });
        assert_eq!(a.status.code(), Some(0), "the good build must swap in: {}", stderr(&a));
        assert_eq!(b.status.code(), Some(1), "the trapping build must be refused: {}", stderr(&b));
        let installed = cluster.hosts[1].data_dir.join("guest/current.wasm");
        let bytes = std::fs::read(&installed).expect("an installed build");
        assert_eq!(bytes, std::fs::read(&good).expect("good build"), "the refused build was installed");
    }
    cluster.restart(1);
    cluster.wait_ready(1);
}

#[test]
fn an_older_build_refuses_a_newer_snapshot() {
    let cluster = Cluster::start(3, &[]);
    let out = swap(&cluster, 0, &variant("snapshot-v3"));
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", stderr(&out));
    // Back to the current build, which reads snapshot formats up to 2 only.
    let out = swap(&cluster, 0, &common::guest_path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("newer than this build reads"), "{}", stderr(&out));
    assert_eq!(versions(&cluster)[0], "0.1.0+snapshot-v3");
    let out = cluster.client(0, &["put", "after", "refusal"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn swapping_during_a_leader_change_loses_nothing() {
    let mut cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs: Vec<String> = (0..5).map(|i| cluster.addr(i)).collect();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let keys = (0..120).map(|i| (format!("lc-{w}-{i}"), format!("{w}/{i}").into_bytes())).collect();
            runtime.spawn(common::write_with_retries(addrs.clone(), 300 + w, keys, Duration::from_millis(5)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let leader = leader_index(&cluster, 0).expect("a leader");
    // Swap the leader itself, then kill it: the others elect a leader while being swapped too.
    let relabeled = variant("relabeled");
    let out = swap(&cluster, leader, &relabeled);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    cluster.kill(leader);
    for host in (0..5).filter(|h| *h != leader) {
        let out = swap(&cluster, host, &relabeled);
        assert_eq!(out.status.code(), Some(0), "swap host {host}: {}", stderr(&out));
    }
    cluster.restart(leader);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(runtime.block_on(w).expect("writer"));
    }
    assert_eq!(acked.len(), 8 * 120, "every write is eventually acknowledged");
    assert_readable_everywhere(&cluster, &runtime, &acked);
}
