//! The relay datagram format: frames, batches and bind MACs.

use crate::signal::{Role, SessionId};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First four bytes of every relay frame (first byte outside the QUIC and
/// STUN ranges, and different from the probe magic).
pub const MAGIC: [u8; 4] = [0x0f, b'p', b'r', b'l'];
/// Bytes a data frame adds in front of the payload.
pub const DATA_HEADER: usize = 13;
const BIND_LEN: usize = 4 + 1 + 8 + 1 + 8 + 16;

/// Is this datagram a relay frame?
pub fn is_relay(d: &[u8]) -> bool {
    d.len() >= 4 && d[..4] == MAGIC
}

/// A parsed relay frame (payload borrowed).
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Bind {
        session: SessionId,
        side: Role,
        nonce: u64,
        mac: &'a [u8],
    },
    BindOk {
        session: SessionId,
        side: Role,
        nonce: u64,
        mac: &'a [u8],
    },
    Data {
        session: SessionId,
        payload: &'a [u8],
    },
    /// Several datagrams: see [`batch_items`].
    Batch { session: SessionId, body: &'a [u8] },
    /// The server stopped relaying the session.
    Ended {
        session: SessionId,
        reason: EndReason,
        nonce: u64,
        mac: &'a [u8],
    },
    /// The server does not know the session (not authenticated).
    Unknown { session: SessionId },
}

/// Why the server stopped relaying a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The session carried its byte quota.
    Bytes,
    /// The session reached its longest life.
    Time,
}

impl EndReason {
    fn byte(self) -> u8 {
        match self {
            EndReason::Bytes => 0,
            EndReason::Time => 1,
        }
    }

    /// `byte quota` or `time quota`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Bytes => "byte quota",
            EndReason::Time => "time quota",
        }
    }
}

/// Starts a batch frame for `session` in `out` (cleared first).
pub fn start_batch(out: &mut Vec<u8>, session: SessionId) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(4);
    out.extend_from_slice(&session.0.to_be_bytes());
}

/// Appends one datagram to a batch frame.
pub fn push_batch_item(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&payload[..len]);
}

/// The datagrams of a batch body as ranges into it; `None` when a length
/// runs past the end.
pub fn batch_items(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < body.len() {
        let len = u16::from_be_bytes(body.get(off..off + 2)?.try_into().ok()?) as usize;
        let start = off + 2;
        if start + len > body.len() {
            return None;
        }
        out.push(start..start + len);
        off = start + len;
    }
    Some(out)
}

/// Why a relay frame (or a new session) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("not a relay frame")]
    BadMagic,
    #[error("malformed relay frame")]
    Malformed,
    #[error("unknown relay session")]
    UnknownSession,
    #[error("relay bind MAC does not verify")]
    BadMac,
    #[error("data from an address not bound to the session")]
    NotBound,
    #[error("the peer has not bound yet")]
    PeerNotBound,
    #[error("relay session quota exhausted")]
    Quota,
    #[error("relay table full")]
    Full,
    #[error("the requester's share of the relay table is in use")]
    ShareFull,
    #[error("relay bind replayed from another address")]
    Replayed,
}
pub(super) fn side_byte(r: Role) -> u8 {
    match r {
        Role::Controlling => 0,
        Role::Controlled => 1,
    }
}

fn bind_mac(secret: &[u8; 32], kind: u8, session: SessionId, side: u8, nonce: u64) -> [u8; 16] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    m.update(b"punch relay");
    m.update(&[kind]);
    m.update(&session.0.to_be_bytes());
    m.update(&[side]);
    m.update(&nonce.to_be_bytes());
    let full = m.finalize().into_bytes();
    full[..16].try_into().expect("16 bytes")
}

fn encode_bind(kind: u8, secret: &[u8; 32], session: SessionId, side: u8, nonce: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BIND_LEN);
    v.extend_from_slice(&MAGIC);
    v.push(kind);
    v.extend_from_slice(&session.0.to_be_bytes());
    v.push(side);
    v.extend_from_slice(&nonce.to_be_bytes());
    v.extend_from_slice(&bind_mac(secret, kind, session, side, nonce));
    v
}

/// A bind request from `side`.
pub fn encode_bind_request(
    secret: &[u8; 32],
    session: SessionId,
    side: Role,
    nonce: u64,
) -> Vec<u8> {
    encode_bind(1, secret, session, side_byte(side), nonce)
}

