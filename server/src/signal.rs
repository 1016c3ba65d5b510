//! The QUIC signaling endpoint: one task per agent connection.

use crate::metrics::inc;
use crate::registry::Online;
use crate::{ServerConfig, ServerError, Shared};
use punch_net::{canonical, read_frame, write_frame, FrameError};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{
    validate_name, ClientMsg, ErrorCode, Hello, Offer, PathKind, Query, Role, ServerMsg, SessionId,
    MAX_LIST, MAX_WAIT_MS,
};
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier, TOKEN_PROOF_LABEL};
use rand::{Rng, RngCore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

/// How the registry reaches an online agent's connection task.
#[derive(Clone, Debug)]
pub struct AgentHandle {
    tx: mpsc::Sender<ServerMsg>,
    conn: quinn::Connection,
}

/// Messages queued per agent before it counts as too slow.
const AGENT_QUEUE: usize = 64;
/// Time an agent has to complete the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server looks for NAT rebinding of its agents.
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

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

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
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
    let hello: Hello =
        match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv, MAX_FRAME)).await {
            Ok(Ok(ClientMsg::Hello(h))) => h,
            Ok(Ok(_)) => {
                inc(&shared.metrics.decode_errors);
                refuse(
                    &conn,
                    &mut send,
                    ErrorCode::BadRequest,
                    "expected Hello first".into(),
                )
                .await;
                return;
            }
            Ok(Err(FrameError::Codec(e))) => {
                inc(&shared.metrics.decode_errors);
                refuse(
                    &conn,
                    &mut send,
                    ErrorCode::Malformed,
                    format!("bad hello: {e}"),
                )
                .await;
                return;
            }
            Ok(Err(e)) => {
                debug!("control stream failed before hello: {e}");
                return;
            }
            Err(_) => {
                refuse(
                    &conn,
                    &mut send,
                    ErrorCode::BadRequest,
                    "no hello in time".into(),
                )
                .await;
                return;
            }
        };
    let id = hello.worker_id.clone();
    let span = info_span!("agent", worker = %id);
    async move {
        if hello.version != PROTOCOL_VERSION {
            inc(&shared.metrics.registration_refused);
            let msg = format!(
                "protocol version {} not supported; this server speaks {PROTOCOL_VERSION}",
                hello.version
            );
            refuse(&conn, &mut send, ErrorCode::BadVersion, msg).await;
            return;
        }
        if let Err(e) = hello.validate() {
            inc(&shared.metrics.registration_refused);
            refuse(&conn, &mut send, ErrorCode::BadRequest, e).await;
            return;
        }
        if hello.public_key != key {
            inc(&shared.metrics.registration_refused);
            refuse(
                &conn,
                &mut send,
                ErrorCode::BadRequest,
                "hello key differs from TLS key".into(),
            )
            .await;
            return;
        }
        if let Some(token) = &shared.config.token {
            let mut exporter = [0u8; 32];
            let ok = conn
                .export_keying_material(&mut exporter, TOKEN_PROOF_LABEL, b"")
                .is_ok()
                && hello.token_proof.is_some_and(|p| {
                    punch_tls::ct_eq(&p, &punch_tls::token_proof(token, &exporter))
                });
            if !ok {
                inc(&shared.metrics.auth_failures);
                let msg = if hello.token_proof.is_none() {
                    "this server requires a token (--token / PUNCH_TOKEN)"
                } else {
                    "wrong token"
                };
                refuse(&conn, &mut send, ErrorCode::BadToken, msg.into()).await;
                return;
            }
        }
        let observed = canonical(conn.remote_address());
        let (tx, mut rx) = mpsc::channel(AGENT_QUEUE);
        let online = Online {
            conn_id,
            observed,
            since: SystemTime::now(),
            local: hello.local_candidates.clone(),
            nat: None,
            handle: AgentHandle {
                tx: tx.clone(),
                conn: conn.clone(),
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
                    if let Err(e) = shared.store.put(&id, &key) {
                        // The binding still holds until a restart.
                        warn!("could not persist the id binding: {e}");
                    }
                }
                if let Some(old) = r.replaced {
                    info!("replacing previous connection {}", old.conn_id);
                    old.handle
                        .conn
                        .close(0u32.into(), b"replaced by a new connection");
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
                refuse(&conn, &mut send, code, msg).await;
                return;
            }
        }
        inc(&shared.metrics.registrations);
        info!(%observed, ephemeral = hello.ephemeral, kind = ?hello.kind, "registered");
        shared.hub.publish(crate::registry::Event {
            kind: crate::registry::EventKind::Registered,
            worker: id.clone(),
            observed: Some(observed),
        });
        let result = session_loop(
            &conn, conn_id, &id, &shared, &mut send, recv, &mut rx, tx, observed,
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
    conn: &quinn::Connection,
    conn_id: u64,
    id: &str,
    shared: &Arc<Shared>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    rx: &mut mpsc::Receiver<ServerMsg>,
    tx: mpsc::Sender<ServerMsg>,
    observed: std::net::SocketAddr,
) -> Result<bool, String> {
    write_frame(
        send,
        &ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            observed,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut check = tokio::time::interval(ADDRESS_CHECK);
    // The reader runs as its own future so a slow peer write cannot stall it.
    let (in_tx, mut in_rx) = mpsc::channel::<Result<ClientMsg, FrameError>>(16);
    let reader = async move {
        loop {
            let r = read_frame::<ClientMsg>(&mut recv, MAX_FRAME).await;
            let stop = r.is_err();
            if in_tx.send(r).await.is_err() || stop {
                break;
            }
        }
    };
    let reader = tokio::spawn(reader);
    let result = loop {
        tokio::select! {
            // Messages first: a Bye that arrived just before the connection
            // closed must count as a clean shutdown.
            biased;
            msg = in_rx.recv() => match msg {
                Some(Ok(ClientMsg::Bye)) => break Ok(true),
                Some(Ok(ClientMsg::Query { req, query: Query::Wait { id: target, timeout_ms } })) => {
                    // Answered later, from its own task, through the queue.
                    let (shared, tx) = (shared.clone(), tx.clone());
                    tokio::spawn(async move {
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
                        let _ = tx.send(answer).await;
                    }.in_current_span());
                }
                Some(Ok(m)) => {
                    if let Some(answer) = handle(m, id, conn_id, shared) {
                        if let Err(e) = write_frame(send, &answer).await {
                            break Err(e.to_string());
                        }
                    }
                }
                Some(Err(FrameError::Codec(e))) => {
                    inc(&shared.metrics.decode_errors);
                    warn!("malformed frame: {e}");
                    refuse(conn, send, ErrorCode::Malformed, format!("malformed frame: {e}")).await;
                    break Err(format!("malformed frame: {e}"));
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(false),
            },
            out = rx.recv() => match out {
                Some(m) => {
                    if let Err(e) = write_frame(send, &m).await {
                        break Err(e.to_string());
                    }
                }
                None => break Ok(false),
            },
            _ = check.tick() => {
                let now = canonical(conn.remote_address());
                let changed = shared.registry.lock().expect("not poisoned").update_observed(id, conn_id, now);
                if changed {
                    inc(&shared.metrics.address_changes);
                    info!(observed = %now, "address changed (NAT rebinding)");
                    shared.hub.publish(crate::registry::Event {
                        kind: crate::registry::EventKind::AddressChanged,
                        worker: id.to_string(),
                        observed: Some(now),
                    });
                    if let Err(e) = write_frame(send, &ServerMsg::AddressChanged { observed: now }).await {
                        break Err(e.to_string());
                    }
                }
            }
            e = conn.closed() => break Err(e.to_string()),
        }
    };
    reader.abort();
    result
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
                    requester: id.to_string(),
                    target: target.clone(),
                    path: o.path.as_str(),
                    connect_ms: o.connect_ms,
                    nat_pair: pair.clone(),
                });
            }
            info!(session = %o.session, path = o.path.as_str(), connect_ms = o.connect_ms, nat_pair = pair.as_ref().map(|p| p.0.as_str()).unwrap_or("-"), "outcome");
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

/// Answers the registry queries that need no waiting.
fn query_answer(req: u32, query: Query, shared: &Arc<Shared>) -> ServerMsg {
    let bad = |message: String| ServerMsg::Error {
        req: Some(req),
        code: ErrorCode::BadRequest,
        message,
    };
    let reg = shared.registry.lock().expect("not poisoned");
    let workers = match query {
        Query::List { kind, tag } => {
            for (what, v) in [("type", &kind), ("tag", &tag)] {
                if let Some(v) = v {
                    if let Err(e) = validate_name(what, v) {
                        return bad(e);
                    }
                }
            }
            reg.list(kind.as_deref(), tag.as_deref(), MAX_LIST)
        }
        Query::Get { id } => reg.get(&id).into_iter().collect(),
        Query::Discover { kind } => {
            if let Err(e) = validate_name("type", &kind) {
                return bad(e);
            }
            reg.discover(&kind, |n| rand::thread_rng().gen_range(0..n))
                .into_iter()
                .collect()
        }
        Query::Wait { .. } => return bad("wait is answered by the session".into()),
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
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let session = SessionId(rand::random());
    let relay = shared.relay.as_ref().is_some_and(|t| {
        t.lock()
            .expect("not poisoned")
            .insert(session, secret, std::time::Instant::now())
            .is_ok()
    });
    let to_target = Offer {
        req: None,
        session,
        secret,
        role: Role::Controlled,
        peer_id: id.to_string(),
        peer_key: intro.requester_key,
        peer_candidates: intro.requester.candidates(),
        start_in_ms: 0,
        relay,
        peer_nat: intro.requester.nat,
    };
    let to_requester = Offer {
        req: Some(req),
        session,
        secret,
        role: Role::Controlling,
        peer_id: target.to_string(),
        peer_key: intro.target_key,
        peer_candidates: intro.target.candidates(),
        start_in_ms: 0,
        relay,
        peer_nat: intro.target.nat,
    };
    let pair = crate::metrics::pair_label(intro.requester.nat, intro.target.nat);
    if intro
        .target
        .handle
        .tx
        .try_send(ServerMsg::Offer(to_target))
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
