//! The agent's one UDP socket, shared by QUIC and the puncher.
//!
//! [`PunchSocket`] wraps quinn's own socket and implements
//! [`quinn::AsyncUdpSocket`]: datagrams that start with the probe magic are
//! taken out of what quinn receives and handed to the punch session they
//! name; everything else goes to quinn. Signaling, probes and peer
//! connections thus share one NAT mapping.

use crate::path::demux::{classify, is_quic_initial, Datagram};
use bytes::Bytes;
use punch_protocol::budget::{ProbeBudget, ProbeLimits};
use punch_protocol::relay;
use punch_protocol::signal::SessionId;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::warn;

mod stun_client;

pub use crate::path::{is_virtual, ActivePath, PathTable, RelayVia};
pub use crate::probe_router::{ProbeDatagram, ProbeRouter};

/// quinn's socket with probes and relay frames handled, and peers behind
/// virtual addresses.
pub struct PunchSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    router: Arc<ProbeRouter>,
    ipv6: bool,
    /// Peers' virtual addresses and paths.
    pub paths: Mutex<PathTable>,
    /// Relay bind confirmations, by session.
    bind_waiters: Mutex<HashMap<SessionId, mpsc::Sender<Vec<u8>>>>,
    /// STUN transactions waiting for their response, by transaction id.
    stun_waiters: Mutex<HashMap<[u8; 16], tokio::sync::oneshot::Sender<Vec<u8>>>>,
    /// Relay frames out over the WebSocket channel, while there is one.
    tcp_out: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// Relayed datagrams that arrived over the WebSocket, for quinn:
    /// (virtual source, payload).
    inbox: Mutex<VecDeque<(SocketAddr, Bytes)>>,
    /// quinn's receive task, woken when the inbox fills.
    inbox_waker: Mutex<Option<Waker>>,
    /// Woken when the server ends a relay session (see
    /// [`PathTable::relay_ended`]).
    pub relay_ended: tokio::sync::Notify,
    /// What every punching datagram spends, across sessions.
    probe_budget: Mutex<ProbeBudget>,
}

