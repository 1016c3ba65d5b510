//! Cluster mode: several servers share one registry through Redis
//! (`--registry redis://HOST:PORT`).
//!
//! Every server still holds its own agents in memory, as a single server
//! does, and mirrors them to Redis:
//!
//! ```text
//! punch:worker:{id}   "{server id}\n{WorkerInfo as JSON}"   TTL, refreshed while online
//! punch:keys          hash: worker id -> key (hex)          one binding cluster-wide
//! punch:server:{sid}  JSON {udp, relay, started}            TTL, refreshed
//! punch:to:{sid}      pub/sub: connect requests and answers for server sid
//! punch:events        pub/sub: registry events of every server
//! ```
//!
//! A connect request for a worker held elsewhere goes to that server as a
//! [`Bus::Connect`]; it introduces the two agents as if both were its own,
//! sends the target its offer and answers with the session, and the
//! requester's server sends the requester its offer. Relaying works across
//! servers without the agents knowing: both servers hold the session, and
//! each binds the far side to the other server's relay address, so a
//! relayed datagram goes agent -> server A -> server B -> agent, and each
//! server sees only ciphertext, as before.
//!
//! A worker's key carries the id of the server that holds it, so a server
//! refreshes only its own keys (a worker that moved is not taken back) and
//! deletes only its own. After Redis restarts empty, the next refresh
//! writes every online worker again.

use crate::hub::EventRecord;
use crate::introduce::{card, counted, Pairing, Recipient};
use crate::Shared;
pub use punch_protocol::cluster::{
    parse_worker_value, worker_key, worker_value, BadMessage, Bus, Introduced, PeerCard, Refusal,
    SharedEvent, MAX_BUS_MESSAGE,
};
use punch_protocol::signal::{
    validate_worker_id, ErrorCode, Offer, PublicKey, Role, ServerMsg, SessionId, WorkerInfo,
    WorkerState, MAX_LIST,
};
use rand::RngCore;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// How long a server waits for another to answer a connect request.
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(3);
/// Limit on one Redis command (a dead Redis must not stall agents).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Workers written per pipeline in a refresh.
const REFRESH_CHUNK: usize = 500;
const EVENTS: &str = "punch:events";
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

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT[/DB]` (or `redis+unix://`).
    pub url: String,
    /// The UDP address other servers send relayed datagrams to (this
    /// server's own port, as they reach it).
    pub advertise: SocketAddr,
    /// Life of a worker's key without a refresh; refreshed every third.
    pub ttl: Duration,
}

/// Errors of cluster mode.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--registry {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Bad(#[from] BadMessage),
    #[error("no address for other servers to relay to: give --cluster-addr")]
    NoAddress,
}

/// This host's first non-loopback address of the family: where other
/// servers reach one listening on the unspecified address.
pub fn first_host_addr(v4: bool) -> Option<std::net::IpAddr> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .map(|i| i.ip())
        .find(|ip| !ip.is_loopback() && ip.is_ipv4() == v4)
}

fn server_channel(sid: &str) -> String {
    format!("punch:to:{sid}")
}

/// Counters of cluster mode.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Redis answered the last command or subscription.
    pub up: AtomicBool,
    /// Connect requests sent to other servers.
    pub routed: AtomicU64,
    /// Connect requests answered for other servers.
    pub served: AtomicU64,
    /// Routed requests that got no answer in time.
    pub route_timeouts: AtomicU64,
    /// Failed Redis commands.
    pub redis_errors: AtomicU64,
    /// Malformed messages from the bus or worker keys.
    pub bad_messages: AtomicU64,
    /// Registry events received from other servers.
    pub remote_events: AtomicU64,
    /// Worker keys written by refreshes.
    pub refreshed: AtomicU64,
}

impl ClusterStats {
    /// Counter names, help and values, for `/metrics` and `/healthz`.
    pub fn list(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "routed",
                "Connect requests sent to other servers",
                g(&self.routed),
            ),
            (
                "served",
                "Connect requests answered for other servers",
                g(&self.served),
            ),
            (
                "route_timeouts",
                "Connect requests another server did not answer",
                g(&self.route_timeouts),
            ),
            (
                "redis_errors",
                "Failed Redis commands",
                g(&self.redis_errors),
            ),
            (
                "bad_messages",
                "Malformed cluster messages",
                g(&self.bad_messages),
            ),
            (
                "remote_events",
                "Registry events from other servers",
                g(&self.remote_events),
            ),
            (
                "refreshed",
                "Worker keys written by refreshes",
                g(&self.refreshed),
            ),
        ]
    }
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
    async fn put_worker(&self, info: &WorkerInfo) -> Result<(), ClusterError> {
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

    async fn drop_worker(&self, id: &str) -> Result<(), ClusterError> {
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

    async fn publish(&self, channel: String, body: Vec<u8>) -> Result<u64, ClusterError> {
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
    async fn refresh(&self, shared: &Shared) -> Result<usize, ClusterError> {
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
        "registered" | "address_changed" => {
            let info = shared
                .registry
                .lock()
                .expect("not poisoned")
                .get(&ev.worker);
            if let Some(info) = info.filter(|i| i.state == WorkerState::Online) {
                cluster.put_worker(&info).await?;
            }
        }
        "deregistered" | "expired" => cluster.drop_worker(&ev.worker).await?,
        _ => {}
    }
    let body = serde_json::to_vec(&SharedEvent {
        server: cluster.server_id.clone(),
        event: ev.event.to_string(),
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
        let sub = async {
            let mut ps = cluster.client.get_async_pubsub().await?;
            ps.subscribe(server_channel(&cluster.server_id)).await?;
            ps.subscribe(EVENTS).await?;
            redis::RedisResult::Ok(ps)
        };
        let mut ps = match tokio::time::timeout(COMMAND_TIMEOUT, sub).await {
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
            shared
                .hub
                .publish_record(name, e.worker, e.observed_addr, Some(e.server));
        }
        Err(e) => {
            cluster.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
            debug!("cluster event: {e}");
        }
    }
}

fn on_bus(shared: &Arc<Shared>, cluster: &Arc<Cluster>, m: Bus) {
    match m {
        Bus::Answer { corr, result } => {
            if let Some(tx) = cluster.pending.lock().expect("not poisoned").remove(&corr) {
                let _ = tx.send(result);
            }
        }
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

/// The target's server: introduces a requester held by another server to
/// one of its own workers.
fn introduce_remote(
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
    let set = match (kind, tag) {
        (Some(k), _) => kind_set(k),
        (None, Some(t)) => tag_set(t),
        (None, None) => ALL.to_string(),
    };
    match cluster.remote_from(shared, &set, None).await {
        Ok(remote) => v.extend(remote.into_iter().filter(|w| {
            kind.is_none_or(|k| w.kind.as_deref() == Some(k))
                && tag.is_none_or(|t| w.tags.iter().any(|x| x == t))
        })),
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
    match cluster
        .remote_from(shared, &kind_set(kind), Some(DISCOVER_SAMPLE))
        .await
    {
        Ok(remote) => online.extend(
            remote
                .into_iter()
                .filter(|w| w.state == WorkerState::Online && w.kind.as_deref() == Some(kind)),
        ),
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
    match cluster.lookup(id).await {
        Ok(Some((server, info))) if server != cluster.server_id => Some(info),
        Ok(_) => None,
        Err(e) => {
            debug!("cluster lookup of {id:?}: {e}");
            None
        }
    }
}
