//! The cluster's state in Redis: worker keys, the key bindings, the index
//! sets for listings, server keys, and the bus's publish side.

use super::{ClusterConfig, ClusterError, ClusterStats};
use crate::Shared;
use punch_protocol::cluster::{
    parse_worker_value, worker_key, worker_value, Bus, Introduced, PeerCard, Refusal,
};
use punch_protocol::signal::{
    validate_worker_id, ErrorCode, PublicKey, WorkerInfo, WorkerState, MAX_LIST,
};
use rand::RngCore;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

/// How long a server waits for another to answer a connect request.
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(3);
/// Limit on one Redis command (a dead Redis must not stall agents).
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Workers written per pipeline in a refresh.
const REFRESH_CHUNK: usize = 500;
pub(super) const EVENTS: &str = "punch:events";
const KEYS: &str = "punch:keys";
/// Index sets for `list` and `discover`: every worker id, and by type and
/// tag. Members whose worker key has gone are removed when a listing finds
/// them.
const ALL: &str = "punch:workers";
/// Most ids a listing reads from Redis.
const LIST_READ: usize = 2 * MAX_LIST;
/// Workers of a type sampled for `discover`.
const DISCOVER_SAMPLE: usize = 16;

fn kind_set(k: &str) -> String {
    format!("punch:type:{k}")
}

fn tag_set(t: &str) -> String {
    format!("punch:tag:{t}")
}

/// Adds a worker to the index sets.
fn index(p: &mut redis::Pipeline, info: &WorkerInfo) {
    p.cmd("SADD").arg(ALL).arg(&info.id).ignore();
    if let Some(k) = &info.kind {
        p.cmd("SADD").arg(kind_set(k)).arg(&info.id).ignore();
    }
    for t in &info.tags {
        p.cmd("SADD").arg(tag_set(t)).arg(&info.id).ignore();
    }
}

/// `SET` the key unless another server holds it: a refresh must not take
/// back a worker that moved, but must rewrite keys Redis lost.
const SET_IF_OURS: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";
/// `DEL` the key only when this server holds it.
const DEL_IF_OURS: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

pub(super) fn server_channel(sid: &str) -> String {
    format!("punch:to:{sid}")
}

/// This server's part of the cluster.
pub struct Cluster {
    /// This server's id (16 hex digits, new at every start).
    pub server_id: String,
    pub config: ClusterConfig,
    client: redis::Client,
    conn: ConnectionManager,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Introduced, Refusal>>>>,
    next_corr: AtomicU64,
    set_if_ours: redis::Script,
    del_if_ours: redis::Script,
    started: SystemTime,
    /// Counters.
    pub stats: ClusterStats,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("server_id", &self.server_id)
            .field("url", &self.config.url)
            .finish()
    }
}

