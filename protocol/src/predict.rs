//! Port prediction: an agent behind a NAT that counts ports up says where
//! its counter stands, and a peer whose NAT also maps per destination aims
//! its flows at the ports that counter will hand out next.
//!
//! # Saying where the counter stands
//!
//! The agent learns its NAT's allocator in the NAT check
//! ([`crate::allocator`]). When it counts (a stride `s`), the agent offers
//! two [`CandidateKind::Predicted`] candidates on its public IP: the port
//! its next mapping should get and the one after (`next`, `next + s`), from
//! the last fresh mapping it made, and makes them anew after each punch
//! (which moves the counter). Two candidates carry the stride without a
//! new message: servers pass candidates through as they are, and agents
//! that predate this ping them as any other candidate.
//!
//! # Meeting two counters
//!
//! Both NATs map per destination and count. The controlling side A makes
//! its flows one after another, flow `i` toward the peer's port
//! `next_B + s_B·i`; the controlled side B makes flow `j` toward
//! `next_A + s_A·2j`. A's flow `i` gets port `next_A + s_A·(m_A + i)` and
//! B's flow `j` gets `next_B + s_B·(m_B + j)`, where `m_A`, `m_B` are the
//! mappings each NAT made between the advertisement and the punch (the
//! main socket's own pings, other traffic). The flows meet when
//! `i = m_B + j` and `2j = m_A + i`, i.e. `j = m_A + m_B`,
//! `i = m_A + 2·m_B`: for every `m_A < W_A`, `m_B < W_B` some pair meets
//! when A makes `W_A + 2·W_B − 2` flows and B `W_A + W_B − 1`. The dialer is
//! usually a fresh process whose NAT check's last mappings (and its first
//! pings) came after the counter it advertised, so its window
//! ([`WINDOW`]) is wider than the long-running peer's
//! ([`PEER_WINDOW`]), which advertises anew after every punch. Each flow
//! is a socket of its own, so that address-dependent NATs count every one
//! too.
//!
//! # A counter and a block
//!
//! One side counts, the other draws at random from a block (Cloud NAT's
//! default). The counting side makes one flow toward every port of the
//! peer's block, in order; the block side's sockets each send to every
//! port the counter hands out over those flows (the window after `next`,
//! [`WINDOW`] extra). Each of the block side's flows gets a random port of
//! its block, and meets the counting side when that is the port the
//! counting flow with the same position aimed at: one in 64 per flow, three
//! sockets' worth of flows (and the main socket's scan) rarely miss.

use crate::signal::{Candidate, CandidateKind};
use std::net::{IpAddr, SocketAddr};

/// Mappings the controlling side's NAT may make between its advertisement
/// and its punch that the schedules absorb.
pub const WINDOW: u32 = 8;
/// The same for the controlled side (see the module docs).
pub const PEER_WINDOW: u32 = 5;
/// Sockets the block side scans a counter's window with (with the main
/// socket's flow, the budget of [`crate::allocator::budget_of`] toward
/// each port).
pub const SCAN_SOCKETS: usize = 3;
/// Ports in a Cloud NAT block (what the counting side scans).
pub const BLOCK: u16 = 64;

/// A counting NAT's position as its agent advertised it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub ip: IpAddr,
    /// The port the next mapping should get.
    pub next: u16,
    pub stride: i16,
}

impl Counter {
    /// The port `k` mappings after [`Counter::next`], if it is in range.
    pub fn port_at(&self, k: u32) -> Option<u16> {
        let p = self.next as i64 + self.stride as i64 * k as i64;
        (1024..=65535).contains(&p).then_some(p as u16)
    }

    /// The two candidates that advertise this counter.
    pub fn candidates(&self) -> Vec<Candidate> {
        [0, 1]
            .iter()
            .filter_map(|k| self.port_at(*k))
            .map(|p| Candidate {
                addr: SocketAddr::new(self.ip, p),
                kind: CandidateKind::Predicted,
            })
            .collect()
    }

    /// The counter after a fresh mapping that got `port` (the next one
    /// follows it).
    pub fn after(ip: IpAddr, port: u16, stride: i16) -> Option<Counter> {
        let c = Counter {
            ip,
            next: port,
            stride,
        };
        Some(Counter {
            next: c.port_at(1)?,
            ..c
        })
    }
}

