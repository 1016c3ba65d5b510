//! The punching schedule and path choice, as a sans-IO state machine.
//!
//! A [`Puncher`] is created from an offer. The driver feeds it received
//! probes ([`Puncher::handle_probe`]) and the passage of time
//! ([`Puncher::handle_timeout`]), sends what [`Puncher::poll_transmit`]
//! returns, and reacts to [`Puncher::poll_event`]. It never touches a socket
//! or a clock, so its tests run on a fake clock.
//!
//! Each side pings every candidate of the peer in rounds (quickly at first,
//! then steadily) until a pong proves a path or the deadline passes. A valid
//! ping from an address that was not advertised (a new mapping of a
//! symmetric NAT) adds that address as a peer-reflexive candidate and is
//! pinged back at once.

use crate::probe::{Probe, ProbeError, ProbeKind};
use crate::signal::{Candidate, CandidateKind, Role, SessionId, MAX_CANDIDATES};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Tunables of the punching schedule.
#[derive(Clone, Debug)]
pub struct PunchConfig {
    /// Give up when no path is validated by then.
    pub deadline: Duration,
    /// Offsets from the start of the first rounds; after the last one,
    /// rounds repeat every `interval`.
    pub early_rounds: Vec<Duration>,
    /// Spacing of the steady rounds.
    pub interval: Duration,
    /// Most candidates (advertised, peer-reflexive and predicted) probed.
    pub max_candidates: usize,
    /// When no path is validated this long after the start, also probe the
    /// other ports of the aligned port block around each server-observed
    /// candidate (`block_size` ports). Many carrier and cloud NATs, Google
    /// Cloud NAT among them, give each host a small fixed block and pick a
    /// new port from it for every destination: probing the whole block from
    /// both sides at once then meets one of the peer's new mappings.
    pub block_scan_after: Option<Duration>,
    /// Size (a power of two) of the port block scanned.
    pub block_size: u16,
    /// Most pings one session sends.
    pub max_pings: u32,
    /// When an IPv4 path is proved while IPv6 candidates are being pinged,
    /// wait this long at most (and no longer than the IPv4 round trip)
    /// for an IPv6 path before taking the IPv4 one. Set it only when this
    /// side has a global IPv6 address: an IPv6 path has no NAT whose
    /// mapping can change or expire under it. `None`: first proof wins.
    pub prefer_ipv6: Option<Duration>,
}

impl Default for PunchConfig {
    fn default() -> Self {
        PunchConfig {
            deadline: Duration::from_secs(5),
            early_rounds: [0, 20, 50, 100, 200, 400]
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            interval: Duration::from_millis(250),
            max_candidates: 2 * MAX_CANDIDATES + 128,
            block_scan_after: Some(Duration::from_millis(400)),
            block_size: 64,
            max_pings: 1500,
            prefer_ipv6: None,
        }
    }
}

/// A datagram the driver must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Something the driver must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PunchEvent {
    /// A pong proved that `addr` reaches the peer.
    Validated {
        addr: SocketAddr,
        kind: CandidateKind,
        rtt: Duration,
        /// Our own address as the peer saw it.
        observed: SocketAddr,
    },
    /// The deadline passed with no validated path.
    TimedOut,
}

#[derive(Clone, Debug)]
struct CandState {
    addr: SocketAddr,
    kind: CandidateKind,
    pings: u32,
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    txid: u64,
    dst: SocketAddr,
    at: Instant,
}

/// Where the session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PunchState {
    Probing,
    Validated(SocketAddr),
    TimedOut,
}

/// Counters for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PunchStats {
    pub pings_sent: u32,
    /// Pings sprayed at random ports (birthday method).
    pub sprayed: u32,
    pub pongs_sent: u32,
    pub pongs_received: u32,
    pub rejected: u32,
}

/// What an offer tells a puncher.
#[derive(Clone, Debug)]
pub struct PunchParams<'a> {
    pub session: SessionId,
    /// Key for the probes' MACs.
    pub secret: [u8; 32],
    /// Our role.
    pub role: Role,
    /// Where the peer may be reached.
    pub peer_candidates: &'a [Candidate],
    /// Delay before the first round.
    pub start_in: Duration,
    /// First transaction id (random in production, fixed in tests).
    pub txid_seed: u64,
}

