//! What the server sends on a registered channel: answers go to the
//! request waiting for them, offers nobody asked for start the controlled
//! side.

use crate::{Inner, Reply, Status};
use punch_protocol::signal::ServerMsg;
use std::sync::Arc;
use tracing::{debug, info, warn};

pub(super) fn dispatch(inner: &Arc<Inner>, msg: ServerMsg) {
    match msg {
        ServerMsg::Pong { req } | ServerMsg::Workers { req, .. } => {
            answer(inner, req, Reply::Msg(msg))
        }
        ServerMsg::Error { req: Some(req), .. } => answer(inner, req, Reply::Msg(msg)),
        ServerMsg::Error {
            req: None,
            code,
            message,
        } => warn!(code = code.as_str(), "server error: {message}"),
        m @ (ServerMsg::Offer(_) | ServerMsg::OfferWithAllocator { .. }) => {
            let Some(offer) = m.into_offer() else { return };
            let Some(probes) = inner.router.register(offer.session) else {
                warn!(session = %offer.session, "too many punch sessions; offer ignored");
                return;
            };
            match offer.req {
                Some(req) => answer(inner, req, Reply::Offer(offer, probes)),
                None => {
                    tokio::spawn(crate::session::controlled(inner.clone(), offer, probes));
                }
            }
        }
        ServerMsg::AddressChanged { observed } => {
            info!(%observed, "server sees a new address for us (NAT rebinding)");
            inner.status.send_replace(Status::Registered { observed });
            inner
                .events
                .emit(crate::AgentEvent::AddressChanged { observed });
        }
        ServerMsg::Welcome { .. } => debug!("ignoring repeated welcome"),
    }
}

fn answer(inner: &Arc<Inner>, req: u32, reply: Reply) {
    let tx = inner
        .link
        .pending
        .lock()
        .expect("not poisoned")
        .remove(&req);
    match tx {
        Some(tx) => {
            if let Err(Reply::Offer(o, _)) = tx.send(reply) {
                inner.router.unregister(o.session);
            }
        }
        None => {
            if let Reply::Offer(o, _) = reply {
                inner.router.unregister(o.session);
            }
            debug!(req, "answer for a request nobody waits for");
        }
    }
}
