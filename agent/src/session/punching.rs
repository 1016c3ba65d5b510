//! Finding a direct path: the puncher's task, the birthday method's hard
//! side and its extra sockets, and the race between them.

use crate::peer::Strategy;
use crate::socket::{ActivePath, ProbeDatagram};
use crate::Inner;
use punch_protocol::punch::{PunchConfig, PunchEvent, PunchParams, Puncher};
use punch_protocol::signal::Offer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, Instrument};

/// After a path is validated, keep answering the peer's probes this long so
/// its side validates too.
const ANSWER_GRACE: Duration = Duration::from_secs(3);

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
pub(super) const PREFER_IPV6: Duration = Duration::from_millis(100);

/// Longest wait for punching's IPv6 proof once the birthday method proved
/// an IPv4 path first. Longer than [`PREFER_IPV6`]: the birthday method's
/// hard side (256 new sockets) and spray run beside the IPv6 pings and,
/// on a loaded host, won that race by more than 100 ms in 2 of 3 runs;
/// where IPv6 works its proof ends the wait at once, so only pairs whose
/// IPv6 is blocked pay it, on a path that already took several round trips.
pub(super) const BIRTHDAY_YIELDS_TO_IPV6: Duration = Duration::from_millis(400);

/// How long a pair with an IPv6 path to try gives it before the birthday
/// method starts (both sides wait alike, so the hard side's sockets and
/// the easy side's spray still meet). Where IPv6 works its proof comes in
/// a round trip or two and the birthday method never runs: no 256 extra
/// sockets, no NAT ports spent. Before, both ran at once, and under load
/// the birthday method's IPv4 proof sometimes came more than
/// [`BIRTHDAY_YIELDS_TO_IPV6`] before the IPv6 one (1 of 3 runs of a CI
/// lab test). By one second the puncher has sent its IPv6 candidate
/// eight rounds of pings (`PunchConfig::early_rounds`): a pair still
/// without an answer has no IPv6 path worth waiting for.
pub(super) const IPV6_HEAD_START: Duration = Duration::from_secs(1);

/// How long the birthday method waits for an IPv6 path first: on a pair
/// with one to try ([`ipv6_pair`]), [`IPV6_HEAD_START`].
fn birthday_head_start(ipv6: bool) -> Duration {
    if ipv6 {
        IPV6_HEAD_START
    } else {
        Duration::ZERO
    }
}

