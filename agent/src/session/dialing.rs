//! The controlling side: ask the server for the peer, wait for what the
//! pair's punching method depends on, punch or fall back to the relay, and
//! dial the peer.

use super::punching::{
    first_direct, has_ipv6, ipv6_pair, spawn_birthday, spawn_puncher, BIRTHDAY_YIELDS_TO_IPV6,
};
use super::upkeep::maintain;
use super::{register, report};
use crate::options::DialPolicy;
use crate::peer::{PathInfo, PeerConnection, RelayReason, Strategy};
use crate::socket::ProbeDatagram;
use crate::{AgentError, Inner, RelayMode, Reply};
use punch_protocol::signal::{ClientMsg, NatBehaviour, Offer, PathKind, Role, ServerMsg};
use punch_tls::{Expect, KeyVerifier};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

/// A connect waits for the first port mapping attempt at most until this
/// long after the agent started ...
const PORTMAP_WAIT: Duration = Duration::from_millis(500);
/// ... and for UPnP discovery at most this long after PCP and NAT-PMP.
const PORTMAP_UPNP_GRACE: Duration = Duration::from_millis(200);

/// How long a handshake may try a validated direct path before it moves to
/// the relay (when there is one).
const HANDSHAKE_ON_DIRECT: Duration = Duration::from_millis(2500);

/// Longest a connect waits for our NAT's mapping to be classified.
const NAT_WAIT: Duration = Duration::from_millis(1500);

/// The controlling side of `Agent::connect`: through the server, or,
/// while it cannot be reached, to a peer the address book or the LAN
/// knows.
pub(crate) async fn connect(
    inner: &Arc<Inner>,
    target: &str,
    policy: DialPolicy,
) -> Result<PeerConnection, AgentError> {
    punch_protocol::signal::validate_worker_id(target)
        .map_err(|e| AgentError::Config(format!("target {target:?}: {e}")))?;
    if !inner.registered() {
        match super::serverless::without_server(inner, target, policy).await {
            // The server came back meanwhile: through it, then.
            Some(Err(_)) if inner.registered() => {}
            Some(r) => return r,
            None => {}
        }
    }
    match via_server(inner, target, policy).await {
        Err(e @ AgentError::ServerUnreachable { .. }) => {
            match super::serverless::without_server(inner, target, policy).await {
                Some(r) => r,
                None => Err(e),
            }
        }
        r => r,
    }
}

