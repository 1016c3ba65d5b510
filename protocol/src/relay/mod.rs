//! Relay frames and the server's relay table.
//!
//! When no direct path can be punched, the agents' QUIC packets travel
//! through the server's own UDP port inside a short header naming the
//! session; the server sees only ciphertext. A side first *binds* its
//! address to the session with a frame MAC'd with the session secret; from
//! then on the server forwards data frames between the two bound addresses
//! and nothing else (as TURN does with channel bindings). Every session has
//! byte, time and idle quotas, and the table has a size cap. A requester
//! holds at most a share of the table ([`RelayLimits::per_owner`]), so one
//! agent introducing itself in a loop cannot leave everyone else's offers
//! without a relay.
//!
//! ```text
//! bind:     magic[4] 1 session[8] side[1] nonce[8] mac[16]
//! bind-ok:  magic[4] 2 session[8] side[1] nonce[8] mac[16]
//! data:     magic[4] 3 session[8] payload…
//! batch:    magic[4] 4 session[8] (len[2] payload)…
//! ended:    magic[4] 5 session[8] reason[1] nonce[8] mac[16]
//! unknown:  magic[4] 6 session[8]
//! ```
//!
//! The server sends *ended* to both bound sides when a session's quota is
//! spent (at most once a second while frames keep coming), so the agents
//! can ask for a new session instead of waiting out a silent path. It
//! answers a bind or data for a session it does not know (it restarted)
//! with *unknown*, within a budget per second: the agents then ask for a new session under the same
//! connection, as for an ended one. *unknown* carries no MAC (the server
//! has no secret for the session); a forged one costs its receiver one new
//! introduction, and agents older than it ignore it.
//!
//! A bind's nonce is remembered per side ([`BIND_NONCES`] of them): the
//! same bind again from its own address is answered as before (a
//! duplicate), from another address it is refused as a replay.
//!
//! A batch carries several datagrams of one session in one message of the
//! TCP channel, where per-message costs dominate (a WebSocket frame, a
//! queue hop and a table lookup each); over UDP every datagram stays a
//! datagram.

mod table;
mod wire;

pub use table::*;
pub use wire::*;
