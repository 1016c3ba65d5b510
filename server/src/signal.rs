//! The QUIC signaling endpoint: one task per agent connection.

use crate::introduce::{card, counted, Pairing, Recipient};
use crate::metrics::inc;
use crate::registry::Online;
use crate::{ServerConfig, ServerError, Shared};
use punch_net::{canonical, read_frame, write_frame, FrameError};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{
    validate_name, ClientMsg, ErrorCode, Hello, PathKind, Query, Role, ServerMsg, Transport,
    MAX_LIST, MAX_WAIT_MS,
};
use punch_protocol::{ALPN_SIGNAL, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier, TOKEN_PROOF_LABEL};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};

/// How the registry reaches an online agent's connection task.
#[derive(Clone, Debug)]
pub struct AgentHandle {
    tx: OutQueue,
    closer: Closer,
}

impl AgentHandle {
    /// Queues a message for the agent; false when its queue is full or it
    /// has gone.
    pub fn send(&self, m: ServerMsg) -> bool {
        self.tx.try_send(Box::new(m)).is_ok()
    }
}

/// Ends an agent's connection (when a newer one replaces it).
#[derive(Clone, Debug)]
pub enum Closer {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// A WebSocket channel: its task stops when notified.
    Tcp(Arc<tokio::sync::Notify>),
}

impl Closer {
    fn close(&self, reason: &str) {
        match self {
            Closer::Quic(c) => c.close(punch_protocol::close::DONE.into(), reason.as_bytes()),
            Closer::Tcp(n) => n.notify_one(),
        }
    }
}

/// The agent's end of a registered channel, whichever transport carries it.
pub(crate) enum Link<'a> {
    Quic {
        conn: &'a quinn::Connection,
        send: &'a mut quinn::SendStream,
    },
    Tcp(crate::tcp::WsLink),
}

impl Link<'_> {
    async fn send(&mut self, m: &ServerMsg) -> Result<(), String> {
        match self {
            Link::Quic { send, .. } => write_frame(send, m).await.map_err(|e| e.to_string()),
            Link::Tcp(l) => l.send(punch_protocol::ws::encode_signal(m)).await,
        }
    }

    /// Sends an error, waits briefly for it to be delivered, and closes.
    pub(crate) async fn refuse(&mut self, code: ErrorCode, message: String) {
        match self {
            Link::Quic { conn, send } => refuse(conn, send, code, message).await,
            Link::Tcp(l) => {
                warn!(code = code.as_str(), "refusing agent: {message}");
                let m = ServerMsg::Error {
                    req: None,
                    code,
                    message,
                };
                let _ = l.send(punch_protocol::ws::encode_signal(&m)).await;
                l.finish().await;
            }
        }
    }

    /// Resolves when the transport is gone.
    async fn closed(&self) -> String {
        match self {
            Link::Quic { conn, .. } => conn.closed().await.to_string(),
            Link::Tcp(l) => l.closed().await,
        }
    }

    /// Did the agent close the channel as it does when it shuts down?
    fn shut_down(&self) -> bool {
        match self {
            Link::Quic { conn, .. } => shut_down(conn),
            Link::Tcp(_) => false,
        }
    }

    /// The peer's current address, where it can change under the channel
    /// (QUIC follows NAT rebinding; a TCP connection cannot).
    fn rebinding_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Link::Quic { conn, .. } => Some(canonical(conn.remote_address())),
            Link::Tcp(_) => None,
        }
    }
}

/// A message from the agent's reader, or why reading ended.
pub(crate) type Incoming = Result<ClientMsg, ReadEnd>;

/// What an agent's reader hands its session. Boxed: a tokio channel
/// allocates its first block of 32 slots up front, and 32 unboxed messages
/// (~200 bytes each) per agent were a fifth of the server's memory per
/// agent.
pub(crate) type InQueue = mpsc::Receiver<Box<Incoming>>;

