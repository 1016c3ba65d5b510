//! The rendezvous server, as far as punching sees it: it records the
//! mapped address each agent's registration arrives from, and introduces
//! the two with offers built as server/src/signal.rs builds them.

use punch_protocol::allocator::Allocator;
use punch_protocol::signal::{Candidate, CandidateKind, NatClass, Offer, Role, SessionId};
use std::net::SocketAddr;

/// What the server knows of one agent.
#[derive(Clone, Debug)]
pub struct Registered {
    /// The agent's main socket as the server saw it (its NAT mapping).
    pub observed: Option<SocketAddr>,
    /// The agent's own address (its `Local` candidate).
    pub local: SocketAddr,
    pub nat: NatClass,
    /// Candidates the agent added itself (its advertised counter, as
    /// `ClientMsg::Candidates` carries it).
    pub extra: Vec<Candidate>,
    /// Its NAT's allocator as it reported it.
    pub alloc: Allocator,
}

/// Candidates offered to the peer: the server-observed address first,
/// then the agent's interface address (`Registration::candidates`).
fn candidates(r: &Registered) -> Vec<Candidate> {
    let mut v = Vec::new();
    if let Some(o) = r.observed {
        v.push(Candidate {
            addr: o,
            kind: CandidateKind::ServerReflexive,
        });
    }
    if !v.iter().any(|c| c.addr == r.local) {
        v.push(Candidate {
            addr: r.local,
            kind: CandidateKind::Local,
        });
    }
    for c in &r.extra {
        // Predicted candidates all stay, as the server keeps them.
        if c.kind == CandidateKind::Predicted || !v.iter().any(|x| x.addr == c.addr) {
            v.push(*c);
        }
    }
    v
}

/// The offers for the requester (controlling, index 0) and the target
/// (controlled, index 1) of one introduction.
pub fn offers(agents: &[Registered; 2], session: SessionId, secret: [u8; 32]) -> [Offer; 2] {
    let offer = |me: usize| {
        let peer = &agents[1 - me];
        Offer {
            req: (me == 0).then_some(1),
            session,
            secret,
            role: if me == 0 {
                Role::Controlling
            } else {
                Role::Controlled
            },
            peer_id: format!("worker-{}", 1 - me),
            peer_key: [(1 - me) as u8; 32],
            peer_candidates: candidates(peer),
            start_in_ms: 0,
            relay: true,
            peer_nat: Some(peer.nat),
            peer_tcp_only: false,
            peer_allocator: (peer.alloc != Allocator::Unknown).then_some(peer.alloc),
        }
    };
    [offer(0), offer(1)]
}
