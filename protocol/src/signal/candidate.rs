//! Candidates: the addresses an agent may be reached at, and which of
//! them a server hands to peers.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// Where a candidate address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CandidateKind {
    /// An address of the agent's own interface.
    Local,
    /// The address the rendezvous server observed.
    ServerReflexive,
    /// Learned from a STUN server.
    Stun,
    /// A port mapping granted by the gateway (PCP, NAT-PMP, UPnP).
    Mapped,
    /// Seen as the source of a valid probe.
    PeerReflexive,
    /// A guess: another port of the peer's NAT port block.
    Predicted,
}

/// One address a peer may be reached at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub kind: CandidateKind,
}

/// May `addr`, offered by an agent the server sees at `observed`, be handed
/// to peers as a candidate? Never an unspecified, multicast or broadcast
/// address or port 0 (a peer would only send probes into the void, or to
/// every host of a network), and a loopback address only when the agent
/// itself reaches the server over loopback (the same host): from anywhere
/// else it would point the peer's probes at the peer's own host.
pub fn usable_candidate(addr: SocketAddr, observed: SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    let loopback_elsewhere = ip.is_loopback() && !observed.ip().to_canonical().is_loopback();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !broadcast
        && !loopback_elsewhere
}

/// Which of an agent's candidates a server hands to its peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CandidatePolicy {
    /// Every [`usable_candidate`]: for servers whose agents are the
    /// operator's own (the default).
    #[default]
    Open,
    /// For public servers, where agents may lie: only addresses the server
    /// can explain from what it sees itself ([`explained_candidate`]), so
    /// no agent can point its peers' probes at a third party.
    Explained,
}

impl std::str::FromStr for CandidatePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(CandidatePolicy::Open),
            "explained" => Ok(CandidatePolicy::Explained),
            _ => Err(format!("{s:?} is not a candidate policy (open, explained)")),
        }
    }
}

impl CandidatePolicy {
    /// Keeps the candidates of an agent the server sees at `owner_seen` that
    /// may be handed to a peer it sees at `peer_seen` (unknown: `None`).
    pub fn filter(
        self,
        candidates: Vec<Candidate>,
        owner_seen: IpAddr,
        peer_seen: Option<IpAddr>,
    ) -> Vec<Candidate> {
        match self {
            CandidatePolicy::Open => candidates,
            CandidatePolicy::Explained => candidates
                .into_iter()
                .filter(|c| explained_candidate(c.addr.ip(), owner_seen, peer_seen))
                .collect(),
        }
    }
}

/// Does what the server sees explain a candidate at `ip` of an agent it
/// sees at `owner_seen`, offered to a peer it sees at `peer_seen`? The
/// agent's own public address (any port: its NAT's other mappings, port
/// predictions, mapped ports, STUN answers from elsewhere); a private,
/// shared (CGNAT) or link-local address only when the peer is seen at the
/// same public address (behind the same NAT, so on the same network); a
/// global IPv6 address in the /64 of the agent's own IPv6 address. Anything
/// else the agent could have made up.
pub fn explained_candidate(ip: IpAddr, owner_seen: IpAddr, peer_seen: Option<IpAddr>) -> bool {
    let (ip, owner) = (ip.to_canonical(), owner_seen.to_canonical());
    if ip == owner {
        return true;
    }
    let same_nat = peer_seen.is_some_and(|p| p.to_canonical() == owner);
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let shared = o[0] == 100 && (o[1] & 0xc0) == 64;
            (v4.is_private() || v4.is_link_local() || shared) && same_nat
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let local = (seg[0] & 0xfe00) == 0xfc00 || (seg[0] & 0xffc0) == 0xfe80;
            if local {
                return same_nat;
            }
            matches!(owner, IpAddr::V6(o) if o.segments()[..4] == seg[..4])
        }
    }
}
