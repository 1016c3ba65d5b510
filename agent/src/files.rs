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
    FileEntry, FileHeader, FileList, FileListPage, PeerRequest, MAX_FILES, MAX_FILE_LIST_FRAME,
    MAX_FILE_LIST_PAGE, MAX_FILE_NAME, MAX_LIST_PROBLEM, MAX_LIST_PROBLEMS, MAX_PEER_HEADER,
};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

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
/// Hashing is lazy: a listing hashes for at most [`LIST_HASH_BUDGET`] and
/// leaves the rest to a background pass (one at a time) and to `get`.
#[derive(Debug)]
pub struct Share {
    root: PathBuf,
    hashes: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
    warming: AtomicBool,
}

/// How long a listing spends hashing files it has no hash for before it
/// answers; files left over are listed without a hash.
pub const LIST_HASH_BUDGET: Duration = Duration::from_millis(200);

/// One file a walk found.
#[derive(Debug)]
struct Found {
    name: String,
    real: PathBuf,
    size: u64,
    mtime: SystemTime,
}

/// What a walk of the share found, and what it could not read.
#[derive(Debug, Default)]
struct Walk {
    files: Vec<Found>,
    problems: Vec<String>,
}

impl Walk {
    fn problem(&mut self, p: String) {
        if self.problems.len() < MAX_LIST_PROBLEMS {
            self.problems.push(clip_problem(p));
        }
    }
}

