//! Read-only file sharing over a peer connection: `serve --share DIR`,
//! `files TARGET`, `get TARGET NAME`. Names are relative paths inside the
//! shared directory; nothing outside it is ever read (no `..`, no absolute
//! paths, no symlinks leading out: every path is resolved and must stay
//! under the resolved root). Downloads go to `NAME.part`, resume from its
//! length, and are renamed into place only after the BLAKE3 of the whole
//! file matches the sharer's.

use crate::peer::{accept, refuse, request, PeerConnection, Refusal};
use punch_net::{read_frame, write_frame};
use punch_protocol::peer::{
    FileEntry, FileHeader, FileList, PeerRequest, MAX_FILES, MAX_FILE_LIST_FRAME, MAX_FILE_NAME,
    MAX_PEER_HEADER,
};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

/// Errors of file sharing.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("the peer refuses: {0}")]
    /// The sharer refused (its reason).
    Refused(String),
    #[error("peer stream: {0}")]
    /// The peer stream failed.
    Stream(String),
    #[error("{0}")]
    /// A local file failed.
    Io(String),
    #[error("hash mismatch: got {got}, the peer announced {want}; the partial file was removed")]
    /// The download's BLAKE3 differs from the sharer's.
    #[allow(missing_docs)]
    HashMismatch { got: String, want: String },
}

fn stream_err(e: impl std::fmt::Display) -> FileError {
    FileError::Stream(e.to_string())
}

/// A shared directory, with BLAKE3 hashes cached by size and mtime.
#[derive(Debug)]
pub struct Share {
    root: PathBuf,
    hashes: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

/// Checks a requested name: a relative path of plain components.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_FILE_NAME {
        return Err("bad file name length".into());
    }
    let p = Path::new(name);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) || name.contains('\\') {
        return Err(format!("{name:?} is not a plain relative path"));
    }
    Ok(())
}

impl Share {
    /// Shares `dir` (which must exist).
    pub fn new(dir: &Path) -> std::io::Result<Share> {
        let root = dir.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(Share {
            root,
            hashes: Mutex::new(HashMap::new()),
        })
    }

    /// Resolves `name` to a regular file under the root.
    fn resolve(&self, name: &str) -> Result<PathBuf, String> {
        check_name(name)?;
        let p = self
            .root
            .join(name)
            .canonicalize()
            .map_err(|_| format!("no shared file {name:?}"))?;
        if !p.starts_with(&self.root) {
            return Err(format!("{name:?} leads outside the shared directory"));
        }
        if !p.is_file() {
            return Err(format!("{name:?} is not a file"));
        }
        Ok(p)
    }

    fn hash(&self, path: &Path) -> std::io::Result<(u64, String)> {
        let meta = std::fs::metadata(path)?;
        let (size, mtime) = (meta.len(), meta.modified()?);
        if let Some((s, m, h)) = self.hashes.lock().expect("not poisoned").get(path) {
            if *s == size && *m == mtime {
                return Ok((size, h.clone()));
            }
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(path)?)?;
        let h = hasher.finalize().to_hex().to_string();
        self.hashes
            .lock()
            .expect("not poisoned")
            .insert(path.to_path_buf(), (size, mtime, h.clone()));
        Ok((size, h))
    }

    /// Every regular file under the root (depth ≤ 16, at most [`MAX_FILES`]),
    /// by name; symlinks are followed only when they stay inside.
    pub fn list(&self) -> Vec<FileEntry> {
        let mut out = Vec::new();
        let mut stack = vec![(self.root.clone(), String::new(), 0usize)];
        while let Some((dir, prefix, depth)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let Some(n) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let name = if prefix.is_empty() {
                    n
                } else {
                    format!("{prefix}/{n}")
                };
                let Ok(real) = e.path().canonicalize() else {
                    continue;
                };
                if !real.starts_with(&self.root) {
                    continue;
                }
                if real.is_dir() && depth < 16 {
                    stack.push((real, name, depth + 1));
                } else if real.is_file() && name.len() <= MAX_FILE_NAME {
                    if let Ok((size, blake3)) = self.hash(&real) {
                        out.push(FileEntry { name, size, blake3 });
                    }
                }
                if out.len() >= MAX_FILES {
                    break;
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl From<Refusal> for FileError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Refused(m) => FileError::Refused(m),
            Refusal::Stream(m) => FileError::Stream(m),
        }
    }
}

/// The serving side of `ListFiles`.
pub(crate) async fn serve_list(mut send: quinn::SendStream, share: Option<Arc<Share>>) {
    let Some(share) = share else {
        return refuse(
            &mut send,
            "it shares no directory (serve --share DIR)".into(),
        )
        .await;
    };
    let Ok(files) = tokio::task::spawn_blocking(move || share.list()).await else {
        return refuse(&mut send, "listing failed".into()).await;
    };
    if accept(&mut send).await {
        let _ = write_frame(&mut send, &FileList { files }).await;
    }
    let _ = send.finish();
}

/// The serving side of `GetFile`.
pub(crate) async fn serve_get(
    mut send: quinn::SendStream,
    share: Option<Arc<Share>>,
    name: String,
    offset: u64,
) {
    let Some(share) = share else {
        return refuse(
            &mut send,
            "it shares no directory (serve --share DIR)".into(),
        )
        .await;
    };
    // Resolving (canonicalize, stat) and hashing touch the disk: both off
    // the runtime's threads.
    let n2 = name.clone();
    let found = tokio::task::spawn_blocking(move || {
        let path = share.resolve(&n2).map_err(|e| (true, e))?;
        let hashed = share
            .hash(&path)
            .map_err(|e| (false, format!("cannot read {n2:?}: {e}")))?;
        Ok::<_, (bool, String)>((path, hashed))
    })
    .await;
    let (path, (size, blake3)) = match found {
        Ok(Ok(x)) => x,
        Ok(Err((refused, e))) => {
            if refused {
                info!(%name, "file request refused: {e}");
            }
            return refuse(&mut send, e).await;
        }
        Err(e) => return refuse(&mut send, format!("cannot read {name:?}: {e}")).await,
    };
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

/// Lists the peer's shared files.
pub async fn list(pc: &PeerConnection) -> Result<Vec<FileEntry>, FileError> {
    let (_send, mut recv) = request(&pc.conn, &PeerRequest::ListFiles, true).await?;
    let list: FileList = read_frame(&mut recv, MAX_FILE_LIST_FRAME)
        .await
        .map_err(stream_err)?;
    Ok(list.files)
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
    let (_send, mut recv) = match request(&pc.conn, &req, true).await {
        Ok(s) => s,
        Err(Refusal::Refused(m)) if offset > 0 && m.contains("past the end") => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape() {
        assert!(check_name("a/b.txt").is_ok());
        for bad in ["", "../x", "/etc/passwd", "a/../../x", "./a", "a\\..\\b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn symlinks_out_of_the_share_are_not_served_or_listed() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("in.txt"), b"hello").unwrap();
        std::fs::write(d.path().join("secret"), b"no").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), share.join("out")).unwrap();
        let s = Share::new(&share).unwrap();
        let names: Vec<_> = s.list().into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["in.txt"]);
        assert!(s.resolve("out").unwrap_err().contains("outside"));
        assert!(s.resolve("in.txt").is_ok());
    }
}
