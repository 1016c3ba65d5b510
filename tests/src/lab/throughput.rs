//! `punch-lab throughput`: `punch-agent bench` between two lab sites (with
//! the lab's delay and loss on their links), beside iperf3 over TCP between
//! the same two hosts for the path's ceiling (when iperf3 is installed and
//! the sites have no NAT, so iperf3 can reach the other host).

use super::matrix::{agent_cmd, pair_lab, PairLab};
use super::nat::NatType;
use super::{in_ns, Impair};
use crate::harness::{run, Proc};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::Duration;

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub a: String,
    pub b: String,
    pub delay_ms: u32,
    /// `punch-agent bench --json` as printed.
    pub punch: serde_json::Value,
    /// iperf3's receiver-side rate over TCP, MB/s (10^6 bytes), A to B.
    pub iperf3_tcp_mb_per_s: Option<f64>,
}

/// Runs the bench from A to B for `seconds` each way.
pub fn throughput(a: NatType, b: NatType, impair: Impair, seconds: u32) -> Result<Throughput> {
    let PairLab {
        lab,
        fp,
        sb,
        ns_a,
        ns_b,
        ..
    } = pair_lab(a, b, impair)?;
    let mut cmd = agent_cmd(&ns_a, &fp, 3.0)?;
    cmd.args([
        "bench",
        "worker-b",
        "--seconds",
        &seconds.to_string(),
        "--json",
    ]);
    cmd.args(lab.agent_args_for(&ns_a));
    cmd.env("PUNCH_LOG", "info");
    let r = run(cmd, Duration::from_secs(60 + 3 * seconds as u64))?;
    if r.code != Some(0) {
        let tail: Vec<&str> = r.stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("punch-agent bench failed:\n{}", tail.join("\n"));
    }
    let punch = r.json()?;
    let have_iperf = std::process::Command::new("sh")
        .args(["-c", "command -v iperf3"])
        .output()
        .is_ok_and(|o| o.status.success());
    let iperf3_tcp_mb_per_s = if have_iperf && a == NatType::None && b == NatType::None {
        let mut srv = in_ns(&ns_b, "iperf3");
        srv.args(["-s", "-1", "--forceflush", "-B"])
            .arg(lab.sites[sb].host_ips[0].to_string());
        let mut p = Proc::spawn("iperf3-server", srv, None)?;
        p.wait_line("Server listening", Duration::from_secs(10))?;
        let mut cli = in_ns(&ns_a, "iperf3");
        cli.args(["-J", "-t", &seconds.to_string(), "-c"])
            .arg(lab.sites[sb].host_ips[0].to_string());
        let r = run(cli, Duration::from_secs(30 + seconds as u64))?;
        let j: serde_json::Value = serde_json::from_str(&r.stdout).context("iperf3 -J output")?;
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| (b / 8e6 * 10.0).round() / 10.0)
    } else {
        None
    };
    Ok(Throughput {
        a: a.to_string(),
        b: b.to_string(),
        delay_ms: impair.delay_ms,
        punch,
        iperf3_tcp_mb_per_s,
    })
}
