//! Punch sessions: drive the sans-IO [`Puncher`] with the agent's socket,
//! bind the relay when punching is slow or impossible, and open the peer
//! connection to the peer's virtual address, whose path can change under it.
//!
//! [`Puncher`]: punch_protocol::punch::Puncher

mod answering;
pub(crate) mod birthday;
mod dialing;
pub(crate) mod pex;
mod punching;
pub(crate) mod serverless;
mod upkeep;

pub(crate) use answering::controlled;
pub(crate) use dialing::connect;
pub use punching::Punched;
pub(crate) use upkeep::maintain;

use crate::{AgentError, Inner};
use punch_protocol::signal::{ClientMsg, Offer, Outcome, PathKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::warn;

/// Holds a session's virtual address while a connect runs: released
/// however the connect ends, also when its caller drops it
/// (`ConnectOptions::timeout`); a connection holds its own reference.
struct Held<'a>(&'a Arc<Inner>, SocketAddr);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        release(self.0, self.1);
    }
}

/// The session using `v` is over; the last user forgets the peer.
fn release(inner: &Arc<Inner>, v: SocketAddr) {
    inner.socket.paths.lock().expect("not poisoned").unref(v);
}

fn register(inner: &Arc<Inner>, offer: &Offer) -> Result<SocketAddr, AgentError> {
    inner
        .socket
        .paths
        .lock()
        .expect("not poisoned")
        .register(offer.session, offer.peer_key, &offer.peer_id)
        .ok_or_else(|| AgentError::PeerConnect("too many peers".into()))
}

fn report(
    inner: &Arc<Inner>,
    offer: &Offer,
    path: PathKind,
    start: Instant,
    remote: Option<SocketAddr>,
    via_mapped: bool,
) {
    if path == PathKind::Failed {
        warn!(session = %offer.session, "connect failed");
    }
    inner.notify(ClientMsg::Outcome(Outcome {
        session: offer.session,
        path,
        connect_ms: start.elapsed().as_millis().min(u32::MAX as u128) as u32,
        remote,
        via_mapped,
    }));
}
