//! Real-process test clusters: `waxosd` hosts on 127.0.0.1 with ephemeral ports and temporary
//! data dirs, and the `waxos` client binary. Built by `just test` (release) before running.
//!
//! Every cluster signs for real: it makes its own key pair with `waxos keygen` in its temp dir,
//! runs a copy of the guest build signed with `waxos sign`, and starts its hosts with
//! `--trusted-keys` (the key's `.pub` file). Builds a test swaps in are signed the same way
//! (`Cluster::sign`), so a swap test is refused only for what it is about.
//!
//! Every cluster speaks TLS, as a real one does: one test PKI (`waxos_proto::pki`, in
//! target/test-pki) issues each host a member certificate for its address, and the `waxos`
//! client and the gRPC clients here show its operator certificate. A cluster started with
//! `--insecure` among its extra args is plaintext end to end (`Cluster::insecure`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use waxos_proto::key_value_client::KeyValueClient;
use waxos_proto::tls::Dialer;

/// The test PKI's directory (target/test-pki), its CA, operator and client made on first use.
pub fn pki_dir() -> PathBuf {
    static MADE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let dir = bin_dir().parent().expect("target/").join("test-pki");
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if !*made {
        waxos_proto::pki::ensure(&dir).expect("the test PKI");
        *made = true;
    }
    dir
}

/// The member certificate of `127.0.0.1:port` (made where missing).
pub fn member_cert(port: u16) -> waxos_proto::pki::Holder {
    member_tls_args(port);
    waxos_proto::pki::member(&pki_dir(), &format!("127.0.0.1:{port}"))
}

/// A `waxos` client command that finds the test PKI by itself (`WAXOS_PKI`), as a user's finds
/// `.cluster/pki`: it verifies hosts with the test CA and shows the operator's certificate.
pub fn waxos_command() -> Command {
    let mut command = Command::new(waxos_path());
    command.env("WAXOS_PKI", pki_dir());
    command
}

/// The waxosd TLS flags of the host serving `127.0.0.1:port`.
pub fn member_tls_args(port: u16) -> Vec<String> {
    member_tls_args_for(&format!("127.0.0.1:{port}"))
}

/// The waxosd TLS flags of the host serving `address` (`host:port`).
pub fn member_tls_args_for(address: &str) -> Vec<String> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = pki_dir();
    let member = {
        let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        waxos_proto::pki::ensure_member(&dir, address).expect("a member certificate")
    };
    let ca = waxos_proto::pki::ca_cert(&pki_dir());
    [("--cacert", ca), ("--cert", member.cert), ("--key", member.key)]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// The waxos client's TLS flags: the test CA and `holder`'s certificate.
pub fn client_tls_args(holder: &waxos_proto::pki::Holder) -> Vec<String> {
    let ca = waxos_proto::pki::ca_cert(&pki_dir());
    [("--cacert", ca), ("--cert", holder.cert.clone()), ("--key", holder.key.clone())]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// A dialer with the test CA, showing `holder`'s certificate (None: no client certificate).
pub fn dialer_as(holder: Option<&waxos_proto::pki::Holder>) -> Dialer {
    let ca = waxos_proto::pki::ca_cert(&pki_dir());
    Dialer::from_files(&ca, holder.map(|h| h.cert.as_path()), holder.map(|h| h.key.as_path())).expect("TLS files")
}

/// The operator's dialer, what the helpers here use.
pub fn dialer() -> Dialer {
    dialer_as(Some(&waxos_proto::pki::operator(&pki_dir())))
}

/// An endpoint of `address` (`127.0.0.1:PORT`) dialled as the operator; plaintext when the
/// address is written `http://…` (an `--insecure` cluster's `addr`).
pub fn endpoint(address: &str) -> tonic::transport::Endpoint {
    match address.strip_prefix("http://") {
        Some(plain) => Dialer::Insecure.endpoint(plain),
        None => dialer().endpoint(address),
    }
    .expect("an endpoint")
}

/// A connected channel to `address` (see `endpoint`).
pub async fn channel(address: &str) -> tonic::transport::Channel {
    endpoint(address).connect().await.expect("connect")
}

/// target/<profile>/ — where the binaries of this build are.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/…").to_path_buf()
}

pub fn waxosd_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_waxosd"))
}

pub fn waxos_path() -> PathBuf {
    let path = bin_dir().join("waxos");
    assert!(path.exists(), "{} is missing: build it first (`just build`)", path.display());
    path
}

pub fn guest_path() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf();
    let path = root.join("target/wasm32-wasip2/guest/waxos_guest.wasm");
    assert!(path.exists(), "{} is missing: build it first (`just build`)", path.display());
    path
}

