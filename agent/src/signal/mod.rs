//! The signaling client: connect, register, dispatch, reconnect.

use crate::{AgentError, Inner, Reply, Status};
use futures_util::{SinkExt, StreamExt};
use punch_net::{read_frame, write_frame, FrameError};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{ClientMsg, Hello, ServerMsg, Transport};
use punch_protocol::ws::WsFrame;
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, KeyVerifier, TOKEN_PROOF_LABEL};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, info_span, warn, Instrument};

/// Delay before reconnect attempt `attempt` (0-based): exponential from
/// 250 ms, capped at 10 s, with ±50 % jitter so a fleet does not reconnect
/// in lockstep after a server restart.
pub fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    let jitter = rand::thread_rng().gen_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// How long after the early TCP connection to the server is up (one round
/// trip) the QUIC handshake may still answer before the WebSocket goes
/// ahead: at least this, or half that round trip.
const QUIC_GRACE: Duration = Duration::from_millis(30);

/// How long a closing agent waits for the server to acknowledge its
/// goodbye before it closes the connection.
const GOODBYE_ACK: Duration = Duration::from_millis(10);

/// Runs the signaling connection for the agent's lifetime.
pub(crate) async fn run(inner: Arc<Inner>) {
    let span = info_span!("signal", worker = %inner.worker_id);
    run_loop(inner.clone()).instrument(span).await;
    inner.signal_stopped.send_replace(true);
}

