//! Punch sessions: drive the sans-IO [`Puncher`] with the agent's socket,
//! bind the relay when punching is slow or impossible, and open the peer
//! connection to the peer's virtual address, whose path can change under it.

use crate::peer::{PathInfo, PeerConnection};
use crate::socket::{ActivePath, ProbeDatagram};
use crate::{AgentError, Inner, RelayMode, Reply};
use punch_protocol::punch::{PunchConfig, PunchEvent, PunchParams, Puncher};
use punch_protocol::relay;
use punch_protocol::signal::{
    ClientMsg, NatBehaviour, Offer, Outcome, PathKind, Role, ServerMsg, SessionId,
};
use punch_tls::{Expect, KeyVerifier};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};

/// After a path is validated, keep answering the peer's probes this long so
/// its side validates too.
const ANSWER_GRACE: Duration = Duration::from_secs(3);

/// How often a live connection refreshes its relay binding (the server
/// drops bindings idle for 60 s by default).
const RELAY_REFRESH: Duration = Duration::from_secs(20);

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
}

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
    let ours = *inner.nat.lock().expect("not poisoned");
    if let Some(s) = crate::birthday::spray_plan(ours, offer, &mut rand::thread_rng()) {
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
                            inner.socket.paths.lock().expect("not poisoned").set_direct(v, Some(addr));
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Some(Punched { addr, rtt, via_mapped }));
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
    let birthday::HardPlan {
        sockets, targets, ..
    } = birthday::hard_plan(ours, offer)?;
    let (tx, rx) = oneshot::channel();
    let (inner, offer) = (inner.clone(), offer.clone());
    let span = info_span!("birthday", session = %offer.session, peer = %offer.peer_id);
    tokio::spawn(
        async move {
            let limit = inner.config.punch_timeout;
            let (found, met) = birthday::hard_side(&inner, &offer, sockets, targets, limit).await;
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
                        paths.set_direct_aux(v, punched.addr, sock.clone());
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
                for s in readers {
                    tokio::spawn(aux_reader(inner.clone(), v, s, ip).in_current_span());
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
/// has carried something in the last [`AUX_IDLE`].
async fn aux_reader(
    inner: Arc<Inner>,
    v: SocketAddr,
    sock: Arc<tokio::net::UdpSocket>,
    peer: std::net::IpAddr,
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
            Ok(Ok((n, from)))
                if punch_net::canonical(from).ip() == peer
                    && !punch_protocol::probe::is_probe(&buf[..n]) =>
            {
                inner
                    .socket
                    .paths
                    .lock()
                    .expect("not poisoned")
                    .touch_direct(v);
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

/// The first direct path either punching or the birthday method finds.
async fn first_direct(
    mut punched: oneshot::Receiver<Option<Punched>>,
    birthday: Option<oneshot::Receiver<Option<Punched>>>,
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
                Ok(Some(x)) => return Some(x),
                _ => b_done = true,
            },
        }
    }
    None
}

/// Binds the relay and returns as soon as the first bind request is out
/// (the relay is then the peer's path): the server handles our frames in
/// order and holds what reaches it before the peer binds, so the handshake
/// need not wait a round trip for the bind-ok. The binding is confirmed
/// in the background; an error comes back only when it fails before the
/// first request is out.
async fn bind_relay_early(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
) -> Result<(), AgentError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (inner2, offer2) = (inner.clone(), offer.clone());
    let task = tokio::spawn(async move {
        let r = bind_relay(&inner2, &offer2, v, Some(tx)).await;
        if let Err(e) = &r {
            warn!(session = %offer2.session, "{e}");
        }
        r
    });
    match rx.await {
        Ok(()) => Ok(()),
        // Dropped unsent: the bind failed before its first request.
        Err(_) => match task.await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Io(e.to_string())),
        },
    }
}

/// Binds our side of the session on the server's relay; on success the
/// relay becomes the peer's path until a direct one is validated. With
/// `early`, the relay becomes the path as soon as the first request is
/// out, and `early` says so.
async fn bind_relay(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
    mut early: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), AgentError> {
    let via = inner
        .relay_via()
        .ok_or_else(|| AgentError::PeerConnect("no channel to the server's relay".into()))?;
    let mut rx = inner.socket.watch_binds(offer.session);
    let result = async {
        for attempt in 1..=5u32 {
            let nonce: u64 = rand::random();
            let frame = relay::encode_bind_request(&offer.secret, offer.session, offer.role, nonce);
            inner.socket.send_relay_control(via, &frame);
            if let Some(tx) = early.take() {
                inner.socket.paths.lock().expect("not poisoned").set_relay(
                    v,
                    via,
                    offer.session,
                    offer.secret,
                    offer.role,
                );
                let _ = tx.send(());
            }
            let wait = Duration::from_millis(250 * attempt as u64);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                let Ok(parsed) = relay::parse(&answer) else {
                    continue;
                };
                let ours = matches!(parsed, relay::Frame::BindOk { session, side, nonce: n, .. }
                    if session == offer.session && side == offer.role && n == nonce);
                if ours && relay::verify_bind(&parsed, &offer.secret) {
                    inner.socket.paths.lock().expect("not poisoned").set_relay(
                        v,
                        via,
                        offer.session,
                        offer.secret,
                        offer.role,
                    );
                    debug!(?via, "relay bound");
                    return Ok(());
                }
            }
        }
        Err(AgentError::PeerConnect(format!(
            "the relay ({via:?}) did not confirm the binding"
        )))
    }
    .await;
    inner.socket.unwatch_binds(offer.session);
    result
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

