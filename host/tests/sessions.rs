//! A `(client, seq)` pair reused for another request, through gRPC with real processes (issue
//! 12, item 5): `FAILED_PRECONDITION` (not retried, nothing applied), never `OK` with nothing
//! applied, `INTERNAL` or `UNAVAILABLE`; a genuine retry still gets the original answer.

mod common;

use std::time::Duration;

use common::Cluster;
use tonic::Code;
use waxos_proto::{DeleteRequest, GetRequest, PutRequest};

const CLIENT: u64 = 0x5e55_0001;

fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(5));
    request
}

fn assert_reused(result: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::FailedPrecondition, "{what}: {status:?}");
    assert!(
        status.message().contains(&format!("(client {CLIENT:#x}, seq 1) was already used for another request")),
        "{what}: {}",
        status.message()
    );
}

#[test]
fn a_reused_pair_is_failed_precondition_and_a_retry_gets_the_original_answer() {
    let cluster = Cluster::start(3, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let put = |key: &str, value: &str| PutRequest {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            client_id: CLIENT,
            seq: 1,
        };
        let get = |client_id: u64, stale: bool| GetRequest { key: "k".into(), client_id, seq: 1, stale };
        let mut first = cluster.grpc(0).await;
        first.put(timed(put("k", "a"))).await.expect("the first put");
        for host in 0..3 {
            let mut client = cluster.grpc(host).await;
            assert_reused(client.put(timed(put("k", "b"))).await, &format!("another value via host {host}"));
            assert_reused(client.put(timed(put("k2", "a"))).await, &format!("another key via host {host}"));
            assert_reused(client.get(timed(get(CLIENT, false))).await, &format!("a get via host {host}"));
            assert_reused(client.get(timed(get(CLIENT, true))).await, &format!("a stale get via host {host}"));
            let delete = DeleteRequest { key: "k".into(), client_id: CLIENT, seq: 1 };
            assert_reused(client.delete(timed(delete)).await, &format!("a delete via host {host}"));
            // Nothing was applied: another client reads the first value.
            let read = client.get(timed(get(CLIENT + 1 + host as u64, false))).await.expect("read k").into_inner();
            assert_eq!((read.found, read.value), (true, b"a".to_vec()), "k via host {host}");
            let read = client.get(timed(GetRequest { key: "k2".into(), client_id: 0, seq: 0, stale: false })).await;
            assert!(!read.expect("read k2").into_inner().found, "k2 via host {host}");
            // A plain retry of the first put: its original answer.
            client.put(timed(put("k", "a"))).await.unwrap_or_else(|e| panic!("the retry via host {host}: {e:?}"));
        }
    });
}
