//! The sharing side: the [`Files`] protocol handler and its answers to
//! listing and download requests.

use super::outboard::Tree;
use super::share::{Share, LIST_HASH_BUDGET};
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::encode_ranges;
use bao_tree::{ChunkNum, ChunkRanges};
use bytes::Bytes;
use punch_agent::protocols::{accept, refuse, ProtocolHandler, ProtocolStream};
use punch_net::write_frame;
use punch_protocol::peer::{
    FileEntry, FileHeader, FileList, FileListPage, PeerRequest, VerifiedHeader, BAO_BLOCK_LOG,
    BAO_GROUP, MAX_FILE_LIST_PAGE,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

/// Serves file requests ([`super::NAME`]) from a share, or refuses them
/// with a message that says how to share when there is none.
#[derive(Clone, Debug, Default)]
pub struct Files {
    share: Option<Arc<Share>>,
}

impl Files {
    /// Serves `share`; `None` refuses every request, saying this agent
    /// shares nothing.
    pub fn new(share: Option<Share>) -> Files {
        Files {
            share: share.map(Arc::new),
        }
    }
}

impl ProtocolHandler for Files {
    fn handle(&self, stream: ProtocolStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let share = self.share.clone();
        Box::pin(async move {
            let ProtocolStream {
                mut send, request, ..
            } = stream;
            match request {
                Some(PeerRequest::ListFiles) => serve_list(send, share).await,
                Some(PeerRequest::ListFilesPaged) => serve_list_paged(send, share).await,
                Some(PeerRequest::GetFile { name, offset }) => {
                    serve_get(send, share, name, offset).await
                }
                Some(PeerRequest::GetVerified { name, offset }) => {
                    serve_verified(send, share, name, Some(offset)).await
                }
                Some(PeerRequest::GetOutboard { name }) => {
                    serve_verified(send, share, name, None).await
                }
                // A stream opened by name carries no request we know.
                _ => {
                    let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                }
            }
        })
    }
}

/// The share a file request is served from; refuses the request (and
/// ends our side) when this agent shares nothing.
async fn shared(send: &mut quinn::SendStream, share: Option<Arc<Share>>) -> Option<Arc<Share>> {
    if share.is_none() {
        refuse(send, "it shares no directory (serve --share DIR)".into()).await;
    }
    share
}

/// The serving side of `ListFiles` (agents before paged listings): one
/// frame, so a share too large for it is refused with a message that says
/// why, not cut off.
async fn serve_list(mut send: quinn::SendStream, share: Option<Arc<Share>>) {
    let Some(share) = shared(&mut send, share).await else {
        return;
    };
    let Ok(listed) = tokio::task::spawn_blocking(move || share.list()).await else {
        return refuse(&mut send, "listing failed".into()).await;
    };
    let encoded = listed.and_then(|files| {
        let n = files.len();
        punch_protocol::codec::encode_frame(&FileList { files }).map_err(|_| n)
    });
    let frame = match encoded {
        Ok(f) => f,
        Err(n) => {
            warn!(files = n, "a one-frame file list does not fit; refused");
            return refuse(
                &mut send,
                format!(
                    "the share lists {n} files, more than an agent this old can read; \
                     upgrade the asking agent"
                ),
            )
            .await;
        }
    };
    if accept(&mut send).await {
        let _ = send.write_all(&frame).await;
    }
    let _ = send.finish();
}

/// Longest names plus hash in one page, by our count of bytes; postcard
/// adds a few bytes an entry, so pages stay well under a frame.
const PAGE_BYTES: usize = MAX_FILE_LIST_PAGE / 2;

/// Splits a listing into pages of at most [`PAGE_BYTES`] of names and
/// hashes; the last one carries the problems. Never empty.
fn pages(files: Vec<FileEntry>, problems: Vec<String>) -> Vec<FileListPage> {
    let mut out = Vec::new();
    let mut page = Vec::new();
    let mut bytes = 0usize;
    for f in files {
        let len = f.name.len() + f.blake3.len() + 16;
        if bytes + len > PAGE_BYTES && !page.is_empty() {
            out.push(FileListPage {
                files: std::mem::take(&mut page),
                more: true,
                problems: Vec::new(),
            });
            bytes = 0;
        }
        bytes += len;
        page.push(f);
    }
    out.push(FileListPage {
        files: page,
        more: false,
        problems,
    });
    out
}

/// The serving side of `ListFilesPaged`: answers within about
/// [`LIST_HASH_BUDGET`] of walking the share, then hashes the rest in the
/// background so the next listing has them.
async fn serve_list_paged(mut send: quinn::SendStream, share: Option<Arc<Share>>) {
    let Some(share) = shared(&mut send, share).await else {
        return;
    };
    let s2 = share.clone();
    let Ok((files, problems, unhashed)) =
        tokio::task::spawn_blocking(move || s2.listing(LIST_HASH_BUDGET)).await
    else {
        return refuse(&mut send, "listing failed".into()).await;
    };
    for p in &problems {
        warn!("share listing: {p}");
    }
    if unhashed {
        tokio::task::spawn_blocking(move || share.warm());
    }
    let n = files.len();
    if !accept(&mut send).await {
        return;
    }
    for page in pages(files, problems) {
        if let Err(e) = write_frame(&mut send, &page).await {
            // A page that does not encode is our bug; say so on both ends.
            warn!(files = n, "file list page not sent: {e}");
            let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
            return;
        }
    }
    let _ = send.finish();
    debug!(files = n, unhashed, "file list sent");
}

/// The shared file `name` and its hash tree, or the request refused with
/// the reason (and our side ended). Resolving (canonicalize, stat) and
/// hashing touch the disk: both off the runtime's threads.
async fn resolve(
    send: &mut quinn::SendStream,
    share: Option<Arc<Share>>,
    name: &str,
) -> Option<(std::path::PathBuf, Tree)> {
    let share = shared(send, share).await?;
    let n2 = name.to_string();
    let found = tokio::task::spawn_blocking(move || {
        let path = share.resolve(&n2).map_err(|e| (true, e))?;
        let tree = share
            .tree(&path)
            .map_err(|e| (false, format!("cannot read {n2:?}: {e}")))?;
        Ok::<_, (bool, String)>((path, tree))
    })
    .await;
    match found {
        Ok(Ok(x)) => Some(x),
        Ok(Err((refused, e))) => {
            if refused {
                info!(%name, "file request refused: {e}");
            }
            refuse(send, e).await;
            None
        }
        Err(e) => {
            refuse(send, format!("cannot read {name:?}: {e}")).await;
            None
        }
    }
}

/// The serving side of `GetVerified` (with the offset) and `GetOutboard`
/// (without): the file's hash tree is made, or taken from the cache,
/// before the answer, so the header's root is the one every group is
/// checked against.
async fn serve_verified(
    mut send: quinn::SendStream,
    share: Option<Arc<Share>>,
    name: String,
    offset: Option<u64>,
) {
    let Some((path, tree)) = resolve(&mut send, share, &name).await else {
        return;
    };
    if let Some(offset) = offset {
        if offset > tree.size || (offset % BAO_GROUP != 0 && offset != tree.size) {
            return refuse(
                &mut send,
                format!(
                    "offset {offset} is past the end ({}) or not a multiple of {BAO_GROUP}",
                    tree.size
                ),
            )
            .await;
        }
    }
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return refuse(&mut send, format!("cannot open {name:?}: {e}")).await,
    };
    let header = VerifiedHeader {
        size: tree.size,
        blake3: tree.root.to_hex().to_string(),
        block_log: BAO_BLOCK_LOG,
    };
    if !accept(&mut send).await || write_frame(&mut send, &header).await.is_err() {
        return;
    }
    let Some(offset) = offset else {
        if send.write_all(&tree.outboard).await.is_ok() {
            let _ = send.finish();
            let _ = send.stopped().await;
            debug!(%name, bytes = tree.outboard.len(), "outboard sent");
        }
        return;
    };
    let ranges = ChunkRanges::from(ChunkNum(offset / 1024)..);
    // Encoded on a blocking thread (plain reads of the file) into chunks
    // of ENCODED_CHUNK, written to the stream as they come: per-group
    // async reads and writes cost the sharer a core at ~150 MB/s.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let encoder = tokio::task::spawn_blocking(move || {
        let ob = PreOrderOutboard {
            root: tree.root,
            tree: tree.tree(),
            data: &tree.outboard[..],
        };
        let mut out = Chunked {
            buf: Vec::with_capacity(ENCODED_CHUNK),
            tx,
        };
        // Not validated here: the asker checks every group, and a file
        // that rots on our disk is what its check is for.
        encode_ranges(&file, ob, &ranges, &mut out)?;
        out.send()
    });
    let mut sent = true;
    while let Some(chunk) = rx.recv().await {
        if send.write_chunk(chunk).await.is_err() {
            sent = false;
            break;
        }
    }
    drop(rx);
    match encoder.await {
        Ok(Ok(())) if sent => {
            let _ = send.finish();
            let _ = send.stopped().await;
            debug!(%name, offset, "verified stream sent");
        }
        Ok(Ok(())) => debug!(%name, offset, "the asker stopped the verified stream"),
        Ok(Err(e)) => {
            debug!(%name, offset, "verified stream failed: {e}");
            let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
        }
        Err(e) => {
            warn!(%name, "verified stream encoder panicked: {e}");
            let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
        }
    }
}

