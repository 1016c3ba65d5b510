//! Reaching a known peer while the server is away, from the address book
//! ([`crate::book`]).
//!
//! While an agent is not registered, it knocks once a second on the last
//! endpoints of its most recent peers: a probe of a standing session (one
//! the server set up between us, whose secret only the two agents and the
//! server know) with txid 0. Nobody answers a knock; it keeps our own NAT
//! open for the peer. A dialer knocks with the txid set to a new session
//! id: the peer, whose NAT lets the knock in (it has been knocking us),
//! starts the controlled side of that session with a secret derived from
//! the standing one ([`punch_protocol::probe::derive_secret`]), both punch
//! as they do for a server's offer, and the dialer opens QUIC expecting the
//! pinned key. A knock that does not verify against a standing secret is
//! dropped: a peer learns nothing, and an endpoint only ever serves the
//! key it was recorded for.

use super::dialing::dial;
use crate::book::{Entry, Standing};
use crate::options::DialPolicy;
use crate::peer::{PeerConnection, Strategy};
use crate::socket::ProbeDatagram;
use crate::{AgentError, Inner, RelayMode};
use punch_protocol::probe::{derive_secret, token_standing, Probe, ProbeKind};
use punch_protocol::signal::{Candidate, CandidateKind, Offer, Role, SessionId};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, info_span, warn, Instrument};

/// How often an unregistered agent knocks on its recent peers.
const KNOCK_EVERY: Duration = Duration::from_secs(1);
/// How many of the most recent peers it knocks on.
const KNOCK_PEERS: usize = 16;
/// How often a dialer repeats its knock until the peer answers.
const DIAL_KNOCK_EVERY: Duration = Duration::from_millis(200);
/// Probes of no running session waiting to be looked at.
const STRAY_QUEUE: usize = 64;
/// Most sessions started by knocks at once (each lives through its
/// admission window, about half a minute) ...
const MAX_ANSWERING: usize = 64;
/// ... and of those, most for one peer: no known peer takes them all.
const MAX_ANSWERING_PER_PEER: usize = 16;
/// New sessions remembered, so a repeated (or replayed) knock starts none.
const SEEN: usize = 128;

/// How many sessions without the server started, ended (connected) and
/// failed, since the agent started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DiscoveryCounts {
    /// Connects we started by knocking.
    pub started: u64,
    /// Knocks of peers we answered.
    pub answered: u64,
    /// Our connects that came up.
    pub ended: u64,
    /// Our connects that failed.
    pub failed: u64,
    /// Random walks ended ([`crate::walk`]) ...
    pub walks: u64,
    /// ... the questions they asked ...
    pub walk_questions: u64,
    /// ... of which failed (no connection or no answer) ...
    pub walk_failed: u64,
    /// ... and the workers they heard of first.
    pub walk_learned: u64,
    /// Walk questions of peers we answered.
    pub walk_answered: u64,
}

fn emit(
    inner: &Inner,
    peer: &str,
    session: SessionId,
    source: Strategy,
    phase: &'static str,
    incoming: bool,
    error: Option<AgentError>,
) {
    {
        let mut c = inner.discovery.lock().expect("not poisoned");
        match (phase, incoming) {
            ("started", true) => c.answered += 1,
            ("started", false) => c.started += 1,
            ("ended", _) => c.ended += 1,
            _ => c.failed += 1,
        }
    }
    inner
        .events
        .emit(crate::AgentEvent::Discovery(crate::events::Discovery {
            peer: peer.to_string(),
            session,
            source: source.as_str(),
            phase,
            incoming,
            error,
            learned: None,
        }));
}

/// Knocks while unregistered, answers knocks, and saves the book when it
/// changed; for the agent's lifetime.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut strays = inner.router.strays(STRAY_QUEUE);
    let mut tick = tokio::time::interval(KNOCK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = VecDeque::with_capacity(SEEN);
    let answering = Arc::new(Mutex::new(HashMap::new()));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A closed agent neither knocks nor answers knocks.
                if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                // A small file, but a disk can stall: neither on the
                // runtime nor holding the book.
                let changes = inner.book.lock().expect("not poisoned").changes();
                if let Some(w) = changes {
                    let _ = tokio::task::spawn_blocking(move || w.write()).await;
                }
                if !inner.registered() {
                    keep_knocking(&inner);
                }
            }
            d = strays.recv() => match d {
                Some(_) if inner.closing.load(std::sync::atomic::Ordering::SeqCst) => return,
                Some(d) => on_stray(&inner, d, &mut seen, &answering),
                None => return,
            },
        }
    }
}

