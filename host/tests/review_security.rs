//! Cases found by an adversarial review of signed guest builds (issue 12 part 3) and data-dir
//! identity (issue 17 bug 5) at ce36d45. Each states the rule it checks; each failed there. The
//! first two passed since; the third since peers are authenticated (mTLS, see its doc).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, Cluster};
use waxos_proto::admin_client::AdminClient;
use waxos_proto::peer_client::PeerClient;
use waxos_proto::{EnvelopeBatch, SwapGuestRequest};

fn variant(name: &str) -> PathBuf {
    common::guest_variant(name)
}

fn version_of(cluster: &Cluster, i: usize) -> String {
    cluster
        .guest_status(i)
        .and_then(|g| g["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "down".to_string())
}

fn cwasm_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cwasm")).collect()
        })
        .unwrap_or_default()
}

/// Rule: only builds whose exact bytes are signed by a trusted key ever run. The start-up check
/// verifies the bytes of `--guest`, then `load_component` looks the compiled code up in
/// `guest-cache/` under a 64-bit `DefaultHasher` (fixed zero keys) of those bytes and the
/// engine's compatibility hash, and deserializes whatever file is there (native code,
/// `unsafe`) — nothing ties the cached artifact to the verified bytes. Whoever can write the data
/// dir (the threat `tests/signing.rs` already covers for `guest/current.wasm`) runs an unsigned
/// build: here the compiled *unsigned* `relabeled` variant is put under the signed guest's cache
/// name.
/// Expected: the host runs the signed guest ("0.1.0"), or refuses to start. Today: it runs
/// "0.1.0+swap-test" while logging that the signed build's signature verified.
#[test]
fn a_planted_compiled_guest_cache_file_never_runs_an_unsigned_build() {
    let mut cluster = Cluster::start(1, &[]);
    assert_eq!(version_of(&cluster, 0), "0.1.0");
    let cache = cluster.hosts[0].data_dir.join("guest-cache");
    assert!(cwasm_files(&cache).is_empty(), "a host that runs only signed builds keeps no compiled code on disk");
    cluster.kill(0);
    // The cache name the signed guest would have, and the unsigned variant compiled under it.
    let (name, _) = compile_in_scratch(&common::guest_path());
    let (_, planted) = compile_in_scratch(&variant("relabeled"));
    std::fs::create_dir_all(&cache).expect("cache dir");
    std::fs::write(cache.join(name), planted).expect("plant the cache file");
    cluster.restart(0);
    cluster.wait_ready(0);
    let version = version_of(&cluster, 0);
    assert_eq!(
        version,
        "0.1.0",
        "an unsigned build runs under the signed build's name (planted guest-cache file):\n{}",
        cluster.log_of(0)
    );
}

