//! The agent's settings: the server, our identity, punching and relay
//! policy, what we tell the registry.

use crate::{portmap, AgentError};
use punch_tls::Identity;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// When to use the server's relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    /// Punch; relay when no direct path is validated by `relay_after`, and
    /// move to the direct path whenever it is validated.
    Auto,
    /// Never relay: fail when punching fails.
    Never,
    /// Relay at once, no punching.
    Force,
}

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Rendezvous server: `HOST:PORT` is QUIC over UDP there, with the TCP
    /// channel at `wss://HOST:PORT/ws`; `wss://HOST[:PORT]/PATH` alone is
    /// the TCP channel only (an HTTPS-only front).
    pub server: String,
    /// The TCP channel, when it is not at the UDP server's host and port
    /// (`wss://HOST[:PORT]/ws`, e.g. an HTTPS front).
    pub server_tcp: Option<String>,
    /// CA certificates (PEM) for the front's certificate, instead of the
    /// system roots. The server's own pinned key is always accepted.
    pub server_ca: Option<PathBuf>,
    /// HTTP proxy for the TCP channel (`http://[USER:PASS@]HOST:PORT`);
    /// without it `HTTPS_PROXY`/`ALL_PROXY` apply, and `NO_PROXY` always.
    pub proxy: Option<String>,
    /// Renew the WebSocket before a front cuts it (Cloud Run: 60 minutes).
    pub ws_max_age: Duration,
    /// Try the TCP channel when QUIC has not answered within this long.
    pub tcp_after: Duration,
    /// Never use the TCP channel.
    pub udp_only: bool,
    /// SHA-256 fingerprint of the server's key (`punch-server fingerprint`).
    pub server_fingerprint: String,
    /// Our worker id; `None` registers a one-off `anon-…` id.
    pub worker_id: Option<String>,
    /// Token the server requires, if any.
    pub token: Option<String>,
    /// Persistent key; `None` uses a fresh in-memory key (one-off agents).
    pub key_file: Option<PathBuf>,
    /// Our key, held by the application (over `key_file`).
    pub secret_key: Option<SecretKey>,
    /// Local UDP address; `0.0.0.0:0` is dual-stack where possible.
    pub bind: SocketAddr,
    /// Give up punching after this long.
    pub punch_timeout: Duration,
    /// Keep-alive on the signaling and peer connections; must stay below the
    /// shortest NAT UDP timeout on the path (Cloud NAT: 30 s).
    pub keep_alive: Duration,
    /// Advertise our interface addresses (same-LAN peers).
    pub local_candidates: bool,
    /// Limit for one connection attempt to the server.
    pub server_connect_timeout: Duration,
    /// Relay policy.
    pub relay: RelayMode,
    /// Start relayed when punching has not found a path by then.
    pub relay_after: Duration,
    /// Standard STUN servers (`HOST:PORT`) to learn our mapping from, in
    /// addition to the rendezvous server's view.
    pub stun: Vec<String>,
    /// Classify our NAT (RFC 5780 checks against the server) after
    /// registering, and report the class to the server.
    pub nat_check: bool,
    /// Our type (service kind), for discovery.
    pub kind: Option<String>,
    /// Labels others can filter on.
    pub tags: Vec<String>,
    /// Free-form key/value pairs shown in the registry.
    pub metadata: Vec<(String, String)>,
    /// Ask the gateway for a port mapping (PCP, NAT-PMP, UPnP IGD) and
    /// offer it to peers (`--port-mapping`).
    pub port_mapping: portmap::PortMapSettings,
    /// Announce us on the LAN and browse for other agents (mDNS,
    /// `--lan-discovery`): known peers are found there without the
    /// server, and agents sharing a token meet there for the first time.
    pub lan_discovery: bool,
    /// Types or tags to find more workers of by random walks over known
    /// peers (`--walk-topic`, at most 8; none: no walks). See
    /// [`crate::walk`].
    pub walk_topics: Vec<String>,
    /// Workers a walk may start from, beside the address book's peers of
    /// a topic and, while registered, the server's list (`--bootstrap`).
    pub bootstrap: Vec<String>,
    /// From one walk to the next (±25 %).
    pub walk_every: Duration,
}