fn keep_knocking(inner: &Inner) {
    let entries = inner.book.lock().expect("not poisoned").entries();
    for e in entries.iter().take(KNOCK_PEERS) {
        let Some(s) = e.standing.first() else {
            continue;
        };
        let knock = Probe::ping(Role::Controlled, SessionId(s.session), 0).encode(&s.secret);
        for ep in &e.endpoints {
            if inner.socket.supports(ep.ip()) {
                let _ = inner.socket.send_probe(*ep, &knock);
            }
        }
    }
}

/// A probe of no running session: a knock, if it verifies against a
/// standing session of the book.
fn on_stray(
    inner: &Arc<Inner>,
    d: ProbeDatagram,
    seen: &mut VecDeque<u64>,
    answering: &Arc<Mutex<HashMap<String, usize>>>,
) {
    let Ok(standing) = Probe::peek_session(&d.data) else {
        return;
    };
    let found = {
        let book = inner.book.lock().expect("not poisoned");
        book.by_standing(standing).map(|(e, s)| (e.clone(), s))
    };
    let source = if found.is_some() {
        Strategy::AddressBook
    } else {
        Strategy::Lan
    };
    let Some((entry, secret)) = found.or_else(|| first_meeting(inner, standing, &d)) else {
        return;
    };
    let Ok(p) = Probe::decode(&d.data, &secret) else {
        debug!(from = %d.from, "a knock that does not verify; dropped");
        return;
    };
    if p.kind != ProbeKind::Ping {
        return;
    }
    inner
        .book
        .lock()
        .expect("not poisoned")
        .saw(&entry.worker_id, d.from);
    if p.txid == 0 || p.role != Role::Controlling || seen.contains(&p.txid) {
        return;
    }
    if seen.len() >= SEEN {
        seen.pop_front();
    }
    seen.push_back(p.txid);
    {
        let a = answering.lock().expect("not poisoned");
        let (all, theirs) = (a.values().sum::<usize>(), a.get(&entry.worker_id).copied());
        if all >= MAX_ANSWERING || theirs.unwrap_or(0) >= MAX_ANSWERING_PER_PEER {
            warn!(peer = %entry.worker_id, all, "a known peer knocks, but too many sessions without the server run already");
            return;
        }
    }
    let session = SessionId(p.txid);
    let Some(probes) = inner.router.register(session) else {
        return;
    };
    let offer = book_offer(
        Role::Controlled,
        session,
        &secret,
        &entry,
        Some(d.from),
        &entry.endpoints,
    );
    info!(peer = %entry.worker_id, %session, from = %d.from, "a known peer knocks without the server: punching back");
    emit(
        inner,
        &entry.worker_id,
        session,
        source,
        "started",
        true,
        None,
    );
    let peer = entry.worker_id.clone();
    *answering
        .lock()
        .expect("not poisoned")
        .entry(peer.clone())
        .or_default() += 1;
    let (inner, answering) = (inner.clone(), answering.clone());
    tokio::spawn(async move {
        super::answering::controlled_with(inner, offer, probes, false).await;
        let mut a = answering.lock().expect("not poisoned");
        if let Some(n) = a.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                a.remove(&peer);
            }
        }
    });
}

/// A knock of the token's standing session from an agent announced on
/// the LAN at its source: that agent, as the book would have it (no
/// standing session of its own; its key the announced one, unless the
/// book pins another for its id).
fn first_meeting(
    inner: &Inner,
    standing: SessionId,
    d: &ProbeDatagram,
) -> Option<(Entry, [u8; 32])> {
    let token = inner.config.token.as_deref()?;
    let lan = inner.lan.as_ref()?;
    let (session, secret) = token_standing(token);
    if session != standing {
        return None;
    }
    let Some(p) = lan.at(d.from) else {
        debug!(from = %d.from, "a token knock from an address no LAN announcement names (yet)");
        return None;
    };
    let pinned = inner
        .book
        .lock()
        .expect("not poisoned")
        .get(&p.worker_id)
        .map(|e| e.key);
    if pinned.is_some_and(|k| k != p.key) {
        warn!(peer = %p.worker_id, from = %d.from, "a LAN knock for a worker whose pinned key is another; ignored");
        return None;
    }
    let entry = Entry {
        worker_id: p.worker_id,
        key: p.key,
        endpoints: p.endpoints,
        standing: Vec::new(),
        last_ok: 0,
        topics: Vec::new(),
    };
    Some((entry, secret))
}

