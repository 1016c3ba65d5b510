//! Reachability checks for the UDP-less site types (`udp-blocked`,
//! `proxy-only`): a UDP and TCP echo on the server host that tells each
//! client the address it saw, a client run inside a namespace that tries UDP,
//! direct TCP and TCP through an HTTP CONNECT proxy (each bounded by a
//! timeout), and the per-site verdict `verify-nat` reports for these types.
//!
//! (`punch-lab udp-echo` is the stun-bench ceiling and listens on loopback
//! only; this echo listens on the lab's internet addresses and also speaks
//! TCP.)

use super::nat::NatType;
use super::{bin_self, in_ns, Lab, SERVER_IP};
use crate::harness::{run, Proc};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// UDP and TCP echo port on the server host (a port the proxy allows).
pub const ECHO_PORT: u16 = 7000;
/// A second TCP echo port, one the proxy does not allow for CONNECT.
pub const UNLISTED_PORT: u16 = 7001;

/// How long a check waits for an answer (or a connection).
pub const TIMEOUT: Duration = Duration::from_secs(2);

fn lab_or_loopback(a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V4(v4) => {
            v4.ip().is_loopback()
                || v4.ip().octets()[..3] == Ipv4Addr::new(203, 0, 113, 0).octets()[..3]
        }
        SocketAddr::V6(v6) => v6.ip().is_loopback(),
    }
}

/// Serves until killed: a UDP echo on each `udp` address and a TCP echo on
/// each `tcp` address. A request `PING <nonce>` is answered `PONG <nonce>
/// <source address seen>`. Prints `echoing` once everything is bound.
/// Addresses must be the lab's internet (203.0.113.0/24) or loopback.
pub fn echo(udp: &[SocketAddr], tcp: &[SocketAddr]) -> Result<()> {
    if let Some(a) = udp.iter().chain(tcp).find(|a| !lab_or_loopback(a)) {
        bail!("lab-echo listens on the lab's 203.0.113.0/24 or loopback only (got {a})");
    }
    let mut threads = Vec::new();
    for a in udp {
        let s = UdpSocket::bind(a).with_context(|| format!("bind udp {a}"))?;
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                if let Some(reply) = answer(&buf[..n], from) {
                    let _ = s.send_to(reply.as_bytes(), from);
                }
            }
        }));
    }
    for a in tcp {
        let l = TcpListener::bind(a).with_context(|| format!("bind tcp {a}"))?;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || serve_tcp(c));
            }
        }));
    }
    println!("echoing on udp {udp:?} tcp {tcp:?}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn answer(req: &[u8], from: SocketAddr) -> Option<String> {
    let req = std::str::from_utf8(req).ok()?;
    let nonce = req.trim_end().strip_prefix("PING ")?;
    Some(format!("PONG {nonce} {from}\n"))
}