async fn run_loop(inner: Arc<Inner>) {
    let mut attempt = 0u32;
    loop {
        match connect_once(&inner).await {
            Ok((chan, observed)) => {
                attempt = 0;
                let transport = chan.transport();
                info!(%observed, server = %current_server(&inner), transport = transport.as_str(), "registered");
                let end = match chan {
                    Channel::Quic { conn, send, recv } => {
                        session(&inner, &conn, send, recv, observed).await
                    }
                    Channel::Ws(ws) => ws_session(&inner, *ws, observed).await,
                };
                *inner.control.lock().expect("not poisoned") = None;
                inner.socket.set_tcp_out(None);
                *inner.transport.lock().expect("not poisoned") = None;
                inner.pending.lock().expect("not poisoned").clear();
                if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let planned = matches!(end, SessionEnd::Renew(_));
                let reason = end.to_string();
                if planned {
                    info!("{reason}; reconnecting");
                } else {
                    warn!("signaling connection lost: {reason}; reconnecting");
                }
                inner.status.send_replace(Status::Connecting(Some(
                    AgentError::ServerUnreachable {
                        server: current_server(&inner),
                        reason,
                    },
                )));
                if !planned && next_server(&inner) {
                    info!(server = %current_server(&inner), "trying the next server");
                }
                if !planned {
                    // Immediately, but jittered so a fleet spreads out.
                    let pause = Duration::from_millis(rand::thread_rng().gen_range(0..200));
                    tokio::time::sleep(pause).await;
                }
                continue;
            }
            Err(_) if inner.closing.load(std::sync::atomic::Ordering::SeqCst) => return,
            Err(e) if e.is_fatal() => {
                warn!("giving up: {e}");
                inner.status.send_replace(Status::Failed(e));
                return;
            }
            Err(e) => {
                // Through the whole list quickly, then back off per round.
                let n = inner.config.servers().len().max(1) as u32;
                attempt = attempt.saturating_add(1);
                let delay = if !attempt.is_multiple_of(n) {
                    Duration::from_millis(50)
                } else {
                    backoff(attempt / n - 1)
                };
                debug!("registration failed: {e}; retrying in {delay:?}");
                inner.status.send_replace(Status::Connecting(Some(e)));
                next_server(&inner);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How a registered session ended.
enum SessionEnd {
    /// On purpose: a fresh channel follows at once (UDP answers again, or
    /// the WebSocket reached its maximum age).
    Renew(String),
    /// The channel failed.
    Lost(String),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Renew(s) | SessionEnd::Lost(s) => f.write_str(s),
        }
    }
}

/// The server in use: one of `--server`'s list.
pub(crate) fn current_server(inner: &Inner) -> String {
    let all = inner.config.servers();
    if all.is_empty() {
        return inner.config.server.clone();
    }
    let i = inner.server_idx.load(std::sync::atomic::Ordering::Relaxed);
    all[i % all.len()].clone()
}

/// Moves to the next server of the list; false when there is only one.
fn next_server(inner: &Inner) -> bool {
    if inner.config.servers().len() < 2 {
        return false;
    }
    inner
        .server_idx
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    true
}

async fn resolve(server: &str) -> Result<SocketAddr, AgentError> {
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: server.to_string(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?;
    addrs.next().ok_or_else(|| unreachable("no address".into()))
}

/// A channel being opened.
type PendingChannel<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Channel, AgentError>> + Send + 'a>>;

/// An established channel to the server, not yet registered.
enum Channel {
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Ws(Box<WsChannel>),
}

/// A WebSocket after the server's hello.
struct WsChannel {
    ws: crate::tcp::Ws,
    server_nonce: [u8; 32],
    client_nonce: [u8; 32],
}

impl Channel {
    fn transport(&self) -> Transport {
        match self {
            Channel::Quic { .. } => Transport::Udp,
            Channel::Ws(_) => Transport::Tcp,
        }
    }
}

/// Where the server is: QUIC over UDP at `udp` (`HOST:PORT`), the
/// WebSocket at `tcp`.
pub(crate) struct Endpoints {
    pub udp: Option<String>,
    pub tcp: Option<crate::tcp::WsUrl>,
}

/// Reads `--server` and `--server-tcp`: `HOST:PORT` is QUIC there and the
/// WebSocket at `wss://HOST:PORT/ws` (where the server listens on TCP by
/// default); `wss://…` alone is the TCP channel only.
pub(crate) fn endpoints(config: &crate::AgentConfig, s: &str) -> Result<Endpoints, AgentError> {
    if config.servers().len() > 1 && config.server_tcp.is_some() {
        return Err(AgentError::Config(
            "--server-tcp names the TCP channel of one server; with several --server entries each is used at its own HOST:PORT (or give wss:// entries)".into(),
        ));
    }
    if crate::is_ws_url(s) {
        let tcp = crate::tcp::WsUrl::parse(s)?;
        if config.server_tcp.is_some() {
            return Err(AgentError::Config(
                "--server is already a WebSocket URL; --server-tcp names the TCP channel of a UDP server".into(),
            ));
        }
        return Ok(Endpoints {
            udp: None,
            tcp: Some(tcp),
        });
    }
    if s.contains("://") {
        return Err(AgentError::Config(format!(
            "--server {s:?}: expected HOST:PORT (QUIC) or wss://HOST[:PORT]/ws"
        )));
    }
    let tcp = match &config.server_tcp {
        Some(u) => crate::tcp::WsUrl::parse(u)?,
        None => crate::tcp::WsUrl::parse(&format!("wss://{s}{}", punch_protocol::ws::PATH))?,
    };
    Ok(Endpoints {
        udp: Some(s.to_string()),
        tcp: (!config.udp_only).then_some(tcp),
    })
}

/// Connects to the server, happy-eyeballs style: QUIC first, the
/// WebSocket when QUIC has not answered within `tcp_after` (or failed);
/// the first channel up wins and the agent registers on it.
async fn connect_once(inner: &Arc<Inner>) -> Result<(Channel, SocketAddr), AgentError> {
    let server = current_server(inner);
    let ep = endpoints(&inner.config, &server)?;
    let mut udp_err: Option<AgentError> = None;
    let mut tcp_err: Option<AgentError> = None;
    let udp = async {
        match &ep.udp {
            Some(s) => quic_channel(inner, s).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(udp);
    let mut udp_done = ep.udp.is_none();
    let tcp_start = tokio::time::sleep(if ep.udp.is_some() {
        inner.config.tcp_after
    } else {
        Duration::ZERO
    });
    tokio::pin!(tcp_start);
    let mut tcp: Option<PendingChannel<'_>> = None;
    let mut tcp_done = ep.tcp.is_none();
    // The WebSocket's TCP connection is opened beside the QUIC handshake
    // (without a proxy): its connect time is a round trip to the server,
    // so a QUIC handshake that has not answered soon after is taken as
    // blocked, long before `tcp_after`. The held connection then carries
    // the WebSocket; when QUIC answers first it is dropped unused.
    let started = tokio::time::Instant::now();
    let early_url = ep
        .tcp
        .as_ref()
        .filter(|u| ep.udp.is_some() && !crate::tcp::proxied(inner, u));
    let early = async {
        match early_url {
            Some(u) => crate::tcp::dial(u).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(early);
    let mut early_done = early_url.is_none();
    let mut dialed: Option<Box<dyn crate::tcp::Io>> = None;
    let chan = loop {
        if udp_done && tcp_done {
            return Err(match (udp_err, tcp_err) {
                (Some(u), Some(t)) => AgentError::ServerUnreachable {
                    server: server.clone(),
                    reason: format!("UDP: {}; TCP: {}", reason(&u), reason(&t)),
                },
                (Some(e), None) | (None, Some(e)) => e,
                (None, None) => AgentError::Config("no server endpoint".into()),
            });
        }
        tokio::select! {
            r = &mut udp, if !udp_done => match r {
                Ok(c) => break c,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    debug!("QUIC to the server: {e}");
                    udp_done = true;
                    udp_err = Some(e);
                    if tcp.is_none() && !tcp_done {
                        tcp_start.as_mut().reset(tokio::time::Instant::now());
                    }
                }
            },
            r = &mut early, if !early_done => {
                early_done = true;
                match r {
                    Ok(s) => {
                        let rtt = started.elapsed();
                        dialed = Some(s);
                        let by = tokio::time::Instant::now() + (rtt / 2).max(QUIC_GRACE);
                        if by < tcp_start.deadline() {
                            tcp_start.as_mut().reset(by);
                        }
                    }
                    Err(e) => debug!("early TCP connect to the server: {e}"),
                }
            },
            _ = &mut tcp_start, if tcp.is_none() && !tcp_done => {
                if let Some(url) = &ep.tcp {
                    if ep.udp.is_some() {
                        debug!(after_ms = started.elapsed().as_millis() as u64, "no QUIC answer yet; trying the WebSocket too");
                    }
                    tcp = Some(Box::pin(ws_channel(inner, url, dialed.take())));
                }
            },
            r = async { tcp.as_mut().expect("guarded").await }, if tcp.is_some() && !tcp_done => match r {
                Ok(c) => break c,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    debug!("WebSocket to the server: {e}");
                    tcp_done = true;
                    tcp_err = Some(e);
                }
            },
        }
    };
    let mut chan = chan;
    let observed = register(inner, &mut chan).await?;
    Ok((chan, observed))
}

fn reason(e: &AgentError) -> String {
    match e {
        AgentError::ServerUnreachable { reason, .. } => reason.clone(),
        e => e.to_string(),
    }
}

/// QUIC handshake and control stream.
async fn quic_channel(inner: &Arc<Inner>, server: &str) -> Result<Channel, AgentError> {
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: server.to_string(),
        reason,
    };
    let addr = resolve(server).await?;
    *inner.server_addr.lock().expect("not poisoned") = Some(addr);
    // The NAT check's tests go out beside the handshake (from sockets of
    // their own): a fresh agent's mapping is then known about when it
    // registers, and its first connect need not wait for it.
    classify_nat(inner);
    let conn = quic_handshake(inner, addr, inner.config.server_connect_timeout).await?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(Channel::Quic { conn, send, recv })
}

/// A QUIC handshake with the server at `addr`, pinned to its key.
async fn quic_handshake(
    inner: &Arc<Inner>,
    addr: SocketAddr,
    limit: Duration,
) -> Result<quinn::Connection, AgentError> {
    let server = current_server(inner);
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: server.clone(),
        reason,
    };
    let verifier = KeyVerifier::new(Expect::Fingerprint(inner.fingerprint.clone()));
    let mut cfg = punch_tls::client_config(&inner.identity, verifier.clone(), ALPN_SIGNAL)?;
    cfg.transport_config(Arc::new(punch_net::signal_transport(
        Some(inner.config.keep_alive),
        Duration::from_secs(20),
    )));
    let connecting = inner
        .endpoint
        .connect_with(cfg, addr, "punch")
        .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            if let Some(k) = verifier.seen_key() {
                let got = punch_tls::fingerprint_of(&k);
                if got != inner.fingerprint {
                    return Err(AgentError::FingerprintMismatch {
                        expected: inner.fingerprint.clone(),
                        got,
                    });
                }
            }
            Err(unreachable(e.to_string()))
        }
        Err(_) => Err(unreachable(format!(
            "no answer within {:.1} s",
            limit.as_secs_f64()
        ))),
    }
}

/// The WebSocket, up to the server's hello.
async fn ws_channel(
    inner: &Arc<Inner>,
    url: &crate::tcp::WsUrl,
    dialed: Option<Box<dyn crate::tcp::Io>>,
) -> Result<Channel, AgentError> {
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: url.to_string(),
        reason,
    };
    let limit = inner
        .config
        .server_connect_timeout
        .max(Duration::from_secs(5));
    let r = tokio::time::timeout(limit, async {
        let mut ws = crate::tcp::open(inner, url, dialed).await.map_err(|e| {
            if e.starts_with(crate::tcp::PROXY_AUTH) {
                AgentError::Config(e)
            } else {
                unreachable(e)
            }
        })?;
        let server_nonce = crate::tcp::server_hello(&mut ws).await?;
        let mut client_nonce = [0u8; 32];
        rand::thread_rng().fill(&mut client_nonce);
        crate::tcp::client_auth(inner, &mut ws, &server_nonce, &client_nonce).await?;
        Ok(Channel::Ws(Box::new(WsChannel {
            ws,
            server_nonce,
            client_nonce,
        })))
    })
    .await;
    r.unwrap_or_else(|_| {
        Err(unreachable(format!(
            "no WebSocket within {:.1} s",
            limit.as_secs_f64()
        )))
    })
}

