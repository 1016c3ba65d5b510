//! The relay client: binding our side of a session on the server's relay,
//! and moving every binding when the channel to the server changes.
//!
//! A binding is one bind request MAC'd with the session secret; the server
//! answers bind-ok (MAC'd too) and from then on forwards the session's data
//! frames between the two bound sides. Bindings are refreshed by the path
//! machine ([`crate::path::PathAction::RefreshRelay`]); the server's
//! *ended* notices are checked in [`crate::path::PathTable::relay_ended`].
//! Frames go over UDP to the server, or over the WebSocket channel while
//! signaling runs there ([`RelayVia`]).

use crate::path::RelayVia;
use crate::socket::PunchSocket;
use crate::AgentError;
use punch_protocol::relay;
use punch_protocol::signal::Offer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Binds the relay and returns as soon as the first bind request is out
/// (the relay is then the peer's path): the server handles our frames in
/// order and holds what reaches it before the peer binds, so the handshake
/// need not wait a round trip for the bind-ok. The binding is confirmed
/// in the background; an error comes back only when it fails before the
/// first request is out.
pub(crate) async fn bind_early(
    socket: &Arc<PunchSocket>,
    via: Option<RelayVia>,
    offer: &Offer,
    v: SocketAddr,
) -> Result<(), AgentError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (socket2, offer2) = (socket.clone(), offer.clone());
    let task = tokio::spawn(async move {
        let r = bind(&socket2, via, &offer2, v, Some(tx)).await;
        if let Err(e) = &r {
            warn!(session = %offer2.session, "{e}");
        }
        r
    });
    match rx.await {
        Ok(()) => Ok(()),
        // Dropped unsent: the bind failed before its first request.
        Err(_) => match task.await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Io(e.to_string())),
        },
    }
}

/// Binds our side of the session on the server's relay (reached `via`); on
/// success the relay becomes the peer's path until a direct one is
/// validated. With `early`, the relay becomes the path as soon as the first
/// request is out, and `early` says so.
pub(crate) async fn bind(
    socket: &PunchSocket,
    via: Option<RelayVia>,
    offer: &Offer,
    v: SocketAddr,
    mut early: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), AgentError> {
    let via =
        via.ok_or_else(|| AgentError::PeerConnect("no channel to the server's relay".into()))?;
    let mut rx = socket.watch_binds(offer.session);
    let result = async {
        for attempt in 1..=5u32 {
            let nonce: u64 = rand::random();
            let frame = relay::encode_bind_request(&offer.secret, offer.session, offer.role, nonce);
            socket.send_relay_control(via, &frame);
            if let Some(tx) = early.take() {
                socket.paths.lock().expect("not poisoned").set_relay(
                    v,
                    via,
                    offer.session,
                    offer.secret,
                    offer.role,
                );
                let _ = tx.send(());
            }
            let wait = Duration::from_millis(250 * attempt as u64);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                let Ok(parsed) = relay::parse(&answer) else {
                    continue;
                };
                let ours = matches!(parsed, relay::Frame::BindOk { session, side, nonce: n, .. }
                    if session == offer.session && side == offer.role && n == nonce);
                if ours && relay::verify_bind(&parsed, &offer.secret) {
                    socket.paths.lock().expect("not poisoned").set_relay(
                        v,
                        via,
                        offer.session,
                        offer.secret,
                        offer.role,
                    );
                    debug!(?via, "relay bound");
                    return Ok(());
                }
            }
        }
        Err(AgentError::PeerConnect(format!(
            "the relay ({via:?}) did not confirm the binding"
        )))
    }
    .await;
    socket.unwatch_binds(offer.session);
    result
}

/// Moves every relay binding to the new channel `via` (a new WebSocket, or
/// UDP instead of TCP) and tells the server with a fresh bind for each.
pub(crate) fn move_bindings(socket: &PunchSocket, via: RelayVia) {
    let binds = socket.paths.lock().expect("not poisoned").move_relays(via);
    if !binds.is_empty() {
        info!(
            bindings = binds.len(),
            ?via,
            "relay bindings move to the new channel"
        );
    }
    for (via, frame) in binds {
        socket.send_relay_control(via, &frame);
    }
}
