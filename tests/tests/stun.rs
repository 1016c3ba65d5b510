//! STUN interop with real third-party software: Debian's `stun` client
//! (stund) asks punch-server for its mapping, coturn's RFC 5780 client
//! (`turnutils_natdiscovery`) classifies loopback against punch-server
//! `--alt-listen`, plain and padded, and a real coturn serves as the STUN
//! server for `punch-agent --stun` and, with two addresses, as the RFC 5780
//! server for `punch-agent nat-check --stun`.

use punch_lab::harness::{run, Proc, ServerProc};
use punch_protocol::stun;
use std::process::Command;
use std::time::Duration;

/// The tool, or `None` (skip) outside CI; in CI a missing tool fails.
fn tool(name: &str, package: &str) -> Option<()> {
    let missing = punch_lab::harness::missing_tools(&[(name, package)]);
    punch_lab::harness::ready(&format!("a test that needs `{name}`"), &missing).then_some(())
}

#[test]
fn third_party_stun_client_gets_the_right_mapping_from_punch_server() {
    let Some(()) = tool("stun", "stun-client") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let mut cmd = Command::new("stun");
    cmd.arg(s.udp.to_string()).args(["1", "-v"]);
    let r = run(cmd, Duration::from_secs(20)).unwrap();
    let out = format!("{}{}", r.stdout, r.stderr);
    let port = out
        .lines()
        .find_map(|l| l.strip_prefix("Opened port "))
        .and_then(|l| l.split_whitespace().next())
        .expect("stun prints the port it opened");
    assert!(
        out.contains(&format!("MappedAddress = 127.0.0.1:{port}")),
        "stun client output: {out}"
    );
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert!(
        health["stun"]["requests"].as_u64().unwrap() >= 1,
        "{health}"
    );
}

#[test]
fn coturn_serves_as_stun_server_for_the_agent() {
    let Some(()) = tool("turnserver", "coturn") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_turn, port) = coturn(dir.path(), &["127.0.0.1"], false, || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    });

    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let stun = format!("127.0.0.1:{port}");
    let _b = s.serve(dir.path(), "worker-s", &["--stun", &stun]).unwrap();
    let log = std::fs::read_to_string(dir.path().join("worker-s.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("STUN server reports our address") && l.contains(&stun))
        .unwrap_or_else(|| panic!("agent log has no answer from coturn: {log}"));
    let peers: serde_json::Value = serde_json::from_str(&s.http_get("/peers").unwrap()).unwrap();
    let observed = peers[0]["observed_addr"].as_str().unwrap();
    assert!(
        line.contains(&format!("mapped={observed}")),
        "coturn's answer {line:?} should be the address punch-server sees, {observed}"
    );
}

#[test]
fn stun_bench_validates_every_answer_from_punch_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let mut cmd = Command::new(punch_lab::harness::bin("punch-lab").unwrap());
    cmd.args([
        "stun-bench",
        "--seconds",
        "1",
        "--sockets",
        "2",
        "--window",
        "4",
        "--json",
        "--target",
    ])
    .arg(s.udp.to_string());
    let r = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(j["answered"].as_u64().unwrap() > 100, "{j}");
    assert_eq!(j["invalid"].as_u64(), Some(0), "{j}");
    // Load goes to loopback only.
    let mut cmd = Command::new(punch_lab::harness::bin("punch-lab").unwrap());
    cmd.args(["stun-bench", "--target", "192.0.2.1:3478"]);
    let r = run(cmd, Duration::from_secs(30)).unwrap();
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("loopback"), "{}", r.stderr);
}

/// Two consecutive UDP ports free on 127.0.0.1 and 127.0.0.2.
fn port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p == u16::MAX {
            continue;
        }
        let free = [("127.0.0.1", p + 1), ("127.0.0.2", p), ("127.0.0.2", p + 1)]
            .iter()
            .all(|a| std::net::UdpSocket::bind(*a).is_ok());
        if free {
            return p;
        }
    }
    panic!("no free pair of UDP ports on 127.0.0.1/127.0.0.2");
}

