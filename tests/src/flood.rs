//! `punch-lab chaos-flood`: malformed and forged datagrams sent at the
//! server's UDP port as fast as one socket can send them while real agents
//! connect by id, and what the server did with them. Loopback only,
//! bounded in count and time.

use crate::harness::{quantile, run, ServerProc};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sends forged datagrams at `target` until `stop` is set, `max` are sent
/// or `until` passes, and returns how many it sent. A quarter look like
/// QUIC long headers, a quarter carry the probe magic, a quarter the relay
/// magic (binds and frames for sessions that do not exist), a quarter are
/// STUN-shaped (the cookie, random attributes); lengths 1 to 1,400.
pub fn forged_datagrams(
    target: SocketAddr,
    stop: &AtomicBool,
    max: u64,
    until: Instant,
) -> std::io::Result<u64> {
    let bind = if target.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let sock = UdpSocket::bind(bind)?;
    let mut sent = 0u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1400];
    while !stop.load(Ordering::Relaxed) && sent < max && Instant::now() < until {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 1400) as usize + 1;
        let d = &mut buf[..len];
        for (i, b) in d.iter_mut().enumerate() {
            *b = (x >> (i % 8 * 8)) as u8 ^ i as u8;
        }
        match x % 4 {
            0 => d[0] = 0xc0 | (d[0] & 0x3f),
            1 if len >= 4 => d[..4].copy_from_slice(&punch_protocol::probe::MAGIC),
            2 if len >= 4 => d[..4].copy_from_slice(&punch_protocol::relay::MAGIC),
            3 if len >= 20 => {
                // A Binding request whose length field is right: random
                // attributes that the parser must refuse or skip.
                let body = (len - 20) & !3;
                d[..2].copy_from_slice(&[0x00, 0x01]);
                d[2..4].copy_from_slice(&(body as u16).to_be_bytes());
                d[4..8].copy_from_slice(&punch_protocol::stun::MAGIC_COOKIE.to_be_bytes());
                let _ = sock.send_to(&d[..20 + body], target);
                sent += 1;
                continue;
            }
            _ => {}
        }
        // A full socket buffer is the flood doing its job.
        let _ = sock.send_to(d, target);
        sent += 1;
    }
    Ok(sent)
}

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    /// Connects made during the flood, and how many of them succeeded and
    /// went direct.
    pub connects: usize,
    pub connected: usize,
    pub direct: usize,
    /// Connect time the agent reported (`connect_ms`), median and 99th
    /// percentile, during the flood and in the same number of connects
    /// (at most 20) before it.
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    pub baseline_p50_ms: Option<f64>,
    /// Forged datagrams sent, over how long, and the rate.
    pub datagrams: u64,
    pub flood_secs: f64,
    pub datagrams_per_sec: f64,
    /// The server's relay counters after the run: frames it refused
    /// (malformed or for no session) and packets it forwarded (0: the
    /// connects went direct and no forged frame was passed on).
    pub relay_refused: u64,
    pub forwarded_packets: u64,
    /// STUN requests the server answered or dropped.
    pub stun_requests: u64,
    pub stun_dropped: u64,
}

/// One `punch-agent connect TARGET --json`: the agent's connect time and
/// whether it went direct, or `None` when it failed.
fn connect(s: &ServerProc, target: &str) -> Result<Option<(f64, bool)>> {
    let mut cmd = s.agent()?;
    cmd.args(["--no-nat-check", "connect", target, "--json"]);
    let r = run(cmd, Duration::from_secs(30))?;
    if r.code != Some(0) {
        eprintln!("connect failed: {}", r.stderr.trim_end());
        return Ok(None);
    }
    let j = r.json()?;
    let ms = j["connect_ms"].as_f64().context("no connect_ms")?;
    Ok(Some((ms, j["path"] == "direct")))
}

/// Runs it: a server and one serving agent on loopback, `connects` connects
/// while the flood runs (at most 10,000,000 datagrams and 300 s).
pub fn run_flood(connects: usize) -> Result<FloodReport> {
    if !(1..=1000).contains(&connects) {
        bail!("--connects must be between 1 and 1000");
    }
    let dir = tempfile::tempdir()?;
    let s = ServerProc::start(dir.path(), &[])?;
    let _b = s.serve(dir.path(), "flood-target", &["--no-nat-check"])?;
    let mut baseline = Vec::new();
    for _ in 0..connects.min(20) {
        if let Some((ms, _)) = connect(&s, "flood-target")? {
            baseline.push(ms);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let flood = {
        let (stop, target) = (stop.clone(), s.udp);
        std::thread::spawn(move || {
            forged_datagrams(target, &stop, 10_000_000, start + Duration::from_secs(300))
        })
    };
    let mut times = Vec::new();
    let mut direct = 0;
    for _ in 0..connects {
        if let Some((ms, d)) = connect(&s, "flood-target")? {
            times.push(ms);
            direct += d as usize;
        }
        if flood.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flood_secs = start.elapsed().as_secs_f64();
    let datagrams = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let h: serde_json::Value = serde_json::from_str(&s.http_get("/healthz")?)?;
    let relay = &h["relay"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok(FloodReport {
        connects,
        connected: times.len(),
        direct,
        connect_p50_ms: quantile(&mut times, 0.5),
        connect_p99_ms: quantile(&mut times, 0.99),
        baseline_p50_ms: quantile(&mut baseline, 0.5),
        datagrams,
        flood_secs,
        datagrams_per_sec: datagrams as f64 / flood_secs,
        relay_refused: n(&relay["dropped"]) + n(&relay["unknown_replies"]),
        forwarded_packets: n(&relay["forwarded_packets"]),
        stun_requests: n(&h["stun"]["requests"]),
        stun_dropped: n(&h["stun"]["dropped"]),
    })
}
