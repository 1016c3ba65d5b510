//! `nat-check`: classify our own NAT as RFC 5780 does, against a server
//! that answers STUN with OTHER-ADDRESS and CHANGE-REQUEST (punch-server with
//! `--alt-listen`, or any RFC 5780 STUN server).

use punch_protocol::allocator::{self, Allocator};
use punch_protocol::signal::{NatBehaviour, NatClass};
use punch_protocol::stun;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// What the checks found.
#[derive(Debug, Clone, Serialize)]
pub struct NatReport {
    /// `"ok"`, or `"blocked"` when no STUN answer came back at all.
    pub udp: &'static str,
    /// The local address the checks ran from.
    pub local_addr: Option<String>,
    /// Our address as the STUN server saw it.
    pub public_addr: Option<String>,
    /// `endpoint-independent`, `address-dependent`,
    /// `address-and-port-dependent`, or `unknown` (no alternate address).
    pub mapping: &'static str,
    /// Same three values, or `unknown`.
    pub filtering: &'static str,
    /// The NAT kept our source port.
    pub port_preserved: Option<bool>,
    /// A packet to our own public address came back (only when tested).
    pub hairpin: Option<bool>,
    /// The server's alternate address, if it has one.
    pub other_addr: Option<String>,
    /// How the NAT picks the external port of a new mapping, read from the
    /// mapping tests' ports (see [`AllocatorView`]).
    pub allocator: AllocatorView,
}

/// The allocator as `nat-check --json` shows it: the fields the server's
/// API shows too, and the ports it was read from.
#[derive(Debug, Clone, Serialize)]
pub struct AllocatorView {
    /// `kind` (`preserving`, `sequential`, `block`, `random`, or `unknown`:
    /// too few answers, or an endpoint-independent mapping, which shows one
    /// port), `stride`, `block_base`, `block_size`, `budget`.
    #[serde(flatten)]
    pub shape: punch_protocol::view::AllocatorView,
    /// The external ports of the mapping tests, in the order they were made.
    pub ports: Vec<u16>,
    /// The same, for the agent's own use.
    #[serde(skip)]
    pub value: Allocator,
}

impl AllocatorView {
    fn new(value: Allocator, ports: Vec<u16>) -> AllocatorView {
        AllocatorView {
            shape: value.into(),
            ports,
            value,
        }
    }
}

impl NatReport {
    /// The class to report to the server; `None` when UDP got no answer.
    pub fn class(&self) -> Option<NatClass> {
        let public: SocketAddr = self.public_addr.as_deref()?.parse().ok()?;
        let b = |s: &str| match s {
            "endpoint-independent" => NatBehaviour::EndpointIndependent,
            "address-dependent" => NatBehaviour::AddressDependent,
            "address-and-port-dependent" => NatBehaviour::AddressAndPortDependent,
            _ => NatBehaviour::Unknown,
        };
        let port_preserved = self.port_preserved.unwrap_or(false);
        let own_ip = if_addrs::get_if_addrs()
            .map(|ifs| ifs.iter().any(|i| i.ip() == public.ip()))
            .unwrap_or(false);
        Some(NatClass {
            public: own_ip && port_preserved,
            mapping: b(self.mapping),
            filtering: b(self.filtering),
            port_preserved,
        })
    }
}

/// Requests are padded so punch-server's amplification guard lets the
/// RFC 5780 attributes into the answer. The padding is a long SOFTWARE
/// attribute, not PADDING: SOFTWARE is comprehension-optional, so other
/// servers (coturn answers PADDING with 420) ignore it.
fn request(txid: &[u8; 16], change_ip: bool, change_port: bool) -> Vec<u8> {
    let mut b = stun::Builder::new(stun::BINDING_REQUEST, txid);
    if change_ip || change_port {
        let flags = (change_ip as u8) << 2 | (change_port as u8) << 1;
        b.attr(stun::attr::CHANGE_REQUEST, &[0, 0, 0, flags]);
    }
    let text = b"punch-agent nat-check (RFC 5780)";
    let mut pad = [b' '; 96];
    pad[..text.len()].copy_from_slice(text);
    b.attr(stun::attr::SOFTWARE, &pad);
    b.finish_with_fingerprint()
}

