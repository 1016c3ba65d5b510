//! Admission of incoming peers: who may connect to us (the keys the server
//! introduced, for a while), the handshakes of those who do, and the queue
//! [`crate::Agent::accept`] reads.

use crate::peer::{PathInfo, PeerConnection};
use crate::Inner;
use punch_protocol::close;
use punch_protocol::signal::SessionId;
use punch_tls::PublicKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info};

/// Most incoming connections waiting for [`crate::Agent::accept`]; more are
/// closed with `BUSY`.
const INCOMING_QUEUE: usize = 64;

/// Most peers allowed at once. Each is an introduction the server made in
/// the last [`crate::session`] window, so this is far more than any agent
/// sees; when full, the entry that expires first makes room.
const MAX_ALLOWED: usize = 4096;

/// Longest an incoming handshake may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct AllowedPeer {
    peer_id: String,
    until: Instant,
}

/// An incoming peer connection the application has not taken yet: the
/// handshake is done and the peer's key is the one the server introduced
/// under [`Incoming::peer_id`]. [`Incoming::accept`] takes it,
/// [`Incoming::refuse`] closes it with a reason the peer sees; dropped, it
/// is refused without one.
#[derive(Debug)]
pub struct Incoming {
    pc: Option<PeerConnection>,
}

/// Longest refusal reason sent to the peer (QUIC close frames must fit in
/// one packet).
const MAX_REASON: usize = 256;

impl Incoming {
    /// The server-vouched worker id of the peer.
    pub fn peer_id(&self) -> &str {
        &self.pc.as_ref().expect("taken only by value").peer_id
    }

    /// The path the connection runs on.
    pub fn path(&self) -> &PathInfo {
        &self.pc.as_ref().expect("taken only by value").path
    }

    /// Takes the connection.
    pub fn accept(mut self) -> PeerConnection {
        self.pc.take().expect("taken only by value")
    }

    /// Closes the connection (code `REFUSED`); the peer's streams fail with
    /// `reason` (clipped to 256 bytes).
    pub fn refuse(mut self, reason: &str) {
        let pc = self.pc.take().expect("taken only by value");
        close_refused(&pc, reason);
    }
}

fn close_refused(pc: &PeerConnection, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    info!(peer = %pc.peer_id, reason = &reason[..end], "incoming peer refused");
    pc.conn
        .close(close::REFUSED.into(), &reason.as_bytes()[..end]);
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(pc) = self.pc.take() {
            close_refused(&pc, "refused");
        }
    }
}

/// The keys allowed to connect and the queue of admitted connections.
#[derive(Debug)]
pub(crate) struct Admission {
    allowed: Arc<Mutex<HashMap<PublicKey, AllowedPeer>>>,
    incoming_tx: mpsc::Sender<PeerConnection>,
    incoming_rx: tokio::sync::Mutex<mpsc::Receiver<PeerConnection>>,
}

impl Admission {
    pub(crate) fn new() -> Admission {
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        Admission {
            allowed: Arc::default(),
            incoming_tx,
            incoming_rx: tokio::sync::Mutex::new(incoming_rx),
        }
    }

    /// Is `key` allowed now? For the TLS verifier, which runs outside the
    /// agent's tasks.
    pub(crate) fn checker(&self) -> impl Fn(&PublicKey) -> bool + Send + Sync + 'static {
        let allowed = self.allowed.clone();
        move |k| {
            allowed
                .lock()
                .expect("not poisoned")
                .get(k)
                .is_some_and(|p| p.until > Instant::now())
        }
    }

    /// Lets the peer `peer_id` with this key connect to us for a while.
    pub(crate) fn allow(&self, key: PublicKey, peer_id: &str, for_: Duration) {
        let mut a = self.allowed.lock().expect("not poisoned");
        let now = Instant::now();
        a.retain(|_, p| p.until > now);
        if a.len() >= MAX_ALLOWED && !a.contains_key(&key) {
            if let Some(first) = a.iter().min_by_key(|(_, p)| p.until).map(|(k, _)| *k) {
                a.remove(&first);
            }
        }
        a.insert(
            key,
            AllowedPeer {
                peer_id: peer_id.to_string(),
                until: now + for_,
            },
        );
    }

    /// The worker id the server vouched for with this key.
    pub(crate) fn peer_id(&self, key: &PublicKey) -> Option<String> {
        self.allowed
            .lock()
            .expect("not poisoned")
            .get(key)
            .map(|p| p.peer_id.clone())
    }

    /// Queues an admitted connection for [`crate::Agent::accept`], or
    /// closes it (`BUSY`) when the application is that far behind.
    pub(crate) fn deliver(&self, pc: PeerConnection) {
        if let Err(mpsc::error::TrySendError::Full(pc)) = self.incoming_tx.try_send(pc) {
            tracing::warn!(peer = %pc.peer_id, "incoming queue full; closing connection");
            pc.conn.close(close::BUSY.into(), b"busy");
        }
    }

    /// The next admitted connection, for the application to accept or
    /// refuse; `None` once the agent stops.
    pub(crate) async fn next(&self) -> Option<Incoming> {
        let pc = self.incoming_rx.lock().await.recv().await?;
        Some(Incoming { pc: Some(pc) })
    }
}

/// Accepts incoming peer connections for the agent's lifetime.
pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(HANDSHAKE_LIMIT, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    debug!(%remote, "incoming peer handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "incoming peer handshake timed out");
                    return;
                }
            };
            let Some((key, peer_id)) =
                punch_tls::peer_key(&conn).and_then(|k| Some((k, inner.admission.peer_id(&k)?)))
            else {
                conn.close(close::UNKNOWN_PEER.into(), b"unknown peer");
                return;
            };
            let v = punch_net::canonical(conn.remote_address());
            let session = inner
                .socket
                .paths
                .lock()
                .expect("not poisoned")
                .session(v)
                .unwrap_or(SessionId(0));
            let policy = crate::options::DialPolicy::of(&inner.config);
            crate::session::maintain(&inner, v, &conn, None, policy);
            let (kind, remote) = crate::peer::current_path(&inner.socket, v);
            info!(peer = %peer_id, path = kind.as_str(), ?remote, "peer connected");
            let direct = remote.filter(|_| kind == punch_protocol::signal::PathKind::Direct);
            let port = inner.endpoint.local_addr().map_or(0, |a| a.port());
            inner
                .book
                .lock()
                .expect("not poisoned")
                .confirm(session, key, direct, port);
            inner.events.emit(crate::AgentEvent::PeerConnected {
                peer: peer_id.clone(),
                session,
                incoming: true,
                path: kind,
                remote: remote.unwrap_or(v),
            });
            inner.admission.deliver(PeerConnection {
                peer_id,
                path: PathInfo {
                    kind,
                    remote_addr: remote.unwrap_or(v),
                    connect_time: Duration::ZERO,
                    session,
                    via_mapped: false,
                    strategy: None,
                    relay_reason: None,
                },
                virtual_addr: v,
                socket: inner.socket.clone(),
                protocols: inner.protocols.clone(),
                conn,
            });
        });
    }
}
