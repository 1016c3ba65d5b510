//! Port forwarding over a peer connection, like `ssh -L`: each local TCP
//! connection rides its own QUIC stream to the peer, which connects to the
//! target only when it is on its `--allow-forward` list (nothing is by
//! default). End-of-stream and errors propagate both ways: a half-closed
//! TCP side finishes the QUIC stream and the other way round.

use crate::peer::PeerConnection;
use punch_net::{read_frame, write_frame};
use punch_protocol::peer::{PeerReply, PeerRequest, MAX_PEER_HEADER};
use std::net::SocketAddr;
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

fn stream_err(e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Stream(e.to_string())
}

/// Opens a forward to `target` on the peer; with `check_only`, just asks
/// whether it is allowed.
pub async fn open(
    pc: &PeerConnection,
    target: &str,
    check_only: bool,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    let (mut send, mut recv) = pc.conn.open_bi().await.map_err(stream_err)?;
    let req = PeerRequest::Forward {
        target: target.to_string(),
        check_only,
    };
    write_frame(&mut send, &req).await.map_err(stream_err)?;
    let reply: PeerReply = read_frame(&mut recv, MAX_PEER_HEADER)
        .await
        .map_err(stream_err)?;
    if !reply.ok {
        return Err(ForwardError::Refused(reply.message));
    }
    Ok((send, recv))
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
                    let _ = send.reset(1u32.into());
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
                        let _ = recv.stop(1u32.into());
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
pub(crate) async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    target: String,
    check_only: bool,
    allow: &[SocketAddr],
) {
    let refuse = |message: String| PeerReply { ok: false, message };
    let addr = match target.parse::<SocketAddr>() {
        Ok(a) if allow.contains(&a) => a,
        Ok(_) => {
            info!(%target, "forward refused: not on the allow list");
            let r = refuse(format!("{target} is not on its --allow-forward list"));
            let _ = write_frame(&mut send, &r).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let r = refuse(format!("{target:?} is not an IP:PORT"));
            let _ = write_frame(&mut send, &r).await;
            let _ = send.finish();
            return;
        }
    };
    if check_only {
        let ok = PeerReply {
            ok: true,
            message: String::new(),
        };
        let _ = write_frame(&mut send, &ok).await;
        let _ = send.finish();
        return;
    }
    let tcp =
        match tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(addr))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let _ =
                    write_frame(&mut send, &refuse(format!("cannot connect to {addr}: {e}"))).await;
                let _ = send.finish();
                return;
            }
            Err(_) => {
                let _ = write_frame(
                    &mut send,
                    &refuse(format!("connecting to {addr} timed out")),
                )
                .await;
                let _ = send.finish();
                return;
            }
        };
    let _ = tcp.set_nodelay(true);
    let ok = PeerReply {
        ok: true,
        message: String::new(),
    };
    if write_frame(&mut send, &ok).await.is_err() {
        return;
    }
    let (up, down) = pipe(tcp, send, recv).await;
    debug!(%addr, from_peer = up, to_peer = down, "forwarded connection closed");
}
