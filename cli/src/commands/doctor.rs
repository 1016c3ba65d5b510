//! `punch-agent doctor`: everything that decides whether this host can
//! reach other workers, one line each with a verdict and, when it is not
//! ok, the fix. With `--to WORKER` it also says what a connect to WORKER
//! would try, and tries it.

use crate::args::Common;
use crate::config::{config, port_mapping_settings};
use punch_agent::portmap::PortMapping;
use punch_agent::{Agent, AgentConfig, AgentError, ConnectOptions};
use punch_protocol::allocator::Allocator;
use punch_protocol::signal::{NatBehaviour, NatClass, Transport};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    verdict: Verdict,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn add(
        &mut self,
        check: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        fix: Option<String>,
    ) {
        self.0.push(Check {
            check,
            verdict,
            detail: detail.into(),
            fix,
        });
    }

    fn healthy(&self) -> bool {
        self.0.iter().all(|c| c.verdict != Verdict::Fail)
    }

    fn print(&self, json: bool) {
        if json {
            let v = serde_json::json!({"healthy": self.healthy(), "checks": self.0});
            println!("{v}");
            return;
        }
        for c in &self.0 {
            let mark = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            println!("{mark}  {:<16} {}", c.check, c.detail);
            if let Some(f) = &c.fix {
                println!("      {:<16} fix: {f}", "");
            }
        }
        println!(
            "{}",
            if self.healthy() {
                "healthy: nothing here stops this host from reaching other workers"
            } else {
                "not healthy: see the FAIL lines"
            }
        );
    }
}

/// What to do about a registration that failed, by its error kind.
fn fix_for(e: &AgentError, channel: &str) -> Option<String> {
    if e.to_string().contains("invalid peer certificate") {
        return Some("the TLS key that answered is not the pinned one: pin the server's (`punch-server fingerprint`), or with a front that terminates TLS give --server-ca for its certificate".into());
    }
    Some(match e.kind() {
        "bad_token" => "give the server's token: --token or PUNCH_TOKEN".into(),
        "fingerprint_mismatch" => {
            "pin the key the server prints with `punch-server fingerprint` (--server-fingerprint); if it did not change, something in between is not the server".into()
        }
        "id_taken" => "another key holds this --id: use that agent's --key-file, or `punch-server forget ID` on the server".into(),
        "bad_version" => "run the same punch version on the agent and the server".into(),
        "server_unreachable" | "timeout" if channel == "udp" => {
            "allow outbound UDP to the server's port; without it the agent falls back to the TCP channel (relayed peers only)".into()
        }
        "server_unreachable" | "timeout" => {
            "allow outbound TCP to the server's port (or give --server-tcp wss://FRONT/ws, or --proxy http://PROXY:PORT)".into()
        }
        _ => return None,
    })
}

/// Registers one agent over one channel; returns it and how long it took.
async fn register(
    cfg: AgentConfig,
    limit: Duration,
) -> Result<(Agent, SocketAddr, Duration), AgentError> {
    let t0 = Instant::now();
    let agent = Agent::start(cfg).await?;
    match agent.registered(limit).await {
        Ok(observed) => Ok((agent, observed, t0.elapsed())),
        Err(e) => {
            agent.close().await;
            Err(e)
        }
    }
}

fn nat_line(n: Option<NatClass>, a: Allocator, r: &mut Report) {
    let alloc = punch_protocol::view::AllocatorView::from(a).summary();
    match n {
        None => r.add(
            "NAT",
            Verdict::Warn,
            "not classified (no answer from the server's second STUN address)",
            Some("start punch-server with --alt-listen OTHER_IP:PORT for the full RFC 5780 tests".into()),
        ),
        Some(n) if n.public => r.add("NAT", Verdict::Ok, "none: this host's address is public", None),
        Some(n) if n.mapping == NatBehaviour::EndpointIndependent => r.add(
            "NAT",
            Verdict::Ok,
            format!("{} (easy: one mapping for every peer), ports {alloc}", n.label()),
            None,
        ),
        Some(n) => r.add(
            "NAT",
            Verdict::Warn,
            format!(
                "{} (hard: a new mapping per peer), ports {alloc}: direct paths need prediction, a block scan or the birthday method, and to another hard NAT mostly the relay",
                n.label()
            ),
            Some("a port mapping on the gateway (PCP, NAT-PMP or UPnP), endpoint-independent mapping on the NAT (Cloud NAT: --enable-endpoint-independent-mapping), or IPv6".into()),
        ),
    }
}

