//! NAT-PMP (RFC 6886): the external-address and UDP-mapping requests and
//! validation of their answers, without I/O.
//!
//! NAT-PMP has no nonce: an answer is believed only when it comes from
//! the gateway's port 5351 (the client checks that), has version 0, the
//! response opcode of our request, a success result, exactly the expected
//! size, and (for a mapping) our internal port.

use std::net::Ipv4Addr;
use std::time::Duration;

/// NAT-PMP version 0.
pub const VERSION: u8 = 0;
/// Opcode of the external address request.
pub const OP_EXTERNAL: u8 = 0;
/// Opcode of a UDP mapping request.
pub const OP_MAP_UDP: u8 = 1;
/// Size of the external address answer.
pub const EXTERNAL_RESPONSE_LEN: usize = 12;
/// Size of a mapping request and of its answer.
pub const MAP_REQUEST_LEN: usize = 12;
/// Size of a mapping answer.
pub const MAP_RESPONSE_LEN: usize = 16;

/// Why a NAT-PMP answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatPmpError {
    /// Not the size this answer has.
    #[error("NAT-PMP answer of {got} bytes, expected {want}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes a valid answer has.
        want: usize,
    },
    /// Not version 0 (a PCP server answers version 2).
    #[error("NAT-PMP answer has version {0}")]
    Version(u8),
    /// Not the response opcode of our request.
    #[error("NAT-PMP answer has opcode {0}")]
    Opcode(u8),
    /// The gateway refused (1 unsupported version, 2 refused, 3 network
    /// failure, 4 out of resources, 5 unsupported opcode).
    #[error("NAT-PMP gateway refused with result {0}")]
    Result(u16),
    /// A mapping for another internal port.
    #[error("NAT-PMP answer maps internal port {0}, not ours")]
    NotOurMapping(u16),
    /// External port 0 on a successful mapping, or an unusable address.
    #[error("NAT-PMP answer gives an unusable external address or port")]
    BadExternal,
}

/// A validated external-address answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExternalResponse {
    /// Seconds since the gateway's port mapping table was reset.
    pub epoch: u32,
    /// The gateway's public IPv4 address.
    pub ip: Ipv4Addr,
}

/// A validated mapping answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapResponse {
    /// Seconds since the gateway's port mapping table was reset.
    pub epoch: u32,
    /// The external port peers reach us at (maybe not the one asked for).
    pub external_port: u16,
    /// Granted lifetime (0 for a deletion).
    pub lifetime: Duration,
}

/// The external-address request (2 bytes).
pub fn external_request() -> [u8; 2] {
    [VERSION, OP_EXTERNAL]
}

