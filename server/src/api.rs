//! The JSON bodies of the HTTP API, in one place for the handlers that
//! build them and the OpenAPI description that documents them.

use crate::Shared;
use punch_protocol::view::{NatView, WorkerView};
use serde::Serialize;
use utoipa::ToSchema;

/// Every error answer: `{"error": KIND, "message": TEXT}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorJson {
    /// `missing_token`, `bad_token`, `bad_request`, `unknown_worker`,
    /// `none_online`, `timeout`, `busy`, `not_found`.
    pub error: String,
    /// For people.
    pub message: String,
}

/// A barrier's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct BarrierJson {
    pub barrier: String,
    /// Always true: a wait answers only once the barrier is released.
    pub released: bool,
}

/// One online worker in `GET /peers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PeerJson {
    pub worker_id: String,
    pub observed_addr: String,
    /// RFC 3339, UTC.
    pub connected_since: String,
    /// Candidates offered to peers, as `KIND ADDR` (`server`, `local`,
    /// `stun`, `mapped`, `predicted`).
    pub candidates: Vec<String>,
    /// The NAT class the agent measured and reported, if it has.
    pub nat: Option<NatView>,
    /// Where its NAT's port counter stands, when it counts and advertised
    /// it (two `predicted` candidates, `punch_protocol::predict`).
    pub counter: Option<CounterJson>,
}

/// An advertised port counter.
#[derive(Debug, Serialize, ToSchema)]
pub struct CounterJson {
    /// The port its next mapping should get.
    pub next: u16,
    /// Between two new mappings' ports.
    pub stride: i16,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub agents_online: usize,
    pub fingerprint: String,
    pub metrics: crate::metrics::MetricsSnapshot,
    pub relay: Option<RelayJson>,
    pub stun: StunJson,
    /// The TCP (WebSocket) channel's counters and open channels.
    pub tcp: std::collections::BTreeMap<&'static str, u64>,
    /// The HTTP listener's door: accepted, refused at the cap, closed for
    /// a late request head, and connections held now.
    pub http: std::collections::BTreeMap<&'static str, u64>,
    /// Connect outcomes by `requester/target` NAT class.
    pub outcomes_by_nat_pair: std::collections::BTreeMap<String, crate::metrics::PairCounts>,
    /// Cluster mode: this server's id, whether Redis answers, and counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterJson {
    pub server_id: String,
    pub redis_up: bool,
    pub relay_addr: String,
    #[serde(flatten)]
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StunJson {
    pub requests: u64,
    pub errors_sent: u64,
    pub dropped: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RelayJson {
    pub sessions: usize,
    pub binds: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped: u64,
    pub expired: u64,
    /// Frames held until the peer bound, then forwarded.
    pub held: u64,
    /// Frames dropped for a spent session quota.
    pub quota_dropped: u64,
    /// Notices sent for spent sessions.
    pub ended_notices: u64,
    /// Binds for sessions the server does not know, answered "unknown".
    pub unknown_replies: u64,
    /// Binds refused as replays from another address.
    pub replayed_binds: u64,
}

/// One of the latest connects, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectView {
    /// RFC 3339.
    pub at: String,
    /// The punch session (16 hex digits, as `connect --json` prints it).
    pub session: String,
    pub requester: String,
    pub target: String,
    /// `direct`, `relayed` or `failed`.
    pub path: &'static str,
    pub connect_ms: u32,
    /// The NAT classes of requester and target.
    pub nat_pair: String,
    /// How the direct path was found (`plain`, `block-scan`, `birthday`,
    /// `prediction`, `port-mapping`, `ipv6`), as the requester reported it.
    pub strategy: Option<String>,
    /// Why it started on the relay (`udp-blocked`, `both-random`,
    /// `peer-never-answered`, `forced`).
    pub relay_reason: Option<String>,
    /// Bytes this server relayed for the session so far, while it still
    /// holds the session's relay binding: a direct connection's is 0.
    pub relayed_bytes: Option<u64>,
}

/// Workers' views, each with the port allocator it reported when it is
/// connected to this server (other servers of a cluster keep theirs).
pub fn worker_views(s: &Shared, list: Vec<punch_protocol::signal::WorkerInfo>) -> Vec<WorkerView> {
    let reg = s.registry.lock().expect("not poisoned");
    list.into_iter()
        .map(|w| {
            let alloc = reg.allocator(&w.id);
            let mut v = WorkerView::from(w);
            if let Some(n) = &mut v.nat {
                n.allocator = alloc.map(punch_protocol::view::AllocatorView::from);
            }
            v
        })
        .collect()
}

/// The latest connects this server introduced, newest first, each with
/// what the relay carried for it while it holds the binding.
pub fn connect_views(s: &Shared) -> Vec<ConnectView> {
    let recent = s.metrics.recent_newest_first();
    let relay = s.relay.as_ref().map(|t| t.lock().expect("not poisoned"));
    recent
        .into_iter()
        .map(|c| ConnectView {
            relayed_bytes: relay.as_ref().and_then(|t| t.session_bytes(c.session)),
            session: c.session.to_string(),
            at: humantime::format_rfc3339_seconds(c.at).to_string(),
            requester: c.requester,
            target: c.target,
            path: c.path,
            connect_ms: c.connect_ms,
            nat_pair: c.nat_pair,
            strategy: c.strategy,
            relay_reason: c.relay_reason,
        })
        .collect()
}