/// Runs a puncher in its own task, for `deadline`; `ipv6`: the pair has an
/// IPv6 path to try ([`ipv6_pair`]). The first result goes to the returned
/// receiver; a validated path becomes the direct path of `v` at once (also
/// after the connection started on the relay); the task then keeps
/// answering probes for [`ANSWER_GRACE`].
pub(super) fn spawn_puncher(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
    mut probes: mpsc::Receiver<ProbeDatagram>,
    deadline: Duration,
    ipv6: bool,
) -> oneshot::Receiver<Option<Punched>> {
    // With an IPv6 address of our own, an IPv6 path to the peer is worth a
    // short wait: no NAT mapping under it to change or expire.
    let have_ipv6 = has_ipv6(inner);
    let config = PunchConfig {
        deadline,
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
    let ours = inner.nat.class();
    let sprayed = super::birthday::spray_plan(ours, offer, &mut rand::thread_rng());
    let spray_ip = sprayed.as_ref().map(|s| s.ip);
    if let Some(s) = sprayed {
        let head_start = birthday_head_start(ipv6);
        info!(ip = %s.ip, ports = s.ports.len(), head_start_ms = head_start.as_millis() as u64, "birthday method: spraying the peer's ports");
        // Give the peer's extra sockets a moment to open their mappings
        // (they open after the same head start). A path proved before
        // then stops the puncher, and its spray with it.
        p.spray(s.ip, s.ports, Instant::now() + head_start + s.delay);
    }
    let (tx, rx) = oneshot::channel();
    let inner = inner.clone();
    let session = offer.session;
    // The birthday method's extra sockets found the path: ours would only
    // spend NAT mappings (the block scan's 63) and move the counter the
    // next peer aims at. Not where an IPv6 path may still come: the
    // birthday method's IPv4 one waits for it (`first_direct`).
    let birthday_won = {
        let inner = inner.clone();
        move || {
            if ipv6 {
                return false;
            }
            let paths = inner.socket.paths.lock().expect("not poisoned");
            paths
                .send_route(v)
                .is_some_and(|(a, _, aux)| matches!(a, ActivePath::Direct(_)) && aux.is_some())
        }
    };
    tokio::spawn(
        async move {
            let mut tx = Some(tx);
            let mut stop_at: Option<Instant> = None;
            // Only answering the peer's probes, no more pings of our own.
            let mut quiet = false;
            // The puncher's timer fired: it runs after the check below, so
            // that no round (the block scan's) goes out after the birthday
            // method's path.
            let mut due = false;
            loop {
                if tx.is_some() && birthday_won() {
                    info!("the birthday method found the path: no more pings from the main socket");
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(None);
                    }
                    stop_at = Some(Instant::now() + ANSWER_GRACE);
                    quiet = true;
                }
                if std::mem::take(&mut due) && !quiet {
                    p.handle_timeout(Instant::now());
                }
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
                let wake = match (p.poll_timeout().filter(|_| !quiet), stop_at) {
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
                    _ = tokio::time::sleep_until(wake.into()) => due = true,
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

/// How long after the birthday method found a path the counter is read:
/// no new flows come after it (see `spawn_puncher`'s `birthday_won`).
const COUNTER_AFTER_FOUND: Duration = Duration::from_millis(50);

/// Starts the birthday method's hard side when the pair needs it (see
/// [`super::birthday`]), for `limit` from now (after an IPv6 head start
/// when `ipv6`, see [`ipv6_pair`]); a validated path becomes `v`'s direct
/// path through the extra socket that found it, and is reported on the
/// receiver.
pub(super) fn spawn_birthday(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
    limit: Duration,
    ipv6: bool,
) -> Option<oneshot::Receiver<Option<Punched>>> {
    use super::birthday;
    let ours = inner.nat.class();
    let alloc = inner.nat.alloc();
    let birthday::HardPlan {
        flows, strategy, ..
    } = birthday::hard_plan(ours, alloc, offer)?;
    let strategy = match strategy {
        birthday::Schedule::Birthday => Strategy::Birthday,
        birthday::Schedule::BlockScan => Strategy::BlockScan,
        birthday::Schedule::Prediction => Strategy::Prediction,
    };
    let head_start = birthday_head_start(ipv6);
    let (tx, rx) = oneshot::channel();
    let (inner, offer) = (inner.clone(), offer.clone());
    let span = info_span!("birthday", session = %offer.session, peer = %offer.peer_id);
    tokio::spawn(
        async move {
            if !head_start.is_zero() {
                tokio::time::sleep(head_start).await;
                let direct = matches!(
                    inner.socket.paths.lock().expect("not poisoned").active(v),
                    Some(ActivePath::Direct(_))
                );
                if direct {
                    info!("birthday method not needed: a direct path came first");
                    let _ = tx.send(None);
                    return;
                }
                info!(
                    waited_ms = head_start.as_millis() as u64,
                    "no direct path yet: the birthday method starts"
                );
            }
            let started = Instant::now();
            let limit = limit.saturating_sub(head_start);
            // Our flows move our NAT's counter: say where it stands once
            // this punch made its last new flows (the main socket's block
            // scan starts PunchConfig::block_scan_after into it), also
            // while a punch that found nothing goes on: the next peer
            // must not aim at where the counter stood before it (in the
            // lab, a dialer that came while a failed punch still ran, up
            // to its 5 s, was handed the old counter and missed too).
            // A path found ends the new flows sooner (the puncher stops
            // pinging): read then, well before the next peer may come.
            let (found_tx, found_rx) = oneshot::channel::<()>();
            {
                let inner = inner.clone();
                tokio::spawn(
                    async move {
                        tokio::select! {
                            _ = tokio::time::sleep_until((started + COUNTER_SETTLE).into()) => {}
                            Ok(()) = found_rx => tokio::time::sleep(COUNTER_AFTER_FOUND).await,
                        }
                        birthday::advertise_counter(&inner).await
                    }
                    .in_current_span(),
                );
            }
            let (found, met) = birthday::hard_side(&inner, &offer, v, flows, limit, strategy).await;
            if found.is_some() {
                let _ = found_tx.send(());
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
    answer: (super::birthday::HardParams, Instant),
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
                    .then(|| super::birthday::answer_ping(&answer.0, peer, from, &buf[..n]).ok())
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
pub(super) fn has_ipv6(inner: &Inner) -> bool {
    inner
        .local_candidates()
        .iter()
        .any(|c| c.kind == punch_protocol::signal::CandidateKind::Local && c.addr.is_ipv6())
}

/// Does this pair have an IPv6 path to try: a global IPv6 address of
/// ours and an IPv6 candidate of the peer's?
pub(super) fn ipv6_pair(inner: &Inner, offer: &Offer) -> bool {
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
pub(super) async fn first_direct(
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
        let race = tokio::spawn(first_direct(prx, Some(brx), Some(BIRTHDAY_YIELDS_TO_IPV6)));
        btx.send(found("198.51.100.7:4000", Strategy::Birthday))
            .unwrap();
        tokio::time::sleep(BIRTHDAY_YIELDS_TO_IPV6 / 2).await;
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
        let race = tokio::spawn(first_direct(prx, Some(brx), Some(BIRTHDAY_YIELDS_TO_IPV6)));
        btx.send(found("198.51.100.7:4000", Strategy::Birthday))
            .unwrap();
        let won = race.await.unwrap().unwrap();
        assert_eq!(won.strategy, Strategy::Birthday);
        assert_eq!(start.elapsed(), BIRTHDAY_YIELDS_TO_IPV6);
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
