//! Caps on what the gRPC listener accepts: how many connections are open at once, and (with
//! TLS) how many handshakes run at once.
//!
//! Each accepted connection holds a permit of the connection cap for as long as it is open: the
//! permit travels inside the stream tonic serves ([`Limited`]) and is returned when hyper drops
//! the connection. A connection accepted while the cap is reached is closed at once, without a
//! byte of HTTP/2, rather than left waiting: the client sees the connection end and can retry
//! (another replica, behind a load balancer), instead of hanging in the kernel's backlog until
//! its own deadline, and the accept loop keeps draining the backlog, so a flood costs one
//! `accept` and one `close` per connection. The handshake cap works the same way (see
//! [`super::tls`]).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::coalesce::CoalescedWrites;

use crate::obs::metrics::{Counter, Family, MetricSet, Zeros};

crate::label! {
    /// Which cap closed a connection, as the `cap` label.
    pub enum Cap: "cap" {
        /// `server.max_connections`.
        Connections = "connections",
        /// `server.max_tls_handshakes`.
        Handshakes = "handshakes",
    }
}

/// The listener's metrics.
#[derive(Debug)]
pub struct ListenerMetrics {
    /// `tokenbroker_connections_refused_total{cap}`.
    pub refused: Family<Counter, Cap>,
}

impl Default for ListenerMetrics {
    fn default() -> Self {
        Self {
            refused: Family::new(
                "tokenbroker_connections_refused_total",
                "Connections the gRPC listener closed at once because a cap was reached, by cap.",
                Zeros::Show,
            ),
        }
    }
}

impl MetricSet for ListenerMetrics {
    fn render(&self, out: &mut String) {
        self.refused.render(out);
    }
}

/// The listener's caps, shared by the accept loop and the connections it hands out.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    tcp_keepalive: Duration,
    metrics: Arc<ListenerMetrics>,
}

impl ConnectionLimits {
    /// At most `max_connections` open connections and `max_handshakes` TLS handshakes in
    /// progress, TCP keepalive after `tcp_keepalive` of quiet on each; connections closed at a
    /// cap are counted in `metrics`.
    pub fn new(
        max_connections: usize,
        max_handshakes: usize,
        tcp_keepalive: Duration,
        metrics: Arc<ListenerMetrics>,
    ) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            tcp_keepalive,
            metrics,
        }
    }

    /// Accepts the next connection, with `TCP_NODELAY` and TCP keepalive set. A peer that
    /// vanishes without a FIN (a crashed host, a dropped NAT entry) is then noticed by the
    /// kernel, even on a connection too quiet for HTTP/2 pings to matter.
    pub(crate) async fn accept(&self, listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
        let (tcp, peer) = accept(listener).await;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.tcp_keepalive)
            .with_interval(self.tcp_keepalive);
        if let Err(err) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            debug!(%peer, error = %err, "cannot set TCP keepalive");
        }
        (tcp, peer)
    }

    /// A permit for one more open connection, or `None` (counted, and a debug log) at the cap.
    pub fn admit_connection(&self, peer: std::net::SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.connections).try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.refused.get(Cap::Connections).inc();
            debug!(%peer, "connection cap reached (server.max_connections); closing the connection");
        }
        permit
    }

    /// A permit for one more handshake in progress, or `None` (counted, and a debug log) at
    /// the cap.
    pub fn admit_handshake(&self, peer: std::net::SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.handshakes).try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.refused.get(Cap::Handshakes).inc();
            debug!(%peer, "handshake cap reached (server.max_tls_handshakes); closing the connection");
        }
        permit
    }
}

/// The accepted connections an accept loop hands to tonic.
pub type Incoming<IO> = ReceiverStream<io::Result<Limited<IO>>>;

/// A connection that holds its permit of the connection cap until it is dropped, and whose
/// writes are coalesced (see [`CoalescedWrites`]).
#[derive(Debug)]
pub struct Limited<IO> {
    io: CoalescedWrites<IO>,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Limited<IO> {
    /// Wraps `io`, which keeps `permit` for as long as it lives.
    pub fn new(io: IO, permit: OwnedSemaphorePermit) -> Self {
        Self {
            io: CoalescedWrites::new(io),
            _permit: permit,
        }
    }
}

impl<IO: Connected> Connected for Limited<IO> {
    // The inner stream's, so `Request::remote_addr` and `Request::peer_certs` work unchanged.
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts a TCP connection on `listener`, waiting out accept errors (out of file descriptors
/// and the like) rather than spinning, with `TCP_NODELAY` set: gRPC's small frames must not
/// wait for Nagle.
async fn accept(listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                if let Err(err) = tcp.set_nodelay(true) {
                    debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                }
                return (tcp, peer);
            }
            Err(err) => {
                warn!(error = %err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts plaintext connections on `listener` under the connection cap. The returned task
/// ends when the stream is dropped (abort it to free the listener sooner).
pub fn plain_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> (Incoming<TcpStream>, JoinHandle<()>) {
    let (ready, incoming) = mpsc::channel(64);
    let accept_loop = tokio::spawn(async move {
        while !ready.is_closed() {
            let (tcp, peer) = limits.accept(&listener).await;
            // Over the cap the connection is dropped here, which closes it.
            let Some(permit) = limits.admit_connection(peer) else {
                continue;
            };
            if ready.send(Ok(Limited::new(tcp, permit))).await.is_err() {
                break;
            }
        }
    });
    (ReceiverStream::new(incoming), accept_loop)
}
