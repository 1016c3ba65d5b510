//! The server's UDP socket: QUIC for signaling, relay frames handled inline.
//!
//! [`ServerSocket`] wraps quinn's socket. Datagrams that start with the
//! relay magic never reach quinn: the relay table decides (bind, forward or
//! drop) and the answer leaves from the same socket, so agents' relayed
//! packets use the same address and NAT mapping as their signaling.

use crate::stun::StunStats;
use punch_protocol::relay::{self, Action, Endpoint, RelayTable};
use punch_protocol::stun;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// quinn's socket with relay frames taken out.
pub struct ServerSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The same socket, for batched STUN answers (`sendmmsg`).
    raw: std::net::UdpSocket,
    relay: Option<Arc<Mutex<RelayTable>>>,
    ipv6: bool,
    local: SocketAddr,
    /// STUN counters.
    pub stun: Arc<StunStats>,
    alt: Option<Arc<crate::stun::AltSockets>>,
    /// WebSocket clients, for relay sides bound over TCP.
    tcp: Arc<crate::tcp::TcpClients>,
}

/// STUN answers of one receive batch: (client, our address it asked, bytes).
type Answers = Vec<(SocketAddr, Option<std::net::IpAddr>, Vec<u8>)>;

/// Largest batch frame built for a TCP client (below the WebSocket message
/// limit).
const MAX_TCP_BATCH: usize = 60 * 1024;

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
        alt: Option<Arc<crate::stun::AltSockets>>,
        tcp: Arc<crate::tcp::TcpClients>,
    ) -> io::Result<Arc<Self>> {
        let local = sock.local_addr()?;
        let ipv6 = local.is_ipv6();
        // GRO stays on: a burst of relayed datagrams from one agent arrives
        // as one buffer and leaves as one GSO send (see `poll_recv`).
        let raw = sock.try_clone()?;
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, sock)?;
        Ok(Arc::new(ServerSocket {
            inner,
            raw,
            relay,
            ipv6,
            local,
            stun: Arc::default(),
            alt,
            tcp,
        }))
    }

    /// Sends a relay frame to a bound side of a session: a UDP address or
    /// a client of the TCP channel.
    pub fn send_to_endpoint(&self, to: Endpoint, frame: &[u8]) {
        match to {
            Endpoint::Udp(to) => self.send_datagram(to, frame),
            Endpoint::Tcp(id) => self.tcp.deliver(id, frame),
        }
    }

    /// Sends a relay frame that arrived over TCP to a UDP address: a data
    /// frame as it is, a batch as one data frame per datagram (one GSO
    /// send when the sizes allow).
    pub fn send_datagram(&self, to: SocketAddr, data: &[u8]) {
        let Ok(relay::Frame::Batch { session, body }) = relay::parse(data) else {
            self.forward(to, data, data.len());
            return;
        };
        let Some(items) = relay::batch_items(body) else {
            return;
        };
        let mut header = [0u8; relay::DATA_HEADER];
        relay::write_data_header(&mut header, session);
        let stride = items.first().map_or(0, |r| r.len()) + relay::DATA_HEADER;
        // GSO wants equal segments, only the last may be shorter.
        let uniform = items.iter().enumerate().all(|(k, r)| {
            let len = r.len() + relay::DATA_HEADER;
            len == stride || (k + 1 == items.len() && len <= stride)
        });
        if uniform && items.len() > 1 {
            let mut buf = Vec::with_capacity(body.len() + items.len() * relay::DATA_HEADER);
            for r in &items {
                buf.extend_from_slice(&header);
                buf.extend_from_slice(&body[r.clone()]);
            }
            self.forward(to, &buf, stride);
        } else {
            for r in items {
                let mut d = Vec::with_capacity(relay::DATA_HEADER + r.len());
                d.extend_from_slice(&header);
                d.extend_from_slice(&body[r]);
                self.forward(to, &d, d.len());
            }
        }
    }

    /// Answers a STUN Binding request: sends it from an alternate socket
    /// (CHANGE-REQUEST), or returns it for the main socket to send.
    fn stun_request(
        &self,
        from: SocketAddr,
        dst_ip: Option<std::net::IpAddr>,
        data: &[u8],
    ) -> Option<Vec<u8>> {
        let local = crate::stun::main_local(self.local, dst_ip);
        let from = punch_net::canonical(from);
        crate::stun::answer_main(self.alt.as_deref(), local, &self.stun, from, data)
    }

    /// Sends `data` (one datagram, or `stride`-sized GSO segments) to `to`;
    /// best effort, like any UDP forwarder: a full socket buffer drops.
    fn forward(&self, to: SocketAddr, data: &[u8], stride: usize) {
        let segments = data.len().div_ceil(stride.max(1));
        let gso = self.inner.max_transmit_segments();
        if segments > 1 && gso >= segments {
            let _ = self.inner.try_send(&Transmit {
                destination: punch_net::for_socket(to, self.ipv6),
                ecn: None,
                contents: data,
                segment_size: Some(stride),
                src_ip: None,
            });
            return;
        }
        for d in data.chunks(stride.max(1)) {
            let _ = self.inner.try_send(&Transmit {
                destination: punch_net::for_socket(to, self.ipv6),
                ecn: None,
                contents: d,
                segment_size: None,
                src_ip: None,
            });
        }
    }

    /// Handles one received buffer of `len` bytes in `stride`-sized
    /// segments (GRO), all from `from`: relay frames are forwarded (runs of
    /// segments for one destination in one GSO send), STUN is answered,
    /// and the QUIC segments are moved to the front; returns their length.
    fn sort_segments(&self, buf: &mut [u8], meta: &RecvMeta, answers: &mut Answers) -> usize {
        let len = meta.len;
        let stride = if meta.stride == 0 { len } else { meta.stride };
        let mut kept = 0;
        // A pending run of relay segments for one destination: (to, start, end).
        let mut run: Option<(SocketAddr, usize, usize)> = None;
        // Data frames for one TCP client, gathered into one batch frame.
        let mut batch: Option<(u64, Vec<u8>)> = None;
        let mut table = None;
        // One clock read a batch: quotas and idle times need no finer grain.
        let mut now = None;
        let mut off = 0;
        while off < len {
            let end = (off + stride).min(len);
            let seg = &buf[off..end];
            if relay::is_relay(seg) {
                let Some(t) = &self.relay else {
                    off = end;
                    continue;
                };
                let from = punch_net::canonical(meta.addr);
                let at = *now.get_or_insert_with(Instant::now);
                // The table stays locked over a run of segments that only
                // decide, and is let go before any send: no lock is held
                // across a syscall (or the TCP side's queue).
                let (action, released) = {
                    let g = table.get_or_insert_with(|| t.lock().expect("not poisoned"));
                    (g.handle(from, seg, at), g.take_released())
                };
                match action {
                    Ok(Action::Forward(Endpoint::Tcp(id))) => match relay::parse(seg) {
                        Ok(relay::Frame::Data { session, payload }) => {
                            let same = batch.as_ref().is_some_and(|(b_id, b)| {
                                *b_id == id
                                    && b[5..relay::DATA_HEADER] == session.0.to_be_bytes()
                                    && b.len() + payload.len() + 2 <= MAX_TCP_BATCH
                            });
                            if !same {
                                if let Some((b_id, b)) = batch.take() {
                                    table = None;
                                    self.tcp.deliver(b_id, &b);
                                }
                                let mut b = Vec::with_capacity(MAX_TCP_BATCH.min(len + 64));
                                relay::start_batch(&mut b, session);
                                batch = Some((id, b));
                            }
                            if let Some((_, b)) = &mut batch {
                                relay::push_batch_item(b, payload);
                            }
                        }
                        _ => {
                            table = None;
                            self.tcp.deliver(id, seg);
                        }
                    },
                    Ok(Action::Forward(Endpoint::Udp(to))) => match &mut run {
                        Some((r_to, _, r_end)) if *r_to == to && *r_end == off => *r_end = end,
                        _ => {
                            if let Some((to, s, e)) = run.take() {
                                table = None;
                                self.forward(to, &buf[s..e], stride);
                            }
                            run = Some((to, off, end));
                        }
                    },
                    Ok(Action::Reply(frame)) => {
                        table = None;
                        if let Some((to, s, e)) = run.take() {
                            self.forward(to, &buf[s..e], stride);
                        }
                        self.forward(from, &frame, frame.len());
                    }
                    Ok(Action::Held) => {}
                    Err(e) => tracing::trace!(%from, "relay frame dropped: {e}"),
                }
                // What a bind released (after its bind-ok, above) or a
                // spent quota's "ended" notices.
                if !released.is_empty() {
                    table = None;
                    for (to, f) in released {
                        self.send_to_endpoint(to, &f);
                    }
                }
                off = end;
                continue;
            }
            table = None;
            if let Some((to, s, e)) = run.take() {
                self.forward(to, &buf[s..e], stride);
            }
            if stun::looks_like_stun(seg) {
                if let Some(resp) = self.stun_request(meta.addr, meta.dst_ip, seg) {
                    answers.push((meta.addr, meta.dst_ip, resp));
                }
            } else {
                // QUIC: kept for quinn, packed at the front. Only the last
                // segment can be short, so the kept ones keep the stride.
                buf.copy_within(off..end, kept);
                kept += end - off;
            }
            off = end;
        }
        drop(table);
        if let Some((to, s, e)) = run.take() {
            self.forward(to, &buf[s..e], stride);
        }
        if let Some((id, b)) = batch.take() {
            self.tcp.deliver(id, &b);
        }
        kept
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
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut out = 0;
            let mut answers = Answers::new();
            for i in 0..n {
                let mut m = meta[i];
                let kept = self.sort_segments(&mut bufs[i], &m, &mut answers);
                if kept == 0 {
                    continue;
                }
                if out != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    head[out][..kept].copy_from_slice(&tail[0][..kept]);
                }
                m.len = kept;
                m.stride = m.stride.min(kept);
                meta[out] = m;
                out += 1;
            }
            if !answers.is_empty() {
                // STUN answers of the whole batch leave in one sendmmsg.
                let list: Vec<punch_net::OutDatagram<'_>> = answers
                    .iter()
                    .map(|(to, src, d)| (*to, *src, d.as_slice()))
                    .collect();
                punch_net::send_many(&self.raw, &list);
            }
            if out > 0 {
                return Poll::Ready(Ok(out));
            }
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
