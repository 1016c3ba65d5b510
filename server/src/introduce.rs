//! Introductions: the two offers that tell a requester and a target of each
//! other. One pure builder for every way an introduction happens (both
//! workers here, or one on another server of a cluster); the callers pick
//! the relay, deliver the offers and count what happened.

use crate::registry::Online;
use punch_protocol::cluster::PeerCard;
use punch_protocol::signal::{CandidatePolicy, Offer, PublicKey, Role, SessionId};
use rand::RngCore;
use std::net::IpAddr;

/// What one introduction's two offers share: the session and the key for
/// the probes' MACs, known only to the two agents and the server(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pairing {
    pub session: SessionId,
    pub secret: [u8; 32],
}

/// The side an offer goes to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Recipient {
    /// Controlling for the requester, controlled for the target.
    pub role: Role,
    /// The `Connect` request the offer answers (the requester's only).
    pub req: Option<u32>,
    /// Where the recipient's server sees it: the candidate policy keeps
    /// what explains a path from there.
    pub seen: IpAddr,
}

/// An offer and how many of the peer's candidates the policy kept back.
#[derive(Clone, Debug)]
pub(crate) struct Offered {
    pub offer: Offer,
    pub kept_back: usize,
}

impl Pairing {
    /// A new session with a fresh secret.
    pub(crate) fn fresh(rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Pairing {
            session: SessionId(rng.next_u64()),
            secret,
        }
    }

    /// The offer that tells `to` of `peer`.
    pub(crate) fn offer(
        &self,
        to: Recipient,
        peer: &PeerCard,
        relay: bool,
        policy: CandidatePolicy,
    ) -> Offered {
        let peer_candidates = peer.offered(policy, to.seen);
        Offered {
            kept_back: peer.candidates.len() - peer_candidates.len(),
            offer: Offer {
                req: to.req,
                session: self.session,
                secret: self.secret,
                role: to.role,
                peer_id: peer.id.clone(),
                peer_key: peer.key,
                peer_candidates,
                start_in_ms: 0,
                relay,
                peer_nat: peer.nat,
                peer_tcp_only: peer.tcp_only,
                peer_allocator: peer.allocator.filter(|a| a.plausible()),
            },
        }
    }
}

/// What a peer is told of a worker held here.
pub(crate) fn card<H>(id: &str, worker: &Online<H>, key: PublicKey) -> PeerCard {
    PeerCard {
        id: id.to_string(),
        key,
        candidates: worker.candidates(),
        nat: worker.nat,
        tcp_only: worker.tcp_only(),
        seen: Some(worker.observed.ip()),
        allocator: worker.allocator,
    }
}

/// Counts (and logs) the candidates the candidate policy kept back from an
/// offer: local and cluster introductions alike.
pub(crate) fn counted(shared: &crate::Shared, offered: Offered) -> Offer {
    let kept_back = offered.kept_back;
    if kept_back > 0 {
        shared
            .metrics
            .candidates_unexplained
            .fetch_add(kept_back as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            kept_back,
            offered = offered.offer.peer_candidates.len(),
            "candidates the server cannot explain were not offered"
        );
    }
    offered.offer
}

#[cfg(test)]
mod tests {
    use super::*;
    use punch_protocol::signal::{Candidate, CandidateKind};
    use rand::SeedableRng;

    fn peer(seen: Option<&str>) -> PeerCard {
        let c = |a: &str, kind| Candidate {
            addr: a.parse().unwrap(),
            kind,
        };
        PeerCard {
            id: "worker-b".into(),
            key: [7; 32],
            candidates: vec![
                c("198.51.100.9:4000", CandidateKind::ServerReflexive),
                c("10.0.0.9:4000", CandidateKind::Local),
                c("203.0.113.50:9999", CandidateKind::Stun),
            ],
            nat: None,
            tcp_only: true,
            seen: seen.map(|s| s.parse().unwrap()),
            allocator: None,
        }
    }

    fn requester() -> Recipient {
        Recipient {
            role: Role::Controlling,
            req: Some(9),
            seen: "192.0.2.1".parse().unwrap(),
        }
    }

    #[test]
    fn both_offers_share_the_session_and_tell_each_side_its_role() {
        let p = Pairing::fresh(&mut rand::rngs::StdRng::seed_from_u64(1));
        let to_requester = p.offer(requester(), &peer(None), true, CandidatePolicy::Open);
        let target = Recipient {
            role: Role::Controlled,
            req: None,
            seen: "198.51.100.9".parse().unwrap(),
        };
        let to_target = p.offer(target, &peer(None), false, CandidatePolicy::Open);
        for (o, role, req) in [
            (&to_requester.offer, Role::Controlling, Some(9)),
            (&to_target.offer, Role::Controlled, None),
        ] {
            assert_eq!((o.session, o.secret), (p.session, p.secret));
            assert_eq!((o.role, o.req), (role, req));
            assert_eq!(o.peer_id, "worker-b");
            assert_eq!(o.peer_key, [7; 32]);
            assert!(o.peer_tcp_only);
            assert_eq!(o.start_in_ms, 0);
        }
        assert!(to_requester.offer.relay && !to_target.offer.relay);
        // Sessions differ between introductions.
        let q = Pairing::fresh(&mut rand::rngs::StdRng::seed_from_u64(2));
        assert_ne!(p.session, q.session);
        assert_ne!(p.secret, q.secret);
    }

    #[test]
    fn the_open_policy_passes_every_candidate_and_the_strict_one_counts_what_it_keeps_back() {
        let p = Pairing::fresh(&mut rand::rngs::StdRng::seed_from_u64(1));
        let open = p.offer(
            requester(),
            &peer(Some("198.51.100.9")),
            true,
            CandidatePolicy::Open,
        );
        assert_eq!(open.offer.peer_candidates.len(), 3);
        assert_eq!(open.kept_back, 0);
        let strict = p.offer(
            requester(),
            &peer(Some("198.51.100.9")),
            true,
            CandidatePolicy::Explained,
        );
        assert!(strict.kept_back > 0, "{strict:?}");
        assert_eq!(
            strict.offer.peer_candidates.len() + strict.kept_back,
            3,
            "{strict:?}"
        );
        assert!(strict
            .offer
            .peer_candidates
            .iter()
            .any(|c| c.kind == CandidateKind::ServerReflexive));
        // A card from an older server (no `seen`) under the strict policy
        // keeps only the address its server observed.
        let old = p.offer(requester(), &peer(None), true, CandidatePolicy::Explained);
        assert_eq!(old.offer.peer_candidates.len(), 1);
        assert_eq!(old.kept_back, 2);
    }
}
