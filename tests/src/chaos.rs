//! `punch-lab chaos-restart`: a server killed (SIGKILL) under many agents
//! and started again on the same port and data directory, and how long
//! the agents take to register again. The agents are simulated the way
//! `punch-lab load` does it (real QUIC signaling connections, keep-alive
//! every 5 s) and notice a lost server and reconnect with `punch-agent`'s
//! own watchdog and back-off. Loopback only, bounded in count and time.

use crate::load::{sim_register, start_server, SimServer, SIM_KEEP_ALIVE};
use anyhow::{bail, Context, Result};
use punch_tls::Identity;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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

fn start(data: &std::path::Path, listen: &str) -> Result<SimServer> {
    start_server(data, listen, true, &["--connect-rate", "0"])
}

fn online(s: &SimServer) -> Result<u64> {
    let http = s
        .http
        .context("the server was started without its HTTP API")?;
    let m = crate::harness::http_get(http, "/metrics")?;
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
            tokio::time::sleep(punch_agent::reconnect::backoff(a)).await;
        }
        let conn = {
            // Handshakes 256 at a time, as a host's worth of agents would.
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            sim_register(
                &ep,
                server,
                &fp,
                &id,
                (format!("chaos-{i}"), "chaos"),
                Duration::from_secs(20),
                Duration::from_secs(5),
            )
            .await
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
                    _ = punch_agent::reconnect::server_silent(&conn, SIM_KEEP_ALIVE) => {}
                }
                attempt = Some(0);
            }
            Err(_) => attempt = Some(attempt.map_or(0, |a| a + 1)),
        }
    }
}
