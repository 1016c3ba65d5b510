//! Signaling messages between an agent and the rendezvous server.
//!
//! The agent opens one bidirectional QUIC stream on the signaling connection
//! and both sides exchange [`crate::codec`] frames on it: [`ClientMsg`] from
//! the agent, [`ServerMsg`] from the server. Requests carry a `req` number
//! that the answer repeats; offers are pushed unsolicited.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

mod candidate;
pub use candidate::{
    explained_candidate, usable_candidate, Candidate, CandidateKind, CandidatePolicy,
};

/// Longest worker id accepted.
pub const MAX_WORKER_ID: usize = 64;
/// Most candidates one side may advertise.
pub const MAX_CANDIDATES: usize = 16;
/// Most metadata entries in a `Hello`.
pub const MAX_METADATA: usize = 32;
/// Longest metadata key or value.
pub const MAX_METADATA_LEN: usize = 256;
/// Most tags in a `Hello`.
pub const MAX_TAGS: usize = 16;
/// Most workers in one `Workers` answer.
pub const MAX_LIST: usize = 1000;
/// Longest `Wait` a server honours.
pub const MAX_WAIT_MS: u32 = 3_600_000;

/// An Ed25519 public key, raw 32 bytes.
pub type PublicKey = [u8; 32];

/// Identifies one punch session (one introduction of two agents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Messages from agent to server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on the control stream.
    Hello(Hello),
    /// Ask the server to introduce us to `target`.
    Connect { req: u32, target: String },
    /// Report how a session ended.
    Outcome(Outcome),
    /// Application-level liveness check; answered with `Pong`.
    Ping { req: u32 },
    /// Update the agent's own candidate list (e.g. after an interface change).
    Candidates { local: Vec<Candidate> },
    /// The agent's NAT as it classified it (RFC 5780 checks against the
    /// server's two addresses), sent once it knows.
    Nat(NatClass),
    /// A registry query; answered with `Workers` or `Error`.
    Query { req: u32, query: Query },
    /// The agent is shutting down cleanly: deregister now rather than go
    /// stale.
    Bye,
    /// How the agent's NAT picks the ports of new mappings, sent with `Nat`
    /// once the NAT check knows. Since protocol version 5.
    Allocator(crate::allocator::Allocator),
    /// How a session's direct path was found (`strategy`: `plain`,
    /// `block-scan`, `birthday`, `prediction`, `port-mapping`, `ipv6`) or
    /// why it started on the relay (`relay_reason`), right after its
    /// `Outcome`. Names of at most [`MAX_DETAIL`] bytes, checked with
    /// [`validate_detail`]. Since protocol version 5.
    OutcomeDetail {
        session: SessionId,
        strategy: Option<String>,
        relay_reason: Option<String>,
    },
}

/// Longest name in an `OutcomeDetail`.
pub const MAX_DETAIL: usize = 32;

/// Checks an `OutcomeDetail` name: 1 to [`MAX_DETAIL`] bytes of lowercase
/// ASCII letters, digits and `-`.
pub fn validate_detail(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_DETAIL {
        return Err(format!(
            "outcome detail of {} bytes (1 to {MAX_DETAIL})",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!("outcome detail {name:?}: only a-z, 0-9 and '-'"));
    }
    Ok(())
}

/// Registry queries an agent may send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Workers known now (online or stale), optionally of one type and
    /// with one tag.
    List {
        kind: Option<String>,
        tag: Option<String>,
    },
    /// One worker (an empty answer when unknown).
    Get { id: String },
    /// A random online worker of a type (an empty answer when none).
    Discover { kind: String },
    /// Answer as soon as the worker is online, or `Error(Timeout)`.
    Wait { id: String, timeout_ms: u32 },
}

/// Whether a worker is reachable now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Its signaling connection is up.
    Online,
    /// Its connection dropped recently; it keeps its place for a grace
    /// period in case it comes back.
    Stale,
}

impl WorkerState {
    /// `"online"` or `"stale"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Online => "online",
            WorkerState::Stale => "stale",
        }
    }
}

