//! The signaling client: connect, register, dispatch, reconnect.

use crate::{AgentError, Inner, Reply, Status};
use punch_net::{read_frame, write_frame, FrameError};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{ClientMsg, ErrorCode, Hello, ServerMsg};
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, KeyVerifier, TOKEN_PROOF_LABEL};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

/// Delay before reconnect attempt `attempt` (0-based): exponential from
/// 250 ms, capped at 10 s, with ±50 % jitter so a fleet does not reconnect
/// in lockstep after a server restart.
pub fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    let jitter = rand::thread_rng().gen_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// Runs the signaling connection for the agent's lifetime.
pub(crate) async fn run(inner: Arc<Inner>) {
    let span = info_span!("signal", worker = %inner.worker_id);
    run_loop(inner.clone()).instrument(span).await;
    inner.signal_stopped.send_replace(true);
}

async fn run_loop(inner: Arc<Inner>) {
    {
        let mut attempt = 0u32;
        loop {
            match connect_once(&inner).await {
                Ok((conn, send, recv, observed)) => {
                    attempt = 0;
                    info!(%observed, server = %inner.config.server, "registered");
                    let end = session(&inner, &conn, send, recv, observed).await;
                    *inner.control.lock().expect("not poisoned") = None;
                    inner.pending.lock().expect("not poisoned").clear();
                    if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    warn!("signaling connection lost: {end}; reconnecting");
                    inner.status.send_replace(Status::Connecting(Some(
                        AgentError::ServerUnreachable {
                            server: inner.config.server.clone(),
                            reason: end,
                        },
                    )));
                    // Immediately, but jittered so a fleet spreads out.
                    let pause = Duration::from_millis(rand::thread_rng().gen_range(0..200));
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(_) if inner.closing.load(std::sync::atomic::Ordering::SeqCst) => return,
                Err(e) if e.is_fatal() => {
                    warn!("giving up: {e}");
                    inner.status.send_replace(Status::Failed(e));
                    return;
                }
                Err(e) => {
                    let delay = backoff(attempt);
                    debug!("registration failed: {e}; retrying in {delay:?}");
                    inner.status.send_replace(Status::Connecting(Some(e)));
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
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

type Registered = (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    SocketAddr,
);

async fn connect_once(inner: &Arc<Inner>) -> Result<Registered, AgentError> {
    let server = &inner.config.server;
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: server.clone(),
        reason,
    };
    let addr = resolve(server).await?;
    *inner.server_addr.lock().expect("not poisoned") = Some(addr);
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
    let conn = match tokio::time::timeout(inner.config.server_connect_timeout, connecting).await {
        Ok(Ok(c)) => c,
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
            return Err(unreachable(e.to_string()));
        }
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {:.1} s",
                inner.config.server_connect_timeout.as_secs_f64()
            )))
        }
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let token_proof = match &inner.config.token {
        Some(t) => {
            let mut exporter = [0u8; 32];
            conn.export_keying_material(&mut exporter, TOKEN_PROOF_LABEL, b"")
                .map_err(|_| AgentError::Io("TLS exporter unavailable".into()))?;
            Some(punch_tls::token_proof(t, &exporter))
        }
        None => None,
    };
    let mut candidates = inner.local_candidates();
    candidates.extend(stun_candidates(inner).await);
    candidates.truncate(punch_protocol::signal::MAX_CANDIDATES);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        worker_id: inner.worker_id.clone(),
        public_key: inner.identity.public_key(),
        token_proof,
        ephemeral: inner.ephemeral,
        local_candidates: candidates,
        metadata: inner.config.metadata.clone(),
        kind: inner.config.kind.clone(),
        tags: inner.config.tags.clone(),
    };
    write_frame(&mut send, &ClientMsg::Hello(hello))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let first = tokio::time::timeout(
        inner.config.server_connect_timeout,
        read_frame::<ServerMsg>(&mut recv, MAX_FRAME),
    )
    .await;
    match first {
        Ok(Ok(ServerMsg::Welcome { version, observed })) => {
            if version != PROTOCOL_VERSION {
                return Err(AgentError::BadVersion(format!(
                    "server speaks version {version}, we speak {PROTOCOL_VERSION}"
                )));
            }
            Ok((conn, send, recv, punch_net::canonical(observed)))
        }
        Ok(Ok(ServerMsg::Error { code, message, .. })) => Err(match code {
            ErrorCode::BadToken => AgentError::BadToken(message),
            ErrorCode::IdTaken => AgentError::IdTaken(message),
            ErrorCode::BadVersion => AgentError::BadVersion(message),
            ErrorCode::BadRequest | ErrorCode::Malformed => AgentError::Config(message),
            other => AgentError::Server {
                code: other.as_str(),
                message,
            },
        }),
        Ok(Ok(other)) => Err(unreachable(format!("unexpected first message {other:?}"))),
        Ok(Err(e)) => Err(close_reason(&conn).unwrap_or_else(|| unreachable(e.to_string()))),
        Err(_) => Err(unreachable("no welcome in time".into())),
    }
}

/// Our mapping as each configured STUN server sees it, asked in parallel
/// (at most one second in all, so registration is never held up long).
async fn stun_candidates(inner: &Arc<Inner>) -> Vec<punch_protocol::signal::Candidate> {
    let mut asks = Vec::new();
    for s in inner.config.stun.iter().take(8) {
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
        inner.notify(ClientMsg::Nat(nat));
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
            match crate::natcheck::check(server, bind, false).await {
                Ok(r) => match r.class() {
                    Some(nat) => {
                        info!(nat = %nat.label(), mapping = nat.mapping.as_str(), filtering = nat.filtering.as_str(), "NAT classified");
                        *inner.nat.lock().expect("not poisoned") = Some(nat);
                        inner.notify(ClientMsg::Nat(nat));
                    }
                    None => debug!("NAT not classified: no STUN answer"),
                },
                Err(e) => debug!("NAT check failed: {e}"),
            }
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

async fn session(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    observed: SocketAddr,
) -> String {
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(64);
    *inner.control.lock().expect("not poisoned") = Some(tx);
    inner.status.send_replace(Status::Registered { observed });
    classify_nat(inner);
    let writer = async {
        while let Some(m) = rx.recv().await {
            if let Err(e) = write_frame(&mut send, &m).await {
                return format!("write failed: {e}");
            }
        }
        // The agent is closing: deliver what was queued (outcome reports)
        // before the connection goes.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
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
    tokio::select! {
        r = writer => r,
        r = reader => r,
        e = conn.closed() => e.to_string(),
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
