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
}