/// What a connect between our NAT and the peer's would try first.
fn plan(
    ours: Option<NatClass>,
    theirs: Option<NatClass>,
    their_transport: Transport,
    our_udp: bool,
) -> String {
    if !our_udp {
        return "the relay over the TCP channel (no UDP here)".into();
    }
    if their_transport == Transport::Tcp {
        return "the relay (the peer reaches the server only over TCP); it moves to a direct path if one opens".into();
    }
    let hard = |n: Option<NatClass>| {
        n.is_some_and(|n| !n.public && n.mapping != NatBehaviour::EndpointIndependent)
    };
    let known =
        |n: Option<NatClass>| n.is_some_and(|n| n.public || n.mapping != NatBehaviour::Unknown);
    match (hard(ours), hard(theirs)) {
        _ if !known(ours) || !known(theirs) => {
            "a plain punch (simultaneous probes to the addresses the server saw), the relay after --relay-after if none answers".into()
        }
        (false, false) => "a plain punch: both NATs keep one mapping per socket".into(),
        (true, true) => {
            "prediction or a block scan if either NAT counts or allocates from a block, else the relay (both random)".into()
        }
        _ => "a punch with prediction or a block scan when the hard side's ports are predictable, else the birthday method (many mappings against a spray)".into(),
    }
}

fn global_ipv6() -> Vec<std::net::Ipv6Addr> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| match i.ip() {
            IpAddr::V6(v) if !v.is_loopback() && (v.segments()[0] & 0xe000) == 0x2000 => Some(v),
            _ => None,
        })
        .collect()
}

/// The MTU of the interface a packet to `server` leaves by.
fn mtu_towards(server: SocketAddr) -> Option<(String, u32)> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(server).ok()?;
    let local = s.local_addr().ok()?.ip();
    let iface = if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .find(|i| i.ip() == local)?
        .name;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu")).ok()?;
    Some((iface, mtu.trim().parse().ok()?))
}

/// A configuration the agent refused at start: the one line that matters.
fn config_failed(mut r: Report, e: AgentError, json: bool) -> ExitCode {
    r.0.retain(|c| c.check != "config");
    r.add(
        "config",
        Verdict::Fail,
        e.to_string(),
        Some("see `punch-agent --help`".into()),
    );
    r.print(json);
    ExitCode::from(2)
}

