//! `punch-lab matrix`: every ordered pair of NAT types, N connects each,
//! with real punch-server and punch-agent processes in the lab.

use super::nat::{site_theory, Expect, NatType, SiteType};
use super::{in_ns, Impair, Lab, SiteSpec, SERVER_IP};
use crate::harness::{bin, run, Proc};
use anyhow::{Context, Result};
use std::time::Duration;

/// Matrix settings.
#[derive(Clone, Debug)]
pub struct MatrixOpts {
    /// Site types (NAT types, maybe with a port-mapping daemon).
    pub types: Vec<SiteType>,
    /// Only the ordered pairs with one of these sites on either side, when
    /// not empty.
    pub with: Vec<SiteType>,
    pub runs: usize,
    pub impair: Impair,
    /// Punch deadline given to the agents, seconds.
    pub punch_timeout: f64,
    /// Also measure two hosts behind one NAT without hairpinning.
    pub same_nat: bool,
    /// Do not flush the dialing site's conntrack between runs.
    pub keep_mappings: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Extra arguments for every `punch-agent` (e.g. `--no-relay`).
    pub agent_args: Vec<String>,
    /// Screenshot the server's status page into this directory at the end.
    pub screenshots: Option<std::path::PathBuf>,
}

/// One ordered pair's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PairResult {
    pub a: String,
    pub b: String,
    pub expect: Expect,
    pub reason: &'static str,
    pub runs: usize,
    pub connected: usize,
    pub direct: usize,
    /// Runs that started on the relay and moved to a direct path.
    pub upgraded: usize,
    pub relayed: usize,
    /// Direct runs whose path runs through a gateway port mapping (`connect
    /// --json` says `via_mapped`).
    pub via_mapped: usize,
    /// Connected runs whose A side carried the connection over TCP (the
    /// relay over its WebSocket channel: `connect --json` says
    /// `transport: tcp`).
    pub tcp: usize,
    pub success_rate: f64,
    pub direct_rate: f64,
    pub median_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub median_rtts: Option<f64>,
    pub p95_rtts: Option<f64>,
    /// Median round trip A↔B measured over the peer connection (ms): with
    /// `--delay D` it should be about 4·D (each site's link, both ways).
    pub median_rtt_ms: Option<f64>,
    /// How the direct runs found their path (`connect --json`'s
    /// `strategy`), and why the relayed ones started on the relay
    /// (`relay_reason`): counts by name.
    pub strategies: std::collections::BTreeMap<String, usize>,
    pub relay_reasons: std::collections::BTreeMap<String, usize>,
    /// Connected runs by the IP family of their path (`connect --json`'s
    /// `family`: `ipv4`, `ipv6`).
    pub families: std::collections::BTreeMap<String, usize>,
    /// Direct runs (`path` and `initial_path` direct) whose session the
    /// server relayed bytes for all the same (`relayed_bytes` of the run's
    /// session in its `/api/v1/connects`, read when the dialer has exited):
    /// the agent's "direct" checked from outside. Zero unless a label lies.
    pub direct_but_relayed: usize,
    /// Bytes the server relayed for the pair's sessions.
    pub server_relayed_bytes: u64,
    /// Error kinds of failed runs.
    pub errors: Vec<String>,
    /// Their one-line reasons.
    pub error_messages: Vec<String>,
    /// `agrees`, `worse-than-theory`, `better-than-theory`,
    /// `wrong-transport` (an A without UDP connected, but not over TCP), or
    /// `direct-but-relayed` (see [`PairResult::direct_but_relayed`]).
    pub verdict: &'static str,
}

fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[((v.len() as f64 - 1.0) * q).round() as usize])
}

/// A lab with a server; the agents' common arguments.
pub struct Running {
    pub lab: Lab,
    pub fingerprint: String,
}

