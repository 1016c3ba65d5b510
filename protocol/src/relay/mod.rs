//! Relay frames and the server's relay table.
//!
//! When no direct path can be punched, the agents' QUIC packets travel
//! through the server's own UDP port inside a short header naming the
//! session; the server sees only ciphertext. A side first *binds* its
//! address to the session with a frame MAC'd with the session secret; from
//! then on the server forwards data frames between the two bound addresses
//! and nothing else (as TURN does with channel bindings). Every session has
//! byte, time and idle quotas, and the table has a size cap. A requester
//! holds at most a share of the table ([`RelayLimits::per_owner`]), so one
//! agent introducing itself in a loop cannot leave everyone else's offers
//! without a relay.
//!
//! ```text
//! bind:     magic[4] 1 session[8] side[1] nonce[8] mac[16]
//! bind-ok:  magic[4] 2 session[8] side[1] nonce[8] mac[16]
//! data:     magic[4] 3 session[8] payload…
//! batch:    magic[4] 4 session[8] (len[2] payload)…
//! ended:    magic[4] 5 session[8] reason[1] nonce[8] mac[16]
//! unknown:  magic[4] 6 session[8]
//! ```
//!
//! The server sends *ended* to both bound sides when a session's quota is
//! spent (at most once a second while frames keep coming), so the agents
//! can ask for a new session instead of waiting out a silent path. It
//! answers a bind or data for a session it does not know (it restarted)
//! with *unknown*, within a budget per second: the agents then ask for a new session under the same
//! connection, as for an ended one. *unknown* carries no MAC (the server
//! has no secret for the session); a forged one costs its receiver one new
//! introduction, and agents older than it ignore it.
//!
//! A bind's nonce is remembered per side ([`BIND_NONCES`] of them): the
//! same bind again from its own address is answered as before (a
//! duplicate), from another address it is refused as a replay.
//!
//! A batch carries several datagrams of one session in one message of the
//! TCP channel, where per-message costs dominate (a WebSocket frame, a
//! queue hop and a table lookup each); over UDP every datagram stays a
//! datagram.

use crate::signal::{Role, SessionId};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First four bytes of every relay frame (first byte outside the QUIC and
/// STUN ranges, and different from the probe magic).
pub const MAGIC: [u8; 4] = [0x0f, b'p', b'r', b'l'];
/// Bytes a data frame adds in front of the payload.
pub const DATA_HEADER: usize = 13;
const BIND_LEN: usize = 4 + 1 + 8 + 1 + 8 + 16;

/// Is this datagram a relay frame?
pub fn is_relay(d: &[u8]) -> bool {
    d.len() >= 4 && d[..4] == MAGIC
}

/// A parsed relay frame (payload borrowed).
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Bind {
        session: SessionId,
        side: Role,
        nonce: u64,
        mac: &'a [u8],
    },
    BindOk {
        session: SessionId,
        side: Role,
        nonce: u64,
        mac: &'a [u8],
    },
    Data {
        session: SessionId,
        payload: &'a [u8],
    },
    /// Several datagrams: see [`batch_items`].
    Batch { session: SessionId, body: &'a [u8] },
    /// The server stopped relaying the session.
    Ended {
        session: SessionId,
        reason: EndReason,
        nonce: u64,
        mac: &'a [u8],
    },
    /// The server does not know the session (not authenticated).
    Unknown { session: SessionId },
}

/// Why the server stopped relaying a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The session carried its byte quota.
    Bytes,
    /// The session reached its longest life.
    Time,
}

impl EndReason {
    fn byte(self) -> u8 {
        match self {
            EndReason::Bytes => 0,
            EndReason::Time => 1,
        }
    }

    /// `byte quota` or `time quota`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Bytes => "byte quota",
            EndReason::Time => "time quota",
        }
    }
}

/// Starts a batch frame for `session` in `out` (cleared first).
pub fn start_batch(out: &mut Vec<u8>, session: SessionId) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(4);
    out.extend_from_slice(&session.0.to_be_bytes());
}

