//! Opening a channel to the server: where it listens, and QUIC raced
//! against the WebSocket.

use super::current_server;
use super::quic::quic_channel;
use super::register::register;
use super::ws::ws_channel;
use crate::{AgentError, Inner};
use punch_protocol::signal::Transport;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// How long after the early TCP connection to the server is up (one round
/// trip) the QUIC handshake may still answer before the WebSocket goes
/// ahead: at least this, or half that round trip.
const QUIC_GRACE: Duration = Duration::from_millis(30);

pub(super) async fn resolve(server: &str) -> Result<SocketAddr, AgentError> {
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
pub(super) enum Channel {
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Ws(Box<WsChannel>),
}

/// A WebSocket after the server's hello.
pub(super) struct WsChannel {
    pub(super) ws: crate::tcp::Ws,
    pub(super) server_nonce: [u8; 32],
    pub(super) client_nonce: [u8; 32],
}

impl Channel {
    pub(super) fn transport(&self) -> Transport {
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
    if crate::config::is_ws_url(s) {
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
pub(super) async fn connect_once(inner: &Arc<Inner>) -> Result<(Channel, SocketAddr), AgentError> {
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
        .filter(|u| ep.udp.is_some() && !crate::tcp::proxied(inner.config.proxy.as_deref(), u));
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
