//! The TCP channel: signaling and relay over WebSocket, for agents whose
//! UDP is blocked or who reach the server through an HTTPS-only front.
//!
//! Two listeners accept the WebSocket at `/ws`: the TCP port (`--tcp-listen`,
//! TLS with the server's own certificate) and the plain HTTP listener
//! (`--http`), which a TLS-terminating front (Cloud Run, an ingress, nginx)
//! forwards to. Over the WebSocket run the same signaling messages as over
//! QUIC and the same relay frames as over UDP (see `punch_protocol::ws`);
//! a relay session may have one side on UDP and the other on TCP.

use crate::metrics::inc;
use crate::serving::{self, Remote, Slotted};
use crate::signal::{self, Arrival, Closer, Incoming, Link, ReadEnd};
use crate::Shared;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use punch_protocol::relay::{Action, Endpoint};
use punch_protocol::signal::{ClientMsg, ErrorCode, ServerMsg, Transport};
use punch_protocol::ws::{self, WsAuth, WsFrame};
use punch_protocol::MIN_PROTOCOL_VERSION;
use rand::RngCore;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

/// Time a TCP client has for its TLS handshake, and an agent for its
/// WebSocket handshake messages.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a client that takes longer than this ends its channel (a
/// client that never reads must not hold the server's memory).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Relay frames queued for one client before new ones are dropped (UDP
/// semantics: QUIC backs off).
const RELAY_QUEUE: usize = 1024;
/// Why reading stopped when the client simply went away.
const CLIENT_CLOSED: &str = "closed by the client";
/// Signaling messages queued for one client.
const SIGNAL_QUEUE: usize = 64;

mod clients;
pub use clients::{TcpClients, TcpStats};

/// Serves the TLS port until the task is aborted: the WebSocket at `/ws`
/// and `/healthz`. Each connection's TLS handshake runs on its own task (a
/// client that stalls it holds only that task and its slot, for at most
/// the handshake timeout), then HTTP with the door's head deadline.
pub async fn serve_tls(listener: TcpListener, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    let app = Router::new()
        .route(ws::PATH, get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let door = shared.tcp.door.clone();
    serving::accept_loop(listener, door.clone(), move |tcp, remote, slot| {
        let (acceptor, app, door, clients) = (
            acceptor.clone(),
            app.clone(),
            door.clone(),
            shared.tcp.clone(),
        );
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    serving::serve_http(Slotted::new(tls, slot), remote, app, &door).await;
                }
                // Closed before a hello: an agent whose QUIC handshake
                // answered first drops the TCP connection it opened beside it.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    clients.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                    debug!(%remote, "closed before its TLS handshake: {e}");
                }
                Ok(Err(e)) => {
                    clients.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(%remote, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    clients.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(%remote, "TLS handshake timed out");
                }
            }
        }
    })
    .await;
}

/// `GET /ws`: upgrades to the agent channel (on either listener).
pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(Remote(remote)): ConnectInfo<Remote>,
    headers: HeaderMap,
    up: WebSocketUpgrade,
) -> Response {
    let Ok(slot) = shared.tcp.slots.clone().try_acquire_owned() else {
        shared
            .tcp
            .stats
            .refused_full
            .fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many TCP clients\n").into_response();
    };
    // Behind a front the TCP peer is the front; the client is named in
    // X-Forwarded-For (shown only, never trusted for anything).
    let observed = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 0))
        .unwrap_or(remote);
    up.max_message_size(ws::MAX_MESSAGE)
        .read_buffer_size(ws::READ_BUFFER)
        .max_frame_size(ws::MAX_MESSAGE)
        .on_failed_upgrade(|e| debug!("WebSocket upgrade failed: {e}"))
        .on_upgrade(move |socket| async move {
            let conn_id = signal::next_conn_id();
            channel(socket, conn_id, punch_net::canonical(observed), shared)
                .instrument(info_span!("ws", conn_id, %remote))
                .await;
            drop(slot);
        })
}

