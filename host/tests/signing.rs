//! Signed guest builds, with real processes: a host starts only a build signed by a key it
//! trusts, and swaps in (by `Admin.SwapGuest` or `--watch`) only such builds; anything else is
//! refused with a clear reason (`PERMISSION_DENIED` for a swap) while the old guest keeps
//! serving. Keys and signatures are made by the real `waxos keygen` and `waxos sign`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{keygen, signed_copy, stderr, stdout, Cluster};
use waxos_proto::admin_client::AdminClient;
use waxos_proto::signature::signature_path;
use waxos_proto::SwapGuestRequest;

fn variant(name: &str) -> PathBuf {
    common::guest_variant(name)
}

/// Flips one byte in the middle of the file (after it was signed).
fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, bytes).expect("write");
}

/// A one-replica host of its own with `args`, logging to `<dir>/host.log`.
fn start_alone(dir: &Path, guest: &Path, args: &[&str]) -> (Child, PathBuf, u16) {
    let port = common::free_port();
    let log_path = dir.join("host.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(common::waxosd_path())
        .args([&port.to_string(), &port.to_string(), "--replicas", "1", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--guest")
        .arg(guest)
        .args(common::member_tls_args(port))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn waxosd");
    (child, log_path, port)
}

/// The exit code of a host that must stop by itself within 30 s.
fn exit_code(child: &mut Child, log: &Path) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the host did not stop:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the `waxos` client against a port.
fn client(port: u16, args: &[&str]) -> std::process::Output {
    common::waxos_command().arg("127.0.0.1").arg(port.to_string()).args(args).output().expect("run waxos")
}

fn wait_serving(port: u16, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client(port, &["--timeout-ms", "1000", "put", "__ready__", "yes"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "never served:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Host `i`'s (version, build hash), from `status`.
fn build_of(cluster: &Cluster, i: usize) -> (String, String) {
    let me = cluster.own_status_row(i).expect("host in status");
    (me["guest"]["version"].as_str().unwrap_or("down").to_string(), me["build"].as_str().unwrap_or("").to_string())
}

#[test]
fn start_refuses_unsigned_tampered_and_unknown_key_builds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, trusted) = keygen(&dir.path().join("keys"), "trusted");
    let (stranger, _) = keygen(&dir.path().join("keys"), "stranger");
    let trusted_arg = trusted.to_str().expect("utf-8");
    let guest = common::guest_path();

    let unsigned = dir.path().join("unsigned");
    std::fs::create_dir_all(&unsigned).expect("mkdir");
    std::fs::copy(&guest, unsigned.join("waxos_guest.wasm")).expect("copy");
    let tampered = signed_copy(&guest, &dir.path().join("tampered"), &key);
    flip_a_byte(&tampered);
    let unknown = signed_copy(&guest, &dir.path().join("unknown"), &stranger);
    let good = signed_copy(&guest, &dir.path().join("good"), &key);

    let cases: [(&str, PathBuf, Vec<&str>, &str); 4] = [
        ("unsigned", unsigned.join("waxos_guest.wasm"), vec!["--trusted-keys", trusted_arg], "it is unsigned"),
        ("tampered", tampered, vec!["--trusted-keys", trusted_arg], "does not match its bytes"),
        ("unknown key", unknown, vec!["--trusted-keys", trusted_arg], "not among the trusted keys"),
        ("no policy", good.clone(), vec![], "no trusted keys for guest builds: pass --trusted-keys FILE"),
    ];
    for (name, build, args, reason) in cases {
        let host_dir = dir.path().join(format!("host-{}", name.replace(' ', "-")));
        std::fs::create_dir_all(&host_dir).expect("mkdir");
        let (mut child, log, _) = start_alone(&host_dir, &build, &args);
        let code = exit_code(&mut child, &log);
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(code, Some(1), "{name}: a refused build stops the start with exit 1:\n{log}");
        assert!(log.contains("waxosd stopped") && log.contains(reason), "{name}: expected {reason:?} in:\n{log}");
        assert!(!log.contains("listening on"), "{name}: refused before serving anything:\n{log}");
    }

    // The good one starts, and says what its check cost.
    let host_dir = dir.path().join("host-good");
    std::fs::create_dir_all(&host_dir).expect("mkdir");
    let (mut child, log, port) = start_alone(&host_dir, &good, &["--trusted-keys", trusted_arg]);
    wait_serving(port, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text.lines().find(|l| l.contains("signature of") && l.contains("verified in")).expect("verified line");
    eprintln!("start-up check: {line}");

    // A build installed by a swap is checked again at every start: tampered on disk, refused.
    let relabeled = signed_copy(&variant("relabeled"), &dir.path().join("relabeled"), &key);
    let out = client(port, &["swap", relabeled.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let _ = child.kill();
    let _ = child.wait();
    let installed = host_dir.join("data/guest/current.wasm");
    assert!(host_dir.join("data/guest/current.wasm.sig").exists(), "the signature is installed with the build");
    flip_a_byte(&installed);
    let (mut child, log, _) = start_alone(&host_dir, &good, &["--trusted-keys", trusted_arg]);
    let code = exit_code(&mut child, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("installed by an earlier hot swap") && text.contains("does not match"), "{text}");
}

#[test]
fn allow_unsigned_starts_an_unsigned_build_with_a_loud_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, log, port) = start_alone(dir.path(), &common::guest_path(), &["--allow-unsigned"]);
    wait_serving(port, &log);
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("WARN") && text.contains("--allow-unsigned: guest builds are NOT verified"), "{text}");
    assert!(text.contains("runs UNVERIFIED"), "{text}");
}

#[test]
fn swaps_of_unsigned_tampered_or_unknown_key_builds_are_denied_and_the_old_guest_serves() {
    let cluster = Cluster::start(3, &[]);
    let before = build_of(&cluster, 1);
    let keys = cluster.dir.path().join("other-keys");
    let (stranger, _) = keygen(&keys, "stranger");
    let good = cluster.sign(&variant("relabeled"));
    let wasm = std::fs::read(&good).expect("read");
    let signature = std::fs::read(signature_path(&good)).expect("signature");
    let mut tampered = wasm.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    let stranger_signed = signed_copy(&good, &keys.join("stranger"), &stranger);
    let stranger_signature = std::fs::read(signature_path(&stranger_signed)).expect("signature");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cases = [
        ("unsigned", wasm.clone(), Vec::new(), "it is unsigned"),
        ("tampered", tampered, signature.clone(), "does not match its bytes"),
        ("unknown key", wasm.clone(), stranger_signature, "not among the trusted keys"),
        ("garbage signature", wasm.clone(), b"not a signature".to_vec(), "cannot be read"),
    ];
    for (name, wasm, signature, reason) in cases {
        let status = runtime
            .block_on(async {
                let mut admin = AdminClient::new(cluster.channel(1).await);
                admin.swap_guest(SwapGuestRequest { wasm, signature }).await
            })
            .expect_err(name);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{name}: {status:?}");
        assert!(status.message().contains(reason), "{name}: {:?}", status.message());
        assert!(status.message().contains("the old guest keeps running"), "{name}: {:?}", status.message());
        assert_eq!(build_of(&cluster, 1), before, "{name}: the old build still runs");
        let out = cluster.client(1, &["put", &format!("after-{name}"), "served"]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let out = cluster.client(1, &["get", &format!("after-{name}")]);
        assert_eq!(stdout(&out), "served", "{name}");
    }
    let log = cluster.log_of(1);
    assert!(log.contains("error=PERMISSION_DENIED") && log.contains("refused: it is unsigned"), "{log}");
    assert!(!cluster.hosts[1].data_dir.join("guest/current.wasm").exists(), "nothing refused was installed");

    // Through the CLI: without a .sig next to the build, the client says so and the host denies.
    let bare = cluster.dir.path().join("bare.wasm");
    std::fs::copy(variant("relabeled"), &bare).expect("copy");
    let out = cluster.client(1, &["swap", bare.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("sending the build unsigned"), "{}", stderr(&out));
    assert!(stderr(&out).contains("permission denied") && stderr(&out).contains("it is unsigned"), "{}", stderr(&out));

    // A correctly signed swap works, and its check is logged with its time.
    let out = cluster.client(1, &["swap", good.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (version, build) = build_of(&cluster, 1);
    assert_eq!(version, "0.1.0+swap-test");
    assert_ne!(build, before.1);
    let log = cluster.log_of(1);
    let line = log
        .lines()
        .find(|l| l.contains(&format!("signature of {build} by key")) && l.contains("verified in"))
        .expect("the verified swap is logged");
    eprintln!("swap check: {line}");
    let out = cluster.client(1, &["put", "after-good-swap", "yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn watch_swaps_in_only_signed_builds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, trusted) = keygen(&dir.path().join("keys"), "trusted");
    let watched = signed_copy(&common::guest_path(), &dir.path().join("build"), &key);
    let trusted_arg = trusted.to_str().expect("utf-8").to_string();
    let (mut child, log, port) = start_alone(dir.path(), &watched, &["--watch", "--trusted-keys", &trusted_arg]);
    wait_serving(port, &log);
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Changed after signing: refused, the old guest keeps serving.
    flip_a_byte(&watched);
    wait_for("watch: swap refused, the old guest keeps running: the build is not trusted");
    assert_eq!(client(port, &["put", "during-watch", "ok"]).status.code(), Some(0));
    // A new build, then its signature: swapped in once both are there.
    std::fs::copy(variant("relabeled"), &watched).expect("copy");
    let out = common::waxos_command().arg("sign").arg("--key").arg(&key).arg(&watched).output().expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("watch: now running 0.1.0+swap-test");
    let _ = child.kill();
    let _ = child.wait();
}

/// A crash between installing the swapped build's signature and the build itself: the restart
/// finishes the install instead of refusing the old build with the new signature.
#[cfg(feature = "crash-points")]
#[test]
fn a_crash_between_installing_signature_and_build_restarts_with_the_new_build() {
    let mut cluster = Cluster::start(3, &[]);
    let relabeled = cluster.sign(&variant("relabeled"));
    cluster.hosts[1].env = vec![("WAXOS_CRASH_AT".into(), "swap.after_signature_install".into())];
    cluster.restart(1);
    cluster.wait_ready(1);
    let out = cluster.client(1, &["swap", relabeled.to_str().expect("utf-8")]);
    // The client gets no answer from the host it killed mid-swap; it may fail over.
    let _ = out;
    assert_eq!(cluster.wait_exit(1, Duration::from_secs(20)), Some(waxos_host::crash_point::EXIT_CODE));
    // First swap of this host: nothing was installed before, so the old build ran from --guest;
    // do it again now that current.wasm exists, to crash with an old current.wasm in place.
    cluster.hosts[1].env.clear();
    cluster.restart(1);
    cluster.wait_ready(1);
    let out = cluster.client(1, &["swap", cluster.sign(&common::guest_path()).to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(build_of(&cluster, 1).0, "0.1.0");
    cluster.hosts[1].env = vec![("WAXOS_CRASH_AT".into(), "swap.after_signature_install".into())];
    cluster.restart(1);
    cluster.wait_ready(1);
    let _ = cluster.client(1, &["swap", relabeled.to_str().expect("utf-8")]);
    assert_eq!(cluster.wait_exit(1, Duration::from_secs(20)), Some(waxos_host::crash_point::EXIT_CODE));
    cluster.hosts[1].env.clear();
    cluster.restart(1);
    cluster.wait_ready(1);
    assert_eq!(build_of(&cluster, 1).0, "0.1.0+swap-test", "the interrupted install was finished");
    assert!(cluster.log_of(1).contains("finishing it"), "{}", cluster.log_of(1));
}
