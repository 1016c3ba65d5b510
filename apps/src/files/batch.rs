//! Fetching a directory tree: many files at once on one connection, one
//! progress for the whole, files already complete and verified skipped.

use super::fetch::{get, Fetched};
use super::{check_name, hash_file, FileError};
use punch_agent::PeerConnection;
use punch_protocol::peer::FileEntry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use tracing::debug;

/// Most files fetched at once.
pub const MAX_JOBS: usize = 64;

/// Where a tree download stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeProgress {
    /// Files in the tree.
    pub files: usize,
    /// Files done: fetched, skipped or failed.
    pub files_done: usize,
    /// Files skipped as already complete and verified.
    pub skipped: usize,
    /// Files that failed.
    pub failed: usize,
    /// Bytes in place or verified so far, skipped files included.
    pub bytes: u64,
    /// Bytes in the tree.
    pub total_bytes: u64,
}

impl TreeProgress {
    /// Files fetched (done, neither skipped nor failed).
    pub fn fetched(&self) -> usize {
        self.files_done - self.skipped - self.failed
    }
}

/// What a tree download did.
#[derive(Debug, Default)]
pub struct TreeReport {
    /// The counts at the end.
    pub progress: TreeProgress,
    /// Bytes kept from partial files.
    pub resumed_bytes: u64,
    /// The files that failed, by name, and why.
    pub failed: Vec<(String, FileError)>,
}

/// The files of a listing under directory `dir` (`""` for the whole
/// share), each with its name relative to `dir`.
pub fn under<'a>(files: &'a [FileEntry], dir: &str) -> Vec<(&'a FileEntry, String)> {
    let dir = dir.trim_end_matches('/');
    files
        .iter()
        .filter_map(|f| {
            let rel = if dir.is_empty() {
                f.name.as_str()
            } else {
                f.name.strip_prefix(dir)?.strip_prefix('/')?
            };
            Some((f, rel.to_string()))
        })
        .collect()
}

/// Fetches `files` (with names relative to `dest`, from [`under`]) into
/// `dest`, `jobs` at a time, each verified as [`get`] does. A local file
/// of the listed size whose BLAKE3 is the listed one is skipped.
/// `progress` is called after every change.
pub async fn get_tree(
    pc: &PeerConnection,
    files: &[(&FileEntry, String)],
    dest: &Path,
    jobs: usize,
    progress: &(dyn Fn(TreeProgress) + Sync),
) -> TreeReport {
    let counts = Counts {
        files: files.len(),
        total_bytes: files
            .iter()
            .fold(0u64, |a, (f, _)| a.saturating_add(f.size)),
        ..Counts::default()
    };
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let resumed = AtomicU64::new(0);
    progress(counts.now());
    let worker = || async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((entry, rel)) = files.get(i) else {
                return;
            };
            let last = AtomicU64::new(0);
            let step = |done: u64, _total: u64| {
                let before = last.swap(done, Ordering::Relaxed);
                counts
                    .bytes
                    .fetch_add(done.saturating_sub(before), Ordering::Relaxed);
                progress(counts.now());
            };
            match one(pc, entry, rel, dest, &step).await {
                Ok(None) => {
                    counts.skipped.fetch_add(1, Ordering::Relaxed);
                    step(entry.size, entry.size);
                }
                Ok(Some(f)) => {
                    resumed.fetch_add(f.resumed, Ordering::Relaxed);
                    step(entry.size, entry.size);
                }
                Err(e) => {
                    debug!(name = %entry.name, "not fetched: {e}");
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    failed
                        .lock()
                        .expect("not poisoned")
                        .push((entry.name.clone(), e));
                }
            }
            counts.done.fetch_add(1, Ordering::Relaxed);
            progress(counts.now());
        }
    };
    let workers: Vec<_> = (0..jobs.clamp(1, MAX_JOBS)).map(|_| worker()).collect();
    futures_util::future::join_all(workers).await;
    let mut failed = failed.into_inner().expect("not poisoned");
    failed.sort_by(|a, b| a.0.cmp(&b.0));
    TreeReport {
        progress: counts.now(),
        resumed_bytes: resumed.into_inner(),
        failed,
    }
}

#[derive(Default)]
struct Counts {
    files: usize,
    total_bytes: u64,
    done: AtomicUsize,
    skipped: AtomicUsize,
    failed: AtomicUsize,
    bytes: AtomicU64,
}

impl Counts {
    fn now(&self) -> TreeProgress {
        TreeProgress {
            files: self.files,
            files_done: self.done.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes,
        }
    }
}

/// One file of the tree: `None` when already complete and verified.
async fn one(
    pc: &PeerConnection,
    entry: &FileEntry,
    rel: &str,
    dest: &Path,
    step: super::Progress<'_>,
) -> Result<Option<Fetched>, FileError> {
    // The sharer's names are checked as the sharer's own are: relative
    // paths of plain components, so nothing lands outside `dest`.
    check_name(rel).map_err(|e| FileError::Stream(format!("the sharer listed {e}")))?;
    let out: PathBuf = dest.join(rel);
    if !entry.blake3.is_empty() && complete(&out, entry).await {
        return Ok(None);
    }
    if let Some(parent) = out.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| FileError::Io(format!("{}: {e}", parent.display())))?;
    }
    get(pc, &entry.name, &out, Some(&entry.blake3), step)
        .await
        .map(Some)
}

/// Is `out` already the listed file (its size and BLAKE3)?
async fn complete(out: &Path, entry: &FileEntry) -> bool {
    match tokio::fs::metadata(out).await {
        Ok(m) if m.is_file() && m.len() == entry.size => {}
        _ => return false,
    }
    matches!(hash_file(out).await, Ok(h) if h == entry.blake3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_the_files_under_it_by_whole_components() {
        let e = |n: &str| FileEntry {
            name: n.into(),
            size: 1,
            blake3: String::new(),
        };
        let files = [e("a/x"), e("a/b/y"), e("ab/z"), e("top")];
        let names =
            |d: &str| -> Vec<String> { under(&files, d).into_iter().map(|x| x.1).collect() };
        assert_eq!(names("a/"), ["x", "b/y"]);
        assert_eq!(names("a"), ["x", "b/y"]);
        assert_eq!(names("a/b/"), ["y"]);
        assert_eq!(names(""), ["a/x", "a/b/y", "ab/z", "top"]);
        assert!(names("top/").is_empty());
    }
}
