//! `punch-lab bench-connect --nat A,B`: time to a working connection
//! between two lab sites, each run a fresh `punch-agent connect` process
//! on A (so registration is part of it: on a UDP-less site the
//! happy-eyeballs wait, the WebSocket and TLS), and optionally the same
//! for iroh (`--iroh DIR` with the `relay` and `probe` binaries of the
//! iroh comparison peer): its relay (plain HTTP, reached over TCP) on the
//! server host, a listening probe on B, a fresh dialing probe on A.

use super::matrix::{agent_cmd, pair_lab, PairLab};
use super::nat::NatType;
use super::{in_ns, Impair, SERVER_IP};
use crate::harness::Proc;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// The iroh relay's HTTP port on the lab's server host.
pub const IROH_RELAY_PORT: u16 = 3340;

/// Figures of one implementation over the runs.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub runs: usize,
    pub ok: usize,
    /// Process start to the first application round trip done (the JSON
    /// line printed): the time a fresh process needs for a working
    /// connection.
    pub total_median_ms: Option<f64>,
    pub total_p95_ms: Option<f64>,
    /// Process start to its exit (the answer printed and the shutdown
    /// done): what a script waits for.
    pub wall_median_ms: Option<f64>,
    pub wall_p95_ms: Option<f64>,
    /// The implementation's own connect time: punch `connect_ms`
    /// (connect call to the QUIC handshake with the peer done, registered
    /// before); iroh `connect_ms` (`Endpoint::connect`, home relay up
    /// before).
    pub connect_median_ms: Option<f64>,
    pub connect_p95_ms: Option<f64>,
    /// Setup before connecting, where the implementation reports it
    /// (iroh `setup_ms`: bind and home relay up).
    pub setup_median_ms: Option<f64>,
    /// Paths or transports seen (punch `path/transport`, iroh's selected
    /// remote kind), with counts.
    pub paths: Vec<(String, usize)>,
    pub errors: Vec<String>,
    #[serde(skip)]
    totals: Vec<f64>,
    #[serde(skip)]
    walls: Vec<f64>,
    #[serde(skip)]
    connects: Vec<f64>,
    #[serde(skip)]
    setups: Vec<f64>,
}

impl Figures {
    fn add_path(&mut self, p: String) {
        match self.paths.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => self.paths.push((p, 1)),
        }
    }

    fn finish(&mut self) {
        let q = |v: &mut Vec<f64>, x: f64| -> Option<f64> {
            if v.is_empty() {
                return None;
            }
            v.sort_by(|a, b| a.total_cmp(b));
            Some((v[((v.len() as f64 - 1.0) * x).round() as usize] * 10.0).round() / 10.0)
        };
        self.total_median_ms = q(&mut self.totals, 0.5);
        self.total_p95_ms = q(&mut self.totals, 0.95);
        self.wall_median_ms = q(&mut self.walls, 0.5);
        self.wall_p95_ms = q(&mut self.walls, 0.95);
        self.connect_median_ms = q(&mut self.connects, 0.5);
        self.connect_p95_ms = q(&mut self.connects, 0.95);
        self.setup_median_ms = q(&mut self.setups, 0.5);
    }
}

/// The whole measurement.
#[derive(Debug, Serialize)]
pub struct LabConnectBench {
    pub a: String,
    pub b: String,
    pub impair: Impair,
    pub count: usize,
    pub punch: Figures,
    pub iroh: Option<Figures>,
}

