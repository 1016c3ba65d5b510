//! Application protocols beside the built-in ones, on the same peer
//! connection.
//!
//! An embedder registers a handler under a protocol name
//! ([`crate::AgentBuilder::protocol`]); a peer opens a stream for it with
//! [`crate::PeerConnection::open_protocol`]. The stream starts with one
//! request frame naming the protocol and one reply (refused when this
//! agent has no such protocol); from then on its bytes are the
//! protocol's. So a connection carries ping, bench, files, forward and any
//! number of the application's own protocols at once, as iroh's router
//! does by ALPN.
//!
//! The apps that came before named protocols (files, forward, bench) keep
//! their wire format: their requests ([`PeerRequest::protocol`]) are handed
//! to the handler registered under [`FILES_PROTOCOL`], [`FORWARD_PROTOCOL`]
//! or [`BENCH_PROTOCOL`] (the `punch-apps` crate has them) with the request
//! in [`ProtocolStream::request`]. An agent without such a handler refuses
//! them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use punch_net::write_frame;
pub use punch_protocol::peer::{PeerReply, PeerRequest};
pub use punch_protocol::peer::{BENCH_PROTOCOL, FILES_PROTOCOL, FORWARD_PROTOCOL};

/// Longest protocol name.
pub const MAX_PROTOCOL_NAME: usize = punch_protocol::peer::MAX_PROTOCOL_NAME;

/// One stream of an application protocol, as its handler gets it.
#[derive(Debug)]
#[non_exhaustive]
pub struct ProtocolStream {
    /// The peer's worker id (vouched for by the server, key pinned).
    pub peer_id: String,
    /// The protocol the peer asked for.
    pub protocol: String,
    /// Our side of the stream.
    pub send: quinn::SendStream,
    /// The peer's side of the stream.
    pub recv: quinn::RecvStream,
    /// The connection the stream came on: a handler may open streams of
    /// its own back to the peer (a reverse forward does, one a connection).
    pub connection: quinn::Connection,
    /// The request the stream opened with, when it is one of the requests
    /// that predate named protocols (files, forward, bench): its handler
    /// answers it, with a [`PeerReply`] when [`PeerRequest::has_reply`]
    /// ([`accept`], [`refuse`]). `None` for a stream opened with
    /// [`crate::PeerConnection::open_protocol`], which this agent has
    /// already accepted.
    pub request: Option<PeerRequest>,
}

impl ProtocolStream {
    /// The stream's one question (a postcard frame of at most `max`
    /// bytes, [`crate::PeerConnection::ask`]'s); `None`, with the stream
    /// reset and a debug line naming `what`, when it does not parse.
    pub(crate) async fn question<Q: serde::de::DeserializeOwned>(
        &mut self,
        max: usize,
        what: &str,
    ) -> Option<Q> {
        match punch_net::read_frame(&mut self.recv, max).await {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::debug!(peer = %self.peer_id, "bad {what} question: {e}");
                self.refuse_question();
                None
            }
        }
    }

    /// Resets our side: the question is refused.
    pub(crate) fn refuse_question(&mut self) {
        let _ = self.send.reset(punch_protocol::close::STREAM_ERROR.into());
    }

    /// Sends the answer and ends our side.
    pub(crate) async fn answer<A: serde::Serialize>(&mut self, answer: &A) {
        let _ = write_frame(&mut self.send, answer).await;
        let _ = self.send.finish();
    }
}

/// Accepts a request (a [`PeerReply`] that says yes); false when the
/// stream is gone.
pub async fn accept(send: &mut quinn::SendStream) -> bool {
    let ok = PeerReply {
        ok: true,
        message: String::new(),
    };
    write_frame(send, &ok).await.is_ok()
}

/// Refuses a request with `message` (the peer shows it) and ends our side
/// of the stream.
pub async fn refuse(send: &mut quinn::SendStream, message: String) {
    let _ = write_frame(send, &PeerReply { ok: false, message }).await;
    let _ = send.finish();
}

/// Runs the streams of one application protocol. Any
/// `Fn(ProtocolStream) -> impl Future<Output = ()>` is one.
pub trait ProtocolHandler: Send + Sync + 'static {
    /// Serves one stream; it owns the stream until it returns.
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

impl<F, Fut> ProtocolHandler for F
where
    F: Fn(ProtocolStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self(stream))
    }
}

/// The registered protocols, by name.
pub(crate) type Protocols = Arc<HashMap<String, Arc<dyn ProtocolHandler>>>;

/// Is `name` usable as a protocol name (1 to [`MAX_PROTOCOL_NAME`] bytes of
/// `[A-Za-z0-9._/-]`)?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PROTOCOL_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

impl std::fmt::Debug for dyn ProtocolHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProtocolHandler")
    }
}
