//! Peer connections: what `connect` returns, what `serve` answers.

use crate::protocols::{accept, refuse};
use crate::socket::{ActivePath, PunchSocket};
use punch_net::{read_frame, write_frame};
use punch_protocol::close;
use punch_protocol::peer::{PeerReply, PeerRequest, MAX_PEER_HEADER};
use punch_protocol::signal::{PathKind, SessionId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, info_span, Instrument};

/// How a peer connection started out; see [`PeerConnection::path_now`]
/// for the path it uses now.
#[derive(Clone, Debug)]
pub struct PathInfo {
    /// Direct or relayed, when the handshake started.
    pub kind: PathKind,
    /// The peer's (or the relay's) address on that path.
    pub remote_addr: SocketAddr,
    /// From the connect request to the established connection (zero on the
    /// accepting side).
    pub connect_time: Duration,
    /// The punch session that introduced the peers.
    pub session: SessionId,
    /// The direct path runs through a gateway port mapping (ours or the
    /// peer's; known on the dialing side only).
    pub via_mapped: bool,
    /// How the direct path was found (dialing side; `None` when relayed).
    pub strategy: Option<Strategy>,
    /// Why the connection started on the relay (dialing side; `None` when
    /// it started direct).
    pub relay_reason: Option<RelayReason>,
}

/// How a direct path was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// Ordinary simultaneous probes to the addresses the server saw.
    Plain,
    /// Probes to the other ports of the peer's port block (a Cloud NAT
    /// block, from either side).
    BlockScan,
    /// The birthday method: many mappings on the hard side, a spray of
    /// ports from the easy side.
    Birthday,
    /// Port prediction: flows aimed at the ports a counting NAT hands out
    /// next.
    Prediction,
    /// Through a gateway port mapping (PCP, NAT-PMP, UPnP).
    PortMapping,
    /// Over IPv6 (no NAT in the way).
    Ipv6,
    /// Without the server: to the endpoints the address book remembered,
    /// the peer called by a knock.
    AddressBook,
    /// Without the server: to the endpoints the peer announces on the LAN
    /// (mDNS), the peer called by a knock.
    Lan,
    /// Without the server: to endpoints another peer told us (peer
    /// exchange) after the remembered ones did not answer.
    PeerExchange,
}

impl Strategy {
    /// `plain`, `block-scan`, `birthday`, `prediction`, `port-mapping`,
    /// `ipv6`, `address-book`, `lan`, `peer-exchange`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Strategy::Plain => "plain",
            Strategy::BlockScan => "block-scan",
            Strategy::Birthday => "birthday",
            Strategy::Prediction => "prediction",
            Strategy::PortMapping => "port-mapping",
            Strategy::Ipv6 => "ipv6",
            Strategy::AddressBook => "address-book",
            Strategy::Lan => "lan",
            Strategy::PeerExchange => "peer-exchange",
        }
    }
}

/// Why a connection started on the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayReason {
    /// `--force-relay`.
    Forced,
    /// A side has no UDP of its own (it reaches the server only over TCP).
    UdpBlocked,
    /// Both NATs map per destination and one draws from the whole port
    /// range at random: nothing to scan or predict.
    BothRandom,
    /// No probe of ours was answered within the relay-after time (the
    /// punch may still succeed and move the connection).
    PeerNeverAnswered,
}

impl RelayReason {
    /// `forced`, `udp-blocked`, `both-random`, `peer-never-answered`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayReason::Forced => "forced",
            RelayReason::UdpBlocked => "udp-blocked",
            RelayReason::BothRandom => "both-random",
            RelayReason::PeerNeverAnswered => "peer-never-answered",
        }
    }
}

/// An authenticated connection to another agent.
#[derive(Clone, Debug)]
pub struct PeerConnection {
    /// The QUIC connection; open streams on it freely.
    pub conn: quinn::Connection,
    /// The peer's worker id, as vouched for by the server.
    pub peer_id: String,
    /// The path when the connection was established.
    pub path: PathInfo,
    /// The stable address quinn sees for the peer.
    pub virtual_addr: SocketAddr,
    pub(crate) socket: Arc<PunchSocket>,
    /// The application protocols this side serves.
    pub(crate) protocols: crate::protocols::Protocols,
}

/// [`PeerConnection::open_protocol`] on a bare connection: for a protocol
/// handler that opens streams back to the peer that asked
/// ([`crate::ProtocolStream::connection`]).
pub async fn open_protocol_on(
    conn: &quinn::Connection,
    name: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
    if !crate::protocols::valid_name(name) {
        return Err(PeerError::Refused(format!(
            "{name:?} is not a protocol name"
        )));
    }
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = PeerRequest::Open {
        protocol: name.to_string(),
    };
    write_frame(&mut send, &req).await?;
    let reply: PeerReply = read_frame(&mut recv, MAX_PEER_HEADER).await?;
    if !reply.ok {
        return Err(PeerError::Refused(reply.message));
    }
    Ok((send, recv))
}