/// The agent's end of a WebSocket channel, for the signaling session.
pub(crate) struct WsLink {
    sig: Option<mpsc::Sender<Message>>,
    writer: Option<tokio::task::JoinHandle<()>>,
    done: watch::Receiver<Option<String>>,
    kick: Arc<Notify>,
}

impl Link for WsLink {
    async fn send(&mut self, m: &ServerMsg) -> Result<(), String> {
        self.send_raw(ws::encode_signal(m)).await
    }

    async fn refuse(&mut self, code: ErrorCode, message: String) {
        warn!(code = code.as_str(), "refusing agent: {message}");
        let m = ServerMsg::Error {
            req: None,
            code,
            message,
        };
        let _ = self.send_raw(ws::encode_signal(&m)).await;
        self.finish().await;
    }

    async fn closed(&self) -> String {
        let mut done = self.done.clone();
        tokio::select! {
            _ = self.kick.notified() => "replaced by a new connection".into(),
            _ = done.wait_for(|d| d.is_some()) => self.reason(),
        }
    }
}

impl WsLink {
    async fn send_raw(&mut self, payload: Vec<u8>) -> Result<(), String> {
        let tx = self.sig.as_ref().ok_or("channel closing")?;
        tx.send(Message::Binary(payload.into()))
            .await
            .map_err(|_| self.reason())
    }

    fn reason(&self) -> String {
        self.done
            .borrow()
            .clone()
            .unwrap_or_else(|| "channel closed".into())
    }

    /// Lets the writer deliver what is queued, say goodbye and stop.
    pub(crate) async fn finish(&mut self) {
        self.sig.take();
        if let Some(w) = self.writer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
        }
    }
}

/// Writes signaling messages (first) and relay frames to the socket,
/// batching what is queued into one flush.
async fn writer(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut sig: mpsc::Receiver<Message>,
    mut relay: mpsc::Receiver<Bytes>,
    done: watch::Sender<Option<String>>,
) {
    let reason = loop {
        let first = tokio::select! {
            biased;
            m = sig.recv() => match m {
                Some(m) => m,
                None => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        sink.send(Message::Close(Some(CloseFrame { code: 1000, reason: "bye".into() }))),
                    )
                    .await;
                    break "server closed the channel".to_string();
                }
            },
            f = relay.recv() => match f {
                Some(f) => Message::Binary(f),
                None => break "server closed the channel".to_string(),
            },
        };
        let batch = async {
            sink.feed(first).await?;
            for _ in 0..64 {
                let next = match sig.try_recv() {
                    Ok(m) => m,
                    Err(_) => match relay.try_recv() {
                        Ok(f) => Message::Binary(f),
                        Err(_) => break,
                    },
                };
                sink.feed(next).await?;
            }
            sink.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, batch).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break format!("write failed: {e}"),
            Err(_) => break "client does not read (write timed out)".to_string(),
        }
    };
    debug!("writer stopped: {reason}");
    done.send_replace(Some(reason));
}

/// A token bucket over bytes per second.
struct Rate {
    per_sec: u64,
    tokens: f64,
    last: Instant,
}

impl Rate {
    fn new(per_sec: u64) -> Self {
        Rate {
            per_sec,
            tokens: per_sec as f64 / 4.0,
            last: Instant::now(),
        }
    }

    /// Takes `n` bytes; false when over the rate (0 means unlimited).
    fn take(&mut self, n: usize) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let burst = (self.per_sec as f64 / 4.0).max(256.0 * 1024.0);
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * self.per_sec as f64)
            .min(burst);
        self.last = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// The next message: a binary one, or `None` for a ping or pong (which
