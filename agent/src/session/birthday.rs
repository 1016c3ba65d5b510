//! The birthday method's I/O: the decisions and the hard side's machine
//! live in [`punch_protocol::birthday`] (re-exported here); this module
//! binds the extra sockets, reads them, feeds [`HardSide`] and sends what
//! it asks for.

pub use punch_protocol::birthday::*;

use super::Punched;
use crate::Inner;
use punch_protocol::probe;
use punch_protocol::signal::Offer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// The hard side: opens a socket for each of `flows` (the targets that
/// socket sends to) and runs a [`HardSide`] on them (see there).
/// Returns the socket with the path and the peer's address (when found
/// within `limit`), and every socket the peer pinged: the peer may have
/// validated another one of them and will send there.
///
/// QUIC from the peer on a socket its authenticated ping came from goes to
/// quinn at once (as `v`'s): the peer dials as soon as our pong validates
/// its side, often a moment before our own ping-back is answered, and
/// that first Initial must not wait for a retransmission. With no direct
/// path yet, that socket becomes `v`'s path, as QUIC from a probed address
/// does on the main socket.
pub(crate) async fn hard_side(
    inner: &Arc<Inner>,
    offer: &Offer,
    v: SocketAddr,
    mut flows: Vec<Vec<SocketAddr>>,
    limit: Duration,
    strategy: crate::peer::Strategy,
) -> (Option<(Arc<UdpSocket>, Punched)>, Vec<Arc<UdpSocket>>) {
    let Some(&first) = flows.iter().flatten().next() else {
        return (None, Vec::new());
    };
    let local = inner.socket.local_ip_v4();
    let mut socks = Vec::with_capacity(flows.len());
    for _ in 0..flows.len() {
        match UdpSocket::bind(SocketAddr::new(local, 0)).await {
            Ok(s) => socks.push(Arc::new(s)),
            Err(e) => {
                debug!("birthday: only {} sockets: {e}", socks.len());
                break;
            }
        }
    }
    flows.truncate(socks.len());
    let targets: usize = flows.iter().map(Vec::len).sum();
    info!(sockets = socks.len(), targets, %first, "birthday method: hard side opens its sockets");
    let (tx, mut rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
    let mut readers = Vec::with_capacity(socks.len());
    for (i, s) in socks.iter().enumerate() {
        let (s, tx) = (s.clone(), tx.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                if tx.send((i, from, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let params = HardParams {
        session: offer.session,
        secret: offer.secret,
        role: offer.role,
        txid_base: rand::random::<u64>() >> 1,
    };
    let peer_ip = first.ip().to_canonical();
    let mut h = HardSide::with_flows(params, flows, Instant::now(), limit);
    let found = loop {
        while let Some((i, t)) = h.poll_transmit() {
            if let Some(s) = socks.get(i).filter(|_| inner.socket.probe_allowed(t.dst)) {
                // Not try_send_to: a socket bound a moment ago is not known
                // writable until the reactor has polled it, and the whole
                // first round would be dropped (found in the lab: every
                // punch waited for the second round, 300 ms later).
                let _ = s.send_to(&t.payload, t.dst).await;
            }
        }
        match h.poll_event() {
            Some(HardEvent::Validated {
                socket,
                addr,
                rtt,
                observed,
            }) => break socks.get(socket).map(|s| (s.clone(), addr, rtt, observed)),
            Some(HardEvent::TimedOut) => break None,
            None => {}
        }
        let wake = h.poll_timeout().unwrap_or_else(Instant::now);
        tokio::select! {
            d = rx.recv() => match d {
                Some((i, from, data)) if !probe::is_probe(&data) => {
                    let from = punch_net::canonical(from);
                    if from.ip() != peer_ip {
                        continue;
                    }
                    if let Some(s) = socks.get(i) {
                        let now = Instant::now();
                        let mut paths = inner.socket.paths.lock().expect("not poisoned");
                        let pinged_from = h.met_from(i) == Some(from);
                        if pinged_from && !matches!(paths.active(v), Some(crate::path::ActivePath::Direct(_))) {
                            debug!(socket = i, %from, "birthday: QUIC from the peer on a met socket; answering there");
                            paths.set_direct_aux(v, from, s.clone(), now);
                        }
                        if paths.uses_aux(v, s) {
                            paths.touch_direct(v, now);
                        }
                    }
                    inner.socket.deliver(v, bytes::Bytes::from(data));
                }
                Some((i, from, data)) => {
                    let before = h.met().len();
                    let _ = h.handle_probe(i, from, &data, Instant::now());
                    if h.met().len() > before {
                        debug!(socket = i, %from, "birthday: the spray met one of our mappings");
                    }
                }
                None => break None,
            },
            _ = tokio::time::sleep_until(wake.into()) => h.handle_timeout(Instant::now()),
        }
    };
    for r in readers {
        r.abort();
    }
    let met = h
        .met()
        .iter()
        .filter_map(|i| socks.get(*i).cloned())
        .collect();
    let Some((sock, addr, rtt, observed)) = found else {
        return (None, met);
    };
    info!(%addr, %observed, "birthday method: path validated through an extra socket");
    let punched = Punched {
        addr,
        rtt,
        via_mapped: false,
        strategy,
    };
    (Some((sock, punched)), met)
}

/// Where our NAT's counter stands, and the server's other address (the
/// NAT check's), to spread fresh mappings over.
#[derive(Debug, Default)]
pub(crate) struct CounterState {
    pub counter: Option<punch_protocol::predict::Counter>,
    pub other: Option<SocketAddr>,
}

/// How far past the advertised port a peer's flows aim (the controlled
/// side's twelve flows two strides apart, [`punch_protocol::predict`]).
const COUNTER_SPAN: u16 = 24;
/// Most fresh mappings toward one server address when moving the counter
/// to its block's end (within the per-remote budget of a 64-port block;
/// up to [`MOVE_SPREAD`] more go past the end).
const MOVE_PER_REMOTE: usize = 6;

/// Extra flows, at most, past the block's end when moving the counter
/// there (a random number of them): the read that follows then lands on
/// one of several ports of the new block, not always on its first, whose
/// tuples toward the server's few addresses the last moves may still hold.
const MOVE_SPREAD: usize = 8;

/// Behind a NAT that counts ports up, reads where the counter stands with
/// a fresh mapping toward the server and offers it to peers
/// ([`punch_protocol::predict`]): when the NAT check has read the mapping,
/// and after each birthday attempt (whose flows moved the counter). When
/// the ports a peer would aim at cross the end of an aligned 64-port
/// block, it first moves the counter past that end with a few more new
/// flows (spread over the server's addresses, not waiting for answers)
/// and reads it again: an in-order Cloud NAT block wraps there and a plain
/// counter does not, and the peer cannot tell which; past the end both
/// run on in a straight line. Reads run one at a time; a read that gets
/// no answer withdraws the counter (where it stood is wrong by now).
/// Does nothing behind other NATs.
pub(crate) async fn advertise_counter(inner: &Arc<Inner>) {
    let punch_protocol::allocator::Allocator::Sequential { stride } = inner.nat.alloc() else {
        return;
    };
    let Some(server) = *inner.link.server_addr.lock().expect("not poisoned") else {
        return;
    };
    if !server.is_ipv4() {
        return;
    }
    let _one_read = inner.gather.counter_read.lock().await;
    let other = inner.gather.counter.lock().expect("not poisoned").other;
    let servers = match other.filter(|o| o.is_ipv4()) {
        Some(o) => crate::natcheck::server_addresses(server, o).to_vec(),
        None => vec![server],
    };
    let bind = SocketAddr::new(inner.socket.local_ip_v4(), 0);
    let read = read_counter(stride, &servers, bind).await;
    if read.is_none() {
        debug!("counter: no answer to the fresh mappings; withdrawn");
    }
    let counter =
        read.and_then(|m| punch_protocol::predict::Counter::after(m.ip(), m.port(), stride));
    debug!(
        ?counter,
        "counter: advertising where our NAT's port counter stands"
    );
    let changed = {
        let mut c = inner.gather.counter.lock().expect("not poisoned");
        std::mem::replace(&mut c.counter, counter) != counter
    };
    if changed {
        inner.announce_candidates();
    }
}

/// The fresh mapping that says where the counter stands, after moving it
/// past the end of its block when a peer's flows would cross it (see
/// [`advertise_counter`]); `None` without an answer.
async fn read_counter(stride: i16, servers: &[SocketAddr], bind: SocketAddr) -> Option<SocketAddr> {
    use crate::natcheck::{fresh_mapping_among, open_flows, read_wait, FIRST_READ_WAITS};
    let (m, rtt) = fresh_mapping_among(servers, 0, bind, &FIRST_READ_WAITS).await?;
    let step = stride.unsigned_abs().max(1);
    let in_block = if stride > 0 {
        m.port() & 63
    } else {
        63 - (m.port() & 63)
    };
    let left = 64 - in_block; // steps to the block's end, this one included
    if in_block + COUNTER_SPAN * step < 64 {
        return Some(m);
    }
    let n = (left / step) as usize;
    if n > MOVE_PER_REMOTE * servers.len() {
        return Some(m);
    }
    let n = n + rand::Rng::gen_range(&mut rand::thread_rng(), 0..MOVE_SPREAD);
    // n - 1 flows and the read; four tries toward four addresses, each a
    // round trip like the first read's, outlast tuples still taken.
    let targets: Vec<SocketAddr> = (1..n).map(|i| servers[i % servers.len()]).collect();
    let _open = open_flows(&targets, bind).await;
    let last = fresh_mapping_among(servers, n, bind, &[read_wait(rtt); 4])
        .await?
        .0;
    debug!(
        from = m.port(),
        to = last.port(),
        mappings = n,
        "counter: moved past the block's end"
    );
    Some(last)
}
