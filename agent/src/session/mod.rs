//! Punch sessions: drive the sans-IO [`Puncher`] with the agent's socket,
//! bind the relay when punching is slow or impossible, and open the peer
//! connection to the peer's virtual address, whose path can change under it.

use crate::path::machine::PathRole;
use crate::path::{PathAction, PathConfig, PathMachine, PathView};
use crate::peer::{PathInfo, PeerConnection};
use crate::peer::{RelayReason, Strategy};
use crate::socket::{ActivePath, ProbeDatagram};
use crate::{AgentError, Inner, RelayMode, Reply};
use punch_protocol::punch::{PunchConfig, PunchEvent, PunchParams, Puncher};
use punch_protocol::signal::{ClientMsg, NatBehaviour, Offer, Outcome, PathKind, Role, ServerMsg};
use punch_tls::{Expect, KeyVerifier};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};

/// After a path is validated, keep answering the peer's probes this long so
/// its side validates too.
const ANSWER_GRACE: Duration = Duration::from_secs(3);

/// A connect waits for the first port mapping attempt at most until this
/// long after the agent started ...
const PORTMAP_WAIT: Duration = Duration::from_millis(500);
/// ... and for UPnP discovery at most this long after PCP and NAT-PMP.
const PORTMAP_UPNP_GRACE: Duration = Duration::from_millis(200);

/// What punching found.
#[derive(Debug, Clone, Copy)]
pub struct Punched {
    /// The peer's validated address.
    pub addr: SocketAddr,
    /// The round trip of the validating probe.
    pub rtt: Duration,
    /// The path runs through a gateway port mapping: the peer's mapped
    /// candidate, or the peer saw us at our mapped address.
    pub via_mapped: bool,
    /// How it was found.
    pub strategy: Strategy,
}

/// Longest wait for an IPv6 path once an IPv4 one is proved.
const PREFER_IPV6: Duration = Duration::from_millis(100);

