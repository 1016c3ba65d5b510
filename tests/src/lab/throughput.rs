//! `punch-lab throughput`: `punch-agent bench` between two lab sites (with
//! the lab's delay and loss on their links), beside iperf3 over TCP between
//! the same two hosts for the path's ceiling (when iperf3 is installed and
//! the sites have no NAT, so iperf3 can reach the other host).

use super::matrix::{agent_cmd, pair_lab_with, PairLab};
use super::nat::NatType;
use super::{in_ns, Impair};
use crate::harness::{run, Proc};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::Duration;

/// The downloads a run also times (0: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Gets {
    /// One file of this many MB (10^6 bytes).
    pub file_mb: u32,
    /// A tree of this many files of [`SMALL`] bytes.
    pub files: u32,
}

/// Bytes in each file of a tree [`Gets::files`] asks for.
pub const SMALL: usize = 4096;

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
    /// `punch-agent get FILE --json`'s last line, with `mb_per_s`.
    pub get_file: Option<serde_json::Value>,
    /// `punch-agent get small/ --json`'s last line, with `mb_per_s` and
    /// `files_per_s`.
    pub get_tree: Option<serde_json::Value>,
}

/// Runs the bench from A to B for `seconds` each way.
pub fn throughput(
    a: NatType,
    b: NatType,
    impair: Impair,
    seconds: u32,
    gets: Gets,
) -> Result<Throughput> {
    let share = tempfile::tempdir()?;
    make_share(share.path(), gets)?;
    let extra = ["--share".to_string(), share.path().display().to_string()];
    let PairLab {
        lab,
        fp,
        sb,
        ns_a,
        ns_b,
        ..
    } = pair_lab_with(a, b, impair, &extra)?;
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
        get_file: (gets.file_mb > 0)
            .then(|| timed_get(&ns_a, &fp, &lab, "big.bin"))
            .transpose()?,
        get_tree: (gets.files > 0)
            .then(|| timed_get(&ns_a, &fp, &lab, "small/"))
            .transpose()?,
    })
}

/// One file of `file_mb` MB and a tree of `files` small ones, of random
/// bytes (nothing for a hash or a compressor to shortcut).
fn make_share(dir: &std::path::Path, gets: Gets) -> Result<()> {
    use rand::RngCore;
    use std::io::Write;
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1 << 20];
    if gets.file_mb > 0 {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("big.bin"))?);
        let mut left = gets.file_mb as u64 * 1_000_000;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.flush()?;
    }
    for i in 0..gets.files {
        let d = dir.join(format!("small/d{:02}", i % 100));
        std::fs::create_dir_all(&d)?;
        rng.fill_bytes(&mut buf[..SMALL]);
        std::fs::write(d.join(format!("f{i:05}")), &buf[..SMALL])?;
    }
    Ok(())
}

/// `punch-agent get NAME --json` from A, into a fresh directory; its last
/// line with the rate added.
fn timed_get(ns: &str, fp: &str, lab: &super::Lab, name: &str) -> Result<serde_json::Value> {
    let out = tempfile::tempdir()?;
    let mut cmd = agent_cmd(ns, fp, 3.0)?;
    cmd.args(["get", "worker-b", name, "--json", "-o"])
        .arg(out.path().join("got"));
    cmd.args(lab.agent_args_for(ns));
    let r = run(cmd, Duration::from_secs(900))?;
    if r.code != Some(0) {
        bail!("punch-agent get {name} failed: {}", r.stderr);
    }
    let mut v: serde_json::Value =
        serde_json::from_str(r.stdout.lines().last().context("no output")?)?;
    let secs = v["seconds"].as_f64().context("seconds")?;
    let bytes = v["size"]
        .as_f64()
        .or(v["bytes"].as_f64())
        .context("bytes")?;
    v["mb_per_s"] = ((bytes / 1e6 / secs * 10.0).round() / 10.0).into();
    if let Some(n) = v["files"].as_f64() {
        v["files_per_s"] = (n / secs).round().into();
    }
    Ok(v)
}

/// Prints a run: one JSON object, or a line of figures.
pub fn print(t: &Throughput, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(t)?);
        return Ok(());
    }
    println!(
        "{} -> {} ({} ms per link): punch {} path: upload {} MB/s, download {} MB/s; iperf3 TCP {}",
        t.a,
        t.b,
        t.delay_ms,
        t.punch["path"].as_str().unwrap_or("?"),
        t.punch["upload_mb_per_s"],
        t.punch["download_mb_per_s"],
        t.iperf3_tcp_mb_per_s
            .map(|v| format!("{v} MB/s"))
            .unwrap_or_else(|| "not measured".into())
    );
    if let Some(g) = &t.get_file {
        println!(
            "get big.bin: {} bytes in {:.1} s, {} MB/s",
            g["size"],
            g["seconds"].as_f64().unwrap_or(0.0),
            g["mb_per_s"]
        );
    }
    if let Some(g) = &t.get_tree {
        println!(
            "get small/: {} files, {} bytes in {:.1} s, {} MB/s, {} files/s",
            g["files"],
            g["bytes"],
            g["seconds"].as_f64().unwrap_or(0.0),
            g["mb_per_s"],
            g["files_per_s"]
        );
    }
    Ok(())
}
