//! `punch-lab chaos-restart`: a server killed (SIGKILL) under many agents
//! and started again on the same port and data directory, and how long
//! the agents take to register again. The agents are simulated the way
//! `punch-lab load` does it (real QUIC signaling connections, keep-alive
//! every 5 s) and notice a lost server and reconnect with `punch-agent`'s
//! own watchdog and back-off. Loopback only, bounded in count and time.

use crate::harness::{bin, Proc};
use anyhow::{bail, Context, Result};
use punch_net::{read_frame, write_frame};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{ClientMsg, Hello, ServerMsg};
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// `punch-agent`'s default keep-alive.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct RestartReport {
    pub agents: usize,
    /// Registered before the kill.
    pub registered_before: usize,
    /// Registered again within `deadline_secs` of the restart.
    pub registered_again: usize,
    /// Agents that had not registered again by then.
    pub lost: usize,
    pub down_ms: u64,
    pub deadline_secs: u64,
    /// Seconds from the new server's listening line to an agent's new
    /// welcome: median, 99th percentile, last.
    pub again_p50_secs: Option<f64>,
    pub again_p99_secs: Option<f64>,
    pub again_max_secs: Option<f64>,
    /// The new server's own count of workers online at the end (from its
    /// /metrics), checked against ours.
    pub server_online_after: u64,
}

struct Server {
    proc: Proc,
    udp: SocketAddr,
    http: SocketAddr,
    fp: String,
}

fn start(data: &std::path::Path, listen: &str) -> Result<Server> {
    std::fs::create_dir_all(data)?;
    let mut cmd = std::process::Command::new(bin("punch-server")?);
    cmd.args(["--listen", listen, "--http", "127.0.0.1:0"])
        .args(["--idle-timeout", "60", "--max-workers", "200000"])
        .args(["--connect-rate", "0", "--data-dir"])
        .arg(data)
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
    Ok(Server {
        udp: field("udp=")?.parse()?,
        http: field("http=")?.parse()?,
        fp: field("fingerprint=")?,
        proc,
    })
}

fn online(s: &Server) -> Result<u64> {
    let m = crate::harness::http_get(s.http, "/metrics")?;
    m.lines()
        .find_map(|l| l.strip_prefix("punch_agents_online "))
        .context("no punch_agents_online in /metrics")?
        .trim()
        .parse()
        .context("punch_agents_online")
}

