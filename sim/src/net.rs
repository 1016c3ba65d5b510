//! The virtual network: sites (a LAN behind a NAT, or a public host) joined
//! by links with delay and seeded loss to one core, and the in-flight
//! datagrams ordered by delivery time.
//!
//! A datagram between two sites crosses its source NAT when sent and its
//! destination NAT when it arrives there (so a mapping the peer opens in
//! the meantime lets it in, as simultaneous open needs), one link delay
//! each way. Private destinations are dropped in the core, as the lab
//! drops them, so a NAT bug can never pass for a punch.

use crate::nat::{Nat, NatModel, NatStats};
use rand::rngs::StdRng;
use rand::Rng;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Index of a host in the network.
pub type HostId = usize;

/// A site: a LAN behind a NAT (or one public host), with its link.
#[derive(Debug)]
struct Site {
    nat: Option<Nat>,
    /// The NAT's outside address, or the public host's own.
    public_ip: Ipv4Addr,
    /// Hosts behind the NAT are 10.`lan`.0.x.
    lan: u8,
    delay: Duration,
    loss: f64,
}

#[derive(Debug)]
struct Host {
    site: usize,
    ip: Ipv4Addr,
    /// Local ports of the host's sockets, by socket index.
    sockets: Vec<u16>,
}

/// Where a datagram is going next.
#[derive(Clone, Copy, Debug)]
enum Hop {
    /// To a site's NAT from the core (inbound translation on arrival).
    Nat { site: usize, port: u16 },
    /// Straight to a host's socket (same LAN, or a public host).
    Host { host: HostId, sock: usize },
    /// To the rendezvous server.
    Server { to: SocketAddr },
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    hop: Hop,
    from: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    // Earliest first in a max-heap; ties in sending order.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A datagram that arrived.
#[derive(Debug)]
pub enum Delivery {
    Host {
        host: HostId,
        sock: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Server {
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
    },
}

/// Counters of the network itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u32,
    pub lost: u32,
    /// Dropped for want of a route (private destination, no such host).
    pub unroutable: u32,
}

/// Sites, hosts, links and the datagrams in flight.
#[derive(Debug)]
pub struct Net {
    sites: Vec<Site>,
    hosts: Vec<Host>,
    server_ips: Vec<IpAddr>,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    rng: StdRng,
    pub stats: NetStats,
}

fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(_) => true,
    }
}

impl Net {
    /// An empty network whose rendezvous server answers at `server_ips`.
    pub fn new(server_ips: Vec<IpAddr>, rng: StdRng) -> Net {
        Net {
            sites: Vec::new(),
            hosts: Vec::new(),
            server_ips,
            queue: BinaryHeap::new(),
            seq: 0,
            rng,
            stats: NetStats::default(),
        }
    }

    /// Adds a site behind a NAT at `public_ip` (or, without a model, one
    /// public host there); returns its index.
    pub fn add_site(
        &mut self,
        model: Option<NatModel>,
        public_ip: Ipv4Addr,
        delay: Duration,
        loss: f64,
    ) -> usize {
        let lan = self.sites.len() as u8 + 1;
        let nat = model.map(|m| Nat::new(m, public_ip, &mut self.rng));
        self.sites.push(Site {
            nat,
            public_ip,
            lan,
            delay,
            loss,
        });
        self.sites.len() - 1
    }

    /// Adds a host with one socket (index 0) at `site`; behind a NAT it
    /// gets the next LAN address, without one the site's public address.
    pub fn add_host(&mut self, site: usize) -> HostId {
        let s = &mut self.sites[site];
        let n = self.hosts.iter().filter(|h| h.site == site).count() as u8;
        let ip = match &mut s.nat {
            Some(nat) => {
                let ip = Ipv4Addr::new(10, s.lan, 0, 2 + n);
                nat.add_host(IpAddr::V4(ip));
                ip
            }
            None => s.public_ip,
        };
        self.hosts.push(Host {
            site,
            ip,
            sockets: Vec::new(),
        });
        let id = self.hosts.len() - 1;
        self.bind(id);
        id
    }

    /// Opens another socket on `host` at a random free ephemeral port;
    /// returns its index.
    pub fn bind(&mut self, host: HostId) -> usize {
        let h = &mut self.hosts[host];
        loop {
            let port = self.rng.gen_range(32_768..=60_999);
            if !h.sockets.contains(&port) {
                h.sockets.push(port);
                return h.sockets.len() - 1;
            }
        }
    }

    /// The local address of `host`'s socket `sock`.
    pub fn local_addr(&self, host: HostId, sock: usize) -> SocketAddr {
        let h = &self.hosts[host];
        SocketAddr::new(IpAddr::V4(h.ip), h.sockets[sock])
    }

    /// The NAT counters of `host`'s site (default for a public host).
    pub fn nat_stats(&mut self, host: HostId, now: Instant) -> NatStats {
        let site = self.hosts[host].site;
        match &mut self.sites[site].nat {
            Some(n) => {
                n.live_mappings(now);
                n.stats
            }
            None => NatStats::default(),
        }
    }

