//! punch-server: the rendezvous server.
//!
//! One UDP port carries the QUIC signaling endpoint. Agents register with a
//! worker id bound to their key; on a connect request the server sends both
//! agents an offer so they can punch a direct path. A small HTTP endpoint
//! shows health and who is online.

pub mod api;
pub mod cluster;
pub mod http;
pub mod hub;
mod introduce;
pub mod metrics;
pub mod openapi;
mod query;
pub mod registry;
pub mod serving;
pub mod signal;
pub mod status;
pub mod store;
pub mod stun;
pub mod tcp;
pub mod udp;

use metrics::Metrics;
use punch_tls::Identity;
use registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// UDP address of the signaling endpoint.
    pub listen: SocketAddr,
    /// HTTP address for health and peers; `None` disables HTTP.
    pub http: Option<SocketAddr>,
    /// Holds the persistent server key.
    pub data_dir: PathBuf,
    /// Shared token agents must prove; `None` runs open.
    pub token: Option<String>,
    /// Most worker ids held.
    pub max_workers: usize,
    /// Signaling idle timeout (agents keep alive well below it).
    pub idle_timeout: Duration,
    /// Relay limits; `None` turns the relay off.
    pub relay: Option<punch_protocol::relay::RelayLimits>,
    /// RFC 5780 alternate address (other IP and port) for NAT discovery.
    pub alt_listen: Option<SocketAddr>,
    /// How long a worker whose connection dropped stays listed (stale).
    pub stale_grace: Duration,
    /// Serve the HTTP API without the bearer token.
    pub http_open: bool,
    /// Most waits (long-polls, barrier waits, agents' `Wait`) at once.
    pub max_waits: usize,
    /// How long a released barrier is remembered.
    pub barrier_ttl: Duration,
    /// Connect requests one agent connection may make per second (a token
    /// bucket refilled at this rate); 0 is unlimited.
    pub connect_rate: u32,
    /// The bucket's size: connects an idle agent may make at once.
    pub connect_burst: u32,
    /// Queries answered from tasks of their own (waits, listings) one
    /// agent connection may have in flight; more are refused at once.
    pub max_queries: usize,
    /// Where the TLS + WebSocket channel listens.
    pub tcp_listen: TcpListen,
    /// Most WebSocket clients at once (and TLS connections on the TCP
    /// port).
    pub max_tcp_clients: usize,
    /// Bytes per second one TCP client may relay; 0 is unlimited.
    pub tcp_rate: u64,
    /// Which of an agent's candidates go to its peers.
    pub candidates: punch_protocol::signal::CandidatePolicy,
    /// Most connections the HTTP listener holds at once.
    pub max_http_conns: usize,
    /// Time a client has to send a request's head, on the HTTP listener
    /// and the TLS port (slow or silent clients are closed after it).
    pub header_timeout: Duration,
    /// Serve `/healthz` and `/metrics` without the bearer token (on by
    /// default: probes and scrapers rarely carry tokens; they show counts,
    /// not workers).
    pub metrics_open: bool,
    /// Cluster mode: the registry shared in Redis; `None` keeps it in
    /// memory (one server).
    pub cluster: Option<cluster::ClusterConfig>,
}

impl ServerConfig {
    /// Defaults with the given data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], punch_protocol::DEFAULT_PORT)),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir,
            token: None,
            max_workers: 100_000,
            idle_timeout: Duration::from_secs(20),
            relay: Some(punch_protocol::relay::RelayLimits::default()),
            alt_listen: None,
            stale_grace: Duration::from_secs(30),
            http_open: false,
            max_waits: hub::MAX_WAITS,
            barrier_ttl: hub::BARRIER_TTL,
            connect_rate: 20,
            connect_burst: 50,
            max_queries: 32,
            metrics_open: true,
            tcp_listen: TcpListen::SameAsUdp,
            max_tcp_clients: 10_000,
            tcp_rate: 1024 << 20,
            candidates: punch_protocol::signal::CandidatePolicy::Open,
            max_http_conns: serving::MAX_HTTP_CONNS,
            header_timeout: serving::HEADER_TIMEOUT,
            cluster: None,
        }
    }
}