/// Messages queued for an agent, boxed for the same reason.
pub(crate) type OutQueue = mpsc::Sender<Box<ServerMsg>>;

/// Why the reader of an agent's channel stopped.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// A frame that does not decode.
    Malformed(String),
    /// The channel closed or failed.
    Closed(String),
}

/// What the transport established about the agent before its hello.
pub(crate) struct Arrival {
    pub conn_id: u64,
    /// The key the agent proved (TLS client certificate, or a signature).
    pub key: punch_protocol::signal::PublicKey,
    /// The value its token proof must be computed over, if the channel
    /// offers one.
    pub token_binding: Option<[u8; 32]>,
    pub observed: std::net::SocketAddr,
    pub transport: Transport,
    pub closer: Closer,
}

/// Messages queued per agent before it counts as too slow.
const AGENT_QUEUE: usize = 64;
/// Time an agent has to complete the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server looks for NAT rebinding of its agents.
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// The token bucket that bounds one agent's introductions, each of which
/// costs the target a punch (and probes) and the server a relay session.
pub use punch_protocol::budget::Bucket;

/// A slot for a query answered from a task of its own, or `None` (counted)
/// when the connection has its share in flight: waits and listings run
/// apart from the session, and unbounded they were a way to make the
/// server hold any number of tasks for one agent.
fn query_slot(slots: &Arc<Semaphore>, shared: &Shared) -> Option<OwnedSemaphorePermit> {
    let p = slots.clone().try_acquire_owned().ok();
    if p.is_none() {
        inc(&shared.metrics.queries_refused);
    }
    p
}

/// The answer to a query beyond the connection's share.
fn busy(req: u32, limit: usize) -> ServerMsg {
    ServerMsg::Error {
        req: Some(req),
        code: ErrorCode::RateLimited,
        message: format!("busy: {limit} queries already in flight on this connection"),
    }
}

/// Builds the QUIC endpoint on `socket`.
pub fn endpoint(
    identity: &Identity,
    config: &ServerConfig,
    socket: Arc<crate::udp::ServerSocket>,
) -> Result<quinn::Endpoint, ServerError> {
    let mut server_cfg =
        punch_tls::server_config(identity, KeyVerifier::new(Expect::AnyKey), &[ALPN_SIGNAL])?;
    server_cfg.transport_config(Arc::new(punch_net::signal_transport(
        None,
        config.idle_timeout,
    )));
    let endpoint_cfg = punch_net::endpoint_config(identity.derive_secret("stateless-reset"));
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_cfg,
        Some(server_cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(ServerError::Endpoint)
}

/// A number for a new agent connection, unique across transports.
pub fn next_conn_id() -> u64 {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let conn_id = next_conn_id();
        let remote = canonical(incoming.remote_address());
        tokio::spawn(
            async move {
                inc(&shared.metrics.connections_accepted);
                let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        inc(&shared.metrics.handshake_failures);
                        debug!("handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        inc(&shared.metrics.handshake_failures);
                        debug!("handshake timed out");
                        return;
                    }
                };
                serve_agent(conn, conn_id, shared).await;
            }
            .instrument(info_span!("conn", conn_id, %remote)),
        );
    }
}

