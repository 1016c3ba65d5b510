//! The agent's one UDP socket, shared by QUIC and the puncher.
//!
//! [`PunchSocket`] wraps quinn's own socket and implements
//! [`quinn::AsyncUdpSocket`]: datagrams that start with the probe magic are
//! taken out of what quinn receives and handed to the punch session they
//! name; everything else goes to quinn. Signaling, probes and peer
//! connections thus share one NAT mapping.

use punch_protocol::probe::{self, Probe};
use punch_protocol::signal::SessionId;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A probe datagram delivered to a session.
#[derive(Debug)]
pub struct ProbeDatagram {
    pub from: SocketAddr,
    pub data: Vec<u8>,
}

/// Probes queued per session before they are dropped.
const SESSION_QUEUE: usize = 256;
/// Most concurrent punch sessions per agent.
pub const MAX_SESSIONS: usize = 256;

/// Routes probes to the sessions they belong to.
#[derive(Debug, Default)]
pub struct ProbeRouter {
    sessions: Mutex<HashMap<SessionId, mpsc::Sender<ProbeDatagram>>>,
    /// Probes for no known session, or malformed: dropped and counted.
    pub dropped: AtomicU64,
}

impl ProbeRouter {
    /// Starts routing a session's probes; `None` when too many run.
    pub fn register(&self, session: SessionId) -> Option<mpsc::Receiver<ProbeDatagram>> {
        let mut s = self.sessions.lock().expect("not poisoned");
        if s.len() >= MAX_SESSIONS && !s.contains_key(&session) {
            return None;
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        s.insert(session, tx);
        Some(rx)
    }

    /// Stops routing a session.
    pub fn unregister(&self, session: SessionId) {
        self.sessions.lock().expect("not poisoned").remove(&session);
    }

    fn route(&self, from: SocketAddr, data: &[u8]) {
        let Ok(session) = Probe::peek_session(data) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let s = self.sessions.lock().expect("not poisoned");
        let delivered = s.get(&session).is_some_and(|tx| {
            tx.try_send(ProbeDatagram {
                from: punch_net::canonical(from),
                data: data.to_vec(),
            })
            .is_ok()
        });
        if !delivered {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// quinn's socket with probes filtered out.
pub struct PunchSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    router: Arc<ProbeRouter>,
    ipv6: bool,
}

impl fmt::Debug for PunchSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PunchSocket")
            .field("local", &self.inner.local_addr().ok())
            .finish()
    }
}

impl PunchSocket {
    /// Wraps a bound socket.
    pub fn new(sock: std::net::UdpSocket, router: Arc<ProbeRouter>) -> io::Result<Arc<Self>> {
        let ipv6 = sock.local_addr()?.is_ipv6();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, sock)?;
        Ok(Arc::new(PunchSocket {
            inner,
            router,
            ipv6,
        }))
    }

    /// Sends one probe datagram; best effort (probes are repeated anyway).
    pub fn send_probe(&self, dst: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let destination = match (dst, self.ipv6) {
            (SocketAddr::V4(v4), true) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            (SocketAddr::V6(_), false) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "IPv6 destination on an IPv4 socket",
                ))
            }
            _ => dst,
        };
        self.inner.try_send(&Transmit {
            destination,
            ecn: None,
            contents: payload,
            segment_size: None,
            src_ip: None,
        })
    }

    /// Can this socket reach an address of this family?
    pub fn supports(&self, ip: IpAddr) -> bool {
        self.ipv6 || ip.is_ipv4()
    }
}

impl AsyncUdpSocket for PunchSocket {
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
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                let data = &bufs[i][..m.len];
                if probe::is_probe(data) {
                    // With GRO one entry may hold several datagrams of equal
                    // size from one source; a probe's neighbours are probes.
                    let stride = m.stride.max(1);
                    for seg in data.chunks(stride) {
                        if probe::is_probe(seg) {
                            self.router.route(m.addr, seg);
                        }
                    }
                    continue;
                }
                if kept != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    head[kept][..m.len].copy_from_slice(&tail[0][..m.len]);
                    meta[kept] = m;
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything was probes: poll again so quinn's waker stays armed.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