/// Our mapping as each configured STUN server sees it, asked in parallel
/// (at most one second in all, so registration is never held up long).
async fn stun_candidates(
    inner: &Arc<Inner>,
    extra: Option<SocketAddr>,
) -> Vec<punch_protocol::signal::Candidate> {
    let mut asks = Vec::new();
    let servers = extra
        .map(|a| a.to_string())
        .into_iter()
        .chain(inner.config.stun.iter().cloned());
    for s in servers.take(8) {
        let inner = inner.clone();
        let s = s.clone();
        asks.push(tokio::spawn(async move {
            let addr = resolve(&s).await.ok()?;
            let mapped = inner.socket.stun_query(addr, Duration::from_secs(1)).await;
            match mapped {
                Some(m) => info!(stun = %s, mapped = %m, "STUN server reports our address"),
                None => warn!(stun = %s, "no answer from STUN server"),
            }
            mapped
        }));
    }
    let mut out: Vec<punch_protocol::signal::Candidate> = Vec::new();
    for a in asks {
        if let Ok(Some(addr)) = a.await {
            if !out.iter().any(|c| c.addr == addr) {
                out.push(punch_protocol::signal::Candidate {
                    addr,
                    kind: punch_protocol::signal::CandidateKind::Stun,
                });
            }
        }
    }
    out
}

