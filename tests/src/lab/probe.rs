//! `verify-nat`: plain UDP probes that prove each lab NAT behaves as named,
//! independent of punch itself (RFC 5780-style tests against a reflector
//! with two addresses and two ports on the server host).

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Reflector ports on each server address.
pub const PORTS: [u16; 2] = [4000, 4001];

/// Serves reflector requests on every `ip:port` of `ips` × [`PORTS`] until
/// `for_` passes. A request is `PLREQ <nonce> <reply-socket-index>`; the
/// answer `PLRESP <nonce> <observed source>` leaves from the socket with that
/// index (0: ip0:p0, 1: ip0:p1, 2: ip1:p0, 3: ip1:p1).
pub fn reflector(ips: &[std::net::Ipv4Addr], for_: Duration) -> Result<()> {
    let mut socks = Vec::new();
    for ip in ips {
        for p in PORTS {
            let s = UdpSocket::bind((*ip, p)).with_context(|| format!("bind {ip}:{p}"))?;
            s.set_nonblocking(true)?;
            socks.push(s);
        }
    }
    println!("reflecting on {} sockets", socks.len());
    let end = Instant::now() + for_;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        let mut idle = true;
        for s in &socks {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                idle = false;
                let req = String::from_utf8_lossy(&buf[..n]);
                let mut w = req.split_whitespace();
                let (Some("PLREQ"), Some(nonce), Some(idx)) = (w.next(), w.next(), w.next()) else {
                    continue;
                };
                let Some(out) = idx.parse::<usize>().ok().and_then(|i| socks.get(i)) else {
                    continue;
                };
                let _ = out.send_to(format!("PLRESP {nonce} {from}").as_bytes(), from);
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

/// What the probes measured behind one NAT.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NatReport {
    pub local: String,
    pub mapped: String,
    pub mapping: String,
    pub filtering: String,
    pub port_preserved: bool,
}

fn ask(
    sock: &UdpSocket,
    to: SocketAddr,
    reply_from: usize,
    nonce: u64,
) -> Result<Option<SocketAddr>> {
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        sock.send_to(format!("PLREQ {nonce} {reply_from}").as_bytes(), to)?;
        let end = Instant::now() + Duration::from_millis(400);
        while Instant::now() < end {
            sock.set_read_timeout(Some(
                end.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))?;
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                break;
            };
            let s = String::from_utf8_lossy(&buf[..n]);
            let mut w = s.split_whitespace();
            if w.next() == Some("PLRESP") && w.next() == Some(&nonce.to_string()) {
                return Ok(w.next().and_then(|a| a.parse().ok()));
            }
        }
    }
    Ok(None)
}

/// Runs the mapping and filtering tests against the reflector at `ips`.
pub fn probe(ips: [std::net::Ipv4Addr; 2]) -> Result<NatReport> {
    let a = |ip: usize, port: usize| SocketAddr::from((ips[ip], PORTS[port]));
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let local = sock.local_addr()?;
    let m1 = ask(&sock, a(0, 0), 0, 1)?
        .context("no answer from the reflector: is the lab's server host up?")?;
    let m2 = ask(&sock, a(1, 0), 2, 2)?.context("no answer from the second address")?;
    let m3 = ask(&sock, a(0, 1), 1, 3)?.context("no answer from the second port")?;
    let mapping = if m1 == m2 && m1 == m3 {
        "endpoint-independent"
    } else if m1 == m3 {
        "address-dependent"
    } else {
        "address-and-port-dependent"
    };
    // Filtering, from a fresh socket so no earlier mapping helps. Its port
    // differs from the first one in the low six bits, which the Cloud NAT
    // EIM model maps into its 64-port block: otherwise both sockets would
    // claim one external port, a clash no real allocator makes.
    let mut sock = UdpSocket::bind("0.0.0.0:0")?;
    for _ in 0..32 {
        if sock.local_addr()?.port() & 63 != local.port() & 63 {
            break;
        }
        sock = UdpSocket::bind("0.0.0.0:0")?;
    }
    let filtering = if ask(&sock, a(0, 0), 3, 10)?.is_some() {
        "endpoint-independent"
    } else if ask(&sock, a(0, 0), 1, 11)?.is_some() {
        "address-dependent"
    } else if ask(&sock, a(0, 0), 0, 12)?.is_some() {
        "address-and-port-dependent"
    } else {
        bail!("no answer even from the address and port we sent to");
    };
    Ok(NatReport {
        local: local.to_string(),
        mapped: m1.to_string(),
        mapping: mapping.to_string(),
        filtering: filtering.to_string(),
        port_preserved: m1.port() == local.port(),
    })
}
