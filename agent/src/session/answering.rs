//! The controlled side: the peer asked for us; punch (and bind the relay)
//! so its dial gets through.

use super::punching::{
    first_direct, ipv6_pair, spawn_birthday, spawn_puncher, BIRTHDAY_YIELDS_TO_IPV6,
};
use super::{register, release};
use crate::options::DialPolicy;
use crate::socket::ProbeDatagram;
use crate::{Inner, RelayMode};
use punch_protocol::signal::Offer;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The controlled side: punch (and bind the relay) and let the peer dial us.
pub(crate) async fn controlled(
    inner: Arc<Inner>,
    offer: Offer,
    probes: mpsc::Receiver<ProbeDatagram>,
) {
    controlled_with(inner, offer, probes, true).await
}

/// [`controlled`]; `standing`: the server set this session up, so its
/// secret can authenticate knocks later (see [`super::serverless`]).
pub(crate) async fn controlled_with(
    inner: Arc<Inner>,
    offer: Offer,
    probes: mpsc::Receiver<ProbeDatagram>,
    standing: bool,
) {
    info!(session = %offer.session, peer = %offer.peer_id, "offer: peer wants to connect");
    let v = match register(&inner, &offer) {
        Ok(v) => v,
        Err(e) => {
            warn!("{e}");
            inner.router.unregister(offer.session);
            return;
        }
    };
    // The answering side goes by the agent's own policy: the offer does
    // not carry the dialer's.
    let policy = DialPolicy::of(&inner.config);
    let window = policy.punch_timeout + Duration::from_secs(30);
    inner
        .admission
        .allow(offer.peer_key, &offer.peer_id, window);
    // Into the address book once the peer's connection comes up.
    inner.book.lock().expect("not poisoned").expect(
        offer.session,
        &offer.peer_id,
        offer.peer_key,
        standing.then_some(crate::book::Standing {
            session: offer.session.0,
            secret: offer.secret,
        }),
        crate::book::endpoints_of(&offer.peer_candidates),
    );
    let mode = policy.relay;
    if offer.relay && mode != RelayMode::Never {
        let (inner2, offer2) = (inner.clone(), offer.clone());
        tokio::spawn(async move {
            // The relay is our path from the first request on: the
            // dialer's Initial, held by the server until we bind, comes
            // right behind our bind-ok and must be answerable.
            let early = tokio::sync::oneshot::channel().0;
            if let Err(e) =
                crate::relay::bind(&inner2.socket, inner2.relay_via(), &offer2, v, Some(early))
                    .await
            {
                warn!(session = %offer2.session, "{e}");
            }
        });
    }
    if mode == RelayMode::Force && offer.relay {
        inner.router.unregister(offer.session);
    } else {
        let ipv6 = ipv6_pair(&inner, &offer);
        let birthday = spawn_birthday(&inner, &offer, v, policy.punch_timeout, ipv6);
        let prefer = ipv6.then_some(BIRTHDAY_YIELDS_TO_IPV6);
        let punched = spawn_puncher(&inner, &offer, v, probes, policy.punch_timeout, ipv6);
        let _ = first_direct(punched, birthday, prefer).await;
    }
    tokio::time::sleep(window).await;
    release(&inner, v);
}
