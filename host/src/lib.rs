//! waxos host library: everything `waxosd` is made of, one module per capability.
//!
//! # Layout
//! - `runtime`: wasmtime — engine, compiled-guest cache, instances with deadlines and limits.
//! - `step_loop`: the thread that owns the guest and the WAL; persist before send.
//! - `storage`: the write-ahead log and snapshots.
//! - `staging`: compaction and hot-swap preparation off the step loop (a fresh instance from disk).
//! - `sync_pipeline`: which step's effects may leave when; the bound on a stalled disk's backlog.
//! - `chaos`: failure on purpose (acceptor outages, guest crashes).
//! - `net`: socket and HTTP/2 settings of every connection (TCP_NODELAY, flow-control windows).
//! - `peer`: host-to-host envelope streams and the `Peer` gRPC service.
//! - `service`: the client-facing `KeyValue` gRPC service.
//! - `admin`: the `Admin` gRPC service (status, hot swap, members, backups) and `--watch`.
//! - `backup`: `snapshot save` (a consistent state, streamed) and `--restore` (a new cluster).
//! - `signing`: which guest builds may run: signature checks at start, swap and `--watch`.
//! - `bootstrap`: the roster, via the coordinator at start-up, persisted afterwards.
//! - `crash_point`: named points between storage actions where a test build can be made to die.
//! - `identity`: whose data dir this is (cluster id, member, incarnation); foreign ones refused.
//! - `metrics`: the Prometheus registry, the hooks the rest calls, and `GET /metrics`.
//! - `health`: the gRPC health service, SERVING while the guest runs and a leader is known.

pub mod admin;
pub mod admission;
pub mod backup;
pub mod bootstrap;
pub mod chaos;
pub mod crash_point;
pub mod guest_memory;
pub mod health;
pub mod identity;
pub mod member_dial;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod runtime;
pub mod service;
pub mod signing;
pub mod staging;
pub mod step_loop;
pub mod storage;
pub mod sync_pipeline;
pub mod tls;
