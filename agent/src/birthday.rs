//! The birthday method's I/O: the decisions and the hard side's machine
//! live in [`punch_protocol::birthday`] (re-exported here); this module
//! binds the extra sockets, reads them, feeds [`HardSide`] and sends what
//! it asks for.

pub use punch_protocol::birthday::*;

use crate::session::Punched;
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
            if let Some(s) = socks.get(i) {
                let _ = s.try_send_to(&t.payload, t.dst);
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
    };
    (Some((sock, punched)), met)
}

/// Behind a NAT that counts ports up, makes one fresh mapping toward the
/// server and offers where the counter now stands
/// ([`punch_protocol::predict`]): after the NAT check, and after each
/// birthday attempt (whose flows moved the counter). Does nothing behind
/// other NATs.
pub(crate) async fn advertise_counter(inner: &Arc<Inner>) {
    let punch_protocol::allocator::Allocator::Sequential { stride } =
        *inner.nat_alloc.lock().expect("not poisoned")
    else {
        return;
    };
    let Some(server) = *inner.server_addr.lock().expect("not poisoned") else {
        return;
    };
    if !server.is_ipv4() {
        return;
    }
    let bind = SocketAddr::new(inner.socket.local_ip_v4(), 0);
    let Some(m) = crate::natcheck::fresh_mapping(server, bind).await else {
        debug!("counter: no answer to the fresh mapping");
        return;
    };
    let counter = punch_protocol::predict::Counter::after(m.ip(), m.port(), stride);
    debug!(
        ?counter,
        "counter: advertising where our NAT's port counter stands"
    );
    let changed = {
        let mut c = inner.counter.lock().expect("not poisoned");
        std::mem::replace(&mut *c, counter) != counter
    };
    if changed {
        inner.announce_candidates();
    }
}