/// A UDP mapping request; `lifetime` 0 with `suggested` 0 deletes.
pub fn map_request(internal: u16, suggested: u16, lifetime: u32) -> [u8; MAP_REQUEST_LEN] {
    let mut b = [0u8; MAP_REQUEST_LEN];
    b[0] = VERSION;
    b[1] = OP_MAP_UDP;
    b[4..6].copy_from_slice(&internal.to_be_bytes());
    b[6..8].copy_from_slice(&suggested.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

/// Common checks: version, opcode, result; returns the epoch.
fn header(buf: &[u8], want_len: usize, op: u8) -> Result<u32, NatPmpError> {
    if let Some(&v) = buf.first() {
        if v != VERSION {
            return Err(NatPmpError::Version(v));
        }
    }
    // An error answer for an unsupported version or opcode may be short
    // (8 bytes); check the result before the full length.
    if buf.len() >= 4 {
        if buf[1] != op | 0x80 {
            return Err(NatPmpError::Opcode(buf[1]));
        }
        let result = u16::from_be_bytes([buf[2], buf[3]]);
        if result != 0 {
            return Err(NatPmpError::Result(result));
        }
    }
    if buf.len() != want_len {
        return Err(NatPmpError::Length {
            got: buf.len(),
            want: want_len,
        });
    }
    Ok(u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")))
}

/// Checks an external-address answer.
pub fn parse_external(buf: &[u8]) -> Result<ExternalResponse, NatPmpError> {
    let epoch = header(buf, EXTERNAL_RESPONSE_LEN, OP_EXTERNAL)?;
    let ip = Ipv4Addr::new(buf[8], buf[9], buf[10], buf[11]);
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || ip.is_broadcast() {
        return Err(NatPmpError::BadExternal);
    }
    Ok(ExternalResponse { epoch, ip })
}

/// Checks a mapping answer for `internal` port; `deleting` accepts
/// external port 0.
pub fn parse_map(buf: &[u8], internal: u16, deleting: bool) -> Result<MapResponse, NatPmpError> {
    let epoch = header(buf, MAP_RESPONSE_LEN, OP_MAP_UDP)?;
    let port = u16::from_be_bytes([buf[8], buf[9]]);
    if port != internal {
        return Err(NatPmpError::NotOurMapping(port));
    }
    let external_port = u16::from_be_bytes([buf[10], buf[11]]);
    if external_port == 0 && !deleting {
        return Err(NatPmpError::BadExternal);
    }
    let lifetime = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
    Ok(MapResponse {
        epoch,
        external_port,
        lifetime: Duration::from_secs(lifetime as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map_answer(internal: u16, external: u16, lifetime: u32, result: u16) -> Vec<u8> {
        let mut b = vec![0, 129];
        b.extend_from_slice(&result.to_be_bytes());
        b.extend_from_slice(&77u32.to_be_bytes());
        b.extend_from_slice(&internal.to_be_bytes());
        b.extend_from_slice(&external.to_be_bytes());
        b.extend_from_slice(&lifetime.to_be_bytes());
        b
    }

    #[test]
    fn requests() {
        assert_eq!(external_request(), [0, 0]);
        let r = map_request(40000, 40000, 7200);
        assert_eq!(r[..4], [0, 1, 0, 0]);
        assert_eq!(r[4..6], 40000u16.to_be_bytes());
        assert_eq!(r[6..8], 40000u16.to_be_bytes());
        assert_eq!(r[8..12], 7200u32.to_be_bytes());
    }

    #[test]
    fn answers() {
        let m = parse_map(&map_answer(40000, 51000, 3600, 0), 40000, false).unwrap();
        assert_eq!(m.external_port, 51000);
        assert_eq!(m.epoch, 77);
        assert_eq!(m.lifetime, Duration::from_secs(3600));
        assert_eq!(
            parse_map(&map_answer(40001, 51000, 3600, 0), 40000, false),
            Err(NatPmpError::NotOurMapping(40001))
        );
        assert_eq!(
            parse_map(&map_answer(40000, 0, 3600, 0), 40000, false),
            Err(NatPmpError::BadExternal)
        );
        assert!(parse_map(&map_answer(40000, 0, 0, 0), 40000, true).is_ok());
        assert_eq!(
            parse_map(&map_answer(40000, 51000, 3600, 3), 40000, false),
            Err(NatPmpError::Result(3))
        );
        assert_eq!(
            parse_map(&map_answer(40000, 51000, 3600, 3)[..8], 40000, false),
            Err(NatPmpError::Result(3))
        );
        let mut long = map_answer(40000, 51000, 3600, 0);
        long.push(0);
        assert!(matches!(
            parse_map(&long, 40000, false),
            Err(NatPmpError::Length { got: 17, .. })
        ));
        assert!(matches!(
            parse_map(&long[..10], 40000, false),
            Err(NatPmpError::Length { got: 10, .. })
        ));
        let mut pcp = map_answer(40000, 51000, 3600, 0);
        pcp[0] = 2;
        assert_eq!(parse_map(&pcp, 40000, false), Err(NatPmpError::Version(2)));
        let ext = [0, 128, 0, 0, 0, 0, 0, 9, 203, 0, 113, 11];
        assert_eq!(
            parse_external(&ext).unwrap().ip,
            Ipv4Addr::new(203, 0, 113, 11)
        );
        assert_eq!(
            parse_external(&[0, 129, 0, 0, 0, 0, 0, 9, 203, 0, 113, 11]),
            Err(NatPmpError::Opcode(129))
        );
        assert_eq!(
            parse_external(&[0, 128, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0]),
            Err(NatPmpError::BadExternal)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64), port in any::<u16>(), del in any::<bool>()) {
            let _ = parse_map(&b, port, del);
            let _ = parse_external(&b);
        }
    }
}
