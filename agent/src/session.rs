//! Punch sessions: drive the sans-IO [`Puncher`] with the agent's socket,
//! and open the peer connection over the path it validates.

use crate::peer::{PathInfo, PeerConnection};
use crate::socket::ProbeDatagram;
use crate::{AgentError, Inner, Reply};
use punch_protocol::punch::{PunchConfig, PunchEvent, PunchParams, Puncher};
use punch_protocol::signal::{ClientMsg, Offer, Outcome, PathKind, Role, ServerMsg};
use punch_tls::{Expect, KeyVerifier};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};

/// After a path is validated, keep answering the peer's probes this long so
/// its side validates too.
const ANSWER_GRACE: Duration = Duration::from_secs(3);

/// What punching found.
#[derive(Debug, Clone, Copy)]
pub struct Punched {
    pub addr: SocketAddr,
    pub rtt: Duration,
}

/// Runs a puncher in its own task. The first result goes to the returned
/// receiver; the task then keeps answering probes for [`ANSWER_GRACE`].
fn spawn_puncher(
    inner: &Arc<Inner>,
    offer: &Offer,
    mut probes: mpsc::Receiver<ProbeDatagram>,
) -> oneshot::Receiver<Option<Punched>> {
    let config = PunchConfig {
        deadline: inner.config.punch_timeout,
        ..PunchConfig::default()
    };
    let candidates: Vec<_> = offer
        .peer_candidates
        .iter()
        .filter(|c| inner.socket.supports(c.addr.ip()))
        .copied()
        .collect();
    let mut p = Puncher::new(
        PunchParams {
            session: offer.session,
            secret: offer.secret,
            role: offer.role,
            peer_candidates: &candidates,
            start_in: Duration::from_millis(offer.start_in_ms.min(5_000) as u64),
            txid_seed: rand::random(),
        },
        Instant::now(),
        config,
    );
    let (tx, rx) = oneshot::channel();
    let inner = inner.clone();
    let session = offer.session;
    tokio::spawn(
        async move {
            let mut tx = Some(tx);
            let mut stop_at: Option<Instant> = None;
            loop {
                while let Some(t) = p.poll_transmit() {
                    if let Err(e) = inner.socket.send_probe(t.dst, &t.payload) {
                        debug!(dst = %t.dst, "probe send failed: {e}");
                    }
                }
                while let Some(ev) = p.poll_event() {
                    match ev {
                        PunchEvent::Validated { addr, kind, rtt, observed } => {
                            info!(%addr, ?kind, rtt_ms = rtt.as_secs_f64() * 1e3, %observed, "path validated");
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Some(Punched { addr, rtt }));
                            }
                            stop_at = Some(Instant::now() + ANSWER_GRACE);
                        }
                        PunchEvent::TimedOut => {
                            info!(stats = ?p.stats(), "punching timed out");
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(None);
                            }
                            stop_at = Some(Instant::now());
                        }
                    }
                }
                let wake = match (p.poll_timeout(), stop_at) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(a), None) => a,
                    (None, Some(b)) => b,
                    (None, None) => Instant::now() + ANSWER_GRACE,
                };
                if stop_at.is_some_and(|s| Instant::now() >= s) {
                    break;
                }
                tokio::select! {
                    d = probes.recv() => match d {
                        Some(d) => {
                            if let Err(e) = p.handle_probe(d.from, &d.data, Instant::now()) {
                                debug!(from = %d.from, "probe rejected: {e}");
                            }
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(wake.into()) => p.handle_timeout(Instant::now()),
                }
            }
            inner.router.unregister(session);
            debug!(stats = ?p.stats(), "punch session over");
        }
        .instrument(info_span!("punch", %session, role = ?offer.role, peer = %offer.peer_id)),
    );
    rx
}

/// The controlled side: punch and let the peer dial us.
pub(crate) async fn controlled(
    inner: Arc<Inner>,
    offer: Offer,
    probes: mpsc::Receiver<ProbeDatagram>,
) {
    info!(session = %offer.session, peer = %offer.peer_id, "offer: peer wants to connect");
    inner.allow_peer(
        offer.peer_key,
        &offer.peer_id,
        inner.config.punch_timeout + Duration::from_secs(30),
    );
    let _ = spawn_puncher(&inner, &offer, probes).await;
}

/// The controlling side of `Agent::connect`.
pub(crate) async fn connect(
    inner: &Arc<Inner>,
    target: &str,
) -> Result<PeerConnection, AgentError> {
    punch_protocol::signal::validate_worker_id(target)
        .map_err(|e| AgentError::Config(format!("target {target:?}: {e}")))?;
    let start = Instant::now();
    let reply = inner
        .request(
            |req| ClientMsg::Connect {
                req,
                target: target.to_string(),
            },
            Duration::from_secs(10),
        )
        .await?;
    let (offer, probes) = match reply {
        Reply::Offer(o, p) => (o, p),
        Reply::Msg(ServerMsg::Error { code, message, .. }) => {
            return Err(AgentError::from_code(code, message, target))
        }
        Reply::Msg(other) => return Err(AgentError::Io(format!("unexpected answer {other:?}"))),
    };
    if offer.role != Role::Controlling || offer.peer_id != target {
        inner.router.unregister(offer.session);
        return Err(AgentError::Io("server sent an inconsistent offer".into()));
    }
    let span = info_span!("connect", session = %offer.session, peer = %target);
    async {
        info!(candidates = ?offer.peer_candidates, "offer received; punching");
        let punched = spawn_puncher(inner, &offer, probes).await.ok().flatten();
        let Some(punched) = punched else {
            report(inner, &offer, PathKind::Failed, start, None);
            return Err(AgentError::PunchTimeout {
                target: target.to_string(),
                secs: inner.config.punch_timeout.as_secs_f64(),
            });
        };
        let verifier = KeyVerifier::new(Expect::Key(offer.peer_key));
        let mut cfg =
            punch_tls::client_config(&inner.identity, verifier, punch_protocol::ALPN_PEER)?;
        cfg.transport_config(Arc::new(crate::peer::peer_transport(inner.config.keep_alive)));
        let connecting = inner
            .endpoint
            .connect_with(cfg, punched.addr, "punch-peer")
            .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
        let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                report(inner, &offer, PathKind::Failed, start, Some(punched.addr));
                return Err(AgentError::PeerConnect(e.to_string()));
            }
            Err(_) => {
                report(inner, &offer, PathKind::Failed, start, Some(punched.addr));
                return Err(AgentError::PeerConnect(
                    "QUIC handshake over the punched path timed out".into(),
                ));
            }
        };
        let connect_time = start.elapsed();
        report(inner, &offer, PathKind::Direct, start, Some(punched.addr));
        info!(remote = %punched.addr, connect_ms = connect_time.as_secs_f64() * 1e3, "connected directly");
        Ok(PeerConnection {
            conn,
            peer_id: target.to_string(),
            path: PathInfo {
                kind: PathKind::Direct,
                remote_addr: punched.addr,
                connect_time,
                session: offer.session,
            },
        })
    }
    .instrument(span)
    .await
}

fn report(
    inner: &Arc<Inner>,
    offer: &Offer,
    path: PathKind,
    start: Instant,
    remote: Option<SocketAddr>,
) {
    if path == PathKind::Failed {
        warn!(session = %offer.session, "connect failed");
    }
    inner.notify(ClientMsg::Outcome(Outcome {
        session: offer.session,
        path,
        connect_ms: start.elapsed().as_millis().min(u32::MAX as u128) as u32,
        remote,
    }));
}
