//! `waxosd <coordinator-port> <listen-port>`: one waxos replica host.
//!
//! Thin: argument parsing and wiring. The parts live in the `waxos_host` library (see its
//! layout).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use rand::RngExt;
use tonic::service::interceptor::InterceptedService;
use waxos_host::{
    admin, admission, backup, bootstrap, chaos, health, identity, metrics, net, peer, runtime, service, signing,
    step_loop, storage, tls,
};
use waxos_proto::admin_server::AdminServer;
use waxos_proto::key_value_server::KeyValueServer;
use waxos_proto::peer_server::PeerServer;

/// A waxos replica host: serves PUT/GET/DELETE over gRPC, agreeing with its peers through
/// Multi-Paxos run by a WebAssembly guest.
#[derive(Parser, Debug)]
#[command(name = "waxosd", version)]
struct Args {
    /// Port of the coordinator host, which keeps the roster at start-up (the host whose listen
    /// port this is becomes the coordinator).
    coordinator_port: u16,
    /// Port this host serves gRPC on (clients and peers).
    listen_port: u16,
    /// Address (name or IP) this host binds and advertises to its peers.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Address (name or IP) of the coordinator.
    #[arg(long, default_value = "127.0.0.1")]
    coordinator_host: String,
    /// Where the WAL, the roster and the compiled-guest cache live [default: waxos-data/<listen-port>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Join a running cluster through the member at this address (`host:port`) instead of
    /// registering with the coordinator: an operator first adds this host's address with
    /// `waxos <host> <port> member add <address>`; it then starts as a learner and is promoted
    /// once caught up. Needed only at the first start (the roster is kept in the data dir).
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// Start a member of a new cluster from this backup file (`waxos … snapshot save FILE`):
    /// every member of the new cluster starts with the same file and an empty data dir, and
    /// the cluster gets a new id (the old cluster's peers are refused). The file's checksum is
    /// checked first; a damaged one is refused. Harmless on later restarts of the same data dir.
    #[arg(long, value_name = "FILE", conflicts_with = "join")]
    restore: Option<PathBuf>,
    /// How many replicas the cluster has (the coordinator waits for this many).
    #[arg(long, default_value_t = 5)]
    replicas: u32,
    /// The guest component [default: the build under target/ of the repository].
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Failure injection preset: off, low or high (see also the --chaos-* rates).
    #[arg(long, default_value = "off")]
    chaos: String,
    /// Seed of the failure schedule [default: random, logged].
    #[arg(long)]
    chaos_seed: Option<u64>,
    /// Mean time between acceptor outages in ms, overriding the preset (0: never).
    #[arg(long)]
    chaos_outage_every_ms: Option<u64>,
    /// Mean time between injected guest crashes in ms, overriding the preset (0: never).
    #[arg(long)]
    chaos_crash_every_ms: Option<u64>,
    /// Compact (snapshot, drop covered WAL segments) after this many WAL records.
    #[arg(long, default_value_t = 20_000)]
    snapshot_every: u64,
    /// A compaction also waits until the WAL since the last snapshot is this fraction of the
    /// snapshot's size (0: after --snapshot-every records alone).
    #[arg(long, default_value_t = storage::COMPACT_AT_LOG_TO_SNAPSHOT_RATIO)]
    compact_log_ratio: f64,
    /// Size at which a WAL segment is closed and the next one started, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    wal_segment_bytes: u64,
    /// Applied log slots each replica keeps to serve peers catching up; a peer further behind
    /// gets a snapshot instead.
    #[arg(long, default_value_t = 2_000)]
    retain_slots: u64,
    /// Swap the guest in again whenever its file changes (same path as `waxos … swap`).
    #[arg(long)]
    watch: bool,
    /// The public keys whose signatures this host accepts on guest builds: one ed25519 key in
    /// hex per line, `#` comments (`waxos keygen` makes a pair; `just build` makes the dev one
    /// and .cluster/trusted-keys). Every build — at start, by swap, by --watch — must carry a
    /// `<build>.sig` by one of them.
    #[arg(long, value_name = "FILE")]
    trusted_keys: Option<PathBuf>,
    /// The CA certificate (PEM) that every member's, client's and operator's certificate chains
    /// to. With --cert and --key: TLS on every service (`just cluster` makes a dev set under
    /// .cluster/pki).
    #[arg(long, value_name = "FILE", requires_all = ["cert", "key"])]
    cacert: Option<PathBuf>,
    /// This host's certificate (PEM): issued by the CA, naming the member address
    /// `waxos://member/<host>:<listen-port>` and the host's DNS name or IP.
    #[arg(long, value_name = "FILE", requires = "cacert")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cacert")]
    key: Option<PathBuf>,
    /// KeyValue calls need a client certificate of the CA too (by default any TLS client may
    /// read and write; Admin always needs one).
    #[arg(long, requires = "cacert")]
    client_cert_auth: bool,
    /// Development only: plaintext on every service, nobody authenticated, every call allowed
    /// (logs a warning). Guest builds must still be signed unless --allow-unsigned.
    #[arg(long, conflicts_with_all = ["cacert", "cert", "key"])]
    insecure: bool,
    /// Development only: run guest builds without checking signatures (logs a warning).
    #[arg(long, conflicts_with = "trusted_keys")]
    allow_unsigned: bool,
    /// The most client connections held at once (members have slots of their own); the
    /// descriptor limit may lower it (logged at start).
    #[arg(long, default_value_t = admission::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds an established connection may stay silent before it is closed (an answered
    /// HTTP/2 ping counts as traffic).
    #[arg(long, default_value_t = admission::DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout_secs: u64,
    /// Serve Prometheus metrics over plain HTTP at `http://<metrics-host>:PORT/metrics` (0: a
    /// free port, logged at start) [default: no metrics endpoint].
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
    /// Address the metrics endpoint binds [default: --host].
    #[arg(long, value_name = "ADDR", requires = "metrics_port")]
    metrics_host: Option<String>,
    /// Benchmarks only: one fdatasync per WAL record instead of one per step (no group commit).
    #[arg(long, hide = true)]
    sync_every_record: bool,
    /// Enables test-only guest commands (a key that makes the guest trap, one that makes it loop).
    #[arg(long, hide = true)]
    test_hooks: bool,
}

