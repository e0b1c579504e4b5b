//! Who may call what (issue 12): TLS on every service, members proven by their certificates,
//! operators alone swap the core. Real processes, real handshakes; each test names the rule.

mod common;

use std::time::Duration;

use common::{stderr, stdout, Cluster};
use waxos_proto::admin_client::AdminClient;
use waxos_proto::key_value_client::KeyValueClient;
use waxos_proto::peer_client::PeerClient;
use waxos_proto::tls::{Dialer, TlsMaterial};
use waxos_proto::{EnvelopeBatch, GetRequest, PutRequest, RegisterRequest, StatusRequest, SwapGuestRequest};

/// A channel to host `i` made by `dialer`, or the connection error.
async fn dial(cluster: &Cluster, i: usize, dialer: &Dialer) -> Result<tonic::transport::Channel, String> {
    let address = format!("127.0.0.1:{}", cluster.hosts[i].port);
    let endpoint = dialer.endpoint(&address).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(2));
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

fn plain_client() -> waxos_proto::pki::Holder {
    waxos_proto::pki::client(&common::pki_dir())
}

fn an_empty_batch(src: u32) -> EnvelopeBatch {
    EnvelopeBatch { src, envelopes: Vec::new(), cluster_id: String::new() }
}

/// Rule: every service refuses a caller without the credential it needs, with PERMISSION_DENIED
/// naming what is missing, and logs who tried: Peer needs a member certificate, Status any
/// certificate, SwapGuest the operator role (a member's or a plain client's certificate is not
/// enough), KeyValue a certificate with `--client-cert-auth`.
#[test]
fn each_service_refuses_callers_without_the_credential_it_needs() {
    let cluster = Cluster::start(3, &["--client-cert-auth"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let anonymous = common::dialer_as(None);
    let client = common::dialer_as(Some(&plain_client()));
    let member = common::dialer_as(Some(&common::member_cert(cluster.hosts[1].port)));
    let build = std::fs::read(&cluster.guest).expect("guest");
    let signature = std::fs::read(waxos_proto::signature::signature_path(&cluster.guest)).expect("signature");
    runtime.block_on(async {
        let channel = dial(&cluster, 0, &anonymous).await.expect("TLS without a client certificate connects");
        let put = PutRequest { key: "k".into(), value: b"v".to_vec(), client_id: 5, seq: 1 };
        let refused = KeyValueClient::new(channel.clone()).put(put.clone()).await.expect_err("anonymous put");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("needs a client certificate"), "{refused:?}");
        let get = GetRequest { key: "k".into(), client_id: 0, seq: 0, stale: false };
        let refused = KeyValueClient::new(channel.clone()).get(get).await.expect_err("anonymous get");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        let refused = AdminClient::new(channel.clone()).status(StatusRequest {}).await.expect_err("anonymous status");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        let refused = PeerClient::new(channel.clone())
            .exchange(tokio_stream::iter(vec![an_empty_batch(2)]))
            .await
            .expect_err("anonymous peer stream");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("member certificate"), "{refused:?}");

        // A plain client's certificate: reads, writes and status, but no swap, no peer stream.
        let channel = dial(&cluster, 0, &client).await.expect("connect");
        KeyValueClient::new(channel.clone()).put(put).await.expect("a certified client writes");
        AdminClient::new(channel.clone()).status(StatusRequest {}).await.expect("a certified client asks for status");
        for (who, dialer) in [("client", &client), ("member", &member)] {
            let channel = dial(&cluster, 0, dialer).await.expect("connect");
            let swap = SwapGuestRequest { wasm: build.clone(), signature: signature.clone() };
            let refused = AdminClient::new(channel).swap_guest(swap).await.expect_err("a swap by a non-operator");
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{who}: {refused:?}");
            assert!(refused.message().contains("operator"), "{who}: {refused:?}");
        }
        let refused = PeerClient::new(channel)
            .exchange(tokio_stream::iter(vec![an_empty_batch(2)]))
            .await
            .expect_err("a client's peer stream");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    });
    std::thread::sleep(Duration::from_millis(300));
    let log = cluster.log_of(0);
    assert!(log.contains("refused op=swap caller=\"member 127.0.0.1:"), "the member's attempt is logged:\n{log}");
    assert!(log.contains("refused op=swap caller=\"client (CN client)\""), "the client's attempt is logged:\n{log}");
    assert!(log.contains("refused op=put caller=\"anonymous"), "{log}");
    // The operator swaps (the same signed build).
    let out = cluster.client(0, &["swap", cluster.guest.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "the operator swaps: {}", stderr(&out));
    assert!(cluster.log_of(0).contains("request received op=swap"), "logged with its caller");
    assert!(cluster.log_of(0).contains("caller=\"operator (CN operator)\""), "logged with its caller");
}

/// Rule: a host accepts a peer batch only from the member its connection's certificate names.
/// A member that claims another member's id — the way a forged `Chosen` made one replica
/// silently diverge before peers were authenticated — has its whole stream refused, and the
/// cluster keeps serving what it acknowledged.
#[test]
fn a_member_certificate_claiming_another_nodes_id_is_refused() {
    let cluster = Cluster::start(3, &[]);
    let out = cluster.client(0, &["put", "acknowledged", "yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (id0, id1) = (common::node_id(&cluster, 0), common::node_id(&cluster, 1));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // Host 1's certificate, speaking to host 2 as host 0.
    let impostor = common::dialer_as(Some(&common::member_cert(cluster.hosts[1].port)));
    runtime.block_on(async {
        let channel = dial(&cluster, 2, &impostor).await.expect("connect");
        let refused = PeerClient::new(channel.clone())
            .exchange(tokio_stream::iter(vec![an_empty_batch(id0)]))
            .await
            .expect_err("a batch claiming another member's id");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(&format!("node {id0}")), "{refused:?}");
        // Its own id is fine (an empty batch: nothing reaches the guest).
        PeerClient::new(channel).exchange(tokio_stream::iter(vec![an_empty_batch(id1)])).await.expect("its own id");
    });
    std::thread::sleep(Duration::from_millis(300));
    let log = cluster.log_of(2);
    assert!(log.contains(&format!("it claims to be node {id0}")), "the impersonation is logged:\n{log}");
    for i in 0..3 {
        let out = cluster.client(i, &["get", "acknowledged"]);
        assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "yes"), "host {i}: {}", stderr(&out));
    }
}

