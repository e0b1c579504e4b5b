//! Transport security shared by the `waxos` client and the `waxosd` host: how a connection is
//! dialled (TLS with the cluster's CA, optionally with a certificate of our own, or plaintext
//! when `--insecure` said so), and what a certificate says about who holds it.
//!
//! Who is who is written in a certificate's subject alternative names, as URIs, so that one CA
//! can issue every kind and a host can tell them apart without a second lookup:
//! - `waxos://member/<host:port>` — a cluster member, named by the address it serves on (the
//!   address in the roster). A peer batch or registration is accepted only when its claimed
//!   sender's roster address is the one its connection's certificate names.
//! - `waxos://role/operator` — an operator: may swap the guest (and every later admin call).
//! - anything else the CA signed is a client: it may read and write, and ask for status.
//!
//! A member certificate also carries the DNS names and IP addresses its host is reached at, and
//! both the server and the client extended key usages (a member dials its peers with it); client
//! and operator certificates carry only the client usage, so they can never serve as a host.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// URI prefix of a member's identity in a certificate's subject alternative names.
pub const MEMBER_URI_PREFIX: &str = "waxos://member/";
/// URI that gives a certificate the operator role.
pub const OPERATOR_URI: &str = "waxos://role/operator";

/// How this process dials hosts.
#[derive(Clone, Debug)]
pub enum Dialer {
    /// Plaintext HTTP/2: only with an explicit `--insecure`.
    Insecure,
    /// TLS, verifying the server against the cluster's CA, presenting `identity` if any.
    Tls(Box<TlsMaterial>),
}

/// PEM texts a TLS dialer needs.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    /// The CA certificate(s) a server's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Our own certificate and private key, presented when the server asks.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A TLS file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// Reads a PEM file, saying which one and what to do when it cannot.
pub fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError(format!("cannot read the {what} {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError(format!("the {what} {} is not a PEM file", path.display())));
    }
    Ok(bytes)
}

impl Dialer {
    /// A TLS dialer from files: the CA, and optionally our certificate and key (both or neither).
    pub fn from_files(cacert: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Dialer, TlsError> {
        let ca_pem = read_pem(cacert, "CA certificate")?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read_pem(cert, "certificate")?, read_pem(key, "private key")?)),
            (None, None) => None,
            _ => return Err(TlsError("--cert and --key go together: give both or neither".into())),
        };
        Ok(Dialer::Tls(Box::new(TlsMaterial { ca_pem, identity })))
    }

    /// Whether connections are encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Dialer::Tls(_))
    }

    /// An endpoint for `address` (`host:port`, IPv6 in brackets): `https://` with the cluster's
    /// CA (the server's certificate must name the host dialled) or, insecure, `http://`.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        match self {
            Dialer::Insecure => Endpoint::from_shared(format!("http://{address}")),
            Dialer::Tls(material) => {
                let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&material.ca_pem));
                if let Some((cert, key)) = &material.identity {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                Endpoint::from_shared(format!("https://{address}"))?.tls_config(config)
            }
        }
    }
}

/// What a certificate says about its holder (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject's common name, for logs ("" when it has none).
    pub common_name: String,
    /// The member address it names, if it is a member certificate.
    pub member: Option<String>,
    /// Whether it carries the operator role.
    pub operator: bool,
}

impl CertIdentity {
    /// Reads the identity from a DER certificate (one that TLS already verified).
    pub fn from_der(der: &[u8]) -> Result<CertIdentity, TlsError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError(format!("unreadable certificate: {e}")))?;
        let common_name =
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
        let mut identity = CertIdentity { common_name, member: None, operator: false };
        if let Ok(Some(sans)) = cert.subject_alternative_name() {
            for name in &sans.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if let Some(address) = uri.strip_prefix(MEMBER_URI_PREFIX) {
                        identity.member = Some(address.to_string());
                    } else if *uri == OPERATOR_URI {
                        identity.operator = true;
                    }
                }
            }
        }
        Ok(identity)
    }

    /// Reads the identity of the first certificate of a PEM file (a host checks its own).
    pub fn from_pem(pem: &[u8]) -> Result<CertIdentity, TlsError> {
        let text = std::str::from_utf8(pem).map_err(|_| TlsError("a PEM file must be text".into()))?;
        let (_, block) = x509_parser::pem::parse_x509_pem(text.as_bytes())
            .map_err(|e| TlsError(format!("no certificate in the PEM file: {e}")))?;
        CertIdentity::from_der(&block.contents)
    }
}

impl std::fmt::Display for CertIdentity {
    /// `member 127.0.0.1:50051 (CN node-50051)`, `operator (CN alice)`, `client (CN bob)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.member, self.operator) {
            (Some(address), _) => write!(f, "member {address}")?,
            (None, true) => f.write_str("operator")?,
            (None, false) => f.write_str("client")?,
        }
        if !self.common_name.is_empty() {
            // Control characters in it are escaped by the log writer, like all text from the wire.
            write!(f, " (CN {})", self.common_name)?;
        }
        Ok(())
    }
}
