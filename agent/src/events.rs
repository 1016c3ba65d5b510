//! What happens to an agent, as a stream an application follows (and the
//! lab waits on) instead of reading log lines: registration, NAT class,
//! peers connecting, and every change of a peer's path with its cause.

use crate::AgentError;
use punch_protocol::allocator::Allocator;
use punch_protocol::signal::{NatClass, PathKind, SessionId, Transport};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// Events kept for a receiver that has not read them yet; one that falls
/// further behind loses the oldest (`RecvError::Lagged` says how many).
pub const EVENT_BUFFER: usize = 256;

/// Something that happened to the agent.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AgentEvent {
    /// Registered with a server (also after every reconnect).
    Registered {
        /// The server, as configured (`HOST:PORT` or a `wss://` URL).
        server: String,
        /// The channel signaling runs on.
        transport: Transport,
        /// Our address as the server sees it.
        observed: SocketAddr,
    },
    /// The server sees us at a new address (our NAT rebound the mapping).
    AddressChanged {
        /// The new address.
        observed: SocketAddr,
    },
    /// The registration was lost or failed; the agent tries again.
    Disconnected {
        /// Why.
        error: AgentError,
    },
    /// The agent stopped trying for good (bad token, id taken, …).
    Stopped {
        /// Why.
        error: AgentError,
    },
    /// Our NAT was classified.
    NatClassified {
        /// Its class.
        nat: NatClass,
        /// How it picks the ports of new mappings.
        allocator: Allocator,
    },
    /// A peer connection was established.
    PeerConnected {
        /// The peer's worker id.
        peer: String,
        /// The punch session.
        session: SessionId,
        /// The peer dialed us.
        incoming: bool,
        /// The path in use when it connected.
        path: PathKind,
        /// The peer's address, or the relay's.
        remote: SocketAddr,
    },
    /// A peer's path changed.
    PathChanged(PathChange),
    /// A connection without the server (from the address book or the
    /// LAN): `started` (we knock, or a peer knocked on us), `ended` (the
    /// connection is up) or `failed`.
    Discovery(Discovery),
    /// A relay session the server ended was replaced by a new one under a
    /// live connection.
    RelayRenewed {
        /// The peer's worker id.
        peer: String,
        /// The new session.
        session: SessionId,
    },
}

/// One step of a session without the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Discovery {
    /// The peer's worker id.
    pub peer: String,
    /// The session's id.
    pub session: SessionId,
    /// `address-book`, `lan`, `peer-exchange` (a question to the peer
    /// named: where is another) or `random-walk` (a question to the peer
    /// named: which workers of our topics it knows).
    pub source: &'static str,
    /// `started`, `ended` or `failed`.
    pub phase: &'static str,
    /// The peer knocked on us.
    pub incoming: bool,
    /// Why it failed.
    pub error: Option<AgentError>,
    /// A walk's question that ended: how many workers the answer named
    /// that we had not heard of.
    pub learned: Option<usize>,
}

/// A peer's path moved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathChange {
    /// The peer's worker id.
    pub peer: String,
    /// The peer's latest punch session.
    pub session: SessionId,
    /// `Direct` or `Relayed`.
    pub path: PathKind,
    /// The peer's address, or the relay server's over UDP (`None` for a
    /// relay over the TCP channel).
    pub remote: Option<SocketAddr>,
    /// Why.
    pub cause: PathCause,
}

/// Why a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathCause {
    /// Probes validated a direct path (punching, the birthday method).
    Punched,
    /// QUIC arrived from an address the peer probed from, before our own
    /// probes validated it: we answer the way it came.
    PeerArrived,
    /// A relay binding became the path (no direct path yet).
    RelayBound,
    /// The direct path went silent or never carried the handshake: the
    /// connection moved to the relay.
    DirectLost,
    /// A new handshake from the peer (a new process) came another way than
    /// the path found for its older session: answering there.
    PeerMoved,
}

impl PathCause {
    /// Stable snake_case name, for JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PathCause::Punched => "punched",
            PathCause::PeerArrived => "peer_arrived",
            PathCause::RelayBound => "relay_bound",
            PathCause::DirectLost => "direct_lost",
            PathCause::PeerMoved => "peer_moved",
        }
    }
}

fn allocator_json(a: Allocator) -> Value {
    match a {
        Allocator::Sequential { stride } => json!({"kind": a.kind(), "stride": stride}),
        Allocator::Block { base, size } => json!({"kind": a.kind(), "base": base, "size": size}),
        other => json!({"kind": other.kind()}),
    }
}

