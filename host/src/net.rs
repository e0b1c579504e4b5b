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
//! - Admission (`admission`): a connection needs a handshake slot to be accepted and a
//!   connection slot once its handshake is done; one that has read nothing for the idle timeout
//!   is closed (`Accepted::poll_read`), giving its slot back.
//! - HTTP/2 flow-control windows large enough for the largest value (1 MiB) and a batch of peer
//!   envelopes to be in flight without waiting for a WINDOW_UPDATE round trip, and frames larger
//!   than the 16 KB default so a large value is not cut into dozens of frames.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Endpoint, Server};
use waxos_proto::tls::{CertIdentity, Dialer};

use crate::admission::{Admission, ConnectionSlot};
use crate::tls::{Caller, ConnInfo};

/// Per-stream HTTP/2 window, in bytes: one 1 MiB value plus framing, with room to spare.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// Per-connection HTTP/2 window, in bytes: several large requests on one connection at once.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept, in bytes (the protocol's default is 16 KiB).
pub const FRAME_BYTES_MAX: u32 = 256 << 10;
/// TCP keepalive on accepted sockets: a peer that vanished without a FIN is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// How often the server pings a connection's client, and how long it waits for the answer.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Closed when nothing has been read for this long.
    idle_timeout: Duration,
    last_read: Instant,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Held for as long as the connection lives (None until it is established).
    _slot: Option<ConnectionSlot>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Accepted {
    fn new(stream: Stream, read_ahead: Vec<u8>, info: ConnInfo) -> Accepted {
        let idle_timeout = crate::admission::DEFAULT_IDLE_TIMEOUT;
        Accepted {
            stream,
            read_ahead,
            read_ahead_pos: 0,
            info,
            idle_timeout,
            last_read: Instant::now(),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: None,
        }
    }

    /// Starts its idle clock with `idle_timeout` and makes it hold `slot`.
    fn establish(mut self, slot: ConnectionSlot, idle_timeout: Duration) -> Accepted {
        self.idle_timeout = idle_timeout;
        self.last_read = Instant::now();
        let deadline = tokio::time::Instant::from_std(self.last_read + idle_timeout);
        self.idle.as_mut().reset(deadline);
        self._slot = Some(slot);
        self
    }

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
        let filled = buf.filled().len();
        let read = match &mut this.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > filled => {
                this.last_read = Instant::now();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => loop {
                // Nothing to read: the idle clock wakes this task when it runs out. It is
                // moved on lazily (only when it fires), not at every read.
                match this.idle.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if this.last_read.elapsed() >= this.idle_timeout => {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("nothing received for {} s: idle connection closed", this.idle_timeout.as_secs()),
                        )));
                    }
                    Poll::Ready(()) => {
                        let deadline = tokio::time::Instant::from_std(this.last_read + this.idle_timeout);
                        this.idle.as_mut().reset(deadline);
                    }
                }
            },
            other => other,
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
/// every accepted socket, each admitted (`admission`), and handed on once its TLS handshake
/// (unless `tls` is None: `--insecure`) and its preface are done (see the module doc).
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    admission: Arc<Admission>,
) -> ReceiverStream<std::io::Result<Accepted>> {
    incoming_with(listener, tls, admission, HANDSHAKE_TIMEOUT)
}

