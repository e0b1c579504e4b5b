//! Hostile input from anyone who can reach a port (issue 12, found by an outside probe), with
//! real processes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, guest_path, waxosd_path};
use waxos_proto::peer_client::PeerClient;
use waxos_proto::RegisterRequest;

/// A registration whose address carries a newline and a forged log line must not forge a
/// line: everything from the network is written escaped, one event per line.
#[test]
fn a_newline_in_a_registration_address_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = dir.path().join("coordinator.log");
    let (key, trusted_keys) = common::keygen(dir.path(), "test");
    let guest = common::signed_copy(&guest_path(), &dir.path().join("guest"), &key);
    let mut coordinator = Command::new(waxosd_path())
        .args([port.to_string(), port.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--guest")
        .arg(guest)
        .arg("--trusted-keys")
        .arg(trusted_keys)
        .args(common::member_tls_args(port))
        .args(["--replicas", "3"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn waxosd");
    let forged = "2026-11-25 09:12:03.481  INFO node 2 serving as one of 3 replicas (forged)";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answered = runtime.block_on(async {
        loop {
            // Only members get as far as the registration handler (others are refused before
            // their message is read): a member's certificate registering another address, which
            // is logged, escaped, then refused.
            let attempt = async {
                let dialer = common::dialer_as(Some(&common::member_cert(free_port())));
                let endpoint = dialer.endpoint(&format!("127.0.0.1:{port}")).map_err(|e| e.to_string())?;
                let mut peer = PeerClient::new(endpoint.connect().await.map_err(|e| e.to_string())?);
                Ok::<_, String>(
                    peer.register(RegisterRequest {
                        address: format!("10.0.0.9:1\n{forged}\r\n"),
                        replicas: 3,
                        incarnation: 1,
                        ..Default::default()
                    })
                    .await,
                )
            };
            match attempt.await {
                Ok(answer) => {
                    let refused = answer.expect_err("an outsider's registration");
                    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
                    return true;
                }
                Err(e) if Instant::now() > deadline => panic!("the coordinator never answered: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    assert!(answered);
    std::thread::sleep(Duration::from_millis(300)); // the log writer's batch
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("10.0.0.9:1"), "the registration was logged:\n{text}");
    for line in text.lines() {
        assert!(!line.starts_with("2026-11-25 09:12:03.481"), "a forged log line:\n{text}");
        assert!(!line.contains('\r'), "a raw carriage return:\n{text}");
    }
    assert!(text.contains("\\n2026-11-25 09:12:03.481"), "the newline is written escaped:\n{text}");
}
