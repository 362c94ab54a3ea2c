//! The HTTP/1 accept loop: what happens to a TCP connection before a request reaches the
//! router, and until it upgrades to a WebSocket.
//!
//! Two limits protect the server from clients that connect and never finish a request
//! (slowloris) and from connection floods:
//!
//! - **Header read timeout** (`HEADER_READ_TIMEOUT_SECS`): a connection must deliver a whole
//!   request head within this time of connecting, and again within this time of each
//!   response on a kept-alive connection, or it is closed (hyper's `header_read_timeout`,
//!   which needs a timer: `axum::serve` sets none, so before this loop there was no limit).
//! - **Pending cap** (`MAX_PENDING_CONNECTIONS`): at most this many connections may be in
//!   their HTTP phase (connecting, sending a request, waiting for the answer, kept alive
//!   between requests). Each holds a permit from accept until hyper hands the socket to the
//!   WebSocket session (the connection future ends at the upgrade) or the connection closes.
//!   Past the cap a new connection gets a bare 503 written without waiting and is closed,
//!   counted in `duplex_connections_rejected_total{reason="pending"}`. Sessions past their
//!   upgrade hold no permit, so a flood of half-open connections cannot touch them (their
//!   own caps are `MAX_CONNECTIONS` and `MAX_CONNECTIONS_PER_IP`, in `http`).
//!
//! Shutdown: the loop stops accepting at once; connections in their HTTP phase finish the
//! request in flight (hyper's graceful shutdown) and the loop returns when they are closed.
//! Upgraded sessions are not waited for here (`Server::wait` drains them).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Metrics;

/// The answer to a connection past the pending cap: complete, so a client that reads it sees
/// why, and small enough to fit any socket buffer (it is written without waiting).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 38\r\n\r\ntoo many connections; retry in a while\n";

/// After an accept error other than a client's aborted connection (the process is out of file
/// descriptors, say) the loop waits this long rather than spinning on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Limits of the HTTP phase of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EdgeLimits {
    pub header_read_timeout: Duration,
    pub max_pending: usize,
}

/// Serves `router` on `listener` until `shutdown`, then waits for connections still in their
/// HTTP phase.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: EdgeLimits,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let pending = Arc::new(Semaphore::new(limits.max_pending));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            metrics
                .connections_rejected
                .with_label_values(&["pending"])
                .inc();
            // Never wait on a client here: what does not fit is dropped with the socket.
            let _ = tcp.try_write(REFUSED);
            continue;
        };
        // 20 ms audio frames must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            serve_connection(tcp, peer, router, limits, stop).await;
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One connection's HTTP phase: requests until it closes or upgrades.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: EdgeLimits,
    stop: CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // What `into_make_service_with_connect_info` would insert: handlers read the peer.
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move {
            let res: Result<_, Infallible> = tower_service::Service::call(&mut router, req).await;
            res
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Timeouts, resets and malformed requests: the client's business, not an incident.
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Errors of one aborted connection, after which accepting goes on at once (as in
/// `axum::serve`).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}
