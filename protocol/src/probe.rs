//! Authenticated UDP probes.
//!
//! Probes share the agent's one UDP socket with QUIC. They start with
//! [`MAGIC`], whose first byte (0x0e) lies in a range that neither QUIC
//! (64..=255 with the fixed bit, which we never grease) nor STUN (0..=3)
//! uses (RFC 7983), so the socket can demultiplex on the first bytes.
//!
//! Layout (big-endian):
//! ```text
//! magic[4] kind[1] role[1] session[8] txid[8] (pong: family[1] ip[4|16] port[2]) mac[16]
//! ```
//! The MAC is HMAC-SHA256 over everything before it, keyed with the session
//! secret, truncated to 16 bytes.

use crate::signal::{Role, SessionId};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// First four bytes of every probe.
pub const MAGIC: [u8; 4] = [0x0e, b'p', b'n', b'c'];
/// Largest probe on the wire.
pub const MAX_PROBE: usize = 4 + 1 + 1 + 8 + 8 + 1 + 16 + 2 + MAC_LEN;
const MAC_LEN: usize = 16;
const HEADER: usize = 22;

/// Is this datagram a probe (by its magic)?
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.len() >= 4 && datagram[..4] == MAGIC
}

/// A decoded probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    /// Role of the sender.
    pub role: Role,
    pub session: SessionId,
    pub txid: u64,
}

/// Ping asks for a pong; a pong answers and says where the ping came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Ping,
    /// The source address the ping arrived from, as seen by the answerer.
    Pong {
        observed: SocketAddr,
    },
}

/// Why a datagram is not a valid probe.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("not a probe (bad magic)")]
    BadMagic,
    #[error("probe has a bad length")]
    BadLength,
    #[error("probe has an unknown kind or role")]
    BadField,
    #[error("probe MAC does not verify")]
    BadMac,
}

fn mac(secret: &[u8; 32], data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// The probe secret of a session two agents start without the server
/// (a knock names a standing session and the new one): from the secret of
/// a session the server set up between them, which only they (and the
/// server) know, and the new session's id.
pub fn derive_secret(standing: &[u8; 32], session: SessionId) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(standing).expect("any key length");
    m.update(b"punch serverless session v1");
    m.update(&session.0.to_be_bytes());
    m.finalize().into_bytes().into()
}

/// The standing session of agents that share a fleet token, for a first
/// meeting on a LAN with no server: its id and secret, both from the token
/// (so only token holders can knock with it or answer its probes).
pub fn token_standing(token: &str) -> (SessionId, [u8; 32]) {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).expect("any key length");
    m.update(b"punch lan standing v1");
    let secret: [u8; 32] = m.finalize().into_bytes().into();
    let mut id = [0u8; 8];
    id.copy_from_slice(&derive_secret(&secret, SessionId(0))[..8]);
    (SessionId(u64::from_be_bytes(id)), secret)
}

impl Probe {
    /// A ping from `role` in `session`.
    pub fn ping(role: Role, session: SessionId, txid: u64) -> Probe {
        Probe {
            kind: ProbeKind::Ping,
            role,
            session,
            txid,
        }
    }

    /// The answer `role` gives to this ping, which arrived from `from`.
    pub fn pong_to(&self, role: Role, from: SocketAddr) -> Probe {
        Probe {
            kind: ProbeKind::Pong { observed: from },
            role,
            session: self.session,
            txid: self.txid,
        }
    }

