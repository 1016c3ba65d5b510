//! Signaling over QUIC: the handshake pinned to the server's key, the
//! registered session on its control stream, and the silence watchdog.

use super::channel::{resolve, Channel};
use super::dispatch::dispatch;
use super::nat::classify_nat;
use super::register::on_registered;
use super::{current_server, SessionEnd};
use crate::{AgentError, Inner};
use punch_net::{read_frame, write_frame, FrameError};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{ClientMsg, ServerMsg, Transport};
use punch_protocol::ALPN_SIGNAL;
use punch_tls::{Expect, KeyVerifier};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a closing agent waits for the server to acknowledge its
/// goodbye before it closes the connection.
const GOODBYE_ACK: Duration = Duration::from_millis(10);

/// QUIC handshake and control stream.
pub(super) async fn quic_channel(inner: &Arc<Inner>, server: &str) -> Result<Channel, AgentError> {
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: server.to_string(),
        reason,
    };
    let addr = resolve(server).await?;
    *inner.link.server_addr.lock().expect("not poisoned") = Some(addr);
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
pub(super) async fn quic_handshake(
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

pub(super) async fn session(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    observed: SocketAddr,
) -> SessionEnd {
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(64);
    *inner.link.control.lock().expect("not poisoned") = Some(tx);
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