/// How long a connect without the server waits for a LAN announcement of
/// its target: a peer the book knows (its remembered endpoints may do) ...
const LAN_WAIT_KNOWN: Duration = Duration::from_millis(300);
/// ... and one it does not (a first meeting: nothing else to try).
const LAN_WAIT_NEW: Duration = Duration::from_secs(2);

/// A connect to `target` without the server: to the endpoints the book
/// remembers and the LAN announces for the key the book pins, or, for a
/// first meeting, to the agent the LAN announces under that id when we
/// hold a token to prove ourselves with. `None`: nothing to try.
pub(crate) async fn without_server(
    inner: &Arc<Inner>,
    target: &str,
    policy: DialPolicy,
) -> Option<Result<PeerConnection, AgentError>> {
    let known = inner
        .book
        .lock()
        .expect("not poisoned")
        .get(target)
        .cloned();
    let token = inner.config.token.as_deref().map(token_standing);
    let seen = match &inner.lan {
        Some(l) if known.is_some() => l.find(target, LAN_WAIT_KNOWN).await,
        Some(l) if token.is_some() => l.find(target, LAN_WAIT_NEW).await,
        _ => None,
    };
    let token = token.map(|(s, secret)| Standing {
        session: s.0,
        secret,
    });
    let asked_key = known.as_ref().map(|e| e.key);
    let (entry, strategy) = match known {
        Some(mut e) => {
            let lan = crate::lan::endpoints_for(&e.key, seen.as_ref());
            let strategy = if lan.is_empty() {
                Strategy::AddressBook
            } else {
                Strategy::Lan
            };
            let mut eps = lan;
            for a in &e.endpoints {
                if !eps.contains(a) {
                    eps.push(*a);
                }
            }
            e.endpoints = eps;
            e.standing.extend(token);
            (e, strategy)
        }
        None => {
            let p = seen?;
            let e = Entry {
                worker_id: p.worker_id,
                key: p.key,
                endpoints: p.endpoints,
                standing: vec![token?],
                last_ok: 0,
                topics: Vec::new(),
            };
            (e, Strategy::Lan)
        }
    };
    let first = connect(inner, target, entry, policy, strategy).await;
    let Some(key) = asked_key.filter(|_| first.is_err()) else {
        return Some(first);
    };
    // Its endpoints did not answer: ask the peers we can reach where it is
    // now, and try once more if one knows somewhere new.
    if !exchange(inner, target, key, policy).await {
        return Some(first);
    }
    let entry = inner
        .book
        .lock()
        .expect("not poisoned")
        .get(target)
        .cloned()?;
    Some(connect(inner, target, entry, policy, Strategy::PeerExchange).await)
}

/// Most peers asked where one is.
const EXCHANGE_PEERS: usize = 3;

/// Asks up to [`EXCHANGE_PEERS`] of our most recent other peers (reached
/// without the server too) where the peer with `key` is now; true when
/// one told us an endpoint the book did not have.
async fn exchange(inner: &Arc<Inner>, target: &str, key: [u8; 32], policy: DialPolicy) -> bool {
    let others: Vec<Entry> = inner
        .book
        .lock()
        .expect("not poisoned")
        .entries()
        .into_iter()
        .filter(|e| e.worker_id != target && !e.standing.is_empty())
        .take(EXCHANGE_PEERS)
        .collect();
    for other in others {
        let id = other.worker_id.clone();
        let Ok(pc) = connect(inner, &id, other, policy, Strategy::AddressBook).await else {
            continue;
        };
        let session = pc.path.session;
        let say = |phase, error| {
            emit(
                inner,
                &id,
                session,
                Strategy::PeerExchange,
                phase,
                false,
                error,
            )
        };
        say("started", None);
        let found = super::pex::ask(&pc, &[key]).await;
        pc.close().await;
        match found {
            Ok(found) => {
                say("ended", None);
                let mut book = inner.book.lock().expect("not poisoned");
                let new = found
                    .iter()
                    .any(|f| f.key == key && book.learned(&key, &f.endpoints));
                if new {
                    info!(peer = %target, via = %id, "a peer told us where the peer is now");
                    return true;
                }
            }
            Err(e) => say("failed", Some(AgentError::PeerConnect(e.to_string()))),
        }
    }
    false
}

