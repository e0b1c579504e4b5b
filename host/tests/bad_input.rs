//! Bad input from clients and peers: refused with a clear error, logged, and the host keeps
//! serving.

mod common;

use std::io::Write;

use common::{stderr, stdout, Cluster};
use waxos_proto::peer_client::PeerClient;
use waxos_proto::{Envelope, EnvelopeBatch, PutRequest};

#[test]
fn empty_and_oversize_input_is_invalid_argument() {
    let cluster = Cluster::start(3, &[]);
    let out = cluster.client(0, &["put", "", "v"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("key must not be empty"), "{}", stderr(&out));
    let long_key = "k".repeat(1025);
    let out = cluster.client(0, &["get", &long_key]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the limit is 1024 bytes"), "{}", stderr(&out));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = cluster.grpc(0).await;
        let request = PutRequest { key: "big".into(), value: vec![7; (1 << 20) + 1], client_id: 1, seq: 1 };
        let status = client.put(request).await.expect_err("an oversize value must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("the limit is 1048576 bytes"), "{}", status.message());
        let request = PutRequest { key: "big".into(), value: vec![7; 1 << 20], client_id: 1, seq: 2 };
        client.put(request).await.expect("a value of exactly 1 MiB is fine");
    });
    let out = cluster.client(2, &["get", "big"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out).len(), 1 << 20);
}

#[test]
fn garbage_bytes_unknown_peers_and_undecodable_payloads_are_dropped() {
    let cluster = Cluster::start(3, &[]);
    // Raw garbage on the gRPC port.
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xffu8; 4096][..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04"] {
        let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{}", cluster.hosts[0].port)).expect("connect");
        let _ = stream.write_all(junk);
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sender = common::node_id(&cluster, 1);
    runtime.block_on(async {
        // A member's own connection (host 1's certificate): what it sends is checked all the same.
        let member = common::dialer_as(Some(&common::member_cert(cluster.hosts[1].port)));
        let address = format!("127.0.0.1:{}", cluster.hosts[0].port);
        let mut peer = PeerClient::new(member.endpoint(&address).expect("endpoint").connect().await.expect("connect"));
        let me = common::node_id(&cluster, 0);
        // From a node id outside the roster.
        let stranger = EnvelopeBatch {
            src: 99,
            envelopes: vec![Envelope { src: 99, dst: me, role: 1, payload: vec![1, 2, 3] }],
            cluster_id: String::new(),
        };
        // From a member, but the payload is not a Paxos message, and one role is unknown.
        let garbled = EnvelopeBatch {
            src: sender,
            envelopes: vec![
                Envelope { src: sender, dst: me, role: 1, payload: vec![1, 0xff, 0xfe, 0xfd] },
                Envelope { src: sender, dst: me, role: 7, payload: vec![] },
            ],
            cluster_id: String::new(),
        };
        let _ = peer.exchange(tokio_stream::iter(vec![stranger, garbled])).await;
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = cluster.log_of(0);
    assert!(log.contains("refused envelopes from unknown node 99"), "{log}");
    assert!(log.contains(&format!("dropped an undecodable message from node {sender}")), "{log}");
    assert!(log.contains("unknown role"), "{log}");
    for i in 0..3 {
        let out = cluster.client(i, &["put", "still", "serving"]);
        assert_eq!(out.status.code(), Some(0), "host {i}: {}", stderr(&out));
    }
}
