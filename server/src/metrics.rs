//! Server counters.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

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