/// still counts as life).
async fn next_message(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> Result<Option<Bytes>, String> {
    match stream.next().await {
        Some(Ok(Message::Binary(b))) => Ok(Some(b)),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(None),
        Some(Ok(Message::Text(_))) => Err("text message on the agent channel".into()),
        Some(Ok(Message::Close(_))) | None => Err(CLIENT_CLOSED.into()),
        Some(Err(e)) => Err(e.to_string()),
    }
}

async fn next_binary(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> Result<Bytes, String> {
    loop {
        if let Some(b) = next_message(stream).await? {
            return Ok(b);
        }
    }
}

/// Serves one WebSocket channel: the key handshake, then the signaling
/// session, with relay frames handled as they arrive.
async fn channel(socket: WebSocket, conn_id: u64, observed: SocketAddr, shared: Arc<Shared>) {
    let (sink, mut stream) = socket.split();
    let (sig_tx, sig_rx) = mpsc::channel(SIGNAL_QUEUE);
    let (relay_tx, relay_rx) = mpsc::channel(RELAY_QUEUE);
    let (done_tx, done_rx) = watch::channel(None);
    let writer = tokio::spawn(writer(sink, sig_rx, relay_rx, done_tx).in_current_span());
    let mut link = WsLink {
        sig: Some(sig_tx),
        writer: Some(writer),
        done: done_rx,
        kick: Arc::new(Notify::new()),
    };
    let stats = &shared.tcp.stats;
    let mut server_nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut server_nonce);
    // The WebSocket's authentication has not changed since version 4, and
    // agents of version 4 insist on hearing their own version here; the
    // signaling version is settled by Hello and Welcome.
    let hello = WsAuth::ServerHello {
        version: MIN_PROTOCOL_VERSION,
        nonce: server_nonce,
    };
    if link.send_raw(ws::encode_auth(&hello)).await.is_err() {
        return;
    }
    // The agent's proof and hello, in that order, in time.
    let first_two = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let a = next_binary(&mut stream).await?;
        let h = next_binary(&mut stream).await?;
        Ok::<_, String>((a, h))
    })
    .await;
    let (auth, hello_msg) = match first_two {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            if e != CLIENT_CLOSED {
                inc(&stats.protocol_errors);
            }
            debug!("channel ended before its hello: {e}");
            return;
        }
        Err(_) => {
            inc(&stats.protocol_errors);
            debug!("no hello in time");
            return;
        }
    };
    let client_auth = match ws::parse(&auth) {
        Ok(WsFrame::Auth(b)) => ws::decode::<WsAuth>(b).ok(),
        _ => None,
    };
    let Some(WsAuth::ClientAuth {
        nonce: client_nonce,
        signature,
    }) = client_auth
    else {
        inc(&stats.protocol_errors);
        inc(&shared.metrics.decode_errors);
        link.refuse(ErrorCode::BadRequest, "expected the key proof first".into())
            .await;
        return;
    };
    let first: Incoming = match ws::parse(&hello_msg) {
        Ok(WsFrame::Signal(b)) => {
            ws::decode::<ClientMsg>(b).map_err(|e| ReadEnd::Malformed(e.to_string()))
        }
        Ok(_) => Err(ReadEnd::Malformed("expected Hello".into())),
        Err(e) => Err(ReadEnd::Malformed(e.to_string())),
    };
    let Some(hello) = signal::expect_hello(&mut link, Ok(first), &shared).await else {
        inc(&stats.protocol_errors);
        return;
    };
    let signed = ws::client_signed(&server_nonce, &client_nonce);
    if !punch_tls::tcp::verify_signature(&hello.public_key, &signed, &signature) {
        inc(&stats.protocol_errors);
        inc(&shared.metrics.auth_failures);
        link.refuse(
            ErrorCode::BadRequest,
            "the key proof does not verify".into(),
        )
        .await;
        return;
    }
    let proof = match shared
        .identity
        .sign(&ws::server_signed(&server_nonce, &client_nonce))
    {
        Ok(p) => p,
        Err(e) => {
            warn!("cannot sign: {e}");
            return;
        }
    };
    if link
        .send_raw(ws::encode_auth(&WsAuth::ServerAuth {
            key: shared.identity.public_key(),
            signature: proof,
        }))
        .await
        .is_err()
    {
        return;
    }
    inc(&stats.channels);
    shared
        .tcp
        .relay
        .lock()
        .expect("not poisoned")
        .insert(conn_id, relay_tx.clone());
    let (in_tx, in_rx) = mpsc::channel::<Box<Incoming>>(16);
    let reader = {
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let end = read_loop(&mut stream, conn_id, &in_tx, &relay_tx, &shared).await;
                let _ = in_tx.send(Box::new(Err(end))).await;
            }
            .in_current_span(),
        )
    };
    let arrival = Arrival {
        conn_id,
        key: hello.public_key,
        token_binding: Some(ws::token_binding(&server_nonce, &client_nonce)),
        observed,
        transport: Transport::Tcp,
        closer: Closer::Tcp(link.kick.clone()),
    };
    signal::serve_registered(link, arrival, hello, in_rx, shared.clone()).await;
    reader.abort();
    shared
        .tcp
        .relay
        .lock()
        .expect("not poisoned")
        .remove(&conn_id);
}

