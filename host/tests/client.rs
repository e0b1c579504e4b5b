//! The `waxos` client as users meet it: against a real five-host cluster, and against a fake
//! server that misbehaves in every way a network peer can.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, Cluster};

#[test]
fn cli_commands_against_a_real_cluster() {
    let cluster = Cluster::start(5, &[]);
    let port = cluster.hosts[1].port.to_string();
    // Host by name, options before, between and after the positionals.
    let out = common::waxos_command()
        .args(["--timeout-ms", "3000", "localhost", &port, "put", "greeting", "hello world"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cluster.client(2, &["get", "greeting", "--timeout-ms", "3000"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "hello world"), "{}", stderr(&out));
    let out = cluster.client(3, &["get", "nothing-here"]);
    assert_eq!(out.status.code(), Some(2));
    // Logs go to stderr with millisecond timestamps; results alone on stdout.
    let out = cluster.client(0, &["demo"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("demo: 22 requests, 22 ok, 0 failed"), "{}", stdout(&out));
    let log = stderr(&out);
    let stamped = regex_like_timestamp(&log);
    assert!(stamped >= 22, "every demo line is timestamped to the ms:\n{log}");
    for op in ["PUT", "GET", "DELETE"] {
        assert!(log.matches(&format!("run {op} ")).count() >= 5, "at least five {op}s:\n{log}");
    }
    assert!(log.contains("GET demo:missing -> not found") && log.contains("DELETE demo:missing -> not found"));
    // Status: a table with every member, and JSON for scripts.
    let out = cluster.client(4, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert_eq!(table.lines().count(), 6, "{table}");
    assert_eq!(table.matches("leader").count(), 1, "{table}");
    assert!(table.contains("VERSION") && table.contains("0.1.0"), "{table}");
    let out = cluster.client(4, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(json["members"].as_array().map(Vec::len), Some(5));
    // Bench: bounded in time, one line of JSON.
    let started = Instant::now();
    let out = cluster
        .client(0, &["bench", "--clients", "8", "--duration", "1", "--mix", "put=50,get=40,delete=10", "--json"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    assert!(json["ops"].as_u64().unwrap_or(0) > 0, "{json}");
    assert_eq!(json["errors"], 0, "{json}");
    // Bad input: exit 1 with the reason.
    let out = cluster.client(0, &["bench", "--mix", "put=70"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("add up to 70"), "{}", stderr(&out));
}

fn regex_like_timestamp(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() > 23
                && b[4] == b'-'
                && b[7] == b'-'
                && b[10] == b' '
                && b[13] == b':'
                && b[16] == b':'
                && b[19] == b'.'
                && b[20..23].iter().all(u8::is_ascii_digit)
        })
        .count()
}

#[test]
fn interactive_shell_fails_over_when_its_host_is_killed() {
    let mut cluster = Cluster::start(5, &[]);
    let mut shell = common::waxos_command()
        .args(["127.0.0.1", &cluster.hosts[0].port.to_string(), "--timeout-ms", "1500"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shell");
    let mut stdin = shell.stdin.take().expect("stdin");
    writeln!(stdin, "put before kill").expect("write");
    writeln!(stdin, "bogus line").expect("write");
    writeln!(stdin, "get before").expect("write");
    stdin.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(1500));
    cluster.kill(0);
    writeln!(stdin, "put after kill").expect("write");
    writeln!(stdin, "get after").expect("write");
    writeln!(stdin, "quit").expect("write");
    drop(stdin);
    let out = shell.wait_with_output().expect("shell");
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
    assert!(e.contains("unknown command \"bogus\""), "{e}");
    assert!(o.contains("kill\n") && o.matches("ok").count() >= 2, "{o}");
    assert!(e.contains(&format!("server 127.0.0.1:{} ", cluster.hosts[0].port)), "logs the dead server: {e}");
    assert!(e.contains("retrying PUT after"), "fails over: {e}");
}

/// A proxy in front of a real host: forwards everything, but holds the answers of the first
/// connection back for `delay` — the request is applied, the client times out.
fn delaying_proxy(target: u16, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { return };
            let (mut c_read, mut s_write) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
            });
            let (mut s_read, mut c_write) = (server, client);
            let hold = if n == 0 { delay } else { Duration::ZERO };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let started = Instant::now();
                let mut held = Vec::new();
                while let Ok(k) = s_read.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    if started.elapsed() < hold {
                        held.extend_from_slice(&buf[..k]);
                        continue;
                    }
                    if !held.is_empty() {
                        let _ = c_write.write_all(&std::mem::take(&mut held));
                    }
                    if c_write.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_write_retried_after_a_timeout_applies_exactly_once() {
    let cluster = Cluster::start(5, &[]);
    let out = cluster.client(1, &["put", "once", "here"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let proxy = delaying_proxy(cluster.hosts[0].port, Duration::from_secs(3));
    // The delete reaches host 0 through the proxy and is applied; its answer is held back, so
    // the client times out and retries the same (client, seq) on another member. Applied twice,
    // the retry would find the key gone and exit 2.
    let out = common::waxos_command()
        .args(["127.0.0.1", &proxy.to_string(), "--timeout-ms", "1000", "delete", "once"])
        .output()
        .expect("run");
    let err = stderr(&out);
    assert!(err.contains(&format!("server 127.0.0.1:{proxy} unresponsive after")), "{err}");
    assert_eq!(out.status.code(), Some(0), "the retry must get the first answer back: {err}");
    let host0 = cluster.log_of(0);
    assert!(host0.contains("request received op=delete key=once"), "the first attempt reached host 0: {host0}");
    let out = cluster.client(2, &["get", "once"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A server that misbehaves on every connection in the given way.
fn fake_server(behaviour: fn(TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || behaviour(stream));
        }
    });
    port
}

/// Serves HTTP/2 and answers every gRPC call with `body` (a gRPC-framed payload) and OK trailers.
fn h2_answering(stream: TcpStream, body: &'static [u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        stream.set_nonblocking(true).expect("nonblocking");
        let stream = tokio::net::TcpStream::from_std(stream).expect("tokio stream");
        let Ok(mut conn) = h2::server::handshake(stream).await else { return };
        while let Some(Ok((_request, mut respond))) = conn.accept().await {
            let response = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .expect("response");
            let Ok(mut send) = respond.send_response(response, false) else { continue };
            let _ = send.send_data(bytes::Bytes::from_static(body), false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let _ = send.send_trailers(trailers);
        }
    });
}

fn run_against(port: u16, args: &[&str]) -> (std::process::Output, Duration) {
    let started = Instant::now();
    // Plaintext: these servers speak (broken) HTTP/2 and gRPC, not TLS; that the client also
    // fails cleanly against a plaintext server when it expects TLS is the junk case with TLS.
    let out = common::waxos_command()
        .args(["--insecure", "127.0.0.1", &port.to_string(), "--timeout-ms", "1000"])
        .args(args)
        .output()
        .expect("run");
    (out, started.elapsed())
}

#[test]
fn junk_from_a_server_is_logged_and_never_crashes_the_client() {
    let junk = fake_server(|mut s| {
        let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1000));
        std::thread::sleep(Duration::from_millis(200));
    });
    // A gRPC frame that announces 100 bytes and carries 3.
    let truncated = fake_server(|s| h2_answering(s, b"\x00\x00\x00\x00\x64abc"));
    // A well-framed message that is not a GetResponse (field 1 as a length-delimited string).
    let wrong_type = fake_server(|s| h2_answering(s, b"\x00\x00\x00\x00\x07\x0a\x05hello"));
    let silent = fake_server(|s| {
        std::thread::sleep(Duration::from_secs(5));
        drop(s);
    });
    for (name, port) in [("junk", junk), ("truncated", truncated), ("wrong type", wrong_type), ("silent", silent)] {
        let (out, took) = run_against(port, &["get", "k"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: must fail cleanly, not crash: {err}");
        assert!(err.contains("waxos: GET \"k\" failed"), "{name}: clear message: {err}");
        assert!(err.contains(&format!("server 127.0.0.1:{port}")), "{name}: logs the server: {err}");
        assert!(took < Duration::from_secs(4), "{name}: took {took:?}");
        if name != "wrong type" {
            // (An empty PutResponse decodes from any well-formed protobuf message — unknown
            // fields are skipped by design — so a "wrong type" answer to a put is a success
            // claim like any other; it still cannot be matched to another request, since every
            // call has its own HTTP/2 stream.)
            let (out, _) = run_against(port, &["put", "k", "v"]);
            assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        }
    }
    let (out, _) = run_against(silent, &["get", "k"]);
    assert!(stderr(&out).contains("unresponsive after"), "{}", stderr(&out));
    // With TLS (the default), junk where a handshake should be fails as cleanly.
    let out = common::waxos_command()
        .args(["127.0.0.1", &junk.to_string(), "--timeout-ms", "1000", "get", "k"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "TLS against junk: {}", stderr(&out));
    assert!(stderr(&out).contains(&format!("server 127.0.0.1:{junk}")), "{}", stderr(&out));
}

#[test]
fn ipv6_literal_hosts_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let (key, trusted_keys) = common::keygen(dir.path(), "test");
    let guest = common::signed_copy(&common::guest_path(), &dir.path().join("guest"), &key);
    let mut host = Command::new(common::waxosd_path())
        .args([&port.to_string(), &port.to_string(), "--host", "::1", "--replicas", "1", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--guest")
        .arg(guest)
        .arg("--trusted-keys")
        .arg(trusted_keys)
        .args(common::member_tls_args_for(&format!("[::1]:{port}")))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = false;
    while Instant::now() < deadline && !ok {
        let out = common::waxos_command().args(["::1", &port.to_string(), "put", "v6", "yes"]).output().expect("run");
        ok = out.status.code() == Some(0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = common::waxos_command().args(["::1", &port.to_string(), "get", "v6"]).output().expect("run");
    let _ = host.kill();
    let _ = host.wait();
    assert!(ok, "no write over IPv6");
    assert_eq!(stdout(&out), "yes");
}