/// Relayed datagrams held for quinn before more are dropped.
const INBOX: usize = 4096;

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
            paths: Mutex::new(PathTable::default()),
            bind_waiters: Mutex::new(HashMap::new()),
            stun_waiters: Mutex::new(HashMap::new()),
            tcp_out: Mutex::new(None),
            inbox: Mutex::new(VecDeque::new()),
            inbox_waker: Mutex::new(None),
            relay_ended: tokio::sync::Notify::new(),
            probe_budget: Mutex::new(ProbeBudget::new(ProbeLimits::default(), Instant::now())),
        }))
    }

    /// Sets (or clears) the WebSocket channel relay frames leave through.
    pub fn set_tcp_out(&self, tx: Option<mpsc::Sender<Bytes>>) {
        *self.tcp_out.lock().expect("not poisoned") = tx;
    }

    /// Sends a relay frame over the WebSocket channel; dropped when there
    /// is none or it is full (QUIC backs off, as on a full UDP buffer).
    fn send_tcp(&self, frame: Bytes) {
        if let Some(tx) = &*self.tcp_out.lock().expect("not poisoned") {
            let _ = tx.try_send(frame);
        }
    }

    /// Sends a relay control frame (bind) the way the binding goes.
    pub fn send_relay_control(&self, via: RelayVia, frame: &[u8]) {
        match via {
            RelayVia::Udp(server) => {
                let _ = self.send_raw(server, frame);
            }
            RelayVia::Tcp => self.send_tcp(Bytes::copy_from_slice(frame)),
        }
    }

    /// Takes a relay frame that arrived over the WebSocket channel: data
    /// goes to quinn as if it came from the peer's virtual address.
    pub fn tcp_in(&self, frame: Bytes) {
        if let Ok(relay::Frame::Batch { session, body }) = relay::parse(&frame) {
            let v = self
                .paths
                .lock()
                .expect("not poisoned")
                .peer_of_session(&session);
            let (Some(v), Some(items)) = (v, relay::batch_items(body)) else {
                return;
            };
            for r in items {
                let at = relay::DATA_HEADER + r.start..relay::DATA_HEADER + r.end;
                if is_quic_initial(&frame[at.clone()]) {
                    self.paths
                        .lock()
                        .expect("not poisoned")
                        .initial_via_relay(v);
                }
                self.deliver(v, frame.slice(at));
            }
            return;
        }
        let Some((v, header)) = self.relay_in(&frame) else {
            return;
        };
        self.deliver(v, frame.slice(header..));
    }

    /// Hands quinn a datagram from `v` that arrived on another socket (an
    /// extra socket of the birthday method).
    pub fn deliver(&self, v: SocketAddr, d: Bytes) {
        {
            let mut inbox = self.inbox.lock().expect("not poisoned");
            if inbox.len() >= INBOX {
                return;
            }
            inbox.push_back((v, d));
        }
        if let Some(w) = self.inbox_waker.lock().expect("not poisoned").take() {
            w.wake();
        }
    }

    /// Our local IPv4 address for extra sockets (unspecified when the main
    /// socket is).
    pub fn local_ip_v4(&self) -> IpAddr {
        match self.inner.local_addr().map(|a| a.ip().to_canonical()) {
            Ok(IpAddr::V4(ip)) => IpAddr::V4(ip),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }

    /// Moves relayed datagrams from the inbox into quinn's buffers.
    fn drain_inbox(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut inbox = self.inbox.lock().expect("not poisoned");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((v, d)) = inbox.pop_front() else {
                break;
            };
            if d.len() > bufs[n].len() {
                continue;
            }
            bufs[n][..d.len()].copy_from_slice(&d);
            meta[n] = RecvMeta {
                addr: self.quinn_addr(v),
                len: d.len(),
                stride: d.len(),
                ..RecvMeta::default()
            };
            n += 1;
        }
        n
    }

    /// The virtual address in the form quinn uses on this socket.
    pub fn quinn_addr(&self, v: SocketAddr) -> SocketAddr {
        punch_net::for_socket(v, self.ipv6)
    }

    /// Waits for relay bind confirmations of `session` (raw frames).
    pub fn watch_binds(&self, session: SessionId) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel(4);
        self.bind_waiters
            .lock()
            .expect("not poisoned")
            .insert(session, tx);
        rx
    }

    /// Stops waiting for binds of `session`.
    pub fn unwatch_binds(&self, session: SessionId) {
        self.bind_waiters
            .lock()
            .expect("not poisoned")
            .remove(&session);
    }

    /// Sends a raw datagram (probe or relay control), best effort.
    pub fn send_raw(&self, dst: SocketAddr, payload: &[u8]) -> io::Result<()> {
        self.send_unbudgeted(dst, payload)
    }

    /// Sends quinn's datagrams to the relay, each behind a data header. A
    /// GSO batch stays one batch (one syscall): every segment grows by the
    /// header, and only the last may be shorter, as GSO requires. Over the
    /// WebSocket each datagram is one message.
    fn send_relayed(&self, via: RelayVia, session: SessionId, t: &Transmit) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let server = match via {
            RelayVia::Udp(s) => s,
            RelayVia::Tcp => {
                // One message for the whole GSO batch: per-message costs
                // dominate on the TCP channel.
                // Batches stay well below the WebSocket message limit.
                const MAX_BATCH: usize = 60 * 1024;
                let mut f = Vec::with_capacity(MAX_BATCH.min(t.contents.len() + 256));
                relay::start_batch(&mut f, session);
                for chunk in t.contents.chunks(seg) {
                    if f.len() + 2 + chunk.len() > MAX_BATCH && f.len() > relay::DATA_HEADER {
                        self.send_tcp(Bytes::from(std::mem::take(&mut f)));
                        relay::start_batch(&mut f, session);
                    }
                    relay::push_batch_item(&mut f, chunk);
                }
                self.send_tcp(Bytes::from(f));
                return Ok(());
            }
        };
        let n = t.contents.len().div_ceil(seg);
        let mut frames = Vec::with_capacity(t.contents.len() + n * relay::DATA_HEADER);
        let mut header = [0u8; relay::DATA_HEADER];
        relay::write_data_header(&mut header, session);
        for chunk in t.contents.chunks(seg) {
            frames.extend_from_slice(&header);
            frames.extend_from_slice(chunk);
        }
        self.inner.try_send(&Transmit {
            destination: punch_net::for_socket(server, self.ipv6),
            ecn: t.ecn,
            contents: &frames,
            segment_size: (n > 1).then_some(seg + relay::DATA_HEADER),
            src_ip: t.src_ip,
        })
    }

    /// Handles a relay frame; returns the virtual source and the payload
    /// range for data frames.
    fn relay_in(&self, data: &[u8]) -> Option<(SocketAddr, usize)> {
        match relay::parse(data) {
            Ok(relay::Frame::Data { session, payload }) => {
                let mut paths = self.paths.lock().expect("not poisoned");
                let v = paths.peer_of_session(&session)?;
                if is_quic_initial(payload) {
                    paths.initial_via_relay(v);
                }
                Some((v, data.len() - payload.len()))
            }
            Ok(f @ (relay::Frame::Ended { .. } | relay::Frame::Unknown { .. })) => {
                let v = self.paths.lock().expect("not poisoned").relay_ended(&f);
                if let Some(v) = v {
                    match f {
                        relay::Frame::Ended { reason, .. } => {
                            tracing::warn!(peer = %v, reason = reason.as_str(), "the server ended our relay session")
                        }
                        _ => {
                            tracing::warn!(peer = %v, "the server does not know our relay session (it restarted?); asking for a new one")
                        }
                    }
                    self.relay_ended.notify_waiters();
                }
                None
            }
            Ok(relay::Frame::BindOk { session, .. }) => {
                if let Some(tx) = self
                    .bind_waiters
                    .lock()
                    .expect("not poisoned")
                    .get(&session)
                {
                    let _ = tx.try_send(data.to_vec());
                }
                None
            }
            _ => None,
        }
    }

    /// Sorts one received buffer of `stride`-sized segments (GRO: a run of
    /// equal datagrams from one address, the last maybe shorter): probes,
    /// STUN and relay control are consumed; QUIC and relayed payloads (their
    /// relay header cut off) stay for quinn. The kept run is packed at the
    /// front under one meta; a segment that does not fit it (another peer's
    /// relayed data, a different size) goes to the inbox.
    fn sort_segments(&self, buf: &mut [u8], m: &RecvMeta) -> Option<RecvMeta> {
        let len = m.len.min(buf.len());
        let stride = if m.stride == 0 {
            len
        } else {
            m.stride.min(len)
        };
        let from = punch_net::canonical(m.addr);
        // Where a QUIC datagram from `from` goes (looked up once a batch).
        let mut direct_to: Option<SocketAddr> = None;
        // The kept run: (quinn address, segment size, bytes so far, closed).
        let mut run: Option<(SocketAddr, usize, usize, bool)> = None;
        let mut off = 0;
        while off < len {
            let end = (off + stride).min(len);
            let seg = &buf[off..end];
            let (to, start) = match classify(seg) {
                Datagram::Probe => {
                    self.router.route(m.addr, seg);
                    off = end;
                    continue;
                }
                Datagram::Stun => {
                    self.stun_in(seg);
                    off = end;
                    continue;
                }
                Datagram::Relay => {
                    let Some((v, header)) = self.relay_in(seg) else {
                        off = end;
                        continue;
                    };
                    (self.quinn_addr(v), header)
                }
                Datagram::Quic => {
                    let initial = is_quic_initial(seg);
                    let to = match direct_to {
                        Some(to) if !initial => to,
                        _ => *direct_to.insert(self.direct_source(from, m.addr, initial)),
                    };
                    (to, 0)
                }
            };
            let size = end - off - start;
            match &mut run {
                None => {
                    buf.copy_within(off + start..end, 0);
                    run = Some((to, size, size, false));
                }
                Some((r_to, r_size, r_len, closed))
                    if *r_to == to && !*closed && size <= *r_size =>
                {
                    buf.copy_within(off + start..end, *r_len);
                    *r_len += size;
                    *closed = size < *r_size;
                }
                Some(_) => {
                    let d = Bytes::copy_from_slice(&buf[off + start..end]);
                    let mut inbox = self.inbox.lock().expect("not poisoned");
                    if inbox.len() < INBOX {
                        inbox.push_back((to, d));
                    }
                }
            }
            off = end;
        }
        let (addr, size, len, _) = run?;
        Some(RecvMeta {
            addr,
            len,
            stride: size,
            ..*m
        })
    }

    /// The address quinn sees for QUIC from `from`: the peer's stable
    /// address when `from` is its direct path (or a probed candidate while
    /// it has no path yet), else `raw` itself.
    fn direct_source(&self, from: SocketAddr, raw: SocketAddr, initial: bool) -> SocketAddr {
        let v = self.paths.lock().expect("not poisoned").direct_arrival(
            from,
            initial,
            std::time::Instant::now(),
        );
        v.map_or(raw, |v| self.quinn_addr(v))
    }

    /// Sends one probe datagram within the agent's probe budget (see
    /// [`punch_protocol::budget`]); best effort (probes are repeated).
    pub fn send_probe(&self, dst: SocketAddr, payload: &[u8]) -> io::Result<()> {
        if !self.probe_allowed(dst) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "over the probe budget for this address",
            ));
        }
        self.send_unbudgeted(dst, payload)
    }

    /// Spends one probe of the agent-wide budget on `dst`; false when
    /// there is none left (the probe is not sent). Every socket that
    /// punches (the birthday method's too) asks first.
    pub fn probe_allowed(&self, dst: SocketAddr) -> bool {
        let mut b = self.probe_budget.lock().expect("not poisoned");
        let before = b.refused();
        let ok = b.allow(dst.ip(), Instant::now());
        // One line at the first refusal and then every 1,000th: enough to
        // see a peer steering probes, not a flood.
        if !ok && before.is_multiple_of(1000) {
            warn!(%dst, refused = before + 1, "probe budget spent: probes to this address are dropped (a peer naming many candidates there, or many sessions at once)");
        }
        ok
    }

    /// Sends a datagram outside the probe budget (relay control).
    fn send_unbudgeted(&self, dst: SocketAddr, payload: &[u8]) -> io::Result<()> {
        if dst.is_ipv6() && !self.ipv6 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "IPv6 destination on an IPv4 socket",
            ));
        }
        let destination = punch_net::for_socket(dst, self.ipv6);
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
        let dst = punch_net::canonical(transmit.destination);
        if !is_virtual(dst) {
            return self.inner.try_send(transmit);
        }
        let route = self.paths.lock().expect("not poisoned").send_route(dst);
        let (active, session, aux) = match route {
            Some((a, s, x)) => (Some(a), s, x),
            None => (None, None, None),
        };
        if let (Some(ActivePath::Direct(addr)), Some(aux)) = (active, aux) {
            let seg = transmit
                .segment_size
                .unwrap_or(transmit.contents.len())
                .max(1);
            for chunk in transmit.contents.chunks(seg) {
                // Best effort, like any UDP send: QUIC recovers a drop.
                let _ = aux.try_send_to(chunk, addr);
            }
            return Ok(());
        }
        match (active, session) {
            (Some(ActivePath::Direct(addr)), _) => self.inner.try_send(&Transmit {
                destination: punch_net::for_socket(addr, self.ipv6),
                ecn: transmit.ecn,
                contents: transmit.contents,
                segment_size: transmit.segment_size,
                src_ip: transmit.src_ip,
            }),
            (Some(ActivePath::Relay(via)), Some(session)) => {
                self.send_relayed(via, session, transmit)
            }
            // No path yet (or a forgotten peer): drop, QUIC retransmits.
            _ => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut w = self.inbox_waker.lock().expect("not poisoned");
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        loop {
            let n = self.drain_inbox(bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut kept = 0;
            for i in 0..n {
                let Some(m) = self.sort_segments(&mut bufs[i], &meta[i]) else {
                    continue;
                };
                if kept != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    head[kept][..m.len].copy_from_slice(&tail[0][..m.len]);
                }
                meta[kept] = m;
                kept += 1;
            }
            if kept > 0 {
                if !self.inbox.lock().expect("not poisoned").is_empty() {
                    // Segments that did not fit the batch wait in the inbox.
                    cx.waker().wake_by_ref();
                }
                return Poll::Ready(Ok(kept));
            }
            // Nothing for quinn (probes, STUN, relay control): poll again
            // so its waker stays armed.
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

#[cfg(test)]
mod tests {
    use super::*;
    use punch_protocol::signal::Role;
    use std::time::Duration;

    fn data_frame(session: SessionId, fill: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![fill; relay::DATA_HEADER + payload];
        relay::write_data_header(&mut f, session);
        f
    }

    async fn read(
        sock: &PunchSocket,
        bufs: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
    ) -> Vec<(SocketAddr, usize, Vec<u8>)> {
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| sock.poll_recv(cx, &mut slices, metas)),
        )
        .await
        .expect("a datagram within 5 s")
        .expect("receive");
        (0..n)
            .map(|i| {
                (
                    metas[i].addr,
                    metas[i].stride,
                    slices[i][..metas[i].len].to_vec(),
                )
            })
            .collect()
    }

    /// A GSO batch of relay frames for two peers (and the server's notice
    /// that one session ended) arrives as one GRO buffer: each peer's
    /// payloads reach quinn without their headers, under its own address,
    /// and the notice is taken out and checked.
    #[tokio::test]
    async fn a_gro_batch_is_sorted_per_peer() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let at = rx.local_addr().unwrap();
        let sock = PunchSocket::new(rx, Arc::new(ProbeRouter::default())).unwrap();
        if sock.max_receive_segments() < 2 {
            eprintln!("skipped: no UDP GRO on this kernel");
            return;
        }
        let (s1, s2) = (SessionId(1), SessionId(2));
        let secret = [9u8; 32];
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = tx.local_addr().unwrap();
        let (v1, v2) = {
            let mut p = sock.paths.lock().unwrap();
            let v1 = p.register(s1, [1; 32], "one").unwrap();
            let v2 = p.register(s2, [2; 32], "two").unwrap();
            p.set_relay(v1, RelayVia::Udp(server), s1, secret, Role::Controlling);
            (v1, v2)
        };
        let mut batch = Vec::new();
        for f in [
            data_frame(s1, b'a', 100),
            data_frame(s1, b'b', 100),
            data_frame(s2, b'c', 100),
            data_frame(s1, b'd', 100),
        ] {
            batch.extend_from_slice(&f);
        }
        batch.extend_from_slice(&relay::encode_ended(
            &secret,
            s1,
            relay::EndReason::Bytes,
            7,
        ));
        let state = quinn::udp::UdpSocketState::new((&tx).into()).unwrap();
        state
            .send(
                (&tx).into(),
                &Transmit {
                    destination: at,
                    ecn: None,
                    contents: &batch,
                    segment_size: Some(relay::DATA_HEADER + 100),
                    src_ip: None,
                },
            )
            .unwrap();
        let mut bufs = vec![vec![0u8; 65536]; 4];
        let mut metas = [RecvMeta::default(); 4];
        let first = read(&sock, &mut bufs, &mut metas).await;
        let (q1, q2) = (sock.quinn_addr(v1), sock.quinn_addr(v2));
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let split = |got: &mut Vec<_>, reads: Vec<(SocketAddr, usize, Vec<u8>)>| {
            for (addr, stride, data) in reads {
                for seg in data.chunks(stride.max(1)) {
                    got.push((addr, seg.to_vec()));
                }
            }
        };
        let batched = first.len() == 1 && first[0].2.len() > 100;
        split(&mut got, first);
        while got.len() < 4 {
            split(&mut got, read(&sock, &mut bufs, &mut metas).await);
        }
        assert_eq!(
            got,
            vec![
                (q1, vec![b'a'; 100]),
                (q1, vec![b'b'; 100]),
                (q1, vec![b'd'; 100]),
                (q2, vec![b'c'; 100]),
            ],
            "one run per peer, headers cut off"
        );
        assert!(batched, "the kernel delivered the batch as one GRO buffer");
        let p = sock.paths.lock().unwrap();
        assert_eq!(
            p.relay_ended_session(v1),
            Some(s1),
            "the notice was checked and noted"
        );
        assert_eq!(p.relay_ended_session(v2), None);
    }
}