/// Sends an error, waits briefly for it to be delivered, and closes.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) {
    warn!(code = code.as_str(), "refusing agent: {message}");
    let _ = write_frame(
        send,
        &ServerMsg::Error {
            req: None,
            code,
            message: message.clone(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(error_close_code(code), message.as_bytes());
}

/// Application close codes: 0 is a normal close, errors are 0x100 + code.
pub fn error_close_code(code: ErrorCode) -> quinn::VarInt {
    let n: u32 = match code {
        ErrorCode::BadVersion => 1,
        ErrorCode::BadToken => 2,
        ErrorCode::IdTaken => 3,
        ErrorCode::BadRequest => 4,
        ErrorCode::UnknownWorker => 5,
        ErrorCode::WorkerOffline => 6,
        ErrorCode::SelfConnect => 7,
        ErrorCode::Malformed => 8,
        ErrorCode::RateLimited => 9,
        ErrorCode::Internal => 10,
        ErrorCode::Timeout => 11,
    };
    (0x100 + n).into()
}

/// Did the agent close the connection as it does when it shuts down?
fn shut_down(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(punch_protocol::close::DONE)
    )
}

async fn serve_agent(conn: quinn::Connection, conn_id: u64, shared: Arc<Shared>) {
    let Some(key) = punch_tls::peer_key(&conn) else {
        conn.close(error_close_code(ErrorCode::BadRequest), b"no client key");
        return;
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            debug!("no control stream");
            conn.close(
                error_close_code(ErrorCode::BadRequest),
                b"no control stream",
            );
            return;
        }
    };
    let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv, MAX_FRAME))
        .await
        .map(|r| {
            r.map_err(|e| match e {
                FrameError::Codec(c) => ReadEnd::Malformed(c.to_string()),
                e => ReadEnd::Closed(e.to_string()),
            })
        });
    let mut link = Link::Quic {
        conn: &conn,
        send: &mut send,
    };
    let Some(hello) = expect_hello(&mut link, first, &shared).await else {
        return;
    };
    let mut exporter = [0u8; 32];
    let token_binding = conn
        .export_keying_material(&mut exporter, TOKEN_PROOF_LABEL, b"")
        .ok()
        .map(|_| exporter);
    let (in_tx, in_rx) = mpsc::channel::<Box<Incoming>>(16);
    // The reader runs as its own task so a slow peer write cannot stall it.
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame::<ClientMsg>(&mut recv, MAX_FRAME)
                .await
                .map_err(|e| match e {
                    FrameError::Codec(c) => ReadEnd::Malformed(c.to_string()),
                    e => ReadEnd::Closed(e.to_string()),
                });
            let stop = r.is_err();
            if in_tx.send(Box::new(r)).await.is_err() || stop {
                break;
            }
        }
    });
    let arrival = Arrival {
        conn_id,
        key,
        token_binding,
        observed: canonical(conn.remote_address()),
        transport: Transport::Udp,
        closer: Closer::Quic(conn.clone()),
    };
    serve_registered(link, arrival, hello, in_rx, shared).await;
    reader.abort();
}

/// Reads the first message, which must be a hello; refuses the agent
/// otherwise.
pub(crate) async fn expect_hello(
    link: &mut Link<'_>,
    first: Result<Incoming, tokio::time::error::Elapsed>,
    shared: &Arc<Shared>,
) -> Option<Hello> {
    match first {
        Ok(Ok(ClientMsg::Hello(h))) => Some(h),
        Ok(Ok(_)) => {
            inc(&shared.metrics.decode_errors);
            link.refuse(ErrorCode::BadRequest, "expected Hello first".into())
                .await;
            None
        }
        Ok(Err(ReadEnd::Malformed(e))) => {
            inc(&shared.metrics.decode_errors);
            link.refuse(ErrorCode::Malformed, format!("bad hello: {e}"))
                .await;
            None
        }
        Ok(Err(ReadEnd::Closed(e))) => {
            debug!("channel failed before hello: {e}");
            None
        }
        Err(_) => {
            link.refuse(ErrorCode::BadRequest, "no hello in time".into())
                .await;
            None
        }
    }
}