/// Where `just build` puts the guest, relative to the repository root.
const GUEST_BUILD_PATH: &str = "target/wasm32-wasip2/guest/waxos_guest.wasm";

fn default_guest() -> PathBuf {
    let from_cwd = PathBuf::from(GUEST_BUILD_PATH);
    if from_cwd.exists() {
        return from_cwd;
    }
    // Next to the binary: target/<profile>/waxosd -> target/wasm32-wasip2/guest/…
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("wasm32-wasip2/guest/waxos_guest.wasm")))
        .filter(|p| p.exists())
        .unwrap_or(from_cwd)
}

async fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

#[tokio::main]
async fn main() {
    waxos_proto::logging::init_batched("info");
    let args = Args::parse();
    let code = match run(args).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("waxosd stopped: {e:#}");
            // A data dir that is not this host's (or not this cluster's) is a configuration
            // error, not a crash: a supervisor should not restart it into the same refusal.
            if e.downcast_ref::<identity::Foreign>().is_some() {
                identity::EXIT_FOREIGN
            } else if e.downcast_ref::<storage::DiskFailed>().is_some() {
                // As a failed sync while serving: the data dir is marked, the next start rejoins.
                step_loop::EXIT_DISK_FAILED
            } else {
                1
            }
        }
    };
    // Exit without waiting for connections and threads to wind down (see `run`).
    waxos_proto::logging::flush();
    std::process::exit(code);
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.replicas == 0 || args.replicas > 64 {
        bail!("--replicas must be between 1 and 64");
    }
    // Which guest builds may run: decided first, a host without a policy does not start.
    let signing = Arc::new(signing::Policy::from_args(args.trusted_keys.as_deref(), args.allow_unsigned)?);
    let chaos_seed = args.chaos_seed.unwrap_or_else(|| rand::rng().random());
    let mut chaos = chaos::ChaosConfig::preset(&args.chaos, chaos_seed).map_err(anyhow::Error::msg)?;
    if let Some(ms) = args.chaos_outage_every_ms {
        chaos.outage_every_ms = ms;
    }
    if let Some(ms) = args.chaos_crash_every_ms {
        chaos.crash_every_ms = ms;
    }
    if !chaos.is_off() {
        tracing::info!(
            "chaos {}: acceptor outage every ~{} ms, guest crash every ~{} ms (seed {chaos_seed})",
            args.chaos,
            chaos.outage_every_ms,
            chaos.crash_every_ms
        );
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| Path::new("waxos-data").join(args.listen_port.to_string()));
    let guest_dir = data_dir.join("guest");
    // A backup to restore is checked before anything listens or registers.
    let restore = args.restore.as_deref().map(|file| backup::plan(&data_dir, file)).transpose()?;
    let watched_path = args.guest.clone().unwrap_or_else(default_guest);
    let listen = resolve(&args.host, args.listen_port).await?;
    // An IPv6 literal needs brackets in host:port form.
    let bracket = |h: &str| if h.contains(':') && !h.starts_with('[') { format!("[{h}]") } else { h.to_string() };
    let my_address = format!("{}:{}", bracket(&args.host), args.listen_port);
    let is_coordinator = args.coordinator_port == args.listen_port;
    // Who may call what: decided before anything listens.
    let security = match (&args.cacert, &args.cert, &args.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let mut security = tls::Security::from_files(ca, cert, key, &my_address)?;
            security.client_cert_auth = args.client_cert_auth;
            tracing::info!(
                "TLS on every service (CA {}, certificate of member {my_address}); peers and admin calls need certificates{}",
                ca.display(),
                if args.client_cert_auth { ", and so do KeyValue calls" } else { "" }
            );
            security
        }
        _ if args.insecure => {
            tracing::warn!(
                "--insecure: plaintext on every service, nobody authenticated: anyone who reaches {my_address} \
                 can act as a member or an operator. Development only."
            );
            tls::Security::insecure()
        }
        _ => bail!(
            "waxosd needs TLS material: --cacert FILE --cert FILE --key FILE (`just cluster` makes a dev CA and \
             certificates under .cluster/pki; `waxos dev-pki DIR --member {my_address}` makes them by hand), or \
             --insecure for plaintext (development only)"
        ),
    };
    let coordinator =
        (!is_coordinator).then(|| format!("{}:{}", bracket(&args.coordinator_host), args.coordinator_port));

    // Load the guest first: a missing or broken build should fail fast, before registering.
    let mut runtime = runtime::Runtime::new(&data_dir.join("guest-cache"))?;
    if matches!(*signing, signing::Policy::Trusted(_)) {
        // Only what a signature covers runs: no compiled code is taken from disk.
        runtime = runtime.without_disk_cache();
    }
    let runtime = Arc::new(runtime);
    let (guest_path, build) = signing::startup_build(&runtime, &signing, &guest_dir, &watched_path)?;
    tracing::info!("guest {} loaded", guest_path.display());

    let (handle, inputs) = step_loop::channel();
    let registry = bootstrap::SharedRegistry::default();
    if let (Some(backup::Plan::Restore(backup)), Ok(mut reg)) = (&restore, registry.lock()) {
        // A first start's members must all restore the same backup (`Registry::register`).
        reg.restored_from = backup.id();
    }
    let members = waxos_host::membership::Members::default();
    let identity = Arc::new(identity::Identity::new(&data_dir));
    let peer_service = peer::PeerService {
        step_loop: handle.clone(),
        registry: registry.clone(),
        members: members.clone(),
        identity: identity.clone(),
    };
    let kv_service = service::KeyValueService {
        step_loop: handle.clone(),
        replicas: args.replicas,
        client_cert_auth: security.client_cert_auth,
    };
    let admin_service = admin::AdminService {
        step_loop: handle.clone(),
        members: members.clone(),
        runtime: runtime.clone(),
        guest_dir: guest_dir.clone(),
        signing: signing.clone(),
        identity: identity.clone(),
    };

    let (descriptors, descriptor_note) = admission::raise_descriptor_limit();
    if let Some(note) = descriptor_note {
        tracing::warn!("{note}");
    }
    let mut limits = admission::Limits::for_descriptors(descriptors, args.max_connections);
    limits.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_secs.max(1));
    tracing::info!(
        "admission: {limits} ({descriptors} file descriptors, {} kept back)",
        admission::RESERVED_DESCRIPTORS
    );
    let admission = admission::Admission::new(limits);
    if let Some(port) = args.metrics_port {
        let at = resolve(args.metrics_host.as_deref().unwrap_or(&args.host), port).await?;
        let metrics_listener =
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("cannot listen for metrics on {at}"))?;
        let bound = metrics_listener.local_addr().unwrap_or(at);
        tracing::info!("metrics on http://{bound}/metrics");
        tokio::spawn(metrics::serve(metrics_listener));
    }
    // Health and reflection are read-only and tell nothing of the data: any caller that
    // completes the TLS handshake may use them, as orchestrators' probes and grpcurl do
    // without a client certificate, even under --client-cert-auth.
    let (health_reporter, health_service) = health::service().await;
    tokio::spawn(health::keep(health_reporter));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(waxos_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1 for current clients, v1alpha for older grpcurl and grpcio-reflection releases.
    let reflection_v1 = reflection().build_v1().context("gRPC reflection")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("gRPC reflection (v1alpha)")?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        "waxosd listening on {listen} (coordinator {}, data {})",
        coordinator.as_deref().unwrap_or("is this host"),
        data_dir.display()
    );
    let server = net::server()
        .add_service(KeyValueServer::new(kv_service))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Who may call is checked before a request's body is read (interceptors run on its
        // headers and connection): the peer service, whose messages may be 512 MiB, only for
        // members; admin calls (a build may be 64 MiB) only with a certificate. The handlers
        // check the rest (which member, the operator role).
        .add_service(InterceptedService::new(
            PeerServer::new(peer_service)
                .max_decoding_message_size(peer::PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(peer::PEER_MESSAGE_BYTES_MAX),
            |request: tonic::Request<()>| tls::require_member(&request, "peer call").map(|_| request),
        ))
        .add_service(InterceptedService::new(
            AdminServer::new(admin_service)
                .max_decoding_message_size(admin::GUEST_BYTES_MAX + 1024)
                .max_encoding_message_size(admin::GUEST_BYTES_MAX + 1024),
            |request: tonic::Request<()>| tls::require_certificate(&request, "admin call").map(|_| request),
        ))
        .serve_with_incoming(net::incoming(listener, security.server.clone(), admission));
    // No graceful drain on shutdown: peer streams never end by themselves, and nothing needs
    // draining — every step's records are durable before anything of it was sent or answered.
    let mut server = tokio::spawn(server);

    let (mut roster, source) = tokio::select! {
        roster = async {
            match &args.join {
                Some(via) => waxos_host::membership::join_or_load(&data_dir, &my_address, via, &registry, &security.dialer).await,
                None => bootstrap::roster(&data_dir, &my_address, coordinator.as_deref(), args.replicas, &registry, &security.dialer).await,
            }
        } => roster?,
        _ = shutdown_signal() => {
            tracing::info!("waxosd stopping (signal) before the roster was complete");
            return Ok(());
        }
    };
    // Identity first: a batch accepted from a member may make it adopt a cluster id.
    identity.start(&roster);
    members.start(&roster);

    if let Some(why) = storage::lost::marked(&data_dir) {
        // The WAL failed a sync before the last stop: what it holds cannot be trusted.
        roster.rejoining = true;
        identity.update_roster(|r| r.rejoining = true)?;
        let aside = storage::lost::set_aside(&data_dir)?;
        tracing::warn!(
            "the WAL of {} failed before the last stop ({why}): its state is set aside in {} and this host rejoins",
            data_dir.display(),
            aside.display()
        );
    }
    let read_started = std::time::Instant::now();
    let (mut storage, mut durable) = storage::Storage::open(&data_dir, args.wal_segment_bytes)?;
    storage.compact_log_ratio = args.compact_log_ratio.max(0.0);
    tracing::info!(
        "data dir read in {} ms: {} snapshot bytes and {} WAL records",
        read_started.elapsed().as_millis(),
        durable.snapshot.as_ref().map_or(0, Vec::len),
        durable.records.len()
    );
    if let Some(backup::Plan::Restore(backup)) = &restore {
        if roster.rejoining {
            tracing::warn!(
                "this host rejoins (it lost its state): --restore is not applied; it catches up from its peers"
            );
        } else {
            let config = runtime::GuestConfig {
                me: roster.me,
                members: roster.guest_members(),
                seed: rand::rng().random(),
                test_hooks: args.test_hooks,
                retain_slots: args.retain_slots,
                rejoining: false,
            };
            let cluster_id = identity.cluster_id().unwrap_or("unknown").to_string();
            durable = backup::restore(backup, &data_dir, &mut storage, &build, &config, &cluster_id)?;
        }
    }
    let has_state = durable.snapshot.is_some() || !durable.records.is_empty();
    if roster.rejoining && source == bootstrap::RosterSource::Registered && has_state {
        bail!(
            "the coordinator says this host lost its state, but {} holds some: refusing to start",
            data_dir.display()
        );
    }
    if source == bootstrap::RosterSource::Persisted && !has_state && !roster.rejoining {
        // The roster survived but the log did not (deleted, or a crash before the first record):
        // whatever this member promised or accepted is forgotten, so it must not vote as if not.
        tracing::warn!(
            "{} holds a roster but neither WAL nor snapshot: this host lost its state and rejoins",
            data_dir.display()
        );
        roster.rejoining = true;
        identity.update_roster(|r| r.rejoining = true)?;
    }
    let rejoining = roster.rejoining;
    if rejoining {
        waxos_host::crash_point::reach("rejoin.after_roster_saved");
    }
    if rejoining && !has_state {
        tracing::warn!("rejoining with no state: this replica will not vote until it has caught up");
    } else if rejoining {
        tracing::info!("rejoining (continued after a restart): the log says when this replica votes again");
    }
    let peers = peer::Peers::start(&roster, identity.clone(), security.dialer.clone(), members.clone());
    let config = runtime::GuestConfig {
        me: roster.me,
        members: roster.guest_members(),
        seed: rand::rng().random(),
        test_hooks: args.test_hooks,
        retain_slots: args.retain_slots,
        rejoining,
    };
    let step_loop = step_loop::StepLoop::new(
        build,
        guest_dir.clone(),
        config,
        storage,
        durable,
        args.snapshot_every,
        // Each replica draws its own schedule from the one seed.
        chaos::Chaos::new(
            chaos::ChaosConfig { seed: chaos.seed ^ u64::from(roster.me).wrapping_mul(0x9E37_79B9_7F4A_7C15), ..chaos },
            0,
        ),
        Box::new(peers),
    )?
    .with_sync_every_record(args.sync_every_record);
    let own_handle = handle.clone();
    std::thread::Builder::new()
        .name("step-loop".into())
        .spawn(move || step_loop.run(inputs, own_handle))
        .context("starting the step loop thread")?;
    step_loop::mark_ready(&handle);
    if args.watch {
        tokio::spawn(admin::watch(watched_path, runtime.clone(), signing.clone(), guest_dir.clone(), handle.clone()));
    }
    tracing::info!("node {} serving as one of {} replicas", roster.me, roster.members.len());

    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("waxosd stopping (signal)");
            Ok(())
        }
        foreign = identity.refused() => Err(foreign.into()),
        result = &mut server => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).context("gRPC server failed"),
            Err(e) => Err(e).context("gRPC server task failed"),
        },
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
