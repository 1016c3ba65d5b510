//! Cluster mode: two `punch-server` processes sharing one real
//! `redis-server` (`--registry redis://…`). A requester on one server
//! reaches a worker on the other (directly and through both relays); when a
//! server dies its agents move to the other; when Redis restarts empty the
//! servers republish their agents.

use punch_agent::{Agent, AgentConfig, AgentError, PathKind, RelayMode};
use punch_lab::harness::{RedisProc, ServerProc};
use std::path::Path;
use std::time::{Duration, Instant};

/// Starts two servers on one Redis; the second gets the first's key, as
/// servers of one cluster share a key (agents pin one fingerprint).
fn two_servers(dir: &Path, redis: &RedisProc) -> (ServerProc, ServerProc) {
    let url = redis.url();
    let extra = ["--registry", url.as_str(), "--cluster-ttl", "6"];
    let da = dir.join("a");
    let db = dir.join("b");
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(db.join("server")).unwrap();
    let a = ServerProc::start(&da, &extra).unwrap();
    std::fs::copy(da.join("server/server.key"), db.join("server/server.key")).unwrap();
    let b = ServerProc::start(&db, &extra).unwrap();
    assert_eq!(a.fingerprint, b.fingerprint);
    (a, b)
}

async fn agent(server: String, fp: &str, id: &str, dir: &Path, relay: RelayMode) -> Agent {
    let mut cfg = AgentConfig::new(server, fp.to_string());
    cfg.worker_id = Some(id.into());
    cfg.key_file = Some(dir.join(format!("{id}.key")));
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.nat_check = false;
    cfg.relay = relay;
    cfg.kind = Some("svc".into());
    cfg.tags = vec![format!("tag-{id}")];
    let a = Agent::start(cfg).await.unwrap();
    a.registered(Duration::from_secs(10)).await.unwrap();
    a
}

fn echo(a: &Agent) {
    let a = a.clone();
    tokio::spawn(async move {
        while let Some(pc) = a.accept().await {
            tokio::spawn(pc.serve());
        }
    });
}

fn health(s: &ServerProc) -> serde_json::Value {
    serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap()
}

