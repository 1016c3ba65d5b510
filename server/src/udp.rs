//! The server's UDP socket: QUIC for signaling, relay frames handled inline.
//!
//! [`ServerSocket`] wraps quinn's socket. Datagrams that start with the
//! relay magic never reach quinn: the relay table decides (bind, forward or
//! drop) and the answer leaves from the same socket, so agents' relayed
//! packets use the same address and NAT mapping as their signaling.

use punch_protocol::relay::{self, Action, RelayTable};
use punch_protocol::stun;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// quinn's socket with relay frames taken out.
pub struct ServerSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    relay: Option<Arc<Mutex<RelayTable>>>,
    ipv6: bool,
    local: SocketAddr,
    /// STUN counters.
    pub stun: Arc<StunStats>,
    alt: Option<Arc<crate::alt::AltSockets>>,
}

/// Counters of the STUN responder.
#[derive(Debug, Default)]
pub struct StunStats {
    pub requests: AtomicU64,
    pub errors_sent: AtomicU64,
    pub dropped: AtomicU64,
}

/// SOFTWARE attribute of our STUN answers.
pub const SOFTWARE: &str = concat!("punch-server ", env!("CARGO_PKG_VERSION"));

impl fmt::Debug for ServerSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSocket").finish_non_exhaustive()
    }
}

impl ServerSocket {
    /// Wraps a bound socket; `relay` is `None` when relaying is off.
    pub fn new(
        sock: std::net::UdpSocket,
        relay: Option<Arc<Mutex<RelayTable>>>,
        alt: Option<Arc<crate::alt::AltSockets>>,
    ) -> io::Result<Arc<Self>> {
        let local = sock.local_addr()?;
        let ipv6 = local.is_ipv6();
        let clone = sock.try_clone()?;
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, sock)?;
        punch_net::disable_gro(&clone);
        Ok(Arc::new(ServerSocket {
            inner,
            relay,
            ipv6,
            local,
            stun: Arc::default(),
            alt,
        }))
    }

    /// Answers a STUN Binding request.
    fn stun_request(&self, from: SocketAddr, dst_ip: Option<std::net::IpAddr>, data: &[u8]) {
        let from = punch_net::canonical(from);
        let Ok(msg) = stun::parse(data) else {
            self.stun.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let local = match (self.local.ip().is_unspecified(), dst_ip) {
            (true, Some(ip)) => Some(SocketAddr::new(ip.to_canonical(), self.local.port())),
            (true, None) => None,
            (false, _) => Some(punch_net::canonical(self.local)),
        };
        let (ci, cp) = msg.change_request();
        let out = self
            .alt
            .as_ref()
            .and_then(|a| local.and_then(|l| a.respond_from(l, ci, cp)));
        let info = stun::ResponderInfo {
            local: match out {
                Some(s) => s.local_addr().ok(),
                None => local,
            },
            other: self.alt.as_ref().map(|a| a.other),
        };
        let Some(resp) = stun::answer(&msg, from, info, SOFTWARE) else {
            self.stun.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if stun::parse(&resp).is_ok_and(|r| r.msg_type == stun::BINDING_ERROR) {
            self.stun.errors_sent.fetch_add(1, Ordering::Relaxed);
        }
        self.stun.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(out) = out {
            let _ = out.send_to(&resp, from);
            return;
        }
        let _ = self.inner.try_send(&Transmit {
            destination: punch_net::for_socket(from, self.ipv6),
            ecn: None,
            contents: &resp,
            segment_size: None,
            src_ip: dst_ip,
        });
    }

    fn relay_frame(&self, from: SocketAddr, data: &[u8]) {
        let Some(table) = &self.relay else { return };
        let from = punch_net::canonical(from);
        let action = table
            .lock()
            .expect("not poisoned")
            .handle(from, data, Instant::now());
        let (to, contents) = match action {
            Ok(Action::Forward(to)) => (to, data),
            Ok(Action::Reply(ref frame)) => (from, frame.as_slice()),
            Err(e) => {
                tracing::trace!(%from, "relay frame dropped: {e}");
                return;
            }
        };
        // Best effort, like any UDP forwarder: a full socket buffer drops.
        let _ = self.inner.try_send(&Transmit {
            destination: punch_net::for_socket(to, self.ipv6),
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        });
    }
}

impl AsyncUdpSocket for ServerSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        punch_net::poll_recv_filtered(&*self.inner, cx, bufs, meta, |buf, m| {
            let data = &buf[..m.len];
            if relay::is_relay(data) {
                self.relay_frame(m.addr, data);
                false
            } else if stun::looks_like_stun(data) {
                self.stun_request(m.addr, m.dst_ip, data);
                false
            } else {
                true
            }
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
