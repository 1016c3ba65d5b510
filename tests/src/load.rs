//! `punch-lab load`: many simulated agents (real QUIC signaling connections
//! with keep-alive, a few hundred per UDP socket) registered with one
//! `punch-server` process, connect requests between them at a fixed rate,
//! and what the server needs to hold them. Loopback only, bounded in count
//! and time.

use crate::harness::{bin, Proc};
use anyhow::{bail, Context, Result};
use punch_net::{read_frame, write_frame};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{ClientMsg, Hello, ServerMsg};
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub agents_requested: usize,
    pub agents_held: usize,
    pub registration_secs: f64,
    pub registrations_per_sec: f64,
    pub connects_sent: u64,
    pub offers_received: u64,
    pub connect_errors: u64,
    pub offer_p50_ms: Option<f64>,
    pub offer_p99_ms: Option<f64>,
    pub server_rss_mib: f64,
    pub server_rss_idle_mib: f64,
    pub server_bytes_per_agent: f64,
    pub server_cpu_pct_while_connecting: f64,
}

/// Resident memory and CPU ticks of a process, from /proc.
pub(crate) fn proc_stats(pid: u32) -> (f64, u64) {
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (rss_kib / 1024.0, ticks)
}

struct SimAgent {
    /// The agent's number: its id is `load-{i}`, its requests are keyed
    /// by it (agents that failed to register leave gaps).
    i: usize,
    tx: mpsc::Sender<ClientMsg>,
    _conn: quinn::Connection,
}

type Pending = Arc<Mutex<HashMap<(usize, u32), Instant>>>;

/// Starts a `punch-server` for the load with its data in `data`.
/// A `punch-server` started for a load or chaos run.
pub(crate) struct SimServer {
    pub proc: Proc,
    pub udp: SocketAddr,
    /// The HTTP API, when asked for.
    pub http: Option<SocketAddr>,
    pub fp: String,
}

/// Starts `punch-server` on `listen` (its HTTP API on a free port when
/// `http`) for many agents, and waits for its listening line.
pub(crate) fn start_server(
    data: &std::path::Path,
    listen: &str,
    http: bool,
    extra: &[&str],
) -> Result<SimServer> {
    std::fs::create_dir_all(data)?;
    let mut cmd = std::process::Command::new(bin("punch-server")?);
    cmd.args(["--listen", listen])
        .args(if http {
            ["--http", "127.0.0.1:0"].as_slice()
        } else {
            ["--no-http"].as_slice()
        })
        .args([
            "--idle-timeout",
            "60",
            "--max-workers",
            "200000",
            "--data-dir",
        ])
        .arg(data)
        .args(extra)
        .env("PUNCH_LOG", "warn");
    crate::harness::clear_agent_env(&mut cmd);
    let mut proc = Proc::spawn("punch-server", cmd, Some(&data.join("server.log")))?;
    let line = proc.wait_line("punch-server udp=", Duration::from_secs(20))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
            .with_context(|| format!("no {k} in {line:?}"))
    };
    Ok(SimServer {
        udp: field("udp=")?.parse()?,
        http: if http {
            Some(field("http=")?.parse()?)
        } else {
            None
        },
        fp: field("fingerprint=")?,
        proc,
    })
}

