//! A data dir belongs to one cluster and one member: started anywhere else, it is refused
//! instead of voting with another cluster's memory (issue 17, proven bug 5; real processes).

mod common;

use std::time::{Duration, Instant};

use common::{read_eventually, Cluster};

/// Waits until one of `hosts` logs a line that contains every one of `needles`.
fn wait_for_log_line(cluster: &Cluster, hosts: &[usize], needles: &[&str], patience: Duration) {
    let deadline = Instant::now() + patience;
    loop {
        let logged = |h: usize| cluster.log_of(h).lines().any(|line| needles.iter().all(|n| line.contains(n)));
        if hosts.iter().any(|&h| logged(h)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "none of hosts {hosts:?} logged a line with {needles:?}:\n{}",
            hosts.iter().map(|&h| cluster.log_of(h)).collect::<Vec<_>>().join("\n----\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cluster X writes k=x and stops; cluster Y starts on the same ports with fresh data dirs and
/// writes k=y. Host 3 of Y is then started on X's host-3 data dir: it must not vote in Y nor
/// serve X's data there. Y's members refuse its streams (their cluster ids differ), it stops
/// with exit code 78 and says why, and Y still answers y.
#[test]
fn a_data_dir_from_another_cluster_on_the_same_ports_is_refused_and_stops_with_78() {
    let mut x = Cluster::start(3, &[]);
    let out = x.client(0, &["put", "k", "x"]);
    assert_eq!(out.status.code(), Some(0), "put in X: {}", common::stderr(&out));
    let ports = x.ports();
    for i in 0..3 {
        x.kill(i);
    }
    let x_dir = x.hosts[2].data_dir.clone();
    let x_roster = std::fs::read_to_string(x_dir.join("roster.json")).expect("X's roster");

    let mut y = Cluster::start_on(&ports, &[]);
    let out = y.client(0, &["put", "k", "y"]);
    assert_eq!(out.status.code(), Some(0), "put in Y: {}", common::stderr(&out));
    let y_roster = std::fs::read_to_string(y.hosts[2].data_dir.join("roster.json")).expect("Y's roster");
    let cluster_id = |roster: &str| -> String {
        let value: serde_json::Value = serde_json::from_str(roster).expect("roster JSON");
        value["cluster_id"].as_str().expect("a cluster id in the roster").to_string()
    };
    let (x_id, y_id) = (cluster_id(&x_roster), cluster_id(&y_roster));
    assert_ne!(x_id, y_id, "two bootstraps, two clusters");

    y.kill(2);
    y.hosts[2].data_dir = x_dir.clone();
    let log_before = y.log_of(2).len();
    y.restart(2);
    let status = y.wait_exit(2, Duration::from_secs(30));
    let log = y.log_of(2)[log_before..].to_string();
    assert_eq!(status, Some(78), "X's data dir must stop with 78 in Y; its log:\n{log}");
    let expected = format!(
        "data dir {} belongs to cluster {x_id}, but the members of this roster are cluster {y_id}: refusing to serve",
        x_dir.display()
    );
    assert!(log.contains(&expected), "the clear error ({expected:?}) is missing:\n{log}");

    // Y's members said why they refused it.
    wait_for_log_line(&y, &[0, 1], &["refused a peer stream from node", &x_id, &y_id], Duration::from_secs(5));

    // And Y's data is Y's: through each of its other hosts, k is y.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for host in [0, 1] {
        let got = runtime.block_on(read_eventually(&y.addr(host), "k", Duration::from_secs(20))).expect("answer");
        assert_eq!(got.as_deref(), Some(&b"y"[..]), "get k through host {host}");
    }
    // X's data dir is untouched by the attempt: still cluster X.
    let after = std::fs::read_to_string(x_dir.join("roster.json")).expect("roster");
    assert_eq!(cluster_id(&after), x_id);
}

/// A data dir copied to another port (here: started with another listen port) is refused at
/// start, before it serves anything: the roster names another address for its member.
#[test]
fn a_data_dir_moved_to_another_port_is_refused_at_start() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.kill(2);
    let moved = common::free_port();
    let old_port = cluster.hosts[2].port;
    cluster.hosts[2].port = moved;
    let log_before = cluster.log_of(2).len();
    cluster.restart(2);
    let status = cluster.wait_exit(2, Duration::from_secs(20));
    let log = cluster.log_of(2)[log_before..].to_string();
    assert_eq!(status, Some(78), "{log}");
    assert!(
        log.contains(&format!("at 127.0.0.1:{old_port}, but this host serves as 127.0.0.1:{moved}: refusing to start")),
        "{log}"
    );
}

fn roster_json(cluster: &Cluster, host: usize) -> serde_json::Value {
    let text = std::fs::read_to_string(cluster.hosts[host].data_dir.join("roster.json")).expect("roster");
    serde_json::from_str(&text).expect("roster JSON")
}

/// A cluster whose rosters were written before identities existed (an upgrade): the
/// coordinator names the cluster at its restart, and every other member adopts that id from
/// its peers and persists it; each data dir gets an incarnation of its own.
#[test]
fn rosters_written_before_cluster_ids_adopt_the_coordinators_id() {
    let mut cluster = Cluster::start(3, &[]);
    for i in 0..3 {
        cluster.kill(i);
        let mut roster = roster_json(&cluster, i);
        let fields = roster.as_object_mut().expect("an object");
        fields.remove("cluster_id");
        fields.remove("incarnation");
        let path = cluster.hosts[i].data_dir.join("roster.json");
        std::fs::write(path, serde_json::to_string(&roster).expect("JSON")).expect("write the old format");
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_ready(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rosters: Vec<_> = (0..3).map(|i| roster_json(&cluster, i)).collect();
        let ids: Vec<_> = rosters.iter().map(|r| r["cluster_id"].as_str().map(str::to_string)).collect();
        if ids.iter().all(|id| id.is_some() && *id == ids[0]) {
            let incarnations: std::collections::HashSet<_> =
                rosters.iter().map(|r| r["incarnation"].as_str().expect("an incarnation").to_string()).collect();
            assert_eq!(incarnations.len(), 3, "one incarnation per data dir: {rosters:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the members never agreed on a cluster id: {ids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cluster.client(1, &["put", "after", "upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
}
