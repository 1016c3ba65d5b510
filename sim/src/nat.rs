//! A NAT model: mapping, filtering, port allocation, timeouts, hairpinning
//! and port exhaustion, in RFC 4787 terms, as a table the network consults
//! for every datagram that crosses it.

use rand::rngs::StdRng;
use rand::Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// When the NAT reuses a mapping for a new destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// One mapping per inside endpoint, whatever the destination (EIM).
    EndpointIndependent,
    /// A new mapping per destination IP.
    AddressDependent,
    /// A new mapping per destination IP and port ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound datagrams a mapping lets in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// Anything that reaches the mapping's port (full cone).
    EndpointIndependent,
    /// Only from IPs the inside endpoint has sent to.
    AddressDependent,
    /// Only from the exact IP and port the inside endpoint has sent to.
    AddressAndPortDependent,
}

/// How the NAT picks the external port of a new mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// Keep the inside port while it is free, else a random one.
    Preserve,
    /// Uniformly at random over 1024..=65535.
    Random,
    /// The next port of a counter shared by every host behind the NAT,
    /// `stride` apart.
    Sequential { stride: u16 },
    /// At random inside a fixed per-host block of `size` ports (Cloud NAT
    /// default).
    BlockRandom { size: u16 },
    /// In order inside a fixed per-host block of `size` ports.
    BlockInOrder { size: u16 },
    /// At random inside per-host blocks that grow when spent: `min` ports
    /// first, doubling up to `max` (Cloud NAT's dynamic port allocation).
    DynamicBlock { min: u16, max: u16 },
}

/// A NAT's behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatModel {
    pub mapping: Mapping,
    pub filtering: Filtering,
    pub allocation: Allocation,
    /// A mapping idle (no outbound traffic) this long is gone.
    pub timeout: Duration,
    /// Inside hosts may reach each other through the NAT's public address.
    pub hairpin: bool,
}

/// The first port of the lab's Cloud NAT blocks; host `i` gets block `i`.
const BLOCK_BASE: u16 = 20480;

/// Whom a mapping is for: any remote, one IP, or one IP and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Remote {
    Any,
    Ip(IpAddr),
    Addr(SocketAddr),
}

impl Remote {
    fn of(m: Mapping, dst: SocketAddr) -> Remote {
        match m {
            Mapping::EndpointIndependent => Remote::Any,
            Mapping::AddressDependent => Remote::Ip(dst.ip()),
            Mapping::AddressAndPortDependent => Remote::Addr(dst),
        }
    }

    /// Could a datagram from one remote match both? Then one external port
    /// cannot carry both (the reply tuple must be unique, as in Linux).
    fn overlaps(self, other: Remote) -> bool {
        match (self, other) {
            (Remote::Any, _) | (_, Remote::Any) => true,
            (Remote::Ip(a), Remote::Ip(b)) => a == b,
            (Remote::Ip(a), Remote::Addr(b)) | (Remote::Addr(b), Remote::Ip(a)) => a == b.ip(),
            (Remote::Addr(a), Remote::Addr(b)) => a == b,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    inside: SocketAddr,
    remote: Remote,
    port: u16,
    last_out: Instant,
    /// Replaced by a newer mapping for the same key.
    dead: bool,
    /// Where the inside endpoint sent through this mapping, and when.
    contacted: HashMap<SocketAddr, Instant>,
    /// The same by IP (address-dependent filtering).
    contacted_ips: HashMap<IpAddr, Instant>,
}

/// Per-host allocator state.
#[derive(Clone, Debug, Default)]
struct HostPorts {
    /// Ports of the host's blocks (block allocators).
    ports: Vec<u16>,
    /// Next index into `ports` (in-order allocator).
    cursor: usize,
}

/// Counters for the port budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatStats {
    /// Mappings created.
    pub created: u32,
    /// Most mappings alive at once.
    pub peak: u32,
    /// Outbound datagrams dropped for want of a free port.
    pub exhausted: u32,
    /// Inbound datagrams the filter dropped.
    pub filtered: u32,
    /// Most mappings made toward one remote address: what runs a small
    /// block dry (an external port can serve many remotes at once, but
    /// each mapping toward one remote needs a port of its own). A run is
    /// shorter than the mapping timeout, so made is alive.
    pub max_per_remote: u32,
}

/// A NAT's state: its mapping table.
#[derive(Debug)]
pub struct Nat {
    pub model: NatModel,
    pub public_ip: Ipv4Addr,
    entries: Vec<Entry>,
    by_key: HashMap<(SocketAddr, Remote), usize>,
    by_port: HashMap<u16, Vec<usize>>,
    hosts: HashMap<IpAddr, HostPorts>,
    /// Host index for block placement, by inside IP.
    host_index: HashMap<IpAddr, u16>,
    counter: u16,
    /// Expiry times (lazily checked against each entry's last use), to
    /// count the mappings alive at once.
    expiries: BinaryHeap<Reverse<(Instant, usize)>>,
    alive: u32,
    /// Mappings made toward each remote (see [`NatStats::max_per_remote`]).
    per_remote: HashMap<SocketAddr, u32>,
    pub stats: NatStats,
}

fn live(e: &Entry, now: Instant, timeout: Duration) -> bool {
    !e.dead && now.saturating_duration_since(e.last_out) < timeout
}

impl Nat {
    pub fn new(model: NatModel, public_ip: Ipv4Addr, rng: &mut StdRng) -> Nat {
        Nat {
            model,
            public_ip,
            entries: Vec::new(),
            by_key: HashMap::new(),
            by_port: HashMap::new(),
            hosts: HashMap::new(),
            host_index: HashMap::new(),
            counter: rng.gen_range(1024..=65535),
            expiries: BinaryHeap::new(),
            alive: 0,
            per_remote: HashMap::new(),
            stats: NatStats::default(),
        }
    }

