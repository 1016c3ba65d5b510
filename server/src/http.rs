//! The HTTP admin endpoint: `GET /healthz` and `GET /peers`.

use crate::Shared;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

/// One online worker in `GET /peers`.
#[derive(Debug, Serialize)]
pub struct PeerJson {
    pub worker_id: String,
    pub observed_addr: String,
    /// RFC 3339, UTC.
    pub connected_since: String,
    /// Candidates offered to peers, as `KIND ADDR` (`server`, `local`,
    /// `stun`, `mapped`).
    pub candidates: Vec<String>,
    /// The NAT class the agent measured and reported, if it has.
    pub nat: Option<NatJson>,
}

/// An agent's NAT class in JSON.
#[derive(Debug, Serialize)]
pub struct NatJson {
    /// Short form: `none`, or e.g. `eim-apdf`.
    pub label: String,
    pub mapping: &'static str,
    pub filtering: &'static str,
    pub port_preserved: bool,
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    agents_online: usize,
    fingerprint: String,
    metrics: crate::metrics::MetricsSnapshot,
    relay: Option<RelayJson>,
    stun: StunJson,
    /// Connect outcomes by `requester/target` NAT class.
    outcomes_by_nat_pair: std::collections::BTreeMap<String, crate::metrics::PairCounts>,
}

#[derive(Debug, Serialize)]
struct StunJson {
    requests: u64,
    errors_sent: u64,
    dropped: u64,
}

#[derive(Debug, Serialize)]
struct RelayJson {
    sessions: usize,
    binds: u64,
    forwarded_packets: u64,
    forwarded_bytes: u64,
    dropped: u64,
    expired: u64,
}

async fn healthz(State(s): State<Arc<Shared>>) -> Json<Health> {
    let online = s.registry.lock().expect("not poisoned").online_count();
    let relay = s.relay.as_ref().map(|t| {
        let t = t.lock().expect("not poisoned");
        RelayJson {
            sessions: t.len(),
            binds: t.stats.binds,
            forwarded_packets: t.stats.forwarded_packets,
            forwarded_bytes: t.stats.forwarded_bytes,
            dropped: t.stats.dropped,
            expired: t.stats.expired,
        }
    });
    Json(Health {
        status: "ok",
        agents_online: online,
        fingerprint: s.fingerprint.clone(),
        metrics: s.metrics.snapshot(),
        outcomes_by_nat_pair: s.metrics.nat_pairs.lock().expect("not poisoned").counts(),
        relay,
        stun: StunJson {
            requests: s.stun.requests.load(std::sync::atomic::Ordering::Relaxed),
            errors_sent: s
                .stun
                .errors_sent
                .load(std::sync::atomic::Ordering::Relaxed),
            dropped: s.stun.dropped.load(std::sync::atomic::Ordering::Relaxed),
        },
    })
}

async fn peers(State(s): State<Arc<Shared>>) -> Json<Vec<PeerJson>> {
    let list = s.registry.lock().expect("not poisoned").online();
    Json(
        list.into_iter()
            .map(|p| PeerJson {
                worker_id: p.worker_id,
                observed_addr: p.observed.to_string(),
                connected_since: humantime::format_rfc3339_seconds(p.since).to_string(),
                candidates: p
                    .candidates
                    .iter()
                    .map(|c| {
                        use punch_protocol::signal::CandidateKind::*;
                        let k = match c.kind {
                            Local => "local",
                            ServerReflexive => "server",
                            Stun => "stun",
                            Mapped => "mapped",
                            PeerReflexive => "peer",
                            Predicted => "predicted",
                        };
                        format!("{k} {}", c.addr)
                    })
                    .collect(),
                nat: p.nat.map(|n| NatJson {
                    label: n.label(),
                    mapping: n.mapping.as_str(),
                    filtering: n.filtering.as_str(),
                    port_preserved: n.port_preserved,
                }),
            })
            .collect(),
    )
}

/// The router, for tests and embedding.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/peers", get(peers))
        .with_state(shared)
}

/// Serves HTTP on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    if let Err(e) = axum::serve(listener, router(shared)).await {
        tracing::error!("HTTP server failed: {e}");
    }
}
