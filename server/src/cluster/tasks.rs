//! The cluster's background tasks: the bus subscriber, the mirror of this
//! server's registry events, and the refresh of its workers' keys.

use super::routing::introduce_remote;
use super::store::{server_channel, COMMAND_TIMEOUT, EVENTS};
use super::{Cluster, ClusterError};
use crate::hub::EventRecord;
use crate::registry::EventKind;
use crate::Shared;
use punch_protocol::cluster::{Bus, SharedEvent};
use punch_protocol::signal::WorkerState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Starts the cluster's tasks: the bus subscriber, the mirror of local
/// registry events, and the refresh.
pub fn spawn(shared: Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(cluster) = shared.cluster.clone() else {
        return Vec::new();
    };
    info!(server_id = %cluster.server_id, url = %cluster.config.url, relay_addr = %cluster.config.advertise, "cluster mode: registry in Redis");
    let mut tasks = Vec::new();
    {
        let (shared, cluster) = (shared.clone(), cluster.clone());
        tasks.push(tokio::spawn(async move {
            subscribe_loop(&shared, &cluster).await;
        }));
    }
    {
        let (shared, cluster) = (shared.clone(), cluster.clone());
        tasks.push(tokio::spawn(async move {
            mirror_loop(&shared, &cluster).await;
        }));
    }
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(cluster.config.ttl / 3);
        let mut was_up = true;
        loop {
            tick.tick().await;
            match cluster.refresh(&shared).await {
                Ok(n) => {
                    if !was_up {
                        info!(workers = n, "redis is back; workers republished");
                    }
                    was_up = true;
                }
                Err(e) => {
                    if was_up {
                        warn!("cluster refresh failed: {e}");
                    }
                    was_up = false;
                }
            }
        }
    }));
    tasks
}

/// Mirrors this server's registry events to Redis: the worker's key and
/// the shared event stream.
async fn mirror_loop(shared: &Arc<Shared>, cluster: &Arc<Cluster>) {
    let mut rx = shared.hub.subscribe();
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                // The refresh rewrites every key; lost deletions expire.
                debug!("cluster mirror missed {n} events");
                continue;
            }
            Err(_) => return,
        };
        if ev.server.is_some() {
            continue;
        }
        let r = mirror(shared, cluster, &ev).await;
        if let Err(e) = r {
            debug!(worker = %ev.worker, "cluster mirror: {e}");
        }
    }
}

async fn mirror(shared: &Shared, cluster: &Cluster, ev: &EventRecord) -> Result<(), ClusterError> {
    match ev.event {
        EventKind::Registered | EventKind::AddressChanged => {
            let info = shared
                .registry
                .lock()
                .expect("not poisoned")
                .get(&ev.worker);
            if let Some(info) = info.filter(|i| i.state == WorkerState::Online) {
                cluster.put_worker(&info).await?;
            }
        }
        EventKind::Deregistered | EventKind::Expired => cluster.drop_worker(&ev.worker).await?,
        EventKind::Stale => {}
    }
    let body = serde_json::to_vec(&SharedEvent {
        server: cluster.server_id.clone(),
        event: ev.event.as_str().to_string(),
        worker: ev.worker.clone(),
        observed_addr: ev.observed_addr.clone(),
    })
    .expect("plain data serializes");
    cluster.publish(EVENTS.into(), body).await?;
    Ok(())
}

/// Listens on this server's channel and the event stream; reconnects
/// (and republishes this server's workers) when Redis comes back.
async fn subscribe_loop(shared: &Arc<Shared>, cluster: &Arc<Cluster>) {
    use futures_util::StreamExt;
    let mut attempt = 0u32;
    loop {
        let mut ps = match tokio::time::timeout(COMMAND_TIMEOUT, cluster.subscribe()).await {
            Ok(Ok(ps)) => ps,
            r => {
                let e = match r {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                if attempt == 0 {
                    warn!("cannot subscribe to the cluster bus: {e}; retrying");
                }
                cluster.stats.up.store(false, Ordering::Relaxed);
                attempt = attempt.saturating_add(1);
                let delay = Duration::from_millis(250u64 << attempt.min(4));
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if attempt > 0 {
            info!("cluster bus subscribed again");
            if let Err(e) = cluster.refresh(shared).await {
                warn!("republishing workers: {e}");
            }
        }
        cluster.stats.up.store(true, Ordering::Relaxed);
        let mut stream = ps.on_message();
        while let Some(msg) = stream.next().await {
            let channel = msg.get_channel_name().to_string();
            let payload = msg.get_payload_bytes();
            if channel == EVENTS {
                on_event(shared, cluster, payload);
            } else {
                match Bus::decode(payload) {
                    Ok(m) => on_bus(shared, cluster, m),
                    Err(e) => {
                        cluster.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                        warn!("cluster bus: {e}");
                    }
                }
            }
        }
        warn!("lost the cluster bus (redis gone?); reconnecting");
        cluster.stats.up.store(false, Ordering::Relaxed);
        attempt = 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn on_event(shared: &Shared, cluster: &Cluster, payload: &[u8]) {
    match SharedEvent::decode(payload) {
        Ok((e, _)) if e.server == cluster.server_id => {}
        Ok((e, name)) => {
            cluster.stats.remote_events.fetch_add(1, Ordering::Relaxed);
            // decode() checked the name against the names the hub uses.
            if let Some(kind) = EventKind::from_name(name) {
                shared
                    .hub
                    .publish_record(kind, e.worker, e.observed_addr, Some(e.server));
            }
        }
        Err(e) => {
            cluster.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
            debug!("cluster event: {e}");
        }
    }
}

fn on_bus(shared: &Arc<Shared>, cluster: &Arc<Cluster>, m: Bus) {
    match m {
        Bus::Answer { corr, result } => cluster.answered(corr, result),
        Bus::Connect {
            corr,
            from,
            relay,
            requester,
            target,
        } => {
            cluster.stats.served.fetch_add(1, Ordering::Relaxed);
            let result = introduce_remote(shared, relay, requester, &target);
            let (cluster, body) = (cluster.clone(), Bus::Answer { corr, result }.encode());
            tokio::spawn(async move {
                if let Err(e) = cluster.publish(server_channel(&from), body).await {
                    warn!("answering server {from}: {e}");
                }
            });
        }
    }
}
