//! The cluster end to end: real `waxosd` processes, the real `waxos` client, real gRPC.

mod common;

use std::time::{Duration, Instant};

use common::{stderr, stdout, Cluster};
use waxos_proto::{GetRequest, PutRequest};

#[test]
fn five_hosts_answer_the_same_through_every_host() {
    let cluster = Cluster::start(5, &[]);
    for i in 0..5 {
        let out = cluster.client(i, &["put", &format!("key{i}"), &format!("value from host {i}")]);
        assert_eq!(out.status.code(), Some(0), "put via host {i}: {}", stderr(&out));
    }
    for reader in 0..5 {
        for i in 0..5 {
            let out = cluster.client(reader, &["get", &format!("key{i}")]);
            assert_eq!(out.status.code(), Some(0), "get via host {reader}: {}", stderr(&out));
            assert_eq!(stdout(&out), format!("value from host {i}"));
        }
    }
    let out = cluster.client(2, &["delete", "key0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for reader in 0..5 {
        let out = cluster.client(reader, &["get", "key0"]);
        assert_eq!(out.status.code(), Some(2), "deleted key must be not found via host {reader}");
        assert!(stderr(&out).contains("not found"));
    }
    let out = cluster.client(4, &["delete", "key0"]);
    assert_eq!(out.status.code(), Some(2), "deleting a missing key exits 2");
}

#[test]
fn two_hosts_down_the_other_three_serve() {
    let mut cluster = Cluster::start(5, &[]);
    let out = cluster.client(0, &["put", "before", "kill"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    cluster.kill(0);
    cluster.kill(1);
    for i in 2..5 {
        let out = cluster.client(i, &["--timeout-ms", "5000", "put", &format!("after{i}"), "yes"]);
        assert_eq!(out.status.code(), Some(0), "put via host {i}: {}\n{}", stderr(&out), cluster.log_of(i));
    }
    for i in 2..5 {
        for key in ["before", "after2", "after3", "after4"] {
            let out = cluster.client(i, &["get", key]);
            assert_eq!(out.status.code(), Some(0), "get {key} via host {i}: {}", stderr(&out));
        }
    }
}

#[test]
fn three_hosts_down_a_request_fails_cleanly_and_never_hangs() {
    let mut cluster = Cluster::start(5, &[]);
    cluster.kill(0);
    cluster.kill(1);
    cluster.kill(2);
    let started = Instant::now();
    let out = cluster.client(3, &["--timeout-ms", "1500", "put", "doomed", "write"]);
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no quorum") || err.contains("unresponsive"), "unclear message: {err}");
    assert!(err.contains("failed"), "{err}");
    // Five members, each tried at most once for at most the timeout.
    assert!(elapsed < Duration::from_millis(5 * 1500 + 3000), "took {elapsed:?}");
}

#[test]
fn hundred_concurrent_clients_then_every_value_from_every_host() {
    let cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..100u64 {
            let mut client = cluster.grpc((c % 5) as usize).await;
            tasks.push(tokio::spawn(async move {
                for w in 0..20u64 {
                    let request = PutRequest {
                        key: format!("c{c}-w{w}"),
                        value: format!("{c}:{w}").into_bytes(),
                        client_id: 1000 + c,
                        seq: w + 1,
                    };
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        match client.put(request.clone()).await {
                            Ok(_) => break,
                            Err(e) if attempts < 5 => eprintln!("retrying c{c}-w{w}: {e}"),
                            Err(e) => panic!("c{c}-w{w} failed: {e}"),
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
        for host in 0..5 {
            let mut readers = Vec::new();
            for c in 0..100u64 {
                let mut client = cluster.grpc(host).await;
                readers.push(tokio::spawn(async move {
                    for w in 0..20u64 {
                        let key = format!("c{c}-w{w}");
                        let r = client
                            .get(GetRequest { key: key.clone(), client_id: 0, seq: 0, stale: false })
                            .await
                            .unwrap_or_else(|e| panic!("get {key} on host {host}: {e}"))
                            .into_inner();
                        assert!(r.found, "{key} missing on host {host}");
                        assert_eq!(r.value, format!("{c}:{w}").into_bytes(), "{key} on host {host}");
                    }
                }));
            }
            for r in readers {
                r.await.expect("reader task");
            }
        }
    });
}

#[test]
fn a_trapping_or_looping_guest_does_not_take_the_host_down() {
    let mut cluster = Cluster::start(3, &["--test-hooks"]);
    let out = cluster.client(1, &["put", "kept", "across the crash"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Only host 1 traps: the trap happens where the request arrives, not in the replicated log.
    let out = cluster.client(1, &["--timeout-ms", "3000", "put", "__waxos_test_trap__", "x"]);
    assert_eq!(out.status.code(), Some(1), "the trapping request fails: {}", stderr(&out));
    assert!(cluster.alive(1), "host must survive a guest trap");
    let out = cluster.client(1, &["--timeout-ms", "8000", "put", "__waxos_test_loop__", "x"]);
    assert_eq!(out.status.code(), Some(1), "the looping request fails: {}", stderr(&out));
    assert!(cluster.alive(1), "host must survive a looping guest");
    // The host serves again, from its restarted guest, with the earlier write intact.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = cluster.client(1, &["--timeout-ms", "1000", "get", "kept"]);
        if out.status.code() == Some(0) {
            assert_eq!(stdout(&out), "across the crash");
            break;
        }
        assert!(Instant::now() < deadline, "host 1 never served again: {}", cluster.log_of(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = cluster.log_of(1);
    assert!(log.contains("guest crashed in step"), "{log}");
    assert!(log.contains("guest restarted from"), "{log}");
}

/// `--stale` reads are served by the contacted member from its own state, even when it is cut off
/// from a majority; a linearizable read there fails cleanly instead of answering from old state.
#[test]
fn stale_reads_answer_without_a_quorum_linearizable_reads_do_not() {
    let mut cluster = Cluster::start(5, &[]);
    let out = cluster.client(0, &["put", "k", "v1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.client(4, &["--stale", "get", "k"]);
        if out.status.code() == Some(0) && stdout(&out) == "v1" {
            break;
        }
        assert!(Instant::now() < deadline, "host 4 never applied the write: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        cluster.kill(i);
    }
    let out = cluster.client(4, &["--stale", "--timeout-ms", "1000", "get", "k"]);
    assert_eq!(out.status.code(), Some(0), "stale read without a quorum: {}", stderr(&out));
    assert_eq!(stdout(&out), "v1");
    let out = cluster.client(4, &["--timeout-ms", "1000", "get", "k"]);
    assert_eq!(out.status.code(), Some(1), "a linearizable read needs a quorum: {}", stdout(&out));
}
