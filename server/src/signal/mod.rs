//! The QUIC signaling endpoint: one task per agent connection.

use crate::introduce::{card, counted, Pairing, Recipient};
use crate::metrics::inc;
use crate::registry::Online;
use crate::{ServerConfig, ServerError, Shared};
use punch_net::{canonical, read_frame, write_frame, FrameError};
use punch_protocol::codec::MAX_FRAME;
use punch_protocol::signal::{
    validate_name, ClientMsg, ErrorCode, Hello, PathKind, Query, Role, ServerMsg, Transport,
    MAX_LIST, MAX_WAIT_MS,
};
use punch_protocol::{ALPN_SIGNAL, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier, TOKEN_PROOF_LABEL};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};

/// How the registry reaches an online agent's connection task.
#[derive(Clone, Debug)]
pub struct AgentHandle {
    tx: OutQueue,
    closer: Closer,
}

impl AgentHandle {
    /// Queues a message for the agent; false when its queue is full or it
    /// has gone.
    pub fn send(&self, m: ServerMsg) -> bool {
        self.tx.try_send(Box::new(m)).is_ok()
    }
}

/// Ends an agent's connection (when a newer one replaces it).
#[derive(Clone, Debug)]
pub enum Closer {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// A WebSocket channel: its task stops when notified.
    Tcp(Arc<tokio::sync::Notify>),
}

impl Closer {
    fn close(&self, reason: &str) {
        match self {
            Closer::Quic(c) => c.close(punch_protocol::close::DONE.into(), reason.as_bytes()),
            Closer::Tcp(n) => n.notify_one(),
        }
    }
}

/// The agent's end of a registered channel: the session speaks through it
/// whichever transport carries it (QUIC here, the WebSocket in `tcp`).
pub(crate) trait Link: Send {
    /// Sends one message.
    fn send(&mut self, m: &ServerMsg) -> impl Future<Output = Result<(), String>> + Send;

    /// Sends an error, waits briefly for it to be delivered, and closes.
    fn refuse(&mut self, code: ErrorCode, message: String) -> impl Future<Output = ()> + Send;

    /// Resolves when the transport is gone.
    fn closed(&self) -> impl Future<Output = String> + Send;

    /// Did the agent close the channel as it does when it shuts down?
    fn shut_down(&self) -> bool {
        false
    }

    /// The peer's current address, where it can change under the channel
    /// (QUIC follows NAT rebinding; a TCP connection cannot).
    fn rebinding_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

/// A QUIC signaling connection and its one bi-stream.
pub(crate) struct QuicLink<'a> {
    conn: &'a quinn::Connection,
    send: &'a mut quinn::SendStream,
}

impl Link for QuicLink<'_> {
    async fn send(&mut self, m: &ServerMsg) -> Result<(), String> {
        write_frame(self.send, m).await.map_err(|e| e.to_string())
    }

    async fn refuse(&mut self, code: ErrorCode, message: String) {
        refuse(self.conn, self.send, code, message).await
    }

    async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    fn shut_down(&self) -> bool {
        shut_down(self.conn)
    }

    fn rebinding_addr(&self) -> Option<std::net::SocketAddr> {
        Some(canonical(self.conn.remote_address()))
    }
}

/// A message from the agent's reader, or why reading ended.
pub(crate) type Incoming = Result<ClientMsg, ReadEnd>;

/// What an agent's reader hands its session. Boxed: a tokio channel
/// allocates its first block of 32 slots up front, and 32 unboxed messages
/// (~200 bytes each) per agent were a fifth of the server's memory per
/// agent.
pub(crate) type InQueue = mpsc::Receiver<Box<Incoming>>;

/// Messages queued for an agent, boxed for the same reason.
pub(crate) type OutQueue = mpsc::Sender<Box<ServerMsg>>;

/// Why the reader of an agent's channel stopped.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// A frame that does not decode.
    Malformed(String),
    /// The channel closed or failed.
    Closed(String),
}