struct Answer {
    mapped: SocketAddr,
    other: Option<SocketAddr>,
}

/// An RFC 5780 server's four addresses, in the order the mapping tests
/// ask them: the primary, the other IP on the primary port, the other
/// address, the primary IP on the other port.
pub fn server_addresses(server: SocketAddr, other: SocketAddr) -> [SocketAddr; 4] {
    [
        server,
        SocketAddr::new(other.ip(), server.port()),
        other,
        SocketAddr::new(server.ip(), other.port()),
    ]
}

/// Waits for an answer after each of three sends, for a server whose
/// round-trip time is not known yet.
const FIRST_WAITS: [Duration; 3] = [
    Duration::from_millis(300),
    Duration::from_millis(500),
    Duration::from_millis(700),
];

/// Waits for the filtering tests, from the round-trip time the first
/// answer took: their silence *is* the answer on a strict NAT, so they
/// should not wait out a second-scale schedule; three sends keep a lost
/// datagram (1 % loss each way) from passing for a filter (about 1 in 10^5).
fn filter_waits(rtt: Duration) -> [Duration; 3] {
    let w = (rtt * 2 + Duration::from_millis(30))
        .clamp(Duration::from_millis(80), Duration::from_millis(400));
    [w; 3]
}

async fn ask_with(
    sock: &UdpSocket,
    to: SocketAddr,
    change_ip: bool,
    change_port: bool,
    waits: &[Duration],
) -> Option<Answer> {
    let [a] = ask_all(sock, [(to, change_ip, change_port)], waits).await;
    a
}

/// Several requests from one socket at once (`(to, change_ip,
/// change_port)` each), answers matched by transaction id: the mapping
/// tests ask two addresses in one round trip, not two.
async fn ask_all<const N: usize>(
    sock: &UdpSocket,
    asks: [(SocketAddr, bool, bool); N],
    waits: &[Duration],
) -> [Option<Answer>; N] {
    let txids: [[u8; 16]; N] = std::array::from_fn(|_| stun::new_txid());
    let reqs: [Vec<u8>; N] = std::array::from_fn(|i| request(&txids[i], asks[i].1, asks[i].2));
    let mut answers: [Option<Answer>; N] = std::array::from_fn(|_| None);
    let mut buf = [0u8; 1500];
    for wait in waits {
        for i in 0..N {
            if answers[i].is_none() && sock.send_to(&reqs[i], asks[i].0).await.is_err() {
                return answers;
            }
        }
        let until = tokio::time::Instant::now() + *wait;
        while answers.iter().any(Option::is_none) {
            let Ok(Ok((n, _))) = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await
            else {
                break;
            };
            let Ok(m) = stun::parse(&buf[..n]) else {
                continue;
            };
            let Some(i) = txids.iter().position(|t| *t == m.txid) else {
                continue;
            };
            if m.msg_type != stun::BINDING_SUCCESS || answers[i].is_some() {
                continue;
            }
            let Some(mapped) = m.mapped_address() else {
                continue;
            };
            let other = m
                .get(stun::attr::OTHER_ADDRESS)
                .or_else(|| m.get(stun::attr::CHANGED_ADDRESS))
                .and_then(|v| stun::decode_address(v, None));
            answers[i] = Some(Answer {
                mapped: punch_net::canonical(mapped),
                other,
            });
        }
        if answers.iter().all(Option::is_some) {
            break;
        }
    }
    answers
}