fn serve_tcp(mut c: TcpStream) {
    let Ok(peer) = c.peer_addr() else { return };
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 256 {
        match c.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return,
        }
    }
    if let Some(reply) = answer(&line, peer) {
        let _ = c.write_all(reply.as_bytes());
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reach {
    /// The echo answered.
    pub ok: bool,
    /// Time to the answer (or to giving up), ms.
    pub ms: f64,
    /// The source address the echo saw (when it answered).
    pub seen: Option<String>,
    /// What happened, in words.
    pub detail: String,
}

fn nonce() -> u64 {
    rand::random()
}

fn pong(reply: &str, nonce: u64) -> Option<String> {
    let mut w = reply.split_whitespace();
    (w.next() == Some("PONG") && w.next() == Some(&nonce.to_string()))
        .then(|| w.next().unwrap_or_default().to_string())
}

fn reach(start: Instant, r: std::result::Result<String, String>) -> Reach {
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    match r {
        Ok(seen) => Reach {
            ok: true,
            ms,
            detail: format!("answered, seen from {seen}"),
            seen: Some(seen),
        },
        Err(detail) => Reach {
            ok: false,
            ms,
            seen: None,
            detail,
        },
    }
}

/// A UDP `PING` to `to`, sent three times within `timeout`.
pub fn udp(to: SocketAddr, timeout: Duration) -> Reach {
    let start = Instant::now();
    let r = (|| -> std::result::Result<String, String> {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
        let n = nonce();
        let end = start + timeout;
        let mut buf = [0u8; 512];
        for i in 1..=3u32 {
            if let Err(e) = s.send_to(format!("PING {n}\n").as_bytes(), to) {
                return Err(format!("send: {e}"));
            }
            let round_end = (start + timeout * i / 3).min(end);
            while let Some(left) = round_end.checked_duration_since(Instant::now()) {
                if left.is_zero() {
                    break;
                }
                s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                match s.recv_from(&mut buf) {
                    Ok((len, _)) => {
                        if let Some(seen) = pong(&String::from_utf8_lossy(&buf[..len]), n) {
                            return Ok(seen);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
        }
        Err(format!("no answer within {timeout:?}"))
    })();
    reach(start, r)
}

/// Sends `PING` on an open stream and reads the `PONG`, by `end`.
fn ping_stream(s: &mut TcpStream, end: Instant) -> std::result::Result<String, String> {
    let n = nonce();
    let left = |end: Instant| {
        end.checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "timed out".to_string())
    };
    s.set_write_timeout(Some(left(end)?))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("PING {n}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut b = [0u8; 128];
    while !got.contains(&b'\n') && got.len() < 512 {
        s.set_read_timeout(Some(left(end)?))
            .map_err(|e| e.to_string())?;
        match s.read(&mut b) {
            Ok(0) => return Err("closed before the echo answered".into()),
            Ok(k) => got.extend_from_slice(&b[..k]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    pong(&String::from_utf8_lossy(&got), n).ok_or_else(|| "unexpected answer".into())
}

/// A direct TCP connection to `to` and one echo, within `timeout`.
pub fn tcp(to: SocketAddr, timeout: Duration) -> Reach {
    let start = Instant::now();
    let r = (|| {
        let mut s = TcpStream::connect_timeout(&to, timeout)
            .map_err(|e| format!("connect to {to}: {e}"))?;
        ping_stream(&mut s, start + timeout)
    })();
    reach(start, r)
}

/// The `host:port` of an `http://host:port` proxy URL.
pub fn proxy_addr(url: &str) -> Result<SocketAddr> {
    let hp = url
        .strip_prefix("http://")
        .context("the proxy URL must start with http://")?
        .trim_end_matches('/');
    hp.parse()
        .with_context(|| format!("proxy {url:?}: expected http://IP:PORT"))
}

/// An HTTP CONNECT tunnel to `to` through the proxy at `proxy` (URL), then
/// one echo through it, all within `timeout`.
pub fn via_proxy(proxy: &str, to: SocketAddr, timeout: Duration) -> Reach {
    let start = Instant::now();
    let end = start + timeout;
    let r = (|| {
        let p = proxy_addr(proxy).map_err(|e| format!("{e:#}"))?;
        let mut s = TcpStream::connect_timeout(&p, timeout)
            .map_err(|e| format!("connect to the proxy {p}: {e}"))?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
            .map_err(|e| format!("write to the proxy: {e}"))?;
        // The response head, a byte at a time so nothing of the tunnel is
        // read with it.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let left = end
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or("timed out waiting for the proxy's answer")?;
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                Ok(_) => return Err("the proxy closed the connection".to_string()),
                Err(e) => return Err(format!("read from the proxy: {e}")),
            }
            if head.len() > 8192 {
                return Err("the proxy's answer head is too long".into());
            }
        }
        let head = String::from_utf8_lossy(&head);
        let status = head.lines().next().unwrap_or_default().to_string();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(format!("proxy refused: {status}"));
        }
        ping_stream(&mut s, end)
    })();
    reach(start, r)
}

/// Runs `punch-lab reach ARGS` in namespace `ns` (each check bounded by
/// [`TIMEOUT`]).
pub fn reach_in(ns: &str, args: &[&str]) -> Result<Reach> {
    let mut cmd = in_ns(ns, bin_self()?);
    cmd.arg("reach")
        .args(args)
        .arg("--timeout-ms")
        .arg(TIMEOUT.as_millis().to_string());
    let r = run(cmd, TIMEOUT + Duration::from_secs(10))?;
    if r.code != Some(0) {
        bail!("reach {args:?} in {ns} failed: {}", r.stderr.trim());
    }
    serde_json::from_str(r.stdout.trim()).with_context(|| format!("reach output {:?}", r.stdout))
}

/// Starts the echo on the server host: UDP and TCP on [`ECHO_PORT`], TCP
/// on [`UNLISTED_PORT`].
pub fn start_echo(lab: &mut Lab) -> Result<()> {
    let echo = SocketAddr::from((SERVER_IP, ECHO_PORT)).to_string();
    let unlisted = SocketAddr::from((SERVER_IP, UNLISTED_PORT)).to_string();
    let mut cmd = in_ns(&lab.server_ns, bin_self()?);
    cmd.args(["lab-echo", "--udp", &echo, "--tcp"])
        .arg(format!("{echo},{unlisted}"));
    let log = lab.path("lab-echo.log");
    let mut p = Proc::spawn("lab-echo", cmd, Some(&log))?;
    p.wait_line("echoing", Duration::from_secs(10))?;
    lab.keep(p);
    Ok(())
}

/// What a UDP-less site let through, against what its type promises.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BlockReport {
    /// The site's proxy URL (`proxy-only`).
    pub proxy: Option<String>,
    /// [`super::Site::agent_args`] of the site.
    pub agent_args: Vec<String>,
    /// Control, from the gateway (NAT) namespace itself: the UDP echo
    /// answers, so silence from the host means blocking.
    pub control_udp: Reach,
    /// Control, from the gateway: the TCP echo answers.
    pub control_tcp: Reach,
    /// From the host: a UDP echo (must get no answer).
    pub udp: Reach,
    /// From the host: a direct TCP connection (answers through the NAT on
    /// `udp-blocked`, from the site's public address; fails on
    /// `proxy-only`).
    pub tcp_direct: Reach,
    /// From the host: TCP through the proxy (`proxy-only`: answers, seen
    /// from the gateway's public address).
    pub tcp_via_proxy: Option<Reach>,
    /// From the host: CONNECT to a port the proxy does not allow (refused).
    pub proxy_unlisted_port: Option<Reach>,
    /// Every expectation held.
    pub ok: bool,
    /// The expectations that did not.
    pub problems: Vec<String>,
}

/// Checks site `site` (of type `udp-blocked` or `proxy-only`; the echo must
/// be running, see [`start_echo`]).
pub fn check_site(lab: &Lab, site: usize) -> Result<BlockReport> {
    let s = &lab.sites[site];
    let host = &s.hosts[0];
    let gw = s.nat_ns.last().context("a NATed site")?;
    let echo = SocketAddr::from((SERVER_IP, ECHO_PORT)).to_string();
    let unlisted = SocketAddr::from((SERVER_IP, UNLISTED_PORT)).to_string();
    let public = s.public_ip.to_string();
    let seen_from_public = |r: &Reach| {
        r.seen
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .is_some_and(|a| a.ip().to_string() == public)
    };
    let mut problems = Vec::new();
    let mut expect = |cond: bool, what: &str, r: &Reach| {
        if !cond {
            problems.push(format!("{what} ({})", r.detail));
        }
    };
    let control_udp = reach_in(gw, &["--udp", &echo])?;
    expect(
        control_udp.ok,
        "control: the gateway itself gets a UDP echo",
        &control_udp,
    );
    let control_tcp = reach_in(gw, &["--tcp", &echo])?;
    expect(
        control_tcp.ok,
        "control: the gateway itself gets a TCP echo",
        &control_tcp,
    );
    let udp = reach_in(host, &["--udp", &echo])?;
    expect(!udp.ok, "UDP from the host gets no answer", &udp);
    let tcp_direct = reach_in(host, &["--tcp", &echo])?;
    let (mut via, mut unlisted_r) = (None, None);
    match s.nat {
        NatType::UdpBlocked => {
            expect(
                tcp_direct.ok && seen_from_public(&tcp_direct),
                "direct TCP from the host goes out through the NAT's public address",
                &tcp_direct,
            );
        }
        NatType::ProxyOnly => {
            expect(
                !tcp_direct.ok,
                "direct TCP from the host does not get out",
                &tcp_direct,
            );
            let url = s
                .proxy
                .as_deref()
                .context("a proxy-only site has a proxy")?;
            let v = reach_in(host, &["--tcp", &echo, "--proxy", url])?;
            expect(
                v.ok && seen_from_public(&v),
                "TCP through the proxy answers, from the gateway's public address",
                &v,
            );
            let u = reach_in(host, &["--tcp", &unlisted, "--proxy", url])?;
            expect(
                !u.ok && u.detail.contains(" 403 "),
                "the proxy refuses CONNECT to a port it does not list (403)",
                &u,
            );
            via = Some(v);
            unlisted_r = Some(u);
        }
        t => bail!("{t} has UDP: verify-nat classifies it instead"),
    }
    Ok(BlockReport {
        proxy: s.proxy.clone(),
        agent_args: s.agent_args(),
        control_udp,
        control_tcp,
        udp,
        tcp_direct,
        tcp_via_proxy: via,
        proxy_unlisted_port: unlisted_r,
        ok: problems.is_empty(),
        problems,
    })
}