    /// Sends a datagram from `host`'s socket `sock` at `now`. A `reliable`
    /// one (signaling, which QUIC retransmits) is never lost.
    pub fn send(
        &mut self,
        host: HostId,
        sock: usize,
        dst: SocketAddr,
        data: Vec<u8>,
        now: Instant,
        reliable: bool,
    ) {
        self.stats.sent += 1;
        if let Some((at, hop, from)) = self.route(host, sock, dst, now, !reliable) {
            self.seq += 1;
            self.queue.push(InFlight {
                at,
                seq: self.seq,
                hop,
                from,
                data,
            });
        }
    }

    /// Where a datagram goes, when it gets there and its source on the
    /// way; `None` when it is dropped on the way out.
    fn route(
        &mut self,
        host: HostId,
        sock: usize,
        dst: SocketAddr,
        now: Instant,
        lossy: bool,
    ) -> Option<(Instant, Hop, SocketAddr)> {
        let local = self.local_addr(host, sock);
        let site = self.hosts[host].site;
        // Same LAN: straight there.
        if let Some(h) = self.find_host(site, dst) {
            return Some((
                now,
                Hop::Host {
                    host: h.0,
                    sock: h.1,
                },
                local,
            ));
        }
        let from = match &mut self.sites[site].nat {
            Some(nat) => {
                let ext = nat.outbound(local, dst, now, &mut self.rng)?;
                if dst.ip() == IpAddr::V4(nat.public_ip) {
                    return nat.model.hairpin.then_some((
                        now,
                        Hop::Nat {
                            site,
                            port: dst.port(),
                        },
                        ext,
                    ));
                }
                ext
            }
            None => local,
        };
        if private(dst.ip()) {
            self.stats.unroutable += 1;
            return None;
        }
        let out = &self.sites[site];
        let (delay, loss) = (out.delay, out.loss);
        if lossy && self.rng.gen_bool(loss.clamp(0.0, 1.0)) {
            self.stats.lost += 1;
            return None;
        }
        if self.server_ips.contains(&dst.ip()) {
            return Some((now + delay, Hop::Server { to: dst }, from));
        }
        let Some(to) = self.site_of(dst.ip()) else {
            self.stats.unroutable += 1;
            return None;
        };
        let s = &self.sites[to];
        let (delay_in, loss_in) = (s.delay, s.loss);
        if lossy && self.rng.gen_bool(loss_in.clamp(0.0, 1.0)) {
            self.stats.lost += 1;
            return None;
        }
        let at = now + delay + delay_in;
        let hop = match &s.nat {
            Some(_) => Hop::Nat {
                site: to,
                port: dst.port(),
            },
            None => {
                let (host, sock) = self.find_host(to, dst)?;
                Hop::Host { host, sock }
            }
        };
        Some((at, hop, from))
    }

    /// The site whose public address is `ip`.
    fn site_of(&self, ip: IpAddr) -> Option<usize> {
        self.sites
            .iter()
            .position(|s| IpAddr::V4(s.public_ip) == ip)
    }

    /// The host and socket at `addr` on `site`'s LAN (or the public host).
    fn find_host(&self, site: usize, addr: SocketAddr) -> Option<(HostId, usize)> {
        self.hosts.iter().enumerate().find_map(|(i, h)| {
            if h.site != site || IpAddr::V4(h.ip) != addr.ip() {
                return None;
            }
            h.sockets
                .iter()
                .position(|p| *p == addr.port())
                .map(|s| (i, s))
        })
    }

    /// Completes a hop at `now`: inbound translation at a NAT.
    fn land(&mut self, hop: Hop, from: SocketAddr, now: Instant) -> Option<(HostId, usize)> {
        match hop {
            Hop::Host { host, sock } => Some((host, sock)),
            Hop::Nat { site, port } => {
                let inside = self.sites[site].nat.as_mut()?.inbound(from, port, now)?;
                self.find_host(site, inside)
            }
            Hop::Server { .. } => None,
        }
    }

    /// When the next datagram arrives.
    pub fn next_at(&self) -> Option<Instant> {
        self.queue.peek().map(|f| f.at)
    }

    /// The next datagram due by `now`, delivered (or dropped at a NAT).
    pub fn pop(&mut self, now: Instant) -> Option<Option<Delivery>> {
        if self.queue.peek()?.at > now {
            return None;
        }
        let f = self.queue.pop()?;
        if let Hop::Server { to } = f.hop {
            return Some(Some(Delivery::Server {
                from: f.from,
                to,
                data: f.data,
            }));
        }
        Some(
            self.land(f.hop, f.from, f.at)
                .map(|(host, sock)| Delivery::Host {
                    host,
                    sock,
                    from: f.from,
                    data: f.data,
                }),
        )
    }

    /// Where a datagram from `host`'s socket `sock` to `dst` would arrive
    /// now, and from which address, with no delay and no loss: the check
    /// that a validated path really carries data.
    pub fn trace(
        &mut self,
        host: HostId,
        sock: usize,
        dst: SocketAddr,
        now: Instant,
    ) -> Option<(HostId, usize, SocketAddr)> {
        let (_, hop, from) = self.route(host, sock, dst, now, false)?;
        let (h, s) = self.land(hop, from, now)?;
        Some((h, s, from))
    }
}
