//! The birthday method's decisions, sans-IO: who plays which part, where
//! the easy side sprays, where the hard side's extra sockets send, and the
//! hard side itself as a state machine ([`HardSide`]).
//!
//! The method is for a peer pair where one NAT maps every destination to a
//! new, unpredictable port (endpoint-dependent mapping: "symmetric") and
//! the other keeps one mapping for all destinations but filters by address
//! and port (a port-restricted home NAT, Cloud NAT with EIM).
//!
//! Ordinary punching cannot work there: the easy side would have to send to
//! the exact port the hard side's NAT picked for it, which nobody can see.
//! So the hard side opens [`AUX_SOCKETS`] sockets and sends from each to the
//! easy side's (stable) mapping, creating that many mappings in its NAT; the
//! easy side sprays pings at many ports of the hard side's public address
//! (its port block first, then random ports). With n mappings among the
//! 64,512 ports and k sprayed pings, some ping meets a mapping with
//! probability 1 − e^(−nk/64512): about 98 % for n = 256, k = 1024, and
//! certainty when the NAT draws from a known 64-port block (Cloud NAT's
//! default). The first ping that lands is answered from its socket, which
//! becomes the peer's direct path. Tailscale describes the same method.
//!
//! When both NATs map per destination the same machinery runs on both
//! sides with a few sockets and the peer's port block as targets
//! ([`Part::Both`]): Cloud NAT behind Cloud NAT.
//!
//! The agent drives these with real sockets; the simulator (`sim/`) drives
//! the very same functions and machine on a virtual clock.

use crate::allocator::Allocator;
use crate::predict;
use crate::probe::{Probe, ProbeError, ProbeKind};
use crate::punch::Transmit;
use crate::signal::{CandidateKind, NatBehaviour, NatClass, Offer, Role, SessionId};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Sockets the hard side opens behind a NAT that draws from the whole
/// port range at random (or that we could not read).
pub const AUX_SOCKETS: usize = 256;
/// Sockets the hard side opens behind a NAT that counts ports up: the
/// spray covers the ports just above the one the peer saw, where these
/// land. A few mappings cannot tell a counter over the whole range from a
/// 64-port block taken in order, so this is that block's budget (the main
/// socket's flow included, [`crate::allocator::budget_of`]).
pub const SEQ_SOCKETS: usize = crate::allocator::budget_of(crate::predict::BLOCK) - 1;
/// Ports above each seen port the easy side sprays first: where a
/// counting NAT's next mappings land (at a stride up to 16).
pub const SPRAY_ABOVE: u16 = 256;
/// Extra sockets each side opens when both NATs map per destination
/// (see [`Part::Both`]).
pub const BLOCK_SOCKETS: usize = 3;
/// Ports the easy side sprays (block first, then random ones).
pub const SPRAY_PORTS: usize = 2048;
/// The easy side starts spraying this long after the offer: the peer's
/// extra sockets need a moment to open their mappings.
pub const SPRAY_DELAY: Duration = Duration::from_millis(150);
/// The hard side's second round of pings follows the first after this.
pub const HARD_ROUND_GAP: Duration = Duration::from_millis(300);
/// Most extra sockets one [`HardSide`] tracks (bounds its memory whatever
/// the caller asks for).
pub const MAX_HARD_SOCKETS: usize = 4096;
/// After the hard side validates, its sockets that met the peer keep
/// answering the peer's pings this long: the spray ping that opened the way
/// may have been lost, and the peer validates only on a pong (the puncher
/// keeps answering the same way).
pub const HARD_ANSWER_GRACE: Duration = Duration::from_secs(3);

fn dependent(b: NatBehaviour) -> bool {
    matches!(
        b,
        NatBehaviour::AddressDependent | NatBehaviour::AddressAndPortDependent
    )
}

