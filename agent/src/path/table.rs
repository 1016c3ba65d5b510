//! The path table: every peer's virtual address and the live path under it.
//!
//! Pure bookkeeping: no sockets are read or written here and every method
//! that needs the time takes `now`, so the table (and the
//! [`super::machine::PathMachine`] that decides on it) is tested without
//! I/O. The socket consults it for every datagram.

use crate::events::{PathCause, PathChange};
use punch_protocol::relay;
use punch_protocol::signal::{PathKind, SessionId};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How relay frames reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayVia {
    /// Over UDP, to the server at this address.
    Udp(SocketAddr),
    /// Over the agent's WebSocket channel (TCP).
    Tcp,
}

impl RelayVia {
    /// `"udp"` or `"tcp"`.
    pub fn transport(self) -> punch_protocol::signal::Transport {
        match self {
            RelayVia::Udp(_) => punch_protocol::signal::Transport::Udp,
            RelayVia::Tcp => punch_protocol::signal::Transport::Tcp,
        }
    }
}

/// How a peer is reached right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivePath {
    /// Straight to the peer's address.
    Direct(SocketAddr),
    /// Through the server's relay.
    Relay(RelayVia),
    /// Nothing yet: packets are dropped (QUIC retransmits).
    None,
}

#[derive(Clone, Debug)]
struct PeerPath {
    /// The peer's worker id, for what the table reports.
    peer: String,
    /// The latest session with this peer.
    session: SessionId,
    direct: Option<SocketAddr>,
    /// The extra socket the direct path leaves from (birthday method), if
    /// not the agent's own.
    direct_aux: Option<Arc<tokio::net::UdpSocket>>,
    relay: Option<RelayBinding>,
    /// When the last datagram arrived on the direct path.
    direct_rx: Option<std::time::Instant>,
    /// The session under which the direct path was found. A newer session
    /// may come from a new process of the peer (same key, restarted), for
    /// which that path is stale: its handshake says where it is now.
    direct_session: Option<SessionId>,
    /// Sessions and connections using this address; it is forgotten when
    /// the last one lets go.
    users: usize,
}

/// A relay binding: the server and the session it is bound on.
#[derive(Clone, Copy, Debug)]
struct RelayBinding {
    via: RelayVia,
    session: SessionId,
    secret: [u8; 32],
    role: punch_protocol::signal::Role,
    /// The server said it stopped relaying this session (its quota is
    /// spent): a new session is needed.
    ended: bool,
}

impl PeerPath {
    fn active(&self) -> ActivePath {
        match (self.direct, self.relay) {
            (Some(d), _) => ActivePath::Direct(d),
            (None, Some(r)) => ActivePath::Relay(r.via),
            (None, None) => ActivePath::None,
        }
    }
}

/// Per-peer virtual addresses and the live path under each.
///
/// quinn talks to a peer at a *virtual* address from 240.0.0.0/4 (reserved,
/// never routed) that stays the same for the connection's life; the socket
/// sends each datagram for it on the peer's best path (direct when
/// validated, else the relay) and labels what arrives on either path with
/// the virtual address. Switching paths therefore never changes the
/// connection quinn sees. iroh does the same with its per-peer mapped
/// addresses.
///
/// The virtual address belongs to the peer (its key), not to one session:
/// a second connection to the same peer shares it, so the same source
/// address never has to mean two things.
///
/// Every change of a peer's active path goes to the observer, if one is
/// set ([`PathTable::observe`]), with its cause: the table decides nothing
/// about it and does no I/O for it.
#[derive(Debug, Default)]
pub struct PathTable {
    peers: HashMap<SocketAddr, PeerPath>,
    by_direct: HashMap<SocketAddr, SocketAddr>,
    by_session: HashMap<SessionId, SocketAddr>,
    by_key: HashMap<punch_protocol::signal::PublicKey, SocketAddr>,
    next: u32,
    observer: Option<Observer>,
}

/// Told of every path change (while the table is locked: keep it short).
pub type PathObserver = Box<dyn Fn(PathChange) + Send + Sync>;

struct Observer(PathObserver);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// Most peers with a virtual address at once.
pub const MAX_PEERS: usize = 4096;

/// Is this one of our virtual addresses' range?
pub fn is_virtual(addr: SocketAddr) -> bool {
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => v4.octets()[0] >= 240 && !v4.is_broadcast(),
        IpAddr::V6(_) => false,
    }
}

impl PathTable {
    /// Reports every path change to `f` from now on.
    pub fn observe(&mut self, f: PathObserver) {
        self.observer = Some(Observer(f));
    }

