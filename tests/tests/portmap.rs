//! Port mapping (PCP, NAT-PMP, UPnP IGD) against a real daemon, miniupnpd,
//! on lab gateways (root; skipped otherwise), and against a fake gateway
//! on loopback that answers garbage (no root).
//!
//! Lab tests build their own namespaces (removed when the `Lab` drops,
//! also on a failed assertion) and send traffic only inside them.

use punch_lab::harness::{bin, run, Proc, ServerProc};
use punch_lab::lab::matrix::{agent_cmd, start_server};
use punch_lab::lab::nat::{NatType, PortMapDaemon};
use punch_lab::lab::{in_ns, sh, Impair, Lab, SiteSpec, SERVER_IP};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One lab at a time in this binary (the machine has two cores).
static LAB: Mutex<()> = Mutex::new(());

fn one_lab_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|e| e.into_inner())
}

fn lab_ready() -> bool {
    punch_lab::lab::lab_ready(
        "the port-mapping lab",
        &[("miniupnpd", "miniupnpd-nftables")],
    )
}

/// Waits until `path` has a line containing `needle`; returns the line.
/// Polls the log (the agent writes it), at most `limit`.
fn wait_log(path: &Path, needle: &str, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(
            Instant::now() < end,
            "no {needle:?} in {} within {limit:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of `path` containing `needle`.
fn count_log(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits for `cond`, polling, at most `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn site(nat: NatType, d: Option<PortMapDaemon>) -> SiteSpec {
    SiteSpec {
        nat,
        hosts: 1,
        impair: Impair::default(),
        port_mapping: d,
        ipv6: false,
    }
}

const PCP: PortMapDaemon = PortMapDaemon {
    pcp: true,
    nat_pmp: false,
    upnp: false,
};
const NAT_PMP: PortMapDaemon = PortMapDaemon {
    pcp: false,
    nat_pmp: true,
    upnp: false,
};
const IGD: PortMapDaemon = PortMapDaemon {
    pcp: false,
    nat_pmp: false,
    upnp: true,
};

/// `punch-agent serve --id ID` in `ns` with `extra` flags, logging the
/// port-mapping client at debug to `<lab>/<id>.log`.
fn serve(lab: &Lab, ns: &str, fp: &str, id: &str, extra: &[&str]) -> (Proc, std::path::PathBuf) {
    let mut cmd = agent_cmd(ns, fp, 3.0).unwrap();
    cmd.args(["serve", "--id", id, "--key-file"])
        .arg(lab.path(&format!("{id}.key")))
        .args(extra)
        .env("PUNCH_LOG", "info,punch_portmap=debug");
    let log = lab.path(&format!("{id}.log"));
    let mut p = Proc::spawn(id, cmd, Some(&log)).unwrap();
    p.wait_line("serving as", Duration::from_secs(20))
        .unwrap_or_else(|e| {
            panic!(
                "{id}: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    (p, log)
}

/// The internal port of the daemon's lease for host `ip` (lines like
/// `UDP:46520:10.1.0.10:46520:1764000000:PCP MAP …`).
fn leased_port(lab: &Lab, s: usize, host: &str) -> Option<(u16, u16)> {
    lab.port_mapping_leases(s).iter().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == "UDP" && f[2] == host)
            .then(|| Some((f[1].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

/// Sends a few datagrams from the server host to `to` and counts, with an
/// nftables counter in the host's namespace, how many arrive there from the
/// server on internal port `port`.
fn inbound_reaches(lab: &Lab, host_ns: &str, to: SocketAddr, port: u16) -> u64 {
    sh(in_ns(host_ns, "nft").args([
        "add table inet pmtest; add chain inet pmtest in { type filter hook input priority -300; policy accept; }",
    ]))
    .unwrap();
    sh(in_ns(host_ns, "nft").args([
        "add",
        "rule",
        "inet",
        "pmtest",
        "in",
        "ip",
        "saddr",
        &SERVER_IP.to_string(),
        "udp",
        "dport",
        &port.to_string(),
        "counter",
    ]))
    .unwrap();
    let count = || -> u64 {
        let out = sh(in_ns(host_ns, "nft").args(["list", "table", "inet", "pmtest"])).unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for _ in 0..5 {
        sh(in_ns(&lab.server_ns, "bash").args([
            "-c",
            &format!("echo -n punch-lab > /dev/udp/{}/{}", to.ip(), to.port()),
        ]))
        .unwrap();
        if count() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = count();
    let _ = sh(in_ns(host_ns, "nft").args(["delete", "table", "inet", "pmtest"]));
    n
}

#[test]
fn each_protocol_alone_maps_forwards_renews_and_deletes() {
    if !lab_ready() {
        return;
    }
    let _one = one_lab_at_a_time();
    let mut lab = Lab::new().unwrap();
    let cases = [(PCP, "PCP"), (NAT_PMP, "NAT-PMP"), (IGD, "UPnP")];
    let sites: Vec<usize> = cases
        .iter()
        .map(|(d, _)| lab.add_site(&site(NatType::Symmetric, Some(*d))).unwrap())
        .collect();
    let fp = start_server(&mut lab).unwrap();
    let mut agents = Vec::new();
    for (i, (_, label)) in cases.iter().enumerate() {
        let s = sites[i];
        let ns = lab.sites[s].hosts[0].clone();
        let host_ip = lab.sites[s].host_ips[0].to_string();
        // A short lifetime: renewed every 2 s.
        let (p, log) = serve(
            &lab,
            &ns,
            &fp,
            &format!("pm-{i}"),
            &["--port-mapping-lifetime", "4"],
        );
        let line = wait_log(
            &log,
            &format!("port mapping via {label}: "),
            Duration::from_secs(10),
        );
        let addr: SocketAddr = line
            .split(&format!("port mapping via {label}: "))
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        assert_eq!(
            addr.ip(),
            std::net::IpAddr::V4(lab.sites[s].public_ip),
            "{label}: {line}"
        );
        let (ext, internal) = leased_port(&lab, s, &host_ip)
            .unwrap_or_else(|| panic!("{label}: no lease: {:?}", lab.port_mapping_leases(s)));
        assert_eq!(ext, addr.port(), "{label}: the port the daemon gave");
        // A packet from the fake internet reaches the host through it.
        let n = inbound_reaches(&lab, &ns, addr, internal);
        assert!(n >= 1, "{label}: nothing arrived through {addr}");
        agents.push((p, log, s, host_ip, *label, addr));
    }
    // Renewed before it expires: two renewals (4 s) and still there.
    for (_, log, s, host_ip, label, _) in &agents {
        wait_until(
            &format!("{label}: two renewals"),
            Duration::from_secs(15),
            || count_log(log, "renewed") >= 2,
        );
        assert!(
            leased_port(&lab, *s, host_ip).is_some(),
            "{label}: lease gone after its lifetime although renewed"
        );
        assert!(!lab.port_mapping_rules(*s).unwrap().is_empty(), "{label}");
    }
    // Gone from the daemon after a clean shutdown (SIGTERM).
    for (p, log, s, host_ip, label, _) in &mut agents {
        let st = p.terminate(Duration::from_secs(10)).unwrap();
        assert!(st.success(), "{label}: {st:?}");
        assert!(
            count_log(log, "deleted") >= 1,
            "{label}: {}",
            std::fs::read_to_string(&*log).unwrap_or_default()
        );
        wait_until(
            &format!("{label}: mapping removed from the daemon"),
            Duration::from_secs(5),
            || {
                leased_port(&lab, *s, host_ip).is_none()
                    && lab.port_mapping_rules(*s).unwrap().is_empty()
            },
        );
    }
}

#[test]
fn port_mapping_off_sends_nothing_to_the_gateway() {
    if !lab_ready() {
        return;
    }
    let _one = one_lab_at_a_time();
    let mut lab = Lab::new().unwrap();
    let s = lab
        .add_site(&site(NatType::Symmetric, Some(PortMapDaemon::ALL)))
        .unwrap();
    let fp = start_server(&mut lab).unwrap();
    let ns = lab.sites[s].hosts[0].clone();
    // The daemon's own start-up sends nothing from the LAN.
    assert_eq!(lab.port_mapping_requests(s).unwrap(), (0, 0));
    let (mut p, log) = serve(&lab, &ns, &fp, "pm-off", &["--port-mapping", "off"]);
    // Long enough for a background attempt to have gone out: the NAT
    // classification (after registering) takes longer than a mapping.
    wait_log(&log, "NAT classified", Duration::from_secs(20));
    let mut cmd = agent_cmd(&ns, &fp, 3.0).unwrap();
    cmd.args(["nat-check", "--json", "--port-mapping", "off"]);
    let r = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.json().unwrap()["port_mapping"].is_null(), "{}", r.stdout);
    // A connect with it off too.
    let mut cmd = agent_cmd(&ns, &fp, 3.0).unwrap();
    cmd.env("PUNCH_PORT_MAPPING", "off")
        .args(["connect", "pm-off", "--json"]);
    let _ = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(
        lab.port_mapping_requests(s).unwrap(),
        (0, 0),
        "requests reached the gateway's PCP/NAT-PMP or SSDP port"
    );
    let daemon_log = std::fs::read_to_string(lab.sites[s].daemon_log.as_ref().unwrap()).unwrap();
    assert!(!daemon_log.contains("request received"), "{daemon_log}");
    assert!(lab.port_mapping_leases(s).is_empty());
    p.terminate(Duration::from_secs(10)).unwrap();
    // The counters do count: nat-check with port mapping on asks all three.
    let mut cmd = agent_cmd(&ns, &fp, 3.0).unwrap();
    cmd.args(["nat-check", "--json"]);
    let r = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    let pm = &j["port_mapping"];
    assert_eq!(pm["pcp"], true, "{j}");
    assert_eq!(pm["nat_pmp"], true, "{j}");
    assert_eq!(pm["upnp"], true, "{j}");
    assert_eq!(pm["protocol"], "pcp", "{j}");
    let mapped: SocketAddr = pm["mapped_addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        mapped.ip(),
        std::net::IpAddr::V4(lab.sites[s].public_ip),
        "{j}"
    );
    let (pmp, ssdp) = lab.port_mapping_requests(s).unwrap();
    assert!(pmp > 0 && ssdp > 0, "({pmp}, {ssdp})");
    // nat-check gives its mappings back.
    assert!(
        lab.port_mapping_leases(s).is_empty(),
        "{:?}",
        lab.port_mapping_leases(s)
    );
}

#[test]
fn symmetric_with_port_mapping_goes_direct_with_hard_peers() {
    if !lab_ready() {
        return;
    }
    let _one = one_lab_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("m.json");
    let mut cmd = Command::new(bin("punch-lab").unwrap());
    cmd.args([
        "matrix",
        "--types",
        "symmetric+upnp,symmetric,port-restricted,cloudnat",
        "--with",
        "symmetric+upnp",
        "--runs",
        "2",
        "--no-same-nat",
        "--strict",
        "--json",
    ])
    .arg(&json);
    let r = run(cmd, Duration::from_secs(600)).unwrap();
    println!("{}", r.stdout);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 7);
    for p in pairs {
        assert_eq!(p["direct"], p["runs"], "{p}");
        assert_eq!(p["via_mapped"], p["runs"], "through the mapping: {p}");
    }
}

/// A fake gateway on loopback answering every request with garbage.
fn garbage_gateway() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let n = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((len, from)) = s.recv_from(&mut buf) {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let reply: Vec<u8> = match k % 4 {
                0 => buf[..len.min(7)].to_vec(),
                1 => vec![0xff; 1400],
                2 => {
                    let mut b = buf[..len].to_vec();
                    if b.len() > 1 {
                        b[1] |= 0x80;
                    }
                    b
                }
                _ => vec![],
            };
            let _ = s.send_to(&reply, from);
        }
    });
    (addr, seen)
}

#[test]
fn a_garbage_gateway_does_not_hold_the_agent_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let (gw, seen) = garbage_gateway();
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let t = Instant::now();
    let p = s
        .serve(
            dir.path(),
            "garbage-gw",
            &[
                "--port-mapping-gateway",
                &gw.to_string(),
                "--port-mapping-protocols",
                "pcp,nat-pmp",
                "--http",
                &http.to_string(),
            ],
        )
        .unwrap();
    let registered = t.elapsed();
    assert!(registered < Duration::from_secs(10), "{registered:?}");
    // The gateway was asked and its answers refused and counted.
    wait_until("gateway asked", Duration::from_secs(10), || {
        seen.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    let mut status = serde_json::Value::Null;
    wait_until("gateway errors counted", Duration::from_secs(10), || {
        let body = punch_lab::harness::http_get(http, "/healthz").unwrap_or_default();
        status = serde_json::from_str(&body).unwrap_or_default();
        status["port_mapping"]["gateway_errors"]
            .as_u64()
            .is_some_and(|n| n > 0)
    });
    assert!(status["port_mapping"]["external"].is_null(), "{status}");
    // Connects are not held up either (one second at most for the
    // mapping attempt).
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "connect",
        "garbage-gw",
        "--json",
        "--port-mapping-gateway",
        &gw.to_string(),
        "--port-mapping-protocols",
        "pcp,nat-pmp",
    ]);
    let t = Instant::now();
    let r = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(r.json().unwrap()["path"], "direct");
    drop(p);
}
