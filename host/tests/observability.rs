//! What an operator's tools see, on real processes over TLS: each host's Prometheus endpoint
//! (`--metrics-port`), the standard gRPC health service, and gRPC reflection.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{leader_index, stderr, Cluster};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// The metrics address host `i` logged at start (`metrics on http://ADDR/metrics`).
fn metrics_addr(cluster: &Cluster, i: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = cluster.log_of(i);
        if let Some(rest) = log.split("metrics on http://").nth(1) {
            if let Some(addr) = rest.split("/metrics").next() {
                return addr.to_string();
            }
        }
        assert!(Instant::now() < deadline, "host {i} logged no metrics address:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /metrics` over a plain TCP stream: (status line, body).
fn scrape(addr: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample `name` (with its labels as written, e.g. `x_total{op="put"}`).
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Sum of every sample of `metric` whose labels contain all of `labels`.
fn sum_of(body: &str, metric: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_for(what: &str, patience: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {patience:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_host_serves_metrics_that_follow_requests_and_a_leader_change() {
    let mut cluster = Cluster::start(5, &["--metrics-port", "0"]);
    let addrs: Vec<String> = (0..5).map(|i| metrics_addr(&cluster, i)).collect();
    for (i, addr) in addrs.iter().enumerate() {
        let (status, body) = scrape(addr);
        assert!(status.contains("200"), "host {i}: {status}");
        for metric in [
            "# TYPE waxos_requests counter",
            "# TYPE waxos_request_duration_seconds histogram",
            "# TYPE waxos_leader_changes counter",
            "# TYPE waxos_step_duration_seconds histogram",
            "# TYPE waxos_wal_fsync_duration_seconds histogram",
            "# TYPE waxos_wal_written_bytes counter",
            "# TYPE waxos_guest_restarts counter",
            "# TYPE waxos_peer_queue_depth gauge",
            "# TYPE waxos_applied_slot gauge",
        ] {
            assert!(body.contains(metric), "host {i} lacks {metric}:\n{body}");
        }
        assert!(body.ends_with("# EOF\n"), "host {i}: not OpenMetrics text");
        assert!(sample(&body, "waxos_wal_written_bytes_total").is_some_and(|b| b > 0.0), "host {i}: no WAL bytes");
        assert!(sample(&body, "waxos_step_duration_seconds_count").is_some_and(|n| n > 0.0), "host {i}: no steps");
        let peers = body.lines().filter(|l| l.starts_with("waxos_peer_queue_depth{")).count();
        assert_eq!(peers, 4, "host {i}: a queue depth per peer:\n{body}");
        assert!(sum_of(&body, "waxos_peer_queue_depth", &[]) >= 0.0);
    }

    // Requests counted by op and outcome where they were answered.
    let puts_before = sum_of(&scrape(&addrs[0]).1, "waxos_requests_total", &[r#"op="put""#, r#"outcome="ok""#]);
    for n in 0..10 {
        let out = cluster.client(0, &["put", &format!("metric-key-{n}"), "v"]);
        assert_eq!(out.status.code(), Some(0), "put: {}", stderr(&out));
    }
    let body = scrape(&addrs[0]).1;
    let puts_after = sum_of(&body, "waxos_requests_total", &[r#"op="put""#, r#"outcome="ok""#]);
    assert!(puts_after >= puts_before + 10.0, "puts counted {puts_before} -> {puts_after}:\n{body}");
    assert!(
        sum_of(&body, "waxos_request_duration_seconds_count", &[r#"op="put""#]) >= puts_after,
        "latency histogram behind the counter:\n{body}"
    );
    for (i, addr) in addrs.iter().enumerate() {
        wait_for(&format!("host {i} applied slot > 0 and a leader"), Duration::from_secs(5), || {
            let body = scrape(addr).1;
            sample(&body, "waxos_applied_slot").is_some_and(|s| s > 0.0)
                && sample(&body, "waxos_leader_id").is_some_and(|l| l >= 1.0)
                && sample(&body, "waxos_guest_up") == Some(1.0)
        });
    }

    // Kill the leader: the survivors count a leader change.
    let leader = leader_index(&cluster, 0).expect("a leader");
    let survivors: Vec<usize> = (0..5).filter(|&i| i != leader).collect();
    let changes_before: Vec<f64> =
        survivors.iter().map(|&i| sample(&scrape(&addrs[i]).1, "waxos_leader_changes_total").unwrap_or(-1.0)).collect();
    cluster.kill(leader);
    let via = survivors[0];
    let out = cluster.client(via, &["--timeout-ms", "10000", "put", "after-the-leader", "died"]);
    assert_eq!(out.status.code(), Some(0), "put after the leader died: {}", stderr(&out));
    for (n, &i) in survivors.iter().enumerate() {
        wait_for(&format!("host {i} counts the leader change"), Duration::from_secs(10), || {
            sample(&scrape(&addrs[i]).1, "waxos_leader_changes_total").is_some_and(|c| c > changes_before[n])
        });
    }
}

#[test]
fn health_says_serving_and_reflection_lists_the_services_without_the_proto() {
    let cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        for i in 0..5 {
            // No client certificate needed: health and reflection are open to any TLS client.
            let channel = common::dialer_as(None).endpoint(&cluster.addr(i)).expect("endpoint").connect().await;
            let channel = channel.expect("connect without a client certificate");
            let mut health = HealthClient::new(channel.clone());
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let overall = health.check(HealthCheckRequest { service: String::new() }).await;
                let kv = health.check(HealthCheckRequest { service: "waxos.v1.KeyValue".into() }).await;
                let serving = |r: &Result<tonic::Response<_>, tonic::Status>| {
                    r.as_ref().is_ok_and(|r: &tonic::Response<tonic_health::pb::HealthCheckResponse>| {
                        r.get_ref().status == ServingStatus::Serving as i32
                    })
                };
                if serving(&overall) && serving(&kv) {
                    break;
                }
                assert!(Instant::now() < deadline, "host {i} not SERVING: {overall:?} {kv:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            let mut reflection = ServerReflectionClient::new(channel);
            let list = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let symbol = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol("waxos.v1.KeyValue".into())),
            };
            let mut answers = reflection
                .server_reflection_info(tokio_stream::iter([list, symbol]))
                .await
                .expect("reflection")
                .into_inner();
            let services = match answers.next().await.expect("an answer").expect("ok").message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
                }
                other => panic!("host {i}: not a service list: {other:?}"),
            };
            for name in ["waxos.v1.KeyValue", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
                assert!(services.iter().any(|s| s == name), "host {i} lists {services:?}, not {name}");
            }
            match answers.next().await.expect("an answer").expect("ok").message_response {
                Some(MessageResponse::FileDescriptorResponse(files)) => {
                    assert!(!files.file_descriptor_proto.is_empty(), "host {i}: no descriptor for waxos.v1.KeyValue")
                }
                other => panic!("host {i}: not a file descriptor: {other:?}"),
            }
        }
    });
}

#[test]
fn health_is_not_serving_in_a_minority_cut_off_from_the_leader() {
    // Three of five down, the leader among them: the two left still name it (their pre-votes
    // fail, so they elect no other), but hear nothing from it.
    let mut cluster = Cluster::start(5, &[]);
    let leader = leader_index(&cluster, 0).expect("a leader");
    let others: Vec<usize> = (0..5).filter(|&i| i != leader).collect();
    cluster.kill(leader);
    cluster.kill(others[0]);
    cluster.kill(others[1]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        for &i in &others[2..] {
            let mut health = HealthClient::new(cluster.channel(i).await);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let r = health.check(HealthCheckRequest { service: String::new() }).await.expect("health answers");
                if r.get_ref().status == ServingStatus::NotServing as i32 {
                    break;
                }
                assert!(Instant::now() < deadline, "host {i} still SERVING with no quorum");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}