    /// Tells the observer when `v`'s active path is no longer `before`.
    fn changed(&self, v: SocketAddr, before: Option<ActivePath>, cause: PathCause) {
        let (Some(obs), Some(p)) = (&self.observer, self.peers.get(&v)) else {
            return;
        };
        let now = p.active();
        if before == Some(now) {
            return;
        }
        let (path, remote) = match now {
            ActivePath::Direct(a) => (PathKind::Direct, Some(a)),
            ActivePath::Relay(RelayVia::Udp(a)) => (PathKind::Relayed, Some(a)),
            ActivePath::Relay(RelayVia::Tcp) => (PathKind::Relayed, None),
            ActivePath::None => return,
        };
        (obs.0)(PathChange {
            peer: p.peer.clone(),
            session: p.session,
            path,
            remote,
            cause,
        });
    }

    /// The virtual address of a session's peer `peer_id` (allocated when
    /// the peer has none), with one more user: call [`PathTable::unref`]
    /// when the session is over.
    pub fn register(
        &mut self,
        session: SessionId,
        peer_key: punch_protocol::signal::PublicKey,
        peer_id: &str,
    ) -> Option<SocketAddr> {
        let known = self
            .by_session
            .get(&session)
            .or_else(|| self.by_key.get(&peer_key))
            .copied();
        if let Some(v) = known {
            if let Some(p) = self.peers.get_mut(&v) {
                p.session = session;
                p.users += 1;
                self.by_session.insert(session, v);
                return Some(v);
            }
        }
        if self.peers.len() >= MAX_PEERS {
            return None;
        }
        self.next = self.next.wrapping_add(1) & 0x0fff_ffff;
        let n = self.next;
        let v = SocketAddr::from((
            Ipv4Addr::new(
                240 | (n >> 24) as u8,
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ),
            1,
        ));
        self.peers.insert(
            v,
            PeerPath {
                peer: peer_id.to_string(),
                session,
                direct: None,
                direct_aux: None,
                relay: None,
                direct_rx: None,
                direct_session: None,
                users: 1,
            },
        );
        self.by_session.insert(session, v);
        self.by_key.insert(peer_key, v);
        Some(v)
    }

    /// One more user of `v` (a connection); false when `v` is unknown.
    pub fn add_ref(&mut self, v: SocketAddr) -> bool {
        self.peers.get_mut(&v).map(|p| p.users += 1).is_some()
    }

    /// One user of `v` is done; the last one forgets the peer.
    pub fn unref(&mut self, v: SocketAddr) {
        if let Some(p) = self.peers.get_mut(&v) {
            p.users = p.users.saturating_sub(1);
            if p.users == 0 {
                self.remove(v);
            }
        }
    }

    /// Forgets a peer.
    fn remove(&mut self, v: SocketAddr) {
        if self.peers.remove(&v).is_some() {
            self.by_session.retain(|_, x| *x != v);
            self.by_key.retain(|_, x| *x != v);
            self.by_direct.retain(|_, x| *x != v);
        }
    }

    /// Labels datagrams from `addr` (which sent an authenticated probe of
    /// the peer's session) as coming from `v`, so QUIC packets that arrive
    /// before our own side validated the path reach the right connection.
    pub fn learn(&mut self, v: SocketAddr, addr: SocketAddr) {
        // The latest peer to probe from an address owns it: NATs reuse
        // ports, and a stale owner would misroute a new peer's packets.
        if self.peers.contains_key(&v)
            && (self.by_direct.len() < 4 * MAX_PEERS || self.by_direct.contains_key(&addr))
        {
            self.by_direct.insert(addr, v);
        }
    }

    /// Uses `addr` as the direct path (validated by probes).
    pub fn set_direct(&mut self, v: SocketAddr, addr: Option<SocketAddr>, now: Instant) {
        let before = self.active(v);
        if let Some(p) = self.peers.get_mut(&v) {
            p.direct = addr;
            p.direct_aux = None;
            p.direct_rx = Some(now);
            p.direct_session = Some(p.session);
            if let Some(a) = addr {
                self.by_direct.insert(a, v);
            }
        }
        self.changed(v, before, PathCause::Punched);
    }

    /// Uses `addr`, reached from the extra socket `aux`, as the direct path
    /// (the birthday method found it).
    pub fn set_direct_aux(
        &mut self,
        v: SocketAddr,
        addr: SocketAddr,
        aux: Arc<tokio::net::UdpSocket>,
        now: Instant,
    ) {
        let before = self.active(v);
        if let Some(p) = self.peers.get_mut(&v) {
            p.direct = Some(addr);
            p.direct_aux = Some(aux);
            p.direct_rx = Some(now);
            p.direct_session = Some(p.session);
        }
        self.changed(v, before, PathCause::Punched);
    }

