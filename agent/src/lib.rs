//! punch-agent: reach another worker by id over a direct QUIC connection.
//!
//! An [`Agent`] owns one UDP socket. Through it the agent keeps a signaling
//! connection to the rendezvous server, punches holes with authenticated
//! probes, and carries its peer connections, so all of them share one NAT
//! mapping.
//!
//! A complete run on loopback: a server (embedded here; normally
//! `punch-server` on a public host), a worker that accepts and echoes, and
//! one that connects to it by id (`examples/embed.rs` is the same as a
//! program):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use punch_agent::{Agent, PathKind};
//! use std::time::Duration;
//! # let dir = tempfile::tempdir()?;
//! # let mut sc = punch_server::ServerConfig::new(dir.path().to_path_buf());
//! # sc.listen = "127.0.0.1:0".parse()?;
//! # sc.http = None;
//! # let server = punch_server::Server::start(sc).await?;
//! # let (addr, fingerprint) = (server.udp_addr.to_string(), server.fingerprint.clone());
//! // `addr` and `fingerprint` name the server (`punch-server fingerprint`).
//! let b = Agent::builder(&addr, &fingerprint).worker_id("worker-b").no_nat_check().start().await?;
//! b.registered(Duration::from_secs(5)).await?;
//! let accepting = b.clone();
//! tokio::spawn(async move {
//!     while let Some(peer) = accepting.accept().await {
//!         // `peer.peer_id` is the id the server vouched for.
//!         tokio::spawn(peer.serve()); // answers echo, bench and file streams
//!     }
//! });
//!
//! let a = Agent::builder(&addr, &fingerprint).worker_id("worker-a").no_nat_check().start().await?;
//! a.registered(Duration::from_secs(5)).await?;
//! let peer = a.connect("worker-b").await?;
//! assert_eq!(peer.path.kind, PathKind::Direct);
//! println!("{} via {} in {:?}, rtt {:?}", peer.peer_id, peer.path.remote_addr, peer.path.connect_time, peer.rtt());
//!
//! // `peer.conn` is a plain quinn connection: open streams on it freely.
//! let mut pinger = peer.pinger().await?;
//! println!("rtt {:?}", pinger.ping().await?);
//! a.close().await;
//! b.close().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod admission;
mod book;
mod builder;
mod candidates;
mod clock;
mod config;
mod error;
mod events;
mod lan;
mod nat_state;
pub mod natcheck;
mod options;
mod path;
mod peer;
pub mod portmap;
mod probe_router;
pub mod protocols;
mod registry;
mod relay;
mod session;
mod signal;
mod socket;
mod tcp;
pub mod walk;

/// How the agent reconnects to its server: the back-off between attempts
/// and the silence that counts as a dead server (load simulations of many
/// agents reuse them, so they behave as agents do).
pub mod reconnect {
    pub use crate::signal::{backoff, server_silent};
}

pub use admission::Incoming;
pub use book::KnownPeer;
pub use builder::AgentBuilder;
pub use config::{AgentConfig, RelayMode, SecretKey, Status};
pub use error::{AgentError, Fault};
pub use events::{AgentEvent, Discovery, PathCause, PathChange, EVENT_BUFFER};
pub use lan::LanPeer;
pub use options::ConnectOptions;
pub use peer::{
    open_protocol_on, PathInfo, PeerConnection, PeerError, Pinger, RelayReason, Strategy,
};
pub use protocols::{ProtocolHandler, ProtocolStream};
pub use punch_protocol::signal::PathKind;
pub use session::{serverless::DiscoveryCounts, Punched};
pub use walk::{machine::WalkSummary, HeardPeer};

use punch_protocol::signal::{ClientMsg, ServerMsg};
use punch_protocol::ALPN_PEER;
use punch_tls::{Expect, Identity, KeyVerifier};
use socket::{ProbeRouter, PunchSocket};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Replies to numbered requests.
#[derive(Debug)]
pub(crate) enum Reply {
    Msg(ServerMsg),
    Offer(
        punch_protocol::signal::Offer,
        mpsc::Receiver<socket::ProbeDatagram>,
    ),
}