/// One simulated agent's registration: a signaling connection (keep-alive
/// every 5 s, `idle` timeout), its Hello as `worker_id` of `kind`, and the
/// welcome, each step within `wait`.
pub(crate) async fn sim_register(
    ep: &quinn::Endpoint,
    server: SocketAddr,
    fp: &str,
    id: &Identity,
    (worker_id, kind): (String, &str),
    idle: Duration,
    wait: Duration,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let mut cfg = punch_tls::client_config(
        id,
        KeyVerifier::new(Expect::Fingerprint(fp.to_string())),
        ALPN_SIGNAL,
    )?;
    cfg.transport_config(Arc::new(punch_net::signal_transport(
        Some(SIM_KEEP_ALIVE),
        idle,
    )));
    let conn = tokio::time::timeout(wait, ep.connect_with(cfg, server, "punch")?)
        .await
        .context("handshake timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        worker_id,
        public_key: id.public_key(),
        token_proof: None,
        ephemeral: true,
        local_candidates: vec![],
        metadata: vec![],
        kind: Some(kind.into()),
        tags: vec![],
    };
    write_frame(&mut send, &ClientMsg::Hello(hello)).await?;
    match tokio::time::timeout(wait, read_frame::<ServerMsg>(&mut recv, MAX_FRAME)).await {
        Ok(Ok(ServerMsg::Welcome { .. })) => Ok((conn, send, recv)),
        other => bail!("no welcome: {other:?}"),
    }
}

/// Simulated agents' keep-alive: `punch-agent`'s default.
pub(crate) const SIM_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Summed resident memory (MiB) and CPU ticks of several processes.
fn procs_stats(pids: &[u32]) -> (f64, u64) {
    pids.iter()
        .map(|p| proc_stats(*p))
        .fold((0.0, 0), |(r, t), (r2, t2)| (r + r2, t + t2))
}

/// Runs the load: `agents` agents, then connects at `rate` per second for
/// `seconds`. With `cluster`, two servers share a `redis-server` started
/// for the run, agents alternate between them, and about half the
/// connects cross servers; memory and CPU are the two servers' sums.
pub async fn run(agents: usize, rate: u32, seconds: u64, cluster: bool) -> Result<LoadReport> {
    if !(2..=100_000).contains(&agents) {
        bail!("--agents must be between 2 and 100000");
    }
    if rate > 50_000 || seconds == 0 || seconds > 600 {
        bail!("--connects-per-sec at most 50000, --seconds 1 to 600");
    }
    let dir = tempfile::tempdir()?;
    let mut servers = Vec::new();
    let mut _redis = None;
    if cluster {
        if !crate::harness::RedisProc::available() {
            bail!("--cluster needs redis-server (apt-get install redis-server)");
        }
        let redis = crate::harness::RedisProc::start(dir.path(), 0)?;
        let url = redis.url();
        _redis = Some(redis);
        let extra = ["--registry", url.as_str()];
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        servers.push(start_server(&a, "127.0.0.1:0", false, &extra)?);
        std::fs::create_dir_all(&b)?;
        std::fs::copy(a.join("server.key"), b.join("server.key"))?;
        servers.push(start_server(&b, "127.0.0.1:0", false, &extra)?);
    } else {
        servers.push(start_server(dir.path(), "127.0.0.1:0", false, &[])?);
    }
    let fp = servers[0].fp.clone();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.udp).collect();
    let pids: Vec<u32> = servers.iter().map(|s| s.proc.pid()).collect();
    let (rss_idle, _) = procs_stats(&pids);

    // A socket per 256 agents (as many NAT mappings as a busy host has).
    let per_socket = 256;
    let mut endpoints = Vec::new();
    for _ in 0..agents.div_ceil(per_socket) {
        endpoints.push(quinn::Endpoint::client("127.0.0.1:0".parse()?)?);
    }
    let pending: Pending = Arc::default();
    let offers = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));

    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut joins = Vec::new();
    for i in 0..agents {
        let ep = endpoints[i / per_socket].clone();
        let fp = fp.clone();
        let udp = addrs[i % addrs.len()];
        let (pending, offers, errors, latencies) = (
            pending.clone(),
            offers.clone(),
            errors.clone(),
            latencies.clone(),
        );
        let permit = sem.clone().acquire_owned().await?;
        joins.push(tokio::spawn(async move {
            let r = register(i, ep, udp, &fp, pending, offers, errors, latencies).await;
            drop(permit);
            r
        }));
    }
    let mut sims = Vec::new();
    let mut failed = 0;
    for j in joins {
        match j.await? {
            Ok(s) => sims.push(s),
            Err(e) => {
                if failed == 0 {
                    eprintln!("first failed registration: {e:#}");
                }
                failed += 1
            }
        }
    }
    let registration_secs = start.elapsed().as_secs_f64();
    if sims.len() < 2 {
        bail!("only {} agents registered ({failed} failed)", sims.len());
    }
    // Let the server settle, then measure memory while holding them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_held, ticks0) = procs_stats(&pids);

    let mut sent = 0u64;
    let t0 = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = (rate as f64 / 100.0).max(0.0);
    let mut owed = 0.0;
    let mut interval = tokio::time::interval(tick);
    let mut next_req = vec![0u32; sims.len()];
    while t0.elapsed() < Duration::from_secs(seconds) {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let a = rand::random::<usize>() % sims.len();
            let mut b = rand::random::<usize>() % sims.len();
            if b == a {
                b = (b + 1) % sims.len();
            }
            next_req[a] += 1;
            let req = next_req[a];
            pending
                .lock()
                .expect("not poisoned")
                .insert((sims[a].i, req), Instant::now());
            let msg = ClientMsg::Connect {
                req,
                target: format!("load-{}", sims[b].i),
            };
            if sims[a].tx.try_send(msg).is_err() {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            sent += 1;
        }
    }
    // Answers still in flight get a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let (_, ticks1) = procs_stats(&pids);
    let hz = 100.0; // USER_HZ on Linux
    let cpu = (ticks1 - ticks0) as f64 / hz / elapsed * 100.0;
    let mut l = latencies.lock().expect("not poisoned").clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| (!l.is_empty()).then(|| l[((l.len() - 1) as f64 * p).round() as usize]);
    let held = sims.len();
    drop(sims);
    for ep in &endpoints {
        ep.close(punch_protocol::close::DONE.into(), b"load done");
    }
    for s in &mut servers {
        s.proc.kill();
    }
    Ok(LoadReport {
        agents_requested: agents,
        agents_held: held,
        registration_secs,
        registrations_per_sec: held as f64 / registration_secs,
        connects_sent: sent,
        offers_received: offers.load(std::sync::atomic::Ordering::Relaxed),
        connect_errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        offer_p50_ms: q(0.5),
        offer_p99_ms: q(0.99),
        server_rss_mib: rss_held,
        server_rss_idle_mib: rss_idle,
        server_bytes_per_agent: (rss_held - rss_idle) * 1024.0 * 1024.0 / held as f64,
        server_cpu_pct_while_connecting: cpu,
    })
}