/// What the transport established about the agent before its hello.
pub(crate) struct Arrival {
    pub conn_id: u64,
    /// The key the agent proved (TLS client certificate, or a signature).
    pub key: punch_protocol::signal::PublicKey,
    /// The value its token proof must be computed over, if the channel
    /// offers one.
    pub token_binding: Option<[u8; 32]>,
    pub observed: std::net::SocketAddr,
    pub transport: Transport,
    pub closer: Closer,
}

/// Messages queued per agent before it counts as too slow.
const AGENT_QUEUE: usize = 64;
/// Time an agent has to complete the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server looks for NAT rebinding of its agents.
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// The token bucket that bounds one agent's introductions, each of which
/// costs the target a punch (and probes) and the server a relay session.
pub use punch_protocol::budget::Bucket;

/// A slot for a query answered from a task of its own, or `None` (counted)
/// when the connection has its share in flight: waits and listings run
/// apart from the session, and unbounded they were a way to make the
/// server hold any number of tasks for one agent.
fn query_slot(slots: &Arc<Semaphore>, shared: &Shared) -> Option<OwnedSemaphorePermit> {
    let p = slots.clone().try_acquire_owned().ok();
    if p.is_none() {
        inc(&shared.metrics.queries_refused);
    }
    p
}

/// Runs `work` in a task of its own under one of the connection's query
/// slots and queues its answer, if it has one; false when every slot is
/// taken (the caller answers [`busy`]).
fn in_slot(
    slots: &Arc<Semaphore>,
    shared: &Shared,
    tx: &OutQueue,
    work: impl std::future::Future<Output = Option<ServerMsg>> + Send + 'static,
) -> bool {
    let Some(slot) = query_slot(slots, shared) else {
        return false;
    };
    let tx = tx.clone();
    tokio::spawn(
        async move {
            let _slot = slot;
            if let Some(answer) = work.await {
                let _ = tx.send(Box::new(answer)).await;
            }
        }
        .in_current_span(),
    );
    true
}

/// The answer to a query beyond the connection's share.
fn busy(req: u32, limit: usize) -> ServerMsg {
    ServerMsg::Error {
        req: Some(req),
        code: ErrorCode::RateLimited,
        message: format!("busy: {limit} queries already in flight on this connection"),
    }
}

/// Builds the QUIC endpoint on `socket`.
pub fn endpoint(
    identity: &Identity,
    config: &ServerConfig,
    socket: Arc<dyn quinn::AsyncUdpSocket>,
) -> Result<quinn::Endpoint, ServerError> {
    let mut server_cfg =
        punch_tls::server_config(identity, KeyVerifier::new(Expect::AnyKey), &[ALPN_SIGNAL])?;
    server_cfg.transport_config(Arc::new(punch_net::signal_transport(
        None,
        config.idle_timeout,
    )));
    let endpoint_cfg = punch_net::endpoint_config(identity.derive_secret("stateless-reset"));
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_cfg,
        Some(server_cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(ServerError::Endpoint)
}

/// A number for a new agent connection, unique across transports.
pub fn next_conn_id() -> u64 {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let conn_id = next_conn_id();
        let remote = canonical(incoming.remote_address());
        tokio::spawn(
            async move {
                inc(&shared.metrics.connections_accepted);
                let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        inc(&shared.metrics.handshake_failures);
                        debug!("handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        inc(&shared.metrics.handshake_failures);
                        debug!("handshake timed out");
                        return;
                    }
                };
                serve_agent(conn, conn_id, shared).await;
            }
            .instrument(info_span!("conn", conn_id, %remote)),
        );
    }
}