/// Where the TCP (TLS + WebSocket) channel listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpListen {
    /// The bound UDP address, on TCP: agents find both at one HOST:PORT.
    SameAsUdp,
    /// This address.
    Addr(SocketAddr),
    /// No TCP listener (the HTTP listener still takes `/ws`).
    Off,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Identity(#[from] punch_tls::TlsError),
    #[error("cannot bind UDP {addr}: {source}")]
    BindUdp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind HTTP {addr}: {source}")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind TCP {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// State shared by the server's tasks.
pub struct Shared {
    pub registry: Mutex<Registry<signal::AgentHandle>>,
    pub metrics: Metrics,
    pub config: ServerConfig,
    pub fingerprint: String,
    /// Relay sessions; `None` when relaying is off.
    pub relay: Option<Arc<Mutex<punch_protocol::relay::RelayTable>>>,
    /// STUN responder counters.
    pub stun: Arc<stun::StunStats>,
    /// Persistent id-to-key bindings.
    pub store: store::Store,
    /// Registry events, waits and barriers.
    pub hub: hub::Hub,
    /// The server's key (signs its proof on WebSocket channels).
    pub identity: Identity,
    /// WebSocket clients and TCP counters.
    pub tcp: Arc<tcp::TcpClients>,
    /// The HTTP listener's connection cap, head deadline and counters.
    pub http_door: Arc<serving::Door>,
    /// The UDP socket (relay frames from TCP clients leave through it).
    pub udp: Arc<udp::ServerSocket>,
    /// Cluster mode, when on.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// The status page's last hour.
    pub history: status::History,
}

/// A running server.
pub struct Server {
    /// The bound UDP address.
    pub udp_addr: SocketAddr,
    /// The bound HTTP address, if any.
    pub http_addr: Option<SocketAddr>,
    /// The bound TCP (TLS + WebSocket) address, if any.
    pub tcp_addr: Option<SocketAddr>,
    /// The fingerprint agents pin.
    pub fingerprint: String,
    /// Shared state (registry, metrics).
    pub shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

/// Path of the server key inside the data directory.
pub fn key_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("server.key")
}

impl Server {
    /// Binds the sockets and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let identity = Identity::load_or_create(&key_path(&config.data_dir))?;
        let fingerprint = identity.fingerprint();
        let socket = punch_net::bind_udp(config.listen).map_err(|source| ServerError::BindUdp {
            addr: config.listen,
            source,
        })?;
        let relay = config
            .relay
            .clone()
            .map(|l| Arc::new(Mutex::new(punch_protocol::relay::RelayTable::new(l))));
        let alt = match config.alt_listen {
            Some(a) => Some(
                stun::AltSockets::bind(&socket, a)
                    .map_err(|source| ServerError::BindUdp { addr: a, source })?,
            ),
            None => None,
        };
        let tcp = tcp::TcpClients::new(config.max_tcp_clients, config.header_timeout);
        let http_door = serving::Door::new(config.max_http_conns, config.header_timeout);
        let socket = udp::ServerSocket::new(socket, relay.clone(), alt.clone(), tcp.clone())
            .map_err(ServerError::Endpoint)?;
        let stun = socket.stun.clone();
        let endpoint = signal::endpoint(&identity, &config, socket.clone())?;
        let udp_addr = endpoint.local_addr().map_err(ServerError::Endpoint)?;
        if config.token.is_none() {
            tracing::warn!(
                "NO TOKEN CONFIGURED: any agent may register and connect. Set --token or PUNCH_TOKEN for anything but a trial."
            );
        }
        let store = store::Store::open(&config.data_dir)?;
        let mut registry = Registry::new(config.max_workers);
        registry.grace = config.stale_grace;
        let bindings = store.load()?;
        tracing::info!(bindings = bindings.len(), "loaded worker-id bindings");
        registry.load_bindings(bindings);
        let cluster = match &config.cluster {
            Some(c) => {
                let mut c = c.clone();
                if c.advertise.port() == 0 {
                    c.advertise.set_port(udp_addr.port());
                }
                if c.advertise.ip().is_unspecified() {
                    let ip = cluster::first_host_addr(c.advertise.is_ipv4())
                        .ok_or(cluster::ClusterError::NoAddress)?;
                    c.advertise.set_ip(ip);
                }
                Some(Arc::new(cluster::Cluster::new(c)?))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            registry: Mutex::new(registry),
            store,
            hub: hub::Hub::new(config.max_waits).with_barrier_ttl(config.barrier_ttl),
            metrics: Metrics::default(),
            config: config.clone(),
            fingerprint: fingerprint.clone(),
            relay: relay.clone(),
            stun,
            identity: identity.clone(),
            tcp,
            http_door,
            udp: socket,
            cluster,
            history: Default::default(),
        });
        let mut tasks = vec![tokio::spawn(signal::accept_loop(
            endpoint.clone(),
            shared.clone(),
        ))];
        tasks.extend(cluster::spawn(shared.clone()));
        tasks.push(tokio::spawn(status::keep_history(shared.clone())));
        if let Some(alt) = alt {
            tasks.push(tokio::spawn(alt.serve(shared.stun.clone())));
        }
        {
            // Stale workers expire after the grace period.
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    let events = shared
                        .registry
                        .lock()
                        .expect("not poisoned")
                        .expire(std::time::Instant::now());
                    for ev in events {
                        tracing::info!(worker = %ev.worker, "expired");
                        shared
                            .metrics
                            .departures
                            .inc(&metrics::DEPARTURES, "expired");
                        shared.hub.publish(ev);
                    }
                    shared.hub.sweep_barriers();
                }
            }));
        }
        if let Some(table) = relay {
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    table
                        .lock()
                        .expect("not poisoned")
                        .expire(std::time::Instant::now());
                }
            }));
        }
        let mut http_addr = None;
        if let Some(addr) = config.http {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::BindHttp { addr, source })?;
            http_addr = Some(listener.local_addr().map_err(ServerError::Endpoint)?);
            tasks.push(tokio::spawn(http::serve(listener, shared.clone())));
        }
        let mut tcp_addr = None;
        let want = match config.tcp_listen {
            TcpListen::SameAsUdp => Some(udp_addr),
            TcpListen::Addr(a) => Some(a),
            TcpListen::Off => None,
        };
        if let Some(addr) = want {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                // An ephemeral UDP port may be taken on TCP: any port will
                // do then (the caller asked for no particular one).
                Err(e)
                    if config.tcp_listen == TcpListen::SameAsUdp && config.listen.port() == 0 =>
                {
                    tracing::debug!("TCP port {} taken ({e}); using another", addr.port());
                    tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                        .await
                        .map_err(|source| ServerError::BindTcp { addr, source })?
                }
                Err(source) => return Err(ServerError::BindTcp { addr, source }),
            };
            let bound = listener.local_addr().map_err(ServerError::Endpoint)?;
            let tls = punch_tls::tcp::server_config(&identity)?;
            tasks.push(tokio::spawn(tcp::serve_tls(listener, tls, shared.clone())));
            tcp::announce(bound);
            tcp_addr = Some(bound);
        }
        tracing::info!(%udp_addr, ?tcp_addr, ?http_addr, %fingerprint, "punch-server listening");
        Ok(Server {
            udp_addr,
            tcp_addr,
            http_addr,
            fingerprint,
            shared,
            endpoint,
            tasks,
        })
    }

    /// Stops serving: closes every connection and the sockets.
    pub async fn shutdown(self) {
        self.endpoint
            .close(punch_protocol::close::DONE.into(), b"server shutting down");
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
