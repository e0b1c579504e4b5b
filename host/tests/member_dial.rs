//! A host trusts a peer's server only when its certificate names the member dialled
//! (`host/src/member_dial.rs`). Real processes: a member's certificate, served at another
//! member's address, must not receive that member's Paxos traffic.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS server with `holder`'s certificate on `port`; counts the handshakes that complete.
async fn serve_as(
    holder: &waxos_proto::pki::Holder,
    port: u16,
    handshakes: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&holder.cert)
        .expect("certificate file")
        .collect::<Result<_, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(&holder.key).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot take over port {port}: {e}"),
            }
        }
    };
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            attempts.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let handshakes = Arc::clone(&handshakes);
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    // TLS 1.3: the server finishes before the client has judged it; a client that
                    // refused the certificate closes at once instead of sending its preface.
                    let mut preface = [0u8; 24];
                    if tokio::io::AsyncReadExt::read_exact(&mut tls, &mut preface).await.is_ok() {
                        handshakes.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
}

/// Rule: peers are mutually authenticated — the dialler checks the server's member identity, not
/// only that the CA signed it. Member 1's certificate (valid, same CA, same host name) served at
/// member 2's address after member 2 died must not get member 0's peer stream.
#[test]
fn a_member_answering_at_another_members_address_gets_no_peer_traffic() {
    let mut cluster = Cluster::start(3, &[]);
    let impostor = common::member_cert(cluster.hosts[1].port);
    let taken_over = cluster.hosts[2].port;
    cluster.kill(2);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    runtime.block_on(serve_as(&impostor, taken_over, Arc::clone(&handshakes), Arc::clone(&attempts)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let log = cluster.log_of(0);
        if log.contains("not the member dialled") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(attempts.load(Ordering::SeqCst) > 0, "host 0 never dialled the impostor: the test proves nothing");
    assert!(refused, "host 0 never said why it refused the impostor:\n{}", cluster.log_of(0));
    assert_eq!(handshakes.load(Ordering::SeqCst), 0, "host 0 spoke HTTP/2 to a member at another's address");
    // The cluster still works on its two remaining members.
    let out = cluster.client(0, &["put", "after-impostor", "v"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
}

/// The same rule from the other side: with the rightful member back at its address, host 0
/// connects to it again (the verifier refuses only the wrong member).
#[test]
fn the_rightful_member_is_dialled_as_before() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.restart(2);
    cluster.wait_ready(2);
    let out = cluster.client(2, &["put", "after-restart", "v"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert!(!cluster.log_of(0).contains("not the member dialled"), "{}", cluster.log_of(0));
}