/// A listing problem cut to [`MAX_LIST_PROBLEM`] bytes (at a character
/// boundary): what the sharer sends and what the asker keeps.
fn clip_problem(mut p: String) -> String {
    if p.len() > MAX_LIST_PROBLEM {
        let mut cut = MAX_LIST_PROBLEM;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p.truncate(cut);
    }
    p
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
            warming: AtomicBool::new(false),
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

    fn cached(&self, path: &Path, size: u64, mtime: SystemTime) -> Option<String> {
        let hashes = self.hashes.lock().expect("not poisoned");
        match hashes.get(path) {
            Some((s, m, h)) if *s == size && *m == mtime => Some(h.clone()),
            _ => None,
        }
    }

    fn remember(&self, path: &Path, size: u64, mtime: SystemTime, h: &str) {
        let mut hashes = self.hashes.lock().expect("not poisoned");
        // Bounded: files that come and go would otherwise pile up.
        if hashes.len() >= 2 * MAX_FILES && !hashes.contains_key(path) {
            hashes.clear();
        }
        hashes.insert(path.to_path_buf(), (size, mtime, h.to_string()));
    }

    fn hash(&self, path: &Path) -> std::io::Result<(u64, String)> {
        let meta = std::fs::metadata(path)?;
        let (size, mtime) = (meta.len(), meta.modified()?);
        if let Some(h) = self.cached(path, size, mtime) {
            return Ok((size, h));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(path)?)?;
        let h = hasher.finalize().to_hex().to_string();
        self.remember(path, size, mtime, &h);
        Ok((size, h))
    }

    /// Every regular file under the root (depth ≤ 16, at most
    /// [`MAX_FILES`]), by name; symlinks are followed only when they stay
    /// inside. Nothing is hashed.
    fn walk(&self) -> Walk {
        let mut walk = Walk::default();
        let mut stack = vec![(self.root.clone(), String::new(), 0usize)];
        'dirs: while let Some((dir, prefix, depth)) = stack.pop() {
            let shown = if prefix.is_empty() { "." } else { &prefix };
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) => {
                    walk.problem(format!("cannot read directory {shown}: {e}"));
                    continue;
                }
            };
            for e in rd {
                let e = match e {
                    Ok(e) => e,
                    Err(e) => {
                        walk.problem(format!("cannot read directory {shown}: {e}"));
                        continue 'dirs;
                    }
                };
                let Some(n) = e.file_name().to_str().map(str::to_string) else {
                    walk.problem(format!("a name in {shown} is not UTF-8; not listed"));
                    continue;
                };
                let name = if prefix.is_empty() {
                    n
                } else {
                    format!("{prefix}/{n}")
                };
                let Ok(real) = e.path().canonicalize() else {
                    // A dangling symlink: nothing to serve.
                    continue;
                };
                if !real.starts_with(&self.root) {
                    continue;
                }
                let meta = match std::fs::metadata(&real) {
                    Ok(m) => m,
                    Err(err) => {
                        walk.problem(format!("cannot stat {name}: {err}"));
                        continue;
                    }
                };
                if meta.is_dir() {
                    if depth < 16 {
                        stack.push((real, name, depth + 1));
                    } else {
                        walk.problem(format!("{name}: deeper than 16 directories; not listed"));
                    }
                } else if meta.is_file() && name.len() <= MAX_FILE_NAME {
                    if walk.files.len() >= MAX_FILES {
                        walk.problem(format!(
                            "the share holds more than {MAX_FILES} files; only {MAX_FILES} are listed"
                        ));
                        break 'dirs;
                    }
                    walk.files.push(Found {
                        name,
                        real,
                        size: meta.len(),
                        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
        walk.files.sort_by(|a, b| a.name.cmp(&b.name));
        walk
    }

    /// Every shared file with its hash, for agents before paged
    /// listings: the whole share is hashed first. `Err(n)` when the `n`
    /// files would not fit one frame (found before hashing anything).
    pub fn list(&self) -> Result<Vec<FileEntry>, usize> {
        let walk = self.walk();
        // postcard: a length byte or two per string, up to 10 for a size.
        let bytes: usize = walk.files.iter().map(|f| f.name.len() + 64 + 16).sum();
        if bytes > MAX_FILE_LIST_PAGE {
            return Err(walk.files.len());
        }
        Ok(walk
            .files
            .into_iter()
            .filter_map(|f| {
                let (size, blake3) = self.hash(&f.real).ok()?;
                Some(FileEntry {
                    name: f.name,
                    size,
                    blake3,
                })
            })
            .collect())
    }

    /// Every shared file, hashed where a hash is cached or can be made
    /// within `budget`; the rest with an empty hash. Also what the walk
    /// could not read, and whether files were left unhashed.
    pub fn listing(&self, budget: Duration) -> (Vec<FileEntry>, Vec<String>, bool) {
        let walk = self.walk();
        let deadline = Instant::now() + budget;
        let mut unhashed = false;
        let files = walk
            .files
            .into_iter()
            .map(|f| {
                let blake3 = match self.cached(&f.real, f.size, f.mtime) {
                    Some(h) => h,
                    None if Instant::now() < deadline => match self.hash(&f.real) {
                        Ok((_, h)) => h,
                        Err(_) => String::new(),
                    },
                    None => {
                        unhashed = true;
                        String::new()
                    }
                };
                FileEntry {
                    name: f.name,
                    size: f.size,
                    blake3,
                }
            })
            .collect();
        (files, walk.problems, unhashed)
    }

    /// Hashes every file without a cached hash, on the calling (blocking)
    /// thread; a second call while one runs returns at once.
    pub fn warm(&self) {
        if self.warming.swap(true, Ordering::AcqRel) {
            return;
        }
        let started = Instant::now();
        let walk = self.walk();
        let mut hashed = 0usize;
        for f in &walk.files {
            if self.cached(&f.real, f.size, f.mtime).is_none() && self.hash(&f.real).is_ok() {
                hashed += 1;
            }
        }
        debug!(
            hashed,
            ms = started.elapsed().as_millis() as u64,
            "share hashed"
        );
        self.warming.store(false, Ordering::Release);
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
pub(crate) async fn serve_list(mut send: quinn::SendStream, share: Option<Arc<Share>>) {
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
pub(crate) async fn serve_list_paged(mut send: quinn::SendStream, share: Option<Arc<Share>>) {
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

/// The serving side of `GetFile`.
pub(crate) async fn serve_get(
    mut send: quinn::SendStream,
    share: Option<Arc<Share>>,
    name: String,
    offset: u64,
) {
    let Some(share) = shared(&mut send, share).await else {
        return;
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
    let (_send, mut recv) = match request(&pc.conn, &PeerRequest::ListFilesPaged, true).await {
        Ok(s) => s,
        // An older agent cannot read the request and resets the stream.
        Err(Refusal::Stream(m)) => {
            debug!("paged listing failed ({m}); asking the old way");
            return list_one_frame(pc).await;
        }
        Err(e) => return Err(e.into()),
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
    let (_send, mut recv) = request(&pc.conn, &PeerRequest::ListFiles, true).await?;
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
        let names: Vec<_> = s.list().unwrap().into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["in.txt"]);
        let (files, problems, _) = s.listing(Duration::from_secs(5));
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].name, "in.txt");
        assert_eq!(files[0].blake3, blake3::hash(b"hello").to_hex().to_string());
        assert!(problems.is_empty(), "{problems:?}");
        assert!(s.resolve("out").unwrap_err().contains("outside"));
        assert!(s.resolve("in.txt").is_ok());
    }

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

    #[test]
    fn what_a_listing_leaves_out_is_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"a").unwrap();
        let mut deep = d.path().to_path_buf();
        for i in 0..18 {
            deep.push(format!("l{i}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("too-deep"), b"x").unwrap();
        let s = Share::new(d.path()).unwrap();
        let (files, problems, _) = s.listing(Duration::from_secs(1));
        assert_eq!(files.len(), 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("deeper than 16"), "{problems:?}");
    }
}