    /// Registers an inside host (its block follows the ones before).
    pub fn add_host(&mut self, ip: IpAddr) {
        let n = self.host_index.len() as u16;
        self.host_index.entry(ip).or_insert(n);
    }

    /// The external source of an outbound datagram from `inside` to `dst`,
    /// creating or refreshing the mapping; `None` when no port is free.
    pub fn outbound(
        &mut self,
        inside: SocketAddr,
        dst: SocketAddr,
        now: Instant,
        rng: &mut StdRng,
    ) -> Option<SocketAddr> {
        self.expire(now);
        let remote = Remote::of(self.model.mapping, dst);
        let timeout = self.model.timeout;
        let idx = match self.by_key.get(&(inside, remote)) {
            Some(&i) if live(&self.entries[i], now, timeout) => i,
            found => {
                if let Some(&i) = found {
                    self.remove(i);
                }
                let Some(port) = self.allocate(inside, remote, now, rng) else {
                    self.stats.exhausted += 1;
                    return None;
                };
                let n = self.per_remote.entry(dst).or_default();
                *n += 1;
                self.stats.max_per_remote = self.stats.max_per_remote.max(*n);
                self.insert(Entry {
                    inside,
                    remote,
                    port,
                    last_out: now,
                    dead: false,
                    contacted: HashMap::new(),
                    contacted_ips: HashMap::new(),
                })
            }
        };
        let e = &mut self.entries[idx];
        e.last_out = now;
        e.contacted.insert(dst, now);
        e.contacted_ips.insert(dst.ip(), now);
        self.expiries.push(Reverse((now + self.model.timeout, idx)));
        Some(SocketAddr::new(IpAddr::V4(self.public_ip), e.port))
    }

    /// The inside destination of an inbound datagram from `src` to our
    /// `port`, if a live mapping's filter lets it in.
    pub fn inbound(&mut self, src: SocketAddr, port: u16, now: Instant) -> Option<SocketAddr> {
        let timeout = self.model.timeout;
        let ids = self.by_port.get(&port)?;
        for &i in ids {
            let e = &self.entries[i];
            if !live(e, now, timeout) {
                continue;
            }
            let fresh = |t: &Instant| now.saturating_duration_since(*t) < timeout;
            let ok = match self.model.filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => e.contacted_ips.get(&src.ip()).is_some_and(fresh),
                Filtering::AddressAndPortDependent => e.contacted.get(&src).is_some_and(fresh),
            };
            // A mapping for one remote answers only that remote.
            let mine = match e.remote {
                Remote::Any => true,
                Remote::Ip(ip) => ip == src.ip(),
                Remote::Addr(a) => a == src,
            };
            if ok && mine {
                return Some(e.inside);
            }
        }
        self.stats.filtered += 1;
        None
    }

    /// Mappings alive at `now` (not earlier than the last call).
    pub fn live_mappings(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.alive
    }

    /// Counts out the mappings that expired by `now`.
    fn expire(&mut self, now: Instant) {
        let t = self.model.timeout;
        while let Some(&Reverse((at, i))) = self.expiries.peek() {
            if at > now {
                break;
            }
            self.expiries.pop();
            let e = &self.entries[i];
            // Only the entry's latest expiry counts (refreshes push newer ones).
            if !e.dead && e.last_out + t == at {
                self.alive -= 1;
            }
        }
    }

    fn insert(&mut self, e: Entry) -> usize {
        let i = self.entries.len();
        self.expire(e.last_out);
        self.by_key.insert((e.inside, e.remote), i);
        self.by_port.entry(e.port).or_default().push(i);
        self.entries.push(e);
        self.stats.created += 1;
        self.alive += 1;
        self.stats.peak = self.stats.peak.max(self.alive);
        i
    }