/// The public address a fresh socket on `bind` gets toward `server` (one
/// new mapping), or `None` without an answer.
pub async fn fresh_mapping(server: SocketAddr, bind: SocketAddr) -> Option<SocketAddr> {
    let s = UdpSocket::bind(bind).await.ok()?;
    ask_with(&s, server, false, false, &FIRST_WAITS)
        .await
        .map(|a| a.mapped)
}

/// A fresh mapping toward one of `servers`, asked from a new socket toward
/// the next address at each try (one try per entry of `waits`, the first
/// toward `servers[first]`), and how long the answered try took. Behind a
/// NAT that counts ports up each try is one new flow, and the answer read
/// is the last flow's: where the counter stands now. A try whose first
/// packet the NAT drops (its port still taken toward that address) is not
/// sent again: that would be a new flow on the next port anyway, and
/// another address is less likely to be taken.
pub async fn fresh_mapping_among(
    servers: &[SocketAddr],
    first: usize,
    bind: SocketAddr,
    waits: &[Duration],
) -> Option<(SocketAddr, Duration)> {
    if servers.is_empty() {
        return None;
    }
    for (i, wait) in waits.iter().enumerate() {
        let s = UdpSocket::bind(bind).await.ok()?;
        let to = servers[(first + i) % servers.len()];
        let asked = tokio::time::Instant::now();
        if let Some(a) = ask_with(&s, to, false, false, std::slice::from_ref(wait)).await {
            return Some((a.mapped, asked.elapsed()));
        }
    }
    None
}

/// How long a counter read waits for each answer, from the round trip a
/// first read took (its first waits: [`FIRST_WAITS`]).
pub fn read_wait(rtt: Duration) -> Duration {
    filter_waits(rtt)[0]
}

/// The waits of a first counter read, when the round trip is not known.
pub const FIRST_READ_WAITS: [Duration; 3] = FIRST_WAITS;

/// New flows one after another, one socket each toward `targets[i]`, one
/// request each and no waiting for answers: on a NAT that counts ports up
/// each moves the counter by one whether or not it gets through (a port
/// whose tuple is still taken drops the flow's first packet, and waiting
/// out retransmits there would take seconds and move the counter further).
/// The sockets are returned so that answers still find them open.
pub async fn open_flows(targets: &[SocketAddr], bind: SocketAddr) -> Vec<UdpSocket> {
    let mut socks = Vec::with_capacity(targets.len());
    for t in targets {
        let Ok(s) = UdpSocket::bind(bind).await else {
            break;
        };
        let _ = s
            .send_to(&request(&stun::new_txid(), false, false), t)
            .await;
        socks.push(s);
    }
    socks
}

async fn hairpin(sock: &UdpSocket, mapped: SocketAddr) -> bool {
    let txid = stun::new_txid();
    let req = request(&txid, false, false);
    let mut buf = [0u8; 1500];
    for _ in 0..2 {
        if sock.send_to(&req, mapped).await.is_err() {
            return false;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Ok((n, _))) = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
            if stun::parse(&buf[..n]).is_ok_and(|m| m.txid == txid) {
                return true;
            }
        }
    }
    false
}

/// Runs the RFC 5780 tests against `server` from fresh sockets on `bind`
/// (the hairpin test only when asked: it costs up to 600 ms on NATs that
/// do not hairpin).
pub async fn check(
    server: SocketAddr,
    bind: SocketAddr,
    test_hairpin: bool,
) -> std::io::Result<NatReport> {
    check_with(server, bind, test_hairpin, |_| {}).await
}

