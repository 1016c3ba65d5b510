//! The shared directory: walking it, resolving names inside it, hashing
//! lazily with a cache.

use super::outboard::{Cache, Tree};
use super::{check_name, clip_problem};
use punch_protocol::peer::{
    FileEntry, MAX_FILES, MAX_FILE_LIST_PAGE, MAX_FILE_NAME, MAX_LIST_PROBLEMS,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tracing::debug;

/// A shared directory, with BLAKE3 hash trees cached by size and mtime.
/// Hashing is lazy: a listing hashes for at most [`LIST_HASH_BUDGET`] and
/// leaves the rest to a background pass (one at a time) and to `get`.
#[derive(Debug)]
pub struct Share {
    root: PathBuf,
    cache: Cache,
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
            cache: Cache::default(),
            warming: AtomicBool::new(false),
        })
    }

    /// Keeps the hash trees of large files (256 MiB and more) in `dir`
    /// too, so a restarted sharer serves them without hashing them again.
    pub fn with_outboard_dir(mut self, dir: PathBuf) -> Share {
        self.cache = Cache::new(Some(dir));
        self
    }

    /// Resolves `name` to a regular file under the root.
    pub(super) fn resolve(&self, name: &str) -> Result<PathBuf, String> {
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
        self.cache
            .root(path, size, mtime)
            .map(|h| h.to_hex().to_string())
    }

    /// The hash tree of `path` (blocking).
    pub(super) fn tree(&self, path: &Path) -> std::io::Result<Tree> {
        self.cache.tree(path)
    }

    pub(super) fn hash(&self, path: &Path) -> std::io::Result<(u64, String)> {
        let t = self.cache.tree(path)?;
        Ok((t.size, t.root.to_hex().to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

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