/// Compiles `build` with this waxosd in a scratch host (`--allow-unsigned`, which keeps a
/// compiled cache); the name and bytes of the cache file it wrote.
fn compile_in_scratch(build: &Path) -> (std::ffi::OsString, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = dir.path();
    let port = common::free_port();
    let mut other = Command::new(common::waxosd_path())
        .args([&port.to_string(), &port.to_string(), "--replicas", "1", "--allow-unsigned", "--insecure", "--data-dir"])
        .arg(scratch.join("data"))
        .arg("--guest")
        .arg(build)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let compiled = loop {
        if let Some(file) = cwasm_files(&scratch.join("data/guest-cache")).pop() {
            break file;
        }
        assert!(Instant::now() < deadline, "the scratch host never compiled {}", build.display());
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = other.kill();
    let _ = other.wait();
    let name = compiled.file_name().expect("a file name").to_owned();
    (name, std::fs::read(&compiled).expect("read the compiled build"))
}

/// Rule: a crash (or restart) at any point of a swap's persistence leaves a host that starts a
/// trusted build. `SWAP_IN_PROGRESS` is a guard inside the handler future: when the client
/// cancels (Ctrl-C, its deadline, a proxy), hyper drops the future and the guard, although the
/// swap is already queued at the step loop (or its blocking write still runs). A second swap
/// then overwrites `next.wasm(.sig)`; the step loop installs the *second* swap's files for the
/// first swap, and the second swap's `install_next` finds no `next.wasm.sig`, takes the
/// `--allow-unsigned` branch and deletes `current.wasm.sig`, then fails on the missing
/// `next.wasm`. The installed `current.wasm` is left without a signature.
/// Sequence (1 host, --test-hooks to hold the step loop ~2 s):
///   swap relabeled (ok) → put __waxos_test_loop__ (step loop busy for CALL_DEADLINE) →
///   swap guest with a 600 ms deadline (queued, then cancelled) → swap relabeled →
///   step loop: swap(guest) installs relabeled's files; swap(relabeled) deletes current.wasm.sig.
/// Expected: after a restart the host serves. Today: it exits 1, "it is unsigned".
#[test]
fn a_cancelled_swap_followed_by_another_leaves_a_host_that_starts() {
    let mut cluster = Cluster::start(1, &["--test-hooks"]);
    let relabeled = cluster.sign(&variant("relabeled"));
    let out = cluster.client(0, &["swap", relabeled.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    fn read(p: impl AsRef<Path>) -> Vec<u8> {
        std::fs::read(p).expect("read")
    }
    let (guest_wasm, guest_sig) = (read(&cluster.guest), read(waxos_proto::signature::signature_path(&cluster.guest)));
    let (r_wasm, r_sig) = (read(&relabeled), read(waxos_proto::signature::signature_path(&relabeled)));

    let port = cluster.hosts[0].port;
    let looper = std::thread::spawn(move || {
        common::waxos_command()
            .args(["127.0.0.1", &port.to_string(), "--timeout-ms", "8000", "put", "__waxos_test_loop__", "x"])
            .output()
    });
    std::thread::sleep(Duration::from_millis(500));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addr = cluster.addr(0);
    runtime.block_on(async {
        let mut admin = AdminClient::new(common::channel(&addr).await);
        let mut first = tonic::Request::new(SwapGuestRequest { wasm: guest_wasm, signature: guest_sig });
        first.set_timeout(Duration::from_millis(600));
        let cancelled = admin.swap_guest(first).await;
        eprintln!("first swap (cancelled): {cancelled:?}");
        let second = admin.swap_guest(SwapGuestRequest { wasm: r_wasm, signature: r_sig }).await;
        eprintln!("second swap: {second:?}");
    });
    let _ = looper.join();
    let guest_dir = cluster.hosts[0].data_dir.join("guest");
    eprintln!(
        "current.wasm: {}, current.wasm.sig: {}",
        guest_dir.join("current.wasm").exists(),
        guest_dir.join("current.wasm.sig").exists()
    );
    cluster.restart(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(cluster.alive(0), "the host no longer starts after a cancelled swap:\n{}", cluster.log_of(0));
        if cluster.client(0, &["--timeout-ms", "1000", "put", "after", "restart"]).status.code() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "never served:\n{}", cluster.log_of(0));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rule: a correct member is never made to stop; a foreign id never gets into this cluster.
/// During a rolling upgrade (rosters written before cluster ids), non-coordinator members adopt
/// the first valid id any batch names, from any claimed `src` in the roster — unauthenticated.
/// An outsider that sends one empty batch `{src: 1, cluster_id: X}` to each member makes them
/// persist X; the coordinator then names the cluster Y at its restart, a majority refuses it,
/// and the (correct) coordinator exits 78 — and stays so, as X is on disk.
/// Expected: host 0 keeps serving and all three rosters end with one id that is not X. At
/// ce36d45: hosts 1 and 2 persist X, host 0 exits 78. Closed by mTLS: the outsider here holds a
/// certificate of the cluster's CA — a plain client's, and then a member's (host 2's) speaking as
/// node 1 — and neither is the member whose id it claims, so neither batch is read.
#[test]
fn an_outsider_cannot_name_the_cluster_of_members_upgrading_from_old_rosters() {
    const X: &str = "0badc0de0badc0de0badc0de0badc0de";
    let mut cluster = Cluster::start(3, &[]);
    for i in 0..3 {
        cluster.kill(i);
        let path = cluster.hosts[i].data_dir.join("roster.json");
        let mut roster: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("roster")).expect("json");
        let fields = roster.as_object_mut().expect("object");
        fields.remove("cluster_id");
        fields.remove("incarnation");
        std::fs::write(&path, serde_json::to_string(&roster).expect("json")).expect("write old format");
    }
    // Non-coordinators upgraded first (the coordinator is restarted last).
    cluster.restart(1);
    cluster.restart(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(1..3).all(|i| cluster.log_of(i).matches("serving as one of").count() >= 2) {
        assert!(Instant::now() < deadline, "members did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for i in 1..3 {
        let addr = cluster.addr(i);
        let outsiders = [
            common::dialer_as(Some(&waxos_proto::pki::client(&common::pki_dir()))),
            common::dialer_as(Some(&common::member_cert(cluster.hosts[2].port))),
        ];
        runtime.block_on(async {
            for outsider in &outsiders {
                let channel = outsider.endpoint(&addr).expect("endpoint").connect().await.expect("connect");
                let batch = EnvelopeBatch { src: 1, envelopes: Vec::new(), cluster_id: X.to_string() };
                let refused = PeerClient::new(channel).exchange(tokio_stream::iter(vec![batch])).await;
                assert_eq!(refused.map_err(|s| s.code()).err(), Some(tonic::Code::PermissionDenied));
            }
        });
    }
    cluster.restart(0);
    std::thread::sleep(Duration::from_secs(8));
    let ids: Vec<Option<String>> = (0..3)
        .map(|i| {
            let text = std::fs::read_to_string(cluster.hosts[i].data_dir.join("roster.json")).expect("roster");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            v["cluster_id"].as_str().map(str::to_string)
        })
        .collect();
    assert!(cluster.alive(0), "the correct coordinator stopped (ids {ids:?}):\n{}", cluster.log_of(0));
    assert!(ids.iter().all(|id| id.as_deref() != Some(X)), "an outsider named the cluster: {ids:?}");
}
