//! The asking side: listing a peer's share and downloading from it.

use super::outboard::BLOCK;
use super::{check_name, clip_problem, hash_file, stream_err, FileError};
use bao_tree::io::fsm::{ResponseDecoder, ResponseDecoderNext};
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::valid_ranges;
use bao_tree::io::{BaoContentItem, DecodeError};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use iroh_io::TokioStreamReader;
use punch_agent::{PeerConnection, PeerError};
use punch_net::read_frame;
use punch_protocol::peer::{
    FileEntry, FileHeader, FileList, FileListPage, PeerRequest, VerifiedHeader, BAO_BLOCK_LOG,
    BAO_GROUP, MAX_FILES, MAX_FILE_LIST_FRAME, MAX_FILE_LIST_PAGE, MAX_LIST_PROBLEMS,
    MAX_PEER_HEADER,
};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// What a download did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The file's size.
    pub size: u64,
    /// Verified bytes of the partial file kept (not fetched again).
    pub resumed: u64,
    /// The file's BLAKE3, hex.
    pub blake3: String,
    /// Where the partial file stopped matching the file's hash tree, when
    /// it did before its end: fetched again from there.
    pub corrupt_from: Option<u64>,
    /// Every group was checked as it arrived (a sharer older than verified
    /// streams only has the whole file's hash checked at the end).
    pub streamed_verified: bool,
}

