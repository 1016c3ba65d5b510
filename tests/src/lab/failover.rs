//! `punch-lab failover`: one connection carries pings while its direct path
//! dies (conntrack flushed in both NATs, so the NATs hand out new mappings)
//! and must go on over the relay, then move back to a direct path when the
//! agents punch again — without the application seeing a new connection.

use super::matrix::{agent_cmd, pair_lab, PairLab};
use super::nat::NatType;
use super::{Impair, Lab};
use crate::harness::Proc;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What happened to the connection.
#[derive(Debug, Serialize)]
pub struct Failover {
    pub a: String,
    pub b: String,
    /// Pings sent (every one must be answered).
    pub pings: u32,
    /// Path of each answered ping, in order.
    pub paths: Vec<String>,
    /// From the flush to the first ping answered over the relay.
    pub to_relay_ms: Option<f64>,
    /// From the flush to the first ping answered over a direct path again.
    pub to_direct_ms: Option<f64>,
    /// The slowest round trip across the switches.
    pub max_rtt_ms: f64,
}

/// Runs the scenario; fails unless every ping is answered and the path went
/// direct → relayed → direct.
pub fn failover(a: NatType, b: NatType, impair: Impair, pings: u32) -> Result<Failover> {
    let PairLab {
        lab,
        fp,
        sa,
        sb,
        ns_a,
        ..
    } = pair_lab(a, b, impair)?;
    let mut cmd = agent_cmd(&ns_a, &fp, 3.0)?;
    cmd.args(["ping", "worker-b", "-c", &pings.to_string(), "-i", "0.1"]);
    cmd.args(lab.agent_args_for(&ns_a));
    cmd.env("PUNCH_LOG", "info");
    let log = lab.path("ping.log");
    let mut ping = Proc::spawn("ping", cmd, Some(&log))?;
    let context = |lab: &Lab| {
        format!(
            "\n--- ping log:\n{}\n--- worker-b log:\n{}",
            std::fs::read_to_string(lab.path("ping.log")).unwrap_or_default(),
            std::fs::read_to_string(lab.path("worker-b.log")).unwrap_or_default()
        )
    };
    // Ten answers on a direct path first.
    let mut paths = Vec::new();
    let mut max_rtt: f64 = 0.0;
    while paths.len() < 10 {
        let Some(line) = ping.next_line(Duration::from_secs(30))? else {
            bail!("ping ended early{}", context(&lab));
        };
        if let Some((rtt, path)) = parse_reply(&line) {
            max_rtt = max_rtt.max(rtt);
            paths.push(path);
        }
    }
    if paths.iter().any(|p| p != "direct") {
        bail!(
            "{a} -> {b} did not start direct ({paths:?}); pick NAT types that punch{}",
            context(&lab)
        );
    }
    let flushed = Instant::now();
    lab.flush_conntrack(sa)?;
    lab.flush_conntrack(sb)?;
    let (mut to_relay, mut to_direct) = (None, None);
    loop {
        let line = ping
            .next_line(Duration::from_secs(30))
            .with_context(|| context(&lab))?;
        let Some(line) = line else { break };
        let Some((rtt, path)) = parse_reply(&line) else {
            continue;
        };
        max_rtt = max_rtt.max(rtt);
        let at = flushed.elapsed().as_secs_f64() * 1e3;
        if path == "relayed" && to_relay.is_none() {
            to_relay = Some(at);
        }
        if path == "direct" && to_relay.is_some() && to_direct.is_none() {
            to_direct = Some(at);
        }
        paths.push(path);
    }
    let status = ping.wait_exit(Duration::from_secs(10))?;
    if !status.success() {
        bail!("ping failed ({status}){}", context(&lab));
    }
    if paths.len() != pings as usize {
        bail!("{} of {pings} pings answered{}", paths.len(), context(&lab));
    }
    let r = Failover {
        a: a.to_string(),
        b: b.to_string(),
        pings,
        paths,
        to_relay_ms: to_relay,
        to_direct_ms: to_direct,
        max_rtt_ms: max_rtt,
    };
    if r.to_relay_ms.is_none() || r.to_direct_ms.is_none() {
        bail!(
            "expected direct -> relayed -> direct, got {:?}{}",
            compress(&r.paths),
            context(&lab)
        );
    }
    Ok(r)
}

/// `reply from X: seq=N time=T ms path=P` → (T, P).
fn parse_reply(line: &str) -> Option<(f64, String)> {
    if !line.starts_with("reply from") {
        return None;
    }
    let rtt = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("time="))?
        .parse()
        .ok()?;
    let path = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("path="))?;
    Some((rtt, path.to_string()))
}

/// Runs of equal paths: `["direct×10", "relayed×31", "direct×39"]`.
pub fn compress(paths: &[String]) -> Vec<String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for p in paths {
        match out.last_mut() {
            Some((q, n)) if q == p => *n += 1,
            _ => out.push((p.clone(), 1)),
        }
    }
    out.into_iter().map(|(p, n)| format!("{p}×{n}")).collect()
}