impl AgentEvent {
    /// Stable snake_case name of the event.
    pub fn name(&self) -> &'static str {
        match self {
            AgentEvent::Registered { .. } => "registered",
            AgentEvent::AddressChanged { .. } => "address_changed",
            AgentEvent::Disconnected { .. } => "disconnected",
            AgentEvent::Stopped { .. } => "stopped",
            AgentEvent::NatClassified { .. } => "nat_classified",
            AgentEvent::PeerConnected { .. } => "peer_connected",
            AgentEvent::PathChanged(_) => "path_changed",
            AgentEvent::RelayRenewed { .. } => "relay_renewed",
            AgentEvent::Discovery(_) => "discovery",
        }
    }

    /// One JSON object, `"event"` naming it (what `punch-agent serve
    /// --events` prints, a line each).
    pub fn to_json(&self) -> Value {
        let error = |e: &AgentError| json!({"kind": e.kind(), "message": e.to_string(), "fault": e.fault().as_str()});
        let mut v = match self {
            AgentEvent::Registered {
                server,
                transport,
                observed,
            } => {
                json!({"server": server, "transport": transport.as_str(), "observed": observed.to_string()})
            }
            AgentEvent::AddressChanged { observed } => json!({"observed": observed.to_string()}),
            AgentEvent::Disconnected { error: e } | AgentEvent::Stopped { error: e } => {
                json!({"error": error(e)})
            }
            AgentEvent::NatClassified { nat, allocator } => json!({
                "nat": nat.label(),
                "mapping": nat.mapping.as_str(),
                "filtering": nat.filtering.as_str(),
                "allocator": allocator_json(*allocator),
            }),
            AgentEvent::PeerConnected {
                peer,
                session,
                incoming,
                path,
                remote,
            } => json!({
                "peer": peer,
                "session": session.to_string(),
                "incoming": incoming,
                "path": path.as_str(),
                "remote_addr": remote.to_string(),
            }),
            AgentEvent::PathChanged(c) => json!({
                "peer": c.peer,
                "session": c.session.to_string(),
                "path": c.path.as_str(),
                "remote_addr": c.remote.map(|a| a.to_string()),
                "cause": c.cause.as_str(),
            }),
            AgentEvent::RelayRenewed { peer, session } => {
                json!({"peer": peer, "session": session.to_string()})
            }
            AgentEvent::Discovery(d) => {
                let mut v = json!({
                    "peer": d.peer,
                    "session": d.session.to_string(),
                    "source": d.source,
                    "phase": d.phase,
                    "incoming": d.incoming,
                    "error": d.error.as_ref().map(error),
                });
                if let Some(n) = d.learned {
                    v["learned"] = json!(n);
                }
                v
            }
        };
        v["event"] = json!(self.name());
        v
    }
}

/// The agent's side of the stream: every part that has something to say
/// holds a clone.
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<AgentEvent>,
    /// The receiver made with the channel, for the first
    /// [`crate::Agent::events`] call: it holds what happened since start.
    first: Mutex<Option<broadcast::Receiver<AgentEvent>>>,
}

impl Events {
    pub fn new() -> Self {
        let (tx, rx) = broadcast::channel(EVENT_BUFFER);
        Events {
            tx,
            first: Mutex::new(Some(rx)),
        }
    }

    /// A sender for parts that live apart from the agent (the path table).
    pub fn sender(&self) -> broadcast::Sender<AgentEvent> {
        self.tx.clone()
    }

    pub fn emit(&self, e: AgentEvent) {
        // No receiver is no error: nobody asked.
        let _ = self.tx.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.first
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_else(|| self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_receiver_has_what_happened_before_it_was_asked_for() {
        let ev = Events::new();
        ev.emit(AgentEvent::AddressChanged {
            observed: "192.0.2.1:4000".parse().unwrap(),
        });
        let mut first = ev.subscribe();
        let mut later = ev.subscribe();
        assert_eq!(first.try_recv().unwrap().name(), "address_changed");
        assert!(later.try_recv().is_err());
        // Bounded: a receiver that reads nothing loses the oldest.
        for _ in 0..EVENT_BUFFER + 10 {
            ev.emit(AgentEvent::RelayRenewed {
                peer: "p".into(),
                session: SessionId(1),
            });
        }
        assert!(matches!(
            later.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
    }

    #[test]
    fn events_serialize_with_their_name_and_stable_fields() {
        let e = AgentEvent::PathChanged(PathChange {
            peer: "worker-b".into(),
            session: SessionId(0xab),
            path: PathKind::Relayed,
            remote: Some("198.51.100.1:7000".parse().unwrap()),
            cause: PathCause::DirectLost,
        });
        let j = e.to_json();
        assert_eq!(j["event"], "path_changed");
        assert_eq!(j["path"], "relayed");
        assert_eq!(j["cause"], "direct_lost");
        assert_eq!(j["session"], "00000000000000ab");
        let j = AgentEvent::Stopped {
            error: AgentError::BadToken("no".into()),
        }
        .to_json();
        assert_eq!(j["error"]["kind"], "bad_token");
        assert_eq!(j["error"]["fault"], "caller");
    }
}
