//! One simulated agent's punch session, driven as agent/src/session.rs
//! drives it: the real [`Puncher`] on the main socket (with the spray of
//! [`birthday::spray_plan`]), the real [`HardSide`] on extra sockets when
//! [`birthday::hard_plan`] asks for them, and the same path choice: the
//! puncher's validated address always becomes the path, the hard side's
//! only when no direct path is set yet.

use crate::net::{HostId, Net};
use punch_protocol::allocator::Allocator;
use punch_protocol::birthday::{self, HardEvent, HardParams, HardSide};
use punch_protocol::probe;
use punch_protocol::punch::{PunchConfig, PunchEvent, PunchParams, Puncher};
use punch_protocol::signal::{NatClass, Offer};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// After a path is validated the puncher keeps answering this long (as
/// the agent's `ANSWER_GRACE`).
const ANSWER_GRACE: Duration = Duration::from_secs(3);

/// A simulated agent.
#[derive(Debug)]
pub(crate) struct SimAgent {
    pub host: HostId,
    /// Its true NAT class (the sim skips classification).
    pub class: Option<NatClass>,
    /// Its NAT's allocator, as [`allocator::infer`] read it from the
    /// check's mappings.
    pub alloc: Allocator,
    puncher: Option<Puncher>,
    stop_at: Option<Instant>,
    hard: Option<HardSide>,
    /// Net socket index of each of the hard side's extra sockets.
    aux: Vec<usize>,
    /// Extra sockets read after the hard side ended (met and found).
    readers: Vec<usize>,
    /// The direct path: our socket and the peer's address.
    pub path: Option<(usize, SocketAddr)>,
    /// Peer addresses the main socket takes data from (the path table's
    /// learned addresses).
    known: HashSet<SocketAddr>,
    peer_ip: Option<IpAddr>,
    pub first_direct: Option<Instant>,
    pub pings: u32,
}

impl SimAgent {
    pub fn new(host: HostId, class: Option<NatClass>) -> SimAgent {
        SimAgent {
            host,
            class,
            alloc: Allocator::Unknown,
            puncher: None,
            stop_at: None,
            hard: None,
            aux: Vec::new(),
            readers: Vec::new(),
            path: None,
            known: HashSet::new(),
            peer_ip: None,
            first_direct: None,
            pings: 0,
        }
    }

    /// Takes an offer: the birthday method's extra sockets first, then the
    /// puncher, as `dial` and `controlled` start them.
    pub fn start(
        &mut self,
        offer: &Offer,
        now: Instant,
        net: &mut Net,
        rng: &mut StdRng,
        punch_timeout: Duration,
    ) {
        self.peer_ip = offer.peer_candidates.first().map(|c| c.addr.ip());
        if let Some(plan) = birthday::hard_plan(self.class, self.alloc, offer) {
            self.aux = (0..plan.sockets()).map(|_| net.bind(self.host)).collect();
            let params = HardParams {
                session: offer.session,
                secret: offer.secret,
                role: offer.role,
                txid_base: rng.gen::<u64>() >> 1,
            };
            self.hard = Some(HardSide::with_flows(params, plan.flows, now, punch_timeout));
        }
        let config = PunchConfig {
            deadline: punch_timeout,
            ..PunchConfig::default()
        };
        let mut p = Puncher::new(
            PunchParams {
                session: offer.session,
                secret: offer.secret,
                role: offer.role,
                peer_candidates: &offer.peer_candidates,
                start_in: Duration::from_millis(offer.start_in_ms.min(5_000) as u64),
                txid_seed: rng.gen(),
            },
            now,
            config,
        );
        if let Some(s) = birthday::spray_plan(self.class, offer, rng) {
            p.spray(s.ip, s.ports, now + s.delay);
        }
        self.puncher = Some(p);
    }

    /// A datagram arrived on net socket `sock`.
    pub fn handle(&mut self, sock: usize, from: SocketAddr, data: &[u8], now: Instant) {
        if !probe::is_probe(data) {
            return;
        }
        if sock == 0 {
            if let Some(p) = &mut self.puncher {
                if p.handle_probe(from, data, now).is_ok() {
                    self.known.insert(from);
                }
            }
        } else if let (Some(h), Some(i)) =
            (&mut self.hard, self.aux.iter().position(|s| *s == sock))
        {
            let _ = h.handle_probe(i, from, data, now);
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = &mut self.puncher {
            p.handle_timeout(now);
        }
        if let Some(h) = &mut self.hard {
            h.handle_timeout(now);
        }
    }

    /// When the agent next needs [`SimAgent::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let p = self.puncher.as_ref().and_then(|p| p.poll_timeout());
        let h = self.hard.as_ref().and_then(|h| h.poll_timeout());
        [p, h, self.stop_at.filter(|_| self.puncher.is_some())]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends what the machines ask for and acts on their events.
    pub fn flush(&mut self, net: &mut Net, now: Instant) {
        if let Some(p) = &mut self.puncher {
            while let Some(t) = p.poll_transmit() {
                net.send(self.host, 0, t.dst, t.payload, now, false);
            }
            while let Some(ev) = p.poll_event() {
                match ev {
                    PunchEvent::Validated { addr, .. } => {
                        self.path = Some((0, addr));
                        self.known.insert(addr);
                        self.first_direct.get_or_insert(now);
                        self.stop_at = Some(now + ANSWER_GRACE);
                    }
                    PunchEvent::TimedOut => self.stop_at = Some(now),
                }
            }
            if self.stop_at.is_some_and(|s| now >= s) {
                let s = p.stats();
                self.pings += s.pings_sent + s.sprayed;
                self.puncher = None;
            }
        }
        if let Some(h) = &mut self.hard {
            while let Some((i, t)) = h.poll_transmit() {
                if let Some(&sock) = self.aux.get(i) {
                    net.send(self.host, sock, t.dst, t.payload, now, false);
                }
            }
            let mut finished = false;
            while let Some(ev) = h.poll_event() {
                finished = true;
                if let HardEvent::Validated { socket, addr, .. } = ev {
                    let Some(&sock) = self.aux.get(socket) else {
                        continue;
                    };
                    // Ordinary punching found a path first: keep it.
                    if self.path.is_none() {
                        self.path = Some((sock, addr));
                    }
                    self.readers.push(sock);
                    self.first_direct.get_or_insert(now);
                }
            }
            if finished {
                self.readers
                    .extend(h.met().iter().filter_map(|i| self.aux.get(*i)));
            }
            // Validated: it still answers pings on met sockets a while.
            if h.is_done() && h.poll_timeout().is_none() {
                self.pings += h.pings_sent();
                self.hard = None;
            }
        }
    }

    /// Pings sent so far, including by machines still running.
    pub fn pings_sent(&self) -> u32 {
        let p = self.puncher.as_ref().map_or(0, |p| {
            let s = p.stats();
            s.pings_sent + s.sprayed
        });
        self.pings + p + self.hard.as_ref().map_or(0, |h| h.pings_sent())
    }

    /// Would data (not a probe) from `from` on net socket `sock` reach the
    /// connection? The main socket takes it from learned addresses, an
    /// extra socket that found or met the peer from the peer's IP.
    pub fn accepts(&self, sock: usize, from: SocketAddr) -> bool {
        if sock == 0 {
            self.known.contains(&from)
        } else {
            self.readers.contains(&sock) && Some(from.ip()) == self.peer_ip
        }
    }
}