    /// Is `aux` still the socket of `v`'s direct path?
    pub fn uses_aux(&self, v: SocketAddr, aux: &Arc<tokio::net::UdpSocket>) -> bool {
        self.peers
            .get(&v)
            .and_then(|p| p.direct_aux.as_ref())
            .is_some_and(|a| Arc::ptr_eq(a, aux))
    }

    /// Notes traffic on `v`'s direct path.
    pub fn touch_direct(&mut self, v: SocketAddr, now: Instant) {
        if let Some(p) = self.peers.get_mut(&v) {
            p.direct_rx = Some(now);
        }
    }

    /// Uses the relay reached `via`, bound on this session, for the peer.
    pub fn set_relay(
        &mut self,
        v: SocketAddr,
        via: RelayVia,
        session: SessionId,
        secret: [u8; 32],
        role: punch_protocol::signal::Role,
    ) {
        let before = self.active(v);
        if let Some(p) = self.peers.get_mut(&v) {
            p.relay = Some(RelayBinding {
                via,
                session,
                secret,
                role,
                ended: false,
            });
        }
        self.changed(v, before, PathCause::RelayBound);
    }

    /// Notes the server's "ended" notice for the session `v`'s relay is
    /// bound on (its MAC checked with that session's secret); returns `v`
    /// the first time.
    ///
    /// Also takes the server's "unknown" answer to a bind or data frame of
    /// ours (it does not know the session: it restarted). That one carries
    /// no MAC (the server has no secret for the session); it only leads to
    /// a new introduction, as an ended session does.
    pub fn relay_ended(&mut self, frame: &relay::Frame<'_>) -> Option<SocketAddr> {
        let (session, authenticated) = match frame {
            relay::Frame::Ended { session, .. } => (*session, true),
            relay::Frame::Unknown { session } => (*session, false),
            _ => return None,
        };
        let v = *self.by_session.get(&session)?;
        let r = self.peers.get_mut(&v)?.relay.as_mut()?;
        let verified = !authenticated || relay::verify_bind(frame, &r.secret);
        if r.ended || r.session != session || !verified {
            return None;
        }
        r.ended = true;
        Some(v)
    }

    /// The session of `v`'s relay binding, if the server ended it.
    pub fn relay_ended_session(&self, v: SocketAddr) -> Option<SessionId> {
        let r = self.peers.get(&v)?.relay?;
        r.ended.then_some(r.session)
    }

    /// How long the direct path of `v` has been silent, when it is the
    /// path in use.
    pub fn direct_silence(&self, v: SocketAddr, now: Instant) -> Option<Duration> {
        let p = self.peers.get(&v)?;
        p.direct?;
        Some(now.saturating_duration_since(p.direct_rx?))
    }

    /// Gives up the direct path of `v` for its relay binding (when it has
    /// one); returns a fresh bind request to send, since the NAT mapping
    /// the relay knows may be the one that just died.
    pub fn fall_back(&mut self, v: SocketAddr) -> Option<(RelayVia, Vec<u8>)> {
        let before = self.active(v);
        let p = self.peers.get_mut(&v)?;
        p.relay?;
        // The dead address keeps mapping to `v`: late packets from it must
        // not look like a new peer to quinn.
        p.direct.take()?;
        p.direct_aux = None;
        self.changed(v, before, PathCause::DirectLost);
        self.relay_refresh(v)
    }

    /// Does the peer have a relay binding?
    pub fn has_relay(&self, v: SocketAddr) -> bool {
        self.peers.get(&v).is_some_and(|p| p.relay.is_some())
    }

    /// The path packets to `v` take now.
    pub fn active(&self, v: SocketAddr) -> Option<ActivePath> {
        self.peers.get(&v).map(PeerPath::active)
    }

    /// A fresh bind request for the peer's relay binding, if it has one:
    /// the server drops idle bindings, and a direct path carries no relay
    /// traffic, so live connections refresh theirs.
    pub fn relay_refresh(&self, v: SocketAddr) -> Option<(RelayVia, Vec<u8>)> {
        let r = self.peers.get(&v)?.relay?;
        Some((
            r.via,
            relay::encode_bind_request(&r.secret, r.session, r.role, rand::random()),
        ))
    }

    /// Moves every relay binding to `via` (the agent's channel to the
    /// server changed: a new WebSocket, or UDP instead of TCP) and returns
    /// the bind requests that tell the server.
    pub fn move_relays(&mut self, via: RelayVia) -> Vec<(RelayVia, Vec<u8>)> {
        let mut out = Vec::new();
        for p in self.peers.values_mut() {
            if let Some(r) = &mut p.relay {
                r.via = via;
                out.push((
                    via,
                    relay::encode_bind_request(&r.secret, r.session, r.role, rand::random()),
                ));
            }
        }
        out
    }