/// Downloads `name` to `out` through `out.part`, checking every 16 KiB
/// group against the file's BLAKE3 tree as it arrives; a partial file is
/// first checked against the sharer's tree, kept up to its first bad
/// group and fetched from there. `expect` is the BLAKE3 the caller knows
/// (from a listing): a sharer that announces another is refused.
pub async fn get(
    pc: &PeerConnection,
    name: &str,
    out: &Path,
    expect: Option<&str>,
    progress: Progress<'_>,
) -> Result<Fetched, FileError> {
    check_name(name).map_err(FileError::Io)?;
    let part = part_path(out);
    let io = |e: std::io::Error| FileError::Io(format!("{}: {e}", part.display()));
    let have = match tokio::fs::metadata(&part).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(e)),
    };
    let mut want = match expect.filter(|h| !h.is_empty()) {
        Some(h) => Some(parse_root(h)?),
        None => None,
    };
    let (mut offset, mut corrupt_from) = (0, None);
    if have > 0 {
        match check_part(pc, name, &part, have).await {
            Ok(Checked::Old) => return get_whole(pc, name, out, progress).await,
            Ok(Checked::Good { root, good, size }) => {
                same_root(&mut want, root)?;
                offset = good;
                if good == size {
                    // Complete and verified (stopped before the rename);
                    // bytes past the end are not the file's.
                    if have > size {
                        let f = tokio::fs::OpenOptions::new()
                            .write(true)
                            .open(&part)
                            .await
                            .map_err(io)?;
                        f.set_len(size).await.map_err(io)?;
                    }
                    tokio::fs::rename(&part, out).await.map_err(io)?;
                    return Ok(Fetched {
                        size,
                        resumed: size,
                        blake3: root.to_hex().to_string(),
                        corrupt_from: None,
                        streamed_verified: true,
                    });
                }
                if good < have - have % BAO_GROUP {
                    debug!(%name, good, have, "partial file corrupt");
                    corrupt_from = Some(good);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let req = PeerRequest::GetVerified {
        name: name.to_string(),
        offset,
    };
    let (_send, mut recv) = match pc.request(&req, true).await {
        Ok(s) => s,
        Err(PeerError::Refused(m)) => return Err(FileError::Refused(m)),
        Err(e) if offset == 0 => {
            debug!("verified get failed ({e}); asking the old way");
            return get_whole(pc, name, out, progress).await;
        }
        Err(e) => return Err(e.into()),
    };
    let header: VerifiedHeader = read_frame(&mut recv, MAX_PEER_HEADER)
        .await
        .map_err(stream_err)?;
    let root = check_header(&header)?;
    same_root(&mut want, root)?;
    if offset > header.size {
        return Err(FileError::Stream(format!(
            "the sharer's file shrank to {} bytes",
            header.size
        )));
    }
    let f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&part)
        .await
        .map_err(io)?;
    // Keep what was verified, drop the rest (a bad or partial group).
    f.set_len(offset).await.map_err(io)?;
    let mut f = tokio::io::BufWriter::with_capacity(1 << 20, f);
    tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(offset))
        .await
        .map_err(io)?;
    let resumed = offset;
    progress(offset, header.size);
    let tree = BaoTree::new(header.size, BLOCK);
    let ranges = ChunkRanges::from(ChunkNum(offset / 1024)..);
    // Read from the stream in large pieces, not a group at a time.
    let recv = tokio::io::BufReader::with_capacity(256 * 1024, recv);
    let mut dec = ResponseDecoder::new(root, ranges, tree, TokioStreamReader(recv));
    let failed = loop {
        match dec.next().await {
            ResponseDecoderNext::Done(_) => break None,
            ResponseDecoderNext::More((next, item)) => {
                dec = next;
                match item {
                    Ok(BaoContentItem::Leaf(leaf)) => {
                        if leaf.offset != offset {
                            break Some(FileError::Stream(
                                "the sharer sent groups out of order".into(),
                            ));
                        }
                        f.write_all(&leaf.data).await.map_err(io)?;
                        offset += leaf.data.len() as u64;
                        progress(offset, header.size);
                    }
                    Ok(BaoContentItem::Parent(_)) => {}
                    Err(e) => break Some(decode_error(e, offset, &header)),
                }
            }
        }
    };
    // Whatever was written is verified: keep it for a resume.
    f.flush().await.map_err(io)?;
    drop(f);
    if let Some(e) = failed {
        return Err(e);
    }
    if offset != header.size {
        return Err(FileError::Stream(format!(
            "stream ended at {offset} of {} bytes; run again to resume",
            header.size
        )));
    }
    tokio::fs::rename(&part, out).await.map_err(io)?;
    Ok(Fetched {
        size: header.size,
        resumed,
        blake3: header.blake3,
        corrupt_from,
        streamed_verified: true,
    })
}

fn parse_root(h: &str) -> Result<blake3::Hash, FileError> {
    blake3::Hash::from_hex(h).map_err(|_| FileError::Stream(format!("{h:?} is not a BLAKE3 hash")))
}

/// The root a header announces, when it is well formed.
fn check_header(h: &VerifiedHeader) -> Result<blake3::Hash, FileError> {
    if h.block_log != BAO_BLOCK_LOG {
        return Err(FileError::Stream(format!(
            "the sharer uses chunk groups of 2^{} KiB, not 2^{BAO_BLOCK_LOG}",
            h.block_log
        )));
    }
    parse_root(&h.blake3)
}

/// Holds the root seen first; any other later is the file changing.
fn same_root(want: &mut Option<blake3::Hash>, got: blake3::Hash) -> Result<(), FileError> {
    match want {
        Some(w) if *w != got => Err(FileError::Changed {
            want: w.to_hex().to_string(),
            got: got.to_hex().to_string(),
        }),
        _ => {
            *want = Some(got);
            Ok(())
        }
    }
}

fn decode_error(e: DecodeError, kept: u64, header: &VerifiedHeader) -> FileError {
    match e {
        DecodeError::LeafHashMismatch(chunk) => FileError::Corrupt {
            at: chunk.to_bytes(),
            kept,
            blake3: header.blake3.clone(),
        },
        DecodeError::ParentHashMismatch(_) => FileError::Corrupt {
            at: kept,
            kept,
            blake3: header.blake3.clone(),
        },
        DecodeError::LeafNotFound(_) | DecodeError::ParentNotFound(_) => {
            FileError::Stream(format!(
                "stream ended at {kept} of {} bytes; run again to resume",
                header.size
            ))
        }
        DecodeError::Io(e) => FileError::Stream(format!(
            "{e}, at {kept} of {} bytes; run again to resume",
            header.size
        )),
    }
}

/// Largest hash tree fetched to check a partial file (that of a 256 GiB
/// file).
const MAX_OUTBOARD: u64 = 1 << 30;

enum Checked {
    /// The sharer predates verified streams.
    Old,
    /// The partial file matches the tree with this root, of a file of
    /// `size` bytes, up to `good`.
    Good {
        root: blake3::Hash,
        good: u64,
        size: u64,
    },
}

/// Checks the `have` bytes of `part` against the sharer's hash tree of
/// `name`, before any byte of the file is fetched.
async fn check_part(
    pc: &PeerConnection,
    name: &str,
    part: &Path,
    have: u64,
) -> Result<Checked, FileError> {
    let req = PeerRequest::GetOutboard {
        name: name.to_string(),
    };
    let (_send, mut recv) = match pc.request(&req, true).await {
        Ok(s) => s,
        Err(PeerError::Refused(m)) => return Err(FileError::Refused(m)),
        Err(e) => {
            debug!("outboard request failed ({e}); asking the old way");
            return Ok(Checked::Old);
        }
    };
    let header: VerifiedHeader = read_frame(&mut recv, MAX_PEER_HEADER)
        .await
        .map_err(stream_err)?;
    let root = check_header(&header)?;
    let tree = BaoTree::new(header.size, BLOCK);
    let len = tree.outboard_size();
    // The size is the sharer's word: bound what it can make us write.
    if len > MAX_OUTBOARD {
        return Err(FileError::Stream(format!(
            "the sharer says the file is {} bytes; resuming files over {} GiB is not supported \
             (remove the partial file to fetch it whole)",
            header.size,
            ((MAX_OUTBOARD / 64) * BAO_GROUP) >> 30
        )));
    }
    let mut ob_path = part.as_os_str().to_os_string();
    ob_path.push(".obao");
    let ob_path = PathBuf::from(ob_path);
    let io = |e: std::io::Error| FileError::Io(format!("{}: {e}", ob_path.display()));
    let mut ob_file = tokio::fs::File::create(&ob_path).await.map_err(io)?;
    // The tree is at most 0.4 % of the file: on disk, not in memory.
    let got = tokio::io::copy(&mut (&mut recv).take(len + 1), &mut ob_file)
        .await
        .map_err(stream_err);
    let flushed = ob_file.flush().await.map_err(io);
    drop(ob_file);
    let checked = match (got, flushed) {
        (Ok(n), Ok(())) if n == len => {
            let (part, ob) = (part.to_path_buf(), ob_path.clone());
            tokio::task::spawn_blocking(move || good_prefix(&part, &ob, root, header.size, have))
                .await
                .map_err(|e| FileError::Io(e.to_string()))
                .and_then(|r| {
                    r.map_err(|e| FileError::Io(format!("checking the partial file: {e}")))
                })
        }
        (Ok(n), Ok(())) => Err(FileError::Stream(format!(
            "the sharer sent {n} bytes of hash tree, not {len}"
        ))),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let _ = tokio::fs::remove_file(&ob_path).await;
    Ok(Checked::Good {
        root,
        good: checked?,
        size: header.size,
    })
}

/// How many bytes from the start of `part` match the tree (blocking):
/// whole groups only, or the whole file when complete.
fn good_prefix(
    part: &Path,
    ob: &Path,
    root: blake3::Hash,
    size: u64,
    have: u64,
) -> std::io::Result<u64> {
    let have = have.min(size);
    let tree = BaoTree::new(size, BLOCK);
    let end = if have == size {
        tree.chunks()
    } else {
        ChunkNum(have / BAO_GROUP * (BAO_GROUP / 1024))
    };
    if end.0 == 0 {
        return Ok(0);
    }
    let outboard = PreOrderOutboard {
        root,
        tree,
        data: std::fs::File::open(ob)?,
    };
    let data = std::fs::File::open(part)?;
    let ranges = ChunkRanges::from(ChunkNum(0)..end);
    let mut good = ChunkNum(0);
    for r in valid_ranges(&outboard, &data, &ranges) {
        let r = r?;
        if r.start != good {
            break;
        }
        good = r.end;
    }
    Ok(good.to_bytes().min(size))
}

/// Downloads from a sharer older than verified streams: the whole file's
/// BLAKE3 is checked at the end.
async fn get_whole(
    pc: &PeerConnection,
    name: &str,
    out: &Path,
    progress: Progress<'_>,
) -> Result<Fetched, FileError> {
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
    let got = hash_file(&part).await.map_err(io)?;
    if got != header.blake3 {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(FileError::HashMismatch {
            got,
            want: header.blake3,
        });
    }
    tokio::fs::rename(&part, out).await.map_err(io)?;
    Ok(Fetched {
        size: header.size,
        resumed,
        blake3: got,
        corrupt_from: None,
        streamed_verified: false,
    })
}

/// Where a download to `out` is kept until verified.
pub fn part_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(".part");
    PathBuf::from(s)
}