/// A direct path silent this long is dead (peers keep-alive every second;
/// NAT mappings expire or are flushed): the connection moves to the relay.
const DIRECT_DEAD_AFTER: Duration = Duration::from_millis(2500);
/// How often a live connection checks its path.
const PATH_CHECK: Duration = Duration::from_millis(250);
/// First re-punch after a direct path died, and after a connection started
/// (and stayed) on the relay; doubled after each failure up to the cap.
const REPUNCH_AFTER_DEATH: Duration = Duration::from_secs(1);
const REPUNCH_AFTER_RELAY_START: Duration = Duration::from_secs(30);
const REPUNCH_MAX: Duration = Duration::from_secs(300);
/// A relay session the server ended is renewed at once; a failed renewal
/// is retried after this, doubling.
const RENEW_FIRST_RETRY: Duration = Duration::from_secs(1);

/// Keeps `v` while `conn` lives and looks after its path: refreshes the
/// relay binding, moves to the relay when the direct path goes silent,
/// and (on the dialing side, which knows `target`) punches again while the
/// connection runs on the relay, so it moves back to a direct path.
pub(crate) fn hold(
    inner: &Arc<Inner>,
    v: SocketAddr,
    conn: &quinn::Connection,
    target: Option<String>,
) {
    if !inner.socket.paths.lock().expect("not poisoned").add_ref(v) {
        return;
    }
    // --force-relay means the relay and nothing else, also later on: no
    // punching again, only a new relay session when the server ends one.
    let may_punch = inner.config.relay != RelayMode::Force;
    let inner = inner.clone();
    let conn = conn.clone();
    let span = info_span!("path", peer = target.as_deref().unwrap_or("incoming"), %v);
    tokio::spawn(
        async move {
            let mut refresh = tokio::time::interval(RELAY_REFRESH);
            refresh.tick().await;
            let mut check = tokio::time::interval(PATH_CHECK);
            let mut repunch_at: Option<tokio::time::Instant> = None;
            let mut backoff = REPUNCH_AFTER_RELAY_START;
            let mut repunching: Option<tokio::task::JoinHandle<bool>> = None;
            // The ended session last renewed, and when to try it again.
            let mut renewed: Option<(SessionId, tokio::time::Instant)> = None;
            let mut renew_wait = RENEW_FIRST_RETRY;
            let mut channel = inner.channel_changes.subscribe();
            loop {
                let ended = inner.socket.relay_ended.notified();
                tokio::select! {
                    _ = conn.closed() => break,
                    _ = ended => {
                        // Seen (and acted on) by the next check.
                        check.reset_immediately();
                    }
                    Ok(()) = channel.changed() => {
                        // A new channel to the server (UDP back after TCP,
                        // say): a relayed connection tries for a direct
                        // path soon rather than after its backoff.
                        let on_relay = matches!(inner.socket.paths.lock().expect("not poisoned").active(v), Some(ActivePath::Relay(_)));
                        if on_relay && repunching.is_none() {
                            backoff = REPUNCH_AFTER_DEATH;
                            repunch_at = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                        }
                    }
                    _ = refresh.tick() => {
                        let r = inner.socket.paths.lock().expect("not poisoned").relay_refresh(v);
                        if let Some((via, frame)) = r {
                            inner.socket.send_relay_control(via, &frame);
                        }
                    }
                    done = async { repunching.as_mut().expect("guarded").await }, if repunching.is_some() => {
                        repunching = None;
                        // An ack-eliciting packet on the (maybe new) path:
                        // quinn resends what the old one lost now.
                        let _ = conn.send_datagram(bytes::Bytes::from_static(&[0]));
                        if done.unwrap_or(false) {
                            info!("direct path found again");
                            backoff = REPUNCH_AFTER_RELAY_START;
                            repunch_at = None;
                        } else {
                            backoff = (backoff * 2).min(REPUNCH_MAX);
                            repunch_at = Some(tokio::time::Instant::now() + backoff);
                            debug!(next_in = ?backoff, "re-punch found no direct path");
                        }
                    }
                    _ = check.tick() => {
                        let (silence, on_relay, ended) = {
                            let p = inner.socket.paths.lock().expect("not poisoned");
                            (p.direct_silence(v), matches!(p.active(v), Some(ActivePath::Relay(_))), p.relay_ended_session(v))
                        };
                        // The server stopped relaying our session (quota
                        // spent): a new introduction brings a new one.
                        let now = tokio::time::Instant::now();
                        if let Some(session) = ended {
                            // Another session than the one renewed last: that
                            // renewal worked, so this one goes at once; the
                            // same one still ended waits (its renewal failed).
                            if renewed.is_some_and(|(s, _)| s != session) {
                                (renewed, renew_wait) = (None, RENEW_FIRST_RETRY);
                            }
                            let due = renewed.is_none_or(|(_, at)| now >= at);
                            if on_relay && repunching.is_none() && due {
                                match target.as_ref() {
                                    Some(target) => {
                                        info!(%session, "the server ended the relay session; asking for a new one");
                                        renewed = Some((session, now + renew_wait));
                                        renew_wait = (renew_wait * 2).min(REPUNCH_MAX);
                                        repunching = Some(spawn_repunch(&inner, target, v, may_punch));
                                    }
                                    None => debug!("the server ended the relay session; the dialing side asks for a new one"),
                                }
                            }
                        }
                        let dead = silence.is_some_and(|s| s >= DIRECT_DEAD_AFTER);
                        // Without a relay, a dead direct path can only be punched again.
                        let needs_direct = on_relay || dead;
                        if dead {
                            let rebind = inner.socket.paths.lock().expect("not poisoned").fall_back(v);
                            if let Some((via, frame)) = rebind {
                                warn!(silent_ms = silence.unwrap_or_default().as_millis() as u64, "direct path went silent; the connection moves to the relay");
                                inner.socket.send_relay_control(via, &frame);
                                // Our NAT mapping may have changed: let the
                                // server see the new one before we punch again.
                                inner.notify(ClientMsg::Ping { req: 0 });
                                // An ack-eliciting packet on the new path makes
                                // quinn resend what the dead path lost now rather
                                // than at its next (backed-off) probe timeout.
                                let _ = conn.send_datagram(bytes::Bytes::from_static(&[0]));
                                backoff = REPUNCH_AFTER_DEATH;
                                repunch_at = Some(tokio::time::Instant::now() + backoff);
                            } else if repunch_at.is_none() && repunching.is_none() {
                                backoff = REPUNCH_AFTER_DEATH;
                                repunch_at = Some(tokio::time::Instant::now() + backoff);
                            }
                        } else if on_relay && repunch_at.is_none() && repunching.is_none() {
                            repunch_at = Some(tokio::time::Instant::now() + backoff);
                        }
                        if let (Some(t), Some(target)) = (repunch_at, target.as_ref()) {
                            if may_punch && needs_direct && repunching.is_none() && tokio::time::Instant::now() >= t {
                                repunch_at = None;
                                repunching = Some(spawn_repunch(&inner, target, v, true));
                            }
                        }
                    }
                }
            }
            if let Some(r) = repunching {
                r.abort();
            }
            release(&inner, v);
        }
        .instrument(span),
    );
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
            bind_relay(inner, &offer, v, None).await?;
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
                if let Err(e) = bind_relay(&inner, &offer, v, None).await {
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
            if let Err(e) = bind_relay(&inner2, &offer2, v, Some(early)).await {
                warn!(session = %offer2.session, "{e}");
            }
        });
    }
    if mode == RelayMode::Force && offer.relay {
        inner.router.unregister(offer.session);
    } else {
        let birthday = spawn_birthday(&inner, &offer, v);
        let _ = first_direct(spawn_puncher(&inner, &offer, v, probes), birthday).await;
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
    if !easy {
        crate::portmap::settle(inner, inner.started + PORTMAP_WAIT, PORTMAP_UPNP_GRACE).await;
    }
    let (mut offer, mut probes) = request_offer(inner, target).await?;
    if filtering_matters(inner, &offer) {
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
        hold(inner, v, &pc.conn, Some(target.to_string()));
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
    if mode == RelayMode::Force {
        inner.router.unregister(offer.session);
        bind_relay_early(inner, offer, v).await?;
    } else {
        let birthday = spawn_birthday(inner, offer, v);
        let punched = first_direct(spawn_puncher(inner, offer, v, probes), birthday);
        tokio::pin!(punched);
        // Bind the relay early (one packet) so falling back costs nothing.
        let mut bound = relay_ok.then(|| {
            let (inner, offer) = (inner.clone(), offer.clone());
            tokio::spawn(async move { bind_relay_early(&inner, &offer, v).await })
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
                if hopeless {
                    info!("no direct path is possible (a side has no UDP); starting on the relay at once, still punching");
                } else {
                    info!("no direct path after {:?}; starting on the relay, still punching", inner.config.relay_after);
                }
                None
            }
        };
        via_mapped = direct.is_some_and(|p| p.via_mapped);
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
        },
        virtual_addr: v,
        socket: inner.socket.clone(),
        allow_forward: inner.allow_forward.clone(),
        share: inner.share.clone(),
    })
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