    /// Drops an expired entry for good (its key gets a new mapping); the
    /// slot stays so that indices stay valid.
    fn remove(&mut self, i: usize) {
        let e = &mut self.entries[i];
        e.dead = true;
        let (key, port) = ((e.inside, e.remote), e.port);
        self.by_key.remove(&key);
        if let Some(v) = self.by_port.get_mut(&port) {
            v.retain(|&j| j != i);
        }
    }

    fn free(&self, port: u16, remote: Remote, now: Instant) -> bool {
        let t = self.model.timeout;
        self.by_port.get(&port).is_none_or(|ids| {
            ids.iter().all(|&i| {
                let e = &self.entries[i];
                !live(e, now, t) || !e.remote.overlaps(remote)
            })
        })
    }

    fn allocate(
        &mut self,
        inside: SocketAddr,
        remote: Remote,
        now: Instant,
        rng: &mut StdRng,
    ) -> Option<u16> {
        match self.model.allocation {
            Allocation::Preserve => {
                if inside.port() >= 1024 && self.free(inside.port(), remote, now) {
                    return Some(inside.port());
                }
                self.random_port(remote, now, rng)
            }
            Allocation::Random => self.random_port(remote, now, rng),
            Allocation::Sequential { stride } => {
                let stride = stride.max(1);
                for _ in 0..(64_512 / stride as u32 + 1) {
                    let p = self.counter;
                    self.counter = next_port(self.counter, stride);
                    if self.free(p, remote, now) {
                        return Some(p);
                    }
                }
                None
            }
            Allocation::BlockRandom { size } => {
                self.ensure_block(inside.ip(), size);
                self.random_in_blocks(inside.ip(), remote, now, rng)
            }
            Allocation::BlockInOrder { size } => {
                self.ensure_block(inside.ip(), size);
                let ports = self.hosts.get(&inside.ip())?.ports.clone();
                let start = self.hosts.get(&inside.ip())?.cursor;
                for k in 0..ports.len() {
                    let j = (start + k) % ports.len();
                    if self.free(ports[j], remote, now) {
                        if let Some(h) = self.hosts.get_mut(&inside.ip()) {
                            h.cursor = (j + 1) % ports.len();
                        }
                        return Some(ports[j]);
                    }
                }
                None
            }
            Allocation::DynamicBlock { min, max } => {
                self.ensure_block(inside.ip(), min);
                loop {
                    if let Some(p) = self.random_in_blocks(inside.ip(), remote, now, rng) {
                        return Some(p);
                    }
                    let have = self.hosts.get(&inside.ip())?.ports.len();
                    if have >= max as usize {
                        return None;
                    }
                    self.grow(inside.ip(), have as u16, rng);
                }
            }
        }
    }

    fn random_port(&self, remote: Remote, now: Instant, rng: &mut StdRng) -> Option<u16> {
        for _ in 0..256 {
            let p = rng.gen_range(1024..=65535);
            if self.free(p, remote, now) {
                return Some(p);
            }
        }
        (1024..=65535).find(|p| self.free(*p, remote, now))
    }

    fn random_in_blocks(
        &self,
        host: IpAddr,
        remote: Remote,
        now: Instant,
        rng: &mut StdRng,
    ) -> Option<u16> {
        let ports = &self.hosts.get(&host)?.ports;
        let free: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| self.free(*p, remote, now))
            .collect();
        if free.is_empty() {
            return None;
        }
        Some(free[rng.gen_range(0..free.len())])
    }

    /// Gives a host its first block: aligned, the lab's Cloud NAT layout.
    fn ensure_block(&mut self, host: IpAddr, size: u16) {
        let n = self.host_index.len() as u16;
        let index = *self.host_index.entry(host).or_insert(n);
        let h = self.hosts.entry(host).or_default();
        if h.ports.is_empty() {
            let size = size.max(1);
            let base = BLOCK_BASE.wrapping_add(index.wrapping_mul(size));
            h.ports = (0..size).map(|k| base.wrapping_add(k)).collect();
        }
    }

    /// Adds a block of `size` ports, aligned to its size, somewhere not yet
    /// used: the host's ports double.
    fn grow(&mut self, host: IpAddr, size: u16, rng: &mut StdRng) {
        let size = size.clamp(1, 16_384);
        let used: std::collections::HashSet<u16> = self
            .hosts
            .values()
            .flat_map(|h| h.ports.iter().copied())
            .collect();
        let slots = (65_536 / size as u32) as u16;
        for _ in 0..64 {
            let base = rng.gen_range(1..slots).wrapping_mul(size);
            if base >= 1024 && !(0..size).any(|k| used.contains(&base.wrapping_add(k))) {
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.ports.extend((0..size).map(|k| base.wrapping_add(k)));
                }
                return;
            }
        }
    }
}

fn next_port(p: u16, stride: u16) -> u16 {
    let n = p as u32 + stride as u32;
    if n > 65_535 {
        (1024 + (n - 65_536) % 64_512) as u16
    } else {
        n as u16
    }
}

#[cfg(test)]
#[path = "nat_tests.rs"]
mod tests;