#[test]
fn nat_check_works_against_coturn_as_rfc5780_server() {
    let Some(()) = tool("turnserver", "coturn") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // coturn does RFC 5780 when it has two listening IPs of one family and
    // an alternate port (`port + 1`).
    let (_turn, port) = coturn(dir.path(), &["127.0.0.1", "127.0.0.2"], true, port_pair);

    let mut cmd = Command::new(punch_lab::harness::bin("punch-agent").unwrap());
    cmd.args([
        "nat-check",
        "--json",
        "--stun",
        &format!("127.0.0.1:{port}"),
    ]);
    let r = run(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    assert_eq!(j["udp"], "ok", "{j}");
    assert_eq!(j["other_addr"], format!("127.0.0.2:{}", port + 1), "{j}");
    // Loopback has no NAT.
    assert_eq!(j["mapping"], "endpoint-independent", "{j}");
    assert_eq!(j["filtering"], "endpoint-independent", "{j}");
    assert_eq!(j["port_preserved"], true, "{j}");
}

/// coturn's RFC 5780 NAT behaviour discovery client against punch-server
/// on 127.0.0.1 with `--alt-listen 127.0.0.2`: it must find OTHER-ADDRESS
/// and RESPONSE-ORIGIN in the answers, get the CHANGE-REQUEST answers from
/// the other address and port, and so classify loopback as endpoint-
/// independent mapping and filtering, with plain requests and with
/// 1500-byte PADDING (the answers then padded to the request's size).
#[test]
fn rfc5780_client_classifies_loopback_against_punch_server() {
    let Some(()) = tool("turnutils_natdiscovery", "coturn") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = port_pair();
    let listen = format!("127.0.0.1:{port}");
    let alt = format!("127.0.0.2:{}", port + 1);
    let s = ServerProc::start(dir.path(), &["--listen", &listen, "--alt-listen", &alt]).unwrap();
    for padded in [false, true] {
        let mut cmd = Command::new("turnutils_natdiscovery");
        cmd.args(["-m", "-f"]);
        if padded {
            cmd.arg("-P");
        }
        cmd.args(["-p", &port.to_string(), "127.0.0.1"]);
        let r = run(cmd, Duration::from_secs(60)).unwrap();
        let out = format!("{}{}", r.stdout, r.stderr);
        let what = if padded { "padded" } else { "plain" };
        assert!(!out.contains("STUN receive timeout"), "{what}: {out}");
        assert!(
            out.contains(&format!("Other addr: : {alt}")),
            "{what}: {out}"
        );
        // The first answer comes from the main address; the filtering
        // test's (change IP and port) from the alternate one.
        for origin in [&listen, &alt] {
            assert!(
                out.contains(&format!("Response origin: : {origin}")),
                "{what}: no answer from {origin}: {out}"
            );
        }
        assert!(
            out.contains("NAT with Endpoint Independent Mapping!"),
            "{what}: {out}"
        );
        assert!(
            out.contains("NAT with Endpoint Independent Filtering!"),
            "{what}: {out}"
        );
    }
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert!(
        health["stun"]["requests"].as_u64().unwrap() >= 4,
        "{health}"
    );
}

/// Every CHANGE-REQUEST at every one of the server's four RFC 5780
/// addresses is answered from the address it asks for (the other IP and/or
/// port than the one the request arrived at), naming that address in
/// RESPONSE-ORIGIN and the alternate one in OTHER-ADDRESS; requests to an
/// alternate socket asking for the main address included.
#[test]
fn change_request_is_answered_from_the_address_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let port = port_pair();
    let (ip1, ip2) = ("127.0.0.1", "127.0.0.2");
    let at = |ip: &str, p: u16| -> std::net::SocketAddr { format!("{ip}:{p}").parse().unwrap() };
    let alt = at(ip2, port + 1);
    let _s = ServerProc::start(
        dir.path(),
        &[
            "--listen",
            &at(ip1, port).to_string(),
            "--alt-listen",
            &alt.to_string(),
        ],
    )
    .unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1500];
    for to_ip in [ip1, ip2] {
        for to_port in [port, port + 1] {
            for (ci, cp) in [(false, false), (true, false), (false, true), (true, true)] {
                let to = at(to_ip, to_port);
                let want_ip = if ci == (to_ip == ip1) { ip2 } else { ip1 };
                let want_port = if cp == (to_port == port) {
                    port + 1
                } else {
                    port
                };
                let want = at(want_ip, want_port);
                let txid = stun::new_txid();
                let req = stun::binding_request(&txid, ci, cp);
                // Loopback loses nothing; a few tries bound a busy machine.
                let got = (0..10).find_map(|_| {
                    sock.send_to(&req, to).unwrap();
                    let (n, from) = sock.recv_from(&mut buf).ok()?;
                    let m = stun::parse(&buf[..n]).ok()?;
                    (m.txid == txid).then(|| {
                        let origin = m
                            .get(stun::attr::RESPONSE_ORIGIN)
                            .and_then(|v| stun::decode_address(v, None));
                        let other = m
                            .get(stun::attr::OTHER_ADDRESS)
                            .and_then(|v| stun::decode_address(v, None));
                        (from, origin, other)
                    })
                });
                let case = format!("to {to}, change ip {ci}, port {cp}");
                let (from, origin, other) =
                    got.unwrap_or_else(|| panic!("{case}: no answer within 5 s"));
                assert_eq!(from, want, "{case}: answered from");
                assert_eq!(origin, Some(want), "{case}: RESPONSE-ORIGIN");
                assert_eq!(other, Some(alt), "{case}: OTHER-ADDRESS");
            }
        }
    }
}

