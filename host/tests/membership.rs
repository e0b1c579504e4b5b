//! Membership changes on real processes over TLS: a member added with `waxos member add`, its
//! host started with `waxosd --join`, promoted, and a dead member removed, while clients write;
//! and the sizes 5 → 3 → 7 → 5, removing the leader on the way.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
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

/// Adds a new host through host `via` as an operator does: `waxos member add ADDR` (which
/// waits for it to catch up, then promotes it), and the host started with `--join` while the
/// add waits. Returns its index and node id.
fn add_member(cluster: &mut Cluster, via: usize) -> (usize, u32) {
    let new = cluster.new_host(via);
    let new_address = format!("127.0.0.1:{}", cluster.hosts[new].port);
    let mut add = std::process::Command::new(common::waxos_path());
    add.args(common::client_tls_args(&waxos_proto::pki::operator(&common::pki_dir())))
        .arg("127.0.0.1")
        .arg(cluster.hosts[via].port.to_string())
        .args(["member", "add", &new_address, "--wait-secs", "60"])
        .env("RUST_LOG", "info");
    let child = add.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("run");
    // The add must be chosen before the new host asks for the members.
    wait_members(cluster, via, Duration::from_secs(20), |m| m.iter().any(|(_, a, _)| *a == new_address));
    cluster.spawn_host(new);
    let out = child.wait_with_output().expect("member add");
    if !out.status.success() {
        if let Some(dir) = std::env::var_os("WAXOS_TEST_LOGS") {
            for (i, host) in cluster.hosts.iter().enumerate() {
                let _ = std::fs::copy(&host.log, std::path::Path::new(&dir).join(format!("{i}.log")));
            }
        }
    }
    assert!(
        out.status.success(),
        "member add: {}\n{}\nnew host's log:\n{}",
        stdout(&out),
        stderr(&out),
        cluster.log_of(new).lines().filter(|l| !l.contains("op=status")).take(80).collect::<Vec<_>>().join("\n"),
    );
    let id = member_list(cluster, via)
        .into_iter()
        .find(|(_, a, _)| *a == new_address)
        .map(|(id, _, _)| id)
        .expect("the new member is listed");
    assert!(stdout(&out).contains(&format!("promote {id}: done")), "{}", stdout(&out));
    (new, id)
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
    let (new, new_id) = add_member(&mut cluster, 0);
    assert_eq!(new_id, 4, "ids are never reused: the next one");
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

/// A writer that runs until `stop`, each write retried with the same (client, seq) on the next
/// host of the current list (an operator tells clients of new and removed hosts, as `addrs`
/// here) for up to about a minute. Returns the writes acknowledged and those that failed.
async fn write_until_stopped(
    addrs: Arc<RwLock<Vec<String>>>,
    client_id: u64,
    stop: Arc<AtomicBool>,
) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    let mut host = client_id as usize;
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let (key, value) = (format!("r{client_id}-{seq}"), format!("value {client_id} {seq}").into_bytes());
        let request = waxos_proto::PutRequest { key: key.clone(), value: value.clone(), client_id, seq };
        let mut done = false;
        for _attempt in 0..30 {
            let addr = {
                let list = addrs.read().expect("addresses");
                list[host % list.len()].clone()
            };
            let result = common::put_once(&addr, &request).await;
            if result.is_ok() {
                done = true;
                break;
            }
            host += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if done {
            acked.push((key, value));
        } else {
            failed.push(key);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (acked, failed)
}

/// The voters through host `via` once they are as `expected` (ids), in id order.
fn wait_voters(cluster: &Cluster, via: usize, expected: &[u32]) {
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    wait_members(cluster, via, Duration::from_secs(30), |m| {
        m.iter().filter(|(_, _, voter)| *voter).map(|(id, _, _)| *id).collect::<Vec<_>>() == expected
    });
}

/// Sizes 5 → 3 → 7 → 5 while 16 clients write, the leader removed on the way down and again
/// on the way back: leadership moves on each time, no write fails, and every acknowledged
/// write is readable through every member at the end, the four added ones included.
#[test]
fn five_to_three_to_seven_to_five_under_load_removing_the_leader() {
    let mut cluster = Cluster::start(5, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addrs = Arc::new(RwLock::new((0..5).map(|i| cluster.addr(i)).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        (0..16u64).map(|w| runtime.spawn(write_until_stopped(addrs.clone(), 2_000 + w, stop.clone()))).collect();
    std::thread::sleep(Duration::from_secs(1));
    let address_of = |cluster: &Cluster, i: usize| format!("127.0.0.1:{}", cluster.hosts[i].port);
    let id_of = |cluster: &Cluster, via: usize, i: usize| {
        let address = address_of(cluster, i);
        member_list(cluster, via).into_iter().find(|(_, a, _)| *a == address).map(|(id, _, _)| id).expect("member")
    };
    let mut live: Vec<usize> = (0..5).collect();
    let mut voters: Vec<u32> = live.iter().map(|&i| id_of(&cluster, 0, i)).collect();
    // Removes host `i` (the leader or not) through another live host, waits for the voters,
    // and stops it, as its operator would; clients are told.
    let remove = |cluster: &mut Cluster, live: &mut Vec<usize>, voters: &mut Vec<u32>, i: usize| {
        let via = *live.iter().find(|&&j| j != i).expect("another member");
        let id = id_of(cluster, via, i);
        let out = cluster.client(via, &["member", "remove", &id.to_string()]);
        assert!(out.status.success(), "member remove {id}: {}", stderr(&out));
        voters.retain(|&v| v != id);
        live.retain(|&j| j != i);
        wait_voters(cluster, via, voters);
        cluster.kill(i);
        let gone = cluster.addr(i);
        addrs.write().expect("addresses").retain(|a| *a != gone);
    };
    let leader_now = |cluster: &Cluster, live: &[usize]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = common::leader_index(cluster, live[0]).filter(|l| live.contains(l)) {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader among {live:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // 5 -> 3: the leader first.
    let first_leader = leader_now(&cluster, &live);
    remove(&mut cluster, &mut live, &mut voters, first_leader);
    let second_leader = leader_now(&cluster, &live);
    assert_ne!(second_leader, first_leader, "leadership moved on");
    let other = *live.iter().find(|&&j| j != second_leader).expect("a follower");
    remove(&mut cluster, &mut live, &mut voters, other);
    assert_eq!(voters.len(), 3);
    // 3 -> 7.
    let mut added = Vec::new();
    for _ in 0..4 {
        let (new, id) = add_member(&mut cluster, live[0]);
        live.push(new);
        voters.push(id);
        added.push(new);
        addrs.write().expect("addresses").push(cluster.addr(new));
        wait_voters(&cluster, live[0], &voters);
    }
    assert_eq!(voters.len(), 7);
    // 7 -> 5: the leader again, then one of the added.
    let third_leader = leader_now(&cluster, &live);
    remove(&mut cluster, &mut live, &mut voters, third_leader);
    let fourth_leader = leader_now(&cluster, &live);
    assert_ne!(fourth_leader, third_leader, "leadership moved on again");
    let added_follower = *added.iter().find(|&&j| j != fourth_leader && live.contains(&j)).expect("an added follower");
    remove(&mut cluster, &mut live, &mut voters, added_follower);
    assert_eq!(voters.len(), 5);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    for writer in writers {
        let (a, f) = runtime.block_on(writer).expect("writer");
        acked.extend(a);
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "zero failed requests, but {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(acked.len() > 16 * 20, "the clients kept writing throughout ({} writes)", acked.len());
    eprintln!("{} writes acknowledged during 5 -> 3 -> 7 -> 5", acked.len());
    for (key, value) in acked.iter().step_by(13) {
        for &i in &live {
            let got = runtime.block_on(read_eventually(&cluster.addr(i), key, Duration::from_secs(10)));
            assert_eq!(got, Ok(Some(value.clone())), "{key} through host {i}");
        }
    }
}