/// Runs a puncher in its own task. The first result goes to the returned
/// receiver; a validated path becomes the direct path of `v` at once (also
/// after the connection started on the relay); the task then keeps
/// answering probes for [`ANSWER_GRACE`].
fn spawn_puncher(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
    mut probes: mpsc::Receiver<ProbeDatagram>,
) -> oneshot::Receiver<Option<Punched>> {
    // With an IPv6 address of our own, an IPv6 path to the peer is worth a
    // short wait: no NAT mapping under it to change or expire.
    let have_ipv6 = has_ipv6(inner);
    let config = PunchConfig {
        deadline: inner.config.punch_timeout,
        prefer_ipv6: have_ipv6.then_some(PREFER_IPV6),
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
    let ours = *inner.nat.lock().expect("not poisoned");
    let sprayed = crate::birthday::spray_plan(ours, offer, &mut rand::thread_rng());
    let spray_ip = sprayed.as_ref().map(|s| s.ip);
    if let Some(s) = sprayed {
        info!(ip = %s.ip, ports = s.ports.len(), "birthday method: spraying the peer's ports");
        // Give the peer's extra sockets a moment to open their mappings.
        p.spray(s.ip, s.ports, Instant::now() + s.delay);
    }
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
                            let via_mapped = kind == punch_protocol::signal::CandidateKind::Mapped
                                || inner.mapped_external() == Some(observed);
                            info!(%addr, ?kind, rtt_ms = rtt.as_secs_f64() * 1e3, %observed, via_mapped, "path validated; using it");
                            inner.socket.paths.lock().expect("not poisoned").set_direct(v, Some(addr), Instant::now());
                            use punch_protocol::signal::CandidateKind as K;
                            let strategy = if addr.is_ipv6() {
                                Strategy::Ipv6
                            } else if via_mapped {
                                Strategy::PortMapping
                            } else if kind == K::Predicted {
                                Strategy::BlockScan
                            } else if kind == K::PeerReflexive && spray_ip == Some(addr.ip()) {
                                Strategy::Birthday
                            } else {
                                Strategy::Plain
                            };
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Some(Punched { addr, rtt, via_mapped, strategy }));
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
                            match p.handle_probe(d.from, &d.data, Instant::now()) {
                                Ok(()) => inner.socket.paths.lock().expect("not poisoned").learn(v, d.from),
                                Err(e) => debug!(from = %d.from, "probe rejected: {e}"),
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

/// How long after a birthday attempt starts its last new flows are made
/// (after `PunchConfig::block_scan_after`, 400 ms): the counter is read
/// anew after that.
const COUNTER_SETTLE: Duration = Duration::from_millis(600);

/// Starts the birthday method's hard side when the pair needs it (see
/// [`crate::birthday`]); a validated path becomes `v`'s direct path through
/// the extra socket that found it, and is reported on the receiver.
fn spawn_birthday(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
) -> Option<oneshot::Receiver<Option<Punched>>> {
    use crate::birthday;
    let ours = *inner.nat.lock().expect("not poisoned");
    let alloc = *inner.nat_alloc.lock().expect("not poisoned");
    let birthday::HardPlan {
        flows, strategy, ..
    } = birthday::hard_plan(ours, alloc, offer)?;
    let strategy = match strategy {
        birthday::Schedule::Birthday => Strategy::Birthday,
        birthday::Schedule::BlockScan => Strategy::BlockScan,
        birthday::Schedule::Prediction => Strategy::Prediction,
    };
    let started = Instant::now();
    let (tx, rx) = oneshot::channel();
    let (inner, offer) = (inner.clone(), offer.clone());
    let span = info_span!("birthday", session = %offer.session, peer = %offer.peer_id);
    tokio::spawn(
        async move {
            let limit = inner.config.punch_timeout;
            let (found, met) = birthday::hard_side(&inner, &offer, v, flows, limit, strategy).await;
            // Our flows moved our NAT's counter: say where it stands once
            // this punch made its last new flows (the main socket's block
            // scan starts PunchConfig::block_scan_after into it).
            {
                let inner = inner.clone();
                tokio::spawn(
                    async move {
                        tokio::time::sleep_until((started + COUNTER_SETTLE).into()).await;
                        birthday::advertise_counter(&inner).await
                    }
                    .in_current_span(),
                );
            }
            let peer_ip = offer.peer_candidates.first().map(|c| c.addr.ip());
            // The peer sends to whichever of our addresses it validated,
            // possibly one of these sockets: hand what arrives there to
            // quinn, whatever our own path is.
            let mut readers: Vec<_> = met;
            let result = match found {
                Some((sock, punched)) => {
                    let mut paths = inner.socket.paths.lock().expect("not poisoned");
                    // Ordinary punching found a path first: keep it.
                    if !matches!(paths.active(v), Some(ActivePath::Direct(_))) {
                        paths.set_direct_aux(v, punched.addr, sock.clone(), Instant::now());
                    }
                    drop(paths);
                    if !readers.iter().any(|s| Arc::ptr_eq(s, &sock)) {
                        readers.push(sock);
                    }
                    Some(punched)
                }
                None => {
                    debug!("birthday method found no path");
                    None
                }
            };
            if let Some(ip) = peer_ip {
                let params = birthday::HardParams {
                    session: offer.session,
                    secret: offer.secret,
                    role: offer.role,
                    txid_base: 0,
                };
                let until = Instant::now() + birthday::HARD_ANSWER_GRACE;
                for s in readers {
                    let answer = (params, until);
                    tokio::spawn(aux_reader(inner.clone(), v, s, ip, answer).in_current_span());
                }
            }
            let _ = tx.send(result);
        }
        .instrument(span),
    );
    Some(rx)
}

/// Hands quinn what the peer (at `peer`) sends to the extra socket
/// `sock`: while the peer is known, and while the socket is `v`'s path or
/// has carried something in the last [`AUX_IDLE`]. Until `answer`'s
/// deadline it also answers the peer's pings, as the hard side did: the
/// peer validates only on a pong.
async fn aux_reader(
    inner: Arc<Inner>,
    v: SocketAddr,
    sock: Arc<tokio::net::UdpSocket>,
    peer: std::net::IpAddr,
    answer: (crate::birthday::HardParams, Instant),
) {
    let mut buf = vec![0u8; 65_536];
    let mut last = Instant::now();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await;
        let (known, ours) = {
            let p = inner.socket.paths.lock().expect("not poisoned");
            (p.active(v).is_some(), p.uses_aux(v, &sock))
        };
        if !known || (!ours && last.elapsed() > AUX_IDLE) {
            break;
        }
        match r {
            Ok(Ok((n, from))) if punch_protocol::probe::is_probe(&buf[..n]) => {
                let from = punch_net::canonical(from);
                let pong = (Instant::now() < answer.1)
                    .then(|| crate::birthday::answer_ping(&answer.0, peer, from, &buf[..n]).ok())
                    .flatten();
                if let Some(pong) = pong {
                    let _ = sock.try_send_to(&pong, from);
                }
            }
            Ok(Ok((n, from))) if punch_net::canonical(from).ip() == peer => {
                inner
                    .socket
                    .paths
                    .lock()
                    .expect("not poisoned")
                    .touch_direct(v, Instant::now());
                last = Instant::now();
                inner
                    .socket
                    .deliver(v, bytes::Bytes::copy_from_slice(&buf[..n]));
            }
            Ok(Err(e)) => {
                debug!("extra socket failed: {e}");
                break;
            }
            _ => {}
        }
    }
    debug!("extra socket no longer the path");
}

/// An extra socket that is not the path stops being read after this long
/// without traffic.
const AUX_IDLE: Duration = Duration::from_secs(30);

/// Has this agent a global IPv6 address of its own?
fn has_ipv6(inner: &Inner) -> bool {
    inner
        .local_candidates()
        .iter()
        .any(|c| c.kind == punch_protocol::signal::CandidateKind::Local && c.addr.is_ipv6())
}

/// Does this pair have an IPv6 path to try: a global IPv6 address of
/// ours and an IPv6 candidate of the peer's?
fn ipv6_pair(inner: &Inner, offer: &Offer) -> bool {
    has_ipv6(inner)
        && offer
            .peer_candidates
            .iter()
            .any(|c| c.addr.is_ipv6() && inner.socket.supports(c.addr.ip()))
}

/// The first direct path either punching or the birthday method finds.
/// With `prefer_ipv6`, an IPv4 path the birthday method proves first waits
/// that long at most for punching to prove an IPv6 one (as the puncher
/// itself holds its own IPv4 proofs): the two race, and a lost IPv6 ping
/// should not hand the session to a NAT mapping that can expire.
async fn first_direct(
    mut punched: oneshot::Receiver<Option<Punched>>,
    birthday: Option<oneshot::Receiver<Option<Punched>>>,
    prefer_ipv6: Option<Duration>,
) -> Option<Punched> {
    let Some(mut birthday) = birthday else {
        return punched.await.ok().flatten();
    };
    let (mut p_done, mut b_done) = (false, false);
    while !(p_done && b_done) {
        tokio::select! {
            r = &mut punched, if !p_done => match r {
                Ok(Some(x)) => return Some(x),
                _ => p_done = true,
            },
            r = &mut birthday, if !b_done => match r {
                Ok(Some(x)) => {
                    let Some(wait) = prefer_ipv6.filter(|_| !p_done && x.addr.is_ipv4()) else {
                        return Some(x);
                    };
                    return match tokio::time::timeout(wait, &mut punched).await {
                        Ok(Ok(Some(p))) if p.addr.is_ipv6() => {
                            debug!(ipv4 = %x.addr, ipv6 = %p.addr, "an IPv6 path followed the birthday method's IPv4 one: using it");
                            Some(p)
                        }
                        _ => Some(x),
                    };
                }
                _ => b_done = true,
            },
        }
    }
    None
}

/// The session using `v` is over; the last user forgets the peer.
fn release(inner: &Arc<Inner>, v: SocketAddr) {
    inner.socket.paths.lock().expect("not poisoned").unref(v);
}

/// How long a handshake may try a validated direct path before it moves to
/// the relay (when there is one).
const HANDSHAKE_ON_DIRECT: Duration = Duration::from_millis(2500);

/// Longest a connect waits for our NAT's mapping to be classified.
const NAT_WAIT: Duration = Duration::from_millis(1500);

/// Keeps `v` while `conn` lives and looks after its path: the policy is a
/// [`PathMachine`] (docs/paths.md); this only drives it. The dialing side
/// passes `target`, so it can ask the server for the peer again.
pub(crate) fn maintain(
    inner: &Arc<Inner>,
    v: SocketAddr,
    conn: &quinn::Connection,
    target: Option<String>,
) {
    if !inner.socket.paths.lock().expect("not poisoned").add_ref(v) {
        return;
    }
    let role = PathRole {
        dialer: target.is_some(),
        // --force-relay means the relay and nothing else, also later on: no
        // punching again, only a new relay session when the server ends one.
        may_punch: inner.config.relay != RelayMode::Force,
    };
    let inner = inner.clone();
    let conn = conn.clone();
    let span = info_span!("path", peer = target.as_deref().unwrap_or("incoming"), %v);
    tokio::spawn(
        async move {
            let mut m = PathMachine::new(Instant::now(), role, PathConfig::default());
            let mut repunching: Option<tokio::task::JoinHandle<bool>> = None;
            let mut channel = inner.channel_changes.subscribe();
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
                                repunching = Some(spawn_repunch(&inner, target, v, punch));
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
) -> tokio::task::JoinHandle<bool> {
    let (inner, target) = (inner.clone(), target.to_string());
    tokio::spawn(
        async move {
            match repunch(&inner, &target, v, punch).await {
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
            report(inner, &offer, PathKind::Relayed, start, None, false);
            return Ok(false);
        }
        info!(session = %offer.session, "punching again for a direct path");
        if offer.relay && inner.config.relay != RelayMode::Never {
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
        let punched = spawn_puncher(inner, &offer, v, probes).await.ok().flatten();
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

fn register(inner: &Arc<Inner>, offer: &Offer) -> Result<SocketAddr, AgentError> {
    inner
        .socket
        .paths
        .lock()
        .expect("not poisoned")
        .register(offer.session, offer.peer_key)
        .ok_or_else(|| AgentError::PeerConnect("too many peers".into()))
}

/// The controlled side: punch (and bind the relay) and let the peer dial us.
pub(crate) async fn controlled(
    inner: Arc<Inner>,
    offer: Offer,
    probes: mpsc::Receiver<ProbeDatagram>,
) {
    info!(session = %offer.session, peer = %offer.peer_id, "offer: peer wants to connect");
    let v = match register(&inner, &offer) {
        Ok(v) => v,
        Err(e) => {
            warn!("{e}");
            inner.router.unregister(offer.session);
            return;
        }
    };
    let window = inner.config.punch_timeout + Duration::from_secs(30);
    inner.allow_peer(offer.peer_key, &offer.peer_id, window);
    let mode = inner.config.relay;
    if offer.relay && mode != RelayMode::Never {
        let (inner2, offer2) = (inner.clone(), offer.clone());
        tokio::spawn(async move {
            // The relay is our path from the first request on: the
            // dialer's Initial, held by the server until we bind, comes
            // right behind our bind-ok and must be answerable.
            let early = tokio::sync::oneshot::channel().0;
            if let Err(e) =
                crate::relay::bind(&inner2.socket, inner2.relay_via(), &offer2, v, Some(early))
                    .await
            {
                warn!(session = %offer2.session, "{e}");
            }
        });
    }
    if mode == RelayMode::Force && offer.relay {
        inner.router.unregister(offer.session);
    } else {
        let birthday = spawn_birthday(&inner, &offer, v);
        let prefer = ipv6_pair(&inner, &offer).then_some(PREFER_IPV6);
        let _ = first_direct(spawn_puncher(&inner, &offer, v, probes), birthday, prefer).await;
    }
    tokio::time::sleep(window).await;
    release(&inner, v);
}

/// The controlling side of `Agent::connect`.
pub(crate) async fn connect(
    inner: &Arc<Inner>,
    target: &str,
) -> Result<PeerConnection, AgentError> {
    punch_protocol::signal::validate_worker_id(target)
        .map_err(|e| AgentError::Config(format!("target {target:?}: {e}")))?;
    let start = Instant::now();
    // A fresh agent's NAT mapping is known a few round trips after it
    // registers; the peer pair's punching method depends on it.
    let nat_wait = async {
        if inner.nat_started.load(std::sync::atomic::Ordering::SeqCst) && !inner.tcp_only() {
            let mut ready = inner.nat_ready.subscribe();
            let _ = tokio::time::timeout(NAT_WAIT, ready.wait_for(|r| *r)).await;
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
        .lock()
        .expect("not poisoned")
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
    if filtering_matters(inner, &offer) && !ipv6_pair(inner, &offer) {
        // The peer's NAT maps per destination and ours does not: if ours
        // filters by port, only the birthday method goes direct, and the
        // peer starts its part only when our offer says so. A fresh agent
        // may still be testing its filter: wait for that, and if it is
        // strict, ask again so the peer's offer carries it.
        let mut done = inner.nat_done.subscribe();
        let deadline = start + NAT_WAIT;
        let _ = tokio::time::timeout_at(deadline.into(), done.wait_for(|d| *d)).await;
        let strict = inner
            .nat
            .lock()
            .expect("not poisoned")
            .is_some_and(|c| c.filtering == NatBehaviour::AddressAndPortDependent);
        if strict {
            info!(peer = %target, waited_ms = start.elapsed().as_millis() as u64, "our NAT filters by port and the peer's maps per destination: asking again so the peer runs the birthday method");
            inner.router.unregister(offer.session);
            (offer, probes) = request_offer(inner, target).await?;
        }
    }
    let v = register(inner, &offer)?;
    let span = info_span!("connect", session = %offer.session, peer = %target);
    let r = dial(inner, target, &offer, v, probes, start)
        .instrument(span)
        .await;
    if let Ok(pc) = &r {
        maintain(inner, v, &pc.conn, Some(target.to_string()));
    }
    release(inner, v);
    r
}

/// Is our offer to a peer whose NAT maps per destination missing our
/// filtering, which decides whether the birthday method runs?
fn filtering_matters(inner: &Arc<Inner>, offer: &Offer) -> bool {
    let ours = *inner.nat.lock().expect("not poisoned");
    let peer_hard = offer
        .peer_nat
        .is_some_and(|p| !p.public && p.endpoint_dependent());
    let ours_unsure = ours.is_some_and(|c| {
        !c.public
            && c.mapping == NatBehaviour::EndpointIndependent
            && c.filtering == NatBehaviour::Unknown
    });
    peer_hard && ours_unsure && !*inner.nat_done.borrow() && inner.config.relay != RelayMode::Force
}

/// Asks the server for an introduction to `target`.
async fn request_offer(
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

async fn dial(
    inner: &Arc<Inner>,
    target: &str,
    offer: &Offer,
    v: SocketAddr,
    probes: mpsc::Receiver<ProbeDatagram>,
    start: Instant,
) -> Result<PeerConnection, AgentError> {
    let mode = inner.config.relay;
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
        let birthday = spawn_birthday(inner, offer, v);
        let prefer = ipv6_pair(inner, offer).then_some(PREFER_IPV6);
        let punched = first_direct(spawn_puncher(inner, offer, v, probes), birthday, prefer);
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
            inner.config.relay_after
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
                    info!("no direct path after {:?}; starting on the relay, still punching", inner.config.relay_after);
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
                    secs: inner.config.punch_timeout.as_secs_f64(),
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
    let strategy = if kind == PathKind::Direct {
        strategy.or(Some(Strategy::Plain))
    } else {
        None
    };
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
        allow_forward: inner.allow_forward.clone(),
        share: inner.share.clone(),
        protocols: inner.protocols.clone(),
    })
}

/// Do both NATs map per destination with nothing to scan or predict (one
/// draws from the whole range at random)?
fn both_random(inner: &Arc<Inner>, offer: &Offer) -> bool {
    use punch_protocol::allocator::Allocator;
    let ours = *inner.nat.lock().expect("not poisoned");
    let both = crate::birthday::part(ours, offer.peer_nat) == Some(crate::birthday::Part::Both);
    let our_alloc = *inner.nat_alloc.lock().expect("not poisoned");
    let peer_counts = punch_protocol::predict::advertised(&offer.peer_candidates).is_some();
    both && (our_alloc == Allocator::Random || (!peer_counts && our_alloc == Allocator::Unknown))
}

fn report(
    inner: &Arc<Inner>,
    offer: &Offer,
    path: PathKind,
    start: Instant,
    remote: Option<SocketAddr>,
    via_mapped: bool,
) {
    if path == PathKind::Failed {
        warn!(session = %offer.session, "connect failed");
    }
    inner.notify(ClientMsg::Outcome(Outcome {
        session: offer.session,
        path,
        connect_ms: start.elapsed().as_millis().min(u32::MAX as u128) as u32,
        remote,
        via_mapped,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(addr: &str, strategy: Strategy) -> Option<Punched> {
        Some(Punched {
            addr: addr.parse().unwrap(),
            rtt: Duration::from_millis(80),
            via_mapped: false,
            strategy,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_ipv6_path_just_after_the_birthday_ipv4_one_wins() {
        let (ptx, prx) = oneshot::channel();
        let (btx, brx) = oneshot::channel();
        let race = tokio::spawn(first_direct(prx, Some(brx), Some(PREFER_IPV6)));
        btx.send(found("198.51.100.7:4000", Strategy::Birthday))
            .unwrap();
        tokio::time::sleep(PREFER_IPV6 / 2).await;
        ptx.send(found("[2001:db8::7]:5000", Strategy::Ipv6))
            .unwrap();
        let won = race.await.unwrap().unwrap();
        assert_eq!(won.strategy, Strategy::Ipv6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_birthday_ipv4_path_wins_when_no_ipv6_one_comes_in_time() {
        let (ptx, prx) = oneshot::channel();
        let (btx, brx) = oneshot::channel();
        let start = tokio::time::Instant::now();
        let race = tokio::spawn(first_direct(prx, Some(brx), Some(PREFER_IPV6)));
        btx.send(found("198.51.100.7:4000", Strategy::Birthday))
            .unwrap();
        let won = race.await.unwrap().unwrap();
        assert_eq!(won.strategy, Strategy::Birthday);
        assert_eq!(start.elapsed(), PREFER_IPV6);
        drop(ptx);

        // Without an IPv6 pair the first proof wins at once.
        let (_ptx, prx) = oneshot::channel();
        let (btx, brx) = oneshot::channel();
        let start = tokio::time::Instant::now();
        let race = tokio::spawn(first_direct(prx, Some(brx), None));
        btx.send(found("198.51.100.7:4000", Strategy::Birthday))
            .unwrap();
        assert_eq!(race.await.unwrap().unwrap().strategy, Strategy::Birthday);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
