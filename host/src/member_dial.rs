//! Dialling a member: TLS that proves the server is the member this host meant to reach.
//!
//! The cluster's CA signs every member's certificate, and on one machine (or behind one name)
//! every member's certificate also names the same host — so checking that a server's
//! certificate chains to the CA and names the host dialled (what tonic's TLS does) would let
//! any member answer for any other: a member could take a peer's place in a cluster of five
//! and collect its votes. So a host dials with a verifier of its own: the usual WebPKI checks
//! (chain to the CA, validity, the server usage, the host name) and then the member URI
//! (`waxos://member/<host:port>`, `waxos_proto::tls`):
//! - dialling a peer, the certificate must name exactly the roster address dialled;
//! - dialling the coordinator at start-up (whose roster address this host does not know yet:
//!   `--coordinator-host` may be another name for it), it must name some member.
//!
//! tonic has no hook for a custom verifier, so the TLS client here is tokio-rustls, under
//! tonic as a connector (`Endpoint::connect_with_connector`) on an `http://` endpoint: the
//! connection is TLS all the same, the scheme only tells tonic not to add TLS of its own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Channel, Uri};
use waxos_proto::tls::{CertIdentity, Dialer};

/// Which member the server must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The member with this roster address.
    Member(String),
    /// Any member (the coordinator, before this host has the roster).
    AnyMember,
}

impl Expect {
    fn check(&self, identity: &CertIdentity) -> Result<(), String> {
        match (self, &identity.member) {
            (Expect::Member(wanted), Some(named)) if named == wanted => Ok(()),
            (Expect::AnyMember, Some(_)) => Ok(()),
            (Expect::Member(wanted), _) => {
                Err(format!("the server's certificate is {identity}'s, not member {wanted}'s: not the member dialled"))
            }
            (Expect::AnyMember, None) => Err(format!("the server's certificate ({identity}) names no member")),
        }
    }
}

/// Connects to `address` (`host:port`) the host's way: plaintext when `--insecure`, else TLS
/// with its member certificate, the server proved to be `expect`.
pub async fn connect(dialer: &Dialer, address: &str, expect: Expect, timeout: Duration) -> anyhow::Result<Channel> {
    let Dialer::Tls(material) = dialer else {
        return Ok(crate::net::endpoint(dialer, address, timeout)?.connect().await?);
    };
    let config = client_config(&material.ca_pem, material.identity.as_ref(), expect)?;
    let connector = MemberConnector { config: Arc::new(config), address: address.to_string(), timeout };
    let endpoint = crate::net::endpoint(&Dialer::Insecure, address, timeout)?;
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// A rustls client: the CA as the only root, our member certificate, the member check, h2.
fn client_config(
    ca_pem: &[u8],
    identity: Option<&(Vec<u8>, Vec<u8>)>,
    expect: Expect,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.context("a certificate in the CA file")?).context("the CA certificate")?;
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("the server certificate verifier")?;
    let verifier = Arc::new(MemberVerifier { webpki, expect });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().context("our certificate")?;
            let key = PrivateKeyDer::from_pem_slice(key_pem).context("our private key")?;
            builder.with_client_auth_cert(chain, key).context("our certificate and its key")?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// WebPKI's checks, then the member named.
#[derive(Debug)]
struct MemberVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    expect: Expect,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let identity = CertIdentity::from_der(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        self.expect.check(&identity).map_err(rustls::Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// tonic's connector: TCP to the address, then TLS with `config` (the URI tonic passes is
/// ignored: the address is fixed per connector).
#[derive(Clone)]
struct MemberConnector {
    config: Arc<rustls::ClientConfig>,
    address: String,
    timeout: Duration,
}

/// The host part of `host:port` (an IPv6 address without its brackets).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

type Connection = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type Connecting = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Connection>> + Send>>;

impl tower::Service<Uri> for MemberConnector {
    type Response = Connection;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Connecting {
        let this = self.clone();
        Box::pin(async move {
            let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
            let name = ServerName::try_from(host_of(&this.address).to_string())
                .map_err(|e| invalid(format!("{}: not a host name or IP: {e}", this.address)))?;
            let connecting = async {
                let tcp = tokio::net::TcpStream::connect(&this.address).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(this.config).connect(name, tcp).await
            };
            let tls = tokio::time::timeout(this.timeout, connecting).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TLS connection within {:?}", this.timeout),
                )
            })??;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(member: Option<&str>) -> CertIdentity {
        CertIdentity { common_name: "n".into(), member: member.map(str::to_string), operator: false }
    }

    #[test]
    fn only_the_member_dialled_passes() {
        let dialled = Expect::Member("127.0.0.1:50052".into());
        assert!(dialled.check(&identity(Some("127.0.0.1:50052"))).is_ok());
        let other = dialled.check(&identity(Some("127.0.0.1:50053"))).expect_err("another member");
        assert!(other.contains("not the member dialled"), "{other}");
        assert!(dialled.check(&identity(None)).is_err(), "a client certificate is no member");
        assert!(Expect::AnyMember.check(&identity(Some("10.0.0.9:1"))).is_ok());
        assert!(Expect::AnyMember.check(&identity(None)).is_err());
    }

    #[test]
    fn host_names_come_out_of_addresses() {
        assert_eq!(host_of("127.0.0.1:50051"), "127.0.0.1");
        assert_eq!(host_of("[::1]:50051"), "::1");
        assert_eq!(host_of("node-3.example:7000"), "node-3.example");
    }
}
