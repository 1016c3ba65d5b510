//! How a NAT picks the external port of a new mapping, learned from a few
//! fresh mappings in the order they were made, and the port budget that
//! follows from it.
//!
//! Endpoint-dependent NATs differ most in this: Linux keeps the source
//! port while it can, carrier NATs and some firewalls count up (by one or
//! by a stride), Google Cloud NAT hands each VM an aligned block of 64
//! ports by default and picks inside it at random or in order (and grows
//! the blocks under dynamic port allocation), others draw from the whole
//! range. A strategy that guesses the wrong one falls to zero, and one that
//! opens hundreds of mappings behind a 64-port block spends the host's
//! ports for the NAT's whole UDP timeout.

use serde::{Deserialize, Serialize};

/// The allocator a NAT showed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Allocator {
    /// Too few mappings seen, or one mapping for every destination (an
    /// endpoint-independent NAT shows only the one port).
    #[default]
    Unknown,
    /// Every mapping kept the inside port.
    Preserving,
    /// Each new mapping got the port `stride` after the one before.
    Sequential { stride: i16 },
    /// The mappings came from the aligned block of `size` ports at `base`
    /// (Cloud NAT's default: 64 a VM); in no order we could see.
    Block { base: u16, size: u16 },
    /// Anywhere in the range, no pattern.
    Random,
}

/// Fewest mappings [`infer`] needs to tell an allocator.
pub const MIN_SAMPLES: usize = 3;
/// Largest stride taken for counting: past it, ports that far apart by
/// chance are more likely than a NAT that steps that far.
pub const MAX_STRIDE: i32 = 16;
/// Smallest and largest block [`infer`] reports.
pub const MIN_BLOCK: u16 = 64;
pub const MAX_BLOCK: u16 = 1024;
/// Mappings toward one remote a punch may make on a NAT that gives the
/// host `ports` ports: a sixteenth (4 of a 64-port block), so that ten
/// punches in a row toward one peer within the NAT's UDP timeout (30 s on
/// Cloud NAT, where every one of them stays) still leave the host's other
/// flows free ports.
pub const fn budget_of(ports: u16) -> usize {
    let b = ports as usize / 16;
    if b == 0 {
        1
    } else {
        b
    }
}

impl Allocator {
    /// `preserving`, `sequential`, `block`, `random` or `unknown`.
    pub fn kind(&self) -> &'static str {
        match self {
            Allocator::Unknown => "unknown",
            Allocator::Preserving => "preserving",
            Allocator::Sequential { .. } => "sequential",
            Allocator::Block { .. } => "block",
            Allocator::Random => "random",
        }
    }

    /// The ports the NAT gives this host, when it gives a known few.
    pub fn host_ports(&self) -> Option<u16> {
        match self {
            Allocator::Block { size, .. } => Some(*size),
            _ => None,
        }
    }

    /// Could [`infer`] have said this? (What a peer reports is checked
    /// before it is stored or shown.)
    pub fn plausible(&self) -> bool {
        match *self {
            Allocator::Sequential { stride } => stride != 0 && (stride as i32).abs() <= MAX_STRIDE,
            Allocator::Block { base, size } => {
                size.is_power_of_two()
                    && (MIN_BLOCK..=MAX_BLOCK).contains(&size)
                    && base % size == 0
            }
            _ => true,
        }
    }

    /// Most mappings to one remote a punch may open on this NAT
    /// ([`budget_of`] the host's ports), or `None` when the NAT gives the
    /// host the whole range.
    pub fn budget(&self) -> Option<usize> {
        self.host_ports().map(budget_of)
    }
}

