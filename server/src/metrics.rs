//! Server counters.

use punch_protocol::signal::{NatClass, PathKind, SessionId};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Monotonic counters, shared by all tasks.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub registrations: AtomicU64,
    pub registration_refused: AtomicU64,
    pub auth_failures: AtomicU64,
    pub decode_errors: AtomicU64,
    pub connect_requests: AtomicU64,
    pub introductions: AtomicU64,
    pub connect_errors: AtomicU64,
    pub outcome_direct: AtomicU64,
    pub outcome_relayed: AtomicU64,
    pub outcome_failed: AtomicU64,
    pub address_changes: AtomicU64,
    pub dropped_messages: AtomicU64,
    /// Outcomes by the NAT classes of requester and target.
    pub nat_pairs: Mutex<NatPairs>,
}

/// `requester/target` NAT labels, e.g. `eim-apdf/apdm-apdf`; `unreported`
/// for an agent that has not classified its NAT.
pub fn pair_label(requester: Option<NatClass>, target: Option<NatClass>) -> String {
    let l = |n: Option<NatClass>| n.map_or_else(|| "unreported".to_string(), |n| n.label());
    format!("{}/{}", l(requester), l(target))
}

/// Sessions remembered until their outcome arrives.
const PAIR_SESSIONS: usize = 16_384;

/// Outcome counts per NAT-class pair. Labels come from a small closed set,
/// so the map stays small; sessions awaiting an outcome are capped.
#[derive(Debug, Default)]
pub struct NatPairs {
    pending: HashMap<SessionId, String>,
    order: VecDeque<SessionId>,
    counts: BTreeMap<String, PairCounts>,
}

/// Outcomes of one NAT-class pair.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PairCounts {
    pub direct: u64,
    pub relayed: u64,
    pub failed: u64,
}

impl NatPairs {
    /// Remembers which pair a session introduced.
    pub fn introduced(&mut self, session: SessionId, pair: String) {
        if self.order.len() >= PAIR_SESSIONS {
            if let Some(old) = self.order.pop_front() {
                self.pending.remove(&old);
            }
        }
        self.order.push_back(session);
        self.pending.insert(session, pair);
    }

    /// Counts a session's outcome under its pair; returns the pair.
    pub fn outcome(&mut self, session: SessionId, path: PathKind) -> Option<String> {
        // Counted once: a session has one outcome.
        let pair = self.pending.remove(&session)?;
        let c = self.counts.entry(pair.clone()).or_default();
        match path {
            PathKind::Direct => c.direct += 1,
            PathKind::Relayed => c.relayed += 1,
            PathKind::Failed => c.failed += 1,
        }
        Some(pair)
    }

    /// The counts so far.
    pub fn counts(&self) -> BTreeMap<String, PairCounts> {
        self.counts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use punch_protocol::signal::NatBehaviour::*;

    #[test]
    fn outcomes_count_once_per_session_under_their_pair() {
        let easy = NatClass {
            public: false,
            mapping: EndpointIndependent,
            filtering: AddressAndPortDependent,
            port_preserved: true,
        };
        let hard = NatClass {
            mapping: AddressAndPortDependent,
            port_preserved: false,
            ..easy
        };
        let pair = pair_label(Some(easy), Some(hard));
        assert_eq!(pair, "eim-apdf/apdm-apdf");
        assert_eq!(pair_label(None, Some(easy)), "unreported/eim-apdf");
        let mut p = NatPairs::default();
        p.introduced(SessionId(1), pair.clone());
        assert_eq!(
            p.outcome(SessionId(1), PathKind::Relayed),
            Some(pair.clone())
        );
        // A repeated or unknown report counts nothing.
        assert_eq!(p.outcome(SessionId(1), PathKind::Direct), None);
        assert_eq!(p.outcome(SessionId(9), PathKind::Direct), None);
        assert_eq!(p.counts()[&pair].relayed, 1);
        assert_eq!(p.counts()[&pair].direct, 0);
        // Sessions waiting for an outcome are bounded.
        for i in 0..(PAIR_SESSIONS as u64 + 10) {
            p.introduced(SessionId(100 + i), "x/y".into());
        }
        assert!(p.pending.len() <= PAIR_SESSIONS);
        assert_eq!(p.outcome(SessionId(100), PathKind::Direct), None);
    }
}

/// A point-in-time copy of [`Metrics`], for JSON.
#[derive(Debug, Serialize)]
pub struct MetricsSnapshot {
    pub connections_accepted: u64,
    pub handshake_failures: u64,
    pub registrations: u64,
    pub registration_refused: u64,
    pub auth_failures: u64,
    pub decode_errors: u64,
    pub connect_requests: u64,
    pub introductions: u64,
    pub connect_errors: u64,
    pub outcome_direct: u64,
    pub outcome_relayed: u64,
    pub outcome_failed: u64,
    pub address_changes: u64,
    pub dropped_messages: u64,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            connections_accepted: g(&self.connections_accepted),
            handshake_failures: g(&self.handshake_failures),
            registrations: g(&self.registrations),
            registration_refused: g(&self.registration_refused),
            auth_failures: g(&self.auth_failures),
            decode_errors: g(&self.decode_errors),
            connect_requests: g(&self.connect_requests),
            introductions: g(&self.introductions),
            connect_errors: g(&self.connect_errors),
            outcome_direct: g(&self.outcome_direct),
            outcome_relayed: g(&self.outcome_relayed),
            outcome_failed: g(&self.outcome_failed),
            address_changes: g(&self.address_changes),
            dropped_messages: g(&self.dropped_messages),
        }
    }
}