pub(crate) struct Inner {
    pub(crate) config: AgentConfig,
    pub(crate) identity: Identity,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) socket: Arc<PunchSocket>,
    pub(crate) router: Arc<ProbeRouter>,
    pub(crate) worker_id: String,
    pub(crate) ephemeral: bool,
    pub(crate) fingerprint: String,
    /// Our link to the server: the channel, requests in flight, what
    /// the server speaks and where it is.
    pub(crate) link: signal::ServerLink,
    /// Set by [`Agent::close`]: the signaling loop stops instead of reconnecting.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Becomes true when the signaling task has ended.
    pub(crate) signal_stopped: watch::Sender<bool>,
    pub(crate) status: watch::Sender<Status>,
    /// What happened, for [`Agent::events`].
    pub(crate) events: events::Events,
    /// Our NAT: class, allocator, how far the check has come.
    pub(crate) nat: nat_state::NatWatch,
    /// What we offer besides the observed address: STUN's answers, our
    /// NAT's port counter.
    pub(crate) gather: candidates::Gathered,
    /// Application protocols registered by the embedder.
    pub(crate) protocols: protocols::Protocols,
    /// The gateway port mapping task, if port mapping runs.
    portmap: tokio::sync::Mutex<Option<punch_portmap::client::Handle>>,
    /// What it knows (the live mapping), if it runs.
    pub(crate) portmap_state: Option<watch::Receiver<punch_portmap::client::State>>,
    /// When the agent started.
    pub(crate) started: Instant,
    /// (signaling channel count, mapped address) last told the server.
    pub(crate) portmap_sent: Mutex<Option<(u64, Option<SocketAddr>)>>,
    pub(crate) admission: admission::Admission,
    /// The peers we connected to, to find them without the server.
    pub(crate) book: Arc<Mutex<book::Book>>,
    /// LAN discovery, when on.
    pub(crate) lan: Option<lan::Lan>,
    pub(crate) discovery: Mutex<session::serverless::DiscoveryCounts>,
    /// Random walks: what they heard, the way to the walker.
    pub(crate) walking: Arc<walk::Walking>,
}

/// A running agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
    _tasks: Arc<TaskGuard>,
}