/// Connects until it works or `limit` passes; the last error otherwise.
async fn connect_within(
    a: &Agent,
    target: &str,
    limit: Duration,
) -> Result<punch_agent::PeerConnection, String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = match tokio::time::timeout(left, a.connect(target)).await {
            Ok(Ok(pc)) => return Ok(pc),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("{target} not reachable within {limit:?}: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn skip() -> bool {
    let missing = if RedisProc::available() {
        Vec::new()
    } else {
        vec!["`redis-server` (apt-get install redis-server)".to_string()]
    };
    !punch_lab::harness::ready("the cluster tests", &missing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_on_one_server_reaches_worker_on_another() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisProc::start(dir.path(), 0).unwrap();
    let (a, b) = two_servers(dir.path(), &redis);
    let fp = a.fingerprint.clone();

    let w = agent(b.udp.to_string(), &fp, "gpu-1", dir.path(), RelayMode::Auto).await;
    echo(&w);
    let r = agent(a.udp.to_string(), &fp, "req", dir.path(), RelayMode::Auto).await;

    // Found through the other server's registry, waited for and connected.
    let info = r.wait_for("gpu-1", Duration::from_secs(5)).await.unwrap();
    assert_eq!(info.id, "gpu-1");
    // Listed and discovered across the cluster, by type and by tag.
    let ids = |v: Vec<punch_protocol::signal::WorkerInfo>| {
        v.into_iter().map(|w| w.id).collect::<Vec<_>>()
    };
    assert_eq!(ids(r.list(None, None).await.unwrap()), ["gpu-1", "req"]);
    assert_eq!(
        ids(r.list(None, Some("tag-gpu-1")).await.unwrap()),
        ["gpu-1"]
    );
    assert_eq!(
        ids(w.list(Some("svc"), None).await.unwrap()),
        ["gpu-1", "req"]
    );
    let found = r.discover("svc").await.unwrap().unwrap();
    assert!(["gpu-1", "req"].contains(&found.id.as_str()), "{found:?}");
    let http = a.http_get("/api/v1/workers?type=svc").unwrap();
    assert!(http.contains("gpu-1") && http.contains("req"), "{http}");
    assert!(a
        .http_get("/api/v1/workers/gpu-1")
        .unwrap()
        .contains("gpu-1"));
    let pc = r.connect("gpu-1").await.unwrap();
    assert_eq!(pc.path.kind, PathKind::Direct, "{:?}", pc.path);
    assert_eq!(pc.peer_id, "gpu-1");
    let rtt = pc.pinger().await.unwrap().ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");

    // Relayed: agent -> server A -> server B -> agent, end to end encrypted.
    let rr = agent(
        a.udp.to_string(),
        &fp,
        "req-relay",
        dir.path(),
        RelayMode::Force,
    )
    .await;
    let pc = rr.connect("gpu-1").await.unwrap();
    assert_eq!(pc.path.kind, PathKind::Relayed, "{:?}", pc.path);
    let mut p = pc.pinger().await.unwrap();
    for _ in 0..5 {
        p.ping().await.unwrap();
    }
    let (ha, hb) = (health(&a), health(&b));
    assert!(ha["cluster"]["routed"].as_u64().unwrap() >= 2, "{ha}");
    assert!(hb["cluster"]["served"].as_u64().unwrap() >= 2, "{hb}");
    assert_eq!(ha["cluster"]["redis_up"], true, "{ha}");
    for h in [&ha, &hb] {
        assert!(
            h["relay"]["forwarded_packets"].as_u64().unwrap() >= 10,
            "both servers carry the relayed session: {h}"
        );
    }

    // Unknown ids are refused as such, across the cluster.
    match r.connect("nobody").await {
        Err(AgentError::UnknownWorker(_)) => {}
        other => panic!("expected unknown worker, got {:?}", other.map(|p| p.path)),
    }

    // An id is bound to one key cluster-wide: another key cannot take
    // gpu-1 through server A.
    let mut cfg = AgentConfig::new(a.udp.to_string(), fp.clone());
    cfg.worker_id = Some("gpu-1".into());
    cfg.key_file = Some(dir.path().join("other.key"));
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.nat_check = false;
    let thief = Agent::start(cfg).await.unwrap();
    let e = thief
        .registered(Duration::from_secs(10))
        .await
        .expect_err("a second key must not register gpu-1");
    assert!(e.to_string().contains("another key"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_dead_server_move_to_another_and_are_reachable_within_10s() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisProc::start(dir.path(), 0).unwrap();
    let (mut a, b) = two_servers(dir.path(), &redis);
    let fp = a.fingerprint.clone();
    // The worker knows both servers and starts on the first, A.
    let list = format!("{},{}", a.udp, b.udp);
    let w = agent(list, &fp, "svc", dir.path(), RelayMode::Auto).await;
    echo(&w);
    assert_eq!(w.current_server(), a.udp.to_string());
    let r = agent(
        b.udp.to_string(),
        &fp,
        "client",
        dir.path(),
        RelayMode::Auto,
    )
    .await;
    r.connect("svc").await.unwrap();

    a.proc.kill();
    let killed = Instant::now();
    {
        let mut rx = w.watch_status();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let st = format!("{:?}", *rx.borrow_and_update());
                eprintln!("{:?} svc: {st}", killed.elapsed());
            }
        });
    }
    let pc = connect_within(&r, "svc", Duration::from_secs(10))
        .await
        .unwrap();
    let took = killed.elapsed();
    eprintln!("svc reachable again {took:?} after its server was killed");
    assert_eq!(w.current_server(), b.udp.to_string());
    pc.pinger().await.unwrap().ping().await.unwrap();
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_reconnect_and_republish_after_redis_restarts_empty() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisProc::start(dir.path(), 0).unwrap();
    let (a, b) = two_servers(dir.path(), &redis);
    let fp = a.fingerprint.clone();
    let w = agent(b.udp.to_string(), &fp, "db-1", dir.path(), RelayMode::Auto).await;
    echo(&w);
    let r = agent(a.udp.to_string(), &fp, "app", dir.path(), RelayMode::Auto).await;
    r.connect("db-1").await.unwrap();

    let port = redis.port;
    redis.proc.kill();
    // While Redis is down, a cross-server connect fails cleanly.
    let e = r.connect("db-1").await.map(|p| p.path);
    assert!(e.is_err(), "{e:?}");
    let _redis = RedisProc::start(dir.path(), port).unwrap();
    let restarted = Instant::now();
    let pc = connect_within(&r, "db-1", Duration::from_secs(15))
        .await
        .unwrap();
    eprintln!(
        "db-1 reachable {:?} after Redis came back empty",
        restarted.elapsed()
    );
    pc.pinger().await.unwrap().ping().await.unwrap();
    let hb = health(&b);
    assert_eq!(hb["cluster"]["redis_up"], true, "{hb}");
    assert!(hb["cluster"]["redis_errors"].as_u64().unwrap() >= 1, "{hb}");
}
