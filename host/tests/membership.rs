//! Membership changes on real processes over TLS: a member added with `waxos member add`, its
//! host started with `waxosd --join`, promoted, and a dead member removed, while clients write.

mod common;

use std::time::{Duration, Instant};

use common::{read_eventually, stderr, stdout, write_with_retries, Cluster};

/// The members as `waxos member list` through host `via` prints them: (id, address, voter).
fn member_list(cluster: &Cluster, via: usize) -> Vec<(u32, String, bool)> {
    let out = cluster.client(via, &["member", "list"]);
    assert!(out.status.success(), "member list: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let id = words.next()?.parse().ok()?;
            let address = words.next()?.to_string();
            Some((id, address, words.next()? == "voter"))
        })
        .collect()
}

/// Waits until `done` holds for the member list through host `via`.
fn wait_members(cluster: &Cluster, via: usize, patience: Duration, done: impl Fn(&[(u32, String, bool)]) -> bool) {
    let deadline = Instant::now() + patience;
    loop {
        let members = member_list(cluster, via);
        if done(&members) {
            return;
        }
        assert!(Instant::now() < deadline, "members through host {via} never as expected: {members:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Replace under load: 16 writers run while a host is killed for good, a new host is added at
/// another address (`member add`, which promotes it once caught up), and the dead one is
/// removed. No write fails, and every acknowledged write is readable through every member
/// afterwards, the new one included.
#[test]
fn a_dead_member_is_replaced_under_load_without_a_failed_write() {
    let mut cluster = Cluster::start(3, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs: Vec<String> = (0..3).map(|i| cluster.addr(i)).collect();
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let keys = (0..40).map(|k| (format!("w{w}-{k}"), format!("value {w} {k}").into_bytes())).collect();
            runtime.spawn(write_with_retries(addrs.clone(), 1_000 + w, keys, Duration::from_millis(100)))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    // Ids are handed out in registration order, so the host at index 2 need not be node 3.
    let id_of = |members: &[(u32, String, bool)], i: usize| {
        let address = format!("127.0.0.1:{}", cluster.hosts[i].port);
        members.iter().find(|(_, a, _)| *a == address).map(|(id, _, _)| *id).expect("a member's id")
    };
    let members = member_list(&cluster, 0);
    let (first, second, dead) = (id_of(&members, 0), id_of(&members, 1), id_of(&members, 2));
    // The host at index 2 dies for good.
    cluster.kill(2);
    let new = cluster.new_host(0);
    let new_address = format!("127.0.0.1:{}", cluster.hosts[new].port);
    let out = {
        // `member add` waits for the new host to catch up, then promotes it: start the new host
        // while it waits.
        let mut add = std::process::Command::new(common::waxos_path());
        add.args(common::client_tls_args(&waxos_proto::pki::operator(&common::pki_dir())))
            .arg("127.0.0.1")
            .arg(cluster.hosts[0].port.to_string())
            .args(["member", "add", &new_address, "--wait-secs", "60"])
            .env("RUST_LOG", "info");
        let child = add.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("run");
        // The add must be chosen before the new host asks for the members.
        wait_members(&cluster, 0, Duration::from_secs(20), |m| m.iter().any(|(_, a, _)| *a == new_address));
        cluster.spawn_host(new);
        child.wait_with_output().expect("member add")
    };
    if !out.status.success() {
        if let Some(dir) = std::env::var_os("WAXOS_TEST_LOGS") {
            for (i, host) in cluster.hosts.iter().enumerate() {
                let _ = std::fs::copy(&host.log, std::path::Path::new(&dir).join(format!("{i}.log")));
            }
        }
    }
    assert!(
        out.status.success(),
        "member add: {}\n{}\nnew host's log:\n{}\nhost 1's log:\n{}",
        stdout(&out),
        stderr(&out),
        cluster.log_of(new).lines().filter(|l| !l.contains("op=status")).take(80).collect::<Vec<_>>().join("\n"),
        cluster
            .log_of(0)
            .lines()
            .filter(|l| l.contains("panick") || l.contains("guest:") || l.contains("step loop"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(stdout(&out).contains("promote 4: done"), "{}", stdout(&out));
    wait_members(&cluster, 0, Duration::from_secs(20), |m| m.iter().any(|(id, _, voter)| *id == 4 && *voter));
    let out = cluster.client(0, &["member", "remove", &dead.to_string()]);
    assert!(out.status.success(), "member remove: {}", stderr(&out));
    let mut expected = vec![(first, true), (second, true), (4, true)];
    expected.sort_unstable();
    wait_members(&cluster, 0, Duration::from_secs(20), |m| {
        m.iter().map(|(id, _, voter)| (*id, *voter)).collect::<Vec<_>>() == expected
    });
    let acked: Vec<(String, Vec<u8>)> =
        writers.into_iter().flat_map(|w| runtime.block_on(w).expect("writer")).collect();
    assert_eq!(acked.len(), 16 * 40, "every write was acknowledged (zero failed requests)");
    let readers = [0, 1, new];
    for (key, value) in acked.iter().step_by(7) {
        for &i in &readers {
            let got = runtime.block_on(read_eventually(&cluster.addr(i), key, Duration::from_secs(10)));
            assert_eq!(got, Ok(Some(value.clone())), "{key} through host {i}");
        }
    }
    assert!(cluster.log_of(new).contains("joined through"), "{}", cluster.log_of(new));
    // The new member survives a restart without --join's help (its roster is kept).
    cluster.restart(new);
    cluster.wait_ready(new);
}

/// An outsider cannot change the members: a member add without the operator's certificate is
/// refused (PERMISSION_DENIED) and changes nothing; a host whose address was never added cannot
/// join, and says how to add it.
#[test]
fn only_operators_change_members_and_an_unadded_host_cannot_join() {
    let mut cluster = Cluster::start(3, &[]);
    let client = waxos_proto::pki::client(&common::pki_dir());
    let out = cluster.client_as(Some(&client), 0, &["member", "add", "127.0.0.1:1", "--learner"]);
    assert!(!out.status.success());
    assert!(stderr(&out).to_lowercase().contains("operator"), "{}", stderr(&out));
    assert_eq!(member_list(&cluster, 0).len(), 3);
    let stranger = cluster.new_host(0);
    cluster.spawn_host(stranger);
    assert_eq!(cluster.wait_exit(stranger, Duration::from_secs(20)).map(|c| c != 0), Some(true), "it refused");
    let log = cluster.log_of(stranger);
    assert!(log.contains("is not a member there") && log.contains("member add"), "{log}");
}