/// Rule: a certificate from another CA never gets past the handshake, whoever it claims to be;
/// and a client that does not trust the cluster's CA refuses the host.
#[test]
fn a_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::start(1, &[]);
    let other = tempfile::tempdir().expect("tempdir");
    let port = cluster.hosts[0].port;
    // A member certificate for this very address, and an operator's, from a CA of our own.
    let forged_member = waxos_proto::pki::ensure_member(other.path(), &format!("127.0.0.1:{port}")).expect("pki");
    let forged_operator = waxos_proto::pki::operator(other.path());
    let ca = std::fs::read(waxos_proto::pki::ca_cert(&common::pki_dir())).expect("ca");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        for holder in [&forged_member, &forged_operator] {
            let identity = Some((std::fs::read(&holder.cert).expect("cert"), std::fs::read(&holder.key).expect("key")));
            let dialer = Dialer::Tls(Box::new(TlsMaterial { ca_pem: ca.clone(), identity }));
            let result = async {
                let channel = dial(&cluster, 0, &dialer).await?;
                AdminClient::new(channel).status(StatusRequest {}).await.map_err(|e| format!("{e:?}"))
            }
            .await;
            assert!(result.is_err(), "a certificate of another CA was accepted: {result:?}");
        }
    });
    // The client trusting only the other CA refuses the host (the server is verified).
    let other_ca = waxos_proto::pki::ca_cert(other.path());
    let out = common::waxos_command()
        .arg("--cacert")
        .arg(&other_ca)
        .args(["127.0.0.1", &port.to_string(), "--timeout-ms", "1000", "put", "k", "v"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // And plaintext to a TLS host fails cleanly too.
    let out = common::waxos_command()
        .args(["--insecure", "127.0.0.1", &port.to_string(), "--timeout-ms", "1000", "put", "k", "v"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(300));
    let log = cluster.log_of(0);
    assert!(log.contains("handshake failed"), "refused handshakes are logged:\n{log}");
    let out = cluster.client(0, &["put", "still", "serving"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Rule: garbage on a TLS port — junk bytes, a client hello cut short, a handshake followed by
/// junk instead of HTTP/2 — costs the host nothing: each is logged and closed, and it serves.
#[test]
fn garbage_on_a_tls_port_does_not_hurt_the_host() {
    use std::io::Write;
    let cluster = Cluster::start(1, &[]);
    let port = cluster.hosts[0].port;
    // The first bytes of a TLS 1.2/1.3 ClientHello record, then nothing.
    let half_hello = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    for junk in
        [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xffu8; 4096][..], &half_hello[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
    {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = stream.write_all(junk);
    }
    // A real handshake, then junk where the HTTP/2 preface belongs.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        use tokio::io::AsyncWriteExt;
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(waxos_proto::pki::ca_cert(&common::pki_dir())).expect("ca");
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
            roots.add(cert.expect("a CA certificate")).expect("add");
        }
        let config =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("the handshake itself is fine");
        let _ = tls.write_all(&[0xab; 2048]).await;
        let _ = tls.flush().await;
    });
    std::thread::sleep(Duration::from_millis(300));
    for attempt in 0..3 {
        let out = cluster.client(0, &["put", &format!("after-garbage-{attempt}"), "served"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let log = cluster.log_of(0);
    assert!(log.contains("handshake failed"), "{log}");
}

/// Rule: only members register. During bootstrap an outsider — no certificate, a client's, or a
/// member's certificate registering another address — is refused and takes no roster slot.
#[test]
fn registration_by_an_outsider_is_refused() {
    let ports: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    // Hosts 1 and 2 are not started yet: the coordinator waits for them.
    let mut cluster = Cluster::start_without_waiting(&ports, &[], &[0]);
    let coordinator = format!("127.0.0.1:{}", ports[0]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let member_of_port_1 = common::member_cert(ports[1]);
    let attempts: Vec<(&str, Dialer, String)> = vec![
        ("anonymous", common::dialer_as(None), format!("127.0.0.1:{}", ports[1])),
        ("client", common::dialer_as(Some(&plain_client())), format!("127.0.0.1:{}", ports[1])),
        ("another address", common::dialer_as(Some(&member_of_port_1)), format!("127.0.0.1:{}", ports[2])),
    ];
    runtime.block_on(async {
        for (who, dialer, address) in attempts {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let refused = loop {
                let attempt = async {
                    let endpoint = dialer.endpoint(&coordinator).map_err(|e| e.to_string())?;
                    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                    let request =
                        RegisterRequest { address: address.clone(), replicas: 3, incarnation: 1, ..Default::default() };
                    Ok::<_, String>(PeerClient::new(channel).register(request).await)
                };
                match attempt.await {
                    Ok(answer) => break answer.expect_err(who),
                    Err(e) => {
                        assert!(std::time::Instant::now() < deadline, "{who}: the coordinator never answered: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{who}: {refused:?}");
        }
    });
    // The real members complete the roster, and the outsiders have no slot in it.
    cluster.spawn_host(1);
    cluster.spawn_host(2);
    cluster.wait_ready(0);
    let roster = std::fs::read_to_string(cluster.hosts[0].data_dir.join("roster.json")).expect("roster");
    let roster: serde_json::Value = serde_json::from_str(&roster).expect("json");
    let addresses: Vec<&str> = roster["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m[1].as_str().or(m["address"].as_str()))
        .collect();
    assert_eq!(addresses.len(), 3, "{roster}");
    for port in &ports {
        assert!(addresses.contains(&format!("127.0.0.1:{port}").as_str()), "{roster}");
    }
    let log = cluster.log_of(0);
    assert!(log.contains("refused op=registration"), "{log}");
}

/// Sends learner envelopes holding a forged `Chosen` — slots `from..from + 20`, each putting
/// `key = "forged"` — to host `victim` as node `src`, over `dialer`; the stream's answer.
async fn forge_chosen(
    cluster: &Cluster,
    victim: usize,
    dialer: &Dialer,
    src: u32,
    from: u64,
    key: &str,
) -> Result<(), tonic::Status> {
    use waxos_guest::message::{encode, ClientCommand, Message, Value};
    use waxos_guest::types::Command;
    let dst = common::node_id(cluster, victim);
    let entries = (from..from + 20)
        .map(|slot| {
            let command = Command::Put(key.to_string(), b"forged".to_vec());
            (slot, Value::Batch(vec![ClientCommand { origin: src, request_id: 0, client: 0, seq: 0, command }]))
        })
        .collect();
    let payload = encode(&Message::Chosen { entries });
    let batch = EnvelopeBatch {
        src,
        envelopes: vec![waxos_proto::Envelope { src, dst, role: 2, payload }],
        cluster_id: String::new(),
    };
    let channel = dial(cluster, victim, dialer).await.map_err(tonic::Status::unavailable)?;
    PeerClient::new(channel).exchange(tokio_stream::iter(vec![batch])).await.map(|_| ())
}

/// Rule: no replica applies a value the cluster did not choose. Before peers were authenticated
/// an outsider claiming the leader's id sent one `Chosen` for the next slots to a follower, which
/// applied it: a linearizable GET there returned the forged value (or "not found") for an
/// acknowledged write, in silence. Now neither a plain client nor another member (host 2's
/// certificate speaking as the leader) gets a batch read, and every replica reads the
/// acknowledged value.
#[test]
fn a_forged_chosen_from_an_outsider_never_reaches_a_replica() {
    let cluster = Cluster::start(3, &[]);
    let leader = common::leader_index(&cluster, 0).expect("a leader");
    let victim = (leader + 1) % 3;
    let impostor_host = (leader + 2) % 3;
    let leader_id = common::node_id(&cluster, leader);
    let applied = cluster.guest_status(victim).and_then(|g| g["applied"].as_u64()).expect("applied slot");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let outsiders = [
        ("client", common::dialer_as(Some(&plain_client()))),
        ("another member", common::dialer_as(Some(&common::member_cert(cluster.hosts[impostor_host].port)))),
    ];
    for (who, dialer) in &outsiders {
        let answer = runtime.block_on(forge_chosen(&cluster, victim, dialer, leader_id, applied, "target"));
        let refused = answer.expect_err(who);
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{who}: {refused:?}");
    }
    for n in 0..5 {
        let out = cluster.client(leader, &["put", "target", &format!("real-{n}")]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    for i in 0..3 {
        let out = cluster.client(i, &["get", "target"]);
        assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "real-4"), "host {i}: {}", stderr(&out));
    }
}

/// Rule: sizes are bounded before anything is read, and a non-member's batch is never read at
/// all: a 200 MiB batch from a plain client is refused at once, and the host's memory does not
/// grow by anything like it (before: 112 → 515 MB).
#[test]
fn a_non_members_huge_peer_batch_is_refused_unread() {
    let cluster = Cluster::start(1, &[]);
    let pid = cluster.hosts[0].child.as_ref().expect("running").id();
    let before = common::rss_mib(pid).expect("rss");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dialer = common::dialer_as(Some(&plain_client()));
    let answer = runtime.block_on(async {
        let channel = dial(&cluster, 0, &dialer).await.expect("connect");
        let batch = EnvelopeBatch {
            src: 1,
            envelopes: vec![waxos_proto::Envelope { src: 1, dst: 1, role: 1, payload: vec![7; 200 << 20] }],
            cluster_id: String::new(),
        };
        PeerClient::new(channel).max_encoding_message_size(usize::MAX).exchange(tokio_stream::iter(vec![batch])).await
    });
    let refused = answer.expect_err("a non-member's batch");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let after = common::rss_mib(pid).expect("rss");
    assert!(after < before + 100, "the host read the batch: {before} -> {after} MiB");
    let out = cluster.client(0, &["put", "after", "huge"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
