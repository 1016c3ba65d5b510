//! Who is on the TCP channel: the live WebSocket clients (where relay
//! frames for a TCP-bound relay side go), their caps and counters.

use crate::serving::Door;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// Counters of the TCP channel (names as in `/healthz` and, prefixed
/// `punch_tcp_`, in `/metrics`).
#[derive(Debug, Default)]
pub struct TcpStats {
    /// TLS handshakes that failed or timed out (plain HTTP, garbage, scans).
    pub tls_failures: AtomicU64,
    /// Connections closed before their TLS handshake began (agents whose
    /// QUIC answered first, port checks).
    pub abandoned: AtomicU64,
    /// WebSocket upgrades refused because the client cap was reached.
    pub refused_full: AtomicU64,
    /// WebSocket channels that completed the handshake and registered.
    pub channels: AtomicU64,
    /// Channels ended for a protocol error (bad message, bad proof, …).
    pub protocol_errors: AtomicU64,
    /// Relay frames dropped for the per-connection byte rate.
    pub rate_limited: AtomicU64,
    /// Relay frames to TCP clients dropped because their queue was full.
    pub queue_drops: AtomicU64,
    /// Relay frames received from and sent to TCP clients.
    pub relay_in: AtomicU64,
    pub relay_out: AtomicU64,
}

/// The live WebSocket clients, by connection number: where relay frames
/// for a TCP-bound relay side go.
#[derive(Debug)]
pub struct TcpClients {
    pub(super) relay: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    /// Caps WebSocket clients (both listeners).
    pub(crate) slots: Arc<Semaphore>,
    /// Caps connections on the TLS port, handshakes included, and holds
    /// its request-head deadline.
    pub door: Arc<Door>,
    /// Counters.
    pub stats: TcpStats,
}

impl TcpStats {
    /// Every counter with its name and help text.
    pub fn list(&self) -> [(&'static str, &'static str, u64); 8] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "tls_failures",
                "Failed or timed-out TLS handshakes",
                g(&self.tls_failures),
            ),
            (
                "abandoned",
                "TCP connections closed before their TLS handshake (agents whose QUIC answered first)",
                g(&self.abandoned),
            ),
            (
                "channels",
                "WebSocket channels that passed the key handshake",
                g(&self.channels),
            ),
            (
                "protocol_errors",
                "WebSocket channels ended for bad messages or proofs",
                g(&self.protocol_errors),
            ),
            (
                "rate_limited",
                "Relay frames dropped for the per-connection byte rate",
                g(&self.rate_limited),
            ),
            (
                "queue_drops",
                "Relay frames to TCP clients dropped on a full queue",
                g(&self.queue_drops),
            ),
            (
                "relay_in",
                "Relay frames received from TCP clients",
                g(&self.relay_in),
            ),
            (
                "relay_out",
                "Relay frames sent to TCP clients",
                g(&self.relay_out),
            ),
        ]
    }
}

impl TcpClients {
    /// Room for `max` clients; a request head on the TLS port must come
    /// within `header_timeout`.
    pub fn new(max: usize, header_timeout: Duration) -> Arc<Self> {
        Arc::new(TcpClients {
            relay: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max)),
            door: Door::new(max, header_timeout),
            stats: TcpStats::default(),
        })
    }

    /// Every counter of the TCP channel, the TLS port's door included,
    /// with its name and help text (`refused_full` counts connections
    /// refused at the door and upgrades refused on either listener).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let door = &self.door.stats;
        let mut out = vec![
            (
                "accepted",
                "TCP connections accepted on the TLS port",
                g(&door.accepted),
            ),
            (
                "refused_full",
                "Connections or upgrades refused at the TCP client cap",
                g(&door.refused_full) + g(&self.stats.refused_full),
            ),
            (
                "header_timeouts",
                "Connections closed: a request's head did not arrive in time",
                g(&door.header_timeouts),
            ),
        ];
        out.extend(self.stats.list());
        out
    }

    /// WebSocket channels open now.
    pub fn count(&self) -> usize {
        self.relay.lock().expect("not poisoned").len()
    }

    /// Hands a relay frame to a TCP client; dropped when it is gone or
    /// its queue is full.
    pub fn deliver(&self, id: u64, frame: &[u8]) {
        let tx = self.relay.lock().expect("not poisoned").get(&id).cloned();
        let Some(tx) = tx else { return };
        if tx.try_send(Bytes::copy_from_slice(frame)).is_ok() {
            self.stats.relay_out.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.queue_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}