impl AgentConfig {
    /// Defaults for a server and its fingerprint.
    pub fn new(server: impl Into<String>, fingerprint: impl Into<String>) -> Self {
        AgentConfig {
            server: server.into(),
            server_tcp: None,
            server_ca: None,
            proxy: None,
            ws_max_age: Duration::from_secs(50 * 60),
            tcp_after: Duration::from_millis(300),
            udp_only: false,
            server_fingerprint: fingerprint.into(),
            worker_id: None,
            token: None,
            key_file: None,
            secret_key: None,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            punch_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
            local_candidates: true,
            server_connect_timeout: Duration::from_secs(3),
            relay: RelayMode::Auto,
            relay_after: Duration::from_secs(3),
            stun: Vec::new(),
            nat_check: true,
            kind: None,
            tags: Vec::new(),
            metadata: Vec::new(),
            port_mapping: portmap::PortMapSettings::default(),
            lan_discovery: false,
            walk_topics: Vec::new(),
            bootstrap: Vec::new(),
            walk_every: Duration::from_secs(60),
        }
    }
}

impl AgentConfig {
    /// What the server checks of our hello, and our walk settings, checked
    /// before starting: a bad tag is our mistake and stops us now, so that
    /// a refusal the server sends later can be taken for a passing one and
    /// retried.
    pub(crate) fn check(&self, worker_id: &str, ephemeral: bool) -> Result<(), AgentError> {
        punch_protocol::signal::Hello {
            version: punch_protocol::PROTOCOL_VERSION,
            worker_id: worker_id.to_string(),
            public_key: [0; 32],
            token_proof: None,
            ephemeral,
            local_candidates: Vec::new(),
            metadata: self.metadata.clone(),
            kind: self.kind.clone(),
            tags: self.tags.clone(),
        }
        .validate()
        .map_err(AgentError::Config)?;
        let max = crate::walk::MAX_TOPICS;
        if self.walk_topics.len() > max {
            return Err(AgentError::Config(format!("more than {max} walk topics")));
        }
        for t in &self.walk_topics {
            punch_protocol::signal::validate_name("walk topic", t).map_err(AgentError::Config)?;
        }
        for id in &self.bootstrap {
            punch_protocol::signal::validate_worker_id(id)
                .map_err(|e| AgentError::Config(format!("bootstrap worker {id:?}: {e}")))?;
        }
        if self.walk_every < std::time::Duration::from_secs(1) {
            return Err(AgentError::Config("walks at most once a second".into()));
        }
        Ok(())
    }

    /// Does `server` name the TCP channel only (`wss://…`)? With several
    /// servers: does any?
    pub fn server_tcp_only(&self) -> bool {
        self.servers().iter().any(|s| is_ws_url(s))
    }

    /// The servers `server` names: a comma-separated list names servers of
    /// one cluster; the agent uses one at a time and moves to the next when
    /// it fails.
    pub fn servers(&self) -> Vec<String> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

/// Is `s` a WebSocket URL (the TCP channel only)?
pub(crate) fn is_ws_url(s: &str) -> bool {
    s.starts_with("wss://") || s.starts_with("ws://")
}

/// Where the agent's signaling stands.
#[derive(Clone, Debug)]
pub enum Status {
    /// Not registered yet, or reconnecting; the last failure, if any.
    Connecting(Option<AgentError>),
    /// Registered; our address as the server sees it.
    Registered {
        /// Our address as the server sees it.
        observed: SocketAddr,
    },
    /// Stopped for good (bad token, fingerprint mismatch, id taken, …).
    Failed(AgentError),
}

/// The agent's private key (Ed25519), held in memory: its public half is
/// what the server binds our worker id to and what peers pin.
#[derive(Clone)]
pub struct SecretKey(pub(crate) Identity);

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, AgentError> {
        Ok(SecretKey(Identity::generate()?))
    }

    /// A key from PEM text (PKCS#8), as [`SecretKey::to_pem`] or a key
    /// file (`--key-file`) holds it.
    pub fn from_pem(pem: &str) -> Result<Self, AgentError> {
        Ok(SecretKey(Identity::from_pem(pem)?))
    }

    /// The key as PEM text, to store where the application keeps secrets.
    pub fn to_pem(&self) -> Result<String, AgentError> {
        Ok(self.0.to_pem()?)
    }

    /// SHA-256 fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint()
    }
}

impl std::fmt::Debug for SecretKey {
    // Never the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.fingerprint())
    }
}
