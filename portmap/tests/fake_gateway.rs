//! The client against a fake gateway on loopback that answers with
//! garbage, truncated, oversized, wrong-nonce, wrong-epoch and
//! wrong-port replies: no panic, refused answers counted, a valid answer
//! that follows garbage still taken, and never longer than the budget.
//! (UPnP is never tried here: its SSDP discovery would leave loopback.)

use punch_portmap::client::{Client, Config, Error};
use punch_portmap::{natpmp, pcp, Protocol};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fake gateway: for each request, `answer` gives the datagrams to send
/// back. Runs until the test process ends.
fn gateway(answer: impl Fn(&[u8], u32) -> Vec<Vec<u8>> + Send + 'static) -> SocketAddr {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n_req = 0;
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            for a in answer(&buf[..n], n_req) {
                let _ = s.send_to(&a, from);
            }
            n_req += 1;
        }
    });
    addr
}

fn config(gw: SocketAddr, proto: Protocol) -> Config {
    let mut c = Config::new(40000);
    c.gateway = Some(Ipv4Addr::LOCALHOST);
    c.server_port = gw.port();
    c.local_ip = Some(Ipv4Addr::LOCALHOST);
    c.protocols = vec![proto];
    c.budget = Duration::from_millis(800);
    c.lifetime = Duration::from_secs(120);
    c
}

/// A correct PCP answer to `req` granting `ext` with epoch `epoch`.
fn pcp_answer(req: &[u8], ext: SocketAddr, epoch: u32) -> Vec<u8> {
    let mut b = req[..60].to_vec();
    b[1] |= 0x80;
    b[3] = 0;
    b[8..12].copy_from_slice(&epoch.to_be_bytes());
    b[12..24].fill(0);
    b[42..44].copy_from_slice(&ext.port().to_be_bytes());
    let SocketAddr::V4(v4) = ext else {
        panic!("IPv4 only")
    };
    b[44..60].copy_from_slice(&v4.ip().to_ipv6_mapped().octets());
    b
}

