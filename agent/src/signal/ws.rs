//! Signaling over the WebSocket, for when UDP to the server is blocked:
//! the channel up to the server's hello and the registered session, which
//! also carries relay frames.

use super::channel::{Channel, WsChannel};
use super::dispatch::dispatch;
use super::nat::stun_candidates;
use super::quic::quic_handshake;
use super::register::on_registered;
use super::{current_server, SessionEnd};
use crate::{AgentError, Inner};
use futures_util::{SinkExt, StreamExt};
use punch_protocol::signal::{ClientMsg, ServerMsg, Transport};
use punch_protocol::ws::WsFrame;
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, Instrument};

/// The WebSocket, up to the server's hello.
pub(super) async fn ws_channel(
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
        let how = crate::tcp::WsDial {
            proxy: inner.config.proxy.as_deref(),
            fingerprint: &inner.fingerprint,
            front_roots: inner.front_roots(),
        };
        let (mut ws, date) = crate::tcp::open(how, url, dialed).await.map_err(|e| {
            if e.starts_with(crate::tcp::PROXY_AUTH) {
                AgentError::Config(e)
            } else {
                unreachable(e)
            }
        })?;
        if let Some(date) = date {
            inner.link.server_clock.record_http_date(&date);
        }
        let server_nonce = crate::tcp::server_hello(&mut ws).await?;
        let mut client_nonce = [0u8; 32];
        rand::thread_rng().fill(&mut client_nonce);
        crate::tcp::client_auth(&inner.identity, &mut ws, &server_nonce, &client_nonce).await?;
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

/// The session over the WebSocket: signaling and relay frames share it.
/// It ends on purpose when UDP answers again (QUIC is preferred) or the
/// channel reaches `ws_max_age` (fronts cut long requests).
pub(super) async fn ws_session(
    inner: &Arc<Inner>,
    chan: WsChannel,
    observed: SocketAddr,
) -> SessionEnd {
    let (mut sink, mut stream) = chan.ws.split();
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(64);
    let (relay_tx, mut relay_rx) = mpsc::channel::<bytes::Bytes>(1024);
    *inner.link.control.lock().expect("not poisoned") = Some(tx);
    inner.socket.set_tcp_out(Some(relay_tx));
    on_registered(inner, Transport::Tcp, observed);
    // The server sees no UDP mapping of ours over TCP: ask its STUN port and
    // the configured STUN servers, and offer what answers to peers.
    {
        let inner = inner.clone();
        tokio::spawn(
            async move {
                let server = *inner.link.server_addr.lock().expect("not poisoned");
                let stun = stun_candidates(&inner, server).await;
                if stun.is_empty() {
                    return;
                }
                *inner.gather.stun_seen.lock().expect("not poisoned") = stun.clone();
                let mut local = inner.local_candidates();
                local.extend(stun);
                local.truncate(punch_protocol::signal::MAX_CANDIDATES);
                inner
                    .link
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
        let Some(addr) = *inner.link.server_addr.lock().expect("not poisoned") else {
            return std::future::pending().await;
        };
        if crate::config::is_ws_url(&current_server(inner)) {
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