/// The punching state machine of one session on one side.
#[derive(Debug)]
pub struct Puncher {
    session: SessionId,
    secret: [u8; 32],
    role: Role,
    config: PunchConfig,
    candidates: Vec<CandState>,
    start: Instant,
    round: usize,
    next_round: Instant,
    sent: VecDeque<Sent>,
    next_txid: u64,
    outbox: VecDeque<Transmit>,
    events: VecDeque<PunchEvent>,
    state: PunchState,
    stats: PunchStats,
    scanning: bool,
    spray: Option<SprayState>,
    /// An IPv4 proof held back for [`PunchConfig::prefer_ipv6`], and until when.
    held: Option<(PunchEvent, Instant)>,
}

/// The easy side of the birthday method: pings to many ports of a peer
/// behind an endpoint-dependent NAT, a few every tick. Ping `k` carries
/// txid `txid_base + k`, so a pong names the port it answers without a
/// table of sent pings.
#[derive(Debug)]
struct SprayState {
    ip: std::net::IpAddr,
    ports: Vec<u16>,
    next: usize,
    passes: u8,
    txid_base: u64,
    next_at: Instant,
}

/// Pings sprayed per tick, and the tick.
const SPRAY_PER_TICK: usize = 16;
const SPRAY_TICK: Duration = Duration::from_millis(10);
/// Passes over the port list (a mapping the peer opens late is met on the
/// second).
const SPRAY_PASSES: u8 = 2;
/// Most ports one spray covers.
pub const MAX_SPRAY: usize = 4096;