/// The path packets to virtual address `v` take now, and the address they
/// go to (the peer's, or the relay's).
pub fn current_path(socket: &PunchSocket, v: SocketAddr) -> (PathKind, Option<SocketAddr>) {
    match socket.paths.lock().expect("not poisoned").active(v) {
        Some(ActivePath::Direct(a)) => (PathKind::Direct, Some(a)),
        Some(ActivePath::Relay(crate::socket::RelayVia::Udp(server))) => {
            (PathKind::Relayed, Some(server))
        }
        Some(ActivePath::Relay(crate::socket::RelayVia::Tcp)) => (PathKind::Relayed, None),
        _ => (PathKind::Failed, None),
    }
}

/// Errors on a peer stream.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot open stream: {0}")]
    /// The connection failed.
    Open(#[from] quinn::ConnectionError),
    #[error(transparent)]
    /// A request or answer frame failed.
    Frame(#[from] punch_net::FrameError),
    #[error("write failed: {0}")]
    /// Writing to the stream failed.
    Write(#[from] quinn::WriteError),
    #[error("read failed: {0}")]
    /// Reading from the stream failed.
    Read(#[from] quinn::ReadExactError),
    #[error("echo mismatch")]
    /// The echo differed from what was sent.
    Mismatch,
    #[error("the peer refused: {0}")]
    /// The peer refused the request (e.g. it has no such protocol).
    Refused(String),
}

/// An open echo stream for repeated round-trip measurements.
pub struct Pinger {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    seq: u64,
}

impl Pinger {
    /// One round trip of 8 bytes.
    pub async fn ping(&mut self) -> Result<Duration, PeerError> {
        self.seq += 1;
        let out = self.seq.to_be_bytes();
        let t = Instant::now();
        self.send.write_all(&out).await?;
        let mut back = [0u8; 8];
        self.recv.read_exact(&mut back).await?;
        if back != out {
            return Err(PeerError::Mismatch);
        }
        Ok(t.elapsed())
    }
}

/// Longest [`close_now`] waits for the close to leave.
const CLOSE_SENT_WAIT: Duration = Duration::from_millis(100);

/// Closes `conn` and returns once its CONNECTION_CLOSE has been handed to
/// the socket (at most [`CLOSE_SENT_WAIT`]): not for an acknowledgement,
/// nor for the draining period (three probe timeouts) after it.
pub(crate) async fn close_now(conn: &quinn::Connection, code: u32, reason: &[u8]) {
    let before = conn.stats().udp_tx.datagrams;
    conn.close(code.into(), reason);
    let until = tokio::time::Instant::now() + CLOSE_SENT_WAIT;
    // quinn has no event for "sent"; its counters tell within a tick.
    while conn.stats().udp_tx.datagrams == before && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl PeerConnection {
    /// Closes the connection (code `DONE`) and returns once the peer has
    /// been told, without waiting for the connection to drain: what a
    /// program that exits next should call.
    pub async fn close(&self) {
        close_now(&self.conn, punch_protocol::close::DONE, b"done").await;
    }

    /// The path in use now: it moves from the relay to a direct path as
    /// soon as one is validated, without a new connection.
    pub fn path_now(&self) -> (PathKind, Option<SocketAddr>) {
        current_path(&self.socket, self.virtual_addr)
    }

    /// How this side's packets travel now: `Udp` (direct, or the UDP
    /// relay) or `Tcp` (the relay over the WebSocket channel).
    pub fn transport_now(&self) -> punch_protocol::signal::Transport {
        match self
            .socket
            .paths
            .lock()
            .expect("not poisoned")
            .active(self.virtual_addr)
        {
            Some(ActivePath::Relay(via)) => via.transport(),
            _ => punch_protocol::signal::Transport::Udp,
        }
    }

    /// The connection's current round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Opens an echo stream on the connection.
    pub async fn pinger(&self) -> Result<Pinger, PeerError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(&mut send, &PeerRequest::Echo).await?;
        Ok(Pinger { send, recv, seq: 0 })
    }

    /// Opens a stream of application protocol `name` (registered on the
    /// peer with [`crate::AgentBuilder::protocol`]): once the peer accepts,
    /// the stream's bytes are the protocol's. [`PeerError::Refused`] when
    /// the peer does not serve it.
    pub async fn open_protocol(
        &self,
        name: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        open_protocol_on(&self.conn, name).await
    }

    /// One question and its answer on a new stream of protocol `name`
    /// (a postcard frame each way, the answer at most `max` bytes), as the
    /// agent's own protocols ask (`punch/pex`, `punch/walk`); the other
    /// side reads it with [`crate::ProtocolStream::question`].
    pub(crate) async fn ask<Q, A>(
        &self,
        name: &str,
        question: &Q,
        max: usize,
    ) -> Result<A, PeerError>
    where
        Q: serde::Serialize,
        A: serde::de::DeserializeOwned,
    {
        let (mut send, mut recv) = self.open_protocol(name).await?;
        write_frame(&mut send, question)
            .await
            .map_err(|e| PeerError::Refused(e.to_string()))?;
        let _ = send.finish();
        read_frame(&mut recv, max)
            .await
            .map_err(|e| PeerError::Refused(e.to_string()))
    }

    /// Opens a stream with a request of a built-in app (files, forward,
    /// bench: [`PeerRequest::protocol`]) and returns it without waiting
    /// for an answer: for requests without a [`PeerReply`]
    /// ([`PeerRequest::has_reply`]).
    pub async fn open_request(
        &self,
        req: &PeerRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(&mut send, req).await?;
        Ok((send, recv))
    }

    /// Opens a stream with `req` (finishing our side when `finish`) and
    /// reads the peer's [`PeerReply`]: the stream once the peer accepted,
    /// [`PeerError::Refused`] with its reason when it did not.
    pub async fn request(
        &self,
        req: &PeerRequest,
        finish: bool,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        let (mut send, mut recv) = self.open_request(req).await?;
        if finish {
            let _ = send.finish();
        }
        let reply: PeerReply = read_frame(&mut recv, MAX_PEER_HEADER).await?;
        if !reply.ok {
            return Err(PeerError::Refused(reply.message));
        }
        Ok((send, recv))
    }

    /// Serves the peer's streams (echo) until the connection closes.
    pub async fn serve(self) {
        let peer = self.peer_id.clone();
        async move {
            loop {
                let (send, recv) = match self.conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        info!("peer connection closed: {e}");
                        return;
                    }
                };
                let stream = serve_stream(
                    send,
                    recv,
                    self.conn.clone(),
                    self.peer_id.clone(),
                    self.protocols.clone(),
                );
                tokio::spawn(stream.in_current_span());
            }
        }
        .instrument(info_span!("peer", peer = %peer))
        .await
    }
}

/// Serves one stream: echo here, everything else by the protocol it names.
async fn serve_stream(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    connection: quinn::Connection,
    peer_id: String,
    protocols: crate::protocols::Protocols,
) {
    let mut recv = recv;
    let req: PeerRequest = match read_frame(&mut recv, MAX_PEER_HEADER).await {
        Ok(r) => r,
        Err(e) => {
            debug!("bad stream header: {e}");
            let _ = send.reset(close::STREAM_ERROR.into());
            return;
        }
    };
    let Some(protocol) = req.protocol().map(str::to_string) else {
        return echo(send, recv).await;
    };
    let Some(handler) = protocols.get(&protocol).cloned() else {
        debug!(%protocol, "stream for a protocol we do not serve");
        if req.has_reply() {
            refuse(&mut send, format!("no protocol {protocol:?} here")).await;
        } else {
            let _ = send.reset(close::STREAM_ERROR.into());
        }
        return;
    };
    let request = match req {
        PeerRequest::Open { .. } => {
            if !accept(&mut send).await {
                return;
            }
            None
        }
        built_in => Some(built_in),
    };
    handler
        .handle(crate::protocols::ProtocolStream {
            peer_id,
            protocol,
            send,
            recv,
            connection,
            request,
        })
        .await;
}

/// Echoes every byte back until the opener finishes its side (pings).
async fn echo(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = send.finish();
                return;
            }
            Err(_) => return,
        }
    }
}

/// Transport settings for peer connections.
pub fn peer_transport(keep_alive: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Peers keep-alive at least every second: a silent direct path is how
    // the agent notices a dead NAT mapping and moves to the relay.
    t.keep_alive_interval(Some(keep_alive.min(Duration::from_secs(1))));
    // A first packet lost early (on a relay-first connection the peer may
    // not have bound yet) is resent after about three initial RTTs: 100 ms
    // instead of RFC 9002's 333 ms keeps that near 0.3 s rather than 1 s.
    // A longer real RTT costs one duplicate Initial.
    t.initial_rtt(Duration::from_millis(100));
    // Relayed packets carry a 13-byte header: keep QUIC packets small
    // enough that a relayed one still fits a 1500-byte link over IPv6.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(1400);
    t.mtu_discovery_config(Some(mtu));
    // Windows for bulk transfers (quinn's defaults cap a stream near
    // 1.25 MB in flight: 500 MB/s at 2.5 ms, 15 MB/s at 80 ms). Bounds on
    // buffering, not allocations: a reader that keeps up holds little.
    // The sender's own buffer stays at 4 MiB (50 MB/s at 80 ms): what it
    // holds must still drain when a lossy path slows to a crawl.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(4 << 20);
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("in range"),
    ));
    t
}
