//! PCP (RFC 6887), the MAP opcode for UDP: request encoding and response
//! validation, without I/O.
//!
//! A MAP request is a 24-byte common header plus a 36-byte MAP body; the
//! answer repeats the body with the assigned external address and port.
//! Everything in an answer is checked before it is believed: its size,
//! version, opcode and R bit, the result code, the nonce (so an answer to
//! somebody else's request, or a forged one, is refused), the protocol and
//! our internal port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// UDP port of a PCP (and NAT-PMP) server.
pub const SERVER_PORT: u16 = 5351;
/// PCP version 2 (RFC 6887).
pub const VERSION: u8 = 2;
/// The MAP opcode.
pub const OPCODE_MAP: u8 = 1;
/// Size of a MAP request (header and MAP body, no options).
pub const MAP_REQUEST_LEN: usize = 60;
/// Size of a MAP response without options.
pub const MAP_RESPONSE_LEN: usize = 60;
/// Largest PCP message (RFC 6887 §7).
pub const MAX_MESSAGE: usize = 1100;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// A PCP result code (RFC 6887 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultCode {
    /// 0: the mapping was made.
    Success,
    /// 1: the server speaks another PCP version.
    UnsuppVersion,
    /// 2: refused by policy.
    NotAuthorized,
    /// 3: the server could not parse the request.
    MalformedRequest,
    /// 4: the opcode is not supported.
    UnsuppOpcode,
    /// 5: a mandatory option is not supported.
    UnsuppOption,
    /// 6: an option is malformed.
    MalformedOption,
    /// 7: the server cannot reach its outside network (transient).
    NetworkFailure,
    /// 8: no mapping can be made now (transient).
    NoResources,
    /// 9: the protocol is not supported.
    UnsuppProtocol,
    /// 10: our quota of mappings is used up (transient).
    UserExQuota,
    /// 11: the suggested external address cannot be given.
    CannotProvideExternal,
    /// 12: the client address in the request is not the packet's source.
    AddressMismatch,
    /// 13: too many remote peers.
    ExcessiveRemotePeers,
    /// Any other value.
    Other(u8),
}

impl ResultCode {
    /// Decodes a result code byte.
    pub fn from_u8(v: u8) -> ResultCode {
        use ResultCode::*;
        match v {
            0 => Success,
            1 => UnsuppVersion,
            2 => NotAuthorized,
            3 => MalformedRequest,
            4 => UnsuppOpcode,
            5 => UnsuppOption,
            6 => MalformedOption,
            7 => NetworkFailure,
            8 => NoResources,
            9 => UnsuppProtocol,
            10 => UserExQuota,
            11 => CannotProvideExternal,
            12 => AddressMismatch,
            13 => ExcessiveRemotePeers,
            o => Other(o),
        }
    }

    /// Worth asking again later (RFC 6887 §7.4 "short lifetime" errors)?
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ResultCode::NetworkFailure | ResultCode::NoResources | ResultCode::UserExQuota
        )
    }
}

/// Why a PCP answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcpError {
    /// Shorter than a MAP response.
    #[error("PCP answer of {0} bytes is too short for a MAP response")]
    TooShort(usize),
    /// Longer than PCP allows, or not a multiple of 4.
    #[error("PCP answer of {0} bytes: longer than 1100 or not a multiple of 4")]
    BadLength(usize),
    /// Not version 2 (a NAT-PMP-only server answers version 0).
    #[error("PCP answer has version {0}")]
    Version(u8),
    /// The R bit is clear (a request, not a response).
    #[error("PCP message is not a response")]
    NotResponse,
    /// Another opcode than MAP.
    #[error("PCP answer has opcode {0}, expected MAP")]
    Opcode(u8),
    /// The server refused.
    #[error("PCP server refused: {0:?}")]
    Result(ResultCode),
    /// The nonce is not ours.
    #[error("PCP answer carries another mapping nonce")]
    Nonce,
    /// Another protocol or internal port than we asked for.
    #[error("PCP answer is for protocol {proto} port {port}, not ours")]
    NotOurMapping {
        /// Protocol in the answer.
        proto: u8,
        /// Internal port in the answer.
        port: u16,
    },
    /// A successful answer with an unusable external address or port.
    #[error("PCP answer assigns an unusable external address {0}")]
    BadExternal(SocketAddr),
}

