//! The server's relay table: sessions, bindings, quotas and shares.

use super::wire::{
    encode_bind_ok, encode_ended, encode_unknown, parse, side_byte, verify_bind, EndReason, Frame,
    RelayError,
};
use crate::signal::{Role, SessionId};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Relay limits.
#[derive(Clone, Debug)]
pub struct RelayLimits {
    /// Sessions held at once (introduced, bound or not).
    pub max_sessions: usize,
    /// Bytes one session may relay.
    pub session_bytes: u64,
    /// Longest life of a session.
    pub session_time: Duration,
    /// A session with no traffic this long is dropped.
    pub idle: Duration,
    /// Sessions one requester may hold (see
    /// [`RelayTable::insert_owned`]); 0 leaves only `max_sessions`.
    pub per_owner: usize,
    /// Binds for unknown sessions answered per second (the rest are
    /// dropped): bounds what a flood of made-up binds gets back.
    pub unknown_replies_per_sec: u32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_sessions: 10_000,
            session_bytes: 4 << 30,
            session_time: Duration::from_secs(24 * 3600),
            idle: Duration::from_secs(60),
            per_owner: 64,
            unknown_replies_per_sec: 2000,
        }
    }
}

/// Where a bound side of a session is: a UDP address, or a client of the
/// TCP (WebSocket) channel, named by its connection number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A UDP source address.
    Udp(SocketAddr),
    /// A WebSocket client.
    Tcp(u64),
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint::Udp(a)
    }
}

#[derive(Debug)]
struct Session {
    secret: [u8; 32],
    bound: [Option<Endpoint>; 2],
    created: Instant,
    last: Instant,
    bytes: u64,
    /// Frames from the bound side held until the other side binds (the
    /// dialer's first QUIC Initial usually arrives before its peer has
    /// bound; dropping it cost a retransmission, ~300 ms and up).
    held: Vec<Vec<u8>>,
    /// When the sides were last told the session's quota is spent.
    ended_sent: Option<Instant>,
    /// The requester it was made for, when it counts against a share.
    owner: Option<Arc<str>>,
    /// The last binds' nonces per side, newest last, and who sent them.
    nonces: [Vec<(u64, Endpoint)>; 2],
}

impl Session {
    /// Never bound nor used: its pair went direct (or is still punching),
    /// so dropping it costs nobody a live path.
    fn unused(&self) -> bool {
        self.bound == [None, None] && self.held.is_empty() && self.bytes == 0
    }
}

/// Bind nonces remembered per side of a session (agents send a fresh one
/// with every bind: a refresh every 20 s, a few retries).
pub const BIND_NONCES: usize = 16;

/// How often the sides of a spent session are told so while they send.
pub const ENDED_EVERY: Duration = Duration::from_secs(1);

/// Frames held per session until the peer binds.
pub const HOLD_FRAMES: usize = 4;
/// Bytes held per session until the peer binds (a few QUIC Initials; the
/// table's size cap bounds the total).
pub const HOLD_BYTES: usize = 5 * 1024;

/// What the server must do with a relay frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `frame` (a bind-ok) back to the sender.
    Reply(Vec<u8>),
    /// Forward the datagram unchanged to this endpoint.
    Forward(Endpoint),
    /// Kept until the peer binds; [`RelayTable::take_released`] hands it
    /// out then.
    Held,
}

/// Counters of the relay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub binds: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped: u64,
    pub expired: u64,
    /// Frames held until the peer bound, then forwarded.
    pub held: u64,
    /// Frames dropped because their session's quota was spent.
    pub quota_dropped: u64,
    /// "Ended" notices sent for spent sessions.
    pub ended_notices: u64,
    /// Unused sessions dropped to make room in their requester's share.
    pub share_evicted: u64,
    /// Sessions refused because the requester's share was all in use.
    pub share_refused: u64,
    /// Binds for sessions the table does not know, answered "unknown".
    pub unknown_replies: u64,
    /// Binds refused as replays (a known nonce from another address).
    pub replayed_binds: u64,
}