/// Classifies our NAT once, in the background, and reports the class on
/// this and every later registration.
fn classify_nat(inner: &Arc<Inner>) {
    if let Some(nat) = *inner.nat.lock().expect("not poisoned") {
        inner.report_nat(nat);
        return;
    }
    if !inner.config.nat_check
        || inner
            .nat_started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let Some(server) = *inner.server_addr.lock().expect("not poisoned") else {
        return;
    };
    let inner = inner.clone();
    tokio::spawn(
        async move {
            let bind = if server.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
            };
            // Set when the mapping's early report handed nat_ready to the
            // counter's advertisement.
            let advertising = std::sync::atomic::AtomicBool::new(false);
            let early = |r: &crate::natcheck::NatReport| {
                // The mapping is what the birthday method needs first.
                if let Some(nat) = r.class() {
                    if nat.mapping != punch_protocol::signal::NatBehaviour::Unknown {
                        *inner.nat_alloc.lock().expect("not poisoned") = r.allocator.value;
                        *inner.nat.lock().expect("not poisoned") = Some(nat);
                        inner.report_nat(nat);
                        // A counting NAT: say where the counter stands
                        // before a connect that waits for the mapping asks
                        // for its peer (nat_ready follows the advertisement).
                        if let punch_protocol::allocator::Allocator::Sequential { .. } =
                            r.allocator.value
                        {
                            inner.counter.lock().expect("not poisoned").other =
                                r.other_addr.as_deref().and_then(|a| a.parse().ok());
                            advertising.store(true, std::sync::atomic::Ordering::SeqCst);
                            let inner = inner.clone();
                            tokio::spawn(
                                async move {
                                    crate::birthday::advertise_counter(&inner).await;
                                    inner.nat_ready.send_replace(true);
                                }
                                .in_current_span(),
                            );
                            return;
                        }
                        inner.nat_ready.send_replace(true);
                    }
                }
            };
            let result = crate::natcheck::check_with(server, bind, false, early).await;
            if !advertising.load(std::sync::atomic::Ordering::SeqCst) {
                inner.nat_ready.send_replace(true);
            }
            match result {
                Ok(r) => match r.class() {
                    Some(nat) => {
                        info!(nat = %nat.label(), mapping = nat.mapping.as_str(), filtering = nat.filtering.as_str(), allocator = ?r.allocator.value, "NAT classified");
                        *inner.nat_alloc.lock().expect("not poisoned") = r.allocator.value;
                        *inner.nat.lock().expect("not poisoned") = Some(nat);
                        inner.report_nat(nat);
                    }
                    None => debug!("NAT not classified: no STUN answer"),
                },
                Err(e) => debug!("NAT check failed: {e}"),
            }
            if inner.nat.lock().expect("not poisoned").is_none() {
                // Perhaps the server was not up yet: the next registration
                // tries again.
                inner.nat_started.store(false, std::sync::atomic::Ordering::SeqCst);
            }
            inner.nat_done.send_replace(true);
        }
        .in_current_span(),
    );
}

