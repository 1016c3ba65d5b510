//! Server counters.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
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
    /// Registrations over QUIC (UDP) and over WebSocket (TCP).
    pub registrations_udp: AtomicU64,
    pub registrations_tcp: AtomicU64,
    pub registration_refused: AtomicU64,
    pub auth_failures: AtomicU64,
    pub decode_errors: AtomicU64,
    pub connect_requests: AtomicU64,
    pub introductions: AtomicU64,
    pub connect_errors: AtomicU64,
    pub outcome_direct: AtomicU64,
    pub outcome_relayed: AtomicU64,
    pub outcome_failed: AtomicU64,
    /// Direct outcomes whose path runs through a gateway port mapping.
    pub direct_via_mapped: AtomicU64,
    pub address_changes: AtomicU64,
    pub dropped_messages: AtomicU64,
    /// Connect requests refused by the requester's rate (token bucket).
    pub connect_rate_limited: AtomicU64,
    /// Queries refused because their connection had its share in flight.
    pub queries_refused: AtomicU64,
    /// Candidates kept out of offers by `--candidates explained`.
    pub candidates_unexplained: AtomicU64,
    /// Outcomes by the NAT classes of requester and target.
    pub nat_pairs: Mutex<NatPairs>,
    /// Time to connect as the agents report it.
    pub connect_time: ConnectTime,
    /// Direct connects by the strategy that found the path.
    pub strategies: Tally,
    /// Connects that started on the relay, by why.
    pub relay_reasons: Tally,
    /// Agents that left, by how.
    pub departures: Tally,
    /// Woken on every connect recorded or detailed (the status stream
    /// waits on it), and their count.
    pub changed: tokio::sync::Notify,
    changes: AtomicU64,
    /// The latest connects, newest last, for the status page.
    pub recent: Mutex<VecDeque<RecentConnect>>,
}

/// Connects kept for the status page.
pub const RECENT_CONNECTS: usize = 50;

/// One finished connect.
#[derive(Debug, Clone, Serialize)]
pub struct RecentConnect {
    pub at: std::time::SystemTime,
    #[serde(skip)]
    pub session: punch_protocol::signal::SessionId,
    pub requester: String,
    pub target: String,
    pub path: &'static str,
    pub connect_ms: u32,
    pub nat_pair: String,
    /// How the direct path was found, as the requester reported it
    /// (`plain`, `block-scan`, `birthday`, `prediction`, `port-mapping`,
    /// `ipv6`).
    pub strategy: Option<String>,
    /// Why the connection started on the relay (`udp-blocked`,
    /// `both-random`, `peer-never-answered`, `forced`).
    pub relay_reason: Option<String>,
}

impl Metrics {
    /// Remembers a finished connect.
    pub fn record(&self, c: RecentConnect) {
        let mut r = self.recent.lock().expect("not poisoned");
        if r.len() >= RECENT_CONNECTS {
            r.pop_front();
        }
        r.push_back(c);
        drop(r);
        self.bump();
    }

    /// The connects remembered, newest first.
    pub fn recent_newest_first(&self) -> Vec<RecentConnect> {
        let r = self.recent.lock().expect("not poisoned");
        r.iter().rev().cloned().collect()
    }

    /// Adds the requester's strategy and relay reason to its connect and
    /// counts them, once per connect.
    pub fn detail(
        &self,
        session: punch_protocol::signal::SessionId,
        requester: &str,
        strategy: Option<String>,
        relay_reason: Option<String>,
    ) {
        {
            let mut r = self.recent.lock().expect("not poisoned");
            let Some(c) = r
                .iter_mut()
                .rev()
                .find(|c| c.session == session && c.requester == requester)
            else {
                return;
            };
            if c.strategy.is_some() || c.relay_reason.is_some() {
                return;
            }
            if let Some(n) = &strategy {
                self.strategies.inc(&STRATEGIES, n);
            }
            if let Some(n) = &relay_reason {
                self.relay_reasons.inc(&RELAY_REASONS, n);
            }
            c.strategy = strategy;
            c.relay_reason = relay_reason;
        }
        self.bump();
    }

