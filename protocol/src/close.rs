//! Application close codes of punch's QUIC connections and streams, named
//! so that a log line or a packet capture can be read against them.

/// The work is done, or the side is shutting down: a normal close.
pub const DONE: u32 = 0;
/// The agent holds as many peer connections as it allows.
pub const BUSY: u32 = 1;
/// The peer was not introduced by the server (no offer names its key).
pub const UNKNOWN_PEER: u32 = 2;
/// The application refused the peer (`punch_agent::Incoming::refuse`);
/// the close reason says why.
pub const REFUSED: u32 = 3;
/// Stream reset or stop: the stream cannot go on (its request header did
/// not decode, or the work behind it failed: a file read, a forwarded TCP
/// connection).
pub const STREAM_ERROR: u32 = 1;
