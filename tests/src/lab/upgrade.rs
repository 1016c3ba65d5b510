//! `punch-lab tcp-upgrade`: agent A on a `udp-blocked` site pings agent B
//! (one connection, one echo stream of numbered messages) relayed over
//! A's WebSocket; the lab then lifts the UDP block on A's NAT. A's periodic
//! check finds QUIC to the server answering again, moves signaling and the
//! relay binding to UDP, and the connection punches for a direct path —
//! without a new connection and without losing an echo.

use super::failover::compress;
use super::matrix::{agent_cmd, pair_lab, PairLab};
use super::nat::NatType;
use super::{Impair, Lab};
use crate::harness::Proc;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Settings of the scenario.
#[derive(Clone, Debug)]
pub struct UpgradeOpts {
    /// B's NAT type (A is `udp-blocked`); one that punches with A's NAT
    /// once UDP flows (a port-restricted-like NAT): `none`, `full-cone`,
    /// `restricted`, `port-restricted`, `cgnat`, `cloudnat-eim`.
    pub b: NatType,
    pub impair: Impair,
    /// Seconds between echoes.
    pub interval: f64,
    /// Echoes answered over the relay before the block is lifted (and the
    /// connection's first punch session must be over).
    pub before: usize,
    /// Echoes answered on the direct path before the lab stops.
    pub after: usize,
    /// Longest wait from the lift to the first echo answered directly.
    pub limit: Duration,
}

/// What happened to the connection.
#[derive(Debug, Serialize)]
pub struct Upgrade {
    pub a: String,
    pub b: String,
    /// Echoes answered (all of them, in order: numbered 1..=answered).
    pub answered: usize,
    /// Path of each answered echo, in order.
    pub paths: Vec<String>,
    /// Runs of equal paths, e.g. `["relayed×20", "direct×30"]`.
    pub summary: Vec<String>,
    /// A's first registration went over TCP (the WebSocket).
    pub started_on_tcp: bool,
    /// From the lift to A's log saying it registered over UDP (QUIC).
    pub to_udp_signaling_ms: Option<f64>,
    /// From the lift to the first echo answered on a direct path.
    pub to_direct_ms: Option<f64>,
    /// Incoming peer connections B accepted (1: the same connection).
    pub b_connections: usize,
    /// The slowest echo round trip.
    pub max_rtt_ms: f64,
}

/// `reply from X: seq=N time=T ms path=P` → (N, T, P).
fn parse_reply(line: &str) -> Option<(usize, f64, String)> {
    if !line.starts_with("reply from") {
        return None;
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    Some((
        field("seq=")?.parse().ok()?,
        field("time=")?.parse().ok()?,
        field("path=")?,
    ))
}

/// The transports of A's registrations, in order, from its log
/// (`… registered observed=… transport="tcp"`).
pub fn registrations(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" registered"))
        .filter_map(|l| {
            let v = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("transport="))?;
            Some(v.trim_matches('"').to_string())
        })
        .collect()
}

