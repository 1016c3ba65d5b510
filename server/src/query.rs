//! Queries about workers (list, discover, get): this server's registry,
//! and in cluster mode the other servers' workers through Redis.

use crate::Shared;
use punch_protocol::signal::{WorkerInfo, WorkerState};
use tracing::debug;

/// Online and stale workers of a type and with a tag (when given), sorted
/// by id, at most `limit`: this server's own, and in cluster mode those of
/// the others (when Redis answers).
pub async fn list(
    shared: &Shared,
    kind: Option<&str>,
    tag: Option<&str>,
    limit: usize,
) -> Vec<WorkerInfo> {
    let mut v = shared
        .registry
        .lock()
        .expect("not poisoned")
        .list(kind, tag, limit);
    let Some(cluster) = &shared.cluster else {
        return v;
    };
    match cluster.remote_workers(shared, kind, tag).await {
        Ok(remote) => v.extend(remote),
        Err(e) => debug!("cluster listing: {e}"),
    }
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v.dedup_by(|a, b| a.id == b.id);
    v.truncate(limit);
    v
}

/// A random online worker of a type, here or (in cluster mode) at another
/// server.
pub async fn discover(shared: &Shared, kind: &str) -> Option<WorkerInfo> {
    let pick = |n: usize| rand::Rng::gen_range(&mut rand::thread_rng(), 0..n);
    let Some(cluster) = &shared.cluster else {
        return shared
            .registry
            .lock()
            .expect("not poisoned")
            .discover(kind, pick);
    };
    let mut online: Vec<WorkerInfo> = shared
        .registry
        .lock()
        .expect("not poisoned")
        .list(Some(kind), None, usize::MAX)
        .into_iter()
        .filter(|w| w.state == WorkerState::Online)
        .collect();
    match cluster.remote_sample(shared, kind).await {
        Ok(remote) => online.extend(remote),
        Err(e) => debug!("cluster discovery: {e}"),
    }
    if online.is_empty() {
        return None;
    }
    let i = pick(online.len());
    Some(online.swap_remove(i))
}

/// A worker held by another server, for `Get` queries.
pub async fn get_remote(shared: &Shared, id: &str) -> Option<WorkerInfo> {
    let cluster = shared.cluster.as_ref()?;
    match cluster.remote_worker(id).await {
        Ok(w) => w,
        Err(e) => {
            debug!("cluster lookup of {id:?}: {e}");
            None
        }
    }
}