/// Maps the server's application close code to an error, if it gave one.
fn close_reason(conn: &quinn::Connection) -> Option<AgentError> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let msg = String::from_utf8_lossy(&c.reason).to_string();
            match c.error_code.into_inner() {
                0x102 => Some(AgentError::BadToken(msg)),
                0x103 => Some(AgentError::IdTaken(msg)),
                0x101 => Some(AgentError::BadVersion(msg)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Says hello on a fresh channel and waits for the welcome; returns our
/// address as the server sees it.
async fn register(inner: &Arc<Inner>, chan: &mut Channel) -> Result<SocketAddr, AgentError> {
    let server = current_server(inner);
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: server.clone(),
        reason,
    };
    let binding = match chan {
        Channel::Quic { conn, .. } => {
            let mut exporter = [0u8; 32];
            conn.export_keying_material(&mut exporter, TOKEN_PROOF_LABEL, b"")
                .map_err(|_| AgentError::Io("TLS exporter unavailable".into()))?;
            exporter
        }
        Channel::Ws(w) => punch_protocol::ws::token_binding(&w.server_nonce, &w.client_nonce),
    };
    let token_proof = inner
        .config
        .token
        .as_ref()
        .map(|t| punch_tls::token_proof(t, &binding));
    let mut candidates = inner.local_candidates();
    // Over TCP, STUN runs after registration (`ws_session`): UDP is likely
    // blocked, and its timeout must not hold registration up.
    let stun = match chan {
        Channel::Quic { .. } => stun_candidates(inner, None).await,
        Channel::Ws(_) => Vec::new(),
    };
    let has_stun = !stun.is_empty();
    *inner.stun_seen.lock().expect("not poisoned") = stun.clone();
    candidates.extend(stun);
    candidates.truncate(punch_protocol::signal::MAX_CANDIDATES);
    let hello = ClientMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        worker_id: inner.worker_id.clone(),
        public_key: inner.identity.public_key(),
        token_proof,
        ephemeral: inner.ephemeral,
        local_candidates: candidates,
        metadata: inner.config.metadata.clone(),
        kind: inner.config.kind.clone(),
        tags: inner.config.tags.clone(),
    });
    let limit = inner
        .config
        .server_connect_timeout
        .max(Duration::from_secs(3));
    let first = match chan {
        Channel::Quic { conn, send, recv } => {
            write_frame(send, &hello)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            match tokio::time::timeout(limit, read_frame::<ServerMsg>(recv, MAX_FRAME)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    return Err(close_reason(conn).unwrap_or_else(|| unreachable(e.to_string())))
                }
                Err(_) => return Err(unreachable("no welcome in time".into())),
            }
        }
        Channel::Ws(w) => {
            let msg = punch_protocol::ws::encode_signal(&hello);
            w.ws.send(Message::Binary(msg.into()))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let r = tokio::time::timeout(limit, async {
                let mut proven = false;
                loop {
                    let m = crate::tcp::next_binary(&mut w.ws)
                        .await
                        .map_err(&unreachable)?;
                    match punch_protocol::ws::parse(&m) {
                        Ok(WsFrame::Auth(b)) => {
                            crate::tcp::check_server_auth(
                                inner,
                                b,
                                &w.server_nonce,
                                &w.client_nonce,
                            )?;
                            proven = true;
                        }
                        Ok(WsFrame::Signal(b)) => {
                            let m = punch_protocol::ws::decode::<ServerMsg>(b)
                                .map_err(|e| unreachable(e.to_string()))?;
                            // Only a refusal may come before the server's proof.
                            if proven || matches!(m, ServerMsg::Error { .. }) {
                                return Ok(m);
                            }
                            return Err(unreachable(
                                "welcome without the server's key proof".into(),
                            ));
                        }
                        _ => {
                            return Err(unreachable("unexpected message before the welcome".into()))
                        }
                    }
                }
            })
            .await;
            match r {
                Ok(r) => r?,
                Err(_) => return Err(unreachable("no welcome in time".into())),
            }
        }
    };
    let tcp = matches!(chan, Channel::Ws(_));
    match first {
        ServerMsg::Welcome { version, observed } => {
            // A server answers with our version, or (a server older than
            // us that let us in all the same) its own.
            if !(punch_protocol::MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                return Err(AgentError::BadVersion(format!(
                    "server speaks version {version}, we speak {PROTOCOL_VERSION}"
                )));
            }
            inner
                .server_version
                .store(version, std::sync::atomic::Ordering::SeqCst);
            inner
                .tcp_only
                .store(tcp && !has_stun, std::sync::atomic::Ordering::SeqCst);
            Ok(punch_net::canonical(observed))
        }
        ServerMsg::Error { code, message, .. } => Err(AgentError::from_registration(code, message)),
        other => Err(unreachable(format!("unexpected first message {other:?}"))),
    }
}