/// Checks a hello, registers the agent and serves it until it leaves,
/// whichever transport carries it.
pub(crate) async fn serve_registered(
    mut link: Link<'_>,
    arrival: Arrival,
    hello: Hello,
    in_rx: InQueue,
    shared: Arc<Shared>,
) {
    let id = hello.worker_id.clone();
    let span = info_span!("agent", worker = %id, transport = arrival.transport.as_str());
    async move {
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
            inc(&shared.metrics.registration_refused);
            let msg = format!(
                "protocol version {} not supported; this server speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                hello.version
            );
            link.refuse(ErrorCode::BadVersion, msg).await;
            return;
        }
        if let Err(e) = hello.validate() {
            inc(&shared.metrics.registration_refused);
            link.refuse(ErrorCode::BadRequest, e).await;
            return;
        }
        if hello.public_key != arrival.key {
            inc(&shared.metrics.registration_refused);
            link.refuse(
                ErrorCode::BadRequest,
                "hello key differs from the proven key".into(),
            )
            .await;
            return;
        }
        if let Some(token) = &shared.config.token {
            let ok = arrival.token_binding.is_some_and(|b| {
                hello
                    .token_proof
                    .is_some_and(|p| punch_tls::ct_eq(&p, &punch_tls::token_proof(token, &b)))
            });
            if !ok {
                inc(&shared.metrics.auth_failures);
                let msg = if hello.token_proof.is_none() {
                    "this server requires a token (--token / PUNCH_TOKEN)"
                } else {
                    "wrong token"
                };
                link.refuse(ErrorCode::BadToken, msg.into()).await;
                return;
            }
        }
        let Arrival {
            conn_id,
            key,
            observed,
            transport,
            closer,
            ..
        } = arrival;
        if let (Some(cluster), false) = (&shared.cluster, hello.ephemeral) {
            match cluster.bind_key(&id, &key).await {
                Ok(true) => {}
                Ok(false) => {
                    inc(&shared.metrics.registration_refused);
                    let msg =
                        format!("worker id {id:?} is registered with another key (cluster-wide)");
                    link.refuse(ErrorCode::IdTaken, msg).await;
                    return;
                }
                // Redis down: this server's own binding still holds;
                // refusing everyone would turn an outage into a fleet-wide one.
                Err(e) => warn!("cluster key binding not checked: {e}"),
            }
        }
        let (tx, mut rx) = mpsc::channel(AGENT_QUEUE);
        let online = Online {
            conn_id,
            observed,
            transport,
            since: SystemTime::now(),
            local: hello.local_candidates.clone(),
            nat: None,
            allocator: None,
            handle: AgentHandle {
                tx: tx.clone(),
                closer,
            },
        };
        let profile = crate::registry::Profile {
            kind: hello.kind.clone(),
            tags: hello.tags.clone(),
            metadata: hello.metadata.clone(),
        };
        let reg = shared.registry.lock().expect("not poisoned").register(
            &id,
            key,
            hello.ephemeral,
            profile,
            online,
        );
        match reg {
            Ok(r) => {
                if r.new_binding {
                    // A redb commit waits for fsync: off the runtime's
                    // threads, so other agents' traffic is not held up.
                    let (s2, id2) = (shared.clone(), id.clone());
                    let put = tokio::task::spawn_blocking(move || s2.store.put(&id2, &key)).await;
                    match put {
                        Ok(Ok(())) => {}
                        // The binding still holds until a restart.
                        Ok(Err(e)) => warn!("could not persist the id binding: {e}"),
                        Err(e) => warn!("could not persist the id binding: {e}"),
                    }
                }
                if let Some(old) = r.replaced {
                    info!("replacing previous connection {}", old.conn_id);
                    old.handle.closer.close("replaced by a new connection");
                }
            }
            Err(code) => {
                inc(&shared.metrics.registration_refused);
                let msg = match code {
                    ErrorCode::IdTaken => {
                        format!("worker id {id:?} is registered with another key")
                    }
                    _ => "registry full".to_string(),
                };
                link.refuse(code, msg).await;
                return;
            }
        }
        inc(&shared.metrics.registrations);
        inc(match transport {
            Transport::Udp => &shared.metrics.registrations_udp,
            Transport::Tcp => &shared.metrics.registrations_tcp,
        });
        info!(%observed, ephemeral = hello.ephemeral, kind = ?hello.kind, "registered");
        shared.hub.publish(crate::registry::Event {
            kind: crate::registry::EventKind::Registered,
            worker: id.clone(),
            observed: Some(observed),
        });
        let result = session_loop(
            &mut link,
            conn_id,
            &id,
            &shared,
            in_rx,
            &mut rx,
            tx,
            observed,
            hello.version,
        )
        .await;
        let clean = matches!(result, Ok(true));
        let ev = shared.registry.lock().expect("not poisoned").unregister(
            &id,
            conn_id,
            clean,
            std::time::Instant::now(),
        );
        if let Some(ev) = ev {
            shared.hub.publish(ev);
        }
        match result {
            Ok(true) => info!("deregistered (clean shutdown)"),
            Ok(false) => info!("disconnected"),
            Err(reason) => info!("disconnected: {reason}"),
        }
    }
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    link: &mut Link<'_>,
    conn_id: u64,
    id: &str,
    shared: &Arc<Shared>,
    mut in_rx: InQueue,
    rx: &mut mpsc::Receiver<Box<ServerMsg>>,
    tx: OutQueue,
    observed: std::net::SocketAddr,
    version: u16,
) -> Result<bool, String> {
    // The agent's own version: it reads nothing newer from us.
    link.send(&ServerMsg::Welcome { version, observed }).await?;
    let mut check = tokio::time::interval(ADDRESS_CHECK);
    let cfg = &shared.config;
    let mut connects = Bucket::new(
        cfg.connect_rate,
        cfg.connect_burst,
        std::time::Instant::now(),
    );
    let slots = Arc::new(Semaphore::new(cfg.max_queries));
    loop {
        tokio::select! {
            // Messages first: a Bye that arrived just before the connection
            // closed must count as a clean shutdown.
            biased;
            msg = in_rx.recv() => {
                let msg = msg.map(|m| *m);
                if let Some(Ok(ClientMsg::Connect { req, .. })) = &msg {
                    if !connects.take(std::time::Instant::now()) {
                        inc(&shared.metrics.connect_requests);
                        inc(&shared.metrics.connect_rate_limited);
                        debug!("connect refused: over the rate");
                        link.send(&ServerMsg::Error {
                            req: Some(*req),
                            code: ErrorCode::RateLimited,
                            message: format!(
                                "more than {} connect requests a second (burst {})",
                                cfg.connect_rate, cfg.connect_burst
                            ),
                        })
                        .await?;
                        continue;
                    }
                }
                match msg {
                    Some(Ok(ClientMsg::Bye)) => return Ok(true),
                    Some(Ok(ClientMsg::Query { req, query: Query::Wait { id: target, timeout_ms } })) => {
                        let Some(slot) = query_slot(&slots, shared) else {
                            link.send(&busy(req, cfg.max_queries)).await?;
                            continue;
                        };
                        // Answered later, from its own task, through the queue.
                        let (shared, tx) = (shared.clone(), tx.clone());
                        tokio::spawn(async move {
                            let _slot = slot;
                            let limit = Duration::from_millis(timeout_ms.min(MAX_WAIT_MS) as u64);
                            let answer = match shared.hub.wait_online(&shared, &target, limit).await {
                                Ok(w) => ServerMsg::Workers { req, workers: vec![w] },
                                Err(e) => ServerMsg::Error {
                                    req: Some(req),
                                    code: match e {
                                        crate::hub::WaitError::Timeout => ErrorCode::Timeout,
                                        _ => ErrorCode::RateLimited,
                                    },
                                    message: format!("waiting for {target:?}: {e}"),
                                },
                            };
                            let _ = tx.send(Box::new(answer)).await;
                        }.in_current_span());
                    }
                    Some(Ok(ClientMsg::Connect { req, target }))
                        if shared.cluster.is_some()
                            && target != id
                            && !shared.registry.lock().expect("not poisoned").is_online(&target) =>
                    {
                        // Perhaps held by another server: asked through Redis,
                        // answered through the queue.
                        inc(&shared.metrics.connect_requests);
                        let Some(slot) = query_slot(&slots, shared) else {
                            link.send(&busy(req, cfg.max_queries)).await?;
                            continue;
                        };
                        let ask = crate::cluster::connect_remote(shared.clone(), id.to_string(), req, target);
                        tokio::spawn(
                            async move {
                                let _slot = slot;
                                ask.await
                            }
                            .in_current_span(),
                        );
                    }
                    Some(Ok(ClientMsg::Query { req, query: q @ (Query::List { .. } | Query::Discover { .. }) })) => {
                        // In a cluster other servers' workers come from Redis:
                        // answered from a task, through the queue.
                        let Some(slot) = query_slot(&slots, shared) else {
                            link.send(&busy(req, cfg.max_queries)).await?;
                            continue;
                        };
                        let (shared, tx) = (shared.clone(), tx.clone());
                        tokio::spawn(async move {
                            let _slot = slot;
                            let answer = cluster_query(&shared, req, q).await;
                            let _ = tx.send(Box::new(answer)).await;
                        }.in_current_span());
                    }
                    Some(Ok(ClientMsg::Query { req, query: Query::Get { id: wid } }))
                        if shared.cluster.is_some()
                            && shared.registry.lock().expect("not poisoned").get(&wid).is_none() =>
                    {
                        let Some(slot) = query_slot(&slots, shared) else {
                            link.send(&busy(req, cfg.max_queries)).await?;
                            continue;
                        };
                        let (shared, tx) = (shared.clone(), tx.clone());
                        tokio::spawn(async move {
                            let _slot = slot;
                            let w = if validate_name("worker id", &wid).is_ok() {
                                crate::query::get_remote(&shared, &wid).await
                            } else {
                                None
                            };
                            let _ = tx.send(Box::new(ServerMsg::Workers { req, workers: w.into_iter().collect() })).await;
                        }.in_current_span());
                    }
                    Some(Ok(m)) => {
                        if let Some(answer) = handle(m, id, conn_id, shared) {
                            link.send(&answer).await?;
                        }
                    }
                    Some(Err(ReadEnd::Malformed(e))) => {
                        inc(&shared.metrics.decode_errors);
                        warn!("malformed frame: {e}");
                        link.refuse(ErrorCode::Malformed, format!("malformed frame: {e}")).await;
                        return Err(format!("malformed frame: {e}"));
                    }
                    // An agent shutting down closes with DONE: as good as
                    // a goodbye (its Bye may still have been in flight).
                    Some(Err(ReadEnd::Closed(e))) => return if link.shut_down() { Ok(true) } else { Err(e) },
                    None => return Ok(false),
                }
            },
            out = rx.recv() => match out {
                Some(m) => link.send(&m).await?,
                None => return Ok(false),
            },
            _ = check.tick() => {
                let Some(now) = link.rebinding_addr() else { continue };
                let changed = shared.registry.lock().expect("not poisoned").update_observed(id, conn_id, now);
                if changed {
                    inc(&shared.metrics.address_changes);
                    info!(observed = %now, "address changed (NAT rebinding)");
                    shared.hub.publish(crate::registry::Event {
                        kind: crate::registry::EventKind::AddressChanged,
                        worker: id.to_string(),
                        observed: Some(now),
                    });
                    link.send(&ServerMsg::AddressChanged { observed: now }).await?;
                }
            }
            e = link.closed() => return if link.shut_down() { Ok(true) } else { Err(e) },
        }
    }
}

