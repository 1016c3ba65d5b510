//! The birthday method, for a peer pair where one NAT maps every
//! destination to a new, unpredictable port (endpoint-dependent mapping:
//! "symmetric") and the other keeps one mapping for all destinations but
//! filters by address and port (a port-restricted home NAT, Cloud NAT with
//! EIM).
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

use crate::session::Punched;
use crate::Inner;
use punch_protocol::probe::{self, Probe, ProbeKind};
use punch_protocol::signal::{CandidateKind, NatBehaviour, NatClass, Offer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// Sockets the hard side opens.
pub const AUX_SOCKETS: usize = 256;
/// Extra sockets each side opens when both NATs map per destination
/// (see [`Part::Both`]).
pub const BLOCK_SOCKETS: usize = 3;
/// Ports the easy side sprays (block first, then random ones).
pub const SPRAY_PORTS: usize = 2048;

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
/// then random ports, [`SPRAY_PORTS`] in all, no duplicates.
pub fn spray_ports(seen: &[u16], rng: &mut impl rand::Rng) -> Vec<u16> {
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
/// mapping (hard side), or every port of the aligned 64-port block around
/// each port we saw it use (both sides hard). IPv4 only.
pub fn targets(offer: &Offer, part: Part) -> Vec<SocketAddr> {
    match part {
        Part::Hard => public_candidates(offer).filter(|a| a.is_ipv4()).collect(),
        Part::Both => {
            let Some((ip, seen)) = spray_target(offer).filter(|(ip, _)| ip.is_ipv4()) else {
                return Vec::new();
            };
            let mut blocks: Vec<u16> = seen.iter().map(|p| p & !63).collect();
            blocks.sort_unstable();
            blocks.dedup();
            blocks
                .iter()
                .flat_map(|b| (0..64u16).map(move |k| b.wrapping_add(k)))
                .filter(|p| *p >= 1024)
                .map(|p| SocketAddr::new(ip, p))
                .collect()
        }
        Part::Easy => Vec::new(),
    }
}

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

/// The hard side: opens `sockets` sockets, sends a ping from each to
/// every target (the peer's public mapping, or its port block), answers
/// the pings of the peer's spray and pings back; the first socket with a
/// pong from the peer is the path.
/// Returns it and the peer's address (when found within `limit`), and
/// every socket the peer pinged: the peer may have validated another one of
/// them (its ordinary punching meets them too when its filter is looser
/// than its class said) and will send there.
pub(crate) async fn hard_side(
    inner: &Arc<Inner>,
    offer: &Offer,
    sockets: usize,
    targets: Vec<SocketAddr>,
    limit: Duration,
) -> (Option<(Arc<UdpSocket>, Punched)>, Vec<Arc<UdpSocket>>) {
    if targets.is_empty() {
        return (None, Vec::new());
    }
    let local = inner.socket.local_ip_v4();
    let mut socks = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        match UdpSocket::bind(SocketAddr::new(local, 0)).await {
            Ok(s) => socks.push(Arc::new(s)),
            Err(e) => {
                debug!("birthday: only {} sockets: {e}", socks.len());
                break;
            }
        }
    }
    info!(sockets = socks.len(), targets = targets.len(), first = %targets[0], "birthday method: hard side opens its sockets");
    let (tx, mut rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
    let mut readers = Vec::with_capacity(socks.len());
    for (i, s) in socks.iter().enumerate() {
        let (s, tx) = (s.clone(), tx.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                if probe::is_probe(&buf[..n])
                    && tx.send((i, from, buf[..n].to_vec())).await.is_err()
                {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let ping = |txid: u64| Probe::ping(offer.role, offer.session, txid).encode(&offer.secret);
    let txid_base: u64 = rand::random::<u64>() >> 1;
    let mut sent_at = vec![Instant::now(); socks.len()];
    // Twice: a first ping lost on the way still leaves the mapping, and a
    // second one a while later keeps it fresh while the spray arrives.
    for round in 0..2u64 {
        for (i, s) in socks.iter().enumerate() {
            for t in &targets {
                let _ = s.try_send_to(&ping(txid_base + i as u64 + round * 1_000_000), *t);
            }
            sent_at[i] = Instant::now();
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut hits: Vec<usize> = Vec::new();
    let found = loop {
        let Ok(Some((i, from, data))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            break None;
        };
        let Ok(p) = Probe::decode(&data, &offer.secret) else {
            continue;
        };
        if p.session != offer.session || p.role == offer.role || from.ip() != targets[0].ip() {
            continue;
        }
        match p.kind {
            ProbeKind::Ping => {
                // The spray found socket i: answer, and ping back so our
                // side validates too.
                let pong = p.pong_to(offer.role, from).encode(&offer.secret);
                let _ = socks[i].try_send_to(&pong, from);
                let _ = socks[i].try_send_to(&ping(txid_base + i as u64 + 2_000_000), from);
                sent_at[i] = Instant::now();
                if !hits.contains(&i) {
                    hits.push(i);
                }
                debug!(socket = i, %from, "birthday: the spray met one of our mappings");
            }
            ProbeKind::Pong { observed } => {
                let k = p.txid.wrapping_sub(txid_base) % 1_000_000;
                if k as usize == i {
                    break Some((
                        socks[i].clone(),
                        Punched {
                            addr: from,
                            rtt: sent_at[i].elapsed(),
                            via_mapped: false,
                        },
                        observed,
                    ));
                }
            }
        }
    };
    for r in readers {
        r.abort();
    }
    let met = hits.into_iter().map(|i| socks[i].clone()).collect();
    let Some((sock, punched, observed)) = found else {
        return (None, met);
    };
    info!(addr = %punched.addr, %observed, "birthday method: path validated through an extra socket");
    (Some((sock, punched)), met)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(mapping: NatBehaviour, filtering: NatBehaviour) -> Option<NatClass> {
        Some(NatClass {
            public: false,
            mapping,
            filtering,
            port_preserved: false,
        })
    }

    #[test]
    fn parts_follow_the_nat_classes() {
        use NatBehaviour::*;
        let sym = class(AddressAndPortDependent, AddressAndPortDependent);
        let pr = class(EndpointIndependent, AddressAndPortDependent);
        let restricted = class(EndpointIndependent, AddressDependent);
        assert_eq!(part(sym, pr), Some(Part::Hard));
        assert_eq!(part(pr, sym), Some(Part::Easy));
        // Both hard: both scan each other's port block.
        assert_eq!(part(sym, sym), Some(Part::Both));
        // Ordinary punching handles these.
        assert_eq!(part(sym, restricted), None);
        assert_eq!(part(pr, pr), None);
        assert_eq!(part(None, pr), None);
        // Not yet known: no birthday.
        let early = class(EndpointIndependent, Unknown);
        assert_eq!(part(early, sym), None);
        assert_eq!(part(sym, early), None);
    }

    #[test]
    fn spray_ports_cover_the_block_first_without_duplicates() {
        let mut rng = rand::thread_rng();
        let ports = spray_ports(&[40_010, 40_020], &mut rng);
        assert_eq!(ports.len(), SPRAY_PORTS);
        assert_eq!(ports[..64], (40_000..40_064).collect::<Vec<u16>>()[..]);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
        assert!(ports.iter().all(|p| *p >= 1024));
    }
}