#[allow(clippy::too_many_arguments)]
async fn register(
    i: usize,
    ep: quinn::Endpoint,
    server: SocketAddr,
    fp: &str,
    pending: Pending,
    offers: Arc<std::sync::atomic::AtomicU64>,
    errors: Arc<std::sync::atomic::AtomicU64>,
    latencies: Arc<Mutex<Vec<f64>>>,
) -> Result<SimAgent> {
    let id = Identity::generate()?;
    let (conn, mut send, mut recv) = sim_register(
        &ep,
        server,
        fp,
        &id,
        (format!("load-{i}"), "load"),
        Duration::from_secs(60),
        Duration::from_secs(30),
    )
    .await?;
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(64);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_frame(&mut send, &m).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(m) = read_frame::<ServerMsg>(&mut recv, MAX_FRAME).await {
            match m {
                ServerMsg::Offer(o) => {
                    if let Some(req) = o.req {
                        let t = pending.lock().expect("not poisoned").remove(&(i, req));
                        if let Some(t) = t {
                            offers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            latencies
                                .lock()
                                .expect("not poisoned")
                                .push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                ServerMsg::Error { req: Some(req), .. } => {
                    pending.lock().expect("not poisoned").remove(&(i, req));
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                _ => {}
            }
        }
    });
    Ok(SimAgent { i, tx, _conn: conn })
}