/// Appends one datagram to a batch frame.
pub fn push_batch_item(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&payload[..len]);
}

/// The datagrams of a batch body as ranges into it; `None` when a length
/// runs past the end.
pub fn batch_items(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < body.len() {
        let len = u16::from_be_bytes(body.get(off..off + 2)?.try_into().ok()?) as usize;
        let start = off + 2;
        if start + len > body.len() {
            return None;
        }
        out.push(start..start + len);
        off = start + len;
    }
    Some(out)
}

/// Why a relay frame (or a new session) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("not a relay frame")]
    BadMagic,
    #[error("malformed relay frame")]
    Malformed,
    #[error("unknown relay session")]
    UnknownSession,
    #[error("relay bind MAC does not verify")]
    BadMac,
    #[error("data from an address not bound to the session")]
    NotBound,
    #[error("the peer has not bound yet")]
    PeerNotBound,
    #[error("relay session quota exhausted")]
    Quota,
    #[error("relay table full")]
    Full,
    #[error("the requester's share of the relay table is in use")]
    ShareFull,
    #[error("relay bind replayed from another address")]
    Replayed,
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

fn side_byte(r: Role) -> u8 {
    match r {
        Role::Controlling => 0,
        Role::Controlled => 1,
    }
}

fn bind_mac(secret: &[u8; 32], kind: u8, session: SessionId, side: u8, nonce: u64) -> [u8; 16] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    m.update(b"punch relay");
    m.update(&[kind]);
    m.update(&session.0.to_be_bytes());
    m.update(&[side]);
    m.update(&nonce.to_be_bytes());
    let full = m.finalize().into_bytes();
    full[..16].try_into().expect("16 bytes")
}

fn encode_bind(kind: u8, secret: &[u8; 32], session: SessionId, side: u8, nonce: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BIND_LEN);
    v.extend_from_slice(&MAGIC);
    v.push(kind);
    v.extend_from_slice(&session.0.to_be_bytes());
    v.push(side);
    v.extend_from_slice(&nonce.to_be_bytes());
    v.extend_from_slice(&bind_mac(secret, kind, session, side, nonce));
    v
}

/// A bind request from `side`.
pub fn encode_bind_request(
    secret: &[u8; 32],
    session: SessionId,
    side: Role,
    nonce: u64,
) -> Vec<u8> {
    encode_bind(1, secret, session, side_byte(side), nonce)
}

/// The server's answer to a bind.
pub fn encode_bind_ok(secret: &[u8; 32], session: SessionId, side: Role, nonce: u64) -> Vec<u8> {
    encode_bind(2, secret, session, side_byte(side), nonce)
}

/// The server's notice that it stopped relaying `session`.
pub fn encode_ended(
    secret: &[u8; 32],
    session: SessionId,
    reason: EndReason,
    nonce: u64,
) -> Vec<u8> {
    encode_bind(5, secret, session, reason.byte(), nonce)
}

/// The answer to a bind for a session the server does not know.
pub fn encode_unknown(session: SessionId) -> Vec<u8> {
    let mut v = Vec::with_capacity(DATA_HEADER);
    v.extend_from_slice(&MAGIC);
    v.push(6);
    v.extend_from_slice(&session.0.to_be_bytes());
    v
}

/// Writes a data frame header for `session` into `out[..DATA_HEADER]`.
pub fn write_data_header(out: &mut [u8], session: SessionId) {
    out[..4].copy_from_slice(&MAGIC);
    out[4] = 3;
    out[5..13].copy_from_slice(&session.0.to_be_bytes());
}

/// Verifies the MAC of a bind, bind-ok or ended frame.
pub fn verify_bind(frame: &Frame<'_>, secret: &[u8; 32]) -> bool {
    let (kind, session, side, nonce, mac) = match frame {
        Frame::Bind {
            session,
            side,
            nonce,
            mac,
        } => (1, *session, side_byte(*side), *nonce, *mac),
        Frame::BindOk {
            session,
            side,
            nonce,
            mac,
        } => (2, *session, side_byte(*side), *nonce, *mac),
        Frame::Ended {
            session,
            reason,
            nonce,
            mac,
        } => (5, *session, reason.byte(), *nonce, *mac),
        Frame::Data { .. } | Frame::Batch { .. } | Frame::Unknown { .. } => return false,
    };
    let expected = bind_mac(secret, kind, session, side, nonce);
    crate::ct_eq(mac, &expected)
}

