//! The asking side: listing a peer's share and downloading from it.

use super::{check_name, clip_problem, stream_err, FileError};
use punch_agent::{PeerConnection, PeerError};
use punch_net::read_frame;
use punch_protocol::peer::{
    FileEntry, FileHeader, FileList, FileListPage, PeerRequest, MAX_FILES, MAX_FILE_LIST_FRAME,
    MAX_FILE_LIST_PAGE, MAX_LIST_PROBLEMS, MAX_PEER_HEADER,
};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use tracing::debug;

/// The peer's shared files, and what the sharer could not list. A file
/// with an empty [`FileEntry::blake3`] was not hashed yet; `get` verifies
/// it all the same.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// By name.
    pub files: Vec<FileEntry>,
    /// The sharer's own words on what it left out (unreadable
    /// directories, more than [`MAX_FILES`] files).
    pub problems: Vec<String>,
}

/// Lists the peer's shared files, in pages; a peer older than paged
/// listings is asked the old way.
pub async fn list(pc: &PeerConnection) -> Result<Listing, FileError> {
    let (_send, mut recv) = match pc.request(&PeerRequest::ListFilesPaged, true).await {
        Ok(s) => s,
        Err(PeerError::Refused(m)) => return Err(FileError::Refused(m)),
        // An older agent cannot read the request and resets the stream.
        Err(m) => {
            debug!("paged listing failed ({m}); asking the old way");
            return list_one_frame(pc).await;
        }
    };
    let mut out = Listing::default();
    // Every page but the last holds a file: a peer cannot keep us reading.
    for _ in 0..=MAX_FILES {
        let page: FileListPage = read_frame(&mut recv, MAX_FILE_LIST_PAGE)
            .await
            .map_err(|e| match e {
                punch_net::FrameError::Closed => {
                    FileError::Stream("the sharer ended the list early".into())
                }
                e => stream_err(e),
            })?;
        if page.more && page.files.is_empty() {
            return Err(FileError::Stream("the sharer sent an empty page".into()));
        }
        if out.files.len() + page.files.len() > MAX_FILES {
            return Err(FileError::Stream(format!(
                "the sharer listed more than {MAX_FILES} files"
            )));
        }
        out.files.extend(page.files);
        if !page.more {
            out.problems = page
                .problems
                .into_iter()
                .take(MAX_LIST_PROBLEMS)
                .map(clip_problem)
                .collect();
            return Ok(out);
        }
    }
    Err(FileError::Stream("the sharer sent too many pages".into()))
}

async fn list_one_frame(pc: &PeerConnection) -> Result<Listing, FileError> {
    let (_send, mut recv) = pc.request(&PeerRequest::ListFiles, true).await?;
    let list: FileList = read_frame(&mut recv, MAX_FILE_LIST_FRAME)
        .await
        .map_err(stream_err)?;
    Ok(Listing {
        files: list.files,
        problems: Vec::new(),
    })
}

/// Progress of a download: (bytes so far including the resumed part,
/// total size).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Downloads `name` to `out` through `out.part`, resuming a partial
/// download; returns (size, bytes resumed from, BLAKE3).
pub async fn get(
    pc: &PeerConnection,
    name: &str,
    out: &Path,
    progress: Progress<'_>,
) -> Result<(u64, u64, String), FileError> {
    check_name(name).map_err(FileError::Io)?;
    let part = part_path(out);
    let mut offset = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let req = PeerRequest::GetFile {
        name: name.to_string(),
        offset,
    };
    let (_send, mut recv) = match pc.request(&req, true).await {
        Ok(s) => s,
        Err(PeerError::Refused(m)) if offset > 0 && m.contains("past the end") => {
            // The partial file is longer than the file now: start over.
            let _ = tokio::fs::remove_file(&part).await;
            return Err(FileError::Refused(m));
        }
        Err(e) => return Err(e.into()),
    };
    let header: FileHeader = read_frame(&mut recv, MAX_PEER_HEADER)
        .await
        .map_err(stream_err)?;
    let io = |e: std::io::Error| FileError::Io(format!("{}: {e}", part.display()));
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .await
        .map_err(io)?;
    let resumed = offset;
    progress(offset, header.size);
    while let Some(chunk) = recv
        .read_chunk(256 * 1024, true)
        .await
        .map_err(stream_err)?
    {
        offset += chunk.bytes.len() as u64;
        if offset > header.size {
            return Err(FileError::Stream(
                "the peer sent more than the file's size".into(),
            ));
        }
        f.write_all(&chunk.bytes).await.map_err(io)?;
        progress(offset, header.size);
    }
    f.flush().await.map_err(io)?;
    drop(f);
    if offset != header.size {
        return Err(FileError::Stream(format!(
            "stream ended at {offset} of {} bytes; run again to resume",
            header.size
        )));
    }
    let p2 = part.clone();
    let got = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&p2)?)?;
        Ok(h.finalize().to_hex().to_string())
    })
    .await
    .map_err(|e| FileError::Io(e.to_string()))?
    .map_err(io)?;
    if got != header.blake3 {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(FileError::HashMismatch {
            got,
            want: header.blake3,
        });
    }
    tokio::fs::rename(&part, out).await.map_err(io)?;
    Ok((header.size, resumed, got))
}

/// Where a download to `out` is kept until verified.
pub fn part_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(".part");
    PathBuf::from(s)
}