/// A correct NAT-PMP answer (external address or mapping).
fn nat_pmp_answer(req: &[u8], ext_port: u16, epoch: u32) -> Vec<u8> {
    match req.get(1) {
        Some(0) => {
            let mut b = vec![0, 128, 0, 0];
            b.extend_from_slice(&epoch.to_be_bytes());
            b.extend_from_slice(&[203, 0, 113, 77]);
            b
        }
        _ => {
            let mut b = vec![0, 129, 0, 0];
            b.extend_from_slice(&epoch.to_be_bytes());
            b.extend_from_slice(&req[4..6]);
            b.extend_from_slice(&ext_port.to_be_bytes());
            b.extend_from_slice(&req[8..12]);
            b
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn pcp_uses_the_port_in_the_answer_after_garbage() {
    let ext: SocketAddr = "203.0.113.77:51234".parse().unwrap();
    let gw = gateway(move |req, _| {
        let good = pcp_answer(req, ext, 100);
        let mut wrong_nonce = good.clone();
        wrong_nonce[25] ^= 0xff;
        let mut wrong_port = good.clone();
        wrong_port[41] ^= 1;
        let mut version0 = good.clone();
        version0[0] = 0;
        vec![
            vec![],
            vec![0xff; 3],
            good[..40].to_vec(),
            vec![2; 1500],
            wrong_nonce,
            wrong_port,
            version0,
            good,
        ]
    });
    rt().block_on(async {
        let mut c = Client::new(config(gw, Protocol::Pcp)).unwrap();
        let (m, fails) = c.map().await;
        let m = m.unwrap_or_else(|| panic!("no mapping: {fails:?}"));
        assert_eq!(m.protocol, Protocol::Pcp);
        assert_eq!(m.external, ext, "the port the gateway gave, not ours");
        assert!(c.errors >= 5, "refused answers counted: {}", c.errors);
    });
}

type Answer = fn(&[u8], u32) -> Vec<Vec<u8>>;

#[test]
fn garbage_only_gateways_cost_at_most_the_budget() {
    let cases: [(&str, Protocol, Answer); 8] = [
        ("silent", Protocol::Pcp, |_, _| vec![]),
        ("silent", Protocol::NatPmp, |_, _| vec![]),
        ("empty", Protocol::Pcp, |_, _| vec![vec![]]),
        ("oversized", Protocol::Pcp, |_, _| vec![vec![2u8; 2000]]),
        ("truncated", Protocol::NatPmp, |r, _| {
            vec![nat_pmp_answer(r, 5000, 1)[..7].to_vec()]
        }),
        ("other port", Protocol::NatPmp, |r, _| {
            let mut b = nat_pmp_answer(r, 5000, 1);
            if b.len() == 16 {
                b[9] ^= 1;
            }
            vec![b]
        }),
        ("wrong nonce", Protocol::Pcp, |r, _| {
            let mut b = pcp_answer(r, "203.0.113.77:5000".parse().unwrap(), 1);
            b[30] ^= 1;
            vec![b]
        }),
        ("random", Protocol::NatPmp, |r, n| {
            vec![r
                .iter()
                .map(|x| x.wrapping_mul(31).wrapping_add(n as u8 + 1))
                .collect()]
        }),
    ];
    for (what, proto, answer) in cases {
        let gw = gateway(answer);
        let cfg = config(gw, proto);
        let budget = cfg.budget;
        rt().block_on(async {
            let mut c = Client::new(cfg).unwrap();
            let t = Instant::now();
            let (m, fails) = c.map().await;
            let took = t.elapsed();
            assert!(m.is_none(), "{what}: {m:?}");
            assert!(
                took < budget + Duration::from_millis(300),
                "{what}: took {took:?}"
            );
            assert_eq!(fails.len(), 1, "{what}");
            if what != "silent" {
                assert!(c.errors > 0, "{what}: refused answers are counted");
                assert!(fails[0].1.gateway_answered(), "{what}: {:?}", fails[0].1);
            } else {
                assert_eq!(fails[0].1, Error::NoAnswer, "{what}");
            }
        });
    }
}

#[test]
fn nat_pmp_maps_and_an_epoch_going_back_is_counted() {
    let epoch = Arc::new(AtomicU32::new(1000));
    let e = epoch.clone();
    let gw = gateway(move |req, _| vec![nat_pmp_answer(req, 40100, e.load(Ordering::SeqCst))]);
    rt().block_on(async {
        let mut c = Client::new(config(gw, Protocol::NatPmp)).unwrap();
        let m = c
            .map_with(Protocol::NatPmp, Duration::from_millis(800))
            .await
            .unwrap();
        assert_eq!(m.external, "203.0.113.77:40100".parse().unwrap());
        assert_eq!(c.errors, 0);
        // The gateway restarted: its epoch went back.
        epoch.store(3, Ordering::SeqCst);
        let m = c
            .map_with(Protocol::NatPmp, Duration::from_millis(800))
            .await
            .unwrap();
        assert_eq!(m.external.port(), 40100, "the renewal itself maps again");
        assert!(c.errors >= 1, "the restart is counted");
    });
}

#[test]
fn a_closed_port_fails_fast() {
    // Nothing listens here: ICMP port unreachable, no waiting for the budget.
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = s.local_addr().unwrap().port();
    drop(s);
    let gw = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    rt().block_on(async {
        let mut cfg = config(gw, Protocol::Pcp);
        cfg.protocols = vec![Protocol::Pcp, Protocol::NatPmp];
        cfg.budget = Duration::from_secs(3);
        let mut c = Client::new(cfg).unwrap();
        let t = Instant::now();
        let (m, fails) = c.map().await;
        assert!(m.is_none());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(
            fails.iter().all(|(_, e)| *e == Error::Unreachable),
            "{fails:?}"
        );
    });
}

#[test]
fn requests_have_the_rfc_sizes() {
    let r = pcp::MapRequest::udp([1; 12], Ipv4Addr::new(10, 0, 0, 2), 40000, 60).encode();
    assert_eq!(r.len(), 60);
    assert_eq!(natpmp::map_request(40000, 40000, 60).len(), 12);
}
