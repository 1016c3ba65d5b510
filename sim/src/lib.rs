//! A deterministic, in-memory NAT simulator that drives punch's real
//! punching logic ([`punch_protocol::punch::Puncher`] and the birthday
//! method of [`punch_protocol::birthday`]) on a virtual clock, in the
//! manner of quinn-proto's test `Pair` and str0m's netem: no sockets, no
//! root, a whole NAT matrix in seconds, the same answer for the same seed.
//!
//! # What a run models
//!
//! Two agents, each behind its own [`NatModel`] (or both behind one), on
//! sites joined by links with a one-way delay and a loss rate each
//! ([`net`]). Each agent registers with the rendezvous server at
//! 203.0.113.1:3478 from its main socket (the server records the mapped
//! address it sees, as registration does); the controlling agent asks for
//! an introduction and the server builds both [`Offer`]s as
//! server/src/signal.rs does: candidates are the server-observed address
//! (`ServerReflexive`) then the agent's local address (`Local`), roles
//! Controlling / Controlled, one session id and secret, `start_in_ms` 0.
//! Signaling itself (registration, the introduction) is never lost: QUIC
//! retransmits it.
//!
//! Each agent then runs what agent/src/session.rs runs ([`agent`]): the
//! birthday plan, the hard side's extra sockets, the puncher with
//! `PunchConfig::default()` and the agent's default 5 s punch timeout, the
//! same path choice and answer grace. A run is direct when the
//! controlling side validated a path within the deadline and data then
//! really flows both ways over the paths both sides chose (the peer
//! accepts it on that socket from that address).
//!
//! # What it skips
//!
//! - NAT classification: each agent is given its NAT's true
//!   [`NatClass`] (the mapping and filtering of its model). In the field a
//!   classification can be late or wrong; that is not modelled. The
//!   allocator is read as the agent reads it: a fresh socket makes four
//!   mappings toward the server's addresses in the NAT check's order and
//!   [`punch_protocol::allocator::infer`] reads their ports (the filtering
//!   tests' two mappings are not made).
//! - The relay, the QUIC handshake and keep-alives: runs last seconds,
//!   mappings 30 s.
//! - Jitter and reordering.
//!
//! [`Offer`]: punch_protocol::signal::Offer
//!
//! # Where it disagrees with the lab
//!
//! See [`mod@matrix`] for the table and the cells that differ from the netns
//! lab, and why.

pub mod agent;
pub mod matrix;
pub mod nat;
pub mod net;
pub mod server;

pub use matrix::{matrix, models, Cell, Model};
pub use nat::{Allocation, Filtering, Mapping, NatModel, NatStats};

use agent::SimAgent;
use net::{Delivery, Net};
use punch_protocol::signal::{NatBehaviour, NatClass, SessionId};
use punch_protocol::{allocator, predict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The rendezvous server.
pub const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 3478);
/// The server's other address (RFC 5780 `--alt-listen`).
pub const SERVER_ALT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2)), 3479);

/// Where the NAT check's socket asks, in the agent's order
/// (agent/src/natcheck.rs): the primary address, then the other IP, the
/// other address and the other port at once.
const CHECK_ASKS: [SocketAddr; 4] = [
    SERVER,
    SocketAddr::new(SERVER_ALT.ip(), SERVER.port()),
    SERVER_ALT,
    SocketAddr::new(SERVER.ip(), SERVER_ALT.port()),
];
/// First byte of a check datagram (the agent's index is added).
const CHECK_TAG: u8 = 0x80;

/// When the controlling agent asks for the introduction (both have
/// registered by then).
const CONNECT_AT: Duration = Duration::from_millis(500);
/// After the controlling side's first validated path, the run goes on
/// this long (the peer validates too) before data is checked.
const SETTLE: Duration = Duration::from_secs(1);

/// One run: two NATs, the links, a seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The controlling (dialing) agent's NAT.
    pub a: NatModel,
    /// The controlled agent's NAT (unused with `same_nat`).
    pub b: NatModel,
    /// One-way delay of each site's link to the core.
    pub delay: Duration,
    /// Loss rate of each link, each way (0.01 = 1 %).
    pub loss: f64,
    pub seed: u64,
    /// The agents' punch timeout (the puncher's deadline and the hard
    /// side's limit).
    pub punch_timeout: Duration,
    /// Both agents behind `a`'s NAT, on one LAN.
    pub same_nat: bool,
}