/// What the registry knows of a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    /// How it reaches the server.
    pub transport: Transport,
    pub kind: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Vec<(String, String)>,
    pub state: WorkerState,
    /// Its address as the server saw it last.
    pub observed: SocketAddr,
    pub nat: Option<NatClass>,
    /// When it registered (online) or dropped (stale), Unix milliseconds.
    pub since_ms: u64,
}

/// How an agent reaches the server: QUIC over UDP, or WebSocket over TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    #[default]
    Udp,
    Tcp,
}

impl Transport {
    /// `"udp"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// A NAT behaviour as RFC 4787 names it (for mapping or for filtering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NatBehaviour {
    /// Not measured (the server has no alternate address, or no answer).
    Unknown,
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl NatBehaviour {
    /// `endpoint-independent`, `address-dependent`,
    /// `address-and-port-dependent` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            NatBehaviour::Unknown => "unknown",
            NatBehaviour::EndpointIndependent => "endpoint-independent",
            NatBehaviour::AddressDependent => "address-dependent",
            NatBehaviour::AddressAndPortDependent => "address-and-port-dependent",
        }
    }

    fn short(self) -> &'static str {
        match self {
            NatBehaviour::Unknown => "unknown",
            NatBehaviour::EndpointIndependent => "ei",
            NatBehaviour::AddressDependent => "ad",
            NatBehaviour::AddressAndPortDependent => "apd",
        }
    }
}

/// An agent's NAT, as the agent measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NatClass {
    /// No NAT at all: the public address is the agent's own.
    pub public: bool,
    pub mapping: NatBehaviour,
    pub filtering: NatBehaviour,
    /// The NAT kept the agent's source port.
    pub port_preserved: bool,
}

impl NatClass {
    /// A short label for counters: `none`, or mapping and filtering such
    /// as `eim-apdf` (port-restricted cone) or `apdm-apdf` (symmetric).
    pub fn label(&self) -> String {
        if self.public {
            return "none".into();
        }
        match (self.mapping, self.filtering) {
            (NatBehaviour::Unknown, NatBehaviour::Unknown) => "unknown".into(),
            (m, f) => format!("{}m-{}f", m.short(), f.short()),
        }
    }

    /// Does the mapping depend on the destination (a "hard" NAT)?
    pub fn endpoint_dependent(&self) -> bool {
        matches!(
            self.mapping,
            NatBehaviour::AddressDependent | NatBehaviour::AddressAndPortDependent
        )
    }
}

/// The agent's introduction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// The name other agents use to reach this one.
    pub worker_id: String,
    /// The agent's key; must match the key of its TLS client certificate.
    pub public_key: PublicKey,
    /// HMAC-SHA256 of the connection's TLS exporter under the shared token,
    /// so the token itself never crosses the wire.
    pub token_proof: Option<[u8; 32]>,
    /// A one-off id (e.g. `punch-agent connect` without `--id`): the server
    /// does not keep its key binding after it leaves.
    pub ephemeral: bool,
    /// Addresses of the agent's own interfaces (same-LAN candidates).
    pub local_candidates: Vec<Candidate>,
    /// Free-form key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// The worker's type (service kind), for discovery.
    pub kind: Option<String>,
    /// Labels to filter on.
    pub tags: Vec<String>,
}

/// Messages from server to agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Registration accepted.
    Welcome {
        version: u16,
        /// The agent's address as the server sees it (its NAT mapping).
        observed: SocketAddr,
    },
    /// A request failed, or (with `req: None`) the registration failed.
    Error {
        req: Option<u32>,
        code: ErrorCode,
        message: String,
    },
    /// An introduction: punch towards this peer.
    Offer(Offer),
    /// Answer to `Ping`.
    Pong { req: u32 },
    /// The server saw the agent's mapped address change (NAT rebinding).
    AddressChanged { observed: SocketAddr },
    /// Answer to a `Query`.
    Workers { req: u32, workers: Vec<WorkerInfo> },
    /// An introduction with the peer's port allocator (version 6; older
    /// agents get [`ServerMsg::Offer`] without it).
    OfferWithAllocator {
        offer: Offer,
        peer_allocator: crate::allocator::Allocator,
    },
}