/// [`check`], handing `on_mapping` a first report as soon as the mapping is
/// known (filtering `unknown`): the mapping takes a few round trips, the
/// filtering tests wait out timeouts on strict NATs.
pub async fn check_with(
    server: SocketAddr,
    bind: SocketAddr,
    test_hairpin: bool,
    on_mapping: impl Fn(&NatReport),
) -> std::io::Result<NatReport> {
    let s1 = UdpSocket::bind(bind).await?;
    let local = s1.local_addr()?;
    let asked = std::time::Instant::now();
    let Some(first) = ask_with(&s1, server, false, false, &FIRST_WAITS).await else {
        return Ok(NatReport {
            udp: "blocked",
            local_addr: Some(local.to_string()),
            public_addr: None,
            mapping: "unknown",
            filtering: "unknown",
            port_preserved: None,
            hairpin: None,
            other_addr: None,
            allocator: AllocatorView::new(Allocator::Unknown, Vec::new()),
        });
    };
    let m1 = first.mapped;
    let waits = filter_waits(asked.elapsed());
    // The filtering tests run beside the mapping tests, each from a fresh
    // socket that has talked to the primary address only: one asks for an
    // answer from the other address and port, one from the other port.
    let (s2, s3) = (UdpSocket::bind(bind).await?, UdpSocket::bind(bind).await?);
    let filtering = async {
        if first.other.is_none() {
            return "unknown";
        }
        let (ei, ad) = tokio::join!(
            ask_with(&s2, server, true, true, &waits),
            ask_with(&s3, server, false, true, &waits)
        );
        match (ei, ad) {
            (Some(_), _) => "endpoint-independent",
            (None, Some(_)) => "address-dependent",
            (None, None) => "address-and-port-dependent",
        }
    };
    let mapping = async {
        let (mapping, alloc) = match first.other {
            None => (
                "unknown",
                AllocatorView::new(Allocator::Unknown, vec![m1.port()]),
            ),
            Some(other) => {
                // Three more destinations at once, in this order: their
                // ports (with the first) tell the allocator; the fourth,
                // the other port on the primary IP, is only for that.
                let [_, a2, a3, a4] = server_addresses(server, other);
                let [m2, m3, m4] = ask_all(
                    &s1,
                    [(a2, false, false), (a3, false, false), (a4, false, false)],
                    &FIRST_WAITS,
                )
                .await;
                let mut ports = vec![m1.port()];
                ports.extend(
                    [&m2, &m3, &m4]
                        .iter()
                        .filter_map(|m| m.as_ref().map(|a| a.mapped.port())),
                );
                let alloc = AllocatorView::new(allocator::infer(local.port(), &ports), ports);
                // Address-dependent: one mapping per IP, so the other IP's
                // two ports share one and the primary IP's other port
                // shares the first. (A NAT that picks at random from a
                // small block and reuses a port across remotes gives the
                // other IP's two flows one port 1 time in 64 by chance;
                // the primary IP's other port then tells it apart.)
                let mapping = match (&m2, &m3, &m4) {
                    (Some(a), _, _) if a.mapped == m1 => "endpoint-independent",
                    (Some(a), Some(b), d)
                        if a.mapped == b.mapped && d.as_ref().is_none_or(|d| d.mapped == m1) =>
                    {
                        "address-dependent"
                    }
                    (Some(_), Some(_), _) => "address-and-port-dependent",
                    _ => "unknown",
                };
                (mapping, alloc)
            }
        };
        on_mapping(&NatReport {
            udp: "ok",
            local_addr: Some(local.to_string()),
            public_addr: Some(m1.to_string()),
            mapping,
            filtering: "unknown",
            port_preserved: Some(m1.port() == local.port()),
            hairpin: None,
            other_addr: first.other.map(|o| o.to_string()),
            allocator: alloc.clone(),
        });
        (mapping, alloc)
    };
    let ((mapping, alloc), filtering) = tokio::join!(mapping, filtering);
    let hp = if test_hairpin {
        Some(hairpin(&s1, m1).await)
    } else {
        None
    };
    Ok(NatReport {
        udp: "ok",
        local_addr: Some(local.to_string()),
        public_addr: Some(m1.to_string()),
        mapping,
        filtering,
        port_preserved: Some(m1.port() == local.port()),
        hairpin: hp,
        other_addr: first.other.map(|o| o.to_string()),
        allocator: alloc,
    })
}