/// Learns the allocator from the external ports of fresh mappings, in the
/// order they were made, from an inside socket bound to `local_port`
/// (`mapped[0]` from that socket; the rest may be other sockets').
pub fn infer(local_port: u16, mapped: &[u16]) -> Allocator {
    if mapped.len() < MIN_SAMPLES {
        return Allocator::Unknown;
    }
    if mapped.windows(2).all(|w| w[0] == w[1]) {
        // One port for every destination: an endpoint-independent mapping,
        // which says nothing of how new ports are picked unless it is ours.
        return if mapped[0] == local_port {
            Allocator::Preserving
        } else {
            Allocator::Unknown
        };
    }
    let steps: Vec<i32> = mapped
        .windows(2)
        .map(|w| w[1] as i32 - w[0] as i32)
        .collect();
    // Counting up (or down): every step the same sign and a small multiple
    // of the smallest, which is the stride (other flows on the NAT may take
    // a port between two of ours, so a step can be two strides), and at
    // least two steps exactly one stride (random picks inside a block
    // rarely line up so).
    let smallest = steps.iter().map(|s| s.abs()).min().unwrap_or(0);
    // (A port seen twice is no counter: NATs that pick at random may give
    // one port to flows toward different remotes.)
    let same_sign = steps.iter().all(|s| *s > 0) || steps.iter().all(|s| *s < 0);
    if same_sign
        && smallest > 0
        && steps
            .iter()
            .all(|s| s.abs() <= 4 * smallest && s.abs() % smallest == 0)
        && smallest <= MAX_STRIDE
        && steps.iter().filter(|s| s.abs() == smallest).count() >= 2
    {
        let stride = smallest * steps[0].signum();
        return Allocator::Sequential {
            stride: stride as i16,
        };
    }
    let mut size = MIN_BLOCK;
    while size <= MAX_BLOCK {
        let base = mapped[0] & !(size - 1);
        if mapped.iter().all(|p| p & !(size - 1) == base) {
            return Allocator::Block { base, size };
        }
        size *= 2;
    }
    Allocator::Random
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserving() {
        assert_eq!(infer(40000, &[40000, 40000, 40000]), Allocator::Preserving);
        // The same port, not ours: endpoint-independent, allocator unseen.
        assert_eq!(infer(40000, &[5000, 5000, 5000]), Allocator::Unknown);
    }

    #[test]
    fn too_few() {
        assert_eq!(infer(1, &[20000, 20001]), Allocator::Unknown);
    }

    #[test]
    fn sequential_with_strides_and_gaps() {
        assert_eq!(
            infer(1, &[30000, 30001, 30002, 30003]),
            Allocator::Sequential { stride: 1 }
        );
        assert_eq!(
            infer(1, &[30000, 30004, 30008, 30012]),
            Allocator::Sequential { stride: 4 }
        );
        // Another host's flow took a port between two of ours.
        assert_eq!(
            infer(1, &[30000, 30001, 30003, 30004]),
            Allocator::Sequential { stride: 1 }
        );
        assert_eq!(
            infer(1, &[30012, 30008, 30004]),
            Allocator::Sequential { stride: -4 }
        );
    }

    #[test]
    fn blocks_whatever_the_order() {
        assert_eq!(
            infer(1, &[20480 + 40, 20480 + 3, 20480 + 63, 20480 + 17]),
            Allocator::Block {
                base: 20480,
                size: 64
            }
        );
        // An in-order block that wrapped around its end.
        assert_eq!(
            infer(1, &[20480 + 62, 20480 + 63, 20480, 20481]),
            Allocator::Block {
                base: 20480,
                size: 64
            }
        );
        assert_eq!(
            infer(1, &[4096 + 10, 4096 + 300, 4096 + 1000]),
            Allocator::Block {
                base: 4096,
                size: 1024
            }
        );
    }

    #[test]
    fn a_port_reused_across_remotes() {
        assert_eq!(
            infer(1, &[20480 + 5, 20480 + 40, 20480 + 5, 20480 + 9]),
            Allocator::Block {
                base: 20480,
                size: 64
            }
        );
    }

    #[test]
    fn random() {
        assert_eq!(infer(1, &[1200, 40000, 61000, 9000]), Allocator::Random);
    }

    #[test]
    fn budget() {
        let b = Allocator::Block {
            base: 20480,
            size: 64,
        };
        assert_eq!(b.budget(), Some(4));
        assert_eq!(Allocator::Random.budget(), None);
        assert_eq!(budget_of(2), 1);
    }

    #[test]
    fn reports_are_checked() {
        assert!(Allocator::Sequential { stride: -2 }.plausible());
        assert!(!Allocator::Sequential { stride: 0 }.plausible());
        assert!(!Allocator::Sequential { stride: 900 }.plausible());
        assert!(Allocator::Block {
            base: 20480,
            size: 64
        }
        .plausible());
        assert!(!Allocator::Block {
            base: 20481,
            size: 64
        }
        .plausible());
        assert!(!Allocator::Block { base: 0, size: 48 }.plausible());
        assert!(!Allocator::Block { base: 0, size: 0 }.plausible());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(local: u16, mapped: Vec<u16>) {
            let a = infer(local, &mapped);
            proptest::prop_assert!(a.plausible(), "{a:?}");
        }

        /// Any run of ports drawn without repeat from one aligned 64-port
        /// block is a block or (by chance, counting) sequential, never
        /// random.
        #[test]
        fn a_block_is_never_random(block in 16u16..1000, offs in proptest::sample::subsequence((0u16..64).collect::<Vec<_>>(), 3..8), seed: u64) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let mut offs = offs;
            offs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let ports: Vec<u16> = offs.iter().map(|o| block * 64 + o).collect();
            let a = infer(1, &ports);
            proptest::prop_assert!(matches!(a, Allocator::Block { size: 64, .. } | Allocator::Sequential { .. }), "{a:?} for {ports:?}");
        }
    }
}
