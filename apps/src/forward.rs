//! Port forwarding over a peer connection, like `ssh -L`: each local TCP
//! connection rides its own QUIC stream to the peer, which connects to the
//! target only when it is on its `--allow-forward` list (nothing is by
//! default). End-of-stream and errors propagate both ways: a half-closed
//! TCP side finishes the QUIC stream and the other way round.
//!
//! The serving side is [`Forward`], a protocol handler registered under
//! [`NAME`]; the asking side is [`open`] and [`pipe`].

use punch_agent::protocols::{accept, refuse, ProtocolHandler, ProtocolStream};
use punch_agent::{PeerConnection, PeerError};
use punch_protocol::peer::PeerRequest;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info};

/// Errors of a forward.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the peer refuses: {0}")]
    /// The peer refused (its reason).
    Refused(String),
    #[error("peer stream: {0}")]
    /// The peer stream failed.
    Stream(String),
}

/// The protocol name forward requests are served under.
pub const NAME: &str = punch_protocol::peer::FORWARD_PROTOCOL;

impl From<PeerError> for ForwardError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Refused(m) => ForwardError::Refused(m),
            e => ForwardError::Stream(e.to_string()),
        }
    }
}

/// Serves forward requests ([`NAME`]) to the TCP addresses on its allow
/// list; an empty list refuses them all.
#[derive(Clone, Debug, Default)]
pub struct Forward {
    allow: Arc<Vec<SocketAddr>>,
}

impl Forward {
    /// Forwards to exactly these addresses (`--allow-forward`).
    pub fn new(allow: Vec<SocketAddr>) -> Forward {
        Forward {
            allow: Arc::new(allow),
        }
    }
}

impl ProtocolHandler for Forward {
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let allow = self.allow.clone();
        Box::pin(async move {
            let ProtocolStream {
                mut send,
                recv,
                request,
                ..
            } = stream;
            match request {
                Some(PeerRequest::Forward { target, check_only }) => {
                    serve(send, recv, target, check_only, &allow).await
                }
                // A stream opened by name carries no request we know.
                _ => {
                    let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                }
            }
        })
    }
}

/// Opens a forward to `target` on the peer; with `check_only`, just asks
/// whether it is allowed.
pub async fn open(
    pc: &PeerConnection,
    target: &str,
    check_only: bool,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    let req = PeerRequest::Forward {
        target: target.to_string(),
        check_only,
    };
    Ok(pc.request(&req, false).await?)
}

/// Carries bytes between a TCP connection and a QUIC stream until both
/// directions have ended; returns the bytes sent each way.
pub async fn pipe(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (u64, u64) {
    let (mut tr, mut tw) = tcp.into_split();
    let up = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut n = 0u64;
        loop {
            match tr.read(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    break;
                }
                Ok(k) => {
                    if send.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                    n += k as u64;
                }
                Err(_) => {
                    let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                    break;
                }
            }
        }
        n
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut n = 0u64;
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(k)) => {
                    if tw.write_all(&buf[..k]).await.is_err() {
                        let _ = recv.stop(punch_protocol::close::STREAM_ERROR.into());
                        break;
                    }
                    n += k as u64;
                }
                Ok(None) => {
                    let _ = tw.shutdown().await;
                    break;
                }
                Err(_) => {
                    let _ = tw.shutdown().await;
                    break;
                }
            }
        }
        n
    };
    tokio::join!(up, down)
}

/// The serving side of a `Forward` request.
async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    target: String,
    check_only: bool,
    allow: &[SocketAddr],
) {
    let addr = match target.parse::<SocketAddr>() {
        Ok(a) if allow.contains(&a) => a,
        Ok(_) => {
            info!(%target, "forward refused: not on the allow list");
            let why = format!("{target} is not on its --allow-forward list");
            return refuse(&mut send, why).await;
        }
        Err(_) => return refuse(&mut send, format!("{target:?} is not an IP:PORT")).await,
    };
    if check_only {
        accept(&mut send).await;
        let _ = send.finish();
        return;
    }
    let connect = TcpStream::connect(addr);
    let tcp = match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return refuse(&mut send, format!("cannot connect to {addr}: {e}")).await,
        Err(_) => return refuse(&mut send, format!("connecting to {addr} timed out")).await,
    };
    let _ = tcp.set_nodelay(true);
    if !accept(&mut send).await {
        return;
    }
    let (up, down) = pipe(tcp, send, recv).await;
    debug!(%addr, from_peer = up, to_peer = down, "forwarded connection closed");
}