/// Handles one message; returns the direct answer, if any.
fn handle(msg: ClientMsg, id: &str, conn_id: u64, shared: &Arc<Shared>) -> Option<ServerMsg> {
    match msg {
        ClientMsg::Hello(_) => Some(ServerMsg::Error {
            req: None,
            code: ErrorCode::BadRequest,
            message: "already registered".into(),
        }),
        ClientMsg::Ping { req } => Some(ServerMsg::Pong { req }),
        ClientMsg::Candidates { local } => {
            if local.len() <= punch_protocol::signal::MAX_CANDIDATES {
                shared
                    .registry
                    .lock()
                    .expect("not poisoned")
                    .update_local(id, conn_id, local);
            }
            None
        }
        ClientMsg::Outcome(o) => {
            let m = &shared.metrics;
            inc(match o.path {
                PathKind::Direct => &m.outcome_direct,
                PathKind::Relayed => &m.outcome_relayed,
                PathKind::Failed => &m.outcome_failed,
            });
            if o.path == PathKind::Direct && o.via_mapped {
                inc(&m.direct_via_mapped);
            }
            let pair = m
                .nat_pairs
                .lock()
                .expect("not poisoned")
                .outcome(o.session, o.path);
            if let Some((pair, target)) = &pair {
                if o.path != PathKind::Failed {
                    m.connect_time.0.observe(o.connect_ms as f64 / 1e3);
                }
                m.record(crate::metrics::RecentConnect {
                    at: SystemTime::now(),
                    session: o.session,
                    requester: id.to_string(),
                    target: target.clone(),
                    path: o.path.as_str(),
                    connect_ms: o.connect_ms,
                    nat_pair: pair.clone(),
                    strategy: None,
                    relay_reason: None,
                });
            }
            info!(session = %o.session, path = o.path.as_str(), connect_ms = o.connect_ms, via_mapped = o.via_mapped, nat_pair = pair.as_ref().map(|p| p.0.as_str()).unwrap_or("-"), "outcome");
            None
        }
        ClientMsg::Allocator(a) => {
            if a.plausible() {
                info!(allocator = ?a, "port allocator reported");
                shared
                    .registry
                    .lock()
                    .expect("not poisoned")
                    .update_allocator(id, conn_id, a);
            } else {
                debug!(allocator = ?a, "implausible port allocator ignored");
            }
            None
        }
        ClientMsg::OutcomeDetail {
            session,
            strategy,
            relay_reason,
        } => {
            let ok = |n: &Option<String>| {
                n.as_deref()
                    .is_none_or(|n| punch_protocol::signal::validate_detail(n).is_ok())
            };
            if ok(&strategy) && ok(&relay_reason) {
                shared.metrics.detail(session, id, strategy, relay_reason);
            } else {
                debug!(%session, "malformed outcome detail ignored");
            }
            None
        }
        ClientMsg::Nat(nat) => {
            info!(nat = %nat.label(), mapping = nat.mapping.as_str(), filtering = nat.filtering.as_str(), "NAT class reported");
            shared
                .registry
                .lock()
                .expect("not poisoned")
                .update_nat(id, conn_id, nat);
            None
        }
        ClientMsg::Connect { req, target } => {
            inc(&shared.metrics.connect_requests);
            introduce(req, id, &target, shared)
        }
        ClientMsg::Query { req, query } => Some(query_answer(req, query, shared)),
        // Handled by the session loop.
        ClientMsg::Bye => None,
    }
}