/// Common start of a registered session: the channel becomes the way to
/// the server, relay bindings move onto it, and connections hear of it.
fn on_registered(inner: &Arc<Inner>, transport: Transport, observed: SocketAddr) {
    *inner.transport.lock().expect("not poisoned") = Some(transport);
    // A counter advertised while the hello was on its way reached no
    // server: say it again on this channel, ahead of any connect request
    // that registration releases (the peer must see it in its offer).
    if inner
        .counter
        .lock()
        .expect("not poisoned")
        .counter
        .is_some()
    {
        inner.announce_candidates();
    }
    inner.status.send_replace(Status::Registered { observed });
    if let Some(via) = inner.relay_via() {
        crate::relay::move_bindings(&inner.socket, via);
    }
    inner.channel_changes.send_modify(|n| *n += 1);
    classify_nat(inner);
}

async fn session(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    observed: SocketAddr,
) -> SessionEnd {
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(64);
    *inner.control.lock().expect("not poisoned") = Some(tx);
    on_registered(inner, Transport::Udp, observed);
    let writer = async {
        while let Some(m) = rx.recv().await {
            if let Err(e) = write_frame(&mut send, &m).await {
                return format!("write failed: {e}");
            }
        }
        // The agent is closing: what was queued (outcome reports, the
        // goodbye) is on its way. Its acknowledgement is given a moment
        // (older servers need the goodbye itself), not a round trip: a
        // server takes the DONE close that follows as the goodbye.
        let _ = send.finish();
        let _ = tokio::time::timeout(GOODBYE_ACK, send.stopped()).await;
        crate::peer::close_now(conn, punch_protocol::close::DONE, b"agent shutting down").await;
        "agent stopped".to_string()
    };
    let reader = async {
        loop {
            match read_frame::<ServerMsg>(&mut recv, MAX_FRAME).await {
                Ok(m) => dispatch(inner, m),
                Err(FrameError::Codec(e)) => return format!("malformed message from server: {e}"),
                Err(e) => return e.to_string(),
            }
        }
    };
    SessionEnd::Lost(tokio::select! {
        r = writer => r,
        r = reader => r,
        e = conn.closed() => e.to_string(),
        r = server_silent(conn, inner.config.keep_alive) => r,
    })
}