/// `incoming` with another handshake deadline (tests).
fn incoming_with(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    admission: Arc<Admission>,
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
                    admission.log_refusal(format_args!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handshake_slot = match admission.begin_handshake(remote.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    admission.log_refusal(format_args!("connection from {remote} refused: {why}"));
                    drop(stream);
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
            let admission = Arc::clone(&admission);
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(handshake_timeout, handshake(stream, remote, acceptor)).await;
                drop(handshake_slot);
                match handshake {
                    Ok(Ok(accepted)) => {
                        let member =
                            matches!(&accepted.info.caller, Caller::Certified(identity) if identity.member.is_some());
                        match admission.establish(member) {
                            Ok(slot) => {
                                let idle_timeout = admission.limits().idle_timeout;
                                let _ = ready.send(Ok(accepted.establish(slot, idle_timeout))).await;
                            }
                            Err(why) => admission.log_refusal(format_args!(
                                "connection from {remote} ({}) refused: {why}",
                                accepted.info.caller
                            )),
                        }
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {} // closed: nothing to serve
                    Ok(Err(e)) => {
                        admission.log_refusal(format_args!("connection from {remote}: handshake failed ({e}): closed"))
                    }
                    Err(_) => admission.log_refusal(format_args!(
                        "connection from {remote}: no TLS handshake and HTTP/2 preface within {} ms: closed",
                        handshake_timeout.as_millis()
                    )),
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
        return Ok(Accepted::new(Stream::Plain(stream), Vec::new(), info));
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
    Ok(Accepted::new(Stream::Tls(Box::new(tls)), preface, info))
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
        // A peer gone without a FIN or RST is noticed within 40 s and its slot given back.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
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

    use crate::admission::Limits;

    fn roomy() -> Arc<Admission> {
        Admission::new(Limits::for_descriptors(4096, 1024))
    }

    fn tight(clients: usize, handshakes: usize, idle_timeout: Duration) -> Arc<Admission> {
        Admission::new(Limits { handshakes, handshakes_per_source: handshakes, members: 1, clients, idle_timeout })
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// Reads until end-of-stream or an error (closed by the host), or times out (still open).
    async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut byte = [0u8; 64];
        loop {
            match tokio::time::timeout(wait, stream.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Beyond the client cap, an established connection is closed at once; a slot given back
    /// (its connection dropped) admits the next.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_a_freed_slot_is_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = incoming(listener, None, tight(2, 8, Duration::from_secs(60)));
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..2 {
            let mut client = tokio::net::TcpStream::connect(address).await.expect("connect");
            client.write_all(PREFACE).await.expect("preface");
            held.push(incoming.next().await.expect("served").expect("accepted"));
            clients.push(client);
        }
        let mut third = tokio::net::TcpStream::connect(address).await.expect("connect");
        third.write_all(PREFACE).await.expect("preface");
        assert!(closed_within(&mut third, Duration::from_secs(2)).await, "a third connection must be closed");
        held.pop();
        let mut fourth = tokio::net::TcpStream::connect(address).await.expect("connect");
        fourth.write_all(PREFACE).await.expect("preface");
        let admitted = tokio::time::timeout(Duration::from_secs(2), incoming.next()).await;
        assert!(matches!(admitted, Ok(Some(Ok(_)))), "the freed slot admits the next connection");
    }

    /// Silent connections can hold only the handshake slots: one beyond them is closed at once,
    /// without waiting for the handshake deadline.
    #[tokio::test]
    async fn silent_connections_hold_only_the_handshake_slots() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let _incoming = incoming(listener, None, tight(8, 3, Duration::from_secs(60)));
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut one_more = tokio::net::TcpStream::connect(address).await.expect("connect");
        assert!(
            closed_within(&mut one_more, Duration::from_secs(2)).await,
            "beyond the handshake slots: closed at once"
        );
        assert!(
            !closed_within(&mut silent[0], Duration::from_millis(200)).await,
            "the first ones wait for the deadline"
        );
    }

    /// An established connection on which nothing arrives is closed after the idle timeout;
    /// one that keeps sending is not.
    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let idle_timeout = Duration::from_millis(400);
        let mut incoming = incoming(listener, None, tight(4, 4, idle_timeout));
        let mut quiet = tokio::net::TcpStream::connect(address).await.expect("connect");
        quiet.write_all(PREFACE).await.expect("preface");
        let mut busy = tokio::net::TcpStream::connect(address).await.expect("connect");
        busy.write_all(PREFACE).await.expect("preface");
        // Read each server side the way a server does: until it ends, counting what arrived.
        let mut ends = Vec::new();
        for _ in 0..2 {
            let mut accepted = incoming.next().await.expect("served").expect("accepted");
            ends.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 256];
                let started = Instant::now();
                loop {
                    match accepted.read(&mut buf).await {
                        Ok(0) => return (started.elapsed(), "eof".to_string()),
                        Ok(_) => continue,
                        Err(e) => return (started.elapsed(), e.kind().to_string()),
                    }
                }
            }));
        }
        for _ in 0..8 {
            tokio::time::sleep(idle_timeout / 4).await;
            busy.write_all(b"x").await.expect("busy writes");
        }
        // After 2 idle timeouts the quiet one has ended with a timeout; the busy one has not.
        let mut finished = Vec::new();
        for end in ends {
            if end.is_finished() {
                finished.push(end.await.expect("reader"));
            }
        }
        assert_eq!(finished.len(), 1, "exactly the quiet connection ended: {finished:?}");
        assert_eq!(finished[0].1, std::io::ErrorKind::TimedOut.to_string(), "{finished:?}");
        assert!(finished[0].0 >= idle_timeout, "not before the idle timeout: {finished:?}");
        drop(quiet);
    }

    /// The host's own listener path must hand out sockets with Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = incoming(listener, None, roomy());
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
        let mut incoming = incoming_with(listener, None, roomy(), deadline);
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
