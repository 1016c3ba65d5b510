//! Registration on a fresh channel: the hello, the welcome (or the
//! refusal), and what a registered channel sets going.

use super::channel::Channel;
use super::current_server;
use super::nat::{classify_nat, stun_candidates};
use crate::{AgentError, Inner, Status};
use futures_util::SinkExt;
use punch_net::{read_frame, write_frame};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{ClientMsg, Hello, ServerMsg, Transport};
use punch_protocol::ws::WsFrame;
use punch_protocol::PROTOCOL_VERSION;
use punch_tls::TOKEN_PROOF_LABEL;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

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
pub(super) async fn register(
    inner: &Arc<Inner>,
    chan: &mut Channel,
) -> Result<SocketAddr, AgentError> {
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
    *inner.gather.stun_seen.lock().expect("not poisoned") = stun.clone();
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
                                &inner.fingerprint,
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
                .link
                .server_version
                .store(version, std::sync::atomic::Ordering::SeqCst);
            inner
                .link
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
pub(super) fn on_registered(inner: &Arc<Inner>, transport: Transport, observed: SocketAddr) {
    *inner.link.transport.lock().expect("not poisoned") = Some(transport);
    // A counter advertised while the hello was on its way reached no
    // server: say it again on this channel, ahead of any connect request
    // that registration releases (the peer must see it in its offer).
    if inner
        .gather
        .counter
        .lock()
        .expect("not poisoned")
        .counter
        .is_some()
    {
        inner.announce_candidates();
    }
    inner.set_status(Status::Registered { observed });
    if let Some(via) = inner.relay_via() {
        crate::relay::move_bindings(&inner.socket, via);
    }
    inner.link.channel_changes.send_modify(|n| *n += 1);
    classify_nat(inner);
}
