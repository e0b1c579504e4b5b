//! Socket and HTTP/2 settings for every connection the host accepts or opens.
//!
//! One place, so that no path (client, peer, admin, registration) can miss them again:
//! - `TCP_NODELAY` on every socket. Without it, a response of roughly 300 B to 8 KB sits in the
//!   kernel until the peer's delayed ACK (Nagle's algorithm), ≈ 40 ms per request. tonic sets it
//!   only on listeners it binds itself; the host binds its own listener (so the port is known and
//!   logged before serving), so it must set it on each accepted stream — `incoming` does.
//! - HTTP/2 flow-control windows large enough for the largest value (1 MiB) and a batch of peer
//!   envelopes to be in flight without waiting for a WINDOW_UPDATE round trip, and frames larger
//!   than the 16 KB default so a large value is not cut into dozens of frames.

use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

/// Per-stream HTTP/2 window, in bytes: one 1 MiB value plus framing, with room to spare.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// Per-connection HTTP/2 window, in bytes: several large requests on one connection at once.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept, in bytes (the protocol's default is 16 KiB).
pub const FRAME_BYTES_MAX: u32 = 256 << 10;
/// TCP keepalive on accepted sockets: a peer that vanished without a FIN is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The accepted-connection stream for `serve_with_incoming`: `TCP_NODELAY` and keepalive set on
/// every accepted socket.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE))
}

/// A gRPC server builder with the host's HTTP/2 settings.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
}

/// An outbound endpoint (to a peer or the coordinator) with the same settings as the server's.
pub fn endpoint(address: &str, connect_timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    /// The host's own listener path must hand out sockets with Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.expect("connect");
        let accepted = incoming.next().await.expect("one connection").expect("accepted");
        assert!(accepted.nodelay().expect("read TCP_NODELAY"), "an accepted socket must have TCP_NODELAY");
    }
}
