//! Pipes over a peer connection, as `nc` or dumbpipe give: the asking side
//! joins its stdin and stdout (or any reader and writer) to one QUIC
//! stream, and the serving side joins the stream to what its
//! `--allow-pipe` names: a command's stdin and stdout, or a TCP or Unix
//! socket. Each direction ends on its own: an end of input on one side is
//! an end of input on the other (so `tar c . | punch-agent pipe B` ends
//! when tar does, and B's `tar x` sees the end).
//!
//! The serving side is [`Pipe`] under [`NAME`]; the asking side is
//! [`open`] and [`join`]. On the stream, the serving side's first frame
//! is a `PeerReply` (joined, or refused and why); then the bytes.

use punch_agent::protocols::{accept, refuse, ProtocolHandler, ProtocolStream};
use punch_agent::{PeerConnection, PeerError};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

/// The protocol name pipes are served under.
pub const NAME: &str = "punch/pipe";

/// What a pipe on the serving side is joined to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipeTarget {
    /// `sh -c COMMAND`, one process per pipe, its stdin and stdout.
    Command(String),
    /// `tcp:IP:PORT`.
    Tcp(SocketAddr),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for PipeTarget {
    type Err = String;

    /// `tcp:IP:PORT`, `unix:PATH`, or else a shell command.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            return a
                .parse()
                .map(PipeTarget::Tcp)
                .map_err(|_| format!("{a:?} is not an IP:PORT"));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(PipeTarget::Unix(p.into()));
        }
        if s.trim().is_empty() {
            return Err("an empty command".into());
        }
        Ok(PipeTarget::Command(s.to_string()))
    }
}

/// Errors of a pipe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipeError {
    /// The peer refused (its reason): it takes no pipes, or could not
    /// start what it joins them to.
    #[error("the peer refuses: {0}")]
    Refused(String),
    /// The peer stream failed.
    #[error("peer stream: {0}")]
    Stream(String),
}

impl From<PeerError> for PipeError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Refused(m) => PipeError::Refused(m),
            e => PipeError::Stream(e.to_string()),
        }
    }
}

/// Serves pipes to one target; without one it refuses them all, saying
/// why.
#[derive(Clone, Debug, Default)]
pub struct Pipe {
    target: Option<Arc<PipeTarget>>,
}

impl Pipe {
    /// Joins pipes to `target`; `None` refuses them.
    pub fn new(target: Option<PipeTarget>) -> Pipe {
        Pipe {
            target: target.map(Arc::new),
        }
    }
}

impl ProtocolHandler for Pipe {
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let target = self.target.clone();
        Box::pin(async move {
            let ProtocolStream {
                mut send,
                recv,
                peer_id,
                ..
            } = stream;
            let Some(target) = target else {
                info!(peer = %peer_id, "pipe refused: no --allow-pipe");
                return refuse(
                    &mut send,
                    "this worker takes no pipes (it runs without serve --allow-pipe)".into(),
                )
                .await;
            };
            serve(send, recv, &target, &peer_id).await;
        })
    }
}

async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    target: &PipeTarget,
    peer: &str,
) {
    match target {
        PipeTarget::Command(cmd) => {
            let child = tokio::process::Command::new("sh")
                .args(["-c", cmd])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    return refuse(&mut send, format!("cannot start the pipe's command: {e}")).await
                }
            };
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return refuse(
                    &mut send,
                    "the pipe's command has no stdin or stdout".into(),
                )
                .await;
            };
            if !accept(&mut send).await {
                return;
            }
            let (up, down) = join(stdout, stdin, send, recv).await;
            let status = child.wait().await;
            debug!(
                peer,
                from_peer = up,
                to_peer = down,
                ?status,
                "pipe to a command closed"
            );
        }
        PipeTarget::Tcp(addr) => match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => {
                if !accept(&mut send).await {
                    return;
                }
                let (r, w) = tcp.into_split();
                let (up, down) = join(r, w, send, recv).await;
                debug!(peer, %addr, from_peer = up, to_peer = down, "pipe to TCP closed");
            }
            Err(e) => refuse(&mut send, format!("cannot connect to {addr}: {e}")).await,
        },
        PipeTarget::Unix(path) => match tokio::net::UnixStream::connect(path).await {
            Ok(s) => {
                if !accept(&mut send).await {
                    return;
                }
                let (r, w) = s.into_split();
                let (up, down) = join(r, w, send, recv).await;
                debug!(peer, path = %path.display(), from_peer = up, to_peer = down, "pipe to a Unix socket closed");
            }
            Err(e) => {
                refuse(
                    &mut send,
                    format!("cannot connect to {}: {e}", path.display()),
                )
                .await
            }
        },
    }
}

/// Opens a pipe to the peer; [`PipeError::Refused`] with its reason when
/// it takes none. The agent accepts a named protocol's stream before its
/// handler runs, so the pipe's first frame is its own answer: joined, or
/// refused and why.
pub async fn open(
    pc: &PeerConnection,
) -> Result<(quinn::SendStream, quinn::RecvStream), PipeError> {
    let (send, mut recv) = pc.open_protocol(NAME).await?;
    let reply: punch_protocol::peer::PeerReply =
        punch_net::read_frame(&mut recv, punch_protocol::peer::MAX_PEER_HEADER)
            .await
            .map_err(|e| PipeError::Stream(format!("the pipe's answer: {e}")))?;
    if !reply.ok {
        return Err(PipeError::Refused(reply.message));
    }
    Ok((send, recv))
}

/// Joins `input` → the stream and the stream → `output` until both
/// directions have ended, each end passed on: the end of `input` finishes
/// the stream, the stream's end shuts `output` down. Returns the bytes
/// received and sent.
pub async fn join(
    input: impl AsyncRead + Unpin,
    output: impl AsyncWrite + Unpin,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (u64, u64) {
    let out = async {
        let mut input = input;
        let n = tokio::io::copy(&mut input, &mut send).await;
        match n {
            Ok(_) => {
                let _ = send.finish();
            }
            Err(_) => {
                let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
            }
        }
        n.unwrap_or(0)
    };
    let inn = async {
        // Owned here and dropped at the end: a child's stdin closes only
        // when dropped (its shutdown does not), and the command waits for
        // that end of input.
        let mut output = output;
        let n = tokio::io::copy(&mut recv, &mut output).await.unwrap_or(0);
        let _ = output.flush().await;
        let _ = output.shutdown().await;
        drop(output);
        n
    };
    let (sent, received) = tokio::join!(out, inn);
    (received, sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_their_kind() {
        assert_eq!(
            "tcp:127.0.0.1:22".parse(),
            Ok(PipeTarget::Tcp("127.0.0.1:22".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(PipeTarget::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "tar x -C /dst".parse(),
            Ok(PipeTarget::Command("tar x -C /dst".into()))
        );
        assert!("tcp:nowhere".parse::<PipeTarget>().is_err());
        assert!("unix:".parse::<PipeTarget>().is_err());
        assert!(" ".parse::<PipeTarget>().is_err());
    }
}