/// Resolves when nothing at all has come from the server for a
/// keep-alive interval plus 2.5 s. Every keep-alive is acknowledged at
/// once, so that silence means the server is gone; QUIC's own idle
/// timeout restarts with each unanswered keep-alive and would take up to
/// keep-alive + 20 s. This is what moves an agent to another server of a
/// cluster within ~8 s, at no cost in packets.
pub async fn server_silent(conn: &quinn::Connection, keep_alive: Duration) -> String {
    let limit = keep_alive + Duration::from_millis(2500);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut since = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now = conn.stats().udp_rx.datagrams;
        if now != seen {
            seen = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= limit {
            return format!(
                "no answer from the server for {:.1} s",
                since.elapsed().as_secs_f64()
            );
        }
    }
}

/// The session over the WebSocket: signaling and relay frames share it.
/// It ends on purpose when UDP answers again (QUIC is preferred) or the
/// channel reaches `ws_max_age` (fronts cut long requests).
async fn ws_session(inner: &Arc<Inner>, chan: WsChannel, observed: SocketAddr) -> SessionEnd {
    let (mut sink, mut stream) = chan.ws.split();
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(64);
    let (relay_tx, mut relay_rx) = mpsc::channel::<bytes::Bytes>(1024);
    *inner.control.lock().expect("not poisoned") = Some(tx);
    inner.socket.set_tcp_out(Some(relay_tx));
    on_registered(inner, Transport::Tcp, observed);
    // The server sees no UDP mapping of ours over TCP: ask its STUN port and
    // the configured STUN servers, and offer what answers to peers.
    {
        let inner = inner.clone();
        tokio::spawn(
            async move {
                let server = *inner.server_addr.lock().expect("not poisoned");
                let stun = stun_candidates(&inner, server).await;
                if stun.is_empty() {
                    return;
                }
                *inner.stun_seen.lock().expect("not poisoned") = stun.clone();
                let mut local = inner.local_candidates();
                local.extend(stun);
                local.truncate(punch_protocol::signal::MAX_CANDIDATES);
                inner
                    .tcp_only
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                info!("UDP works although signaling runs over TCP: peers may punch to us");
                inner.notify(ClientMsg::Candidates { local });
            }
            .in_current_span(),
        );
    }
    let keep_alive = inner.config.keep_alive;
    let writer = async {
        let mut ping = tokio::time::interval(keep_alive);
        ping.tick().await;
        loop {
            let first = tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => Message::Binary(punch_protocol::ws::encode_signal(&m).into()),
                    None => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                        return "agent stopped".to_string();
                    }
                },
                f = relay_rx.recv() => match f {
                    Some(f) => Message::Binary(f),
                    None => return "relay queue closed".to_string(),
                },
                _ = ping.tick() => Message::Ping(bytes::Bytes::new()),
            };
            // What is queued goes out in one flush.
            let batch = async {
                sink.feed(first).await?;
                for _ in 0..64 {
                    let next = match rx.try_recv() {
                        Ok(m) => Message::Binary(punch_protocol::ws::encode_signal(&m).into()),
                        Err(_) => match relay_rx.try_recv() {
                            Ok(f) => Message::Binary(f),
                            Err(_) => break,
                        },
                    };
                    sink.feed(next).await?;
                }
                sink.flush().await
            };
            match tokio::time::timeout(Duration::from_secs(10), batch).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return format!("write failed: {e}"),
                Err(_) => return "the server does not read (write timed out)".to_string(),
            }
        }
    };
    let reader = async {
        // The server pongs our pings: three intervals of silence is dead.
        let silence = keep_alive * 3;
        loop {
            let m = match tokio::time::timeout(silence, stream.next()).await {
                Err(_) => return format!("server silent for {silence:?}"),
                Ok(None) => return "server closed the channel".to_string(),
                Ok(Some(Err(e))) => return e.to_string(),
                Ok(Some(Ok(m))) => m,
            };
            let b = match m {
                Message::Binary(b) => b,
                Message::Close(c) => {
                    return match c {
                        Some(c) => format!("server closed the channel: {}", c.reason),
                        None => "server closed the channel".to_string(),
                    }
                }
                Message::Text(_) => return "text message from the server".to_string(),
                _ => continue,
            };
            match punch_protocol::ws::parse(&b) {
                Ok(WsFrame::Relay(_)) => inner.socket.tcp_in(b),
                Ok(WsFrame::Signal(body)) => match punch_protocol::ws::decode::<ServerMsg>(body) {
                    Ok(m) => dispatch(inner, m),
                    Err(e) => return format!("malformed message from server: {e}"),
                },
                Ok(WsFrame::Auth(_)) => debug!("ignoring a late handshake message"),
                Err(e) => return format!("malformed message from server: {e}"),
            }
        }
    };
    let max_age = tokio::time::sleep(inner.config.ws_max_age);
    let udp_back = async {
        let Some(addr) = *inner.server_addr.lock().expect("not poisoned") else {
            return std::future::pending().await;
        };
        if crate::is_ws_url(&current_server(inner)) {
            return std::future::pending().await;
        }
        let mut attempt = 0;
        loop {
            tokio::time::sleep(crate::tcp::udp_retry(attempt)).await;
            attempt += 1;
            if let Ok(c) = quic_handshake(inner, addr, Duration::from_secs(2)).await {
                c.close(punch_protocol::close::DONE.into(), b"probe");
                return;
            }
            debug!("UDP to the server still blocked");
        }
    };
    tokio::select! {
        r = writer => SessionEnd::Lost(r),
        r = reader => SessionEnd::Lost(r),
        _ = max_age => SessionEnd::Renew(format!(
            "the WebSocket reached its maximum age ({:?}); renewing it",
            inner.config.ws_max_age
        )),
        _ = udp_back => SessionEnd::Renew("UDP to the server answers again; moving signaling to QUIC".into()),
    }
}