/// Runs `cmd` and waits for its first stdout line starting with `{`:
/// (time from spawn to that line, time from spawn to the process's exit
/// when it exits within 5 s, the line parsed). The process is killed
/// after those 5 s.
fn timed_json(
    name: &str,
    cmd: std::process::Command,
    log: &Path,
) -> Result<(f64, Option<f64>, serde_json::Value)> {
    let t = Instant::now();
    let mut p = Proc::spawn(name, cmd, Some(log))?;
    let line = p.wait_line("{", Duration::from_secs(40));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let wall = p
        .wait_exit(Duration::from_secs(5))
        .ok()
        .map(|_| t.elapsed().as_secs_f64() * 1e3);
    p.kill();
    let line = line.with_context(|| {
        format!(
            "{name}: no result; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    Ok((ms, wall, serde_json::from_str(&line)?))
}

/// Measures `count` fresh connects from A (site type `a`) to B.
pub fn bench(
    a: NatType,
    b: NatType,
    impair: Impair,
    count: usize,
    iroh: Option<&Path>,
) -> Result<LabConnectBench> {
    let PairLab {
        mut lab,
        fp,
        sa,
        ns_a,
        ns_b,
        ..
    } = pair_lab(a, b, impair)?;
    // The iroh side: relay on the server host, listener on B.
    let iroh = match iroh {
        None => None,
        Some(dir) => {
            let (relay_bin, probe_bin) = (dir.join("relay"), dir.join("probe"));
            for p in [&relay_bin, &probe_bin] {
                if !p.exists() {
                    bail!(
                        "{} not found: build the iroh comparison peer (cargo build --release in its directory)",
                        p.display()
                    );
                }
            }
            let mut cmd = in_ns(&lab.server_ns, &relay_bin);
            cmd.arg("--addr")
                .arg(format!("{SERVER_IP}:{IROH_RELAY_PORT}"))
                .args(["--max-runtime-s", "3600"]);
            let mut relay = Proc::spawn("iroh-relay", cmd, Some(&lab.path("iroh-relay.log")))?;
            relay.wait_line("relay_url", Duration::from_secs(15))?;
            lab.keep(relay);
            let url = format!("http://{SERVER_IP}:{IROH_RELAY_PORT}");
            let mut cmd = in_ns(&ns_b, &probe_bin);
            cmd.args(["listen", "--relay", &url, "--bind", "0.0.0.0:0"]);
            let mut listen = Proc::spawn("iroh-listen", cmd, Some(&lab.path("iroh-listen.log")))?;
            let line = listen.wait_line("endpoint_id", Duration::from_secs(30))?;
            let j: serde_json::Value = serde_json::from_str(&line)?;
            let id = j["endpoint_id"]
                .as_str()
                .context("endpoint_id of the iroh listener")?
                .to_string();
            lab.keep(listen);
            Some((probe_bin, url, id))
        }
    };
    let mut punch = Figures::default();
    let mut iroh_f = iroh.as_ref().map(|_| Figures::default());
    for i in 0..count {
        // Each run is a new process: forget the mappings earlier runs left.
        lab.flush_conntrack(sa)?;
        let mut cmd = agent_cmd(&ns_a, &fp, 3.0)?;
        cmd.args(["connect", "worker-b", "--json"])
            .args(lab.agent_args_for(&ns_a));
        punch.runs += 1;
        match timed_json("punch-connect", cmd, &lab.path(&format!("connect-{i}.log"))) {
            Ok((ms, wall, j)) if j["connect_ms"].is_number() => {
                punch.ok += 1;
                punch.totals.push(ms);
                punch.walls.extend(wall);
                punch
                    .connects
                    .push(j["connect_ms"].as_f64().unwrap_or_default());
                punch.add_path(format!(
                    "{}/{}",
                    j["path"].as_str().unwrap_or("?"),
                    j["transport"].as_str().unwrap_or("?")
                ));
            }
            Ok((_, _, j)) => punch.errors.push(j.to_string()),
            Err(e) => punch.errors.push(format!("{e:#}")),
        }
        if let (Some((probe, url, id)), Some(f)) = (&iroh, iroh_f.as_mut()) {
            lab.flush_conntrack(sa)?;
            let mut cmd = in_ns(&ns_a, probe);
            cmd.args([
                "dial",
                "--relay",
                url,
                "--peer",
                id,
                "--bind",
                "0.0.0.0:0",
                "--direct-timeout-s",
                "0",
            ]);
            f.runs += 1;
            match timed_json("iroh-dial", cmd, &lab.path(&format!("iroh-dial-{i}.log"))) {
                Ok((ms, wall, j)) if j["ok"] == true && j["first_rtt_ms"].is_number() => {
                    f.ok += 1;
                    f.totals.push(ms);
                    f.walls.extend(wall);
                    f.connects
                        .push(j["connect_ms"].as_f64().unwrap_or_default());
                    f.setups.push(j["setup_ms"].as_f64().unwrap_or_default());
                    let remote = j["remote_addr"].as_str().unwrap_or("?");
                    f.add_path(remote.split(':').next().unwrap_or("?").to_string());
                }
                Ok((_, _, j)) => f.errors.push(j.to_string()),
                Err(e) => f.errors.push(format!("{e:#}")),
            }
        }
    }
    punch.finish();
    if let Some(f) = iroh_f.as_mut() {
        f.finish();
    }
    Ok(LabConnectBench {
        a: a.to_string(),
        b: b.to_string(),
        impair,
        count,
        punch,
        iroh: iroh_f,
    })
}
