//! `punch-lab stun-bench`: STUN Binding requests per second against any
//! server, with a window of outstanding requests spread over many sockets,
//! every answer validated; and `udp-echo`, the do-nothing ceiling.

use anyhow::{bail, Result};
use punch_protocol::stun;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Figures of one run.
#[derive(Debug, serde::Serialize)]
pub struct StunBench {
    pub target: String,
    pub sent: u64,
    pub answered: u64,
    pub invalid: u64,
    pub lost: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs for `seconds` (at most 60) with `sockets` sockets and `window`
/// requests in flight per socket. `echo` expects the request back
/// unchanged (a UDP echo server) instead of a STUN answer.
pub async fn run(
    target: SocketAddr,
    seconds: u64,
    sockets: usize,
    window: usize,
    echo: bool,
) -> Result<StunBench> {
    if !target.ip().is_loopback() {
        bail!("stun-bench sends load only to loopback addresses");
    }
    let seconds = seconds.clamp(1, 60);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..sockets.clamp(1, 256) {
        let window = window.clamp(1, 1024);
        tasks.push(tokio::spawn(async move {
            let sock = tokio::net::UdpSocket::bind(SocketAddr::new(target.ip(), 0)).await?;
            sock.connect(target).await?;
            let local = sock.local_addr()?;
            let mut inflight: HashMap<[u8; 16], (Instant, Vec<u8>)> = HashMap::new();
            let (mut sent, mut ok, mut bad) = (0u64, 0u64, 0u64);
            let mut lat = Vec::new();
            let mut buf = [0u8; 1500];
            while Instant::now() < end {
                while inflight.len() < window {
                    let txid = stun::new_txid();
                    let req = stun::binding_request(&txid, false, false);
                    sock.send(&req).await?;
                    sent += 1;
                    inflight.insert(txid, (Instant::now(), req));
                }
                let n = match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    Ok(Err(_)) => continue,
                    // Nothing for 200 ms: count what is in flight as lost
                    // and start a new window.
                    Err(_) => {
                        inflight.clear();
                        continue;
                    }
                };
                let d = &buf[..n];
                let key = if echo {
                    d.get(4..20).and_then(|t| <[u8; 16]>::try_from(t).ok())
                } else {
                    stun::parse(d).ok().map(|m| m.txid)
                };
                let Some(txid) = key else {
                    bad += 1;
                    continue;
                };
                let Some((t0, req)) = inflight.remove(&txid) else {
                    bad += 1;
                    continue;
                };
                let valid = if echo {
                    d == req.as_slice()
                } else {
                    stun::parse(d).is_ok_and(|m| {
                        m.msg_type == stun::BINDING_SUCCESS && m.mapped_address() == Some(local)
                    })
                };
                if valid {
                    ok += 1;
                    lat.push(t0.elapsed().as_secs_f64() * 1e6);
                } else {
                    bad += 1;
                }
            }
            // Give the last answers a moment, bounded.
            let grace = Instant::now() + Duration::from_millis(300);
            while !inflight.is_empty() && Instant::now() < grace {
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(50), sock.recv(&mut buf)).await
                {
                    let d = &buf[..n];
                    let key = if echo {
                        d.get(4..20).and_then(|t| <[u8; 16]>::try_from(t).ok())
                    } else {
                        stun::parse(d).ok().map(|m| m.txid)
                    };
                    if let Some(k) = key {
                        if inflight.remove(&k).is_some() {
                            ok += 1;
                        }
                    }
                }
            }
            anyhow::Ok((sent, ok, bad, lat))
        }));
    }
    let (mut sent, mut ok, mut bad, mut lat) = (0, 0, 0, Vec::new());
    for t in tasks {
        let (s, o, b, l) = t.await??;
        sent += s;
        ok += o;
        bad += b;
        lat.extend(l);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(StunBench {
        target: target.to_string(),
        sent,
        answered: ok,
        invalid: bad,
        lost: sent.saturating_sub(ok + bad),
        per_sec: ok as f64 / seconds as f64,
        p50_us: q(0.5),
        p99_us: q(0.99),
    })
}

/// A do-nothing UDP echo server on `listen` (loopback only), for the ceiling.
pub fn echo(listen: SocketAddr) -> Result<()> {
    if !listen.ip().is_loopback() {
        bail!("udp-echo listens on loopback only");
    }
    let s = std::net::UdpSocket::bind(listen)?;
    println!("echoing on {}", s.local_addr()?);
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = s.recv_from(&mut buf)?;
        let _ = s.send_to(&buf[..n], from);
    }
}