fn dispatch(inner: &Arc<Inner>, msg: ServerMsg) {
    match msg {
        ServerMsg::Pong { req } | ServerMsg::Workers { req, .. } => {
            answer(inner, req, Reply::Msg(msg))
        }
        ServerMsg::Error { req: Some(req), .. } => answer(inner, req, Reply::Msg(msg)),
        ServerMsg::Error {
            req: None,
            code,
            message,
        } => warn!(code = code.as_str(), "server error: {message}"),
        ServerMsg::Offer(offer) => {
            let Some(probes) = inner.router.register(offer.session) else {
                warn!(session = %offer.session, "too many punch sessions; offer ignored");
                return;
            };
            match offer.req {
                Some(req) => answer(inner, req, Reply::Offer(offer, probes)),
                None => {
                    tokio::spawn(crate::session::controlled(inner.clone(), offer, probes));
                }
            }
        }
        ServerMsg::AddressChanged { observed } => {
            info!(%observed, "server sees a new address for us (NAT rebinding)");
            inner.status.send_replace(Status::Registered { observed });
        }
        ServerMsg::Welcome { .. } => debug!("ignoring repeated welcome"),
    }
}

fn answer(inner: &Arc<Inner>, req: u32, reply: Reply) {
    let tx = inner.pending.lock().expect("not poisoned").remove(&req);
    match tx {
        Some(tx) => {
            if let Err(Reply::Offer(o, _)) = tx.send(reply) {
                inner.router.unregister(o.session);
            }
        }
        None => {
            if let Reply::Offer(o, _) = reply {
                inner.router.unregister(o.session);
            }
            debug!(req, "answer for a request nobody waits for");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d >= Duration::from_millis(125), "{attempt}: {d:?}");
            assert!(d <= Duration::from_millis(15_000), "{attempt}: {d:?}");
        }
        assert!(backoff(0) < Duration::from_millis(400));
        assert!(backoff(10) >= Duration::from_secs(5));
    }
}
