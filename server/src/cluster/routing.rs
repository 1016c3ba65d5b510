//! Introductions across servers: the target's server introduces a
//! requester another server holds; the requester's server routes the
//! connect and answers its agent.

use super::Cluster;
use crate::introduce::{card, counted, Pairing, Recipient};
use crate::Shared;
use punch_protocol::cluster::{Introduced, PeerCard, Refusal};
use punch_protocol::signal::{ErrorCode, Offer, Role, ServerMsg, SessionId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info};

/// The target's server: introduces a requester held by another server to
/// one of its own workers.
pub(super) fn introduce_remote(
    shared: &Shared,
    requester_relay: Option<SocketAddr>,
    requester: PeerCard,
    target: &str,
) -> Result<Introduced, Refusal> {
    let refuse = |code: ErrorCode, message: String| {
        crate::metrics::inc(&shared.metrics.connect_errors);
        Err(Refusal { code, message })
    };
    let reg = shared.registry.lock().expect("not poisoned");
    let Some((t, key)) = reg.online_with_key(target) else {
        return refuse(
            ErrorCode::WorkerOffline,
            format!("worker {target:?} is offline"),
        );
    };
    if requester.id == target {
        return refuse(ErrorCode::SelfConnect, "cannot connect to yourself".into());
    }
    let pairing = Pairing::fresh(&mut rand::thread_rng());
    let (session, secret) = (pairing.session, pairing.secret);
    // The requester's side is its server, which forwards for it.
    let relay = match (&shared.relay, requester_relay) {
        (Some(table), Some(far)) => table
            .lock()
            .expect("not poisoned")
            .insert_with_peer(
                session,
                secret,
                Role::Controlling,
                far.into(),
                Some(&requester.id),
                Instant::now(),
            )
            .is_ok(),
        _ => false,
    };
    let target_card = card(target, t, key);
    let to_target = Recipient {
        role: Role::Controlled,
        req: None,
        seen: t.observed.ip(),
    };
    let policy = shared.config.candidates;
    let offer = counted(shared, pairing.offer(to_target, &requester, relay, policy));
    if !t.handle.send(ServerMsg::Offer(offer)) {
        crate::metrics::inc(&shared.metrics.dropped_messages);
        return refuse(
            ErrorCode::RateLimited,
            format!("worker {target:?} is not keeping up"),
        );
    }
    crate::metrics::inc(&shared.metrics.introductions);
    let pair = crate::metrics::pair_label(requester.nat, t.nat);
    info!(%target, requester = %requester.id, %session, nat_pair = %pair, "introduced (for another server)");
    Ok(Introduced {
        session: session.0,
        secret,
        relay: relay.then_some(
            shared
                .cluster
                .as_ref()
                .expect("cluster mode")
                .config
                .advertise,
        ),
        target: target_card,
    })
}

/// The requester's server: a connect request for a worker not held here.
/// Answers the requester through its queue.
pub async fn connect_remote(shared: Arc<Shared>, requester: String, req: u32, target: String) {
    let cluster = shared.cluster.clone().expect("cluster mode");
    let t0 = Instant::now();
    let reply = connect_remote_inner(&shared, &cluster, &requester, req, &target).await;
    debug!(
        route_ms = t0.elapsed().as_secs_f64() * 1e3,
        ok = reply.is_ok(),
        "routed connect"
    );
    let msg = match reply {
        Ok(offer) => ServerMsg::Offer(offer),
        Err(r) => {
            crate::metrics::inc(&shared.metrics.connect_errors);
            info!(%target, code = r.code.as_str(), "connect refused: {}", r.message);
            ServerMsg::Error {
                req: Some(req),
                code: r.code,
                message: r.message,
            }
        }
    };
    let handle = shared
        .registry
        .lock()
        .expect("not poisoned")
        .online_with_key(&requester)
        .map(|(o, _)| o.handle.clone());
    if let Some(h) = handle {
        if !h.send(msg) {
            crate::metrics::inc(&shared.metrics.dropped_messages);
        }
    }
}

async fn connect_remote_inner(
    shared: &Shared,
    cluster: &Cluster,
    requester: &str,
    req: u32,
    target: &str,
) -> Result<Offer, Refusal> {
    let found = cluster.lookup(target).await.map_err(|e| Refusal {
        code: ErrorCode::Internal,
        message: format!("cluster registry unavailable: {e}"),
    })?;
    let Some((server, _)) = found else {
        return Err(Refusal {
            code: ErrorCode::UnknownWorker,
            message: format!("no worker named {target:?} has registered"),
        });
    };
    if server == cluster.server_id {
        // Our own key, but not online here: it dropped a moment ago.
        return Err(Refusal {
            code: ErrorCode::WorkerOffline,
            message: format!("worker {target:?} is offline"),
        });
    }
    let requester_card = {
        let reg = shared.registry.lock().expect("not poisoned");
        let (o, key) = reg.online_with_key(requester).ok_or(Refusal {
            code: ErrorCode::Internal,
            message: "requester is gone".into(),
        })?;
        card(requester, o, key)
    };
    let requester_seen = requester_card.seen.expect("set by card()");
    let requester_nat = requester_card.nat;
    let intro = cluster
        .route_connect(&server, requester_card, target, shared.relay.is_some())
        .await?;
    let session = SessionId(intro.session);
    let relay = match (&shared.relay, intro.relay) {
        (Some(table), Some(far)) => table
            .lock()
            .expect("not poisoned")
            .insert_with_peer(
                session,
                intro.secret,
                Role::Controlled,
                far.into(),
                Some(requester),
                Instant::now(),
            )
            .is_ok(),
        _ => false,
    };
    let pair = crate::metrics::pair_label(requester_nat, intro.target.nat);
    shared
        .metrics
        .nat_pairs
        .lock()
        .expect("not poisoned")
        .introduced(session, pair.clone(), target.to_string());
    info!(%target, %session, nat_pair = %pair, %server, "introduced (target on another server)");
    let pairing = Pairing {
        session,
        secret: intro.secret,
    };
    let to_requester = Recipient {
        role: Role::Controlling,
        req: Some(req),
        seen: requester_seen,
    };
    let policy = shared.config.candidates;
    Ok(counted(
        shared,
        pairing.offer(to_requester, &intro.target, relay, policy),
    ))
}
