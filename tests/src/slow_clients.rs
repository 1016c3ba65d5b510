//! `punch-lab chaos-slow`: many slow-loris clients held against the
//! server's TCP ports, and whether everyone else is still served. Half
//! trickle an HTTP request head a byte a second at the HTTP listener; half
//! trickle a TLS record a byte a second at the TLS port. The server should
//! close every one at its deadline (the request-head timeout, the TLS
//! handshake timeout) with bounded memory, while `/healthz` answers and a
//! real agent registers over the TLS port. Loopback only, bounded.

use crate::harness::{bin, clear_agent_env, http_get, quantile, run, ServerProc};
use crate::load::proc_stats;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct SlowReport {
    /// Slow clients started, how many connected, and how many the server
    /// closed before the run's bound (deadline + 20 s).
    pub clients: usize,
    pub connected: usize,
    pub closed_by_server: usize,
    pub still_open: usize,
    /// The server's request-head deadline, and when the last slow client
    /// was closed (seconds from its connect, the slowest).
    pub header_timeout_secs: u64,
    pub last_closed_secs: Option<f64>,
    /// Server resident memory before, while all were held, and after.
    pub rss_before_mib: f64,
    pub rss_held_mib: f64,
    pub rss_after_mib: f64,
    /// `GET /healthz` on the HTTP listener while they were held: answered,
    /// asked, median and 99th percentile.
    pub healthz_ok: usize,
    pub healthz_asked: usize,
    pub healthz_p50_ms: Option<f64>,
    pub healthz_p99_ms: Option<f64>,
    /// A real agent's `list` over the TLS port's WebSocket while they were
    /// held: succeeded, and its wall time.
    pub agent_over_tls_ok: bool,
    pub agent_over_tls_ms: f64,
    /// The server's counters after the run.
    pub http_header_timeouts: u64,
    pub tcp_header_timeouts: u64,
    pub tls_failures: u64,
    pub refused_full: u64,
}

/// Lets this process (and the server it starts) hold `fds` descriptors.
fn raise_fd_limit(fds: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= fds {
            return Ok(());
        }
        if lim.rlim_max < fds {
            bail!(
                "this needs {fds} open files, the hard limit is {} (ulimit -Hn)",
                lim.rlim_max
            );
        }
        lim.rlim_cur = fds;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One slow client: connects, sends `head`, then a byte of `drip` a
/// second until the server closes it or `bound` passes. Returns the time
/// from connect to the server's close, or `None` (not connected, or still
/// open at the bound).
async fn slow(addr: SocketAddr, head: &'static [u8], drip: u8, bound: Instant) -> Slow {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await
    else {
        return Slow::NotConnected;
    };
    let t0 = Instant::now();
    if s.write_all(head).await.is_err() {
        return Slow::Closed(t0.elapsed());
    }
    let mut buf = [0u8; 512];
    loop {
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Slow::Closed(t0.elapsed()),
                Ok(_) => {}
            },
            _ = tick => {
                if s.write_all(&[drip]).await.is_err() {
                    return Slow::Closed(t0.elapsed());
                }
            }
            _ = tokio::time::sleep_until(bound.into()) => return Slow::Open,
        }
    }
}

enum Slow {
    NotConnected,
    Closed(Duration),
    Open,
}

/// Runs it: `clients` slow clients (half on each port) against a server
/// whose request-head deadline is `header_timeout_secs`.
pub async fn run_slow(clients: usize, header_timeout_secs: u64) -> Result<SlowReport> {
    if !(2..=20_000).contains(&clients) {
        bail!("--clients must be between 2 and 20000");
    }
    if !(1..=60).contains(&header_timeout_secs) {
        bail!("--header-timeout-secs must be between 1 and 60");
    }
    // Ours, the server's end of each, and room for the rest.
    raise_fd_limit(clients as u64 * 2 + 1024)?;
    let dir = tempfile::tempdir()?;
    let secs = header_timeout_secs.to_string();
    let s = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            ServerProc::start(&dir, &["--header-timeout-secs", secs.as_str()])
        })
        .await??
    };
    let tcp = s.tcp.context("the server has no TLS port")?;
    let pid = s.proc.pid();
    let rss_before = proc_stats(pid).0;
    // The TLS handshake has 10 s of its own.
    let deadline = header_timeout_secs.max(10);
    let bound = Instant::now() + Duration::from_secs(deadline + 20);

    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let (addr, head, drip): (SocketAddr, &'static [u8], u8) = if i % 2 == 0 {
            (
                s.http,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                b'a',
            )
        } else {
            // A TLS handshake record announcing 512 bytes that come slowly.
            (tcp, b"\x16\x03\x01\x02\x00\x01", 0)
        };
        tasks.push(tokio::spawn(slow(addr, head, drip, bound)));
        // Keep the listen backlogs from overflowing (SYN retries would
        // stretch the connect phase by seconds).
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // All are connected and waiting well before the first deadline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_held = proc_stats(pid).0;

    let http = s.http;
    let asked = 50;
    let mut lat = tokio::task::spawn_blocking(move || {
        let mut lat = Vec::new();
        for _ in 0..asked {
            let t = Instant::now();
            if http_get(http, "/healthz").is_ok() {
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        lat
    })
    .await?;
    let (fp, wss) = (s.fingerprint.clone(), format!("wss://{tcp}/ws"));
    let (agent_ok, agent_ms) = tokio::task::spawn_blocking(move || -> Result<(bool, f64)> {
        let mut cmd = std::process::Command::new(bin("punch-agent")?);
        cmd.args(["--server", &wss, "--server-fingerprint", &fp])
            .args(["--bind", "127.0.0.1:0", "--no-nat-check", "list", "--json"]);
        clear_agent_env(&mut cmd);
        let t = Instant::now();
        let r = run(cmd, Duration::from_secs(30))?;
        Ok((r.code == Some(0), t.elapsed().as_secs_f64() * 1e3))
    })
    .await??;

    let (mut connected, mut closed, mut open) = (0, Vec::new(), 0);
    for t in tasks {
        match t.await? {
            Slow::NotConnected => {}
            Slow::Closed(d) => {
                connected += 1;
                closed.push(d.as_secs_f64());
            }
            Slow::Open => {
                connected += 1;
                open += 1;
            }
        }
    }
    // Let the server drop what it closed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = proc_stats(pid).0;
    let h: serde_json::Value = {
        let http = s.http;
        serde_json::from_str(
            &tokio::task::spawn_blocking(move || http_get(http, "/healthz")).await??,
        )?
    };
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok(SlowReport {
        clients,
        connected,
        closed_by_server: closed.len(),
        still_open: open,
        header_timeout_secs,
        last_closed_secs: closed.iter().copied().reduce(f64::max),
        rss_before_mib: rss_before,
        rss_held_mib: rss_held,
        rss_after_mib: rss_after,
        healthz_ok: lat.len(),
        healthz_asked: asked,
        healthz_p50_ms: quantile(&mut lat, 0.5),
        healthz_p99_ms: quantile(&mut lat, 0.99),
        agent_over_tls_ok: agent_ok,
        agent_over_tls_ms: agent_ms,
        http_header_timeouts: n(&h["http"]["header_timeouts"]),
        tcp_header_timeouts: n(&h["tcp"]["header_timeouts"]),
        tls_failures: n(&h["tcp"]["tls_failures"]),
        refused_full: n(&h["http"]["refused_full"]) + n(&h["tcp"]["refused_full"]),
    })
}