impl Scenario {
    /// The lab's settings: 20 ms a link, 1 % loss, 5 s punch timeout.
    pub fn new(a: NatModel, b: NatModel, seed: u64) -> Scenario {
        Scenario {
            a,
            b,
            delay: Duration::from_millis(20),
            loss: 0.01,
            seed,
            punch_timeout: Duration::from_secs(5),
            same_nat: false,
        }
    }
}

/// What a run found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// A validated path that carries data both ways.
    pub direct: bool,
    /// The controlling side validated a path (`direct` also checks it).
    pub validated: bool,
    /// From the controlling side's offer to its first validated path.
    pub time_to_direct: Option<Duration>,
    /// The controlling side's path leaves from an extra socket.
    pub via_extra_socket: bool,
    /// Pings both sides sent (rounds, sprays, the hard side's).
    pub pings: u32,
    /// Port budget: the mappings each NAT opened, at most alive at once,
    /// and the datagrams it dropped for want of a port.
    pub nat_a: NatStats,
    pub nat_b: NatStats,
    /// The allocators the two NAT checks read.
    pub alloc: [punch_protocol::allocator::Allocator; 2],
}

/// The class an agent would measure behind `m`.
pub fn class_of(m: &NatModel) -> NatClass {
    let mapping = match m.mapping {
        Mapping::EndpointIndependent => NatBehaviour::EndpointIndependent,
        Mapping::AddressDependent => NatBehaviour::AddressDependent,
        Mapping::AddressAndPortDependent => NatBehaviour::AddressAndPortDependent,
    };
    let filtering = match m.filtering {
        Filtering::EndpointIndependent => NatBehaviour::EndpointIndependent,
        Filtering::AddressDependent => NatBehaviour::AddressDependent,
        Filtering::AddressAndPortDependent => NatBehaviour::AddressAndPortDependent,
    };
    NatClass {
        public: false,
        mapping,
        filtering,
        port_preserved: m.allocation == Allocation::Preserve,
    }
}

