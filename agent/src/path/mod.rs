//! The path layer: how datagrams for a peer reach it.
//!
//! quinn sees each peer at one virtual address for a connection's life
//! ([`table`]); under it the peer's live path (direct, UDP relay, relay over
//! the TCP channel) changes as a sans-IO [`machine::PathMachine`] decides.
//! [`demux`] tells the kinds of datagram on the agent's one socket apart.

pub mod demux;
pub mod machine;
pub mod table;

pub use machine::{PathAction, PathConfig, PathMachine, PathView};
pub use table::{is_virtual, ActivePath, PathTable, RelayVia};