/// The counter a peer advertised among its candidates: its first two
/// `Predicted` candidates on one IP, a stride of 1 to 16 apart.
pub fn advertised(candidates: &[Candidate]) -> Option<Counter> {
    let mut it = candidates
        .iter()
        .filter(|c| c.kind == CandidateKind::Predicted);
    let a = it.next()?.addr;
    let b = it.next()?.addr;
    let stride = b.port() as i32 - a.port() as i32;
    if a.ip() != b.ip() || stride == 0 || stride.abs() > crate::allocator::MAX_STRIDE {
        return None;
    }
    Some(Counter {
        ip: a.ip(),
        next: a.port(),
        stride: stride as i16,
    })
}

/// Both sides count: our flows, one socket each, in the order they must be
/// made (see the module docs).
pub fn both_counting(controlling: bool, peer: &Counter) -> Vec<Vec<SocketAddr>> {
    let (n, step) = if controlling {
        (WINDOW + 2 * PEER_WINDOW - 2, 1)
    } else {
        (WINDOW + PEER_WINDOW - 1, 2)
    };
    (0..n)
        .filter_map(|k| peer.port_at(k * step))
        .map(|p| vec![SocketAddr::new(peer.ip, p)])
        .collect()
}

/// We count, the peer draws from a block: one socket toward every port of
/// each block, in order.
pub fn counting_vs_block(block: &[SocketAddr]) -> Vec<Vec<SocketAddr>> {
    if block.is_empty() {
        return Vec::new();
    }
    vec![block.to_vec()]
}

/// We draw from a block, the peer counts through `flows` mappings: our
/// [`SCAN_SOCKETS`] sockets each toward every port its counter hands out
/// for them, and [`WINDOW`] more.
pub fn block_vs_counting(peer: &Counter, flows: u32) -> Vec<Vec<SocketAddr>> {
    let window: Vec<SocketAddr> = (0..flows + WINDOW)
        .filter_map(|k| peer.port_at(k))
        .map(|p| SocketAddr::new(peer.ip, p))
        .collect();
    if window.is_empty() {
        return Vec::new();
    }
    vec![window; SCAN_SOCKETS]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20));

    #[test]
    fn advertised_round_trip() {
        let c = Counter::after(IP, 30000, 4).unwrap();
        assert_eq!(c.next, 30004);
        let mut cands = vec![Candidate {
            addr: SocketAddr::new(IP, 30000),
            kind: CandidateKind::ServerReflexive,
        }];
        cands.extend(c.candidates());
        assert_eq!(advertised(&cands), Some(c));
        // One candidate, or two too far apart: nothing.
        assert_eq!(advertised(&cands[..2]), None);
        let far = Counter { stride: 100, ..c };
        assert_eq!(advertised(&far.candidates()), None);
        assert_eq!(Counter::after(IP, 65535, 1), None);
    }

    /// Two counters meet whatever mappings each NAT made in between (up to
    /// the window), as the module docs reckon.
    #[test]
    fn both_counting_meets_for_every_offset_in_the_window() {
        for (sa, sb) in [(1i16, 1i16), (1, 4), (4, 1), (-2, 3)] {
            let a = Counter {
                ip: IP,
                next: 20000,
                stride: sa,
            };
            let b = Counter {
                ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 30)),
                next: 40000,
                stride: sb,
            };
            let fa = both_counting(true, &b);
            let fb = both_counting(false, &a);
            assert_eq!((fa.len(), fb.len()), (16, 12));
            for ma in 0..WINDOW {
                for mb in 0..PEER_WINDOW {
                    // A's flow i leaves from a.port_at(ma + i), B's j from
                    // b.port_at(mb + j).
                    let met = fa.iter().enumerate().any(|(i, ta)| {
                        fb.iter().enumerate().any(|(j, tb)| {
                            ta[0].port() == b.port_at(mb + j as u32).unwrap()
                                && tb[0].port() == a.port_at(ma + i as u32).unwrap()
                        })
                    });
                    assert!(met, "strides {sa},{sb}: m_A {ma}, m_B {mb} never meet");
                }
            }
        }
    }
}
