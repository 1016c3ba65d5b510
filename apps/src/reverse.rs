//! Reverse port forwarding, like `ssh -R`: the peer listens on a TCP
//! address and every connection it accepts comes back to us, on a QUIC
//! stream the peer opens, and on to a local service. The peer listens only
//! on an address on its `--allow-reverse` list (none by default), and only
//! while our control stream is open.
//!
//! The listening side is [`Reverse`], a protocol handler registered under
//! [`NAME`]; the asking side opens the control stream with [`listen`] and
//! registers [`ReverseConn`] under [`CONN`] for the connections that come
//! back.

use crate::forward::{pipe, ForwardError};
use punch_agent::protocols::{accept, refuse, ProtocolHandler, ProtocolStream};
use punch_agent::{open_protocol_on, PeerConnection, PeerError};
use punch_net::{read_frame, write_frame};
use punch_protocol::peer::{PeerReply, MAX_PEER_HEADER};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// The control stream's protocol: the asker's [`ListenRequest`], the
/// peer's [`PeerReply`], then nothing until either side ends it.
pub const NAME: &str = "punch/reverse";
/// The protocol of the streams the listening peer opens back, one for
/// every TCP connection it accepted.
pub const CONN: &str = "punch/reverse-conn";
/// Most connections one reverse listener carries at once; more wait in
/// the listener's backlog.
pub const MAX_CONNS: usize = 256;

/// What the asker sends first on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenRequest {
    /// `IP:PORT` the peer is to listen on.
    pub listen: String,
}

/// Asks the peer to listen on `addr`: the control stream once it does.
/// The forward lasts while the stream does; [`closed`] waits for its end.
/// Its errors are a forward's, either way round.
pub async fn listen(
    pc: &PeerConnection,
    addr: SocketAddr,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    let (mut send, mut recv) = pc.open_protocol(NAME).await?;
    let req = ListenRequest {
        listen: addr.to_string(),
    };
    write_frame(&mut send, &req)
        .await
        .map_err(PeerError::from)?;
    let reply: PeerReply = read_frame(&mut recv, MAX_PEER_HEADER)
        .await
        .map_err(PeerError::from)?;
    if !reply.ok {
        return Err(ForwardError::Refused(reply.message));
    }
    Ok((send, recv))
}

/// Waits until the peer ends the control stream (it stopped listening,
/// or the connection is gone).
pub async fn closed(recv: &mut quinn::RecvStream) {
    let mut buf = [0u8; 64];
    while let Ok(Some(_)) = recv.read(&mut buf).await {}
}

/// Listens for the peers that ask, on the addresses of its allow list; an
/// empty list refuses them all.
#[derive(Clone, Debug, Default)]
pub struct Reverse {
    allow: Arc<Vec<SocketAddr>>,
}

impl Reverse {
    /// Listens on exactly these addresses (`--allow-reverse`).
    pub fn new(allow: Vec<SocketAddr>) -> Reverse {
        Reverse {
            allow: Arc::new(allow),
        }
    }
}

impl ProtocolHandler for Reverse {
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let allow = self.allow.clone();
        Box::pin(serve_listen(stream, allow))
    }
}

async fn serve_listen(stream: ProtocolStream, allow: Arc<Vec<SocketAddr>>) {
    let ProtocolStream {
        mut send,
        mut recv,
        connection,
        peer_id,
        ..
    } = stream;
    let req: ListenRequest = match read_frame(&mut recv, MAX_PEER_HEADER).await {
        Ok(r) => r,
        Err(e) => {
            debug!("bad reverse request: {e}");
            let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
            return;
        }
    };
    let addr = match req.listen.parse::<SocketAddr>() {
        Ok(a) if allow.contains(&a) => a,
        Ok(_) => {
            info!(listen = %req.listen, %peer_id, "reverse forward refused: not on the allow list");
            let why = format!("{} is not on its --allow-reverse list", req.listen);
            return refuse(&mut send, why).await;
        }
        Err(_) => {
            return refuse(&mut send, format!("{:?} is not an IP:PORT", req.listen)).await;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return refuse(&mut send, format!("cannot listen on {addr}: {e}")).await,
    };
    if !accept(&mut send).await {
        return;
    }
    info!(%addr, %peer_id, "reverse forward listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    loop {
        // A connection is accepted only when a slot is free: the rest
        // wait in the backlog instead of piling up here.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = closed(&mut recv) => break,
        };
        let (tcp, from) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    warn!(%addr, "accept failed: {e}");
                    continue;
                }
            },
            _ = closed(&mut recv) => break,
        };
        let _ = tcp.set_nodelay(true);
        let conn = connection.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match open_protocol_on(&conn, CONN).await {
                Ok((s, r)) => {
                    let (up, down) = pipe(tcp, s, r).await;
                    debug!(%from, up, down, "reverse connection closed");
                }
                Err(e) => debug!(%from, "reverse connection not carried: {e}"),
            }
        });
    }
    info!(%addr, %peer_id, "reverse forward closed");
    let _ = send.finish();
}

/// Carries the connections the peer `peer` sends back to `local`; streams
/// from any other peer are reset.
#[derive(Clone, Debug)]
pub struct ReverseConn {
    peer: Arc<str>,
    local: SocketAddr,
}

impl ReverseConn {
    /// Takes connections from `peer` to `local`.
    pub fn new(peer: &str, local: SocketAddr) -> ReverseConn {
        ReverseConn {
            peer: peer.into(),
            local,
        }
    }
}

impl ProtocolHandler for ReverseConn {
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let (peer, local) = (self.peer.clone(), self.local);
        Box::pin(async move {
            let ProtocolStream {
                mut send,
                recv,
                peer_id,
                ..
            } = stream;
            if *peer_id != *peer {
                warn!(%peer_id, "a reverse connection from a peer we did not ask; reset");
                let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                return;
            }
            let connect = TcpStream::connect(local);
            let tcp = match tokio::time::timeout(Duration::from_secs(10), connect).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    warn!(%local, "reverse connection: cannot connect: {e}");
                    let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                    return;
                }
                Err(_) => {
                    warn!(%local, "reverse connection: connecting timed out");
                    let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (up, down) = pipe(tcp, send, recv).await;
            debug!(%local, up, down, "reverse connection closed");
        })
    }
}