/// The server's sessions and bindings (sans-IO).
#[derive(Debug)]
pub struct RelayTable {
    limits: RelayLimits,
    sessions: HashMap<SessionId, Session>,
    /// Each requester's sessions, oldest first (bounded by the table: one
    /// entry per owned session).
    owners: HashMap<Arc<str>, VecDeque<SessionId>>,
    /// When a full table was last swept for expired sessions: a full table
    /// is swept at most once a second, not on every insert (a sweep is
    /// linear in the table).
    last_full_sweep: Option<Instant>,
    /// Frames for the caller to send: see [`take_released`](Self::take_released).
    released: Vec<(Endpoint, Vec<u8>)>,
    /// "unknown" answers left in the current second, and when it began.
    unknown_budget: (u32, Option<Instant>),
    /// Counters.
    pub stats: RelayStats,
}

impl RelayTable {
    /// An empty table.
    pub fn new(limits: RelayLimits) -> Self {
        RelayTable {
            limits,
            sessions: HashMap::new(),
            owners: HashMap::new(),
            last_full_sweep: None,
            released: Vec::new(),
            unknown_budget: (0, None),
            stats: RelayStats::default(),
        }
    }

    /// Bytes relayed so far for a session it still holds.
    pub fn session_bytes(&self, session: SessionId) -> Option<u64> {
        self.sessions.get(&session).map(|s| s.bytes)
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Allows relaying for a session the server just introduced.
    pub fn insert(
        &mut self,
        session: SessionId,
        secret: [u8; 32],
        now: Instant,
    ) -> Result<(), RelayError> {
        if self.sessions.len() >= self.limits.max_sessions {
            let due = self
                .last_full_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            if due {
                self.last_full_sweep = Some(now);
                self.expire(now);
            }
            if self.sessions.len() >= self.limits.max_sessions {
                return Err(RelayError::Full);
            }
        }
        self.sessions.insert(
            session,
            Session {
                secret,
                bound: [None, None],
                created: now,
                last: now,
                bytes: 0,
                held: Vec::new(),
                ended_sent: None,
                owner: None,
                nonces: [Vec::new(), Vec::new()],
            },
        );
        Ok(())
    }

    /// Like [`insert`](Self::insert), counted against `owner`'s share
    /// ([`RelayLimits::per_owner`]). When the share is full, the owner's
    /// oldest unused session (never bound: its pair went direct) makes
    /// room and is returned; when every one of them is in use the session
    /// is refused with [`RelayError::ShareFull`] and the offer goes out
    /// without a relay. Either way only that requester pays.
    pub fn insert_owned(
        &mut self,
        session: SessionId,
        secret: [u8; 32],
        owner: &str,
        now: Instant,
    ) -> Result<Option<SessionId>, RelayError> {
        let share = self.limits.per_owner;
        let mut evicted = None;
        if share > 0 && self.owners.get(owner).is_some_and(|q| q.len() >= share) {
            self.expire_owner(owner, now);
            let victim = self.owners.get(owner).and_then(|q| {
                q.iter()
                    .copied()
                    .find(|id| self.sessions.get(id).is_some_and(Session::unused))
            });
            if self.owners.get(owner).is_some_and(|q| q.len() >= share) {
                let Some(id) = victim else {
                    self.stats.share_refused += 1;
                    return Err(RelayError::ShareFull);
                };
                self.remove(id);
                self.stats.share_evicted += 1;
                evicted = Some(id);
            }
        }
        self.insert(session, secret, now)?;
        let key = match self.owners.get_key_value(owner) {
            Some((k, _)) => k.clone(),
            None => Arc::from(owner),
        };
        if let Some(s) = self.sessions.get_mut(&session) {
            s.owner = Some(key.clone());
        }
        self.owners.entry(key).or_default().push_back(session);
        Ok(evicted)
    }

    /// Sessions held for `owner` now.
    pub fn owned_by(&self, owner: &str) -> usize {
        self.owners.get(owner).map_or(0, VecDeque::len)
    }

    /// Drops a session and its place in its owner's list.
    fn remove(&mut self, id: SessionId) {
        if let Some(Session {
            owner: Some(owner), ..
        }) = self.sessions.remove(&id)
        {
            disown(&mut self.owners, &owner, id);
        }
    }

    /// Drops `owner`'s idle and expired sessions (its list is short: a
    /// share, not the table).
    fn expire_owner(&mut self, owner: &str, now: Instant) {
        let Some(q) = self.owners.get(owner) else {
            return;
        };
        let l = &self.limits;
        let dead: Vec<SessionId> = q
            .iter()
            .copied()
            .filter(|id| {
                self.sessions
                    .get(id)
                    .is_none_or(|s| !Self::alive(l, s, now))
            })
            .collect();
        for id in dead {
            if self.sessions.contains_key(&id) {
                self.stats.expired += 1;
            }
            self.remove(id);
        }
    }

    fn alive(l: &RelayLimits, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.last) < l.idle
            && now.saturating_duration_since(s.created) < l.session_time
    }

