//! Connection admission (`host/src/admission.rs`), with real processes: a flood of clients is
//! capped, refused with a log line, does not lock members out, and leaves when it is gone.

mod common;

use std::time::{Duration, Instant};

use common::{stderr, Cluster};

/// Rule: a flood of client connections beyond `--max-connections` is refused, while members
/// still get in (their own slots): a member restarted during the flood reconnects to the
/// flooded host, and the cluster keeps taking writes; after the flood, clients are served.
#[test]
fn a_client_flood_is_capped_and_does_not_lock_members_out() {
    let mut cluster = Cluster::start(3, &["--max-connections", "6"]);
    let flooded = cluster.addr(0);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // 30 anonymous TLS clients, each on its own connection, each kept open.
    let flood: Vec<tonic::transport::Channel> = runtime.block_on(async {
        let dialer = common::dialer_as(None);
        let mut held = Vec::new();
        for _ in 0..30 {
            let endpoint = dialer.endpoint(&flooded).expect("endpoint").connect_timeout(Duration::from_secs(2));
            if let Ok(channel) = endpoint.connect().await {
                held.push(channel);
            }
        }
        held
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.log_of(0).contains("the most this host holds (--max-connections)") {
        assert!(Instant::now() < deadline, "no connection was refused:\n{}", cluster.log_of(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    // A member restarted now must get back into the flooded host.
    let log_before = cluster.log_of(2).len();
    cluster.restart(2);
    cluster.wait_ready(2);
    let reconnected = format!("at {flooded}: connected");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.log_of(2)[log_before.min(cluster.log_of(2).len())..].contains(&reconnected) {
        assert!(
            Instant::now() < deadline,
            "the restarted member never reconnected to the flooded host:\n{}",
            cluster.log_of(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cluster.client(2, &["put", "during-flood", "v"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(cluster.alive(0), "the flooded host stopped:\n{}", cluster.log_of(0));
    drop(flood);
    // Once the flood is gone, its slots are back: a client of the flooded host is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.client(0, &["get", "during-flood"]);
        if out.status.code() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "clients are still refused after the flood: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
}