/// What we ask a PCP server for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// Random, kept for the mapping's life (renewals and deletion repeat it).
    pub nonce: [u8; 12],
    /// Our own (LAN) address, as the server sees the request's source.
    pub client: IpAddr,
    /// Our internal UDP port.
    pub internal_port: u16,
    /// The external port we would like (0: any).
    pub suggested_port: u16,
    /// The external address we would like (unspecified: any).
    pub suggested_ip: IpAddr,
    /// Requested lifetime in seconds; 0 deletes the mapping.
    pub lifetime: u32,
}

/// A validated MAP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapResponse {
    /// The server's epoch, seconds (RFC 6887 §8.5).
    pub epoch: u32,
    /// Granted lifetime (0 for a deletion).
    pub lifetime: Duration,
    /// The public address and port peers reach us at.
    pub external: SocketAddr,
}

/// Writes an address the PCP way: 16 bytes, IPv4 as ::ffff:a.b.c.d.
fn put_ip(out: &mut [u8], ip: IpAddr) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.copy_from_slice(&v6.octets());
}

fn get_ip(b: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl MapRequest {
    /// A request for a UDP mapping of `internal_port` for `lifetime`
    /// seconds, suggesting the same external port on any address.
    pub fn udp(nonce: [u8; 12], client: Ipv4Addr, internal_port: u16, lifetime: u32) -> Self {
        MapRequest {
            nonce,
            client: IpAddr::V4(client),
            internal_port,
            suggested_port: internal_port,
            suggested_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            lifetime,
        }
    }

    /// The 60 bytes on the wire.
    pub fn encode(&self) -> [u8; MAP_REQUEST_LEN] {
        let mut b = [0u8; MAP_REQUEST_LEN];
        b[0] = VERSION;
        b[1] = OPCODE_MAP; // R = 0: request
        b[4..8].copy_from_slice(&self.lifetime.to_be_bytes());
        put_ip(&mut b[8..24], self.client);
        b[24..36].copy_from_slice(&self.nonce);
        b[36] = PROTO_UDP;
        b[40..42].copy_from_slice(&self.internal_port.to_be_bytes());
        b[42..44].copy_from_slice(&self.suggested_port.to_be_bytes());
        put_ip(&mut b[44..60], self.suggested_ip);
        b
    }

    /// Checks an answer against this request. A deletion (lifetime 0)
    /// accepts any external address in its answer.
    pub fn parse_response(&self, buf: &[u8]) -> Result<MapResponse, PcpError> {
        if buf.len() > MAX_MESSAGE || buf.len() % 4 != 0 {
            return Err(PcpError::BadLength(buf.len()));
        }
        // Version and R bit first: a short NAT-PMP error answer (version 0)
        // should say "version", not "too short".
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(PcpError::Version(v));
            }
        }
        if buf.len() < 24 {
            return Err(PcpError::TooShort(buf.len()));
        }
        if buf[1] & 0x80 == 0 {
            return Err(PcpError::NotResponse);
        }
        let opcode = buf[1] & 0x7f;
        if opcode != OPCODE_MAP {
            return Err(PcpError::Opcode(opcode));
        }
        let result = ResultCode::from_u8(buf[3]);
        if result != ResultCode::Success {
            // Error answers may be short (just the header).
            return Err(PcpError::Result(result));
        }
        if buf.len() < MAP_RESPONSE_LEN {
            return Err(PcpError::TooShort(buf.len()));
        }
        let lifetime = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
        let epoch = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
        if buf[24..36] != self.nonce {
            return Err(PcpError::Nonce);
        }
        let proto = buf[36];
        let port = u16::from_be_bytes([buf[40], buf[41]]);
        if proto != PROTO_UDP || port != self.internal_port {
            return Err(PcpError::NotOurMapping { proto, port });
        }
        let ext_port = u16::from_be_bytes([buf[42], buf[43]]);
        let ext_ip = get_ip(buf[44..60].try_into().expect("16 bytes"));
        let external = SocketAddr::new(ext_ip, ext_port);
        if self.lifetime > 0
            && (ext_port == 0
                || ext_ip.is_unspecified()
                || ext_ip.is_multicast()
                || ext_ip.is_loopback()
                || ext_ip == IpAddr::V4(Ipv4Addr::BROADCAST))
        {
            return Err(PcpError::BadExternal(external));
        }
        Ok(MapResponse {
            epoch,
            lifetime: Duration::from_secs(lifetime as u64),
            external,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req() -> MapRequest {
        MapRequest::udp([7; 12], Ipv4Addr::new(10, 1, 0, 10), 40000, 7200)
    }

    /// What a server would answer to `r`.
    fn answer(r: &MapRequest, ext: SocketAddr, result: u8) -> Vec<u8> {
        let mut b = r.encode().to_vec();
        b[1] |= 0x80;
        b[2] = 0;
        b[3] = result;
        b[8..12].copy_from_slice(&1234u32.to_be_bytes());
        b[12..24].fill(0);
        b[42..44].copy_from_slice(&ext.port().to_be_bytes());
        put_ip(&mut b[44..60], ext.ip());
        b
    }

    #[test]
    fn request_layout() {
        let b = req().encode();
        assert_eq!(b[0], 2);
        assert_eq!(b[1], 1);
        assert_eq!(&b[4..8], &7200u32.to_be_bytes());
        assert_eq!(
            &b[8..24],
            &Ipv4Addr::new(10, 1, 0, 10).to_ipv6_mapped().octets()
        );
        assert_eq!(&b[24..36], &[7; 12]);
        assert_eq!(b[36], 17);
        assert_eq!(&b[40..42], &40000u16.to_be_bytes());
        assert_eq!(&b[42..44], &40000u16.to_be_bytes());
        assert_eq!(&b[44..60], &Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    }

    #[test]
    fn good_answer_uses_the_port_given() {
        let r = req();
        let ext: SocketAddr = "203.0.113.11:51000".parse().unwrap();
        let m = r.parse_response(&answer(&r, ext, 0)).unwrap();
        assert_eq!(m.external, ext);
        assert_eq!(m.epoch, 1234);
        assert_eq!(m.lifetime, Duration::from_secs(7200));
    }

    #[test]
    fn bad_answers_are_refused() {
        let r = req();
        let ext: SocketAddr = "203.0.113.11:51000".parse().unwrap();
        let good = answer(&r, ext, 0);
        assert_eq!(r.parse_response(&good[..56]), Err(PcpError::TooShort(56)));
        assert_eq!(r.parse_response(&good[..57]), Err(PcpError::BadLength(57)));
        assert_eq!(
            r.parse_response(&[0u8; 1104]),
            Err(PcpError::BadLength(1104))
        );
        let mut b = good.clone();
        b[0] = 0;
        assert_eq!(r.parse_response(&b), Err(PcpError::Version(0)));
        let mut b = good.clone();
        b[1] = 1;
        assert_eq!(r.parse_response(&b), Err(PcpError::NotResponse));
        let mut b = good.clone();
        b[1] = 0x82;
        assert_eq!(r.parse_response(&b), Err(PcpError::Opcode(2)));
        let mut b = good.clone();
        b[30] ^= 1;
        assert_eq!(r.parse_response(&b), Err(PcpError::Nonce));
        let mut b = good.clone();
        b[41] ^= 1;
        assert!(matches!(
            r.parse_response(&b),
            Err(PcpError::NotOurMapping { .. })
        ));
        let mut b = good.clone();
        b[36] = 6;
        assert!(matches!(
            r.parse_response(&b),
            Err(PcpError::NotOurMapping { .. })
        ));
        assert_eq!(
            r.parse_response(&answer(&r, ext, 8)[..24]),
            Err(PcpError::Result(ResultCode::NoResources))
        );
        assert!(ResultCode::NoResources.is_transient());
        let zero: SocketAddr = "0.0.0.0:51000".parse().unwrap();
        assert!(matches!(
            r.parse_response(&answer(&r, zero, 0)),
            Err(PcpError::BadExternal(_))
        ));
        let noport: SocketAddr = "203.0.113.11:0".parse().unwrap();
        assert!(matches!(
            r.parse_response(&answer(&r, noport, 0)),
            Err(PcpError::BadExternal(_))
        ));
        // Options after the body are allowed.
        let mut b = good.clone();
        b.extend_from_slice(&[0; 8]);
        assert!(r.parse_response(&b).is_ok());
    }

    #[test]
    fn deletion_answer_may_carry_any_address() {
        let mut r = req();
        r.lifetime = 0;
        let zero: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let m = r.parse_response(&answer(&r, zero, 0)).unwrap();
        assert_eq!(m.lifetime, Duration::ZERO);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = req().parse_response(&b);
        }

        #[test]
        fn mutated_answers_never_panic(i in 0usize..60, v in any::<u8>(), cut in 0usize..=64) {
            let r = req();
            let mut b = answer(&r, "203.0.113.11:51000".parse().unwrap(), 0);
            b[i] = v;
            b.truncate(cut);
            let _ = r.parse_response(&b);
        }
    }
}
