//! Cluster mode: several servers share one registry through Redis
//! (`--registry redis://HOST:PORT`).
//!
//! Every server still holds its own agents in memory, as a single server
//! does, and mirrors them to Redis:
//!
//! ```text
//! punch:worker:{id}   "{server id}\n{WorkerInfo as JSON}"   TTL, refreshed while online
//! punch:keys          hash: worker id -> key (hex)          one binding cluster-wide
//! punch:server:{sid}  JSON {udp, relay, started}            TTL, refreshed
//! punch:to:{sid}      pub/sub: connect requests and answers for server sid
//! punch:events        pub/sub: registry events of every server
//! ```
//!
//! A connect request for a worker held elsewhere goes to that server as a
//! [`Bus::Connect`]; it introduces the two agents as if both were its own,
//! sends the target its offer and answers with the session, and the
//! requester's server sends the requester its offer. Relaying works across
//! servers without the agents knowing: both servers hold the session, and
//! each binds the far side to the other server's relay address, so a
//! relayed datagram goes agent -> server A -> server B -> agent, and each
//! server sees only ciphertext, as before.
//!
//! A worker's key carries the id of the server that holds it, so a server
//! refreshes only its own keys (a worker that moved is not taken back) and
//! deletes only its own. After Redis restarts empty, the next refresh
//! writes every online worker again.

mod routing;
mod store;
mod tasks;

pub use punch_protocol::cluster::{
    parse_worker_value, worker_key, worker_value, BadMessage, Bus, Introduced, PeerCard, Refusal,
    SharedEvent, MAX_BUS_MESSAGE,
};
pub use routing::connect_remote;
pub use store::{Cluster, ROUTE_TIMEOUT};
pub use tasks::spawn;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT[/DB]` (or `redis+unix://`).
    pub url: String,
    /// The UDP address other servers send relayed datagrams to (this
    /// server's own port, as they reach it).
    pub advertise: SocketAddr,
    /// Life of a worker's key without a refresh; refreshed every third.
    pub ttl: Duration,
}

/// Errors of cluster mode.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--registry {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Bad(#[from] BadMessage),
    #[error("no address for other servers to relay to: give --cluster-addr")]
    NoAddress,
}

/// This host's first non-loopback address of the family: where other
/// servers reach one listening on the unspecified address.
pub fn first_host_addr(v4: bool) -> Option<std::net::IpAddr> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .map(|i| i.ip())
        .find(|ip| !ip.is_loopback() && ip.is_ipv4() == v4)
}

/// Counters of cluster mode.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Redis answered the last command or subscription.
    pub up: AtomicBool,
    /// Connect requests sent to other servers.
    pub routed: AtomicU64,
    /// Connect requests answered for other servers.
    pub served: AtomicU64,
    /// Routed requests that got no answer in time.
    pub route_timeouts: AtomicU64,
    /// Failed Redis commands.
    pub redis_errors: AtomicU64,
    /// Malformed messages from the bus or worker keys.
    pub bad_messages: AtomicU64,
    /// Registry events received from other servers.
    pub remote_events: AtomicU64,
    /// Worker keys written by refreshes.
    pub refreshed: AtomicU64,
}

impl ClusterStats {
    /// Counter names, help and values, for `/metrics` and `/healthz`.
    pub fn list(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "routed",
                "Connect requests sent to other servers",
                g(&self.routed),
            ),
            (
                "served",
                "Connect requests answered for other servers",
                g(&self.served),
            ),
            (
                "route_timeouts",
                "Connect requests another server did not answer",
                g(&self.route_timeouts),
            ),
            (
                "redis_errors",
                "Failed Redis commands",
                g(&self.redis_errors),
            ),
            (
                "bad_messages",
                "Malformed cluster messages",
                g(&self.bad_messages),
            ),
            (
                "remote_events",
                "Registry events from other servers",
                g(&self.remote_events),
            ),
            (
                "refreshed",
                "Worker keys written by refreshes",
                g(&self.refreshed),
            ),
        ]
    }
}
