//! Serves the HTTP adapter's routes on accepted connections: HTTP/1.1 and HTTP/2 (by ALPN over
//! TLS, by the client's preface in plaintext), on hyper, on the broker's runtime.
//!
//! The listener (the application's, with its connection and handshake caps and its TLS) hands
//! over each connection with its [`Peer`]. A connection lives at most `max_connection_age`,
//! then is drained (HTTP/1.1: closed after the answer in progress; HTTP/2: GOAWAY). At
//! shutdown every connection is drained the same way and given `shutdown_grace` to finish.

use std::{convert::Infallible, io, time::Duration};

use axum::{Router, body::Body, extract::Request};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    task::JoinSet,
};
use tokio_stream::{Stream, StreamExt as _};
use tower_service::Service as _;
use tracing::{debug, info, warn};

use super::Peer;

/// The per-connection limits, from `[server]` and `[http]`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may open and reset before they are accepted.
    pub max_pending_reset_streams: usize,
    /// HTTP/2 streams the server may reset for protocol errors before it closes the connection.
    pub max_local_error_reset_streams: usize,
    /// HTTP/2 PING interval on an idle connection.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// Longest a connection lives before it is drained.
    pub max_connection_age: Duration,
    /// How long draining connections get at shutdown.
    pub shutdown_grace: Duration,
}

/// Serves `router` on every connection `incoming` yields until `shutdown` resolves, then
/// drains the open connections for at most `options.shutdown_grace`.
pub async fn serve<IO>(
    incoming: impl Stream<Item = io::Result<(IO, Peer)>>,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(16 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_pending_accept_reset_streams(options.max_pending_reset_streams)
        .max_local_error_reset_streams(options.max_local_error_reset_streams)
        .keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .max_header_list_size(16 * 1024);
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let incoming = std::pin::pin!(incoming);
    let mut incoming = incoming;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            next = incoming.next() => match next {
                Some(Ok((io, peer))) => {
                    let connection = connection(builder.clone(), io, peer, router.clone(), options.max_connection_age, stopping.clone());
                    connections.spawn(connection);
                }
                Some(Err(err)) => debug!(error = %err, "http connection not accepted"),
                None => break,
            },
        }
    }
    let _ = stop.send(true);
    let open = connections.len();
    if open > 0 {
        info!(open, "draining http connections");
    }
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            grace_seconds = options.shutdown_grace.as_secs(),
            "http calls still running after the grace period; stopping anyway"
        );
        connections.abort_all();
    }
}

/// Serves one connection until it ends, it reaches its maximum age, or the server stops; the
/// last two drain it.
async fn connection<IO>(
    builder: auto::Builder<TokioExecutor>,
    io: IO,
    peer: Peer,
    router: Router,
    max_age: Duration,
    mut stopping: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(peer.clone());
        let mut router = router.clone();
        async move { Ok::<_, Infallible>(router.call(request).await.unwrap_or_else(|e| match e {})) }
    });
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let aged = tokio::time::sleep(max_age);
    tokio::select! {
        result = connection.as_mut() => {
            finished(addr, result);
            return;
        }
        () = aged => {}
        _ = stopping.wait_for(|stop| *stop) => {}
    }
    connection.as_mut().graceful_shutdown();
    finished(addr, connection.await);
}

fn finished(
    addr: Option<std::net::SocketAddr>,
    result: Result<(), Box<dyn std::error::Error + Send + Sync>>,
) {
    if let Err(err) = result {
        debug!(peer = ?addr, error = %err, "http connection ended with an error");
    }
}
