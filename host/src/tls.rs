//! Who is calling, and what they may do: the host's TLS configuration and its authorization rules.
//!
//! Every service (KeyValue, Peer, Admin) is served on one port, over TLS with the cluster's CA
//! (`--cacert`, `--cert`, `--key`, as etcd names them), or in plaintext only with `--insecure`.
//! `net::incoming` does the handshake; what the client's certificate says (`tls::CertIdentity`
//! from `waxos_proto::tls`: a member address, the operator role, or neither) travels with the
//! connection as its `ConnInfo`, and every handler asks `caller(&request)`.
//!
//! A client certificate is optional at the TLS layer (so a plain KeyValue client needs none), and
//! one signed by another CA fails the handshake. The rules on top, each refusal a
//! `PERMISSION_DENIED` that names the caller, and logged:
//! - `Peer.Exchange` and `Peer.Register`: a member certificate, and the member it names must be
//!   the one the message claims to come from (checked in `peer`): a batch's `src` must have the
//!   certificate's address in the roster, a registration must register that address.
//!   Without this, a forged `Chosen` from anyone who could reach the port made a replica diverge.
//! - `Admin.SwapGuest` (and every operator action): the operator role.
//! - `Admin.Status`: any certificate of the cluster's CA.
//! - `KeyValue`: anyone who completes the handshake; with `--client-cert-auth`, a certificate.
//!
//! With `--insecure` nobody is authenticated and every call is allowed: the host says so loudly
//! at start, and only signed guest builds run all the same (`signing`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::{Request, Status};
use waxos_proto::tls::{read_pem, CertIdentity, Dialer};

/// Who is at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext connection (`--insecure`): nobody is authenticated.
    Insecure,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with a client certificate the cluster's CA signed.
    Certified(CertIdentity),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Insecure => f.write_str("unauthenticated (insecure)"),
            Caller::Anonymous => f.write_str("anonymous (no client certificate)"),
            Caller::Certified(identity) => identity.fmt(f),
        }
    }
}

/// What a connection carries into every request on it (tonic's `connect_info`).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The remote socket address.
    pub remote: Option<SocketAddr>,
    /// Who it is.
    pub caller: Caller,
}

/// The caller of a request and where it came from, for checks and logs.
pub fn caller<T>(request: &Request<T>) -> (Caller, String) {
    match request.extensions().get::<ConnInfo>() {
        Some(info) => (info.caller.clone(), info.remote.map_or_else(|| "?".to_string(), |r| r.to_string())),
        // Only a connection that did not come through `net::incoming` lacks it: trust nothing.
        None => (Caller::Anonymous, "?".to_string()),
    }
}

/// The host's transport security, from its flags.
pub struct Security {
    /// The TLS server configuration; None with `--insecure`.
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// How this host dials its peers and the coordinator (with its member certificate).
    pub dialer: Dialer,
    /// KeyValue calls need a client certificate too (`--client-cert-auth`).
    pub client_cert_auth: bool,
}

impl Security {
    /// Plaintext, nobody authenticated (`--insecure`).
    pub fn insecure() -> Security {
        Security { server: None, dialer: Dialer::Insecure, client_cert_auth: false }
    }

    /// TLS from PEM files; `my_address` must be the member address the certificate names.
    pub fn from_files(cacert: &Path, cert: &Path, key: &Path, my_address: &str) -> anyhow::Result<Security> {
        let ca_pem = read_pem(cacert, "CA certificate")?;
        let cert_pem = read_pem(cert, "certificate")?;
        let key_pem = read_pem(key, "private key")?;
        let own = CertIdentity::from_pem(&cert_pem).with_context(|| format!("reading {}", cert.display()))?;
        match &own.member {
            Some(address) if address == my_address => {}
            Some(address) => anyhow::bail!(
                "{} is the certificate of member {address}, but this host serves {my_address}: give it its own certificate",
                cert.display()
            ),
            None => anyhow::bail!(
                "{} names no member (a URI {}{my_address} in its subject alternative names): peers would refuse this host",
                cert.display(),
                waxos_proto::tls::MEMBER_URI_PREFIX
            ),
        }
        let server = server_config(&ca_pem, &cert_pem, &key_pem)
            .with_context(|| format!("TLS with {}, {} and {}", cacert.display(), cert.display(), key.display()))?;
        let dialer = Dialer::from_files(cacert, Some(cert), Some(key))?;
        Ok(Security { server: Some(Arc::new(server)), dialer, client_cert_auth: false })
    }
}