/// An unused TCP port on 127.0.0.1, below Linux's ephemeral range (32768+) so that no
/// outgoing connection of another test's hosts can take it between now and the bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ =
        NEXT.compare_exchange(0, 20_000 + (std::process::id() % 40) as u16 * 300, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Host {
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Extra environment of this host's next start (a fault shim, a crash point).
    pub env: Vec<(String, String)>,
    /// Joins through this member (`--join`) instead of registering with the coordinator.
    pub join: Option<String>,
}

pub struct Cluster {
    pub hosts: Vec<Host>,
    pub dir: tempfile::TempDir,
    coordinator_port: u16,
    extra_args: Vec<String>,
    /// The signed copy of the guest build the hosts start with.
    pub guest: PathBuf,
    /// This cluster's private signing key, and the trusted-keys file holding its public key.
    pub signing_key: PathBuf,
    pub trusted_keys: PathBuf,
    /// Started with `--insecure`: plaintext, nobody authenticated.
    pub insecure: bool,
}

/// A guest-signing key pair made by `waxos keygen` in `dir`: (private key file, public key file
/// — itself a valid `--trusted-keys` file).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let out =
        Command::new(waxos_path()).arg("keygen").arg("--out").arg(dir).args(["--name", name]).output().expect("run");
    assert!(out.status.success(), "waxos keygen: {}", stderr(&out));
    (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")))
}

/// Copies `build` into `dir` (same file name) and signs the copy with `key` (`waxos sign`,
/// which writes `<copy>.sig`); the copy's path.
pub fn signed_copy(build: &Path, dir: &Path, key: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let copy = dir.join(build.file_name().expect("a file name"));
    // Copying a file onto itself would empty it: a build already there is only signed again.
    if std::fs::canonicalize(build).ok() != std::fs::canonicalize(&copy).ok() {
        std::fs::copy(build, &copy).expect("copy the build");
    }
    let out = Command::new(waxos_path()).arg("sign").arg("--key").arg(key).arg(&copy).output().expect("run");
    assert!(out.status.success(), "waxos sign: {}", stderr(&out));
    copy
}

impl Cluster {
    /// Starts `n` hosts and waits until a write succeeds through the first.
    pub fn start(n: usize, extra_args: &[&str]) -> Cluster {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        Cluster::start_on(&ports, extra_args)
    }

    /// Starts one host per port (the first coordinates), with fresh data dirs, and waits until
    /// a write succeeds through the first: e.g. a second cluster on the ports of a stopped one.
    pub fn start_on(ports: &[u16], extra_args: &[&str]) -> Cluster {
        let all: Vec<usize> = (0..ports.len()).collect();
        let cluster = Cluster::start_without_waiting(ports, extra_args, &all);
        cluster.wait_ready(0);
        cluster
    }

    /// A cluster of one host per port of which only those in `started` are spawned now (the
    /// rest with `spawn_host`), without waiting for anything.
    pub fn start_without_waiting(ports: &[u16], extra_args: &[&str], started: &[usize]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (signing_key, trusted_keys) = keygen(&dir.path().join("keys"), "test");
        let guest = signed_copy(&guest_path(), &dir.path().join("guest"), &signing_key);
        let mut cluster = Cluster {
            hosts: Vec::new(),
            coordinator_port: ports[0],
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            guest,
            signing_key,
            trusted_keys,
            insecure: extra_args.contains(&"--insecure"),
        };
        for (i, port) in ports.iter().enumerate() {
            let data_dir = cluster.dir.path().join(format!("data{}", i + 1));
            let log = cluster.dir.path().join(format!("{}.log", i + 1));
            cluster.hosts.push(Host { port: *port, data_dir, log, child: None, env: Vec::new(), join: None });
        }
        for &i in started {
            cluster.spawn(i);
        }
        cluster
    }

    /// Spawns host `i` (not running).
    pub fn spawn_host(&mut self, i: usize) {
        self.spawn(i);
    }

    /// A new host on a free port, not started: `start_joining` starts it with `--join` through
    /// host `via` (an operator adds its address first). Its index.
    pub fn new_host(&mut self, via: usize) -> usize {
        let i = self.hosts.len();
        let port = free_port();
        let data_dir = self.dir.path().join(format!("data{}", i + 1));
        let log = self.dir.path().join(format!("{}.log", i + 1));
        let join = Some(self.addr(via).trim_start_matches("http://").trim_start_matches("https://").to_string());
        self.hosts.push(Host { port, data_dir, log, child: None, env: Vec::new(), join });
        i
    }

    fn spawn(&mut self, i: usize) {
        let replicas = self.hosts_len();
        let host = &self.hosts[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&host.log).expect("log file");
        let tls = if self.insecure { Vec::new() } else { member_tls_args(host.port) };
        let child = Command::new(waxosd_path())
            .arg(self.coordinator_port.to_string())
            .arg(host.port.to_string())
            .arg("--data-dir")
            .arg(&host.data_dir)
            .arg("--guest")
            .arg(&self.guest)
            .arg("--trusted-keys")
            .arg(&self.trusted_keys)
            .arg("--replicas")
            .arg(replicas.to_string())
            .args(&tls)
            .args(host.join.iter().flat_map(|via| ["--join".to_string(), via.clone()]))
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .envs(host.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn waxosd");
        self.hosts[i].child = Some(child);
    }

    /// A copy of `build` signed with this cluster's trusted key, for a swap.
    pub fn sign(&self, build: &Path) -> PathBuf {
        signed_copy(build, &self.dir.path().join("signed"), &self.signing_key)
    }

    fn hosts_len(&self) -> usize {
        self.hosts.len()
    }

    /// Waits until a write through host `i` succeeds and its own guest runs (a leader is
    /// elected, the host serves).
    pub fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.client(i, &["--timeout-ms", "1000", "put", "__ready__", "yes"]);
            // The client fails over, so a write through host `i` may have been served by
            // another: host `i`'s own guest must be up too.
            if out.status.code() == Some(0) && self.guest_status(i).is_some_and(|g| g["role"].is_string()) {
                return;
            }
            for (n, host) in self.hosts.iter().enumerate() {
                if let Some(Ok(Some(status))) = host.child.as_ref().map(|c| {
                    // A host that exited on its own (e.g. its port was taken) will never serve.
                    let pid = c.id();
                    std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|stat| stat.split_whitespace().nth(2).filter(|s| *s == "Z").map(|_| pid))
                }) {
                    panic!("host {n} (pid {status}) exited during start-up; log:\n{}", self.log_of(n));
                }
            }
            assert!(
                Instant::now() < deadline,
                "host {i} not ready within 30 s: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_of(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the `waxos` client against host `i`, as the operator.
    pub fn client(&self, i: usize, args: &[&str]) -> Output {
        self.client_as(Some(&waxos_proto::pki::operator(&pki_dir())), i, args)
    }

    /// Runs the `waxos` client against host `i`, showing `holder`'s certificate (None: none).
    pub fn client_as(&self, holder: Option<&waxos_proto::pki::Holder>, i: usize, args: &[&str]) -> Output {
        let tls = match holder {
            _ if self.insecure => vec!["--insecure".to_string()],
            Some(holder) => client_tls_args(holder),
            None => vec!["--cacert".to_string(), waxos_proto::pki::ca_cert(&pki_dir()).display().to_string()],
        };
        Command::new(waxos_path())
            .args(&tls)
            .arg("127.0.0.1")
            .arg(self.hosts[i].port.to_string())
            .args(args)
            .env("RUST_LOG", "info")
            .output()
            .expect("run waxos")
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.hosts[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Each host's port, in order.
    pub fn ports(&self) -> Vec<u16> {
        self.hosts.iter().map(|h| h.port).collect()
    }

    /// Whether host `i`'s process is still running.
    pub fn alive(&mut self, i: usize) -> bool {
        match self.hosts[i].child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Waits up to `patience` for host `i` to exit by itself; its exit code (None: still
    /// running, or killed by a signal).
    pub fn wait_exit(&mut self, i: usize, patience: Duration) -> Option<i32> {
        let deadline = Instant::now() + patience;
        loop {
            let child = self.hosts[i].child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.hosts[i].child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Host `i`'s guest status JSON, through its own Admin service.
    pub fn guest_status(&self, i: usize) -> Option<serde_json::Value> {
        self.own_status_row(i).map(|m| m["guest"].clone())
    }

    /// Host `i`'s own row of `waxos status --json` through itself (id, address, guest, build).
    pub fn own_status_row(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.client(i, &["--timeout-ms", "1000", "--json", "status"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let port = format!(":{}", self.hosts[i].port);
        status["members"]
            .as_array()?
            .iter()
            .find(|m| m["address"].as_str().is_some_and(|a| a.ends_with(&port)))
            .cloned()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }

    /// Host `i`'s address for `endpoint`/`channel`: `127.0.0.1:PORT` (TLS), or
    /// `http://127.0.0.1:PORT` for an `--insecure` cluster.
    pub fn addr(&self, i: usize) -> String {
        let scheme = if self.insecure { "http://" } else { "" };
        format!("{scheme}127.0.0.1:{}", self.hosts[i].port)
    }

    /// A connected channel to host `i`, as the operator.
    pub async fn channel(&self, i: usize) -> tonic::transport::Channel {
        channel(&self.addr(i)).await
    }

    /// A gRPC KeyValue client of host `i`.
    pub async fn grpc(&self, i: usize) -> KeyValueClient<tonic::transport::Channel> {
        KeyValueClient::new(self.channel(i).await)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill(i);
        }
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Host `i`'s node id, from its own status.
pub fn node_id(cluster: &Cluster, i: usize) -> u32 {
    cluster.own_status_row(i).and_then(|m| m["id"].as_u64()).expect("host in its status") as u32
}

/// Index of the host whose guest leads, from `waxos status --json` through host `via`.
pub fn leader_index(cluster: &Cluster, via: usize) -> Option<usize> {
    let out = cluster.client(via, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let leader = status["members"].as_array()?.iter().find(|m| m["guest"]["role"] == "leader")?;
    let address = leader["address"].as_str()?;
    cluster.hosts.iter().position(|h| address.ends_with(&format!(":{}", h.port)))
}

/// One PUT attempt at `addr`: connect within 500 ms, answer within 2 s.
pub async fn put_once(
    addr: &str,
    request: &waxos_proto::PutRequest,
) -> Result<tonic::Response<waxos_proto::PutResponse>, tonic::Status> {
    let channel = endpoint(addr)
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut r = tonic::Request::new(request.clone());
    r.set_timeout(Duration::from_millis(2_000));
    KeyValueClient::new(channel).put(r).await
}

/// A writer that retries a failed write with the same (client, seq) on the next host, as the
/// real client does. Returns the writes that were acknowledged.
pub async fn write_with_retries(
    addrs: Vec<String>,
    client_id: u64,
    keys: Vec<(String, Vec<u8>)>,
    pause: Duration,
) -> Vec<(String, Vec<u8>)> {
    let mut acked = Vec::new();
    let mut host = (client_id as usize) % addrs.len();
    for (i, (key, value)) in keys.into_iter().enumerate() {
        let request = waxos_proto::PutRequest { key: key.clone(), value: value.clone(), client_id, seq: i as u64 + 1 };
        for _attempt in 0..40 {
            let result = put_once(&addrs[host], &request).await;
            match result {
                Ok(_) => {
                    acked.push((key.clone(), value.clone()));
                    break;
                }
                Err(_) => {
                    host = (host + 1) % addrs.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
    acked
}

/// Reads `key` from host `i`, retrying transient failures for up to `patience`.
pub async fn read_eventually(addr: &str, key: &str, patience: Duration) -> Result<Option<Vec<u8>>, String> {
    let deadline = Instant::now() + patience;
    let mut last = String::new();
    while Instant::now() < deadline {
        let result = async {
            let mut client = KeyValueClient::new(endpoint(addr).connect().await.map_err(|e| e.to_string())?);
            let mut r = tonic::Request::new(waxos_proto::GetRequest {
                key: key.to_string(),
                client_id: 0,
                seq: 0,
                stale: false,
            });
            r.set_timeout(Duration::from_millis(2_000));
            client.get(r).await.map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(r) => {
                let r = r.into_inner();
                return Ok(r.found.then_some(r.value));
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("no answer for {key} from {addr}: {last}"))
}

/// A ballot as the guest's status prints it (`round.node`, or `epoch:round.node`), comparable.
pub fn parse_ballot(text: &str) -> Option<(u64, u64, u64)> {
    let (epoch, rest) = match text.split_once(':') {
        Some((e, rest)) => (e.parse().ok()?, rest),
        None => (0, text),
    };
    let (round, node) = rest.split_once('.')?;
    Some((epoch, round.parse().ok()?, node.parse().ok()?))
}

/// The fault-injecting disk (`host/tests/faultdisk/faultdisk.c`), built once with `cc` next to
/// the binaries; its path, for `LD_PRELOAD`.
pub fn faultdisk_shim() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faultdisk/faultdisk.c");
            let out = bin_dir().join(format!("faultdisk-{}.so", std::process::id()));
            let status = Command::new("cc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&out)
                .arg(&source)
                .arg("-ldl")
                .status()
                .expect("run cc (a C compiler is needed to link Rust anyway)");
            assert!(status.success(), "building {}", source.display());
            out
        })
        .clone()
}

/// Environment that puts host processes on the fault-injecting disk for files under `path`.
pub fn faultdisk_env(path: &str, mode: &str, after: u64) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), faultdisk_shim().display().to_string()),
        ("FAULTDISK_PATH".into(), path.into()),
        ("FAULTDISK_MODE".into(), mode.into()),
        ("FAULTDISK_AFTER".into(), after.to_string()),
    ]
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

/// A guest variant the hot-swap tests swap in (`scripts/guest-variants.sh`, run by `just test`).
pub fn guest_variant(name: &str) -> PathBuf {
    let guest = guest_path();
    let target = guest.parent().and_then(|p| p.parent()).and_then(|p| p.parent()).expect("target dir");
    let path = target.join("guest-variants").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/guest-variants.sh (just test does)", path.display());
    path
}

/// The last WAL segment of a host's data dir.
pub fn last_wal_segment(data_dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data_dir.join("wal"))
        .expect("wal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    segments.pop().expect("a WAL segment")
}