/// Most outstanding pings remembered for matching pongs.
const MAX_SENT: usize = 512;

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Puncher {
    /// Starts a session; the first round is due at `now + params.start_in`.
    pub fn new(params: PunchParams<'_>, now: Instant, config: PunchConfig) -> Self {
        let PunchParams {
            session,
            secret,
            role,
            peer_candidates,
            start_in,
            txid_seed,
        } = params;
        let mut p = Puncher {
            session,
            secret,
            role,
            candidates: Vec::new(),
            start: now + start_in,
            round: 0,
            next_round: now + start_in,
            sent: VecDeque::new(),
            next_txid: txid_seed,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            state: PunchState::Probing,
            stats: PunchStats::default(),
            scanning: false,
            spray: None,
            held: None,
            config,
        };
        // A peer's predicted ports are for the birthday method's own
        // flows (crate::predict): pinging them from here would spend the
        // very counter positions it predicts.
        for c in peer_candidates
            .iter()
            .filter(|c| c.kind != CandidateKind::Predicted)
        {
            p.add_candidate(c.addr, c.kind);
        }
        p
    }

    /// Also pings `ports` of `ip` (at most [`MAX_SPRAY`]), starting at
    /// `at`: the easy side of the birthday method, for a peer whose NAT maps
    /// every destination to a new port while it holds many sockets open
    /// towards us. List the likeliest ports first (the peer's port block).
    pub fn spray(&mut self, ip: std::net::IpAddr, mut ports: Vec<u16>, at: Instant) {
        ports.truncate(MAX_SPRAY);
        if ports.is_empty() {
            return;
        }
        self.spray = Some(SprayState {
            ip: ip.to_canonical(),
            ports,
            next: 0,
            passes: 0,
            txid_base: self.next_txid ^ (1 << 63),
            next_at: at,
        });
    }

    fn spray_tick(&mut self, now: Instant) {
        let Some(s) = &mut self.spray else { return };
        if now < s.next_at || s.passes >= SPRAY_PASSES {
            return;
        }
        for _ in 0..SPRAY_PER_TICK {
            if s.next >= s.ports.len() {
                s.next = 0;
                s.passes += 1;
                if s.passes >= SPRAY_PASSES {
                    break;
                }
            }
            let dst = SocketAddr::new(s.ip, s.ports[s.next]);
            let probe = Probe::ping(
                self.role,
                self.session,
                s.txid_base.wrapping_add(s.next as u64),
            );
            self.outbox.push_back(Transmit {
                dst,
                payload: probe.encode(&self.secret),
            });
            self.stats.sprayed += 1;
            s.next += 1;
        }
        s.next_at = now + SPRAY_TICK;
    }

    /// The address a sprayed ping with this txid went to.
    fn sprayed_to(&self, txid: u64) -> Option<SocketAddr> {
        let s = self.spray.as_ref()?;
        let k = txid.wrapping_sub(s.txid_base) as usize;
        s.ports.get(k).map(|p| SocketAddr::new(s.ip, *p))
    }

    /// The session this puncher belongs to.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Current state.
    pub fn state(&self) -> PunchState {
        self.state
    }

    /// Counters so far.
    pub fn stats(&self) -> PunchStats {
        self.stats
    }

    /// The candidates being probed, advertised and peer-reflexive.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.candidates
            .iter()
            .map(|c| Candidate {
                addr: c.addr,
                kind: c.kind,
            })
            .collect()
    }

    fn add_candidate(&mut self, addr: SocketAddr, kind: CandidateKind) -> Option<usize> {
        let addr = canonical(addr);
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return None;
        }
        if let Some(i) = self.candidates.iter().position(|c| c.addr == addr) {
            return Some(i);
        }
        if self.candidates.len() >= self.config.max_candidates {
            return None;
        }
        self.candidates.push(CandState {
            addr,
            kind,
            pings: 0,
        });
        Some(self.candidates.len() - 1)
    }

    fn add_block_candidates(&mut self) {
        let size = self.config.block_size.max(1);
        let mask = !(size - 1);
        let bases: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|c| c.kind == CandidateKind::ServerReflexive)
            .map(|c| c.addr)
            .collect();
        for b in bases {
            let first = b.port() & mask;
            for k in 0..size {
                let port = first.wrapping_add(k);
                if port != b.port() && port >= 1024 {
                    self.add_candidate(SocketAddr::new(b.ip(), port), CandidateKind::Predicted);
                }
            }
        }
    }

    fn ping(&mut self, idx: usize, now: Instant) {
        let txid = self.next_txid;
        self.next_txid = self.next_txid.wrapping_add(1);
        let cand = &mut self.candidates[idx];
        cand.pings += 1;
        let probe = Probe::ping(self.role, self.session, txid);
        if self.sent.len() >= MAX_SENT {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent {
            txid,
            dst: cand.addr,
            at: now,
        });
        self.outbox.push_back(Transmit {
            dst: cand.addr,
            payload: probe.encode(&self.secret),
        });
        self.stats.pings_sent += 1;
    }

    fn probing(&self) -> bool {
        self.state == PunchState::Probing
    }

    /// Advances the schedule to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.probing() {
            return;
        }
        if let Some((ev, until)) = self.held {
            if now >= until || now >= self.start + self.config.deadline {
                self.held = None;
                self.validate(ev);
                return;
            }
        }
        if now >= self.start + self.config.deadline {
            self.state = PunchState::TimedOut;
            self.events.push_back(PunchEvent::TimedOut);
            return;
        }
        self.spray_tick(now);
        if now >= self.next_round {
            if !self.scanning
                && self
                    .config
                    .block_scan_after
                    .is_some_and(|after| now >= self.start + after)
            {
                self.scanning = true;
                self.add_block_candidates();
            }
            for i in 0..self.candidates.len() {
                if self.stats.pings_sent >= self.config.max_pings {
                    break;
                }
                self.ping(i, now);
            }
            self.round += 1;
            self.next_round = match self.config.early_rounds.get(self.round) {
                Some(off) => self.start + *off,
                None => now + self.config.interval,
            };
        }
    }

    /// Handles a datagram that carries the probe magic and this session's id.
    pub fn handle_probe(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Result<(), ProbeError> {
        let from = canonical(from);
        let probe = match Probe::decode(data, &self.secret) {
            Ok(p) if p.session == self.session && p.role != self.role => p,
            Ok(_) => {
                // Our own role: a reflection of our ping, or a confused peer.
                self.stats.rejected += 1;
                return Err(ProbeError::BadField);
            }
            Err(e) => {
                self.stats.rejected += 1;
                return Err(e);
            }
        };
        match probe.kind {
            ProbeKind::Ping => {
                let pong = probe.pong_to(self.role, from);
                self.outbox.push_back(Transmit {
                    dst: from,
                    payload: pong.encode(&self.secret),
                });
                self.stats.pongs_sent += 1;
                let known = self.candidates.iter().any(|c| c.addr == from);
                if !known && self.probing() {
                    // A triggered check towards the new mapping, as ICE does.
                    if let Some(i) = self.add_candidate(from, CandidateKind::PeerReflexive) {
                        self.ping(i, now);
                    }
                }
            }
            ProbeKind::Pong { observed } => {
                self.stats.pongs_received += 1;
                let sent = match self.sent.iter().position(|s| s.txid == probe.txid) {
                    Some(pos) => self.sent[pos],
                    None => match self.sprayed_to(probe.txid) {
                        Some(dst) => Sent {
                            txid: probe.txid,
                            dst,
                            at: now,
                        },
                        None => {
                            self.stats.rejected += 1;
                            return Err(ProbeError::BadField);
                        }
                    },
                };
                if sent.dst != from {
                    // A pong must come back from where the ping went.
                    self.stats.rejected += 1;
                    return Err(ProbeError::BadField);
                }
                if self.probing() {
                    let kind = self
                        .candidates
                        .iter()
                        .find(|c| c.addr == from)
                        .map(|c| c.kind)
                        .unwrap_or(CandidateKind::PeerReflexive);
                    let rtt = now.saturating_duration_since(sent.at);
                    let ev = PunchEvent::Validated {
                        addr: from,
                        kind,
                        rtt,
                        observed,
                    };
                    match self.config.prefer_ipv6 {
                        Some(most) if from.is_ipv4() && self.pinging_ipv6() => {
                            if self.held.is_none() {
                                let wait = rtt.clamp(
                                    Duration::from_millis(10),
                                    most.max(Duration::from_millis(10)),
                                );
                                self.held = Some((ev, now + wait));
                            }
                        }
                        _ => {
                            self.held = None;
                            self.validate(ev);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn validate(&mut self, ev: PunchEvent) {
        if let PunchEvent::Validated { addr, .. } = ev {
            self.state = PunchState::Validated(addr);
            self.events.push_back(ev);
        }
    }

    /// Is an IPv6 candidate of the peer being pinged?
    fn pinging_ipv6(&self) -> bool {
        self.candidates
            .iter()
            .any(|c| c.addr.is_ipv6() && c.pings > 0)
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<PunchEvent> {
        self.events.pop_front()
    }

    /// When [`Puncher::handle_timeout`] must be called next; `None` once the
    /// puncher only answers pings.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.probing() {
            return None;
        }
        let mut t = self.next_round.min(self.start + self.config.deadline);
        if let Some((_, until)) = self.held {
            t = t.min(until);
        }
        if let Some(s) = &self.spray {
            if s.passes < SPRAY_PASSES {
                t = t.min(s.next_at);
            }
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [3; 32];

    fn cand(s: &str, kind: CandidateKind) -> Candidate {
        Candidate {
            addr: s.parse().unwrap(),
            kind,
        }
    }

    /// Two punchers on a fake network: `a` lives at `a_addr`, `b` at
    /// `b_addr`; `deliver(src, dst)` says whether a datagram gets through.
    struct Net {
        a: Puncher,
        b: Puncher,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
        now: Instant,
    }

    impl Net {
        fn run(
            &mut self,
            until: Duration,
            deliver: &mut dyn FnMut(SocketAddr, SocketAddr) -> bool,
        ) -> (Vec<PunchEvent>, Vec<PunchEvent>) {
            let end = self.now + until;
            let (mut ea, mut eb) = (Vec::new(), Vec::new());
            while self.now < end {
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
                // Shuttle datagrams until both outboxes are empty.
                loop {
                    let mut moved = false;
                    while let Some(t) = self.a.poll_transmit() {
                        moved = true;
                        if t.dst == self.b_addr && deliver(self.a_addr, t.dst) {
                            let _ = self.b.handle_probe(self.a_addr, &t.payload, self.now);
                        }
                    }
                    while let Some(t) = self.b.poll_transmit() {
                        moved = true;
                        if t.dst == self.a_addr && deliver(self.b_addr, t.dst) {
                            let _ = self.a.handle_probe(self.b_addr, &t.payload, self.now);
                        }
                    }
                    if !moved {
                        break;
                    }
                }
                ea.extend(std::iter::from_fn(|| self.a.poll_event()));
                eb.extend(std::iter::from_fn(|| self.b.poll_event()));
                self.now += Duration::from_millis(5);
            }
            (ea, eb)
        }
    }

    fn net(a_cands: &[Candidate], b_cands: &[Candidate]) -> Net {
        let now = Instant::now();
        let cfg = PunchConfig::default();
        Net {
            a: Puncher::new(
                PunchParams {
                    session: SessionId(1),
                    secret: SECRET,
                    role: Role::Controlling,
                    peer_candidates: b_cands,
                    start_in: Duration::ZERO,
                    txid_seed: 100,
                },
                now,
                cfg.clone(),
            ),
            b: Puncher::new(
                PunchParams {
                    session: SessionId(1),
                    secret: SECRET,
                    role: Role::Controlled,
                    peer_candidates: a_cands,
                    start_in: Duration::ZERO,
                    txid_seed: 200,
                },
                now,
                cfg,
            ),
            a_addr: "198.51.100.1:1000".parse().unwrap(),
            b_addr: "203.0.113.2:2000".parse().unwrap(),
            now,
        }
    }

    #[test]
    fn open_network_validates_at_once() {
        let mut n = net(
            &[cand("198.51.100.1:1000", CandidateKind::ServerReflexive)],
            &[
                cand("10.0.0.9:5", CandidateKind::Local),
                cand("203.0.113.2:2000", CandidateKind::ServerReflexive),
            ],
        );
        let (ea, eb) = n.run(Duration::from_millis(50), &mut |_, _| true);
        assert!(matches!(
            ea[0],
            PunchEvent::Validated { addr, kind: CandidateKind::ServerReflexive, observed, .. }
                if addr == n.b_addr && observed == n.a_addr
        ));
        assert!(matches!(eb[0], PunchEvent::Validated { addr, .. } if addr == n.a_addr));
        assert_eq!(n.a.state(), PunchState::Validated(n.b_addr));
        assert_eq!(n.a.poll_timeout(), None);
    }

    #[test]
    fn port_restricted_both_sides_needs_simultaneous_probes() {
        // Each side's NAT drops inbound until that side has sent outbound to
        // the source: the first pings die, later rounds get through.
        let mut n = net(
            &[cand("198.51.100.1:1000", CandidateKind::ServerReflexive)],
            &[cand("203.0.113.2:2000", CandidateKind::ServerReflexive)],
        );
        let mut opened: Vec<(SocketAddr, SocketAddr)> = Vec::new();
        let (ea, _) = n.run(Duration::from_secs(1), &mut |src, dst| {
            let ok = opened.contains(&(dst, src));
            opened.push((src, dst));
            ok
        });
        assert!(matches!(ea.as_slice(), [PunchEvent::Validated { .. }]));
    }

    /// A dual-stack pair: each side at an IPv4 and an IPv6 address; a
    /// datagram to one of the peer's addresses comes from the sender's
    /// address of the same family. `v6_ok` says whether IPv6 gets through.
    /// Returns A's first event.
    fn dual_stack(prefer: Option<Duration>, v6_ok: bool) -> PunchEvent {
        let (a4, a6): (SocketAddr, SocketAddr) = (
            "198.51.100.1:1000".parse().unwrap(),
            "[2001:db8:1::10]:1000".parse().unwrap(),
        );
        let (b4, b6): (SocketAddr, SocketAddr) = (
            "203.0.113.2:2000".parse().unwrap(),
            "[2001:db8:2::10]:2000".parse().unwrap(),
        );
        let cfg = PunchConfig {
            prefer_ipv6: prefer,
            ..PunchConfig::default()
        };
        let now = Instant::now();
        let peer = |cands: &[SocketAddr], role, seed| {
            let cands: Vec<Candidate> = cands
                .iter()
                .map(|a| Candidate {
                    addr: *a,
                    kind: CandidateKind::Local,
                })
                .collect();
            Puncher::new(
                PunchParams {
                    session: SessionId(1),
                    secret: SECRET,
                    role,
                    peer_candidates: &cands,
                    start_in: Duration::ZERO,
                    txid_seed: seed,
                },
                now,
                cfg.clone(),
            )
        };
        // IPv4 listed first: without a preference it is proved first.
        let mut a = peer(&[b4, b6], Role::Controlling, 100);
        let mut b = peer(&[a4, a6], Role::Controlled, 200);
        let mut t = now;
        for _ in 0..200 {
            a.handle_timeout(t);
            b.handle_timeout(t);
            while let Some(x) = a.poll_transmit() {
                let from = if x.dst.is_ipv6() { a6 } else { a4 };
                if x.dst.is_ipv4() || v6_ok {
                    let _ = b.handle_probe(from, &x.payload, t);
                }
            }
            while let Some(x) = b.poll_transmit() {
                let from = if x.dst.is_ipv6() { b6 } else { b4 };
                if x.dst.is_ipv4() || v6_ok {
                    let _ = a.handle_probe(from, &x.payload, t);
                }
            }
            if let Some(ev) = a.poll_event() {
                return ev;
            }
            t += Duration::from_millis(1);
        }
        panic!("no event in 200 ms");
    }

    #[test]
    fn ipv6_path_is_preferred_when_asked_for() {
        let addr = |ev| match ev {
            PunchEvent::Validated { addr, .. } => addr,
            e => panic!("{e:?}"),
        };
        let most = Some(Duration::from_millis(100));
        assert!(addr(dual_stack(None, true)).is_ipv4(), "first proof wins");
        assert!(addr(dual_stack(most, true)).is_ipv6(), "IPv6 preferred");
        // IPv6 blocked: IPv4 is taken after the grace, not at the deadline.
        assert!(addr(dual_stack(most, false)).is_ipv4());
    }

    #[test]
    fn unreachable_peer_times_out_with_bounded_probes() {
        let mut n = net(
            &[cand("198.51.100.1:1000", CandidateKind::ServerReflexive)],
            &[cand("203.0.113.2:2000", CandidateKind::ServerReflexive)],
        );
        let (ea, eb) = n.run(Duration::from_secs(6), &mut |_, _| false);
        assert_eq!(ea, vec![PunchEvent::TimedOut]);
        assert_eq!(eb, vec![PunchEvent::TimedOut]);
        let sent = n.a.stats().pings_sent;
        let budget = PunchConfig::default().max_pings;
        assert!((10..=budget).contains(&sent), "pings sent: {sent}");
        assert_eq!(n.a.poll_timeout(), None);
    }

    #[test]
    fn block_scan_finds_a_new_mapping_in_the_peers_port_block() {
        // B's NAT gave it another port of the same 64-port block towards A
        // than the one the server saw; both NATs filter by address and port.
        let mut n = net(
            &[cand("198.51.100.1:1000", CandidateKind::ServerReflexive)],
            &[cand("203.0.113.2:20481", CandidateKind::ServerReflexive)],
        );
        n.b_addr = "203.0.113.2:20500".parse().unwrap();
        let mut opened: Vec<(SocketAddr, SocketAddr)> = Vec::new();
        let (ea, _) = n.run(Duration::from_secs(2), &mut |src, dst| {
            let ok = opened.contains(&(dst, src));
            opened.push((src, dst));
            ok
        });
        assert!(
            matches!(ea.first(), Some(PunchEvent::Validated { addr, kind: CandidateKind::Predicted, .. }) if *addr == n.b_addr),
            "{ea:?}"
        );
    }

    #[test]
    fn symmetric_mapping_is_learned_from_pings() {
        // B advertises a stale port; its real mapping towards A is another.
        let mut n = net(
            &[cand("198.51.100.1:1000", CandidateKind::ServerReflexive)],
            &[cand("203.0.113.2:1999", CandidateKind::ServerReflexive)],
        );
        let (ea, _) = n.run(Duration::from_millis(100), &mut |_, _| true);
        assert!(matches!(
            ea[0],
            PunchEvent::Validated { addr, kind: CandidateKind::PeerReflexive, .. } if addr == n.b_addr
        ));
    }

    #[test]
    fn forged_and_reflected_probes_are_rejected() {
        let now = Instant::now();
        let mut p = Puncher::new(
            PunchParams {
                session: SessionId(9),
                secret: SECRET,
                role: Role::Controlling,
                peer_candidates: &[cand("203.0.113.2:2000", CandidateKind::ServerReflexive)],
                start_in: Duration::ZERO,
                txid_seed: 0,
            },
            now,
            PunchConfig::default(),
        );
        p.handle_timeout(now);
        let ping = p.poll_transmit().unwrap();
        // Our own ping reflected back.
        assert!(p
            .handle_probe("203.0.113.2:2000".parse().unwrap(), &ping.payload, now)
            .is_err());
        // A pong signed with another secret.
        let forged = Probe {
            kind: ProbeKind::Pong {
                observed: "198.51.100.1:1".parse().unwrap(),
            },
            role: Role::Controlled,
            session: SessionId(9),
            txid: 0,
        }
        .encode(&[4; 32]);
        assert_eq!(
            p.handle_probe("203.0.113.2:2000".parse().unwrap(), &forged, now),
            Err(ProbeError::BadMac)
        );
        // A genuine pong from an address we never pinged.
        let stray = Probe {
            kind: ProbeKind::Pong {
                observed: "198.51.100.1:1".parse().unwrap(),
            },
            role: Role::Controlled,
            session: SessionId(9),
            txid: 0,
        }
        .encode(&SECRET);
        assert!(p
            .handle_probe("203.0.113.66:2000".parse().unwrap(), &stray, now)
            .is_err());
        assert_eq!(p.state(), PunchState::Probing);
        assert_eq!(p.stats().rejected, 3);
    }

    #[test]
    fn a_spray_is_bounded_and_its_pongs_validate_only_from_their_port() {
        let t0 = Instant::now();
        let mut p = Puncher::new(
            PunchParams {
                session: SessionId(9),
                secret: SECRET,
                role: Role::Controlling,
                peer_candidates: &[cand("203.0.113.2:2000", CandidateKind::ServerReflexive)],
                start_in: Duration::ZERO,
                txid_seed: 5,
            },
            t0,
            PunchConfig::default(),
        );
        let ip: std::net::IpAddr = "203.0.113.2".parse().unwrap();
        p.spray(ip, (1000..1100).collect(), t0);
        let mut sprayed = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            p.handle_timeout(now);
            while let Some(t) = p.poll_transmit() {
                if (1000..1100).contains(&t.dst.port()) {
                    sprayed.push(t);
                }
            }
            now += Duration::from_millis(5);
        }
        // Two passes over the list, then nothing more.
        assert_eq!(sprayed.len(), 200);
        assert_eq!(p.stats().sprayed, 200);
        let hit = sprayed.iter().find(|t| t.dst.port() == 1042).unwrap();
        let ping = Probe::decode(&hit.payload, &SECRET).unwrap();
        let pong = |txid| {
            Probe {
                kind: ProbeKind::Pong {
                    observed: "198.51.100.1:1000".parse().unwrap(),
                },
                role: Role::Controlled,
                session: SessionId(9),
                txid,
            }
            .encode(&SECRET)
        };
        // The answer to port 1042's ping from another port proves nothing.
        let wrong = SocketAddr::new(ip, 1043);
        assert!(p.handle_probe(wrong, &pong(ping.txid), now).is_err());
        let right = SocketAddr::new(ip, 1042);
        p.handle_probe(right, &pong(ping.txid), now).unwrap();
        assert_eq!(p.state(), PunchState::Validated(right));
    }

    #[test]
    fn peer_reflexive_candidates_are_bounded() {
        let now = Instant::now();
        let mut p = Puncher::new(
            PunchParams {
                session: SessionId(1),
                secret: SECRET,
                role: Role::Controlled,
                peer_candidates: &[],
                start_in: Duration::ZERO,
                txid_seed: 0,
            },
            now,
            PunchConfig::default(),
        );
        for port in 1..200u16 {
            let ping = Probe {
                kind: ProbeKind::Ping,
                role: Role::Controlling,
                session: SessionId(1),
                txid: port as u64,
            }
            .encode(&SECRET);
            let from = SocketAddr::new("198.51.100.1".parse().unwrap(), port);
            p.handle_probe(from, &ping, now).unwrap();
        }
        assert_eq!(p.candidates().len(), PunchConfig::default().max_candidates);
    }
}