async fn via_server(
    inner: &Arc<Inner>,
    target: &str,
    policy: DialPolicy,
) -> Result<PeerConnection, AgentError> {
    let start = Instant::now();
    // A fresh agent's NAT mapping is known a few round trips after it
    // registers; the peer pair's punching method depends on it.
    let nat_wait = async {
        if inner.nat.get().started && !inner.tcp_only() {
            inner.nat.wait(|s| s.ready, Some(NAT_WAIT)).await;
        }
    };
    // Likewise the gateway's port mapping (at once when the gateway
    // answered or refused; a silent one costs at most PORTMAP_WAIT), but
    // only behind a NAT whose mapping depends on the destination: an easy
    // NAT's own mapping serves every peer as well as a granted one, and a
    // fresh connect should not pay for a gateway that never answers.
    nat_wait.await;
    let easy = inner
        .nat
        .class()
        .is_some_and(|c| c.public || c.mapping == NatBehaviour::EndpointIndependent);
    // Without UDP to the server (registered over TCP, no STUN answer), a
    // UDP port mapping serves no peer: no waiting for the gateway.
    let needs_mapping = !easy && !inner.tcp_only();
    let settle = crate::portmap::settle(inner, inner.started + PORTMAP_WAIT, PORTMAP_UPNP_GRACE);
    let (mut offer, mut probes) = if needs_mapping && has_ipv6(inner) {
        // A dual-stack agent asks at once: when the peer has IPv6 too, that
        // path needs no mapping, and a silent gateway should not cost the
        // connect its whole wait. Otherwise the mapping still counts: wait
        // for it, and ask again when it came after we asked.
        let before = inner.mapped_external();
        tokio::pin!(settle);
        let asked = request_offer(inner, target);
        tokio::pin!(asked);
        let mut settled = false;
        let (offer, probes) = loop {
            tokio::select! {
                _ = &mut settle, if !settled => settled = true,
                r = &mut asked => break r?,
            }
        };
        if ipv6_pair(inner, &offer) {
            (offer, probes)
        } else {
            if !settled {
                settle.await;
            }
            let now = inner.mapped_external();
            if now.is_some() && now != before {
                info!(peer = %target, mapped = ?now, "the gateway granted a mapping after we asked and the peer has no IPv6 path: asking again so its offer carries the mapping");
                inner.router.unregister(offer.session);
                request_offer(inner, target).await?
            } else {
                (offer, probes)
            }
        }
    } else {
        if needs_mapping {
            settle.await;
        }
        request_offer(inner, target).await?
    };
    // With an IPv6 path to try, no NAT strategy is needed first.
    if filtering_matters(inner, &offer, policy) && !ipv6_pair(inner, &offer) {
        // The peer's NAT maps per destination and ours does not: if ours
        // filters by port, only the birthday method goes direct, and the
        // peer starts its part only when our offer says so. A fresh agent
        // may still be testing its filter: wait for that, and if it is
        // strict, ask again so the peer's offer carries it.
        let left = (start + NAT_WAIT).saturating_duration_since(Instant::now());
        inner.nat.wait(|s| s.done, Some(left)).await;
        let strict = inner
            .nat
            .class()
            .is_some_and(|c| c.filtering == NatBehaviour::AddressAndPortDependent);
        if strict {
            info!(peer = %target, waited_ms = start.elapsed().as_millis() as u64, "our NAT filters by port and the peer's maps per destination: asking again so the peer runs the birthday method");
            inner.router.unregister(offer.session);
            (offer, probes) = request_offer(inner, target).await?;
        }
    }
    let v = register(inner, &offer)?;
    let _held = super::Held(inner, v);
    let span = info_span!("connect", session = %offer.session, peer = %target);
    let r = dial(inner, target, &offer, v, probes, start, policy, None)
        .instrument(span)
        .await;
    if let Ok(pc) = &r {
        maintain(inner, v, &pc.conn, Some(target.to_string()), policy);
    }
    r
}

/// Is our offer to a peer whose NAT maps per destination missing our
/// filtering, which decides whether the birthday method runs?
fn filtering_matters(inner: &Arc<Inner>, offer: &Offer, policy: DialPolicy) -> bool {
    let ours = inner.nat.class();
    let peer_hard = offer
        .peer_nat
        .is_some_and(|p| !p.public && p.endpoint_dependent());
    let ours_unsure = ours.is_some_and(|c| {
        !c.public
            && c.mapping == NatBehaviour::EndpointIndependent
            && c.filtering == NatBehaviour::Unknown
    });
    peer_hard && ours_unsure && !inner.nat.get().done && policy.relay != RelayMode::Force
}

/// Asks the server for an introduction to `target`.
pub(super) async fn request_offer(
    inner: &Arc<Inner>,
    target: &str,
) -> Result<(Offer, mpsc::Receiver<ProbeDatagram>), AgentError> {
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
    Ok((offer, probes))
}

