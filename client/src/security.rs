//! How the client reaches hosts: TLS, verifying each server against the cluster's CA and showing
//! our certificate when we have one (Admin needs it: status any certificate, swap an operator's),
//! or plaintext only with `--insecure`. And `waxos dev-pki`, which makes a development CA and
//! certificates (`waxos_proto::pki`).
//!
//! Where the files come from, first match wins (flags as etcd's `etcdctl` names them):
//! 1. `--cacert FILE` (with `--cert FILE --key FILE` for our own certificate, if any);
//! 2. the PKI directory `$WAXOS_PKI`, else `.cluster/pki` under the current directory (what
//!    `just cluster` makes): its `ca.pem`, and its `operator.pem`/`operator.key` as our
//!    certificate — so the README's first session works with nothing to set.

use std::path::{Path, PathBuf};

use waxos_proto::tls::Dialer;

use crate::commands::{EXIT_FAILURE, EXIT_OK};

/// The PKI directory `just cluster` makes, relative to the repository root.
pub const DEV_PKI_DIR: &str = ".cluster/pki";
/// The variable naming a PKI directory.
pub const PKI_VARIABLE: &str = "WAXOS_PKI";

/// TLS flags, on every command that talks to a host.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) to verify servers with [default: $WAXOS_PKI/ca.pem, else .cluster/pki/ca.pem].
    #[arg(long = "cacert", id = "tls_cacert", value_name = "FILE", global = true)]
    pub cacert: Option<PathBuf>,
    /// Our client certificate (PEM), e.g. an operator's for swap [default: operator.pem of the PKI directory].
    #[arg(long = "cert", id = "tls_cert", value_name = "FILE", global = true, requires = "tls_key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    // Its own id: `key` is also the KEY of put, get and delete.
    #[arg(long = "key", id = "tls_key", value_name = "FILE", global = true, requires = "tls_cert")]
    pub key: Option<PathBuf>,
    /// Plaintext: for a cluster started with `waxosd --insecure` (the server is not verified).
    #[arg(long, global = true, conflicts_with_all = ["tls_cacert", "tls_cert", "tls_key"])]
    pub insecure: bool,
}

/// The dialer `args` (and the environment) ask for, or why there is none.
pub fn dialer(args: &TlsArgs) -> Result<Dialer, String> {
    if args.insecure {
        tracing::warn!("--insecure: plaintext, the server is not verified");
        return Ok(Dialer::Insecure);
    }
    if let Some(cacert) = &args.cacert {
        return Dialer::from_files(cacert, args.cert.as_deref(), args.key.as_deref()).map_err(|e| e.to_string());
    }
    let dir = match std::env::var_os(PKI_VARIABLE) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(DEV_PKI_DIR),
    };
    let ca = waxos_proto::pki::ca_cert(&dir);
    if !ca.exists() {
        return Err(format!(
            "no CA certificate to verify the server with ({} does not exist): pass --cacert FILE (and --cert FILE \
             --key FILE for admin calls), set {PKI_VARIABLE}=DIR (a `waxos dev-pki` directory; `just cluster` makes \
             {DEV_PKI_DIR}), or --insecure for a cluster started with --insecure",
            ca.display()
        ));
    }
    let (cert, key) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (Some(cert.clone()), Some(key.clone())),
        _ => {
            let operator = waxos_proto::pki::operator(&dir);
            if operator.cert.exists() && operator.key.exists() {
                (Some(operator.cert), Some(operator.key))
            } else {
                (None, None)
            }
        }
    };
    Dialer::from_files(&ca, cert.as_deref(), key.as_deref()).map_err(|e| e.to_string())
}

/// `waxos dev-pki DIR [--member ADDR]… [--client NAME [--operator]]`: makes what is missing of
/// a development PKI in DIR (see `waxos_proto::pki`) and lists the files.
pub fn dev_pki(dir: &Path, members: &[String], client: Option<&str>, operator: bool) -> i32 {
    let made = (|| -> Result<Vec<PathBuf>, waxos_proto::pki::PkiError> {
        waxos_proto::pki::ensure(dir)?;
        let mut files = vec![waxos_proto::pki::ca_cert(dir)];
        files.push(waxos_proto::pki::operator(dir).cert);
        files.push(waxos_proto::pki::client(dir).cert);
        for address in members {
            files.push(waxos_proto::pki::ensure_member(dir, address)?.cert);
        }
        if let Some(name) = client {
            files.push(waxos_proto::pki::issue_client(dir, name, operator)?.cert);
        }
        Ok(files)
    })();
    match made {
        Ok(files) => {
            for file in files {
                outln!("{}", file.display());
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("waxos: dev-pki: {e}");
            EXIT_FAILURE
        }
    }
}