struct TaskGuard(Vec<tokio::task::JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// How long [`Agent::close`] gives connections it does not hold (the
/// application's, unless it closed them with `PeerConnection::close`) to
/// send their CONNECTION_CLOSE frames: their drivers do at once.
const CLOSE_FLUSH: Duration = Duration::from_millis(5);

fn anon_id() -> String {
    format!("anon-{:016x}", rand::random::<u64>())
}

impl Agent {
    /// A builder for an agent of the server at `server` (`HOST:PORT`) with
    /// key fingerprint `fingerprint`.
    pub fn builder(server: impl Into<String>, fingerprint: impl Into<String>) -> AgentBuilder {
        AgentBuilder::from_config(AgentConfig::new(server, fingerprint))
    }

    /// Binds the socket and starts registering with the server in the
    /// background. Use [`Agent::registered`] to wait for registration.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        Agent::start_with(config, Arc::default()).await
    }

    pub(crate) async fn start_with(
        config: AgentConfig,
        protocols: protocols::Protocols,
    ) -> Result<Agent, AgentError> {
        let fingerprint = punch_tls::parse_fingerprint(&config.server_fingerprint)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let (worker_id, ephemeral) = match &config.worker_id {
            Some(id) => {
                punch_protocol::signal::validate_worker_id(id)
                    .map_err(|e| AgentError::Config(format!("worker id {id:?}: {e}")))?;
                (id.clone(), false)
            }
            None => (anon_id(), true),
        };
        config.check(&worker_id, ephemeral)?;
        let identity = match (&config.secret_key, &config.key_file) {
            (Some(k), _) => k.0.clone(),
            (None, Some(p)) => Identity::load_or_create(p)?,
            (None, None) => Identity::generate()?,
        };
        let (book, sock) = book::Book::open(&config)?;
        let walking = Arc::new(walk::Walking::default());
        let protocols = session::pex::with_handler(protocols, &book);
        let protocols = walk::with_handler(protocols, &book, &config, &walking);
        let router = Arc::new(ProbeRouter::default());
        let socket = PunchSocket::new(sock, router.clone())?;
        let events = events::Events::new();
        {
            let tx = events.sender();
            socket
                .paths
                .lock()
                .expect("not poisoned")
                .observe(Box::new(move |c| {
                    tracing::debug!(peer = %c.peer, session = %c.session, path = c.path.as_str(), remote = ?c.remote, cause = c.cause.as_str(), "path changed");
                    let _ = tx.send(AgentEvent::PathChanged(c));
                }));
        }
        let admission = admission::Admission::new();
        let verifier = KeyVerifier::new(Expect::Allowed(Arc::new(admission.checker())));
        let mut server_cfg = punch_tls::server_config(&identity, verifier, &[ALPN_PEER])?;
        server_cfg.transport_config(Arc::new(peer::peer_transport(config.keep_alive)));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            punch_net::endpoint_config(rand::random()),
            Some(server_cfg),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        let (status, _) = watch::channel(Status::Connecting(None));
        let portmap = match endpoint.local_addr() {
            Ok(local) => portmap::start(&config.port_mapping, local, &config.server),
            Err(_) => None,
        };
        let portmap_state = portmap.as_ref().map(|h| h.state());
        let lan = lan::Lan::for_agent(&config, &worker_id, &identity, &endpoint);
        let inner = Arc::new(Inner {
            config,
            identity,
            endpoint,
            socket,
            router,
            worker_id,
            ephemeral,
            fingerprint,
            link: signal::ServerLink::default(),
            closing: std::sync::atomic::AtomicBool::new(false),
            signal_stopped: watch::channel(false).0,
            nat: nat_state::NatWatch::new(),
            gather: Default::default(),
            protocols,
            portmap: tokio::sync::Mutex::new(portmap),
            portmap_state,
            portmap_sent: Mutex::new(None),
            started: Instant::now(),
            status,
            events,
            admission,
            book,
            lan,
            discovery: Mutex::default(),
            walking,
        });
        let mut tasks = vec![
            tokio::spawn(signal::run(inner.clone())),
            tokio::spawn(admission::accept_loop(inner.clone())),
            tokio::spawn(session::serverless::run(inner.clone())),
        ];
        if let Some(state) = inner.portmap_state.clone() {
            tasks.push(tokio::spawn(portmap::announce(inner.clone(), state)));
        }
        if !inner.config.walk_topics.is_empty() {
            tasks.push(tokio::spawn(walk::run(inner.clone())));
        }
        Ok(Agent {
            inner,
            _tasks: Arc::new(TaskGuard(tasks)),
        })
    }

    /// The gateway port mapping now (`None` when port mapping does not
    /// run: `--port-mapping off`, a loopback socket or server).
    pub fn port_mapping(&self) -> Option<portmap::MappingView> {
        self.inner
            .portmap_state
            .as_ref()
            .map(|s| portmap::MappingView::of(&s.borrow()))
    }

    /// Watches the port mapping task's state (`None` when it does not run).
    pub fn watch_port_mapping(&self) -> Option<watch::Receiver<punch_portmap::client::State>> {
        self.inner.portmap_state.clone()
    }

    /// The channel signaling runs on now (`None` while not registered).
    pub fn transport(&self) -> Option<punch_protocol::signal::Transport> {
        *self.inner.link.transport.lock().expect("not poisoned")
    }

    /// The rendezvous server as configured (`HOST:PORT`, or a list).
    pub fn server(&self) -> &str {
        &self.inner.config.server
    }

    /// The server in use now (one of a list).
    pub fn current_server(&self) -> String {
        signal::current_server(&self.inner)
    }

    /// Our worker id (an `anon-…` id when none was configured).
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Fingerprint of our own key.
    pub fn fingerprint(&self) -> String {
        self.inner.identity.fingerprint()
    }

    /// The local address of the agent's UDP socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// The current signaling status.
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }

    /// Waits until the agent is registered (returns the address the server
    /// observed), it fails for good, or `timeout` passes.
    pub async fn registered(&self, timeout: Duration) -> Result<SocketAddr, AgentError> {
        let mut rx = self.inner.status.subscribe();
        let wait = async {
            loop {
                match &*rx.borrow_and_update() {
                    Status::Registered { observed } => return Ok(*observed),
                    Status::Failed(e) => return Err(e.clone()),
                    Status::Connecting(_) => {}
                }
                if rx.changed().await.is_err() {
                    return Err(AgentError::Io("agent stopped".into()));
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(match &*rx.borrow() {
                Status::Connecting(Some(e)) => e.clone(),
                _ => AgentError::ServerUnreachable {
                    server: self.inner.config.server.clone(),
                    reason: format!("not registered within {:.1} s", timeout.as_secs_f64()),
                },
            }),
        }
    }

    /// Connects to the worker `target`: asks the server for an introduction,
    /// punches, and opens a mutually authenticated QUIC connection.
    pub async fn connect(&self, target: &str) -> Result<PeerConnection, AgentError> {
        self.connect_with(target, ConnectOptions::new()).await
    }

    /// [`Agent::connect`] with this call's own limits and relay policy
    /// over the agent's settings. The peer punches and relays as its own
    /// settings say.
    pub async fn connect_with(
        &self,
        target: &str,
        opts: ConnectOptions,
    ) -> Result<PeerConnection, AgentError> {
        let policy = options::DialPolicy::with(&self.inner.config, &opts);
        let connect = session::connect(&self.inner, target, policy);
        match opts.timeout {
            None => connect.await,
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .unwrap_or_else(|_| {
                    Err(AgentError::Timeout(format!(
                        "no connection to {target:?} within {:.1} s",
                        limit.as_secs_f64()
                    )))
                }),
        }
    }

    /// What happens to the agent from now on: registrations, NAT class,
    /// peers connecting, path changes with their cause. The first call
    /// also gets what happened since the agent started (so a caller that
    /// asks right after [`Agent::start`] misses nothing); later calls
    /// start at the call. Each receiver holds at most
    /// [`EVENT_BUFFER`] unread events; one that falls behind loses
    /// the oldest (`RecvError::Lagged`).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<AgentEvent> {
        self.inner.events.subscribe()
    }

    /// The next incoming peer connection (already authenticated against the
    /// key the server vouched for). `None` once the agent stops.
    pub async fn accept(&self) -> Option<PeerConnection> {
        Some(self.incoming().await?.accept())
    }

    /// The next incoming peer connection, for the application to
    /// [`Incoming::accept`] or [`Incoming::refuse`] (by its worker id or
    /// path, say). [`Agent::accept`] accepts every one. The handshake is
    /// done by then, so the dialer's `connect` has returned: a refusal
    /// reaches it as its connection closing with the reason.
    pub async fn incoming(&self) -> Option<Incoming> {
        self.inner.admission.next().await
    }

    /// Closes every connection: deregisters (the server has the queued
    /// outcome reports and the goodbye, about one round trip), gives a
    /// mapped port back, and sends every connection's CONNECTION_CLOSE,
    /// without waiting for the connections to drain.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        // A one-off command may end before the book's once-a-second save.
        self.inner.book.lock().expect("not poisoned").save();
        // Dropping the control sender ends the signaling writer, which
        // delivers what is queued (outcome reports) before we close.
        let control = self.inner.link.control.lock().expect("not poisoned").take();
        let deregister = async {
            if let Some(c) = control {
                // Deregister at once rather than go stale.
                let _ = c.try_send(ClientMsg::Bye);
                drop(c);
                let mut stopped = self.inner.signal_stopped.subscribe();
                let limit = Duration::from_millis(1500);
                let _ = tokio::time::timeout(limit, stopped.wait_for(|s| *s)).await;
            }
        };
        // Give the gateway's port back, meanwhile (bounded: a silent
        // gateway costs at most 1.5 s).
        let unmap = async {
            if let Some(mut h) = self.inner.portmap.lock().await.take() {
                h.shutdown(Duration::from_millis(1500)).await;
            }
        };
        tokio::join!(deregister, unmap);
        self.inner
            .endpoint
            .close(punch_protocol::close::DONE.into(), b"agent shutting down");
        // Each connection sends its CONNECTION_CLOSE at its driver's next
        // poll; waiting for them to drain (three probe timeouts, ~0.5 s at
        // 40 ms RTT) would only hold the caller. A peer that misses the
        // close learns it from its idle timeout.
        let _ = tokio::time::timeout(CLOSE_FLUSH, self.inner.endpoint.wait_idle()).await;
    }
}
