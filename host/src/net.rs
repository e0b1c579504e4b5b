//! Socket and HTTP/2 settings for every connection the host accepts or opens.
//!
//! One place, so that no path (client, peer, admin, registration) can miss them again:
//! - `TCP_NODELAY` on every socket. Without it, a response of roughly 300 B to 8 KB sits in the
//!   kernel until the peer's delayed ACK (Nagle's algorithm), ≈ 40 ms per request. tonic sets it
//!   only on listeners it binds itself; the host binds its own listener (so the port is known and
//!   logged before serving), so it must set it on each accepted stream — `incoming` does.
//! - TLS (`tls`): the handshake is done here, not by tonic, so that it shares the deadline below
//!   and what the client's certificate proves travels with the connection (`tls::ConnInfo`).
//! - A handshake deadline: an accepted connection is handed to the gRPC server only once it has
//!   finished its TLS handshake and sent the 24 bytes of an HTTP/2 client preface, within
//!   `HANDSHAKE_TIMEOUT`; one that sends half a preface (or half a handshake) and then nothing
//!   is closed then (it held a socket and a task for ever).
//! - HTTP/2 flow-control windows large enough for the largest value (1 MiB) and a batch of peer
//!   envelopes to be in flight without waiting for a WINDOW_UPDATE round trip, and frames larger
//!   than the 16 KB default so a large value is not cut into dozens of frames.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Endpoint, Server};
use waxos_proto::tls::{CertIdentity, Dialer};

use crate::tls::{Caller, ConnInfo};

/// Per-stream HTTP/2 window, in bytes: one 1 MiB value plus framing, with room to spare.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// Per-connection HTTP/2 window, in bytes: several large requests on one connection at once.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept, in bytes (the protocol's default is 16 KiB).
pub const FRAME_BYTES_MAX: u32 = 256 << 10;
/// TCP keepalive on accepted sockets: a peer that vanished without a FIN is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// How long an accepted connection may take to finish its TLS handshake and send its HTTP/2
/// client preface.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_BYTES: usize = 24;

/// An accepted connection, handshake done: plaintext or TLS, with the preface bytes already
/// read from a TLS stream replayed to the server first, and who is at the other end.
pub struct Accepted {
    stream: Stream,
    /// Bytes read ahead (the preface of a TLS connection), not yet handed to the server.
    read_ahead: Vec<u8>,
    read_ahead_pos: usize,
    info: ConnInfo,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Accepted {
    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Who is at the other end.
    pub fn caller(&self) -> &Caller {
        &self.info.caller
    }
}

impl Connected for Accepted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read_ahead_pos < this.read_ahead.len() {
            let rest = &this.read_ahead[this.read_ahead_pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read_ahead_pos += n;
            if this.read_ahead_pos == this.read_ahead.len() {
                this.read_ahead = Vec::new();
                this.read_ahead_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The accepted-connection stream for `serve_with_incoming`: `TCP_NODELAY` and keepalive set on
/// every accepted socket, each handed on once its TLS handshake (unless `tls` is None:
/// `--insecure`) and its preface are done (see the module doc).
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> ReceiverStream<std::io::Result<Accepted>> {
    incoming_with(listener, tls, HANDSHAKE_TIMEOUT)
}

/// `incoming` with another handshake deadline (tests).
fn incoming_with(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
) -> ReceiverStream<std::io::Result<Accepted>> {
    let (ready, accepted) = tokio::sync::mpsc::channel(256);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
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
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, handshake(stream, remote, acceptor)).await {
                    Ok(Ok(accepted)) => {
                        let _ = ready.send(Ok(accepted)).await;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {} // closed: nothing to serve
                    Ok(Err(e)) => tracing::warn!("connection from {remote}: handshake failed ({e}): closed"),
                    Err(_) => tracing::warn!(
                        "connection from {remote}: no TLS handshake and HTTP/2 preface within {} ms: closed",
                        handshake_timeout.as_millis()
                    ),
                }
            });
        }
    });
    ReceiverStream::new(accepted)
}

/// TLS (when configured), then the HTTP/2 preface.
async fn handshake(
    stream: TcpStream,
    remote: std::net::SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<Accepted> {
    let Some(acceptor) = acceptor else {
        preface_arrived(&stream).await?;
        let info = ConnInfo { remote: Some(remote), caller: Caller::Insecure };
        return Ok(Accepted { stream: Stream::Plain(stream), read_ahead: Vec::new(), read_ahead_pos: 0, info });
    };
    let mut tls = acceptor.accept(stream).await?;
    let caller = match tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()) {
        // Verified against the CA by the handshake; what it names is read here.
        Some(cert) => Caller::Certified(
            CertIdentity::from_der(cert).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        ),
        None => Caller::Anonymous,
    };
    let mut preface = vec![0u8; PREFACE_BYTES];
    tls.read_exact(&mut preface).await?;
    let info = ConnInfo { remote: Some(remote), caller };
    Ok(Accepted { stream: Stream::Tls(Box::new(tls)), read_ahead: preface, read_ahead_pos: 0, info })
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

/// An outbound endpoint (to a peer or the coordinator) with the same settings as the server's,
/// dialled the host's way (TLS with its member certificate, or `--insecure`).
pub fn endpoint(
    dialer: &Dialer,
    address: &str,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    Ok(dialer
        .endpoint(address)?
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
        let mut incoming = incoming(listener, None);
        let mut client = tokio::net::TcpStream::connect(address).await.expect("connect");
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
        let accepted = incoming.next().await.expect("one connection").expect("accepted");
        assert!(accepted.tcp().nodelay().expect("read TCP_NODELAY"), "an accepted socket must have TCP_NODELAY");
    }

    /// A connection that sends half a preface and then nothing is never handed to the server
    /// (a whole one, sent after it, is).
    #[tokio::test]
    async fn half_a_preface_is_never_served() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let deadline = Duration::from_millis(300);
        let mut incoming = incoming_with(listener, None, deadline);
        let mut stalled = tokio::net::TcpStream::connect(address).await.expect("connect");
        stalled.write_all(b"PRI * HTTP/2.0").await.expect("half a preface");
        let mut whole = tokio::net::TcpStream::connect(address).await.expect("connect");
        whole.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
        let first = incoming.next().await.expect("a connection").expect("accepted");
        assert_eq!(
            first.tcp().peer_addr().expect("peer"),
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
