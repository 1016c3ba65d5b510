//! Accepting TCP connections and serving HTTP on them, for both the HTTP
//! listener and the TLS port.
//!
//! Two limits keep slow or idle clients from holding the server: a cap on
//! connections held at once (beyond it a new connection is closed at
//! accept and counted), and a deadline for each request's head — a client
//! that opens a connection and sends nothing, or trickles its headers a
//! byte at a time (slow-loris), is closed when it passes. A WebSocket,
//! once upgraded, is no longer an HTTP request and has deadlines of its
//! own (see `tcp`).

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;
use tracing::{debug, warn};

/// The remote address of an HTTP or TLS connection (for `ConnectInfo`).
#[derive(Clone, Copy, Debug)]
pub struct Remote(pub SocketAddr);

/// Default time a client has to send a request's head (request line and
/// headers), counted from when the server starts waiting for it (so an
/// idle keep-alive connection is closed after as long).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on connections the HTTP listener holds at once. Long-polls
/// and WebSockets forwarded by a front each hold one, so it sits above
/// the wait and WebSocket caps.
pub const MAX_HTTP_CONNS: usize = 25_000;

/// Counters of one listener's door (names as in `/healthz` and, prefixed
/// by the listener's name, in `/metrics`).
#[derive(Debug, Default)]
pub struct DoorStats {
    /// Connections accepted and given a slot.
    pub accepted: AtomicU64,
    /// Connections closed at accept: the cap was reached.
    pub refused_full: AtomicU64,
    /// Connections closed because a request's head did not arrive in time.
    pub header_timeouts: AtomicU64,
}

impl DoorStats {
    /// Every counter with its name and help text.
    pub fn list(&self) -> [(&'static str, &'static str, u64); 3] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", "TCP connections accepted", g(&self.accepted)),
            (
                "refused_full",
                "TCP connections closed at accept: the connection cap was reached",
                g(&self.refused_full),
            ),
            (
                "header_timeouts",
                "Connections closed: a request's head did not arrive in time",
                g(&self.header_timeouts),
            ),
        ]
    }
}

/// One listener's limits and counters.
#[derive(Debug)]
pub struct Door {
    slots: Arc<Semaphore>,
    max: usize,
    /// How long a request's head may take.
    pub header_timeout: Duration,
    /// Counters.
    pub stats: DoorStats,
}

impl Door {
    /// Room for `max` connections at once, each request head within
    /// `header_timeout`.
    pub fn new(max: usize, header_timeout: Duration) -> Arc<Self> {
        Arc::new(Door {
            slots: Arc::new(Semaphore::new(max)),
            max,
            header_timeout,
            stats: DoorStats::default(),
        })
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Accepts on `listener` until the task is aborted, handing each
/// connection within the cap, with its slot, to `handle` on a task of its
/// own.
pub(crate) async fn accept_loop<H, F>(listener: TcpListener, door: Arc<Door>, handle: H)
where
    H: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off.
                warn!("TCP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = door.slots.clone().try_acquire_owned() else {
            door.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, "connection cap reached; connection closed");
            continue;
        };
        door.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        tokio::spawn(handle(tcp, remote, slot));
    }
}

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends; the
/// handlers see the client's address as `ConnectInfo<Remote>`. `io`
/// carries its slot, so an upgraded connection keeps it.
pub(crate) async fn serve_http<I>(io: I, remote: SocketAddr, app: Router, door: &Door)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = app.map_request(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(Remote(remote)));
        req.map(Body::new)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(door.header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
        .with_upgrades();
    if let Err(e) = conn.await {
        if e.is_timeout() {
            door.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, "request head not received in time; connection closed");
        } else {
            debug!(%remote, "HTTP connection ended: {e}");
        }
    }
}

/// A stream that holds a connection slot while it lives.
pub struct Slotted<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
}

impl<S> Slotted<S> {
    /// `inner`, holding `slot` until dropped.
    pub fn new(inner: S, slot: OwnedSemaphorePermit) -> Self {
        Slotted { inner, _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Slotted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Slotted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