/// Sends an error, waits briefly for it to be delivered, and closes.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) {
    warn!(code = code.as_str(), "refusing agent: {message}");
    let _ = write_frame(
        send,
        &ServerMsg::Error {
            req: None,
            code,
            message: message.clone(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(error_close_code(code), message.as_bytes());
}

/// Application close codes: 0 is a normal close, errors are 0x100 + code.
pub fn error_close_code(code: ErrorCode) -> quinn::VarInt {
    let n: u32 = match code {
        ErrorCode::BadVersion => 1,
        ErrorCode::BadToken => 2,
        ErrorCode::IdTaken => 3,
        ErrorCode::BadRequest => 4,
        ErrorCode::UnknownWorker => 5,
        ErrorCode::WorkerOffline => 6,
        ErrorCode::SelfConnect => 7,
        ErrorCode::Malformed => 8,
        ErrorCode::RateLimited => 9,
        ErrorCode::Internal => 10,
        ErrorCode::Timeout => 11,
    };
    (0x100 + n).into()
}

/// Did the agent close the connection as it does when it shuts down?
fn shut_down(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(punch_protocol::close::DONE)
    )
}

async fn serve_agent(conn: quinn::Connection, conn_id: u64, shared: Arc<Shared>) {
    let Some(key) = punch_tls::peer_key(&conn) else {
        conn.close(error_close_code(ErrorCode::BadRequest), b"no client key");
        return;
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            debug!("no control stream");
            conn.close(
                error_close_code(ErrorCode::BadRequest),
                b"no control stream",
            );
            return;
        }
    };
    let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv, MAX_FRAME))
        .await
        .map(|r| {
            r.map_err(|e| match e {
                FrameError::Codec(c) => ReadEnd::Malformed(c.to_string()),
                e => ReadEnd::Closed(e.to_string()),
            })
        });
    let mut link = QuicLink {
        conn: &conn,
        send: &mut send,
    };
    let Some(hello) = expect_hello(&mut link, first, &shared).await else {
        return;
    };
    let mut exporter = [0u8; 32];
    let token_binding = conn
        .export_keying_material(&mut exporter, TOKEN_PROOF_LABEL, b"")
        .ok()
        .map(|_| exporter);
    let (in_tx, in_rx) = mpsc::channel::<Box<Incoming>>(16);
    // The reader runs as its own task so a slow peer write cannot stall it.
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame::<ClientMsg>(&mut recv, MAX_FRAME)
                .await
                .map_err(|e| match e {
                    FrameError::Codec(c) => ReadEnd::Malformed(c.to_string()),
                    e => ReadEnd::Closed(e.to_string()),
                });
            let stop = r.is_err();
            if in_tx.send(Box::new(r)).await.is_err() || stop {
                break;
            }
        }
    });
    let arrival = Arrival {
        conn_id,
        key,
        token_binding,
        observed: canonical(conn.remote_address()),
        transport: Transport::Udp,
        closer: Closer::Quic(conn.clone()),
    };
    serve_registered(link, arrival, hello, in_rx, shared).await;
    reader.abort();
}

/// Reads the first message, which must be a hello; refuses the agent
/// otherwise.
pub(crate) async fn expect_hello(
    link: &mut impl Link,
    first: Result<Incoming, tokio::time::error::Elapsed>,
    shared: &Arc<Shared>,
) -> Option<Hello> {
    match first {
        Ok(Ok(ClientMsg::Hello(h))) => Some(h),
        Ok(Ok(_)) => {
            inc(&shared.metrics.decode_errors);
            link.refuse(ErrorCode::BadRequest, "expected Hello first".into())
                .await;
            None
        }
        Ok(Err(ReadEnd::Malformed(e))) => {
            inc(&shared.metrics.decode_errors);
            link.refuse(ErrorCode::Malformed, format!("bad hello: {e}"))
                .await;
            None
        }
        Ok(Err(ReadEnd::Closed(e))) => {
            debug!("channel failed before hello: {e}");
            None
        }
        Err(_) => {
            link.refuse(ErrorCode::BadRequest, "no hello in time".into())
                .await;
            None
        }
    }
}

mod requests;
mod session;
pub(crate) use session::serve_registered;

#[cfg(test)]
mod tests {
    use super::Bucket;
    use std::time::{Duration, Instant};

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2, 3, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        // Half a second at 2/s: one more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(t1));
        assert!(!b.take(t1));
        // A long pause saves up no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(t2)));
        assert!(!b.take(t2));
        // Rate 0: no limit.
        let mut open = Bucket::new(0, 0, t0);
        assert!((0..1000).all(|_| open.take(t0)));
    }
}