impl Cluster {
    /// Checks the URL and prepares the connection; Redis need not be up
    /// yet (the server starts and connects when it comes).
    pub fn new(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| ClusterError::Url {
            url: config.url.clone(),
            reason: e.to_string(),
        })?;
        let mcfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), mcfg)?;
        let mut id = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut id);
        Ok(Cluster {
            server_id: hex::encode(id),
            config,
            client,
            conn,
            pending: Mutex::new(HashMap::new()),
            next_corr: AtomicU64::new(1),
            set_if_ours: redis::Script::new(SET_IF_OURS),
            del_if_ours: redis::Script::new(DEL_IF_OURS),
            started: SystemTime::now(),
            stats: ClusterStats::default(),
        })
    }

    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        let r = match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ClusterError::Redis(e)),
            Err(_) => Err(ClusterError::Timeout(COMMAND_TIMEOUT)),
        };
        match &r {
            Ok(_) => self.stats.up.store(true, Ordering::Relaxed),
            Err(_) => {
                self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                self.stats.up.store(false, Ordering::Relaxed);
            }
        }
        r
    }

    /// Binds `id` to `key` cluster-wide, or says which key holds it. Errs
    /// when Redis is down (the caller decides whether to go on).
    pub async fn bind_key(&self, id: &str, key: &PublicKey) -> Result<bool, ClusterError> {
        let mut c = self.conn.clone();
        let hexkey = hex::encode(key);
        let (set, held): (bool, String) = self
            .run(async {
                redis::pipe()
                    .cmd("HSETNX")
                    .arg(KEYS)
                    .arg(id)
                    .arg(&hexkey)
                    .cmd("HGET")
                    .arg(KEYS)
                    .arg(id)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set || held == hexkey)
    }

    /// Where `id` is registered in the cluster, if anywhere.
    pub async fn lookup(&self, id: &str) -> Result<Option<(String, WorkerInfo)>, ClusterError> {
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = self
            .run(async {
                redis::cmd("GET")
                    .arg(worker_key(id))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        match v {
            None => Ok(None),
            Some(v) => match parse_worker_value(&v) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    self.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                    Err(e.into())
                }
            },
        }
    }

    /// Writes a worker this server just registered (unconditionally: the
    /// newest registration wins).
    pub(super) async fn put_worker(&self, info: &WorkerInfo) -> Result<(), ClusterError> {
        let mut c = self.conn.clone();
        let value = worker_value(&self.server_id, info);
        let ttl = self.config.ttl.as_millis() as u64;
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(worker_key(&info.id))
            .arg(value)
            .arg("PX")
            .arg(ttl)
            .ignore();
        index(&mut p, info);
        self.run(async { p.query_async::<()>(&mut c).await }).await
    }

    /// Workers held by other servers from an index set: at most
    /// [`LIST_READ`] ids, the lowest first (listings are sorted by id), or
    /// a random `sample` of them.
    async fn remote_from(
        &self,
        shared: &Shared,
        set: &str,
        sample: Option<usize>,
    ) -> Result<Vec<WorkerInfo>, ClusterError> {
        let mut c = self.conn.clone();
        let mut ids: Vec<String> = match sample {
            Some(n) => {
                self.run(async {
                    redis::cmd("SRANDMEMBER")
                        .arg(set)
                        .arg(n)
                        .query_async(&mut c)
                        .await
                })
                .await?
            }
            None => {
                self.run(async { redis::cmd("SMEMBERS").arg(set).query_async(&mut c).await })
                    .await?
            }
        };
        ids.retain(|id| validate_worker_id(id).is_ok());
        ids.sort();
        {
            let r = shared.registry.lock().expect("not poisoned");
            ids.retain(|id| r.get(id).is_none());
        }
        ids.truncate(LIST_READ);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| worker_key(id)).collect();
        let values: Vec<Option<Vec<u8>>> = self
            .run(async { redis::cmd("MGET").arg(&keys).query_async(&mut c).await })
            .await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, v) in ids.iter().zip(values) {
            match v.map(|v| parse_worker_value(&v)) {
                None => gone.push(id.clone()),
                Some(Ok((server, info))) if server != self.server_id && info.id == *id => {
                    out.push(info)
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    self.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !gone.is_empty() {
            // Index entries of workers whose key expired.
            let _ = self
                .run(async {
                    redis::cmd("SREM")
                        .arg(set)
                        .arg(&gone)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        }
        Ok(out)
    }

    /// Workers held by other servers, of a type and with a tag when given
    /// (checked again here: an index set can hold a worker that changed).
    pub async fn remote_workers(
        &self,
        shared: &Shared,
        kind: Option<&str>,
        tag: Option<&str>,
    ) -> Result<Vec<WorkerInfo>, ClusterError> {
        let set = match (kind, tag) {
            (Some(k), _) => kind_set(k),
            (None, Some(t)) => tag_set(t),
            (None, None) => ALL.to_string(),
        };
        let mut v = self.remote_from(shared, &set, None).await?;
        v.retain(|w| {
            kind.is_none_or(|k| w.kind.as_deref() == Some(k))
                && tag.is_none_or(|t| w.tags.iter().any(|x| x == t))
        });
        Ok(v)
    }

    /// A random few online workers of a type held by other servers.
    pub async fn remote_sample(
        &self,
        shared: &Shared,
        kind: &str,
    ) -> Result<Vec<WorkerInfo>, ClusterError> {
        let mut v = self
            .remote_from(shared, &kind_set(kind), Some(DISCOVER_SAMPLE))
            .await?;
        v.retain(|w| w.state == WorkerState::Online && w.kind.as_deref() == Some(kind));
        Ok(v)
    }

    /// `id`, when another server holds it.
    pub async fn remote_worker(&self, id: &str) -> Result<Option<WorkerInfo>, ClusterError> {
        Ok(match self.lookup(id).await? {
            Some((server, info)) if server != self.server_id => Some(info),
            _ => None,
        })
    }

    pub(super) async fn drop_worker(&self, id: &str) -> Result<(), ClusterError> {
        let mut c = self.conn.clone();
        self.run(async {
            self.del_if_ours
                .key(worker_key(id))
                .arg(&self.server_id)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn publish(
        &self,
        channel: String,
        body: Vec<u8>,
    ) -> Result<u64, ClusterError> {
        let mut c = self.conn.clone();
        self.run(async {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(body)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Rewrites every online worker of this server (and the server's own
    /// key), keeping workers that moved elsewhere untouched.
    pub(super) async fn refresh(&self, shared: &Shared) -> Result<usize, ClusterError> {
        let infos: Vec<WorkerInfo> = {
            let r = shared.registry.lock().expect("not poisoned");
            r.list(None, None, usize::MAX)
                .into_iter()
                .filter(|w| w.state == WorkerState::Online)
                .collect()
        };
        let ttl = self.config.ttl.as_millis() as u64;
        let mut c = self.conn.clone();
        let me = serde_json::json!({
            "udp": self.config.advertise.to_string(),
            "relay": shared.relay.is_some(),
            "started": humantime::format_rfc3339_seconds(self.started).to_string(),
            "agents": infos.len(),
        })
        .to_string();
        // Loads the script too: after a Redis restart its cache is empty.
        self.run(async {
            redis::pipe()
                .cmd("SET")
                .arg(format!("punch:server:{}", self.server_id))
                .arg(me)
                .arg("PX")
                .arg(ttl)
                .ignore()
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(SET_IF_OURS)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        let mut written = 0;
        for chunk in infos.chunks(REFRESH_CHUNK) {
            let mut p = redis::pipe();
            for info in chunk {
                p.cmd("EVALSHA")
                    .arg(self.set_if_ours.get_hash())
                    .arg(1)
                    .arg(worker_key(&info.id))
                    .arg(&self.server_id)
                    .arg(worker_value(&self.server_id, info))
                    .arg(ttl);
                index(&mut p, info);
            }
            let done: Vec<i64> = self.run(async { p.query_async(&mut c).await }).await?;
            written += done.iter().filter(|d| **d == 1).count();
        }
        self.stats
            .refreshed
            .fetch_add(written as u64, Ordering::Relaxed);
        Ok(written)
    }

    /// Subscribes to this server's channel and the event stream.
    pub(super) async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut ps = self.client.get_async_pubsub().await?;
        ps.subscribe(server_channel(&self.server_id)).await?;
        ps.subscribe(EVENTS).await?;
        Ok(ps)
    }

    /// Hands another server's answer to the request waiting for it.
    pub(super) fn answered(&self, corr: u64, result: Result<Introduced, Refusal>) {
        if let Some(tx) = self.pending.lock().expect("not poisoned").remove(&corr) {
            let _ = tx.send(result);
        }
    }

    /// Asks the server holding `target` to introduce `requester` to it.
    pub async fn route_connect(
        &self,
        server: &str,
        requester: PeerCard,
        target: &str,
        relay: bool,
    ) -> Result<Introduced, Refusal> {
        let corr = self.next_corr.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("not poisoned").insert(corr, tx);
        let _forget = Forget(self, corr);
        let msg = Bus::Connect {
            corr,
            from: self.server_id.clone(),
            relay: relay.then_some(self.config.advertise),
            requester,
            target: target.to_string(),
        };
        self.stats.routed.fetch_add(1, Ordering::Relaxed);
        let offline = |why: &str| Refusal {
            code: ErrorCode::WorkerOffline,
            message: format!("worker {target:?} is offline ({why})"),
        };
        match self.publish(server_channel(server), msg.encode()).await {
            Ok(0) => return Err(offline("its server has left the cluster")),
            Ok(_) => {}
            Err(e) => {
                return Err(Refusal {
                    code: ErrorCode::Internal,
                    message: format!("cluster registry unavailable: {e}"),
                })
            }
        }
        match tokio::time::timeout(ROUTE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            _ => {
                self.stats.route_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(offline("its server did not answer"))
            }
        }
    }
}

/// Removes a pending request however its wait ends.
struct Forget<'a>(&'a Cluster, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().expect("not poisoned").remove(&self.1);
    }
}