    /// The peer whose session this is.
    pub fn peer_of_session(&self, session: &SessionId) -> Option<SocketAddr> {
        self.by_session.get(session).copied()
    }

    /// The virtual address of the peer whose direct path (or probed
    /// candidate) `from` is, noting the arrival. QUIC from a probed address
    /// makes it the path while the peer has no direct path yet (answer the
    /// way it came, rather than over the relay), and so does a new handshake (`initial`) when the path in use
    /// was found for an older session: the peer may be a new process that
    /// no longer listens there.
    pub fn direct_arrival(
        &mut self,
        from: SocketAddr,
        initial: bool,
        now: Instant,
    ) -> Option<SocketAddr> {
        let v = self.by_direct.get(&from).copied()?;
        let before = self.active(v);
        let p = self.peers.get_mut(&v)?;
        let stale = initial && p.direct != Some(from) && p.direct_session != Some(p.session);
        // Also over a bound relay: the peer sends QUIC from a probed
        // address only once its probes there were answered, so our answers
        // get through the same way (and the relay carries none of the
        // handshake of a direct connection).
        let mut cause = PathCause::PeerArrived;
        if p.direct.is_none() || stale {
            if stale {
                tracing::info!(peer = %v, %from, old = ?p.direct, "a new handshake arrives on another direct path; answering there");
                cause = PathCause::PeerMoved;
            }
            p.direct = Some(from);
            p.direct_aux = None;
            p.direct_session = Some(p.session);
        }
        if p.direct == Some(from) {
            p.direct_rx = Some(now);
        }
        self.changed(v, before, cause);
        Some(v)
    }

    /// A new handshake from `v` arrived through the relay: when the direct
    /// path in use was found for an older session (the peer may have
    /// restarted on a network where only the relay works), the relay
    /// carries our answers from now on.
    pub fn initial_via_relay(&mut self, v: SocketAddr) {
        let Some(p) = self.peers.get_mut(&v) else {
            return;
        };
        if p.direct.is_some() && p.relay.is_some() && p.direct_session != Some(p.session) {
            tracing::info!(peer = %v, old = ?p.direct, "a new handshake arrives through the relay; answering there");
            let before = p.active();
            p.direct = None;
            p.direct_aux = None;
            self.changed(v, Some(before), PathCause::PeerMoved);
        }
    }

    /// How to send to `v` now: the active path, the relay session, and the
    /// extra socket a direct path leaves from (birthday method).
    pub fn send_route(
        &self,
        v: SocketAddr,
    ) -> Option<(
        ActivePath,
        Option<SessionId>,
        Option<Arc<tokio::net::UdpSocket>>,
    )> {
        let p = self.peers.get(&v)?;
        Some((p.active(), p.relay.map(|r| r.session), p.direct_aux.clone()))
    }

    /// The session of a virtual address.
    pub fn session(&self, v: SocketAddr) -> Option<SessionId> {
        self.peers.get(&v).map(|p| p.session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_path_change_is_reported_once_with_its_cause() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut t = PathTable::default();
        let s = seen.clone();
        t.observe(Box::new(move |c| s.lock().unwrap().push(c)));
        let session = SessionId(7);
        let v = t.register(session, [1; 32], "worker-b").unwrap();
        let server: SocketAddr = "198.51.100.1:7000".parse().unwrap();
        let peer: SocketAddr = "203.0.113.9:4000".parse().unwrap();
        let now = Instant::now();
        let role = punch_protocol::signal::Role::Controlling;
        t.set_relay(v, RelayVia::Udp(server), session, [0; 32], role);
        t.set_direct(v, Some(peer), now);
        // The same path again is no change.
        t.set_direct(v, Some(peer), now);
        t.touch_direct(v, now);
        assert!(t.fall_back(v).is_some());
        // Rebinding the relay under a relayed connection changes nothing.
        t.set_relay(v, RelayVia::Udp(server), session, [0; 32], role);
        let got: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.peer.clone(), c.path, c.remote, c.cause))
            .collect();
        let b = "worker-b".to_string();
        assert_eq!(
            got,
            [
                (
                    b.clone(),
                    PathKind::Relayed,
                    Some(server),
                    PathCause::RelayBound
                ),
                (b.clone(), PathKind::Direct, Some(peer), PathCause::Punched),
                (b, PathKind::Relayed, Some(server), PathCause::DirectLost),
            ]
        );
    }
}
