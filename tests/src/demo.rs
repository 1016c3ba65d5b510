//! In-process demo and connect benchmark on loopback: a real server, real
//! agents, real UDP and QUIC, no root needed.

use anyhow::{Context, Result};
use punch_agent::{Agent, AgentConfig};
use punch_server::{Server, ServerConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A server and a serving agent `worker-b`, on loopback.
pub struct Loopback {
    pub server: Server,
    pub worker_b: Agent,
    _dir: tempfile::TempDir,
}

/// Starts a server on `ip` and an agent `worker-b` that answers pings.
pub async fn loopback(ip: &str, verbose: bool) -> Result<Loopback> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ServerConfig::new(dir.path().join("server"));
    cfg.listen = SocketAddr::new(ip.parse()?, 0);
    cfg.http = None;
    let server = Server::start(cfg).await.context("starting server")?;
    if verbose {
        println!(
            "1. server listening on udp {} (fingerprint {}…)",
            server.udp_addr,
            &server.fingerprint[..16]
        );
    }
    let worker_b = agent(&server, Some("worker-b")).await?;
    let observed = worker_b.registered(Duration::from_secs(10)).await?;
    if verbose {
        println!("2. agent worker-b registered; the server sees it at {observed}");
    }
    let b = worker_b.clone();
    tokio::spawn(async move {
        while let Some(pc) = b.accept().await {
            tokio::spawn(pc.serve());
        }
    });
    Ok(Loopback {
        server,
        worker_b,
        _dir: dir,
    })
}

/// An agent of `server`, bound to the server's address family on loopback.
pub async fn agent(server: &Server, id: Option<&str>) -> Result<Agent> {
    let mut cfg = AgentConfig::new(server.udp_addr.to_string(), server.fingerprint.clone());
    cfg.worker_id = id.map(str::to_string);
    cfg.bind = SocketAddr::new(
        if server.udp_addr.is_ipv6() {
            "::1".parse()?
        } else {
            "127.0.0.1".parse()?
        },
        0,
    );
    Ok(Agent::start(cfg).await?)
}

/// The demo: server, two agents, connect by id, ping.
pub async fn demo() -> Result<()> {
    println!("punch demo: a rendezvous server and two agents on loopback\n");
    let lb = loopback("127.0.0.1", true).await?;
    let a = agent(&lb.server, Some("worker-a")).await?;
    let observed = a.registered(Duration::from_secs(10)).await?;
    println!("3. agent worker-a registered; the server sees it at {observed}");
    println!("4. worker-a asks the server for worker-b; both get an offer and punch");
    let pc = a.connect("worker-b").await?;
    println!(
        "5. direct QUIC connection worker-a -> worker-b over {} path to {} in {:.1} ms \
         (mutual TLS, keys pinned to the ones the server vouched for)",
        pc.path.kind.as_str(),
        pc.path.remote_addr,
        pc.path.connect_time.as_secs_f64() * 1e3
    );
    let mut pinger = pc.pinger().await?;
    for seq in 1..=3 {
        let rtt = pinger.ping().await?;
        println!(
            "6. ping worker-b seq={seq} rtt={:.3} ms",
            rtt.as_secs_f64() * 1e3
        );
    }
    pc.conn
        .close(punch_protocol::close::DONE.into(), b"demo done");
    let m = lb.server.shared.metrics.snapshot();
    println!(
        "7. server counted {} registrations, {} introductions, {} direct outcomes",
        m.registrations, m.introductions, m.outcome_direct
    );
    a.close().await;
    lb.worker_b.close().await;
    lb.server.shutdown().await;
    println!("\ndemo ok");
    Ok(())
}

/// Figures of a connect benchmark, in milliseconds.
#[derive(Debug, serde::Serialize)]
pub struct ConnectBench {
    pub count: usize,
    pub median_ms: f64,
    pub p95_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// `count` sequential connects from one agent to `worker-b` on loopback.
pub async fn bench_connect(count: usize, ip: &str) -> Result<ConnectBench> {
    let lb = loopback(ip, false).await?;
    let a = agent(&lb.server, None).await?;
    a.registered(Duration::from_secs(10)).await?;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let pc = tokio::time::timeout(Duration::from_secs(15), a.connect("worker-b"))
            .await
            .context("connect timed out")??;
        times.push(pc.path.connect_time.as_secs_f64() * 1e3);
        debug_assert!(t.elapsed() >= pc.path.connect_time);
        pc.conn.close(punch_protocol::close::DONE.into(), b"bench");
    }
    a.close().await;
    lb.server.shutdown().await;
    times.sort_by(|x, y| x.total_cmp(y));
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok(ConnectBench {
        count,
        median_ms: pick(0.5),
        p95_ms: pick(0.95),
        min_ms: times[0],
        max_ms: times[times.len() - 1],
    })
}
