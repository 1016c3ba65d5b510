//! [`AgentBuilder`]: every setting of [`AgentConfig`] as a setter, and
//! the application protocols to serve.

use crate::{portmap, protocols, Agent, AgentConfig, AgentError, RelayMode, SecretKey};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Builds an agent with the CLI's options, e.g.
/// `Agent::builder(server, fingerprint).worker_id("w").tag("eu").start()`.
#[derive(Clone, Debug)]
pub struct AgentBuilder {
    config: AgentConfig,
    protocols: std::collections::HashMap<String, Arc<dyn protocols::ProtocolHandler>>,
}

impl AgentBuilder {
    /// Our worker id (`--id`); without it a one-off `anon-…` id.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.config.worker_id = Some(id.into());
        self
    }
    /// The server's token (`--token`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.config.token = Some(token.into());
        self
    }
    /// Where our persistent key lives (`--key-file`).
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.key_file = Some(path.into());
        self
    }
    /// Our UDP address (`--bind`).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.config.bind = addr;
        self
    }
    /// Give up punching after this long (`--punch-timeout`).
    pub fn punch_timeout(mut self, d: Duration) -> Self {
        self.config.punch_timeout = d;
        self
    }
    /// Relay policy (`--no-relay`, `--force-relay`).
    pub fn relay(mut self, mode: RelayMode) -> Self {
        self.config.relay = mode;
        self
    }
    /// Start on the relay when no direct path is found by then
    /// (`--relay-after`).
    pub fn relay_after(mut self, d: Duration) -> Self {
        self.config.relay_after = d;
        self
    }
    /// A standard STUN server, `HOST:PORT` (`--stun`, repeatable).
    pub fn stun(mut self, server: impl Into<String>) -> Self {
        self.config.stun.push(server.into());
        self
    }
    /// Announce us on the LAN and find agents there (`--lan-discovery`).
    pub fn lan_discovery(mut self, on: bool) -> Self {
        self.config.lan_discovery = on;
        self
    }

    /// A type or tag to find more workers of by random walks
    /// (`--walk-topic`, repeatable).
    pub fn walk_topic(mut self, topic: impl Into<String>) -> Self {
        self.config.walk_topics.push(topic.into());
        self
    }

    /// From one walk to the next (`--walk-every`; the first comes a
    /// twelfth of it after registering).
    pub fn walk_every(mut self, every: std::time::Duration) -> Self {
        self.config.walk_every = every;
        self
    }

    /// A worker walks may start from (`--bootstrap`, repeatable).
    pub fn bootstrap(mut self, worker_id: impl Into<String>) -> Self {
        self.config.bootstrap.push(worker_id.into());
        self
    }

    /// Skip classifying our NAT (`--no-nat-check`).
    pub fn no_nat_check(mut self) -> Self {
        self.config.nat_check = false;
        self
    }
    /// Our type, for discovery (`--type`).
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.config.kind = Some(kind.into());
        self
    }
    /// A tag (`--tag`, repeatable).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.config.tags.push(tag.into());
        self
    }
    /// A metadata entry (`--meta K=V`, repeatable).
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.metadata.push((key.into(), value.into()));
        self
    }
    /// Ask the gateway for a port mapping, or not (`--port-mapping`).
    pub fn port_mapping(mut self, mode: portmap::PortMapping) -> Self {
        self.config.port_mapping.mode = mode;
        self
    }
    /// Our key, held by the application (over [`AgentBuilder::key_file`]).
    pub fn secret_key(mut self, key: SecretKey) -> Self {
        self.config.secret_key = Some(key);
        self
    }
    /// The TCP channel's URL when it is not at the UDP server's host and
    /// port (`--server-tcp wss://HOST[:PORT]/ws`).
    pub fn server_tcp(mut self, url: impl Into<String>) -> Self {
        self.config.server_tcp = Some(url.into());
        self
    }
    /// CA certificates (PEM) for an HTTPS front (`--server-ca`).
    pub fn server_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.server_ca = Some(path.into());
        self
    }
    /// HTTP proxy for the TCP channel (`--proxy`).
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.config.proxy = Some(url.into());
        self
    }
    /// Renew the WebSocket before a front cuts it (`--ws-max-age`).
    pub fn ws_max_age(mut self, d: Duration) -> Self {
        self.config.ws_max_age = d;
        self
    }
    /// Try the TCP channel when QUIC has not answered within this long.
    pub fn tcp_after(mut self, d: Duration) -> Self {
        self.config.tcp_after = d;
        self
    }
    /// Never use the TCP channel (`--udp-only`).
    pub fn udp_only(mut self) -> Self {
        self.config.udp_only = true;
        self
    }
    /// Keep-alive on the signaling and peer connections (`--keep-alive`).
    pub fn keep_alive(mut self, d: Duration) -> Self {
        self.config.keep_alive = d;
        self
    }
    /// Advertise our interface addresses to peers, or not.
    pub fn local_candidates(mut self, on: bool) -> Self {
        self.config.local_candidates = on;
        self
    }
    /// Limit for one connection attempt to the server.
    pub fn server_connect_timeout(mut self, d: Duration) -> Self {
        self.config.server_connect_timeout = d;
        self
    }
    /// All port-mapping settings at once (mode, protocols, gateway).
    pub fn port_mapping_settings(mut self, s: portmap::PortMapSettings) -> Self {
        self.config.port_mapping = s;
        self
    }
    /// A builder that starts from `config` (no protocols registered yet).
    pub fn from_config(config: AgentConfig) -> AgentBuilder {
        AgentBuilder {
            config,
            protocols: std::collections::HashMap::new(),
        }
    }
    /// The settings built so far.
    pub fn config(self) -> AgentConfig {
        self.config
    }
    /// Serves application protocol `name` with `handler`, beside the
    /// built-in ones: a peer's [`crate::PeerConnection::open_protocol`] stream
    /// for it is handed to `handler` by [`crate::PeerConnection::serve`]. Names
    /// are 1 to 64 bytes of `[A-Za-z0-9._/-]` (e.g. `myapp/1`).
    pub fn protocol(
        mut self,
        name: impl Into<String>,
        handler: impl protocols::ProtocolHandler,
    ) -> Self {
        self.protocols.insert(name.into(), Arc::new(handler));
        self
    }
    /// Starts the agent ([`Agent::start`]).
    pub async fn start(self) -> Result<Agent, AgentError> {
        if let Some(bad) = self.protocols.keys().find(|n| !protocols::valid_name(n)) {
            return Err(AgentError::Config(format!(
                "protocol name {bad:?}: 1 to {} bytes of [A-Za-z0-9._/-]",
                protocols::MAX_PROTOCOL_NAME
            )));
        }
        Agent::start_with(self.config, Arc::new(self.protocols)).await
    }
}