/// Starts coturn as a plain STUN server on `ips` at a port from `pick`
/// (with `alt`, `port + 1` is its alternate port), ready once the last of
/// its addresses answers a Binding request with a mapped address. A port
/// found free can be taken by another test before coturn binds it: up to
/// three ports are tried.
fn coturn(dir: &std::path::Path, ips: &[&str], alt: bool, pick: impl Fn() -> u16) -> (Proc, u16) {
    for _ in 0..3 {
        let port = pick();
        if let Some(p) = coturn_at(dir, ips, port, alt.then_some(port + 1)) {
            return (p, port);
        }
    }
    panic!("coturn did not answer STUN on three ports in a row");
}

/// [`coturn`] on one port; `None` when it does not answer within 15 s.
fn coturn_at(dir: &std::path::Path, ips: &[&str], port: u16, alt: Option<u16>) -> Option<Proc> {
    let mut cmd = Command::new("turnserver");
    for ip in ips {
        cmd.args(["--listening-ip", ip]);
    }
    cmd.args(["--listening-port", &port.to_string()]);
    if let Some(a) = alt {
        cmd.args(["--alt-listening-port", &a.to_string()]);
    }
    cmd.args(["--stun-only", "--no-tls", "--no-dtls", "--no-cli", "-n"])
        .args(["--log-file", "stdout", "--pidfile"])
        .arg(dir.join("turn.pid"));
    let turn = Proc::spawn("turnserver", cmd, None).unwrap();
    let last = (*ips.last().expect("an address"), alt.unwrap_or(port));
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let req = stun::binding_request(&stun::new_txid(), false, false);
    let mut buf = [0u8; 512];
    let ready = (0..75).any(|_| {
        probe.send_to(&req, last).unwrap();
        probe
            .recv_from(&mut buf)
            .is_ok_and(|(n, _)| stun::parse(&buf[..n]).is_ok_and(|m| m.mapped_address().is_some()))
    });
    if !ready {
        eprintln!("coturn did not answer STUN on {last:?} within 15 s");
        return None;
    }
    Some(turn)
}