impl ServerMsg {
    /// This message as an agent of `version` reads it: an offer carries the
    /// peer's allocator only to version 6 and later.
    pub fn for_version(self, version: u16) -> ServerMsg {
        match self {
            ServerMsg::Offer(offer) if version >= 6 => match offer.peer_allocator {
                Some(peer_allocator) => ServerMsg::OfferWithAllocator {
                    offer,
                    peer_allocator,
                },
                None => ServerMsg::Offer(offer),
            },
            ServerMsg::OfferWithAllocator { mut offer, .. } if version < 6 => {
                offer.peer_allocator = None;
                ServerMsg::Offer(offer)
            }
            m => m,
        }
    }

    /// The offer in this message, with the peer's allocator when it came
    /// beside it and is one [`crate::allocator::infer`] could report.
    pub fn into_offer(self) -> Option<Offer> {
        match self {
            ServerMsg::Offer(o) => Some(o),
            ServerMsg::OfferWithAllocator {
                mut offer,
                peer_allocator,
            } => {
                offer.peer_allocator = peer_allocator.plausible().then_some(peer_allocator);
                Some(offer)
            }
            _ => None,
        }
    }
}

/// Why the server refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The agent speaks another protocol version.
    BadVersion,
    /// Missing or wrong token.
    BadToken,
    /// The worker id is bound to another key.
    IdTaken,
    /// Invalid worker id or metadata.
    BadRequest,
    /// No worker ever registered under that id.
    UnknownWorker,
    /// The worker is known but not connected now.
    WorkerOffline,
    /// An agent asked to connect to itself.
    SelfConnect,
    /// A frame could not be decoded.
    Malformed,
    /// Too many requests.
    RateLimited,
    /// Something went wrong inside the server.
    Internal,
    /// A `Wait` ran out of time.
    Timeout,
}

impl ErrorCode {
    /// Stable snake_case name, used in logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::IdTaken => "id_taken",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownWorker => "unknown_worker",
            ErrorCode::WorkerOffline => "worker_offline",
            ErrorCode::SelfConnect => "self_connect",
            ErrorCode::Malformed => "malformed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
        }
    }
}

/// Which side of a session dials the QUIC connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Dials once a path is validated (the requester).
    Controlling,
    /// Probes and waits for the dial (the target).
    Controlled,
}

/// An introduction to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The `Connect` request this answers (for the requester), if any.
    pub req: Option<u32>,
    pub session: SessionId,
    /// Key for the probes' MACs; known only to the two agents and the server.
    pub secret: [u8; 32],
    pub role: Role,
    pub peer_id: String,
    pub peer_key: PublicKey,
    pub peer_candidates: Vec<Candidate>,
    /// Delay before the first probe, so both sides start together.
    pub start_in_ms: u32,
    /// The server will relay this session on its UDP port if asked.
    pub relay: bool,
    /// The peer's NAT, when it has reported it.
    pub peer_nat: Option<NatClass>,
    /// The peer reaches the server only over TCP and knows no UDP mapping
    /// of its own: punching cannot work, so start on the relay at once.
    pub peer_tcp_only: bool,
    /// The peer's port allocator, when it reported one. Not part of this
    /// struct's encoding (which version 4 and 5 agents read as it was):
    /// version 6 servers send it beside the offer, in
    /// [`ServerMsg::OfferWithAllocator`].
    #[serde(skip)]
    pub peer_allocator: Option<crate::allocator::Allocator>,
}

/// How a connection attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathKind {
    Direct,
    Relayed,
    Failed,
}

impl PathKind {
    /// `"direct"`, `"relayed"` or `"failed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relayed => "relayed",
            PathKind::Failed => "failed",
        }
    }
}

/// Outcome report for the server's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub session: SessionId,
    pub path: PathKind,
    pub connect_ms: u32,
    pub remote: Option<SocketAddr>,
    /// A direct path through a port the gateway mapped on request (PCP,
    /// NAT-PMP, UPnP): the peer's mapped candidate, or the peer reached us
    /// at ours. Since protocol version 4.
    pub via_mapped: bool,
}

/// Why a worker id is not acceptable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("worker id is empty")]
    Empty,
    #[error("worker id is longer than {MAX_WORKER_ID} bytes")]
    TooLong,
    #[error("worker id may contain only ASCII letters, digits, '-', '_' and '.'")]
    BadChar,
}