/// Our part in the birthday method, if the pair needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Our NAT maps per destination: open many sockets.
    Hard,
    /// Our NAT keeps one mapping and filters by port: spray the peer.
    Easy,
    /// Both NATs map per destination. When they draw ports from small
    /// blocks (Cloud NAT: 64 a host), each side scans the other's block:
    /// a side's flow to the peer's port p gets some port q of its own
    /// block, and it meets the peer when the peer's flow to q got p. One
    /// scan from one socket a side meets with 1 − (63/64)^64 ≈ 63 %;
    /// with k sockets a side the expected meetings are k², so the main
    /// socket's scan plus [`BLOCK_SOCKETS`] more (k = 4) all but never
    /// miss, for 192 pings a side per round.
    Both,
}

/// Decides from both NAT classes (ours measured, the peer's from the offer).
pub fn part(ours: Option<NatClass>, peer: Option<NatClass>) -> Option<Part> {
    let (o, p) = (ours?, peer?);
    if o.public || p.public {
        return None;
    }
    // With address-dependent (or no) filtering on the easy side, ordinary
    // punching already meets the hard side's new mapping. Unknown filtering
    // (an agent that connects before its filtering tests end) does not
    // count: a looser filter would let the extra sockets' pings through
    // and the two sides could settle on different sockets.
    let strict = |f: NatBehaviour| f == NatBehaviour::AddressAndPortDependent;
    let eim = |c: NatClass| c.mapping == NatBehaviour::EndpointIndependent;
    if dependent(o.mapping) && eim(p) && strict(p.filtering) {
        Some(Part::Hard)
    } else if eim(o) && strict(o.filtering) && dependent(p.mapping) {
        Some(Part::Easy)
    } else if dependent(o.mapping) && dependent(p.mapping) {
        Some(Part::Both)
    } else {
        None
    }
}

/// The ports to spray at a hard peer: the aligned 64-port block around each
/// port we saw it use (Cloud NAT and carrier NATs draw from such blocks),
/// the [`SPRAY_ABOVE`] ports from `counter_next` on when the peer
/// advertised a counter ([`crate::predict`]: where its next mappings land),
/// then random ports, [`SPRAY_PORTS`] in all, no duplicates. (Without a
/// counter the ports above are no likelier than any: a random-range NAT's
/// mappings are found sooner by the random spray.)
pub fn spray_ports(seen: &[u16], counter_next: Option<u16>, rng: &mut impl rand::Rng) -> Vec<u16> {
    let mut out = Vec::with_capacity(SPRAY_PORTS);
    let mut taken = vec![false; 65536];
    for &p in seen {
        let base = p & !63;
        for k in 0..64u16 {
            let port = base.wrapping_add(k);
            if port >= 1024 && !taken[port as usize] {
                taken[port as usize] = true;
                out.push(port);
            }
        }
    }
    if let Some(p) = counter_next {
        for k in 0..SPRAY_ABOVE {
            let port = p.saturating_add(k);
            if port >= 1024 && !taken[port as usize] {
                taken[port as usize] = true;
                out.push(port);
            }
        }
    }
    let mut tries = 0;
    while out.len() < SPRAY_PORTS && tries < 20 * SPRAY_PORTS {
        tries += 1;
        let port: u16 = rng.gen_range(1024..=65535);
        if !taken[port as usize] {
            taken[port as usize] = true;
            out.push(port);
        }
    }
    out
}