/// Runs one scenario to its end.
pub fn run(s: &Scenario) -> Outcome {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let net_rng = StdRng::seed_from_u64(rng.gen());
    let mut net = Net::new(vec![SERVER.ip(), SERVER_ALT.ip()], net_rng);
    let site_a = net.add_site(Some(s.a), Ipv4Addr::new(198, 51, 100, 10), s.delay, s.loss);
    let site_b = if s.same_nat {
        site_a
    } else {
        net.add_site(Some(s.b), Ipv4Addr::new(198, 51, 100, 20), s.delay, s.loss)
    };
    let hosts = [net.add_host(site_a), net.add_host(site_b)];
    let classes = [
        class_of(&s.a),
        class_of(if s.same_nat { &s.a } else { &s.b }),
    ];
    let mut agents = [
        SimAgent::new(hosts[0], Some(classes[0])),
        SimAgent::new(hosts[1], Some(classes[1])),
    ];
    let t0 = Instant::now();
    let mut now = t0;
    // Registration: the server sees each main socket's mapping.
    for (i, h) in hosts.iter().enumerate() {
        net.send(*h, 0, SERVER, vec![i as u8], now, true);
    }
    let mut observed: [Option<SocketAddr>; 2] = [None, None];
    // The NAT check from a fresh socket: its mappings tell the allocator.
    let mut check_ports: [[Option<u16>; 4]; 2] = [[None; 4]; 2];
    let mut check_socks = [0usize; 2];
    for (i, h) in hosts.iter().enumerate() {
        let sock = net.bind(*h);
        check_socks[i] = sock;
        for (k, to) in CHECK_ASKS.iter().enumerate() {
            net.send(*h, sock, *to, vec![CHECK_TAG | i as u8, k as u8], now, true);
        }
    }
    // The introduction: requested at CONNECT_AT, both offers arrive one
    // link later than the server sent them.
    let offers_at = t0 + CONNECT_AT + 2 * s.delay;
    let mut offered = false;
    let deadline = offers_at + s.punch_timeout + birthday_gap() + SETTLE;
    loop {
        for a in agents.iter_mut() {
            a.flush(&mut net, now);
        }
        let settled = agents[0].first_direct.map(|t| t + SETTLE);
        if settled.is_some_and(|t| now >= t) {
            break;
        }
        let next = [
            net.next_at(),
            agents[0].poll_timeout(),
            agents[1].poll_timeout(),
            (!offered).then_some(offers_at),
            settled,
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next.filter(|t| *t <= deadline) else {
            break;
        };
        now = now.max(next);
        if !offered && now >= offers_at {
            offered = true;
            let mut extra = [Vec::new(), Vec::new()];
            for (i, agent) in agents.iter_mut().enumerate() {
                let seen: Vec<u16> = check_ports[i].iter().flatten().copied().collect();
                let local = net.local_addr(hosts[i], check_socks[i]).port();
                agent.alloc = allocator::infer(local, &seen);
                // A counting NAT: advertise where the counter stands (the
                // agent does so after its NAT check).
                if let (allocator::Allocator::Sequential { stride }, Some(last), Some(o)) =
                    (agent.alloc, seen.last(), observed[i])
                {
                    if let Some(c) = predict::Counter::after(o.ip(), *last, stride) {
                        extra[i] = c.candidates();
                    }
                }
            }
            let reg = |i: usize| server::Registered {
                observed: observed[i],
                local: net.local_addr(hosts[i], 0),
                nat: classes[i],
                extra: extra[i].clone(),
                alloc: agents[i].alloc,
            };
            let offers = server::offers(&[reg(0), reg(1)], SessionId(rng.gen()), rng.gen());
            for (agent, offer) in agents.iter_mut().zip(&offers) {
                agent.start(offer, now, &mut net, &mut rng, s.punch_timeout);
            }
        }
        while let Some(d) = net.pop(now) {
            match d {
                Some(Delivery::Host {
                    host,
                    sock,
                    from,
                    data,
                }) => {
                    if let Some(a) = agents.iter_mut().find(|a| a.host == host) {
                        a.handle(sock, from, &data, now);
                    }
                }
                // The NAT check: the agent, then which ask.
                Some(Delivery::Server { from, data, .. })
                    if data.len() == 2 && data[0] & CHECK_TAG != 0 =>
                {
                    let (i, k) = ((data[0] & !CHECK_TAG) as usize, data[1] as usize);
                    if let Some(slot) = check_ports.get_mut(i).and_then(|c| c.get_mut(k)) {
                        *slot = Some(from.port());
                    }
                }
                // Registration: the first byte names the agent.
                Some(Delivery::Server { from, to, data }) if to == SERVER => {
                    if let Some(slot) = data.first().and_then(|i| observed.get_mut(*i as usize)) {
                        *slot = Some(from);
                    }
                }
                _ => {}
            }
        }
        for a in agents.iter_mut() {
            if a.poll_timeout().is_some_and(|t| t <= now) {
                a.handle_timeout(now);
            }
        }
    }
    let validated = agents[0].first_direct.is_some();
    let direct = validated && data_flows(&agents, &mut net, now);
    Outcome {
        direct,
        validated,
        time_to_direct: agents[0].first_direct.map(|t| t - offers_at),
        via_extra_socket: agents[0].path.is_some_and(|(s, _)| s != 0),
        pings: agents[0].pings_sent() + agents[1].pings_sent(),
        nat_a: net.nat_stats(hosts[0], now),
        nat_b: if s.same_nat {
            NatStats::default()
        } else {
            net.nat_stats(hosts[1], now)
        },
        alloc: [agents[0].alloc, agents[1].alloc],
    }
}

/// The hard side's limit starts after its second round.
fn birthday_gap() -> Duration {
    punch_protocol::birthday::HARD_ROUND_GAP
}

/// Does data sent on each side's chosen path reach the other side's
/// connection?
fn data_flows(agents: &[SimAgent; 2], net: &mut Net, now: Instant) -> bool {
    (0..2).all(|i| {
        let (from, to) = (&agents[i], &agents[1 - i]);
        let Some((sock, dst)) = from.path else {
            return false;
        };
        matches!(net.trace(from.host, sock, dst, now),
            Some((h, s, src)) if h == to.host && to.accepts(s, src))
    })
}

#[cfg(test)]
mod tests;
