//! Adversarial review of the TLS commit (23fa71b): attacks on the rules of issue 12 that the
//! tests in `tls.rs` do not try. Real processes; each test names the rule, what is expected and
//! what is feared (what the code at 23fa71b does, by reading).

mod common;

use std::time::{Duration, Instant};

use common::{stderr, Cluster};
use waxos_proto::admin_client::AdminClient;
use waxos_proto::key_value_client::KeyValueClient;
use waxos_proto::peer_client::PeerClient;
use waxos_proto::tls::Dialer;
use waxos_proto::{EnvelopeBatch, Member, PutRequest, RegisterRequest, SwapGuestRequest};

/// A channel to host `i` made by `dialer`.
async fn dial(cluster: &Cluster, i: usize, dialer: &Dialer) -> Result<tonic::transport::Channel, String> {
    let address = format!("127.0.0.1:{}", cluster.hosts[i].port);
    let endpoint = dialer.endpoint(&address).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(2));
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// Peak resident memory of `pid` so far (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") / 1024
}

/// Rules 2 and 3: registrations only from members, and nothing from the network costs the host
/// unbounded memory. `Peer.Register` is unary, and the Peer service's decoding limit is
/// `PEER_MESSAGE_BYTES_MAX` (512 MiB): tonic buffers and decodes the whole request before
/// `register` runs, and `register` logs `address` (Debug, uncut) *before* `require_member`.
/// Expected: an anonymous TLS caller's 80 MiB registration is refused (PERMISSION_DENIED) without
/// the host's peak memory growing by anything like 80 MiB, and no line of that size is logged.
/// Feared (23fa71b, peer.rs:299-308): peak RSS grows by >= 160 MiB (body + decoded String +
/// the formatted log line) and an ~80 MiB log line is written — per request, from no credential
/// at all; a few concurrent ones exhaust memory.
#[test]
fn an_anonymous_huge_registration_is_refused_unread() {
    let cluster = Cluster::start(1, &[]);
    let pid = cluster.hosts[0].child.as_ref().expect("running").id();
    let before = peak_rss_mib(pid);
    let log_before = std::fs::metadata(&cluster.hosts[0].log).map(|m| m.len()).unwrap_or(0);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answer = runtime.block_on(async {
        let channel = dial(&cluster, 0, &common::dialer_as(None)).await.expect("TLS without a certificate connects");
        let request =
            RegisterRequest { address: "a".repeat(80 << 20), replicas: 1, incarnation: 1, ..Default::default() };
        PeerClient::new(channel).max_encoding_message_size(usize::MAX).register(request).await
    });
    let refused = answer.expect_err("an anonymous registration");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    std::thread::sleep(Duration::from_millis(300));
    let after = peak_rss_mib(pid);
    let logged = std::fs::metadata(&cluster.hosts[0].log).map(|m| m.len()).unwrap_or(0) - log_before;
    assert!(logged < 1 << 20, "an anonymous caller wrote {logged} bytes of log with one request");
    assert!(after < before + 60, "the host read an anonymous registration: peak {before} -> {after} MiB");
}

/// Rules 2 and 3: only an operator swaps, and a refusal costs nothing. `swap_guest` checks the
/// operator role "before a byte of the build is looked at" (admin.rs:161), but SwapGuest is
/// unary with a 64 MiB decoding limit: tonic has read and decoded the whole build before the
/// handler runs. Expected: an anonymous 60 MiB swap is refused with PERMISSION_DENIED and the
/// host's peak memory grows by well under 60 MiB. Feared (23fa71b): it grows by >= 120 MiB (the
/// body buffer and the decoded `wasm` Vec) per concurrent anonymous request — HTTP/2 lets one
/// connection carry many, and any TLS client may connect.
#[test]
fn an_anonymous_swap_is_refused_before_the_build_is_read() {
    let cluster = Cluster::start(1, &[]);
    let pid = cluster.hosts[0].child.as_ref().expect("running").id();
    let before = peak_rss_mib(pid);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answer = runtime.block_on(async {
        let channel = dial(&cluster, 0, &common::dialer_as(None)).await.expect("connect");
        let swap = SwapGuestRequest { wasm: vec![0u8; 60 << 20], signature: Vec::new() };
        AdminClient::new(channel).max_encoding_message_size(usize::MAX).swap_guest(swap).await
    });
    let refused = answer.expect_err("an anonymous swap");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    std::thread::sleep(Duration::from_millis(300));
    let after = peak_rss_mib(pid);
    assert!(after < before + 40, "the host read an anonymous swap's build: peak {before} -> {after} MiB");
}