/// Punches (or binds the relay) and opens the connection for `offer`;
/// `serverless`: the offer is not the server's but made from what the
/// address book or the LAN knows, and a direct path counts as found so.
#[allow(clippy::too_many_arguments)]
pub(super) async fn dial(
    inner: &Arc<Inner>,
    target: &str,
    offer: &Offer,
    v: SocketAddr,
    probes: mpsc::Receiver<ProbeDatagram>,
    start: Instant,
    policy: DialPolicy,
    serverless: Option<Strategy>,
) -> Result<PeerConnection, AgentError> {
    let mode = policy.relay;
    if mode == RelayMode::Force && !offer.relay {
        inner.router.unregister(offer.session);
        return Err(AgentError::PeerConnect(
            "--force-relay, but the server does not relay".into(),
        ));
    }
    let relay_ok = offer.relay && mode != RelayMode::Never;
    // Punching cannot work when either side has no UDP of its own: start
    // on the relay at once (punching still runs, in case).
    let hopeless = offer.peer_tcp_only || inner.tcp_only();
    info!(candidates = ?offer.peer_candidates, relay = relay_ok, hopeless, "offer received");
    let mut via_mapped = false;
    let mut strategy = None;
    let mut relay_reason = None;
    if mode == RelayMode::Force {
        relay_reason = Some(RelayReason::Forced);
        inner.router.unregister(offer.session);
        crate::relay::bind_early(&inner.socket, inner.relay_via(), offer, v).await?;
    } else {
        let ipv6 = ipv6_pair(inner, offer);
        let birthday = spawn_birthday(inner, offer, v, policy.punch_timeout, ipv6);
        let prefer = ipv6.then_some(BIRTHDAY_YIELDS_TO_IPV6);
        let puncher = spawn_puncher(inner, offer, v, probes, policy.punch_timeout, ipv6);
        let punched = first_direct(puncher, birthday, prefer);
        tokio::pin!(punched);
        // Bind the relay early (one packet) so falling back costs nothing.
        let mut bound = relay_ok.then(|| {
            let (inner, offer) = (inner.clone(), offer.clone());
            tokio::spawn(async move {
                crate::relay::bind_early(&inner.socket, inner.relay_via(), &offer, v).await
            })
        });
        let relay_at = tokio::time::sleep(if relay_ok && hopeless {
            Duration::ZERO
        } else if relay_ok {
            policy.relay_after
        } else {
            Duration::MAX / 4
        });
        tokio::pin!(relay_at);
        let direct = tokio::select! {
            r = &mut punched => r,
            _ = &mut relay_at => {
                relay_reason = Some(if hopeless {
                    RelayReason::UdpBlocked
                } else if both_random(inner, offer) {
                    RelayReason::BothRandom
                } else {
                    RelayReason::PeerNeverAnswered
                });
                if hopeless {
                    info!("no direct path is possible (a side has no UDP); starting on the relay at once, still punching");
                } else {
                    info!("no direct path after {:?}; starting on the relay, still punching", policy.relay_after);
                }
                None
            }
        };
        via_mapped = direct.is_some_and(|p| p.via_mapped);
        strategy = direct.map(|p| p.strategy);
        if direct.is_none() {
            let Some(b) = bound.take() else {
                report(inner, offer, PathKind::Failed, start, None, false);
                if hopeless {
                    // Same-LAN candidates were worth a try; nothing else is.
                    let who = if inner.tcp_only() {
                        "this agent"
                    } else {
                        target
                    };
                    return Err(AgentError::PeerConnect(format!(
                        "no direct path is possible: {who} has no UDP (it reaches the server only over TCP), and the relay is off (--no-relay or the server does not relay)"
                    )));
                }
                return Err(AgentError::PunchTimeout {
                    target: target.to_string(),
                    secs: policy.punch_timeout.as_secs_f64(),
                });
            };
            match b.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    report(inner, offer, PathKind::Failed, start, None, false);
                    return Err(e);
                }
                Err(e) => return Err(AgentError::Io(e.to_string())),
            }
        }
    }
    // The path the handshake starts on (it may change under the connection).
    let (start_kind, start_remote) = crate::peer::current_path(&inner.socket, v);
    let verifier = KeyVerifier::new(Expect::Key(offer.peer_key));
    let mut cfg = punch_tls::client_config(&inner.identity, verifier, punch_protocol::ALPN_PEER)?;
    cfg.transport_config(Arc::new(crate::peer::peer_transport(
        inner.config.keep_alive,
    )));
    let connecting = inner
        .endpoint
        .connect_with(cfg, inner.socket.quinn_addr(v), "punch-peer")
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    // A direct path that validated but does not carry the handshake (the
    // peer settled on another of our addresses, a mapping died) must not
    // cost the connection: after a while the handshake moves to the relay.
    let fallback = async {
        tokio::time::sleep(HANDSHAKE_ON_DIRECT).await;
        let rebind = inner
            .socket
            .paths
            .lock()
            .expect("not poisoned")
            .fall_back(v);
        if let Some((via, frame)) = rebind {
            warn!("no handshake over the direct path yet; moving it to the relay");
            inner.socket.send_relay_control(via, &frame);
        }
        std::future::pending::<()>().await
    };
    let handshake = async {
        tokio::select! {
            r = connecting => r,
            _ = fallback => unreachable!("pending forever"),
        }
    };
    let conn = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            report(inner, offer, PathKind::Failed, start, None, false);
            return Err(AgentError::PeerConnect(e.to_string()));
        }
        Err(_) => {
            report(inner, offer, PathKind::Failed, start, None, false);
            return Err(AgentError::PeerConnect(
                "QUIC handshake with the peer timed out".into(),
            ));
        }
    };
    let connect_time = start.elapsed();
    let (kind, remote) = crate::peer::current_path(&inner.socket, v);
    // A path that went direct after starting on the relay: through the
    // peer's mapping if that is where it goes.
    let via_mapped = kind == PathKind::Direct
        && (via_mapped
            || offer.peer_candidates.iter().any(|c| {
                c.kind == punch_protocol::signal::CandidateKind::Mapped && Some(c.addr) == remote
            }));
    report(inner, offer, kind, start, remote, via_mapped);
    // A path found after the start on the relay: the punch's.
    let strategy = if kind != PathKind::Direct {
        None
    } else if serverless.is_some() {
        serverless
    } else {
        strategy.or(Some(Strategy::Plain))
    };
    let port = inner.endpoint.local_addr().map_or(0, |a| a.port());
    let mut endpoints: Vec<SocketAddr> = remote
        .filter(|_| kind == PathKind::Direct)
        .into_iter()
        .collect();
    endpoints.extend(crate::book::endpoints_of(&offer.peer_candidates));
    inner.book.lock().expect("not poisoned").record(
        target,
        offer.peer_key,
        serverless.is_none().then_some(crate::book::Standing {
            session: offer.session.0,
            secret: offer.secret,
        }),
        &endpoints,
        port,
    );
    let relay_reason = (start_kind == PathKind::Relayed)
        .then_some(relay_reason)
        .flatten();
    if inner.server_speaks(5) && (strategy.is_some() || relay_reason.is_some()) {
        inner.notify(ClientMsg::OutcomeDetail {
            session: offer.session,
            strategy: strategy.map(|s| s.as_str().to_string()),
            relay_reason: relay_reason.map(|r| r.as_str().to_string()),
        });
    }
    info!(
        ?remote,
        path = kind.as_str(),
        connect_ms = connect_time.as_secs_f64() * 1e3,
        "connected"
    );
    inner.events.emit(crate::AgentEvent::PeerConnected {
        peer: target.to_string(),
        session: offer.session,
        incoming: false,
        path: kind,
        remote: remote.unwrap_or(v),
    });
    Ok(PeerConnection {
        conn,
        peer_id: target.to_string(),
        path: PathInfo {
            kind: start_kind,
            remote_addr: start_remote.or(remote).unwrap_or(v),
            connect_time,
            session: offer.session,
            via_mapped,
            strategy,
            relay_reason,
        },
        virtual_addr: v,
        socket: inner.socket.clone(),
        protocols: inner.protocols.clone(),
    })
}

/// Do both NATs map per destination with nothing to scan or predict (ours
/// draws from the whole range at random, and the peer's too as far as its
/// offer tells: a peer that reported a block or a counter is scanned)?
fn both_random(inner: &Arc<Inner>, offer: &Offer) -> bool {
    use punch_protocol::allocator::Allocator;
    let ours = inner.nat.class();
    let both = super::birthday::part(ours, offer.peer_nat) == Some(super::birthday::Part::Both);
    let our_alloc = inner.nat.alloc();
    let peer_counts = punch_protocol::predict::advertised(&offer.peer_candidates).is_some();
    let peer_random = offer
        .peer_allocator
        .is_none_or(|a| a == Allocator::Random || a == Allocator::Unknown);
    both && peer_random
        && (our_alloc == Allocator::Random || (!peer_counts && our_alloc == Allocator::Unknown))
}