/// Reads the channel after the handshake: signaling to the session, relay
/// frames through the relay table at once. Returns why it stopped.
async fn read_loop(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    conn_id: u64,
    in_tx: &mpsc::Sender<Box<Incoming>>,
    relay_tx: &mpsc::Sender<Bytes>,
    shared: &Arc<Shared>,
) -> ReadEnd {
    let stats = &shared.tcp.stats;
    let mut rate = Rate::new(shared.config.tcp_rate);
    let idle = shared.config.idle_timeout;
    loop {
        let msg = match tokio::time::timeout(idle, next_message(stream)).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => return ReadEnd::Closed(e),
            Err(_) => return ReadEnd::Closed(format!("silent for {idle:?}")),
        };
        match ws::parse(&msg) {
            Ok(WsFrame::Signal(b)) => {
                let m = ws::decode::<ClientMsg>(b).map_err(|e| ReadEnd::Malformed(e.to_string()));
                let stop = m.is_err();
                if in_tx.send(Box::new(m)).await.is_err() || stop {
                    return ReadEnd::Closed("session over".into());
                }
            }
            Ok(WsFrame::Relay(frame)) => {
                stats.relay_in.fetch_add(1, Ordering::Relaxed);
                if !rate.take(frame.len()) {
                    stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                relay_frame(conn_id, frame, relay_tx, shared);
            }
            Ok(WsFrame::Auth(_)) => {
                inc(&stats.protocol_errors);
                return ReadEnd::Malformed("handshake message after the handshake".into());
            }
            Err(e) => {
                inc(&stats.protocol_errors);
                return ReadEnd::Malformed(e.to_string());
            }
        }
    }
}

/// Passes a relay frame from TCP client `conn_id` through the relay table.
fn relay_frame(conn_id: u64, frame: &[u8], own: &mpsc::Sender<Bytes>, shared: &Arc<Shared>) {
    let Some(table) = &shared.relay else { return };
    let (action, released) = {
        let mut t = table.lock().expect("not poisoned");
        let a = t.handle(Endpoint::Tcp(conn_id), frame, Instant::now());
        (a, t.take_released())
    };
    match action {
        Ok(Action::Forward(to)) => shared.udp.send_to_endpoint(to, frame),
        Ok(Action::Reply(answer)) => {
            let _ = own.try_send(Bytes::from(answer));
        }
        Ok(Action::Held) => {}
        Err(e) => tracing::trace!("relay frame from TCP client dropped: {e}"),
    }
    // After the bind-ok: what the peer sent before this client bound.
    for (to, f) in released {
        shared.udp.send_to_endpoint(to, &f);
    }
}

/// Logs what the TCP side is doing once it starts.
pub fn announce(addr: SocketAddr) {
    info!(%addr, "TCP (TLS + WebSocket) listening");
}

#[cfg(test)]
mod tests {
    use super::Rate;

    #[test]
    fn the_rate_limit_allows_a_burst_then_refuses() {
        let mut r = Rate::new(1_000_000);
        assert!(r.take(200_000));
        assert!(!r.take(200_000));
        let mut open = Rate::new(0);
        assert!(open.take(usize::MAX));
    }
}
