//! Wire types and sans-IO logic shared by the punch server and agent.
//!
//! - [`signal`]: the signaling messages exchanged over the QUIC control stream.
//! - [`codec`]: length-prefixed postcard framing with hard size limits.
//! - [`probe`]: the authenticated UDP probe packets used to punch holes.
//! - [`punch`]: the punching schedule and path choice as a state machine
//!   that takes events and time and returns datagrams to send.
//! - [`allocator`]: how a NAT picks ports, learned from a few mappings,
//!   and the port budget that follows.
//! - [`birthday`]: the birthday method for hard NATs: who plays which part,
//!   and the hard side's many-socket machine.
//! - [`predict`]: port prediction for NATs that count ports up.
//! - [`peer`]: the small request header spoken on peer-to-peer streams.
//! - [`relay`]: relay frames and the server's relay table.
//! - [`ws`]: signaling and relay frames over WebSocket (the TCP channel).
//! - [`cluster`]: messages between the servers of a cluster.
//! - [`close`]: the QUIC close codes.

pub mod allocator;
pub mod birthday;
pub mod budget;
pub mod close;
pub mod cluster;
pub mod codec;
pub mod peer;
pub mod predict;
pub mod probe;
pub mod punch;
pub mod relay;
pub mod signal;
pub mod stun;
pub mod view;
pub mod ws;

/// Constant-time equality, for MACs, proofs and fingerprints: how long a
/// compare takes says nothing of where two values differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Version of the signaling protocol; sent in `Hello` and `Welcome`.
/// A server speaks every version from [`MIN_PROTOCOL_VERSION`] up: it
/// answers `Welcome` with the agent's version and sends it nothing newer.
/// Version 5 added `ClientMsg::Allocator` and `ClientMsg::OutcomeDetail`;
/// version 6 `ServerMsg::OfferWithAllocator`.
pub const PROTOCOL_VERSION: u16 = 6;
/// The oldest agents a server still serves.
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// ALPN of the agent-to-server signaling connection.
pub const ALPN_SIGNAL: &[u8] = b"punch-signal/1";
/// ALPN of agent-to-agent peer connections.
pub const ALPN_PEER: &[u8] = b"punch/1";
/// Default UDP port of the rendezvous server (the STUN port).
pub const DEFAULT_PORT: u16 = 3478;