/// Checks a type, tag or metadata key: the same rule as worker ids.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    validate_worker_id(name).map_err(|e| {
        format!(
            "{what} {name:?}: {}",
            e.to_string().replace("worker id", what)
        )
    })
}

/// Checks a worker id: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn validate_worker_id(id: &str) -> Result<(), NameError> {
    if id.is_empty() {
        return Err(NameError::Empty);
    }
    if id.len() > MAX_WORKER_ID {
        return Err(NameError::TooLong);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(NameError::BadChar);
    }
    Ok(())
}

impl Hello {
    /// Checks the bounded fields of a hello.
    pub fn validate(&self) -> Result<(), String> {
        validate_worker_id(&self.worker_id).map_err(|e| e.to_string())?;
        if self.local_candidates.len() > MAX_CANDIDATES {
            return Err(format!("more than {MAX_CANDIDATES} candidates"));
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(format!("more than {MAX_METADATA} metadata entries"));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(format!("more than {MAX_TAGS} tags"));
        }
        if let Some(k) = &self.kind {
            validate_name("type", k)?;
        }
        for t in &self.tags {
            validate_name("tag", t)?;
        }
        for (k, _) in &self.metadata {
            validate_name("metadata key", k)?;
        }
        if self
            .metadata
            .iter()
            .any(|(k, v)| k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN)
        {
            return Err(format!(
                "metadata key or value longer than {MAX_METADATA_LEN}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn worker_ids() {
        assert!(validate_worker_id("worker-b.eu_1").is_ok());
        assert_eq!(validate_worker_id(""), Err(NameError::Empty));
        assert_eq!(validate_worker_id("a b"), Err(NameError::BadChar));
        assert_eq!(validate_worker_id("ü"), Err(NameError::BadChar));
        assert_eq!(validate_worker_id(&"x".repeat(65)), Err(NameError::TooLong));
    }

    #[test]
    fn only_explained_candidates_pass_the_strict_policy() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let owner = ip("203.0.113.7");
        let ok = |c: &str, peer: Option<&str>| explained_candidate(ip(c), owner, peer.map(ip));
        // Its own public address, any port; mapped as IPv6.
        assert!(ok("203.0.113.7", None));
        assert!(ok("::ffff:203.0.113.7", Some("198.51.100.1")));
        // A third party's address: never.
        assert!(!ok("198.51.100.9", None));
        assert!(!ok("198.51.100.9", Some("203.0.113.7")));
        // Private, shared and link-local ones: only behind the same NAT.
        for c in [
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.1",
            "100.64.3.4",
            "169.254.1.1",
        ] {
            assert!(ok(c, Some("203.0.113.7")), "{c}");
            assert!(!ok(c, Some("198.51.100.1")), "{c}");
            assert!(!ok(c, None), "{c}");
        }
        assert!(!ok("100.128.0.1", Some("203.0.113.7")), "outside 100.64/10");
        // IPv6: the owner's /64 only; ULA and link-local behind the same NAT.
        let v6 = ip("2001:db8:1:2::5");
        assert!(explained_candidate(ip("2001:db8:1:2::99"), v6, None));
        assert!(!explained_candidate(ip("2001:db8:1:3::99"), v6, None));
        assert!(
            !ok("2001:db8:1:2::99", None),
            "an IPv4-seen owner explains no IPv6"
        );
        assert!(ok("fd00::1", Some("203.0.113.7")));
        assert!(ok("fe80::1", Some("203.0.113.7")));
        assert!(!ok("fd00::1", Some("198.51.100.1")));
        let c = |a: &str| Candidate {
            addr: a.parse().unwrap(),
            kind: CandidateKind::Local,
        };
        let all = vec![
            c("203.0.113.7:4000"),
            c("198.51.100.9:80"),
            c("10.0.0.2:4000"),
        ];
        assert_eq!(CandidatePolicy::Open.filter(all.clone(), owner, None), all);
        assert_eq!(
            CandidatePolicy::Explained.filter(all.clone(), owner, None),
            vec![all[0]]
        );
        assert_eq!("explained".parse(), Ok(CandidatePolicy::Explained));
        assert!("strict".parse::<CandidatePolicy>().is_err());
    }
}