/// A rustls server: our certificate, ALPN h2, client certificates optional but, when shown,
/// verified against the CA.
fn server_config(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.context("a certificate in the CA file")?).context("the CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("the client certificate verifier")?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().context("the certificate file")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("the private key file")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the certificate and its key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A refusal, logged with who asked.
fn refuse(op: &str, caller: &Caller, remote: &str, why: String) -> Status {
    tracing::warn!("refused op={op} caller=\"{caller}\" from {remote}: {why}");
    Status::permission_denied(format!("{op} refused: {why}; this caller is {caller}"))
}

/// Any certificate of the cluster's CA (or `--insecure`).
pub fn require_certificate<T>(request: &Request<T>, op: &str) -> Result<Caller, Status> {
    let (caller, remote) = caller(request);
    match caller {
        Caller::Insecure | Caller::Certified(_) => Ok(caller),
        Caller::Anonymous => {
            Err(refuse(op, &caller, &remote, format!("{op} needs a client certificate of the cluster's CA")))
        }
    }
}

/// The operator role (or `--insecure`).
pub fn require_operator<T>(request: &Request<T>, op: &str) -> Result<Caller, Status> {
    let (caller, remote) = caller(request);
    match &caller {
        Caller::Insecure => Ok(caller),
        Caller::Certified(identity) if identity.operator => Ok(caller),
        _ => Err(refuse(
            op,
            &caller,
            &remote,
            format!(
                "{op} is an operator action: it needs a client certificate with the operator role (URI {})",
                waxos_proto::tls::OPERATOR_URI
            ),
        )),
    }
}

/// A member certificate: the address it names (None with `--insecure`: nothing to check).
pub fn require_member<T>(request: &Request<T>, op: &str) -> Result<Option<String>, Status> {
    let (caller, remote) = caller(request);
    match &caller {
        Caller::Insecure => Ok(None),
        Caller::Certified(CertIdentity { member: Some(address), .. }) => Ok(Some(address.clone())),
        _ => Err(refuse(op, &caller, &remote, format!("{op} is for cluster members: it needs a member certificate"))),
    }
}

/// Refuses a member whose certificate names `proven` but who claims to be `claimed`.
pub fn refuse_impersonation(op: &str, proven: &str, claimed: &str, remote: &str) -> Status {
    tracing::warn!("refused op={op} from member {proven} at {remote}: it claims to be {claimed}");
    Status::permission_denied(format!(
        "{op} refused: this connection's certificate is member {proven}'s, but the message claims to be from {claimed}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_refuses_to_start_with_another_members_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path();
        let other = waxos_proto::pki::ensure_member(pki, "127.0.0.1:7001").expect("pki");
        let ca = waxos_proto::pki::ca_cert(pki);
        let refusal = Security::from_files(&ca, &other.cert, &other.key, "127.0.0.1:7002").err().expect("refused");
        assert!(refusal.to_string().contains("member 127.0.0.1:7001"), "{refusal:#}");
        let operator = waxos_proto::pki::operator(pki);
        let refusal =
            Security::from_files(&ca, &operator.cert, &operator.key, "127.0.0.1:7002").err().expect("refused");
        assert!(refusal.to_string().contains("names no member"), "{refusal:#}");
        assert!(Security::from_files(&ca, &other.cert, &other.key, "127.0.0.1:7001").is_ok());
    }
}
