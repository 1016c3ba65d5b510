//! Requests on agent-to-agent streams.
//!
//! Each bidirectional stream a peer opens starts with one [`crate::codec`]
//! frame holding a [`PeerRequest`]; what follows depends on the request.

use serde::{Deserialize, Serialize};

/// Largest peer request header.
pub const MAX_PEER_HEADER: usize = 4096;

/// What the opener of a stream wants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Echo every byte back until the opener finishes its side.
    Echo,
    /// Read and discard everything until the opener finishes, then answer
    /// with the byte count (8 bytes, big-endian): upload throughput.
    Sink,
    /// Send bytes for this many milliseconds (at most [`MAX_SOURCE_MS`]),
    /// then finish: download throughput.
    Source { millis: u32 },
    /// Connect to `target` (`IP:PORT`, which must be on the peer's forward
    /// allow list) and carry the stream's bytes to and from it; the peer
    /// answers with a [`PeerReply`] first. `check_only` asks whether it
    /// would be allowed, without connecting.
    Forward { target: String, check_only: bool },
}

/// The first frame of an answer to a request that can be refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReply {
    pub ok: bool,
    /// Why not, when refused.
    pub message: String,
}

/// Longest [`PeerRequest::Source`] a peer serves.
pub const MAX_SOURCE_MS: u32 = 60_000;
