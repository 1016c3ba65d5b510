//! Keeping an established connection's path: drive the path machine, fall
//! back to the relay, punch again, and release the peer when it closes.

use super::dialing::request_offer;
use super::punching::spawn_puncher;
use super::{register, release, report};
use crate::options::DialPolicy;
use crate::path::machine::PathRole;
use crate::path::{PathAction, PathConfig, PathMachine, PathView};
use crate::socket::ActivePath;
use crate::{AgentError, Inner, RelayMode};
use punch_protocol::signal::{ClientMsg, PathKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, info_span, warn, Instrument};

/// Keeps `v` while `conn` lives and looks after its path: the policy is a
/// [`PathMachine`] (docs/paths.md); this only drives it. The dialing side
/// passes `target`, so it can ask the server for the peer again.
pub(crate) fn maintain(
    inner: &Arc<Inner>,
    v: SocketAddr,
    conn: &quinn::Connection,
    target: Option<String>,
    policy: DialPolicy,
) {
    if !inner.socket.paths.lock().expect("not poisoned").add_ref(v) {
        return;
    }
    let role = PathRole {
        dialer: target.is_some(),
        // --force-relay means the relay and nothing else, also later on: no
        // punching again, only a new relay session when the server ends one.
        may_punch: policy.relay != RelayMode::Force,
    };
    let inner = inner.clone();
    let conn = conn.clone();
    let span = info_span!("path", peer = target.as_deref().unwrap_or("incoming"), %v);
    tokio::spawn(
        async move {
            let mut m = PathMachine::new(Instant::now(), role, PathConfig::default());
            let mut repunching: Option<tokio::task::JoinHandle<bool>> = None;
            let mut channel = inner.link.channel_changes.subscribe();
            let view = |now: Instant| {
                let p = inner.socket.paths.lock().expect("not poisoned");
                PathView {
                    on_relay: matches!(p.active(v), Some(ActivePath::Relay(_))),
                    has_relay: p.has_relay(v),
                    direct_silence: p.direct_silence(v, now),
                    relay_ended: p.relay_ended_session(v),
                }
            };
            loop {
                while let Some(action) = m.poll_action() {
                    match action {
                        PathAction::RefreshRelay => {
                            let r = inner.socket.paths.lock().expect("not poisoned").relay_refresh(v);
                            if let Some((via, frame)) = r {
                                inner.socket.send_relay_control(via, &frame);
                            }
                        }
                        PathAction::FallBack { silent } => {
                            let rebind = inner.socket.paths.lock().expect("not poisoned").fall_back(v);
                            if let Some((via, frame)) = rebind {
                                warn!(silent_ms = silent.as_millis() as u64, "direct path went silent; the connection moves to the relay");
                                inner.socket.send_relay_control(via, &frame);
                                // Our NAT mapping may have changed: let the
                                // server see the new one before we punch again.
                                inner.notify(ClientMsg::Ping { req: 0 });
                                nudge(&conn);
                            }
                        }
                        PathAction::Repunch { punch, .. } => {
                            if let Some(target) = target.as_ref() {
                                repunching = Some(spawn_repunch(&inner, target, v, punch, policy));
                            }
                        }
                        PathAction::Nudge => nudge(&conn),
                    }
                }
                let wake = tokio::time::Instant::from_std(m.poll_timeout());
                let ended = inner.socket.relay_ended.notified();
                tokio::select! {
                    _ = conn.closed() => break,
                    _ = ended => {
                        // The server may have restarted ("unknown"): a
                        // signaling ping makes a dead channel known now
                        // (the new server resets it) rather than after
                        // the keep-alive's silence.
                        inner.notify(ClientMsg::Ping { req: 0 });
                        m.handle_relay_ended(Instant::now());
                    }
                    Ok(()) = channel.changed() => {
                        let now = Instant::now();
                        m.handle_channel_change(now, &view(now));
                    }
                    done = async { repunching.as_mut().expect("guarded").await }, if repunching.is_some() => {
                        repunching = None;
                        m.handle_repunch_done(Instant::now(), done.unwrap_or(false));
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        let now = Instant::now();
                        m.handle_timeout(now, &view(now));
                    }
                }
            }
            if let Some(r) = repunching {
                r.abort();
            }
            // `closed()` resolves at a local close too, before quinn has
            // sent the CONNECTION_CLOSE (and while it may repeat it,
            // draining): the route must outlive that, or the close is
            // dropped unrouted and the peer holds a dead connection until
            // its idle timeout.
            tokio::time::sleep(close_grace(conn.rtt())).await;
            release(&inner, v);
        }
        .instrument(span),
    );
}

