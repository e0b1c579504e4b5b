//! `waxos <host> <port> [command]`: the command-line client of a waxos cluster.
//!
//! # Layout
//! - `session`: one logical client (identity, sequence numbers, the server it talks to, the
//!   members it can fail over to) and the request/timeout/retry logic.
//! - `commands`: what each command does and prints.
//! - `shell`: the interactive shell; `bench`: the load generator.
//! - `members`: membership changes; `backup`: `snapshot save`, a consistent backup to a file.
//! - `signing`: `waxos keygen` and `waxos sign` (offline: no host, so no HOST PORT before them).
//! - `security`: TLS to the hosts (`--cacert`, `--cert`, `--key`, `--insecure`, `WAXOS_PKI`) and
//!   `waxos dev-pki` (offline).
//! - this file: argument parsing and exit codes (0 ok, 2 key not found, 1 any failure).

/// `println!` that survives a closed stdout (`waxos … | head`): the process leaves quietly with
/// 141, as if by SIGPIPE, instead of panicking. SIGPIPE itself stays ignored (Rust's default):
/// taking its default action killed the client whenever a server closed a socket it was writing
/// to (a vectored write has no MSG_NOSIGNAL), e.g. plaintext against a TLS host.
macro_rules! outln {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Writes to stdout, leaving quietly when nobody reads it any more.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if stdout.write_fmt(args).and_then(|()| stdout.flush()).is_err() {
        std::process::exit(141);
    }
}

mod backup;
mod bench;
mod commands;
mod members;
mod security;
mod session;
mod shell;
mod signing;

use clap::{Parser, Subcommand};

/// Talks to a waxos cluster: PUT/GET/DELETE, a demo run, and cluster status.
#[derive(Parser, Debug)]
#[command(
    name = "waxos",
    version,
    about,
    after_help = "Offline (no HOST PORT): `waxos keygen --out DIR`, `waxos sign --key KEY BUILD.wasm` (guest-build signing), \
                  `waxos dev-pki DIR --member HOST:PORT …` (a development CA and certificates)."
)]
pub struct Args {
    /// Host name or IP address of any cluster member.
    pub host: String,
    /// Its gRPC port.
    pub port: u16,
    /// Per-request deadline in milliseconds; on expiry the server is logged as unresponsive and
    /// the request goes to another member with the same (client, seq).
    #[arg(long, default_value_t = 2000, global = true)]
    pub timeout_ms: u64,
    /// Machine-readable output (status, bench).
    #[arg(long, global = true)]
    pub json: bool,
    /// Serializable GETs: answered by the contacted member from its own state at once, without
    /// a quorum check — faster, but possibly behind the latest writes. Default: linearizable.
    #[arg(long, global = true)]
    pub stale: bool,
    /// TLS to the hosts.
    #[command(flatten)]
    pub tls: security::TlsArgs,
    /// What to do; none opens an interactive shell.
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

/// Client commands.
#[derive(Subcommand, Debug, Clone)]
pub enum Cmd {
    /// Store VALUE under KEY.
    Put {
        /// The key (1..=1024 bytes).
        key: String,
        /// The value (at most 1 MiB).
        value: String,
    },
    /// Print the value of KEY (exit 2 if absent).
    Get {
        /// The key.
        key: String,
    },
    /// Remove KEY (exit 2 if absent).
    Delete {
        /// The key.
        key: String,
    },
    /// Pre-populate the store, then run at least five each of PUT, GET and DELETE.
    Demo,
    /// Show every member: id, address, up/down, role, ballot, slots, keys, guest version.
    Status,
    /// Load the cluster for a while and print ops/s and latency percentiles.
    Bench(bench::BenchArgs),
    /// Membership: list, add, promote, remove (operators only for changes).
    Member {
        /// What to do.
        #[command(subcommand)]
        action: members::MemberCmd,
    },
    /// Backups: `snapshot save FILE` writes a consistent state (operators only); `waxosd …
    /// --restore FILE` starts a new cluster from it.
    Snapshot {
        /// What to do.
        #[command(subcommand)]
        action: backup::SnapshotCmd,
    },
    /// Hot-swap this host's guest for the build at PATH, without restarting it. Sends PATH.sig
    /// (from `waxos sign`) with it: hosts run only builds signed by a key they trust.
    Swap {
        /// A guest component (.wasm).
        path: std::path::PathBuf,
    },
}

/// `waxos keygen …` and `waxos sign …`: guest-build signing, which needs no cluster.
#[derive(Parser, Debug)]
#[command(name = "waxos", version, about = "Guest-build signing and the dev PKI (offline: no host is contacted)")]
struct OfflineArgs {
    #[command(subcommand)]
    command: Offline,
}

/// Offline commands.
#[derive(Subcommand, Debug)]
enum Offline {
    /// Make a guest-signing key pair: DIR/NAME.key (private, mode 0600) and DIR/NAME.pub (a line
    /// for a host's --trusted-keys file); prints the public key.
    Keygen {
        /// Directory to write the two files into (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// File name of the pair, without extension.
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// Sign a guest build: writes BUILD.sig, the detached ed25519 signature of its exact bytes.
    Sign {
        /// A private key file from `waxos keygen`.
        #[arg(long)]
        key: std::path::PathBuf,
        /// The guest component (.wasm).
        build: std::path::PathBuf,
    },
    /// Make what is missing of a development PKI in DIR: a CA (ca.pem), an operator's and a plain
    /// client's certificates, and one per --member address (member-HOST_PORT.pem); prints the
    /// certificate files. Existing files are kept.
    DevPki {
        /// Directory of the PKI (created if missing).
        dir: std::path::PathBuf,
        /// A member's address (host:port, as its waxosd serves it): a certificate naming it.
        #[arg(long = "member", value_name = "HOST:PORT")]
        members: Vec<String>,
        /// Also make a client certificate NAME.pem/NAME.key (replacing one of that name).
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// With --client: give it the operator role.
        #[arg(long, requires = "client")]
        operator: bool,
    },
}

fn main() {
    waxos_proto::logging::init("info");
    if matches!(std::env::args_os().nth(1).as_deref().and_then(|a| a.to_str()), Some("keygen" | "sign" | "dev-pki")) {
        let code = match OfflineArgs::parse().command {
            Offline::Keygen { out, name } => signing::keygen(&out, &name),
            Offline::Sign { key, build } => signing::sign(&key, &build),
            Offline::DevPki { dir, members, client, operator } => {
                security::dev_pki(&dir, &members, client.as_deref(), operator)
            }
        };
        std::process::exit(code);
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("waxos: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(commands::run(args));
    std::process::exit(code);
}
