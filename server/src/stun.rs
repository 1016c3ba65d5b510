//! The STUN responder: Binding answers on the main socket (the UDP socket
//! layer hands requests here) and on the RFC 5780 alternate endpoints.
//!
//! With `--alt-listen IP2:P2` the server answers STUN on IP2:P2, IP1:P2 and
//! IP2:P1 besides its main IP1:P1, tells clients about IP2:P2 in
//! OTHER-ADDRESS, and honours CHANGE-REQUEST by answering from the socket
//! with the other address and/or port: enough for a client to tell
//! endpoint-independent, address-dependent and address-and-port-dependent
//! mapping and filtering apart.

use punch_protocol::stun;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of the STUN responder.
#[derive(Debug, Default)]
pub struct StunStats {
    pub requests: AtomicU64,
    pub errors_sent: AtomicU64,
    pub dropped: AtomicU64,
}

/// SOFTWARE attribute of our STUN answers.
pub const SOFTWARE: &str = concat!("punch-server ", env!("CARGO_PKG_VERSION"));

/// Answers a STUN Binding request that reached the main socket at `local`
/// (`None`: an unspecified bind whose destination address is unknown):
/// sends it from an alternate socket (CHANGE-REQUEST), or returns it for
/// the main socket to send.
pub(crate) fn answer_main(
    alt: Option<&AltSockets>,
    local: Option<SocketAddr>,
    stats: &StunStats,
    from: SocketAddr,
    data: &[u8],
) -> Option<Vec<u8>> {
    let Ok(msg) = stun::parse(data) else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let (ci, cp) = msg.change_request();
    let out = alt.and_then(|a| local.and_then(|l| a.respond_from(l, ci, cp)));
    let info = stun::ResponderInfo {
        local: match out {
            Some(s) => s.local_addr().ok(),
            None => local,
        },
        other: alt.map(|a| a.other),
    };
    let Some(resp) = stun::answer(&msg, from, info, SOFTWARE) else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    // The answer's type sits in its first two bytes.
    if resp.get(..2) == Some(&stun::BINDING_ERROR.to_be_bytes()[..]) {
        stats.errors_sent.fetch_add(1, Ordering::Relaxed);
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(out) = out {
        let _ = out.send_to(&resp, from);
        return None;
    }
    Some(resp)
}

/// The main socket's own address for a request that arrived at `dst_ip`.
pub(crate) fn main_local(bound: SocketAddr, dst_ip: Option<IpAddr>) -> Option<SocketAddr> {
    match (bound.ip().is_unspecified(), dst_ip) {
        (true, Some(ip)) => Some(SocketAddr::new(ip.to_canonical(), bound.port())),
        (true, None) => None,
        (false, _) => Some(punch_net::canonical(bound)),
    }
}

/// The three extra sockets.
#[derive(Debug)]
pub struct AltSockets {
    primary: SocketAddr,
    /// A handle on the main socket, for requests that arrive at an
    /// alternate socket and ask to be answered from IP1:P1.
    primary_sock: UdpSocket,
    /// IP2:P2, announced as OTHER-ADDRESS.
    pub other: SocketAddr,
    socks: Vec<UdpSocket>,
}

impl AltSockets {
    /// Binds IP2:P2, IP1:P2 and IP2:P1 for a server on `main` (IP1:P1).
    pub fn bind(main: &UdpSocket, alt: SocketAddr) -> std::io::Result<Arc<Self>> {
        let primary = main.local_addr()?;
        if primary.ip().is_unspecified() || alt.ip().is_unspecified() {
            return Err(std::io::Error::other(
                "--alt-listen needs --listen and --alt-listen on specific addresses (RFC 5780 answers from a known other address)",
            ));
        }
        if primary.ip() == alt.ip()
            || primary.port() == alt.port()
            || primary.is_ipv4() != alt.is_ipv4()
        {
            return Err(std::io::Error::other(
                "--alt-listen must differ from --listen in both address and port, in the same family",
            ));
        }
        let addrs = [
            alt,
            SocketAddr::new(primary.ip(), alt.port()),
            SocketAddr::new(alt.ip(), primary.port()),
        ];
        let mut socks = Vec::new();
        for a in addrs {
            let s = UdpSocket::bind(a).map_err(|e| {
                std::io::Error::other(format!("cannot bind STUN alternate {a}: {e}"))
            })?;
            s.set_nonblocking(true)?;
            socks.push(s);
        }
        Ok(Arc::new(AltSockets {
            primary,
            primary_sock: main.try_clone()?,
            other: alt,
            socks,
        }))
    }

    /// The socket answering a request that arrived at `at` with these
    /// CHANGE-REQUEST flags; `None` means the primary socket.
    pub fn respond_from(
        &self,
        at: SocketAddr,
        change_ip: bool,
        change_port: bool,
    ) -> Option<&UdpSocket> {
        let ip = if change_ip == (at.ip() == self.primary.ip()) {
            self.other.ip()
        } else {
            self.primary.ip()
        };
        let port = if change_port == (at.port() == self.primary.port()) {
            self.other.port()
        } else {
            self.primary.port()
        };
        let want = SocketAddr::new(ip, port);
        self.socks
            .iter()
            .find(|s| s.local_addr().is_ok_and(|a| a == want))
    }

    /// Answers STUN on the alternate sockets until the task is aborted.
    pub async fn serve(self: Arc<Self>, stats: Arc<StunStats>) {
        let mut tasks = Vec::new();
        for i in 0..self.socks.len() {
            let me = self.clone();
            let stats = stats.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(sock) = me.socks[i]
                    .try_clone()
                    .and_then(tokio::net::UdpSocket::from_std)
                else {
                    return;
                };
                let Ok(at) = sock.local_addr() else { return };
                let mut buf = vec![0u8; stun::MAX_MESSAGE + 1];
                loop {
                    let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                        continue;
                    };
                    let data = &buf[..n];
                    if !stun::looks_like_stun(data) {
                        continue;
                    }
                    let Ok(msg) = stun::parse(data) else {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let (ci, cp) = msg.change_request();
                    let out = me.respond_from(at, ci, cp).unwrap_or(&me.primary_sock);
                    let info = stun::ResponderInfo {
                        local: out.local_addr().ok(),
                        other: Some(me.other),
                    };
                    if let Some(resp) = stun::answer(&msg, from, info, SOFTWARE) {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        let _ = out.send_to(&resp, from);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}