/// Rules 1 and 2: one member certificate proves one member. `Registry::announce` (bootstrap.rs)
/// checks that the ids of an announced roster are distinct and that the announcer is in it with
/// its certificate's address, but not that the addresses are distinct, nor that the roster has
/// `--replicas` members, nor that the coordinator ever had a roster (a coordinator at its first
/// bootstrap cannot be told from a wiped one). Here, while the coordinator of a 3-replica
/// cluster waits for its first registrations, the holder of member 127.0.0.1:P1's certificate
/// announces `{1: coordinator, 2: P1, 3: P1}`.
/// Expected: refused (an announced roster names each address once), and the coordinator keeps
/// waiting for real registrations. Feared (23fa71b): it is adopted — the coordinator saves it,
/// rejoins, and `exchange` (peer.rs, `claimed` found by id, then compared by address) accepts
/// batches from P1's certificate as node 2 *and* node 3: one certificate is 2 of 3 votes, and
/// the real third host is refused ("roster is full").
#[test]
fn an_announced_roster_cannot_give_one_certificate_two_ids() {
    let ports: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let cluster = Cluster::start_without_waiting(&ports, &[], &[0]);
    let coordinator = format!("127.0.0.1:{}", ports[0]);
    let p1 = format!("127.0.0.1:{}", ports[1]);
    let announcer = common::dialer_as(Some(&common::member_cert(ports[1])));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answer = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = async {
                let channel = announcer.endpoint(&coordinator).map_err(|e| e.to_string())?.connect().await;
                let channel = channel.map_err(|e| e.to_string())?;
                let request = RegisterRequest {
                    address: p1.clone(),
                    replicas: 3,
                    incarnation: 1,
                    member_id: 2,
                    members: vec![
                        Member { id: 1, address: coordinator.clone(), voter: true },
                        Member { id: 2, address: p1.clone(), voter: true },
                        Member { id: 3, address: p1.clone(), voter: true },
                    ],
                    cluster_id: "0123456789abcdef0123456789abcdef".into(),
                    ..Default::default()
                };
                Ok::<_, String>(PeerClient::new(channel).register(request).await)
            };
            match attempt.await {
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {} // still starting
                Ok(answer) => break answer,
                Err(e) => assert!(Instant::now() < deadline, "the coordinator never answered: {e}"),
            }
            assert!(Instant::now() < deadline, "the coordinator never settled");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let roster = std::fs::read_to_string(cluster.hosts[0].data_dir.join("roster.json")).unwrap_or_default();
    assert!(answer.is_err(), "an announced roster giving {p1} two ids was accepted: {answer:?}\nroster: {roster}");
    // And the address it names twice is not a second member at the coordinator.
    let exchanged = runtime.block_on(async {
        let channel = announcer.endpoint(&coordinator).expect("endpoint").connect().await.expect("connect");
        let batch = EnvelopeBatch { src: 3, envelopes: Vec::new(), cluster_id: String::new() };
        PeerClient::new(channel).exchange(tokio_stream::iter(vec![batch])).await
    });
    assert!(exchanged.is_err(), "P1's certificate was accepted as node 3; roster: {roster}");
}

/// Rule 3: connections that never finish a handshake never hurt the host. Each accepted
/// connection gets its own task and socket for up to HANDSHAKE_TIMEOUT (10 s), with no bound on
/// how many (net.rs `incoming_with`), and a connection that completes TLS without a certificate
/// and sends a preface is held for ever (no idle timeout). Every WAL hand-off duplicates the
/// segment's file descriptor (`Wal::take_for_sync`: `try_clone`), and a failed hand-off stops
/// the host as a disk failure (`stop_host_disk`). Here the host's RLIMIT_NOFILE is lowered to
/// its current use + 20 (`prlimit`, standing for an ordinary 1024 limit against ~100 silent
/// connections a second), 60 silent TCP connections are opened, and writes are sent on a
/// connection opened before them.
/// Expected: the host keeps running (new connections wait or are refused while the flood
/// lasts), and once the flood is gone a write succeeds. Feared (23fa71b): the first write's
/// hand-off fails with EMFILE ("cannot hand the WAL over for syncing: duplicating the WAL
/// segment handle: Too many open files") and the host exits — anyone who can reach the port
/// stops replicas at will.
/// Fixed (session 6): the WAL hands its writer an `Arc` of the segment, not a duplicated
/// descriptor, and `admission` caps connections below the descriptor limit (`admission.rs`).
#[test]
fn a_flood_of_silent_connections_does_not_stop_the_host() {
    let mut cluster = Cluster::start(1, &[]);
    let pid = cluster.hosts[0].child.as_ref().expect("running").id();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut kv = runtime.block_on(async { KeyValueClient::new(cluster.channel(0).await) });
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").count();
    let limit = open + 20;
    let prlimit = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("prlimit (util-linux) is needed by this test");
    assert!(prlimit.status.success(), "prlimit: {}", stderr(&prlimit));
    let flood: Vec<std::net::TcpStream> =
        (0..60).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", cluster.hosts[0].port)).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    runtime.block_on(async {
        for seq in 1..=5 {
            let put = PutRequest { key: format!("during-flood-{seq}"), value: b"v".to_vec(), client_id: 77, seq };
            let _ = tokio::time::timeout(Duration::from_secs(2), kv.put(put)).await;
        }
    });
    let alive_during = cluster.alive(0);
    drop(flood);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        alive_during && cluster.alive(0),
        "a flood of silent connections stopped the host (wal-failed marker: {:?}):\n{}",
        std::fs::read_to_string(cluster.hosts[0].data_dir.join("wal-failed")).ok(),
        cluster.log_of(0)
    );
    let out = cluster.client(0, &["put", "after-flood", "served"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
