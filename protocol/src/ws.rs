//! Signaling and relay over WebSocket (the TCP channel).
//!
//! Where UDP is blocked, or the server sits behind an HTTPS-only front, an
//! agent speaks to the server over a WebSocket at `/ws`. Every binary
//! message carries one frame; its first byte says which kind:
//!
//! ```text
//! 0x00 signal:  postcard ClientMsg / ServerMsg (the same messages as over QUIC)
//! 0x01 auth:    postcard WsAuth (the handshake below)
//! 0x0f relay:   a relay frame exactly as over UDP (starts with relay::MAGIC)
//! ```
//!
//! A TLS-terminating front hides the agent's client certificate, so the
//! handshake proves keys with signatures instead: the server sends a nonce,
//! the agent signs both nonces with its key (the `Hello` that follows names
//! the key), the server answers by signing them with its own key, which the
//! agent checks against the pinned fingerprint. The server is thus
//! authenticated end to end even through a front that terminates TLS, and
//! the token proof is bound to this channel's nonces.
//!
//! ```text
//! server → ServerHello { version, nonce_s }
//! agent  → ClientAuth { nonce_c, sig_agent("punch ws client" ‖ nonce_s ‖ nonce_c) }, Hello
//! server → ServerAuth { key, sig_server("punch ws server" ‖ nonce_c ‖ nonce_s) }, Welcome
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Frame kind: a signaling message.
pub const KIND_SIGNAL: u8 = 0x00;
/// Frame kind: a handshake message.
pub const KIND_AUTH: u8 = 0x01;
/// Largest WebSocket message either side accepts (a relay frame carries at
/// most one UDP datagram; signaling frames are smaller still).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Bytes a WebSocket reader asks for per read. tungstenite zero-fills this
/// much of its buffer on every read (128 KiB by default) while TLS hands
/// over at most a record or a few (16 KiB each): a smaller chunk cut the
/// relay's memset time by most of its 3 % of the server's CPU.
pub const READ_BUFFER: usize = 32 * 1024;
/// The WebSocket path on the server's TLS port and HTTP listener.
pub const PATH: &str = "/ws";

/// The handshake messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WsAuth {
    /// First message from the server.
    ServerHello { version: u16, nonce: [u8; 32] },
    /// The agent's proof of its key (64-byte Ed25519 signature).
    ClientAuth { nonce: [u8; 32], signature: Vec<u8> },
    /// The server's key and its proof of it.
    ServerAuth { key: [u8; 32], signature: Vec<u8> },
}

/// A received message, split by kind.
#[derive(Debug, PartialEq, Eq)]
pub enum WsFrame<'a> {
    /// Postcard of a signaling message.
    Signal(&'a [u8]),
    /// Postcard of a [`WsAuth`].
    Auth(&'a [u8]),
    /// A relay frame (magic included).
    Relay(&'a [u8]),
}

/// Why a WebSocket message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("empty message")]
    Empty,
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Splits a message by its kind byte.
pub fn parse(msg: &[u8]) -> Result<WsFrame<'_>, WsError> {
    if msg.len() > MAX_MESSAGE {
        return Err(WsError::TooLarge(msg.len()));
    }
    match msg.first() {
        None => Err(WsError::Empty),
        Some(&KIND_SIGNAL) => Ok(WsFrame::Signal(&msg[1..])),
        Some(&KIND_AUTH) => Ok(WsFrame::Auth(&msg[1..])),
        Some(_) if crate::relay::is_relay(msg) => Ok(WsFrame::Relay(msg)),
        Some(&k) => Err(WsError::UnknownKind(k)),
    }
}

fn encode<T: Serialize>(kind: u8, m: &T) -> Vec<u8> {
    let mut out = vec![kind];
    // Serializing our own in-memory messages to a Vec cannot fail.
    out.extend_from_slice(&postcard::to_stdvec(m).expect("serializable"));
    out
}

/// A signaling message as a WebSocket payload.
pub fn encode_signal<T: Serialize>(m: &T) -> Vec<u8> {
    encode(KIND_SIGNAL, m)
}

/// A handshake message as a WebSocket payload.
pub fn encode_auth(m: &WsAuth) -> Vec<u8> {
    encode(KIND_AUTH, m)
}

/// Decodes the body of a signal or auth frame.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WsError> {
    postcard::from_bytes(body).map_err(|e| WsError::Malformed(e.to_string()))
}

/// What the agent signs.
pub fn client_signed(server_nonce: &[u8; 32], client_nonce: &[u8; 32]) -> Vec<u8> {
    [b"punch ws client".as_slice(), server_nonce, client_nonce].concat()
}

/// What the server signs.
pub fn server_signed(server_nonce: &[u8; 32], client_nonce: &[u8; 32]) -> Vec<u8> {
    [b"punch ws server".as_slice(), client_nonce, server_nonce].concat()
}

/// The value the token proof is computed over on a WebSocket channel (over
/// QUIC it is the TLS exporter): unique to this channel's nonces.
pub fn token_binding(server_nonce: &[u8; 32], client_nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"punch ws token");
    h.update(server_nonce);
    h.update(client_nonce);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{ClientMsg, ServerMsg};

    #[test]
    fn kinds_roundtrip() {
        let m = ClientMsg::Ping { req: 7 };
        let b = encode_signal(&m);
        let WsFrame::Signal(body) = parse(&b).unwrap() else {
            panic!()
        };
        assert_eq!(decode::<ClientMsg>(body).unwrap(), m);
        let a = WsAuth::ServerHello {
            version: 3,
            nonce: [9; 32],
        };
        let encoded = encode_auth(&a);
        let WsFrame::Auth(body) = parse(&encoded).unwrap() else {
            panic!()
        };
        assert_eq!(decode::<WsAuth>(body).unwrap(), a);
        let mut relay = vec![0u8; crate::relay::DATA_HEADER + 3];
        crate::relay::write_data_header(&mut relay, crate::signal::SessionId(1));
        assert_eq!(parse(&relay).unwrap(), WsFrame::Relay(&relay));
    }

    #[test]
    fn bad_messages_are_errors() {
        assert_eq!(parse(&[]), Err(WsError::Empty));
        assert_eq!(parse(&[0x42, 1]), Err(WsError::UnknownKind(0x42)));
        assert_eq!(parse(&[0x0f, 1]), Err(WsError::UnknownKind(0x0f)));
        assert!(matches!(
            parse(&vec![0; MAX_MESSAGE + 1]),
            Err(WsError::TooLarge(_))
        ));
        assert!(decode::<ServerMsg>(&[0xff, 0xff, 0xff]).is_err());
        assert_ne!(
            client_signed(&[1; 32], &[2; 32]),
            server_signed(&[1; 32], &[2; 32])
        );
    }
}
