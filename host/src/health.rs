//! The standard gRPC health service (`grpc.health.v1.Health`), kept true to the replica.
//!
//! SERVING means this replica can do useful work now: its guest instance runs and it knows a
//! live leader (`metrics::serving`, from the status the step loop samples every
//! `metrics::GUEST_SAMPLE_MS`): a follower heard from the leader its guest names within
//! `metrics::LEADER_FRESH`, a leader heard from a majority of the voters (itself included)
//! within it. Before the roster is complete, while the guest is down (crashed, held down by
//! chaos, restarting), during an election and in a minority cut off from the leader (whose
//! guest still names the old leader: its pre-votes fail, so it elects none), it is NOT_SERVING. The status is set for the whole server (service "") and for `waxos.v1.KeyValue`
//! alike, and a `Watch` sees each change. A process that answers at all is live; one that answers
//! SERVING is ready.

use std::time::Duration;

use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The service names whose status is kept (the whole server, and the client-facing service).
const SERVICES: [&str; 2] = ["", "waxos.v1.KeyValue"];

/// A new health service, NOT_SERVING until `keep` finds otherwise.
pub async fn service() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        reporter.set_service_status(name, ServingStatus::NotServing).await;
    }
    (reporter, service)
}

/// Follows `metrics::serving` and reports each change, until the process ends.
pub async fn keep(reporter: HealthReporter) {
    let mut reported = false;
    let mut tick = tokio::time::interval(Duration::from_millis(crate::metrics::GUEST_SAMPLE_MS));
    loop {
        tick.tick().await;
        let serving = crate::metrics::serving();
        if serving != reported {
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            for name in SERVICES {
                reporter.set_service_status(name, status).await;
            }
            tracing::info!("health: {}", if serving { "SERVING" } else { "NOT_SERVING" });
            reported = serving;
        }
    }
}
