//! Budgets: a token bucket, and the probe budget an agent spends on every
//! punching datagram it sends, whichever session it is for.
//!
//! Why an agent-wide budget: candidates come from the peer (through the
//! server), so a peer can name any address; each session's own bounds
//! (pings, spray ports) cap one session, but a peer that asks for many
//! sessions at once would multiply them. The budget caps what the agent
//! sends to one IP address, and in all, per second, across sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket; `rate` 0 never runs dry.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Bucket {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Takes one token; false when none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.refill(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Full again (nothing spent that has not come back) at `now`.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Probes a second one agent sends to one IP address, across sessions:
/// one birthday spray (1,600 a second) and a session's pings fit.
pub const PROBES_PER_IP: u32 = 2_000;
/// Probes saved up for one IP address.
pub const PROBE_BURST_PER_IP: u32 = 4_000;
/// Probes a second one agent sends in all.
pub const PROBES_PER_AGENT: u32 = 8_000;
/// Probes saved up in all.
pub const PROBE_BURST_PER_AGENT: u32 = 16_000;
/// Destinations the budget remembers; beyond it, ones whose bucket is
/// full again are forgotten first, and a new one is refused until then.
pub const MAX_PROBE_DESTINATIONS: usize = 4096;

/// Limits of a [`ProbeBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLimits {
    /// Probes a second to one IP address (0: no limit).
    pub per_ip: u32,
    pub per_ip_burst: u32,
    /// Probes a second in all (0: no limit).
    pub total: u32,
    pub total_burst: u32,
}

impl Default for ProbeLimits {
    fn default() -> Self {
        ProbeLimits {
            per_ip: PROBES_PER_IP,
            per_ip_burst: PROBE_BURST_PER_IP,
            total: PROBES_PER_AGENT,
            total_burst: PROBE_BURST_PER_AGENT,
        }
    }
}

/// The agent-wide probe budget: one bucket per destination IP (bounded
/// table) and one for everything.
#[derive(Debug)]
pub struct ProbeBudget {
    limits: ProbeLimits,
    total: Bucket,
    per_ip: HashMap<IpAddr, Bucket>,
    refused: u64,
    last_sweep: Instant,
}

impl ProbeBudget {
    /// A full budget.
    pub fn new(limits: ProbeLimits, now: Instant) -> Self {
        ProbeBudget {
            limits,
            total: Bucket::new(limits.total, limits.total_burst, now),
            per_ip: HashMap::new(),
            refused: 0,
            last_sweep: now,
        }
    }

    /// May one probe go to `ip` now? Spends it when so.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        if !self.per_ip.contains_key(&ip) && self.per_ip.len() >= MAX_PROBE_DESTINATIONS {
            self.sweep(now);
            if self.per_ip.len() >= MAX_PROBE_DESTINATIONS {
                self.refused += 1;
                return false;
            }
        }
        let l = self.limits;
        let bucket = self
            .per_ip
            .entry(ip)
            .or_insert_with(|| Bucket::new(l.per_ip, l.per_ip_burst, now));
        // Per address first: a refused probe to one address leaves the
        // total for the others.
        let ok = bucket.take(now) && self.total.take(now);
        if !ok {
            self.refused += 1;
        }
        if now.saturating_duration_since(self.last_sweep) > Duration::from_secs(10) {
            self.sweep(now);
        }
        ok
    }

    /// Probes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Destinations remembered now.
    pub fn destinations(&self) -> usize {
        self.per_ip.len()
    }

    /// Forgets destinations whose bucket is full again: they owe nothing.
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        self.per_ip.retain(|_, b| !b.is_full(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn one_address_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let l = ProbeLimits {
            per_ip: 100,
            per_ip_burst: 200,
            total: 0,
            total_burst: 0,
        };
        let mut b = ProbeBudget::new(l, t0);
        let sent = (0..1000).filter(|_| b.allow(ip(1), t0)).count();
        assert_eq!(sent, 200);
        // Another address has its own bucket.
        assert!(b.allow(ip(2), t0));
        // A second later, the rate's worth again.
        let t1 = t0 + Duration::from_secs(1);
        let sent = (0..1000).filter(|_| b.allow(ip(1), t1)).count();
        assert_eq!(sent, 100);
        assert_eq!(b.refused(), 800 + 900);
    }

    #[test]
    fn the_total_caps_many_addresses() {
        let t0 = Instant::now();
        let l = ProbeLimits {
            per_ip: 100,
            per_ip_burst: 100,
            total: 300,
            total_burst: 300,
        };
        let mut b = ProbeBudget::new(l, t0);
        let sent = (0..10u8)
            .flat_map(|n| (0..100).map(move |_| n))
            .filter(|n| b.allow(ip(*n), t0))
            .count();
        assert_eq!(sent, 300);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_settled_destinations() {
        let t0 = Instant::now();
        let mut b = ProbeBudget::new(ProbeLimits::default(), t0);
        for i in 0..MAX_PROBE_DESTINATIONS as u32 {
            assert!(b.allow(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), t0));
        }
        assert_eq!(b.destinations(), MAX_PROBE_DESTINATIONS);
        // Full: a new address waits until others settle.
        assert!(!b.allow(ip(1), t0));
        let later = t0 + Duration::from_secs(1);
        assert!(b.allow(ip(1), later));
        assert!(b.destinations() < MAX_PROBE_DESTINATIONS);
    }
}