    /// Like [`insert`](Self::insert) (or [`insert_owned`](Self::insert_owned)
    /// with an `owner`), with `side` bound at once to `peer`: in a
    /// cluster, the other server that relays for that side.
    pub fn insert_with_peer(
        &mut self,
        session: SessionId,
        secret: [u8; 32],
        side: Role,
        peer: Endpoint,
        owner: Option<&str>,
        now: Instant,
    ) -> Result<(), RelayError> {
        match owner {
            Some(o) => self.insert_owned(session, secret, o, now).map(drop)?,
            None => self.insert(session, secret, now)?,
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            s.bound[side_byte(side) as usize] = Some(peer);
        }
        Ok(())
    }

    /// Frames for the caller to send after the last
    /// [`handle`](Self::handle), each with where to: those a bind released
    /// (held while the peer had not bound; sent after the bind-ok), and
    /// the "ended" notices of a session whose quota is spent.
    pub fn take_released(&mut self) -> Vec<(Endpoint, Vec<u8>)> {
        std::mem::take(&mut self.released)
    }

    /// Drops idle and expired sessions.
    pub fn expire(&mut self, now: Instant) {
        let l = &self.limits;
        let before = self.sessions.len();
        let mut gone = Vec::new();
        self.sessions.retain(|id, s| {
            let keep = Self::alive(l, s, now);
            if !keep {
                if let Some(owner) = s.owner.take() {
                    gone.push((*id, owner));
                }
            }
            keep
        });
        self.stats.expired += (before - self.sessions.len()) as u64;
        for (id, owner) in gone {
            disown(&mut self.owners, &owner, id);
        }
    }