    fn bump(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Connects recorded or detailed so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }
}

/// Histograms of reported times to connect, in seconds: all of them, and
/// direct and relayed apart.
#[derive(Debug)]
pub struct ConnectTime {
    pub all: Histogram,
    /// By `path` (`direct`, `relayed`).
    pub by_path: Family<Vec<(String, String)>, Histogram>,
    /// Direct and relayed counts per [`PAGE_BUCKETS_MS`] bucket (the last
    /// one open-ended), for the status page.
    page: Mutex<[[u64; PAGE_BUCKETS_MS.len() + 1]; 2]>,
}

/// Upper bounds of the status page's time-to-connect buckets, in ms: the
/// same as the Prometheus histogram's.
pub const PAGE_BUCKETS_MS: [u32; 13] = [
    5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480,
];

fn connect_buckets() -> Histogram {
    // 5 ms to about 20 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

impl Default for ConnectTime {
    fn default() -> Self {
        let by_path = Family::new_with_constructor(connect_buckets as fn() -> Histogram);
        // Both series exist from the start, for dashboards and alerts.
        for path in ["direct", "relayed"] {
            drop(by_path.get_or_create(&vec![("path".into(), path.into())]));
        }
        ConnectTime {
            all: connect_buckets(),
            by_path,
            page: Mutex::default(),
        }
    }
}

impl ConnectTime {
    /// Counts one connect that got a path.
    pub fn observe(&self, path: PathKind, seconds: f64) {
        self.all.observe(seconds);
        let row = match path {
            PathKind::Direct => 0,
            PathKind::Relayed => 1,
            PathKind::Failed => return,
        };
        self.by_path
            .get_or_create(&vec![("path".into(), path.as_str().into())])
            .observe(seconds);
        let ms = seconds * 1e3;
        let b = PAGE_BUCKETS_MS
            .iter()
            .position(|le| ms <= f64::from(*le))
            .unwrap_or(PAGE_BUCKETS_MS.len());
        self.page.lock().expect("not poisoned")[row][b] += 1;
    }

    /// Direct and relayed counts per [`PAGE_BUCKETS_MS`] bucket.
    pub fn page_buckets(&self) -> [[u64; PAGE_BUCKETS_MS.len() + 1]; 2] {
        *self.page.lock().expect("not poisoned")
    }
}

/// The strategies a requester may report; anything else counts as
/// `other`, so an agent cannot grow the label set.
pub const STRATEGIES: [&str; 6] = [
    "plain",
    "block-scan",
    "birthday",
    "prediction",
    "port-mapping",
    "ipv6",
];

/// The relay reasons a requester may report (else `other`).
pub const RELAY_REASONS: [&str; 4] = [
    "forced",
    "udp-blocked",
    "both-random",
    "peer-never-answered",
];

/// How a registered agent left: said goodbye, its connection dropped (it
/// turns stale), or it stayed away past the grace period.
pub const DEPARTURES: [&str; 3] = ["deregistered", "dropped", "expired"];

/// Counts by a label from a fixed list, plus `other`.
#[derive(Debug, Default)]
pub struct Tally(Mutex<BTreeMap<&'static str, u64>>);

impl Tally {
    /// Counts `name` under its own label if `known` lists it.
    pub fn inc(&self, known: &[&'static str], name: &str) {
        let label = known
            .iter()
            .find(|k| **k == name)
            .copied()
            .unwrap_or("other");
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(label)
            .or_default() += 1;
    }

    /// Every label counted so far.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// The Prometheus (OpenMetrics) text exposition of the server's state.
pub fn prometheus(s: &crate::Shared) -> String {
    let m = s.metrics.snapshot();
    let mut reg = Registry::with_prefix("punch");
    let (online, stale) = {
        let r = s.registry.lock().expect("not poisoned");
        (r.online_count(), r.stale_count())
    };
    reg.register(
        "agents_online",
        "Agents with a live signaling connection",
        ConstGauge::new(online as i64),
    );
    reg.register(
        "agents_stale",
        "Agents whose connection dropped, within the grace period",
        ConstGauge::new(stale as i64),
    );
    let counters: [(&str, &str, u64); 11] = [
        ("registrations", "Successful registrations", m.registrations),
        (
            "registrations_refused",
            "Refused registrations",
            m.registration_refused,
        ),
        (
            "auth_failures",
            "Registrations with a missing or wrong token",
            m.auth_failures,
        ),
        (
            "decode_errors",
            "Malformed signaling frames",
            m.decode_errors,
        ),
        ("connect_requests", "Connect requests", m.connect_requests),
        ("introductions", "Introductions sent", m.introductions),
        (
            "connect_errors",
            "Connect requests refused",
            m.connect_errors,
        ),
        ("address_changes", "NAT rebindings seen", m.address_changes),
        (
            "handshake_failures",
            "Failed QUIC handshakes",
            m.handshake_failures,
        ),
        (
            "stun_requests",
            "STUN Binding requests answered",
            s.stun.requests.load(Ordering::Relaxed),
        ),
        (
            "waits_refused",
            "Waits refused because too many ran",
            s.hub.waits_refused.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        reg.register(name, help, ConstCounter::new(v));
    }
    for (name, help, v) in [
        (
            "connect_rate_limited",
            "Connect requests refused because the agent exceeded --connect-rate",
            m.connect_rate_limited,
        ),
        (
            "queries_refused",
            "Queries refused because the agent had --max-queries-per-agent in flight",
            m.queries_refused,
        ),
        (
            "registrations_udp",
            "Registrations over QUIC (UDP)",
            m.registrations_udp,
        ),
        (
            "registrations_tcp",
            "Registrations over WebSocket (TCP)",
            m.registrations_tcp,
        ),
        (
            "direct_via_mapped",
            "Direct connections through a port the gateway mapped on request (PCP, NAT-PMP, UPnP)",
            m.direct_via_mapped,
        ),
        (
            "candidates_unexplained",
            "Candidates kept out of offers: nothing the server saw explains them (--candidates explained)",
            m.candidates_unexplained,
        ),
    ] {
        reg.register(name, help, ConstCounter::new(v));
    }
    reg.register(
        "tcp_clients",
        "Open WebSocket channels",
        ConstGauge::new(s.tcp.count() as i64),
    );
    for (name, help, v) in s.tcp.counters() {
        reg.register(format!("tcp_{name}"), help, ConstCounter::new(v));
    }
    reg.register(
        "http_connections",
        "Connections the HTTP listener holds now",
        ConstGauge::new(s.http_door.open() as i64),
    );
    for (name, help, v) in s.http_door.stats.list() {
        reg.register(format!("http_{name}"), help, ConstCounter::new(v));
    }
    if let Some(c) = &s.cluster {
        reg.register(
            "cluster_redis_up",
            "Redis answered the last cluster command (1) or not (0)",
            ConstGauge::new(c.stats.up.load(Ordering::Relaxed) as i64),
        );
        for (name, help, v) in c.stats.list() {
            reg.register(format!("cluster_{name}"), help, ConstCounter::new(v));
        }
    }
    reg.register(
        "waits_in_progress",
        "Long-polls and barrier waits running",
        ConstGauge::new(s.hub.waits_in_progress() as i64),
    );
    reg.register(
        "barriers_held",
        "Barriers held now: released within the TTL, or with waiters",
        ConstGauge::new(s.hub.barriers_held() as i64),
    );
    let outcomes = Family::<Vec<(String, String)>, Counter>::default();
    for (path, v) in [
        ("direct", m.outcome_direct),
        ("relayed", m.outcome_relayed),
        ("failed", m.outcome_failed),
    ] {
        outcomes
            .get_or_create(&vec![("path".into(), path.into())])
            .inc_by(v);
    }
    reg.register("connect_outcomes", "Connect outcomes by path", outcomes);
    let by_nat = Family::<Vec<(String, String)>, Counter>::default();
    for (pair, c) in s.metrics.nat_pairs.lock().expect("not poisoned").counts() {
        for (path, v) in [
            ("direct", c.direct),
            ("relayed", c.relayed),
            ("failed", c.failed),
        ] {
            by_nat
                .get_or_create(&vec![
                    ("nat_pair".into(), pair.clone()),
                    ("path".into(), path.into()),
                ])
                .inc_by(v);
        }
    }
    reg.register(
        "connect_outcomes_by_nat",
        "Connect outcomes by requester/target NAT class and path",
        by_nat,
    );
    let ct = &s.metrics.connect_time;
    reg.register(
        "time_to_connect_seconds",
        "Time to connect as agents report it",
        ct.all.clone(),
    );
    reg.register(
        "time_to_connect_by_path_seconds",
        "Time to connect as agents report it, direct and relayed apart",
        ct.by_path.clone(),
    );
    for (name, help, tally, label, known) in [
        (
            "connect_strategies",
            "Direct connects by the strategy that found the path, as the requester reported it",
            &s.metrics.strategies,
            "strategy",
            &STRATEGIES[..],
        ),
        (
            "relay_reasons",
            "Connects that started on the relay, by why, as the requester reported it",
            &s.metrics.relay_reasons,
            "reason",
            &RELAY_REASONS[..],
        ),
        (
            "agent_departures",
            "Registered agents that left: deregistered (a goodbye), dropped (connection lost; stale) or expired (stale past the grace period)",
            &s.metrics.departures,
            "how",
            &DEPARTURES[..],
        ),
    ] {
        let counts = tally.counts();
        let fam = Family::<Vec<(String, String)>, Counter>::default();
        // Departures are counted by the server itself: no `other`.
        let other = (label != "how").then_some("other");
        for k in known.iter().copied().chain(other) {
            fam.get_or_create(&vec![(label.into(), k.into())])
                .inc_by(counts.get(k).copied().unwrap_or(0));
        }
        reg.register(name, help, fam);
    }
    if let Some(t) = &s.relay {
        let t = t.lock().expect("not poisoned");
        reg.register(
            "relay_sessions",
            "Relay sessions held",
            ConstGauge::new(t.len() as i64),
        );
        reg.register(
            "relay_forwarded_bytes",
            "Bytes relayed",
            ConstCounter::new(t.stats.forwarded_bytes),
        );
        reg.register(
            "relay_forwarded_packets",
            "Datagrams relayed",
            ConstCounter::new(t.stats.forwarded_packets),
        );
        reg.register(
            "relay_held",
            "Relay frames held until the peer bound, then forwarded",
            ConstCounter::new(t.stats.held),
        );
        reg.register(
            "relay_dropped",
            "Relay frames dropped (bad MAC, unknown session, quota)",
            ConstCounter::new(t.stats.dropped),
        );
        reg.register(
            "relay_quota_dropped",
            "Relay frames dropped because their session's byte or time quota was spent",
            ConstCounter::new(t.stats.quota_dropped),
        );
        reg.register(
            "relay_ended_notices",
            "Notices sent to agents that their relay session's quota is spent",
            ConstCounter::new(t.stats.ended_notices),
        );
        reg.register(
            "relay_share_evicted",
            "Unused relay sessions dropped to make room in their requester's share",
            ConstCounter::new(t.stats.share_evicted),
        );
        reg.register(
            "relay_share_refused",
            "Offers sent without a relay because the requester's share was all in use",
            ConstCounter::new(t.stats.share_refused),
        );
        reg.register(
            "relay_unknown_replies",
            "Binds for relay sessions this server does not know (it restarted), answered so the agents renew",
            ConstCounter::new(t.stats.unknown_replies),
        );
        reg.register(
            "relay_replayed_binds",
            "Relay binds refused as replays (a nonce already seen, from another address)",
            ConstCounter::new(t.stats.replayed_binds),
        );
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
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
    /// Session → (pair label, target id).
    pending: HashMap<SessionId, (String, String)>,
    order: VecDeque<SessionId>,
    counts: BTreeMap<String, PairCounts>,
}

/// Outcomes of one NAT-class pair.
#[derive(Debug, Default, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct PairCounts {
    pub direct: u64,
    pub relayed: u64,
    pub failed: u64,
}

impl NatPairs {
    /// Remembers which pair (and target) a session introduced.
    pub fn introduced(&mut self, session: SessionId, pair: String, target: String) {
        if self.order.len() >= PAIR_SESSIONS {
            if let Some(old) = self.order.pop_front() {
                self.pending.remove(&old);
            }
        }
        self.order.push_back(session);
        self.pending.insert(session, (pair, target));
    }

    /// Counts a session's outcome under its pair; returns the pair and the
    /// target.
    pub fn outcome(&mut self, session: SessionId, path: PathKind) -> Option<(String, String)> {
        // Counted once: a session has one outcome.
        let (pair, target) = self.pending.remove(&session)?;
        let c = self.counts.entry(pair.clone()).or_default();
        match path {
            PathKind::Direct => c.direct += 1,
            PathKind::Relayed => c.relayed += 1,
            PathKind::Failed => c.failed += 1,
        }
        Some((pair, target))
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
    fn strategies_count_once_per_connect_and_unknown_names_as_other() {
        let m = Metrics::default();
        let session = SessionId(7);
        m.record(RecentConnect {
            at: std::time::SystemTime::now(),
            session,
            requester: "a".into(),
            target: "b".into(),
            path: "direct",
            connect_ms: 80,
            nat_pair: "x/y".into(),
            strategy: None,
            relay_reason: None,
        });
        m.detail(session, "a", Some("birthday".into()), None);
        // A repeat, and a detail for a connect it did not make, count nothing.
        m.detail(session, "a", Some("plain".into()), None);
        m.detail(session, "mallory", Some("plain".into()), None);
        assert_eq!(m.strategies.counts(), [("birthday", 1)].into());
        let t = Tally::default();
        t.inc(&STRATEGIES, "made-up-by-an-agent");
        assert_eq!(t.counts(), [("other", 1)].into());
    }

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
        p.introduced(SessionId(1), pair.clone(), "b".into());
        assert_eq!(
            p.outcome(SessionId(1), PathKind::Relayed),
            Some((pair.clone(), "b".into()))
        );
        // A repeated or unknown report counts nothing.
        assert_eq!(p.outcome(SessionId(1), PathKind::Direct), None);
        assert_eq!(p.outcome(SessionId(9), PathKind::Direct), None);
        assert_eq!(p.counts()[&pair].relayed, 1);
        assert_eq!(p.counts()[&pair].direct, 0);
        // Sessions waiting for an outcome are bounded.
        for i in 0..(PAIR_SESSIONS as u64 + 10) {
            p.introduced(SessionId(100 + i), "x/y".into(), "b".into());
        }
        assert!(p.pending.len() <= PAIR_SESSIONS);
        assert_eq!(p.outcome(SessionId(100), PathKind::Direct), None);
    }
}

/// A point-in-time copy of [`Metrics`], for JSON.
#[derive(Debug, Serialize, utoipa::ToSchema)]
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
    pub direct_via_mapped: u64,
    pub address_changes: u64,
    pub dropped_messages: u64,
    pub registrations_udp: u64,
    pub registrations_tcp: u64,
    pub connect_rate_limited: u64,
    pub queries_refused: u64,
    pub candidates_unexplained: u64,
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
            direct_via_mapped: g(&self.direct_via_mapped),
            address_changes: g(&self.address_changes),
            dropped_messages: g(&self.dropped_messages),
            registrations_udp: g(&self.registrations_udp),
            registrations_tcp: g(&self.registrations_tcp),
            connect_rate_limited: g(&self.connect_rate_limited),
            queries_refused: g(&self.queries_refused),
            candidates_unexplained: g(&self.candidates_unexplained),
        }
    }
}