/// Where the extra sockets send for our `part`: the peer's public
/// mapping (hard side), or every port of the peer's block (both sides
/// hard): the block its allocator reported when that holds every port we
/// saw it use (a grown block under dynamic port allocation), else the
/// aligned 64-port block around each such port. IPv4 only.
pub fn targets(offer: &Offer, part: Part) -> Vec<SocketAddr> {
    match part {
        Part::Hard => public_candidates(offer).filter(|a| a.is_ipv4()).collect(),
        Part::Both => {
            let Some((ip, seen)) = spray_target(offer).filter(|(ip, _)| ip.is_ipv4()) else {
                return Vec::new();
            };
            let mut blocks: Vec<(u16, u16)> = match offer.peer_allocator {
                Some(Allocator::Block { base, size })
                    if size <= MAX_SCAN_BLOCK
                        && seen.iter().all(|p| {
                            (base as u32..base as u32 + size as u32).contains(&(*p as u32))
                        }) =>
                {
                    vec![(base, size)]
                }
                _ => seen.iter().map(|p| (p & !63, 64)).collect(),
            };
            blocks.sort_unstable();
            blocks.dedup();
            blocks
                .iter()
                .flat_map(|&(b, n)| (0..n).map(move |k| b.wrapping_add(k)))
                .filter(|p| *p >= 1024)
                .map(|p| SocketAddr::new(ip, p))
                .collect()
        }
        Part::Easy => Vec::new(),
    }
}

/// Largest reported block [`targets`] scans whole (a block grown larger
/// than this is scanned as the 64 ports around what we saw).
pub const MAX_SCAN_BLOCK: u16 = 256;

/// The peer's addresses as servers saw them (its NAT's public side).
fn public_candidates(offer: &Offer) -> impl Iterator<Item = SocketAddr> + '_ {
    offer
        .peer_candidates
        .iter()
        .filter(|c| matches!(c.kind, CandidateKind::ServerReflexive | CandidateKind::Stun))
        .map(|c| c.addr)
}

/// The hard peer's public address and the ports we saw it use.
pub fn spray_target(offer: &Offer) -> Option<(IpAddr, Vec<u16>)> {
    let ip = public_candidates(offer).next()?.ip();
    let ports = public_candidates(offer)
        .filter(|a| a.ip() == ip)
        .map(|a| a.port())
        .collect();
    Some((ip, ports))
}

/// [`spray_target`], and the port the peer's counter hands out next when
/// it advertised one (its block first among the seen ports).
fn spray_seen(offer: &Offer) -> Option<(IpAddr, Vec<u16>, Option<u16>)> {
    let (ip, mut ports) = spray_target(offer)?;
    let next = predict::advertised(&offer.peer_candidates)
        .filter(|c| c.ip == ip)
        .map(|c| c.next);
    if let Some(n) = next {
        ports.insert(0, n);
    }
    Some((ip, ports, next))
}

/// The easy side's spray: pass to [`crate::punch::Puncher::spray`] at
/// `now + delay`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SprayPlan {
    pub ip: IpAddr,
    pub ports: Vec<u16>,
    pub delay: Duration,
}

/// The hard side's extra sockets: where each sends, in the order the
/// flows must be made (socket by socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HardPlan {
    pub part: Part,
    pub flows: Vec<Vec<SocketAddr>>,
    /// Which method the flows follow.
    pub strategy: Schedule,
}

/// The method a [`HardPlan`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Many mappings toward an easy peer's one ([`Part::Hard`]).
    Birthday,
    /// Both sides scan each other's port block.
    BlockScan,
    /// Flows aimed at a counter's next ports ([`crate::predict`]).
    Prediction,
}

impl HardPlan {
    /// How many extra sockets the plan needs.
    pub fn sockets(&self) -> usize {
        self.flows.len()
    }
}

/// Everything the birthday method adds to ordinary punching for one offer;
/// both parts are `None` for pairs that ordinary punching handles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub spray: Option<SprayPlan>,
    pub hard: Option<HardPlan>,
}

/// The spray our side adds to its puncher for `offer`, if we are the easy
/// side.
pub fn spray_plan(
    ours: Option<NatClass>,
    offer: &Offer,
    rng: &mut impl rand::Rng,
) -> Option<SprayPlan> {
    if part(ours, offer.peer_nat) != Some(Part::Easy) {
        return None;
    }
    let (ip, seen, next) = spray_seen(offer)?;
    Some(SprayPlan {
        ip,
        ports: spray_ports(&seen, next, rng),
        delay: SPRAY_DELAY,
    })
}