/// `List` and `Discover`: this server's workers, and in cluster mode the
/// other servers' too.
async fn cluster_query(shared: &Shared, req: u32, query: Query) -> ServerMsg {
    let bad = |message: String| ServerMsg::Error {
        req: Some(req),
        code: ErrorCode::BadRequest,
        message,
    };
    let workers = match query {
        Query::List { kind, tag } => {
            for (what, v) in [("type", &kind), ("tag", &tag)] {
                if let Some(v) = v {
                    if let Err(e) = validate_name(what, v) {
                        return bad(e);
                    }
                }
            }
            crate::query::list(shared, kind.as_deref(), tag.as_deref(), MAX_LIST).await
        }
        Query::Discover { kind } => {
            if let Err(e) = validate_name("type", &kind) {
                return bad(e);
            }
            crate::query::discover(shared, &kind)
                .await
                .into_iter()
                .collect()
        }
        _ => return bad("not a listing".into()),
    };
    ServerMsg::Workers { req, workers }
}

/// Answers the registry queries that need no waiting.
fn query_answer(req: u32, query: Query, shared: &Arc<Shared>) -> ServerMsg {
    let bad = |message: String| ServerMsg::Error {
        req: Some(req),
        code: ErrorCode::BadRequest,
        message,
    };
    let reg = shared.registry.lock().expect("not poisoned");
    let workers = match query {
        Query::Get { id } => reg.get(&id).into_iter().collect(),
        Query::List { .. } | Query::Discover { .. } | Query::Wait { .. } => {
            return bad("answered by the session".into())
        }
    };
    ServerMsg::Workers { req, workers }
}

