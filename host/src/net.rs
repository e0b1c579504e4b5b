//! Socket and HTTP/2 settings for every connection the host accepts or opens.
//!
//! One place, so that no path (client, peer, admin, registration) can miss them again:
//! - `TCP_NODELAY` on every socket. Without it, a response of roughly 300 B to 8 KB sits in the
//!   kernel until the peer's delayed ACK (Nagle's algorithm), ≈ 40 ms per request. tonic sets it
//!   only on listeners it binds itself; the host binds its own listener (so the port is known and
//!   logged before serving), so it must set it on each accepted stream — `incoming` does.
//! - A handshake deadline: an accepted connection is handed to the gRPC server only once it has
//!   sent the 24 bytes of an HTTP/2 client preface, within `HANDSHAKE_TIMEOUT`; one that sends
//!   half a preface and then nothing is closed then (it held a socket and a task for ever).
//! - HTTP/2 flow-control windows large enough for the largest value (1 MiB) and a batch of peer
//!   envelopes to be in flight without waiting for a WINDOW_UPDATE round trip, and frames larger
//!   than the 16 KB default so a large value is not cut into dozens of frames.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Endpoint, Server};

/// Per-stream HTTP/2 window, in bytes: one 1 MiB value plus framing, with room to spare.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// Per-connection HTTP/2 window, in bytes: several large requests on one connection at once.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept, in bytes (the protocol's default is 16 KiB).
pub const FRAME_BYTES_MAX: u32 = 256 << 10;
/// TCP keepalive on accepted sockets: a peer that vanished without a FIN is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// How long an accepted connection may take to send its HTTP/2 client preface.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_BYTES: usize = 24;

/// The accepted-connection stream for `serve_with_incoming`: `TCP_NODELAY` and keepalive set on
/// every accepted socket, each handed on once its preface has arrived (see the module doc).
pub fn incoming(listener: tokio::net::TcpListener) -> ReceiverStream<std::io::Result<TcpStream>> {
    incoming_with(listener, HANDSHAKE_TIMEOUT)
}

/// `incoming` with another handshake deadline (tests).
fn incoming_with(
    listener: tokio::net::TcpListener,
    handshake_timeout: Duration,
) -> ReceiverStream<std::io::Result<TcpStream>> {
    let (ready, accepted) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            if let Err(e) =
                stream.set_nodelay(true).and_then(|()| socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive))
            {
                tracing::warn!("connection from {remote}: socket options not set: {e}");
            }
            let ready = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, preface_arrived(&stream)).await {
                    Ok(Ok(())) => {
                        let _ = ready.send(Ok(stream)).await;
                    }
                    Ok(Err(_)) => {} // closed before its preface: nothing to serve
                    Err(_) => tracing::warn!(
                        "connection from {remote}: no HTTP/2 preface within {} ms: closed",
                        handshake_timeout.as_millis()
                    ),
                }
            });
        }
    });
    ReceiverStream::new(accepted)
}

/// Resolves once `stream` has `PREFACE_BYTES` waiting (peeked, not read: the server reads them).
async fn preface_arrived(stream: &TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; PREFACE_BYTES];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n >= PREFACE_BYTES {
            return Ok(());
        }
        // Part of it: peek would return at once again; look again shortly.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// The host's own listener path must hand out sockets with Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = incoming(listener);
        let mut client = tokio::net::TcpStream::connect(address).await.expect("connect");
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
        let accepted = incoming.next().await.expect("one connection").expect("accepted");
        assert!(accepted.nodelay().expect("read TCP_NODELAY"), "an accepted socket must have TCP_NODELAY");
    }

    /// A connection that sends half a preface and then nothing is never handed to the server
    /// (a whole one, sent after it, is).
    #[tokio::test]
    async fn half_a_preface_is_never_served() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let deadline = Duration::from_millis(300);
        let mut incoming = incoming_with(listener, deadline);
        let mut stalled = tokio::net::TcpStream::connect(address).await.expect("connect");
        stalled.write_all(b"PRI * HTTP/2.0").await.expect("half a preface");
        let mut whole = tokio::net::TcpStream::connect(address).await.expect("connect");
        whole.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
        let first = incoming.next().await.expect("a connection").expect("accepted");
        assert_eq!(
            first.peer_addr().expect("peer"),
            whole.local_addr().expect("local"),
            "only the whole preface is served"
        );
        let next = tokio::time::timeout(deadline * 3, incoming.next()).await;
        assert!(next.is_err(), "the half preface must never be handed on");
        // The host closed it: the stalled client reads end-of-stream.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), stalled.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed after the handshake timeout: {read:?}");
    }
}