/// Runs it: `agents` agents, the server down for `down`, and `deadline` to
/// wait for them all to come back.
pub async fn restart(agents: usize, down: Duration, deadline: Duration) -> Result<RestartReport> {
    if !(1..=50_000).contains(&agents) {
        bail!("--agents must be between 1 and 50000");
    }
    if down > Duration::from_secs(60) || deadline > Duration::from_secs(120) {
        bail!("--down-ms at most 60000, --deadline-secs at most 120");
    }
    let dir = tempfile::tempdir()?;
    let mut server = start(dir.path(), "127.0.0.1:0")?;
    let (udp, fp) = (server.udp, server.fp.clone());
    let per_socket = 256;
    let mut endpoints = Vec::new();
    for _ in 0..agents.div_ceil(per_socket) {
        endpoints.push(quinn::Endpoint::client("127.0.0.1:0".parse()?)?);
    }
    // Each agent reports (agent, welcome time) on every welcome.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let stop = Arc::new(tokio::sync::Notify::new());
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..agents {
        let (ep, fp, tx, sem, stop) = (
            endpoints[i / per_socket].clone(),
            fp.clone(),
            tx.clone(),
            sem.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = agent(i, ep, udp, fp, tx, sem) => {}
                _ = stop.notified() => {}
            }
        }));
    }
    drop(tx);
    let mut first = vec![None::<Instant>; agents];
    let mut again = vec![None::<Instant>; agents];
    let wait_all = Instant::now() + Duration::from_secs(120);
    let mut before = 0;
    while before < agents {
        let Ok(Some((i, at))) = tokio::time::timeout_at(wait_all.into(), rx.recv()).await else {
            bail!("only {before} of {agents} agents registered within 120 s");
        };
        if first[i].replace(at).is_none() {
            before += 1;
        }
    }
    // Settled: every agent's keep-alive is running.
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.proc.kill();
    tokio::time::sleep(down).await;
    let mut server = start(dir.path(), &udp.to_string())?;
    if server.udp != udp {
        bail!("the restarted server listens on {} (not {udp})", server.udp);
    }
    let back = Instant::now();
    let until = back + deadline;
    let mut registered_again = 0;
    while registered_again < agents {
        match tokio::time::timeout_at(until.into(), rx.recv()).await {
            Ok(Some((i, at))) => {
                if at >= back && again[i].replace(at).is_none() {
                    registered_again += 1;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The server's own count, once its gauge has caught up.
    let mut server_online_after = online(&server)?;
    let settle = Instant::now() + Duration::from_secs(5);
    while (server_online_after as usize) < registered_again && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
        server_online_after = online(&server)?;
    }
    stop.notify_waiters();
    for t in tasks {
        t.abort();
    }
    for ep in &endpoints {
        ep.close(punch_protocol::close::DONE.into(), b"chaos done");
    }
    server.proc.kill();
    let mut secs: Vec<f64> = again
        .iter()
        .flatten()
        .map(|t| t.duration_since(back).as_secs_f64())
        .collect();
    secs.sort_by(|a, b| a.total_cmp(b));
    let q =
        |p: f64| (!secs.is_empty()).then(|| secs[((secs.len() - 1) as f64 * p).round() as usize]);
    Ok(RestartReport {
        agents,
        registered_before: before,
        registered_again,
        lost: agents - registered_again,
        down_ms: down.as_millis() as u64,
        deadline_secs: deadline.as_secs(),
        again_p50_secs: q(0.5),
        again_p99_secs: q(0.99),
        again_max_secs: secs.last().copied(),
        server_online_after,
    })
}

/// One agent: registers, holds the channel until it ends, registers again
/// after `punch-agent`'s own back-off (250 ms doubling, capped, jittered).
async fn agent(
    i: usize,
    ep: quinn::Endpoint,
    server: SocketAddr,
    fp: String,
    welcomed: mpsc::UnboundedSender<(usize, Instant)>,
    sem: Arc<tokio::sync::Semaphore>,
) {
    let Ok(id) = Identity::generate() else { return };
    let mut attempt: Option<u32> = None;
    loop {
        if let Some(a) = attempt {
            tokio::time::sleep(punch_agent::signal::backoff(a)).await;
        }
        let conn = {
            // Handshakes 256 at a time, as a host's worth of agents would.
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            register(i, &ep, server, &fp, &id).await
        };
        match conn {
            Ok((conn, _send, _recv)) => {
                if welcomed.send((i, Instant::now())).is_err() {
                    return;
                }
                // The agent's own watchdog: silence for a keep-alive plus
                // 2.5 s means the server is gone.
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = punch_agent::signal::server_silent(&conn, KEEP_ALIVE) => {}
                }
                attempt = Some(0);
            }
            Err(_) => attempt = Some(attempt.map_or(0, |a| a + 1)),
        }
    }
}

async fn register(
    i: usize,
    ep: &quinn::Endpoint,
    server: SocketAddr,
    fp: &str,
    id: &Identity,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let mut cfg = punch_tls::client_config(
        id,
        KeyVerifier::new(Expect::Fingerprint(fp.to_string())),
        ALPN_SIGNAL,
    )?;
    cfg.transport_config(Arc::new(punch_net::signal_transport(
        Some(KEEP_ALIVE),
        Duration::from_secs(20),
    )));
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect_with(cfg, server, "punch")?,
    )
    .await
    .context("handshake timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        worker_id: format!("chaos-{i}"),
        public_key: id.public_key(),
        token_proof: None,
        ephemeral: true,
        local_candidates: vec![],
        metadata: vec![],
        kind: Some("chaos".into()),
        tags: vec![],
    };
    write_frame(&mut send, &ClientMsg::Hello(hello)).await?;
    match tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<ServerMsg>(&mut recv, MAX_FRAME),
    )
    .await
    {
        Ok(Ok(ServerMsg::Welcome { .. })) => Ok((conn, send, recv)),
        other => bail!("no welcome: {other:?}"),
    }
}
