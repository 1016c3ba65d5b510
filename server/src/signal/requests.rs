//! What the server answers to a registered agent's messages: pings,
//! candidate updates, outcome reports, queries and connect requests.

use super::*;

/// Handles one message; returns the direct answer, if any.
pub(super) fn handle(
    msg: ClientMsg,
    id: &str,
    conn_id: u64,
    shared: &Arc<Shared>,
) -> Option<ServerMsg> {
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
                    m.connect_time.observe(o.path, o.connect_ms as f64 / 1e3);
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
pub(super) async fn cluster_query(shared: &Shared, req: u32, query: Query) -> ServerMsg {
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