/// Parses a relay frame.
pub fn parse(d: &[u8]) -> Result<Frame<'_>, RelayError> {
    if !is_relay(d) {
        return Err(RelayError::BadMagic);
    }
    if d.len() < DATA_HEADER {
        return Err(RelayError::Malformed);
    }
    let session = SessionId(u64::from_be_bytes(d[5..13].try_into().expect("8 bytes")));
    match d[4] {
        3 => Ok(Frame::Data {
            session,
            payload: &d[DATA_HEADER..],
        }),
        4 => {
            let body = &d[DATA_HEADER..];
            if batch_items(body).is_none() {
                return Err(RelayError::Malformed);
            }
            Ok(Frame::Batch { session, body })
        }
        6 if d.len() == DATA_HEADER => Ok(Frame::Unknown { session }),
        k @ (1 | 2 | 5) => {
            // bind, bind-ok and ended share one layout.
            if d.len() != BIND_LEN {
                return Err(RelayError::Malformed);
            }
            let nonce = u64::from_be_bytes(d[14..22].try_into().expect("8 bytes"));
            let mac = &d[22..38];
            if k == 5 {
                let reason = match d[13] {
                    0 => EndReason::Bytes,
                    1 => EndReason::Time,
                    _ => return Err(RelayError::Malformed),
                };
                return Ok(Frame::Ended {
                    session,
                    reason,
                    nonce,
                    mac,
                });
            }
            let side = match d[13] {
                0 => Role::Controlling,
                1 => Role::Controlled,
                _ => return Err(RelayError::Malformed),
            };
            Ok(if k == 1 {
                Frame::Bind {
                    session,
                    side,
                    nonce,
                    mac,
                }
            } else {
                Frame::BindOk {
                    session,
                    side,
                    nonce,
                    mac,
                }
            })
        }
        _ => Err(RelayError::Malformed),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: SessionId = SessionId(77);
    const K: [u8; 32] = [5; 32];

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 9], p))
    }

    #[test]
    fn bind_then_forward_both_ways() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits::default());
        t.insert(S, K, now).unwrap();
        let mut data = vec![0u8; DATA_HEADER + 5];
        write_data_header(&mut data, S);
        // Nobody bound yet.
        assert_eq!(t.handle(a(1), &data, now), Err(RelayError::NotBound));
        let bind = encode_bind_request(&K, S, Role::Controlling, 1);
        let Action::Reply(ok) = t.handle(a(1), &bind, now).unwrap() else {
            panic!()
        };
        assert!(verify_bind(&parse(&ok).unwrap(), &K));
        // Sent before the peer bound: held, a few and a few KB at most.
        for _ in 0..HOLD_FRAMES {
            assert_eq!(t.handle(a(1), &data, now), Ok(Action::Held));
        }
        assert_eq!(t.handle(a(1), &data, now), Err(RelayError::PeerNotBound));
        assert!(t.take_released().is_empty());
        t.handle(a(2), &encode_bind_request(&K, S, Role::Controlled, 2), now)
            .unwrap();
        // The bind releases them to the side that just bound, in order.
        let released = t.take_released();
        assert_eq!(released.len(), HOLD_FRAMES);
        assert!(released
            .iter()
            .all(|(to, f)| *to == a(2).into() && *f == data));
        assert!(t.take_released().is_empty());
        assert_eq!(t.handle(a(1), &data, now), Ok(Action::Forward(a(2).into())));
        assert_eq!(t.handle(a(2), &data, now), Ok(Action::Forward(a(1).into())));
        assert_eq!(t.handle(a(3), &data, now), Err(RelayError::NotBound));
        assert_eq!(t.stats.forwarded_packets, 2 + HOLD_FRAMES as u64);
        assert_eq!(t.stats.held, HOLD_FRAMES as u64);
    }

    #[test]
    fn large_frames_are_not_held() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits::default());
        t.insert(S, K, now).unwrap();
        t.handle(a(1), &encode_bind_request(&K, S, Role::Controlling, 1), now)
            .unwrap();
        let mut big = vec![0u8; HOLD_BYTES + 1];
        write_data_header(&mut big, S);
        assert_eq!(t.handle(a(1), &big, now), Err(RelayError::PeerNotBound));
        let mut data = vec![0u8; HOLD_BYTES - 100];
        write_data_header(&mut data, S);
        assert_eq!(t.handle(a(1), &data, now), Ok(Action::Held));
        assert_eq!(t.handle(a(1), &data, now), Err(RelayError::PeerNotBound));
    }

    #[test]
    fn a_tcp_client_and_a_udp_address_relay_to_each_other() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits::default());
        t.insert(S, K, now).unwrap();
        t.handle(
            Endpoint::Tcp(4),
            &encode_bind_request(&K, S, Role::Controlling, 1),
            now,
        )
        .unwrap();
        t.handle(a(2), &encode_bind_request(&K, S, Role::Controlled, 2), now)
            .unwrap();
        let mut data = vec![0u8; DATA_HEADER + 5];
        write_data_header(&mut data, S);
        assert_eq!(
            t.handle(Endpoint::Tcp(4), &data, now),
            Ok(Action::Forward(a(2).into()))
        );
        assert_eq!(
            t.handle(a(2), &data, now),
            Ok(Action::Forward(Endpoint::Tcp(4)))
        );
        // Another TCP client is not bound to the session.
        assert_eq!(
            t.handle(Endpoint::Tcp(5), &data, now),
            Err(RelayError::NotBound)
        );
    }

    #[test]
    fn a_bind_for_an_unknown_session_is_answered_unknown_within_a_budget() {
        let now = Instant::now();
        let limits = RelayLimits {
            unknown_replies_per_sec: 3,
            ..RelayLimits::default()
        };
        let mut t = RelayTable::new(limits);
        let bind = encode_bind_request(&K, S, Role::Controlling, 1);
        let want = Ok(Action::Reply(encode_unknown(S)));
        for _ in 0..3 {
            assert_eq!(t.handle(a(1), &bind, now), want);
        }
        // Over the budget: dropped until the next second.
        assert_eq!(t.handle(a(1), &bind, now), Err(RelayError::UnknownSession));
        let later = now + Duration::from_secs(1);
        assert_eq!(t.handle(a(1), &bind, later), want);
        assert_eq!(t.stats.unknown_replies, 4);
        // The answer parses, is never larger than the bind, and no agent
        // can make the table take it as input.
        let answer = encode_unknown(S);
        assert!(answer.len() < bind.len());
        assert_eq!(parse(&answer), Ok(Frame::Unknown { session: S }));
        assert_eq!(t.handle(a(1), &answer, later), Err(RelayError::Malformed));
        // Data for an unknown session is told the same (it would otherwise
        // wait for its next bind refresh), from the same budget.
        let mut data = vec![0u8; DATA_HEADER + 5];
        write_data_header(&mut data, S);
        assert_eq!(t.handle(a(1), &data, later), want);
        assert_eq!(t.handle(a(1), &data, later), want);
        assert_eq!(
            t.handle(a(1), &data, later),
            Err(RelayError::UnknownSession)
        );
    }

    #[test]
    fn a_bind_replayed_from_another_address_is_refused() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits::default());
        t.insert(S, K, now).unwrap();
        let bind_a = encode_bind_request(&K, S, Role::Controlling, 41);
        let bind_b = encode_bind_request(&K, S, Role::Controlled, 42);
        assert!(matches!(t.handle(a(1), &bind_a, now), Ok(Action::Reply(_))));
        assert!(matches!(t.handle(a(2), &bind_b, now), Ok(Action::Reply(_))));
        // A captured bind sent again from elsewhere does not move side A.
        assert_eq!(t.handle(a(9), &bind_a, now), Err(RelayError::Replayed));
        assert_eq!(t.stats.replayed_binds, 1);
        let mut data = vec![0u8; DATA_HEADER + 5];
        write_data_header(&mut data, S);
        assert_eq!(t.handle(a(2), &data, now), Ok(Action::Forward(a(1).into())));
        // The same bind again from its own address is a duplicate: answered.
        assert_eq!(
            t.handle(a(1), &bind_a, now),
            Ok(Action::Reply(encode_bind_ok(&K, S, Role::Controlling, 41)))
        );
        // A fresh bind (a new nonce) moves the side, as a NAT rebinding does.
        let fresh = encode_bind_request(&K, S, Role::Controlling, 43);
        assert!(matches!(t.handle(a(9), &fresh, now), Ok(Action::Reply(_))));
        assert_eq!(t.handle(a(2), &data, now), Ok(Action::Forward(a(9).into())));
        // The window is bounded: old nonces fall out of it.
        for n in 100..100 + BIND_NONCES as u64 {
            let f = encode_bind_request(&K, S, Role::Controlling, n);
            assert!(matches!(t.handle(a(9), &f, now), Ok(Action::Reply(_))));
        }
        assert!(t.sessions[&S].nonces[0].len() <= BIND_NONCES);
    }

    #[test]
    fn batches_roundtrip_and_truncated_ones_are_malformed() {
        let mut b = Vec::new();
        start_batch(&mut b, S);
        push_batch_item(&mut b, b"one");
        push_batch_item(&mut b, b"");
        push_batch_item(&mut b, &[7; 1400]);
        let Ok(Frame::Batch { session, body }) = parse(&b) else {
            panic!("not a batch")
        };
        assert_eq!(session, S);
        let items = batch_items(body).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(&body[items[0].clone()], b"one");
        assert_eq!(body[items[2].clone()].len(), 1400);
        b.pop();
        assert_eq!(parse(&b), Err(RelayError::Malformed));
    }

    #[test]
    fn forged_binds_and_unknown_sessions_are_refused() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits::default());
        t.insert(S, K, now).unwrap();
        let forged = encode_bind_request(&[6; 32], S, Role::Controlling, 1);
        assert_eq!(t.handle(a(1), &forged, now), Err(RelayError::BadMac));
        // A bind for a session the table does not know binds nothing; it
        // is told "unknown" (see the test of that budget).
        let other = encode_bind_request(&K, SessionId(78), Role::Controlling, 1);
        assert_eq!(
            t.handle(a(1), &other, now),
            Ok(Action::Reply(encode_unknown(SessionId(78))))
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats.dropped, 1);
    }

    #[test]
    fn quotas_idle_and_cap() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits {
            max_sessions: 1,
            session_bytes: 40,
            idle: Duration::from_secs(10),
            ..RelayLimits::default()
        });
        t.insert(S, K, now).unwrap();
        assert_eq!(t.insert(SessionId(2), K, now), Err(RelayError::Full));
        t.handle(a(1), &encode_bind_request(&K, S, Role::Controlling, 1), now)
            .unwrap();
        t.handle(a(2), &encode_bind_request(&K, S, Role::Controlled, 1), now)
            .unwrap();
        let mut data = vec![0u8; 30];
        write_data_header(&mut data, S);
        assert!(t.handle(a(1), &data, now).is_ok());
        assert_eq!(t.handle(a(1), &data, now), Err(RelayError::Quota));
        // Both sides are told, with the session's MAC, once a second.
        let notices = t.take_released();
        assert_eq!(
            notices.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
            vec![Endpoint::Udp(a(1)), Endpoint::Udp(a(2))]
        );
        for (_, f) in &notices {
            let parsed = parse(f).unwrap();
            assert!(matches!(
                parsed,
                Frame::Ended {
                    session: S,
                    reason: EndReason::Bytes,
                    ..
                }
            ));
            assert!(verify_bind(&parsed, &K));
            assert!(!verify_bind(&parsed, &[6; 32]));
        }
        assert_eq!(t.handle(a(2), &data, now), Err(RelayError::Quota));
        assert!(t.take_released().is_empty());
        let later = now + ENDED_EVERY;
        assert_eq!(t.handle(a(2), &data, later), Err(RelayError::Quota));
        assert_eq!(t.take_released().len(), 2);
        assert_eq!((t.stats.quota_dropped, t.stats.ended_notices), (3, 4));
        // An agent cannot forge one into the table.
        let forged = encode_ended(&K, S, EndReason::Bytes, 1);
        assert_eq!(t.handle(a(1), &forged, later), Err(RelayError::Malformed));
        t.expire(now + Duration::from_secs(11));
        assert!(t.is_empty());
        assert_eq!(t.stats.expired, 1);
        // The slot is free again.
        t.insert(SessionId(2), K, now).unwrap();
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut t = RelayTable::new(RelayLimits {
            max_sessions: 2,
            idle: Duration::from_millis(100),
            ..RelayLimits::default()
        });
        t.insert(SessionId(1), K, t0).unwrap();
        t.insert(SessionId(2), K, t0).unwrap();
        // Full, nothing idle yet: sweeps and refuses.
        assert_eq!(t.insert(SessionId(3), K, t0), Err(RelayError::Full));
        // Idle now, but the last sweep was under a second ago: refused
        // without another sweep.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(t.insert(SessionId(3), K, t1), Err(RelayError::Full));
        assert_eq!(t.len(), 2);
        // A second later the sweep runs and frees both slots.
        let t2 = t0 + Duration::from_millis(1000);
        t.insert(SessionId(3), K, t2).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats.expired, 2);
    }

    #[test]
    fn a_requester_holds_at_most_its_share() {
        let now = Instant::now();
        let mut t = RelayTable::new(RelayLimits {
            per_owner: 2,
            ..RelayLimits::default()
        });
        let id = SessionId;
        assert_eq!(t.insert_owned(id(1), K, "a", now), Ok(None));
        assert_eq!(t.insert_owned(id(2), K, "a", now), Ok(None));
        // Full share: the oldest unused session makes room.
        assert_eq!(t.insert_owned(id(3), K, "a", now), Ok(Some(id(1))));
        assert_eq!((t.owned_by("a"), t.len()), (2, 2));
        // Others are not touched by a's share.
        assert_eq!(t.insert_owned(id(10), K, "b", now), Ok(None));
        // Bound sessions are in use: never dropped for a new one.
        for s in [2, 3] {
            t.handle(
                a(1),
                &encode_bind_request(&K, id(s), Role::Controlling, 1),
                now,
            )
            .unwrap();
        }
        assert_eq!(
            t.insert_owned(id(4), K, "a", now),
            Err(RelayError::ShareFull)
        );
        assert_eq!((t.stats.share_evicted, t.stats.share_refused), (1, 1));
        assert_eq!(
            t.handle(
                a(1),
                &encode_bind_request(&K, id(1), Role::Controlling, 1),
                now
            ),
            Ok(Action::Reply(encode_unknown(id(1)))),
            "the evicted session is gone"
        );
        // Expiry frees the share (idle sessions of the owner go first).
        let later = now + RelayLimits::default().idle;
        assert_eq!(t.insert_owned(id(5), K, "a", later), Ok(None));
        assert_eq!(t.owned_by("a"), 1);
        t.expire(later + RelayLimits::default().idle);
        assert!(t.is_empty());
        assert_eq!((t.owned_by("a"), t.owned_by("b")), (0, 0));
        assert!(t.owners.is_empty());
    }

    proptest! {
        #[test]
        fn any_bytes_are_ok_or_err(mut d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut t = RelayTable::new(RelayLimits::default());
            t.insert(S, K, Instant::now()).unwrap();
            let _ = t.handle(a(1), &d, Instant::now());
            if d.len() >= 4 { d[..4].copy_from_slice(&MAGIC); }
            let _ = t.handle(a(1), &d, Instant::now());
            let _ = parse(&d);
        }
    }
}
