//! A registered agent's session: its queue, the messages it sends, the
//! address checks, and how the session ends.

use super::requests::{cluster_query, handle};
use super::*;

/// Checks a hello, registers the agent and serves it until it leaves,
/// whichever transport carries it.
pub(crate) async fn serve_registered(
    mut link: impl Link,
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
            let how = if clean { "deregistered" } else { "dropped" };
            shared.metrics.departures.inc(&crate::metrics::DEPARTURES, how);
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
    link: &mut impl Link,
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
                        // Answered later, from its own task, through the queue.
                        let s = shared.clone();
                        let work = async move {
                            let limit = Duration::from_millis(timeout_ms.min(MAX_WAIT_MS) as u64);
                            Some(match s.hub.wait_online(&s, &target, limit).await {
                                Ok(w) => ServerMsg::Workers { req, workers: vec![w] },
                                Err(e) => ServerMsg::Error {
                                    req: Some(req),
                                    code: match e {
                                        crate::hub::WaitError::Timeout => ErrorCode::Timeout,
                                        _ => ErrorCode::RateLimited,
                                    },
                                    message: format!("waiting for {target:?}: {e}"),
                                },
                            })
                        };
                        if !in_slot(&slots, shared, &tx, work) {
                            link.send(&busy(req, cfg.max_queries)).await?;
                        }
                    }
                    Some(Ok(ClientMsg::Connect { req, target }))
                        if shared.cluster.is_some()
                            && target != id
                            && !shared.registry.lock().expect("not poisoned").is_online(&target) =>
                    {
                        // Perhaps held by another server: asked through Redis,
                        // answered through the queue.
                        inc(&shared.metrics.connect_requests);
                        // It answers (both sides) by itself.
                        let ask = crate::cluster::connect_remote(shared.clone(), id.to_string(), req, target);
                        if !in_slot(&slots, shared, &tx, async move { ask.await; None }) {
                            link.send(&busy(req, cfg.max_queries)).await?;
                        }
                    }
                    Some(Ok(ClientMsg::Query { req, query: q @ (Query::List { .. } | Query::Discover { .. }) })) => {
                        // In a cluster other servers' workers come from Redis:
                        // answered from a task, through the queue.
                        let s = shared.clone();
                        let work = async move { Some(cluster_query(&s, req, q).await) };
                        if !in_slot(&slots, shared, &tx, work) {
                            link.send(&busy(req, cfg.max_queries)).await?;
                        }
                    }
                    Some(Ok(ClientMsg::Query { req, query: Query::Get { id: wid } }))
                        if shared.cluster.is_some()
                            && shared.registry.lock().expect("not poisoned").get(&wid).is_none() =>
                    {
                        let s = shared.clone();
                        let work = async move {
                            let w = if validate_name("worker id", &wid).is_ok() {
                                crate::query::get_remote(&s, &wid).await
                            } else {
                                None
                            };
                            Some(ServerMsg::Workers { req, workers: w.into_iter().collect() })
                        };
                        if !in_slot(&slots, shared, &tx, work) {
                            link.send(&busy(req, cfg.max_queries)).await?;
                        }
                    }
                    Some(Ok(m)) => {
                        if let Some(answer) = handle(m, id, conn_id, shared) {
                            link.send(&answer.for_version(version)).await?;
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
                Some(m) => link.send(&m.for_version(version)).await?,
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