    /// A bind for a session we do not know: say so, within the budget.
    fn answer_unknown(&mut self, session: SessionId, now: Instant) -> Result<Action, RelayError> {
        let (left, since) = &mut self.unknown_budget;
        if since.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            *since = Some(now);
            *left = self.limits.unknown_replies_per_sec;
        }
        if *left == 0 {
            return Err(RelayError::UnknownSession);
        }
        *left -= 1;
        self.stats.unknown_replies += 1;
        Ok(Action::Reply(encode_unknown(session)))
    }

    /// Handles a relay frame of `len` bytes from `from`.
    pub fn handle(
        &mut self,
        from: impl Into<Endpoint>,
        frame: &[u8],
        now: Instant,
    ) -> Result<Action, RelayError> {
        let r = self.handle_inner(from.into(), frame, now);
        if r.is_err() {
            self.stats.dropped += 1;
        }
        r
    }

    fn handle_inner(
        &mut self,
        from: Endpoint,
        frame: &[u8],
        now: Instant,
    ) -> Result<Action, RelayError> {
        let parsed = parse(frame)?;
        match parsed {
            Frame::Bind {
                session,
                side,
                nonce,
                ..
            } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return self.answer_unknown(session, now);
                };
                if !verify_bind(&parsed, &s.secret) {
                    return Err(RelayError::BadMac);
                }
                let seen = &mut s.nonces[side_byte(side) as usize];
                if let Some((_, by)) = seen.iter().find(|(n, _)| *n == nonce) {
                    if *by != from {
                        self.stats.replayed_binds += 1;
                        return Err(RelayError::Replayed);
                    }
                    // A duplicate of a bind already taken: answer again.
                    return Ok(Action::Reply(encode_bind_ok(
                        &s.secret, session, side, nonce,
                    )));
                }
                if seen.len() >= BIND_NONCES {
                    seen.remove(0);
                }
                seen.push((nonce, from));
                s.bound[side_byte(side) as usize] = Some(from);
                s.last = now;
                self.stats.binds += 1;
                // Frames the other side sent before this one bound.
                if !s.held.is_empty() && s.bound[0].is_some() && s.bound[1].is_some() {
                    for f in s.held.drain(..) {
                        s.bytes += f.len() as u64;
                        self.stats.held += 1;
                        self.stats.forwarded_packets += 1;
                        self.stats.forwarded_bytes += f.len() as u64;
                        self.released.push((from, f));
                    }
                }
                Ok(Action::Reply(encode_bind_ok(
                    &s.secret, session, side, nonce,
                )))
            }
            Frame::BindOk { .. } | Frame::Ended { .. } | Frame::Unknown { .. } => {
                Err(RelayError::Malformed)
            }
            Frame::Data { session, .. } | Frame::Batch { session, .. } => {
                if !self.sessions.contains_key(&session) {
                    // The sender's relay went through a server that
                    // restarted: tell it at once (within the budget), as
                    // for a bind, so it renews instead of waiting for its
                    // next refresh.
                    return self.answer_unknown(session, now);
                }
                let l = &self.limits;
                let s = self
                    .sessions
                    .get_mut(&session)
                    .ok_or(RelayError::UnknownSession)?;
                let to = if s.bound[0] == Some(from) {
                    s.bound[1]
                } else if s.bound[1] == Some(from) {
                    s.bound[0]
                } else {
                    return Err(RelayError::NotBound);
                };
                let Some(to) = to else {
                    let held: usize = s.held.iter().map(Vec::len).sum();
                    if s.held.len() < HOLD_FRAMES && held + frame.len() <= HOLD_BYTES {
                        s.held.push(frame.to_vec());
                        s.last = now;
                        return Ok(Action::Held);
                    }
                    return Err(RelayError::PeerNotBound);
                };
                let len = frame.len() as u64;
                let spent = if s.bytes + len > l.session_bytes {
                    Some(EndReason::Bytes)
                } else if now.saturating_duration_since(s.created) >= l.session_time {
                    Some(EndReason::Time)
                } else {
                    None
                };
                if let Some(reason) = spent {
                    self.stats.quota_dropped += 1;
                    let due = s
                        .ended_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= ENDED_EVERY);
                    if due {
                        s.ended_sent = Some(now);
                        for side in s.bound.iter().flatten() {
                            let f = encode_ended(&s.secret, session, reason, rand::random());
                            self.released.push((*side, f));
                            self.stats.ended_notices += 1;
                        }
                    }
                    return Err(RelayError::Quota);
                }
                s.bytes += len;
                s.last = now;
                self.stats.forwarded_packets += 1;
                self.stats.forwarded_bytes += len;
                Ok(Action::Forward(to))
            }
        }
    }
}

/// Takes `id` off `owner`'s list (and the list off the map once empty).
fn disown(owners: &mut HashMap<Arc<str>, VecDeque<SessionId>>, owner: &str, id: SessionId) {
    if let Some(q) = owners.get_mut(owner) {
        q.retain(|x| *x != id);
        if q.is_empty() {
            owners.remove(owner);
        }
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
