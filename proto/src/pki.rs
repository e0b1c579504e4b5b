//! A development PKI: one CA and the certificates a cluster on this machine needs, made on first
//! use with rcgen (`waxos dev-pki DIR --member ADDR …`, which `just cluster` runs; the tests make
//! one per test process). For anything but development, bring your own CA: hosts and clients
//! only read PEM files, and the conventions are those of `tls` (member and operator URIs).
//!
//! Files in DIR (private keys mode 0600; existing files are kept, so a second run only adds
//! what is missing):
//! - `ca.pem`, `ca.key` — the CA (ECDSA P-256, valid 10 years);
//! - `operator.pem`, `operator.key` — CN `operator`, the operator role;
//! - `client.pem`, `client.key` — CN `client`, a plain client;
//! - `member-<host>_<port>.pem`, `.key` — one per member address, naming that address, with the
//!   host's name or IP (and every loopback name when the host is a loopback one).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::tls::{MEMBER_URI_PREFIX, OPERATOR_URI};

/// Validity of every certificate made here, in days.
const VALID_DAYS: i64 = 3650;

/// A PKI step that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiError(pub String);

impl std::fmt::Display for PkiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PkiError {}

fn fail(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError(format!("{what}: {e}"))
}

/// The certificate and key file of one holder in a PKI directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl Holder {
    fn named(dir: &Path, name: &str) -> Holder {
        Holder { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }

    fn exists(&self) -> bool {
        self.cert.exists() && self.key.exists()
    }
}

/// The CA's certificate file in `dir`.
pub fn ca_cert(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The operator's files in `dir`.
pub fn operator(dir: &Path) -> Holder {
    Holder::named(dir, "operator")
}

/// The plain client's files in `dir`.
pub fn client(dir: &Path) -> Holder {
    Holder::named(dir, "client")
}

/// The files of the member serving at `address` (`host:port`) in `dir`.
pub fn member(dir: &Path, address: &str) -> Holder {
    let name: String = address
        .chars()
        .filter(|c| !matches!(c, '[' | ']'))
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    Holder::named(dir, &format!("member-{name}"))
}

/// Makes the CA, the operator's and the client's certificates in `dir` where missing.
pub fn ensure(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| PkiError(format!("cannot create {}: {e}", dir.display())))?;
    let ca = Holder::named(dir, "ca");
    if !ca.exists() {
        let key = KeyPair::generate().map_err(fail("making the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name("waxos development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(fail("signing the CA"))?;
        write(&ca.key, key.serialize_pem().as_bytes(), true)?;
        write(&ca.cert, cert.pem().as_bytes(), false)?;
    }
    let issuer = load_issuer(dir)?;
    for (holder, cn, role) in [(operator(dir), "operator", true), (client(dir), "client", false)] {
        if !holder.exists() {
            let sans = if role { vec![uri(OPERATOR_URI)?] } else { Vec::new() };
            issue(&issuer, &holder, cn, sans, false)?;
        }
    }
    Ok(())
}

/// Makes (where missing) the certificate of the member at `address`; its files.
pub fn ensure_member(dir: &Path, address: &str) -> Result<Holder, PkiError> {
    ensure(dir)?;
    let holder = member(dir, address);
    if holder.exists() {
        return Ok(holder);
    }
    let host = address
        .rsplit_once(':')
        .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| PkiError(format!("a member address is host:port, not {address:?}")))?;
    let mut sans = vec![uri(&format!("{MEMBER_URI_PREFIX}{address}"))?];
    let loopback = ["127.0.0.1", "::1", "localhost"];
    let hosts: Vec<&str> = if loopback.contains(&host) { loopback.to_vec() } else { vec![host] };
    for h in hosts {
        sans.push(match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.try_into().map_err(fail("a member's host name"))?),
        });
    }
    let issuer = load_issuer(dir)?;
    issue(&issuer, &holder, &format!("member {address}"), sans, true)?;
    Ok(holder)
}

/// Makes a client certificate `NAME.pem`/`NAME.key` in `dir` (an operator's when `operator`),
/// replacing any of that name.
pub fn issue_client(dir: &Path, name: &str, operator: bool) -> Result<Holder, PkiError> {
    ensure(dir)?;
    let holder = Holder::named(dir, name);
    let sans = if operator { vec![uri(OPERATOR_URI)?] } else { Vec::new() };
    issue(&load_issuer(dir)?, &holder, name, sans, false)?;
    Ok(holder)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| PkiError(format!("cannot read {}: {e}", path.display())))
    };
    let key = KeyPair::from_pem(&read(dir.join("ca.key"))?).map_err(fail("reading the CA key"))?;
    Issuer::from_ca_cert_pem(&read(ca_cert(dir))?, key).map_err(fail("reading the CA certificate"))
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    holder: &Holder,
    common_name: &str,
    sans: Vec<SanType>,
    serves: bool,
) -> Result<(), PkiError> {
    let key = KeyPair::generate().map_err(fail("making a key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if serves {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let cert = params.signed_by(&key, issuer).map_err(fail("signing a certificate"))?;
    write(&holder.key, key.serialize_pem().as_bytes(), true)?;
    write(&holder.cert, cert.pem().as_bytes(), false)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn uri(text: &str) -> Result<SanType, PkiError> {
    Ok(SanType::URI(text.try_into().map_err(fail("a URI name"))?))
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// Writes a file whole (a temporary file renamed over it), mode 0600 when `private`.
fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let failed = |e: std::io::Error| PkiError(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(failed)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(failed)?;
    std::fs::rename(&tmp, path).map_err(failed)
}