/// How many extra sockets the hard side opens behind our NAT's allocator:
/// all of them send to the peer's one mapping, so each takes a port of its
/// own, and behind a NAT that gives the host a known few ports (a 64-port
/// Cloud NAT block) at most its budget ([`Allocator::budget`]: a quarter),
/// so that the host's other flows and its next punch still find ports.
/// The spray covers such a block whole, so the few meet it as surely.
pub fn hard_sockets(alloc: Allocator) -> usize {
    // The main socket's own flow to the peer is one of the budget's.
    match alloc {
        Allocator::Sequential { .. } => SEQ_SOCKETS,
        a => a
            .budget()
            .map_or(AUX_SOCKETS, |b| b.saturating_sub(1).clamp(1, AUX_SOCKETS)),
    }
}

/// The extra sockets our side opens for `offer`, if our NAT maps per
/// destination and the pair needs them; `alloc` is how our NAT picks ports
/// (see [`hard_sockets`]).
pub fn hard_plan(ours: Option<NatClass>, alloc: Allocator, offer: &Offer) -> Option<HardPlan> {
    let part = part(ours, offer.peer_nat)?;
    let (flows, strategy) = match part {
        Part::Hard => {
            let t = targets(offer, Part::Hard);
            if t.is_empty() {
                return None;
            }
            (vec![t; hard_sockets(alloc)], Schedule::Birthday)
        }
        Part::Both => both_flows(alloc, offer),
        Part::Easy => return None,
    };
    let flows: Vec<Vec<SocketAddr>> = flows.into_iter().filter(|f| !f.is_empty()).collect();
    (!flows.is_empty()).then_some(HardPlan {
        part,
        flows,
        strategy,
    })
}

/// Both NATs map per destination: which schedule meets depends on whether
/// each side counts ([`crate::predict`]); we count when our allocator is
/// sequential (and then advertise it), the peer when it advertised.
fn both_flows(alloc: Allocator, offer: &Offer) -> (Vec<Vec<SocketAddr>>, Schedule) {
    let we_count = matches!(alloc, Allocator::Sequential { .. });
    let peer = predict::advertised(&offer.peer_candidates).filter(|c| c.ip.is_ipv4());
    let block = targets(offer, Part::Both);
    let flows = match (we_count, peer) {
        (true, Some(p)) => predict::both_counting(offer.role == Role::Controlling, &p),
        (true, None) => predict::counting_vs_block(&block),
        (false, Some(p)) => predict::block_vs_counting(&p, predict::BLOCK as u32),
        (false, None) => return (vec![block; BLOCK_SOCKETS], Schedule::BlockScan),
    };
    (flows, Schedule::Prediction)
}

/// [`spray_plan`] and [`hard_plan`] together: one function decides for the
/// agent and the simulator alike.
pub fn plan(
    ours: Option<NatClass>,
    alloc: Allocator,
    offer: &Offer,
    rng: &mut impl rand::Rng,
) -> Plan {
    Plan {
        spray: spray_plan(ours, offer, rng),
        hard: hard_plan(ours, alloc, offer),
    }
}

mod hard_side;
#[cfg(test)]
use hard_side::TXID_ROUND;
pub use hard_side::{HardEvent, HardParams, HardSide};

/// The pong to a ping of the peer's (at `peer_ip`) for this session, or
/// why there is none: what the hard side's sockets answer after it
/// validated.
pub fn answer_ping(
    params: &HardParams,
    peer_ip: IpAddr,
    from: SocketAddr,
    data: &[u8],
) -> Result<Vec<u8>, ProbeError> {
    let p = Probe::decode(data, &params.secret)?;
    if p.session != params.session
        || p.role == params.role
        || from.ip().to_canonical() != peer_ip.to_canonical()
        || p.kind != ProbeKind::Ping
    {
        return Err(ProbeError::BadField);
    }
    Ok(p.pong_to(params.role, from).encode(&params.secret))
}

#[cfg(test)]
mod tests;