/// Runs the scenario; fails unless A starts on TCP, every echo is
/// answered in order, the path ends direct within `limit` of the lift, and
/// B saw one connection.
pub fn tcp_upgrade(o: &UpgradeOpts) -> Result<Upgrade> {
    let a = NatType::UdpBlocked;
    let PairLab {
        mut lab, fp, sa, ..
    } = pair_lab(a, o.b, o.impair)?;
    let ns_a = lab.sites[sa].hosts[0].clone();
    // Enough echoes for the wait and more; the lab stops the agent once it
    // has seen `after` direct answers.
    let per = o.interval + 0.2;
    let count = o.before + o.after + (o.limit.as_secs_f64() / o.interval.max(0.01)) as usize + 50;
    let mut cmd = agent_cmd(&ns_a, &fp, 3.0)?;
    cmd.args(["ping", "worker-b", "-c", &count.to_string(), "-i"])
        .arg(o.interval.to_string())
        .args(lab.agent_args_for(&ns_a));
    cmd.env("PUNCH_LOG", "info");
    let log = lab.path("ping.log");
    let mut ping = Proc::spawn("ping", cmd, Some(&log))?;
    let context = |lab: &Lab| {
        format!(
            "\n--- A (ping) log:\n{}\n--- worker-b log:\n{}",
            std::fs::read_to_string(lab.path("ping.log")).unwrap_or_default(),
            std::fs::read_to_string(lab.path("worker-b.log")).unwrap_or_default()
        )
    };
    let mut paths: Vec<String> = Vec::new();
    let mut max_rtt: f64 = 0.0;
    let mut next = |ping: &mut Proc, paths: &mut Vec<String>, lab: &Lab| -> Result<bool> {
        let wait = Duration::from_secs_f64(per + 10.0);
        let Some(line) = ping.next_line(wait).with_context(|| context(lab))? else {
            return Ok(false);
        };
        if let Some((seq, rtt, path)) = parse_reply(&line) {
            if seq != paths.len() + 1 {
                bail!(
                    "echo {seq} answered after {}: out of order{}",
                    paths.len(),
                    context(lab)
                );
            }
            max_rtt = max_rtt.max(rtt);
            paths.push(path);
        }
        Ok(true)
    };
    // `before` echoes, and the connection's first punch session over (it
    // probes for punch_timeout even when hopeless, and would find a direct
    // path by itself if UDP opened while it runs): the move must come from
    // the agent noticing that UDP to the server works again.
    let punch_over = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("punching timed out")
    };
    let started = Instant::now();
    while paths.len() < o.before || !punch_over(&log) {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "A's first punch session did not end within 30 s{}",
                context(&lab)
            );
        }
        if !next(&mut ping, &mut paths, &lab)? {
            bail!("ping ended early{}", context(&lab));
        }
    }
    let regs = registrations(&std::fs::read_to_string(&log).unwrap_or_default());
    if regs.first().map(String::as_str) != Some("tcp") {
        bail!(
            "A should have registered over TCP (its UDP is blocked), registrations: {regs:?}{}",
            context(&lab)
        );
    }
    if let Some(p) = paths.iter().find(|p| *p != "relayed") {
        bail!(
            "A on a udp-blocked site can only be relayed, saw {p:?} ({:?}){}",
            compress(&paths),
            context(&lab)
        );
    }
    let lifted = Instant::now();
    lab.lift_udp_block(sa)?;
    let (mut to_udp, mut to_direct) = (None, None);
    let mut direct_after = 0;
    while direct_after < o.after {
        if to_direct.is_none() && lifted.elapsed() > o.limit {
            bail!(
                "no direct path within {:?} after the UDP block was lifted (paths {:?}, A registered over {:?}){}",
                o.limit,
                compress(&paths),
                registrations(&std::fs::read_to_string(&log).unwrap_or_default()),
                context(&lab)
            );
        }
        if !next(&mut ping, &mut paths, &lab)? {
            bail!(
                "ping ended after {} echoes ({:?}){}",
                paths.len(),
                compress(&paths),
                context(&lab)
            );
        }
        let at = lifted.elapsed().as_secs_f64() * 1e3;
        if to_udp.is_none()
            && registrations(&std::fs::read_to_string(&log).unwrap_or_default())
                .iter()
                .any(|t| t == "udp")
        {
            to_udp = Some(at);
        }
        if paths.last().is_some_and(|p| p == "direct") {
            to_direct.get_or_insert(at);
            direct_after += 1;
        }
    }
    ping.kill();
    let b_log = std::fs::read_to_string(lab.path("worker-b.log")).unwrap_or_default();
    let b_connections = b_log
        .lines()
        .filter(|l| l.contains(r#""event":"peer_connected""#))
        .count();
    let regs = registrations(&std::fs::read_to_string(&log).unwrap_or_default());
    let r = Upgrade {
        a: a.to_string(),
        b: o.b.to_string(),
        answered: paths.len(),
        summary: compress(&paths),
        paths,
        started_on_tcp: regs.first().map(String::as_str) == Some("tcp"),
        to_udp_signaling_ms: to_udp,
        to_direct_ms: to_direct,
        b_connections,
        max_rtt_ms: max_rtt,
    };
    if regs.last().map(String::as_str) != Some("udp") {
        bail!(
            "the connection went direct but A's signaling is not on UDP (registrations {regs:?}){}",
            context(&lab)
        );
    }
    if b_connections != 1 {
        bail!(
            "B accepted {b_connections} connections; the path should change under one{}",
            context(&lab)
        );
    }
    if let Some(i) = r.paths.iter().rposition(|p| p != "direct") {
        // Once direct, it stays direct (nothing made the path die).
        if r.paths[..=i].iter().any(|p| p == "direct") {
            bail!(
                "the path left the direct path again: {:?}{}",
                r.summary,
                context(&lab)
            );
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_registrations_parse() {
        assert_eq!(
            parse_reply("reply from worker-b: seq=12 time=81.250 ms path=relayed"),
            Some((12, 81.25, "relayed".to_string()))
        );
        assert_eq!(parse_reply("PING worker-b via relayed path x"), None);
        let log = "2026-01-01T00:00:00.1Z  INFO signal{worker=anon}: punch_agent::signal: registered observed=203.0.113.12:40000 server=203.0.113.1:3478 transport=\"tcp\"\n\
                   2026-01-01T00:00:05.2Z  INFO signal{worker=anon}: punch_agent::signal: UDP to the server answers again; moving signaling to QUIC; reconnecting\n\
                   2026-01-01T00:00:05.3Z  INFO signal{worker=anon}: punch_agent::signal: registered observed=203.0.113.12:40001 server=203.0.113.1:3478 transport=\"udp\"\n";
        assert_eq!(registrations(log), vec!["tcp", "udp"]);
    }
}