/// The server's answer to a bind.
pub fn encode_bind_ok(secret: &[u8; 32], session: SessionId, side: Role, nonce: u64) -> Vec<u8> {
    encode_bind(2, secret, session, side_byte(side), nonce)
}

/// The server's notice that it stopped relaying `session`.
pub fn encode_ended(
    secret: &[u8; 32],
    session: SessionId,
    reason: EndReason,
    nonce: u64,
) -> Vec<u8> {
    encode_bind(5, secret, session, reason.byte(), nonce)
}

/// The answer to a bind for a session the server does not know.
pub fn encode_unknown(session: SessionId) -> Vec<u8> {
    let mut v = Vec::with_capacity(DATA_HEADER);
    v.extend_from_slice(&MAGIC);
    v.push(6);
    v.extend_from_slice(&session.0.to_be_bytes());
    v
}

/// Writes a data frame header for `session` into `out[..DATA_HEADER]`.
pub fn write_data_header(out: &mut [u8], session: SessionId) {
    out[..4].copy_from_slice(&MAGIC);
    out[4] = 3;
    out[5..13].copy_from_slice(&session.0.to_be_bytes());
}

/// Verifies the MAC of a bind, bind-ok or ended frame.
pub fn verify_bind(frame: &Frame<'_>, secret: &[u8; 32]) -> bool {
    let (kind, session, side, nonce, mac) = match frame {
        Frame::Bind {
            session,
            side,
            nonce,
            mac,
        } => (1, *session, side_byte(*side), *nonce, *mac),
        Frame::BindOk {
            session,
            side,
            nonce,
            mac,
        } => (2, *session, side_byte(*side), *nonce, *mac),
        Frame::Ended {
            session,
            reason,
            nonce,
            mac,
        } => (5, *session, reason.byte(), *nonce, *mac),
        Frame::Data { .. } | Frame::Batch { .. } | Frame::Unknown { .. } => return false,
    };
    let expected = bind_mac(secret, kind, session, side, nonce);
    crate::ct_eq(mac, &expected)
}

/// Parses a relay frame.
pub fn parse(d: &[u8]) -> Result<Frame<'_>, RelayError> {
    if !is_relay(d) {
        return Err(RelayError::BadMagic);
    }
    if d.len() < DATA_HEADER {
        return Err(RelayError::Malformed);
    }
    let session = SessionId(u64::from_be_bytes(d[5..13].try_into().expect("8 bytes")));
    match d[4] {
        3 => Ok(Frame::Data {
            session,
            payload: &d[DATA_HEADER..],
        }),
        4 => {
            let body = &d[DATA_HEADER..];
            if batch_items(body).is_none() {
                return Err(RelayError::Malformed);
            }
            Ok(Frame::Batch { session, body })
        }
        6 if d.len() == DATA_HEADER => Ok(Frame::Unknown { session }),
        k @ (1 | 2 | 5) => {
            // bind, bind-ok and ended share one layout.
            if d.len() != BIND_LEN {
                return Err(RelayError::Malformed);
            }
            let nonce = u64::from_be_bytes(d[14..22].try_into().expect("8 bytes"));
            let mac = &d[22..38];
            if k == 5 {
                let reason = match d[13] {
                    0 => EndReason::Bytes,
                    1 => EndReason::Time,
                    _ => return Err(RelayError::Malformed),
                };
                return Ok(Frame::Ended {
                    session,
                    reason,
                    nonce,
                    mac,
                });
            }
            let side = match d[13] {
                0 => Role::Controlling,
                1 => Role::Controlled,
                _ => return Err(RelayError::Malformed),
            };
            Ok(if k == 1 {
                Frame::Bind {
                    session,
                    side,
                    nonce,
                    mac,
                }
            } else {
                Frame::BindOk {
                    session,
                    side,
                    nonce,
                    mac,
                }
            })
        }
        _ => Err(RelayError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: SessionId = SessionId(77);

    #[test]
    fn batches_roundtrip_and_truncated_ones_are_malformed() {
        let mut b = Vec::new();
        start_batch(&mut b, S);
        push_batch_item(&mut b, b"one");
        push_batch_item(&mut b, b"");
        push_batch_item(&mut b, &[7; 1400]);
        let Ok(Frame::Batch { session, body }) = parse(&b) else {
            panic!("not a batch")
        };
        assert_eq!(session, S);
        let items = batch_items(body).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(&body[items[0].clone()], b"one");
        assert_eq!(body[items[2].clone()].len(), 1400);
        b.pop();
        assert_eq!(parse(&b), Err(RelayError::Malformed));
    }
}