fn introduce(req: u32, id: &str, target: &str, shared: &Arc<Shared>) -> Option<ServerMsg> {
    let reg = shared.registry.lock().expect("not poisoned");
    let intro = match reg.introduce(id, target) {
        Ok(i) => i,
        Err(code) => {
            inc(&shared.metrics.connect_errors);
            let message = match code {
                ErrorCode::UnknownWorker => format!("no worker named {target:?} has registered"),
                ErrorCode::WorkerOffline => format!("worker {target:?} is offline"),
                ErrorCode::SelfConnect => "cannot connect to yourself".to_string(),
                _ => "internal error".to_string(),
            };
            info!(%target, code = code.as_str(), "connect refused");
            return Some(ServerMsg::Error {
                req: Some(req),
                code,
                message,
            });
        }
    };
    let pairing = Pairing::fresh(&mut rand::thread_rng());
    let (session, secret) = (pairing.session, pairing.secret);
    // Counted against the requester's share of the table: one agent
    // connecting in a loop cannot leave others' offers without a relay.
    let relay = shared.relay.as_ref().is_some_and(|t| {
        match t.lock().expect("not poisoned").insert_owned(
            session,
            secret,
            id,
            std::time::Instant::now(),
        ) {
            Ok(evicted) => {
                if let Some(old) = evicted {
                    debug!(%old, "relay share full: dropped the oldest unused session");
                }
                true
            }
            Err(e) => {
                info!(%target, "offer without a relay: {e}");
                false
            }
        }
    });
    let policy = shared.config.candidates;
    let requester = card(id, intro.requester, intro.requester_key);
    let target_card = card(target, intro.target, intro.target_key);
    let to_target = Recipient {
        role: Role::Controlled,
        req: None,
        seen: intro.target.observed.ip(),
    };
    let to_target = counted(shared, pairing.offer(to_target, &requester, relay, policy));
    let to_requester = Recipient {
        role: Role::Controlling,
        req: Some(req),
        seen: intro.requester.observed.ip(),
    };
    let to_requester = counted(
        shared,
        pairing.offer(to_requester, &target_card, relay, policy),
    );
    let pair = crate::metrics::pair_label(intro.requester.nat, intro.target.nat);
    if intro
        .target
        .handle
        .tx
        .try_send(Box::new(ServerMsg::Offer(to_target)))
        .is_err()
    {
        inc(&shared.metrics.dropped_messages);
        warn!(%target, "target's queue is full; offer dropped");
        return Some(ServerMsg::Error {
            req: Some(req),
            code: ErrorCode::RateLimited,
            message: format!("worker {target:?} is not keeping up"),
        });
    }
    inc(&shared.metrics.introductions);
    info!(%target, %session, nat_pair = %pair, "introduced");
    shared
        .metrics
        .nat_pairs
        .lock()
        .expect("not poisoned")
        .introduced(session, pair, target.to_string());
    Some(ServerMsg::Offer(to_requester))
}

#[cfg(test)]
mod tests {
    use super::Bucket;
    use std::time::{Duration, Instant};

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2, 3, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        // Half a second at 2/s: one more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(t1));
        assert!(!b.take(t1));
        // A long pause saves up no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(t2)));
        assert!(!b.take(t2));
        // Rate 0: no limit.
        let mut open = Bucket::new(0, 0, t0);
        assert!((0..1000).all(|_| open.take(t0)));
    }
}