/// Runs every check and prints the report; exit 0 when no check failed,
/// 1 otherwise (2 for a configuration the checks cannot even start with).
pub async fn main(c: &Common, to: Option<&str>, json: bool, timeout: f64) -> ExitCode {
    let mut r = Report::default();
    let base = match config(c, false).and_then(|cfg| Ok((cfg, port_mapping_settings(c)?))) {
        Ok(b) => b,
        Err(e) => {
            r.add(
                "config",
                Verdict::Fail,
                e.to_string(),
                Some("see `punch-agent --help`".into()),
            );
            r.print(json);
            return ExitCode::from(2);
        }
    };
    let (mut cfg, pm_settings) = base;
    cfg.port_mapping.mode = PortMapping::Off;
    let server = cfg
        .server
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    r.add(
        "config",
        Verdict::Ok,
        format!("server {server}, pinned key {}", cfg.server_fingerprint),
        None,
    );
    let limit = Duration::from_secs(3);
    let ws_only = server.starts_with("wss://") || server.starts_with("ws://");

    // The TCP channel's check runs beside the UDP one (both bounded).
    let tcp_task = (!c.no_tcp).then(|| {
        let mut t = cfg.clone();
        t.nat_check = false;
        t.server = match (&cfg.server_tcp, ws_only) {
            (Some(s), _) => s.clone(),
            (None, true) => server.clone(),
            (None, false) => format!("wss://{server}/ws"),
        };
        let proxy = c
            .proxy
            .clone()
            .or_else(|| {
                ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
                    .iter()
                    .find_map(|v| std::env::var(v).ok())
            })
            .filter(|p| !p.is_empty());
        let via = proxy
            .map(|p| format!(" through the proxy {p}"))
            .unwrap_or_default();
        let url = t.server.clone();
        let task = tokio::spawn(register(t, Duration::from_secs(5)));
        (task, url, via)
    });

    // The server over UDP (QUIC), with the NAT check on that socket.
    let mut udp_agent = None;
    let mut fp_seen = None;
    if ws_only {
        r.add(
            "server over UDP",
            Verdict::Skip,
            "--server names a WebSocket: the TCP channel only",
            None,
        );
    } else {
        let mut u = cfg.clone();
        u.udp_only = true;
        match register(u, limit).await {
            Ok((a, observed, took)) => {
                r.add(
                    "server over UDP",
                    Verdict::Ok,
                    format!(
                        "registered over QUIC in {} ms; the server sees us at {observed}",
                        took.as_millis()
                    ),
                    None,
                );
                fp_seen = Some(Ok(()));
                udp_agent = Some(a);
            }
            Err(e) if e.kind() == "config" => return config_failed(r, e, json),
            Err(e) => {
                let v = if e.kind() == "fingerprint_mismatch" {
                    Verdict::Fail
                } else {
                    Verdict::Warn
                };
                if e.kind() == "fingerprint_mismatch" || e.kind() == "bad_token" {
                    fp_seen.get_or_insert(Err(e.to_string()));
                }
                r.add("server over UDP", v, e.to_string(), fix_for(&e, "udp"));
            }
        }
    }

    // The TCP channel (TLS + WebSocket), through the proxy if one is set.
    let mut tcp_agent = None;
    if let Some((tcp_task, url, via)) = tcp_task {
        let done = tcp_task
            .await
            .unwrap_or_else(|e| Err(AgentError::Io(format!("the TCP check: {e}"))));
        match done {
            Ok((a, _, took)) => {
                r.add(
                    "server over TCP",
                    Verdict::Ok,
                    format!(
                        "registered over TLS + WebSocket at {url}{via} in {} ms",
                        took.as_millis()
                    ),
                    None,
                );
                fp_seen = Some(Ok(()));
                tcp_agent = Some(a);
            }
            Err(e) if e.kind() == "config" => return config_failed(r, e, json),
            Err(e) => {
                if e.kind() == "fingerprint_mismatch" || e.kind() == "bad_token" {
                    fp_seen.get_or_insert(Err(e.to_string()));
                }
                let v = if udp_agent.is_some() {
                    Verdict::Warn
                } else {
                    Verdict::Fail
                };
                r.add(
                    "server over TCP",
                    v,
                    format!("{url}{via}: {e}"),
                    fix_for(&e, "tcp"),
                );
            }
        }
    } else {
        r.add("server over TCP", Verdict::Skip, "--no-tcp", None);
    }
    match fp_seen {
        Some(Ok(())) => r.add(
            "pinned key",
            Verdict::Ok,
            "the server proved the pinned key",
            None,
        ),
        Some(Err(e)) => r.add(
            "pinned key",
            Verdict::Fail,
            e,
            Some("see the server lines above".into()),
        ),
        None => r.add(
            "pinned key",
            Verdict::Fail,
            "the server answered on neither channel",
            Some("check --server (host and port) and that punch-server runs there".into()),
        ),
    }
    if udp_agent.is_none() && tcp_agent.is_none() {
        let fail =
            r.0.iter()
                .any(|c| c.check == "server over UDP" && c.verdict == Verdict::Warn);
        if fail {
            if let Some(c) = r.0.iter_mut().find(|c| c.check == "server over UDP") {
                c.verdict = Verdict::Fail;
            }
        }
    }

    // The server's clock, from the TCP channel's upgrade (whole seconds).
    match tcp_agent.as_ref().and_then(|a| a.server_clock_skew_ms()) {
        Some(ms) if ms.abs() <= 2_000 => r.add(
            "clock",
            Verdict::Ok,
            "within 2 s of the server's (its Date header counts whole seconds)",
            None,
        ),
        Some(ms) => r.add(
            "clock",
            Verdict::Warn,
            format!("{:.0} s {} the server's", ms.abs() as f64 / 1e3, if ms > 0 { "behind" } else { "ahead of" }),
            Some("sync this host's clock (NTP: systemd-timesyncd, chrony); certificates of a TLS front and logs side by side need it".into()),
        ),
        None => r.add("clock", Verdict::Skip, "no TCP channel to read the server's time from", None),
    }

    // Our NAT, from the UDP agent's check (it ran beside registration).
    match &udp_agent {
        Some(a) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), a.nat_checked()).await;
            nat_line(a.nat_class(), a.nat_allocator(), &mut r);
        }
        None => r.add(
            "NAT",
            Verdict::Skip,
            "no UDP to the server: nothing to classify",
            None,
        ),
    }

    // A port mapping on the gateway.
    if c.port_mapping == "off" {
        r.add("port mapping", Verdict::Skip, "--port-mapping off", None);
    } else {
        match punch_agent::portmap::nat_check(&pm_settings, cfg.bind, &server).await {
            None => r.add(
                "port mapping",
                Verdict::Skip,
                "not asked (a loopback socket or server)",
                None,
            ),
            Some(p) => match (&p.mapped_addr, p.protocol) {
                (Some(m), Some(proto)) => r.add(
                    "port mapping",
                    Verdict::Ok,
                    format!(
                        "{proto} on gateway {} maps {m} to us: peers can reach it directly",
                        p.gateway.as_deref().unwrap_or("?")
                    ),
                    None,
                ),
                _ => r.add(
                    "port mapping",
                    Verdict::Skip,
                    format!(
                        "gateway {} grants none (PCP, NAT-PMP, UPnP): fine, punching does without",
                        p.gateway.as_deref().unwrap_or("none")
                    ),
                    None,
                ),
            },
        }
    }

    let v6 = global_ipv6();
    match v6.first() {
        Some(a) => r.add(
            "IPv6",
            Verdict::Ok,
            format!("global address {a}: peers with IPv6 meet it without NAT"),
            None,
        ),
        None => r.add(
            "IPv6",
            Verdict::Skip,
            "no global IPv6 address: IPv4 only (fine)",
            None,
        ),
    }

    let server_addr = tokio::net::lookup_host(
        server
            .trim_start_matches("wss://")
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap_or(""),
    )
    .await
    .ok()
    .and_then(|mut a| a.next());
    match server_addr.and_then(mtu_towards) {
        Some((iface, mtu)) if mtu < 1280 => r.add(
            "MTU",
            Verdict::Fail,
            format!("{iface}: {mtu} bytes, below QUIC's 1200-byte datagrams plus headers"),
            Some(format!("raise the MTU of {iface} to 1280 or more")),
        ),
        Some((iface, mtu)) => r.add("MTU", Verdict::Ok, format!("{iface}: {mtu} bytes"), None),
        None => r.add(
            "MTU",
            Verdict::Skip,
            "no route to the server's address to read it from",
            None,
        ),
    }

    if let Some(target) = to {
        let agent = udp_agent.as_ref().or(tcp_agent.as_ref());
        match agent {
            None => r.add(
                "to worker",
                Verdict::Fail,
                format!("{target}: no server to ask"),
                None,
            ),
            Some(a) => {
                let found = a
                    .list(None, None)
                    .await
                    .ok()
                    .and_then(|l| l.into_iter().find(|w| w.id == target));
                match found {
                    None => r.add(
                        "to worker",
                        Verdict::Fail,
                        format!("{target} is not online or stale on this server"),
                        Some(format!(
                            "start it (`punch-agent serve --id {target}`) against the same server"
                        )),
                    ),
                    Some(w) => {
                        let theirs = w
                            .nat
                            .map(|n| n.label())
                            .unwrap_or_else(|| "unreported".into());
                        r.add(
                            "to worker",
                            Verdict::Ok,
                            format!(
                                "{target} ({}, NAT {theirs}): a connect tries {}",
                                w.state.as_str(),
                                plan(a.nat_class(), w.nat, w.transport, udp_agent.is_some())
                            ),
                            None,
                        );
                        let opts = ConnectOptions::default()
                            .timeout(Duration::from_secs_f64(timeout.clamp(1.0, 300.0)));
                        match a.connect_with(target, opts).await {
                            Ok(pc) => {
                                let how = pc
                                    .path
                                    .strategy
                                    .map(|s| s.as_str())
                                    .or(pc.path.relay_reason.map(|r| r.as_str()))
                                    .unwrap_or("-");
                                let (kind, remote, transport) = crate::output::path_now(&pc);
                                r.add(
                                    "connect",
                                    Verdict::Ok,
                                    format!(
                                        "{} path ({how}) {} in {} ms",
                                        kind.as_str(),
                                        if transport == Transport::Tcp {
                                            "through the server's relay over the TCP channel"
                                                .to_string()
                                        } else {
                                            format!("to {remote} over UDP")
                                        },
                                        pc.path.connect_time.as_millis()
                                    ),
                                    None,
                                );
                                pc.close().await;
                            }
                            Err(e) => r.add("connect", Verdict::Fail, e.to_string(), None),
                        }
                    }
                }
            }
        }
    }
    for a in [udp_agent, tcp_agent].into_iter().flatten() {
        a.close().await;
    }
    r.print(json);
    if r.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
