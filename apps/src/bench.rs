//! Throughput over a peer connection (`punch-agent bench`): the asker
//! uploads into a sink for a while, then downloads from a source.
//!
//! The serving side is [`Bench`], a protocol handler registered under
//! [`NAME`]; the asking side is [`upload`] and [`download`].

use punch_agent::protocols::{ProtocolHandler, ProtocolStream};
use punch_agent::{PeerConnection, PeerError};
use punch_protocol::peer::{PeerRequest, MAX_SOURCE_MS};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// The protocol name throughput requests are served under.
pub const NAME: &str = punch_protocol::peer::BENCH_PROTOCOL;

/// What one write carries: large enough that the per-call cost stays
/// below the transport's.
const CHUNK: usize = 64 * 1024;

/// Serves throughput requests ([`NAME`]): counts what is uploaded, sends
/// for as long as asked (at most [`MAX_SOURCE_MS`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bench;

impl ProtocolHandler for Bench {
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let ProtocolStream {
                send,
                recv,
                request,
                ..
            } = stream;
            match request {
                Some(PeerRequest::Sink) => sink(send, recv).await,
                Some(PeerRequest::Source { millis }) => source(send, millis).await,
                // A stream opened by name carries no request we know.
                _ => {
                    let mut send = send;
                    let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                }
            }
        })
    }
}

/// Reads and discards until the asker finishes, then answers with the
/// byte count (8 bytes, big-endian).
async fn sink(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => total += n as u64,
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let _ = send.write_all(&total.to_be_bytes()).await;
    let _ = send.finish();
}

/// Sends for `millis` (at most [`MAX_SOURCE_MS`]), then finishes.
async fn source(mut send: quinn::SendStream, millis: u32) {
    let until = Instant::now() + Duration::from_millis(millis.min(MAX_SOURCE_MS) as u64);
    let chunk = bytes::Bytes::from(vec![0u8; CHUNK]);
    while Instant::now() < until {
        if send.write_chunk(chunk.clone()).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    // Keep the stream until the opener has read everything.
    let _ = send.stopped().await;
}

/// Sends bytes for `duration` on one stream and returns what the peer
/// counted and the time until its count came back.
pub async fn upload(pc: &PeerConnection, duration: Duration) -> Result<(u64, Duration), PeerError> {
    let (mut send, mut recv) = pc.open_request(&PeerRequest::Sink).await?;
    let chunk = bytes::Bytes::from(vec![0u8; CHUNK]);
    let start = Instant::now();
    while start.elapsed() < duration {
        send.write_chunk(chunk.clone()).await?;
    }
    let _ = send.finish();
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    Ok((u64::from_be_bytes(count), start.elapsed()))
}

/// Asks the peer to send for `duration` (at most [`MAX_SOURCE_MS`]) and
/// returns the bytes received and the time they took.
pub async fn download(
    pc: &PeerConnection,
    duration: Duration,
) -> Result<(u64, Duration), PeerError> {
    let millis = duration.as_millis().min(MAX_SOURCE_MS as u128) as u32;
    let (mut send, mut recv) = pc.open_request(&PeerRequest::Source { millis }).await?;
    let _ = send.finish();
    let start = Instant::now();
    let mut total = 0u64;
    while let Some(chunk) = recv
        .read_chunk(usize::MAX, true)
        .await
        .map_err(|e| PeerError::Read(quinn::ReadExactError::ReadError(e)))?
    {
        total += chunk.bytes.len() as u64;
    }
    Ok((total, start.elapsed()))
}
