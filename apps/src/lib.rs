//! Apps over punch peer connections. Each is a protocol handler an agent
//! registers ([`punch_agent::AgentBuilder::protocol`]) under its name, and
//! a few functions for the asking side; an embedder takes the ones it
//! wants, or none (the agent library itself serves only echo, for pings).
//!
//! - [`files`]: read-only file sharing with verified, resumable downloads
//!   ([`files::Files`] under [`files::NAME`]).
//! - [`forward`]: TCP port forwarding to an allow list
//!   ([`forward::Forward`] under [`forward::NAME`]).
//! - [`bench`]: throughput ([`bench::Bench`] under [`bench::NAME`]).
//! - [`reverse`]: reverse port forwarding from an allow list
//!   ([`reverse::Reverse`] under [`reverse::NAME`]; the asker's
//!   [`reverse::ReverseConn`] under [`reverse::CONN`]).
//! - [`pipe`]: a byte pipe joined to a command or socket the serving side
//!   names ([`pipe::Pipe`] under [`pipe::NAME`]).
//!
//! Their wire format is the one agents spoke before protocols had names
//! (`punch_protocol::peer::PeerRequest`), so agents of either age talk.
//!
//! ```no_run
//! # async fn run() -> Result<(), punch_agent::AgentError> {
//! use punch_apps::{bench, files, forward};
//! let agent = punch_agent::Agent::builder("rendezvous.example:7000", "FINGERPRINT")
//!     .worker_id("worker-a")
//!     .protocol(bench::NAME, bench::Bench)
//!     .protocol(files::NAME, files::Files::new(None))
//!     .protocol(forward::NAME, forward::Forward::new(vec![]))
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

pub mod bench;
pub mod files;
pub mod forward;
pub mod pipe;
pub mod reverse;