/// Starts punch-server on the lab's server host.
pub fn start_server(lab: &mut Lab) -> Result<String> {
    let mut cmd = in_ns(&lab.server_ns, bin("punch-server")?);
    cmd.arg("--listen")
        .arg(format!("{SERVER_IP}:3478"))
        .arg("--alt-listen")
        .arg(format!("{}:3479", super::SERVER_IP2))
        .args(["--http", "127.0.0.1:8080", "--data-dir"])
        .arg(lab.path("server-data"));
    // PUNCH_LAB_SERVER_LOG overrides the server's filter (e.g.
    // `info,punch_server=trace` shows dropped relay frames).
    let filter = std::env::var("PUNCH_LAB_SERVER_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("PUNCH_LOG", filter);
    let log = lab.path("server.log");
    let mut p = Proc::spawn("punch-server", cmd, Some(&log))?;
    let line = p.wait_line("punch-server udp=", Duration::from_secs(20))?;
    let fp = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fingerprint="))
        .context("fingerprint in the server's line")?
        .to_string();
    lab.keep(p);
    // Port-mapping daemons learn their address from the server's STUN.
    lab.start_port_mapping()?;
    Ok(fp)
}

/// What the lab's server says at `path` of its HTTP API (read inside the
/// server's namespace).
pub fn server_json(lab: &Lab, path: &str) -> Result<serde_json::Value> {
    let out = super::sh(in_ns(&lab.server_ns, "curl").args([
        "-sf",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:8080{path}"),
    ]))?;
    serde_json::from_str(&out).with_context(|| format!("the server's {path}"))
}

/// Bytes the lab's server relayed for punch session `session` (its
/// `/api/v1/connects`), 0 when it relayed none or holds no binding.
pub fn session_relayed_bytes(lab: &Lab, session: &str) -> Result<u64> {
    let c = server_json(lab, "/api/v1/connects")?;
    Ok(c.as_array()
        .into_iter()
        .flatten()
        .find(|c| c["session"] == session)
        .and_then(|c| c["relayed_bytes"].as_u64())
        .unwrap_or(0))
}

/// `punch-agent` with the lab server's address, inside `ns`.
pub fn agent_cmd(ns: &str, fp: &str, punch_timeout: f64) -> Result<std::process::Command> {
    let mut cmd = in_ns(ns, bin("punch-agent")?);
    cmd.arg("--server")
        .arg(format!("{SERVER_IP}:3478"))
        .args(["--server-fingerprint", fp])
        .arg("--punch-timeout")
        .arg(punch_timeout.to_string());
    crate::harness::clear_agent_env(&mut cmd);
    Ok(cmd)
}

/// Starts `punch-agent serve --id ID` in `ns` (with the arguments its site
/// needs, [`super::Site::agent_args`]) and waits for registration.
pub fn serve(
    lab: &mut Lab,
    ns: &str,
    id: &str,
    fp: &str,
    punch_timeout: f64,
    udp: bool,
) -> Result<()> {
    serve_with(lab, ns, id, fp, punch_timeout, udp, &[])
}

/// [`serve`] with more arguments.
pub fn serve_with(
    lab: &mut Lab,
    ns: &str,
    id: &str,
    fp: &str,
    punch_timeout: f64,
    udp: bool,
    extra: &[String],
) -> Result<()> {
    let mut cmd = agent_cmd(ns, fp, punch_timeout)?;
    cmd.args(["serve", "--events", "--id", id, "--key-file"])
        .arg(lab.path(&format!("{id}.key")))
        .args(lab.agent_args_for(ns))
        .args(extra);
    let log = lab.path(&format!("{id}.log"));
    // Its events (stdout) go to the log too: scenarios count them there.
    let mut p = Proc::spawn_tee(id, cmd, &log)?;
    // The agent's event stream (serve --events), not its log lines.
    p.wait_line(r#""event":"registered""#, Duration::from_secs(20))
        .with_context(|| {
            format!(
                "agent {id} in {ns} did not register; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
    // A worker has classified its NAT long before anyone dials it; so does
    // the lab's (a UDP-less site has nothing to classify).
    // The check starts beside the handshake, so its event may come first.
    const CLASSIFIED: &str = r#""event":"nat_classified""#;
    if udp && !p.seen.iter().any(|l| l.contains(CLASSIFIED)) {
        if let Err(e) = p.wait_line(CLASSIFIED, Duration::from_secs(10)) {
            eprintln!("agent {id} in {ns}: NAT check not done: {e:#}");
        }
    }
    lab.keep(p);
    Ok(())
}

/// Two one-host sites behind NATs `a` and `b`, the server, and
/// `worker-b` serving on B's host: what the demo, failover and throughput
/// scenarios start from.
pub struct PairLab {
    pub lab: Lab,
    /// The server's fingerprint.
    pub fp: String,
    /// Site indices of A and B.
    pub sa: usize,
    pub sb: usize,
    /// Host namespaces of A and B.
    pub ns_a: String,
    pub ns_b: String,
}

/// Builds a [`PairLab`].
pub fn pair_lab(a: impl Into<SiteType>, b: impl Into<SiteType>, impair: Impair) -> Result<PairLab> {
    pair_lab_with(a, b, impair, &[])
}

/// [`pair_lab`] with more arguments for worker-b's `serve`.
pub fn pair_lab_with(
    a: impl Into<SiteType>,
    b: impl Into<SiteType>,
    impair: Impair,
    extra: &[String],
) -> Result<PairLab> {
    let (a, b) = (a.into(), b.into());
    let mut lab = Lab::new()?;
    let site = |s: SiteType| SiteSpec {
        nat: s.nat,
        hosts: 1,
        impair,
        port_mapping: s.port_mapping,
        ipv6: s.ipv6,
    };
    let sa = lab.add_site(&site(a))?;
    let sb = lab.add_site(&site(b))?;
    let fp = start_server(&mut lab)?;
    let ns_a = lab.sites[sa].hosts[0].clone();
    let ns_b = lab.sites[sb].hosts[0].clone();
    serve_with(
        &mut lab,
        &ns_b,
        "worker-b",
        &fp,
        3.0,
        b.nat.has_udp(),
        extra,
    )?;
    Ok(PairLab {
        lab,
        fp,
        sa,
        sb,
        ns_a,
        ns_b,
    })
}

/// Runs the matrix.
pub fn run_matrix(opts: &MatrixOpts) -> Result<Vec<PairResult>> {
    let mut lab = Lab::new()?;
    let mut a_site = Vec::new();
    let mut b_site = Vec::new();
    for t in &opts.types {
        let spec = SiteSpec {
            nat: t.nat,
            hosts: 1,
            impair: opts.impair,
            port_mapping: t.port_mapping,
            ipv6: t.ipv6,
        };
        a_site.push(lab.add_site(&spec)?);
        b_site.push(lab.add_site(&spec)?);
    }
    let same = if opts.same_nat {
        Some(lab.add_site(&SiteSpec {
            nat: NatType::PortRestricted,
            hosts: 2,
            impair: opts.impair,
            port_mapping: None,
            ipv6: false,
        })?)
    } else {
        None
    };
    let fp = start_server(&mut lab)?;
    for (i, t) in opts.types.iter().enumerate() {
        let ns = lab.sites[b_site[i]].hosts[0].clone();
        serve(
            &mut lab,
            &ns,
            &b_id(t),
            &fp,
            opts.punch_timeout,
            t.nat.has_udp(),
        )?;
    }
    if let Some(s) = same {
        let ns = lab.sites[s].hosts[1].clone();
        serve(&mut lab, &ns, "b-same-nat", &fp, opts.punch_timeout, true)?;
    }
    // (A name, B name, A host namespace, target id, theory, reason, A site
    // to reset between runs, does A have UDP)
    type Pair = (
        String,
        String,
        String,
        String,
        Expect,
        &'static str,
        Option<usize>,
        bool,
    );
    let mut pairs: Vec<Pair> = Vec::new();
    for (i, a) in opts.types.iter().enumerate() {
        for b in opts.types.iter() {
            if !opts.with.is_empty() && !opts.with.contains(a) && !opts.with.contains(b) {
                continue;
            }
            let (e, why) = site_theory(*a, *b);
            pairs.push((
                a.to_string(),
                b.to_string(),
                lab.sites[a_site[i]].hosts[0].clone(),
                b_id(b),
                e,
                why,
                Some(a_site[i]),
                a.nat.has_udp(),
            ));
        }
    }
    if let Some(s) = same {
        pairs.push((
            "same-nat".into(),
            "same-nat".into(),
            lab.sites[s].hosts[0].clone(),
            "b-same-nat".into(),
            Expect::Direct,
            "both hosts share one NAT without hairpinning: their LAN candidates reach each other",
            None,
            true,
        ));
    }
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new((pairs.len() * opts.runs) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {msg} [{elapsed_precise}]",
            )
            .expect("valid template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let limit = Duration::from_secs_f64(opts.punch_timeout + 20.0);
    let mut results = Vec::new();
    for (a, b, ns, target, expect, reason, reset, a_udp) in pairs {
        bar.set_message(format!("{a} -> {b}"));
        let (mut times, mut rtts, mut rtt_ms) = (Vec::new(), Vec::new(), Vec::new());
        let (mut connected, mut direct, mut upgraded, mut relayed, mut tcp) = (0, 0, 0, 0, 0);
        let mut via_mapped = 0;
        let mut strategies = std::collections::BTreeMap::new();
        let mut relay_reasons = std::collections::BTreeMap::new();
        let mut families = std::collections::BTreeMap::new();
        let mut errors = Vec::new();
        let mut error_messages = Vec::new();
        let (mut direct_but_relayed, mut server_relayed) = (0, 0);
        for run_no in 0..opts.runs {
            // Each run's agent is new: forget the NAT mappings that earlier
            // runs' agents left (a 64-port block would otherwise fill up and
            // collide, which measures the lab, not punching).
            if let Some(site) = reset.filter(|_| !opts.keep_mappings) {
                lab.flush_conntrack(site)?;
            }
            let mut cmd = agent_cmd(&ns, &fp, opts.punch_timeout)?;
            cmd.args(["connect", &target, "--json", "--timeout"])
                .arg((opts.punch_timeout + 15.0).to_string())
                .args(&opts.agent_args)
                .args(lab.agent_args_for(&ns));
            if std::env::var_os("PUNCH_LAB_KEEP").is_some() {
                cmd.env("PUNCH_LOG", "info");
            }
            let r = run(cmd, limit)?;
            if std::env::var_os("PUNCH_LAB_KEEP").is_some() {
                let _ = std::fs::write(
                    lab.path(&format!("connect-{a}-{b}-{run_no}.log")),
                    format!("{}\n--- stdout:\n{}", r.stderr, r.stdout),
                );
            }
            let j: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap_or_default();
            if r.code == Some(0) {
                connected += 1;
                // What the server relayed for this run's session, read
                // once the dialer is gone.
                let relayed_now = match j["session"].as_str() {
                    Some(s) => session_relayed_bytes(&lab, s)?,
                    None => 0,
                };
                server_relayed += relayed_now;
                if let Some(st) = j["strategy"].as_str() {
                    *strategies.entry(st.to_string()).or_insert(0) += 1;
                }
                if let Some(f) = j["family"].as_str() {
                    *families.entry(f.to_string()).or_insert(0) += 1;
                }
                if let Some(why) = j["relay_reason"].as_str() {
                    *relay_reasons.entry(why.to_string()).or_insert(0) += 1;
                }
                if j["path"] == "direct" {
                    direct += 1;
                    if j["initial_path"] == "direct" && relayed_now > 0 {
                        direct_but_relayed += 1;
                    }
                    if j["via_mapped"] == true {
                        via_mapped += 1;
                    }
                    if j["initial_path"] == "relayed" {
                        upgraded += 1;
                    }
                } else if j["path"] == "relayed" {
                    relayed += 1;
                }
                if j["transport"] == "tcp" {
                    tcp += 1;
                }
                let ms = j["connect_ms"].as_f64().unwrap_or(0.0);
                let rtt = j["rtt_ms"].as_f64().unwrap_or(0.0);
                times.push(ms);
                if rtt > 0.0 {
                    rtts.push(ms / rtt);
                    if j["path"] == "direct" {
                        rtt_ms.push(rtt);
                    }
                }
            } else {
                errors.push(
                    j["error"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("exit {:?}: {}", r.code, r.stderr.trim())),
                );
                error_messages.push(j["message"].as_str().unwrap_or_default().to_string());
            }
            bar.inc(1);
        }
        let runs = opts.runs;
        let direct_rate = direct as f64 / runs as f64;
        // An A without UDP can only carry the connection over TCP. (An A
        // with UDP normally relays over UDP, but may legitimately land on
        // TCP when its QUIC handshake to the server loses a packet and the
        // WebSocket wins the race: not judged.)
        let wrong_transport = !a_udp && tcp < connected;
        let verdict = match expect {
            _ if direct_but_relayed > 0 => "direct-but-relayed",
            Expect::Direct if direct < runs => "worse-than-theory",
            Expect::NeedsPredictionOrRelay | Expect::RelayOverTcp if direct > 0 => {
                "better-than-theory"
            }
            _ if wrong_transport => "wrong-transport",
            _ => "agrees",
        };
        results.push(PairResult {
            a,
            b,
            expect,
            reason,
            runs,
            connected,
            direct,
            upgraded,
            relayed,
            via_mapped,
            strategies,
            relay_reasons,
            families,
            tcp,
            success_rate: connected as f64 / runs as f64,
            direct_rate,
            median_ms: quantile(&mut times, 0.5),
            p95_ms: quantile(&mut times, 0.95),
            median_rtts: quantile(&mut rtts, 0.5),
            p95_rtts: quantile(&mut rtts, 0.95),
            median_rtt_ms: quantile(&mut rtt_ms, 0.5),
            direct_but_relayed,
            server_relayed_bytes: server_relayed,
            errors,
            error_messages,
            verdict,
        });
    }
    bar.finish_and_clear();
    if let Some(dir) = &opts.screenshots {
        // The figures matter more than the pictures: a failed screenshot
        // is reported, not fatal.
        if let Err(e) = screenshot_status_page(&lab, dir) {
            eprintln!("warning: no status page screenshots: {e:#}");
        }
    }
    Ok(results)
}

/// Screenshots the server's status page, as the matrix left it, from a
/// browser in the server's namespace (where its HTTP port listens).
fn screenshot_status_page(lab: &Lab, dir: &std::path::Path) -> Result<()> {
    let prefix = ["ip", "netns", "exec", lab.server_ns.as_str()];
    crate::browser::status_page_screenshots(
        "http://127.0.0.1:8080/",
        &lab.path("browser"),
        &prefix,
        dir,
    )
}

/// The worker id of the matrix's B agent for a site type (`+` is not
/// allowed in ids: `b-symmetric.upnp`).
fn b_id(t: &SiteType) -> String {
    format!("b-{}", t.to_string().replace('+', "."))
}