/// Bytes of encoded stream handed to the async side at a time.
const ENCODED_CHUNK: usize = 256 * 1024;

/// A `Write` that hands full chunks to the stream writer; fails once the
/// writer is gone (the asker stopped), which ends the encoding.
struct Chunked {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl Chunked {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(ENCODED_CHUNK));
        self.tx
            .blocking_send(Bytes::from(full))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for Chunked {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= ENCODED_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// The serving side of `GetFile`.
async fn serve_get(
    mut send: quinn::SendStream,
    share: Option<Arc<Share>>,
    name: String,
    offset: u64,
) {
    let Some((path, tree)) = resolve(&mut send, share, &name).await else {
        return;
    };
    let (size, blake3) = (tree.size, tree.root.to_hex().to_string());
    if offset > size {
        return refuse(
            &mut send,
            format!("offset {offset} is past the end ({size})"),
        )
        .await;
    }
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return refuse(&mut send, format!("cannot open {name:?}: {e}")).await,
    };
    if !accept(&mut send).await
        || write_frame(&mut send, &FileHeader { size, blake3 })
            .await
            .is_err()
    {
        return;
    }
    if offset > 0
        && tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(offset))
            .await
            .is_err()
    {
        let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        match f.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
            }
            Err(_) => {
                let _ = send.reset(punch_protocol::close::STREAM_ERROR.into());
                return;
            }
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    debug!(%name, offset, sent, "file sent");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_large_share_lists_in_pages_without_hashing_first() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..3000 {
            let sub = d.path().join(format!("d{}", i % 7));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join(format!("file-{i:05}.txt")), i.to_string()).unwrap();
        }
        let s = Share::new(d.path()).unwrap();
        // Too many for one frame: the old request is refused up front.
        assert_eq!(s.list().unwrap_err(), 3000);
        // No hashing budget: nothing hashed, everything listed.
        let (files, problems, unhashed) = s.listing(Duration::ZERO);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(unhashed);
        assert_eq!(files.len(), 3000);
        assert!(files.iter().all(|f| f.blake3.is_empty()));
        assert!(files.windows(2).all(|w| w[0].name < w[1].name));
        let pages = pages(files.clone(), vec!["p".into()]);
        assert!(pages.len() > 1);
        let mut back = Vec::new();
        for (i, p) in pages.iter().enumerate() {
            let frame = punch_protocol::codec::encode_frame(p).expect("a page fits a frame");
            assert!(frame.len() <= MAX_FILE_LIST_PAGE);
            assert_eq!(p.more, i + 1 < pages.len());
            assert_eq!(p.problems.is_empty(), p.more);
            back.extend(p.files.iter().cloned());
        }
        assert_eq!(back, files);
        // After warming, the listing has every hash at once.
        s.warm();
        let (files, _, unhashed) = s.listing(Duration::ZERO);
        assert!(!unhashed);
        assert_eq!(
            files[0].blake3,
            blake3::hash(b"0").to_hex().to_string(),
            "{}",
            files[0].name
        );
        assert!(files.iter().all(|f| f.blake3.len() == 64));
    }
}