/// The offer a session without the server goes by, as if the server had
/// sent it: its secret derived from the standing one, the peer's key the
/// pinned one, its candidates where the knock came `from` (if it did) and
/// the remembered `endpoints`, no relay.
fn book_offer(
    role: Role,
    session: SessionId,
    standing_secret: &[u8; 32],
    peer: &Entry,
    from: Option<SocketAddr>,
    endpoints: &[SocketAddr],
) -> Offer {
    let seen = from.map(|addr| Candidate {
        addr,
        kind: CandidateKind::PeerReflexive,
    });
    let remembered = endpoints
        .iter()
        .filter(|a| Some(**a) != from)
        .map(|a| Candidate {
            addr: *a,
            kind: CandidateKind::ServerReflexive,
        });
    Offer {
        req: None,
        session,
        secret: derive_secret(standing_secret, session),
        role,
        peer_id: peer.worker_id.clone(),
        peer_key: peer.key,
        peer_candidates: seen.into_iter().chain(remembered).collect(),
        start_in_ms: 0,
        relay: false,
        peer_nat: None,
        peer_tcp_only: false,
        peer_allocator: None,
    }
}

/// Connects to `target`, known as `entry`, without the server.
async fn connect(
    inner: &Arc<Inner>,
    target: &str,
    entry: Entry,
    policy: DialPolicy,
    strategy: Strategy,
) -> Result<PeerConnection, AgentError> {
    let unreachable = |reason: String| AgentError::ServerUnreachable {
        server: inner.config.server.clone(),
        reason,
    };
    let Some(Standing {
        session: standing,
        secret: standing_secret,
    }) = entry.standing.first().copied()
    else {
        return Err(unreachable(format!(
            "not registered, and the address book has no session with {target:?}"
        )));
    };
    let endpoints: Vec<_> = entry
        .endpoints
        .iter()
        .filter(|a| inner.socket.supports(a.ip()))
        .copied()
        .collect();
    if endpoints.is_empty() {
        return Err(unreachable(format!(
            "not registered, and the address book has no endpoint of {target:?}"
        )));
    }
    let start = Instant::now();
    let session = SessionId(rand::random::<u64>() | 1);
    let offer = book_offer(
        Role::Controlling,
        session,
        &standing_secret,
        &entry,
        None,
        &endpoints,
    );
    let probes = inner
        .router
        .register(session)
        .ok_or_else(|| AgentError::PeerConnect("too many punch sessions".into()))?;
    let v = match super::register(inner, &offer) {
        Ok(v) => v,
        Err(e) => {
            inner.router.unregister(session);
            return Err(e);
        }
    };
    let _held = super::Held(inner, v);
    info!(peer = %target, %session, endpoints = ?endpoints, "not registered: knocking on the peer's last endpoints (address book)");
    emit(inner, target, session, strategy, "started", false, None);
    let knock =
        Probe::ping(Role::Controlling, SessionId(standing), session.0).encode(&standing_secret);
    let knocking = async {
        loop {
            for ep in &endpoints {
                let _ = inner.socket.send_probe(*ep, &knock);
            }
            tokio::time::sleep(DIAL_KNOCK_EVERY).await;
        }
    };
    // No relay without the server.
    let policy = DialPolicy {
        relay: RelayMode::Never,
        ..policy
    };
    let span = info_span!("connect", %session, peer = %target, serverless = true);
    let r = tokio::select! {
        r = dial(inner, target, &offer, v, probes, start, policy, Some(strategy)).instrument(span) => r,
        _ = knocking => unreachable!("knocks until the dial ends"),
    };
    match &r {
        Ok(pc) => {
            emit(inner, target, session, strategy, "ended", false, None);
            super::maintain(inner, v, &pc.conn, Some(target.to_string()), policy);
        }
        Err(e) => emit(
            inner,
            target,
            session,
            strategy,
            "failed",
            false,
            Some(e.clone()),
        ),
    }
    r
}