/// How long a closed connection's route is kept: quinn drains a closed
/// connection for three probe timeouts (about 1.5 RTT + 25 ms each),
/// answering the peer's packets with the close again.
fn close_grace(rtt: Duration) -> Duration {
    (rtt * 6 + Duration::from_millis(100)).min(Duration::from_secs(3))
}

/// An ack-eliciting packet on the (maybe new) path: quinn declares what the
/// old path lost now, instead of at its next, backed-off probe timeout.
fn nudge(conn: &quinn::Connection) {
    let _ = conn.send_datagram(bytes::Bytes::from_static(&[0]));
}

fn spawn_repunch(
    inner: &Arc<Inner>,
    target: &str,
    v: SocketAddr,
    punch: bool,
    policy: DialPolicy,
) -> tokio::task::JoinHandle<bool> {
    let (inner, target) = (inner.clone(), target.to_string());
    tokio::spawn(
        async move {
            match repunch(&inner, &target, v, punch, policy).await {
                Ok(direct) => direct,
                Err(e) => {
                    debug!("re-punch failed: {e}");
                    false
                }
            }
        }
        .in_current_span(),
    )
}

/// Asks the server to introduce us to `target` again, moves the relay
/// binding to the new session and (when `punch`) punches, while a
/// connection to it runs on the relay; a validated path becomes the
/// connection's direct path. True when one was found.
async fn repunch(
    inner: &Arc<Inner>,
    target: &str,
    v: SocketAddr,
    punch: bool,
    policy: DialPolicy,
) -> Result<bool, AgentError> {
    let start = Instant::now();
    let (offer, probes) = request_offer(inner, target).await?;
    let v2 = register(inner, &offer)?;
    let r = async {
        if v2 != v {
            return Err(AgentError::PeerConnect(format!(
                "{target} answered with another key"
            )));
        }
        if !punch {
            inner.router.unregister(offer.session);
            if !offer.relay {
                return Err(AgentError::PeerConnect(
                    "the server no longer relays".into(),
                ));
            }
            crate::relay::bind(&inner.socket, inner.relay_via(), &offer, v, None).await?;
            info!(session = %offer.session, "relay bound on a new session");
            inner.events.emit(crate::AgentEvent::RelayRenewed {
                peer: target.to_string(),
                session: offer.session,
            });
            report(inner, &offer, PathKind::Relayed, start, None, false);
            return Ok(false);
        }
        info!(session = %offer.session, "punching again for a direct path");
        if offer.relay && policy.relay != RelayMode::Never {
            // Move the relay binding to the new session (and our current
            // NAT mapping).
            let (inner, offer) = (inner.clone(), offer.clone());
            tokio::spawn(async move {
                if let Err(e) =
                    crate::relay::bind(&inner.socket, inner.relay_via(), &offer, v, None).await
                {
                    debug!("re-binding the relay: {e}");
                }
            });
        }
        let ipv6 = super::punching::ipv6_pair(inner, &offer);
        let punched = spawn_puncher(inner, &offer, v, probes, policy.punch_timeout, ipv6);
        let punched = punched.await.ok().flatten();
        let kind = if punched.is_some() {
            PathKind::Direct
        } else {
            PathKind::Relayed
        };
        report(
            inner,
            &offer,
            kind,
            start,
            punched.map(|p| p.addr),
            punched.is_some_and(|p| p.via_mapped),
        );
        Ok(punched.is_some())
    }
    .await;
    release(inner, v2);
    r
}