    /// Encodes and signs the probe.
    pub fn encode(&self, secret: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_PROBE);
        out.extend_from_slice(&MAGIC);
        out.push(match self.kind {
            ProbeKind::Ping => 1,
            ProbeKind::Pong { .. } => 2,
        });
        out.push(match self.role {
            Role::Controlling => 0,
            Role::Controlled => 1,
        });
        out.extend_from_slice(&self.session.0.to_be_bytes());
        out.extend_from_slice(&self.txid.to_be_bytes());
        if let ProbeKind::Pong { observed } = self.kind {
            match observed.ip() {
                IpAddr::V4(ip) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(6);
                    out.extend_from_slice(&ip.octets());
                }
            }
            out.extend_from_slice(&observed.port().to_be_bytes());
        }
        let tag = mac(secret, &out);
        out.extend_from_slice(&tag);
        out
    }

    /// Reads the session id without checking the MAC, so the receiver can
    /// find the secret to verify with.
    pub fn peek_session(data: &[u8]) -> Result<SessionId, ProbeError> {
        if !is_probe(data) {
            return Err(ProbeError::BadMagic);
        }
        if data.len() < HEADER + MAC_LEN || data.len() > MAX_PROBE {
            return Err(ProbeError::BadLength);
        }
        Ok(SessionId(u64::from_be_bytes(
            data[6..14].try_into().expect("8 bytes"),
        )))
    }

    /// Decodes and verifies a probe.
    pub fn decode(data: &[u8], secret: &[u8; 32]) -> Result<Probe, ProbeError> {
        let session = Self::peek_session(data)?;
        let (body, tag) = data.split_at(data.len() - MAC_LEN);
        let expected = mac(secret, body);
        // Constant-time compare: the MAC is the probe's only authentication.
        if !crate::ct_eq(tag, &expected) {
            return Err(ProbeError::BadMac);
        }
        let role = match body[5] {
            0 => Role::Controlling,
            1 => Role::Controlled,
            _ => return Err(ProbeError::BadField),
        };
        let txid = u64::from_be_bytes(body[14..22].try_into().expect("8 bytes"));
        let rest = &body[HEADER..];
        let kind = match (body[4], rest) {
            (1, []) => ProbeKind::Ping,
            (2, [4, a, b, c, d, p0, p1]) => ProbeKind::Pong {
                observed: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)),
                    u16::from_be_bytes([*p0, *p1]),
                ),
            },
            (2, [6, tail @ ..]) if tail.len() == 18 => {
                let ip: [u8; 16] = tail[..16].try_into().expect("16 bytes");
                ProbeKind::Pong {
                    observed: SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::from(ip)),
                        u16::from_be_bytes([tail[16], tail[17]]),
                    ),
                }
            }
            (1 | 2, _) => return Err(ProbeError::BadLength),
            _ => return Err(ProbeError::BadField),
        };
        Ok(Probe {
            kind,
            role,
            session,
            txid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn roundtrip_ping_and_pongs() {
        for kind in [
            ProbeKind::Ping,
            ProbeKind::Pong {
                observed: "203.0.113.5:4000".parse().unwrap(),
            },
            ProbeKind::Pong {
                observed: "[2001:db8::1]:9".parse().unwrap(),
            },
        ] {
            let p = Probe {
                kind,
                role: Role::Controlled,
                session: SessionId(42),
                txid: 99,
            };
            let wire = p.encode(&KEY);
            assert!(is_probe(&wire));
            assert!(wire.len() <= MAX_PROBE);
            assert_eq!(Probe::decode(&wire, &KEY), Ok(p));
        }
    }

    #[test]
    fn wrong_key_or_tampering_fails() {
        let p = Probe {
            kind: ProbeKind::Ping,
            role: Role::Controlling,
            session: SessionId(1),
            txid: 2,
        };
        let wire = p.encode(&KEY);
        assert_eq!(Probe::decode(&wire, &[8; 32]), Err(ProbeError::BadMac));
        let mut bad = wire.clone();
        bad[15] ^= 1;
        assert_eq!(Probe::decode(&bad, &KEY), Err(ProbeError::BadMac));
        assert_eq!(
            Probe::decode(&wire[..wire.len() - 1], &KEY),
            Err(ProbeError::BadLength)
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_ok_or_err(mut data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Probe::decode(&data, &KEY);
            if data.len() >= 4 { data[..4].copy_from_slice(&MAGIC); }
            let _ = Probe::decode(&data, &KEY);
        }
    }
}
