//! `waxos <host> <port> [command]`: the command-line client of a waxos cluster.
//!
//! # Layout
//! - `session`: one logical client (identity, sequence numbers, the server it talks to, the
//!   members it can fail over to) and the request/timeout/retry logic.
//! - `commands`: what each command does and prints.
//! - `shell`: the interactive shell; `bench`: the load generator.
//! - this file: argument parsing and exit codes (0 ok, 2 key not found, 1 any failure).

mod bench;
mod commands;
mod session;
mod shell;

use clap::{Parser, Subcommand};

/// Talks to a waxos cluster: PUT/GET/DELETE, a demo run, and cluster status.
#[derive(Parser, Debug)]
#[command(name = "waxos", version, about)]
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
    /// Hot-swap this host's guest for the build at PATH, without restarting it.
    Swap {
        /// A guest component (.wasm).
        path: std::path::PathBuf,
    },
}

fn main() {
    // Like any Unix filter: a closed stdout (`waxos … | head`) ends the process quietly
    // instead of panicking on the failed write.
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    waxos_proto::logging::init("info");
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
