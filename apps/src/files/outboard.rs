//! BLAKE3 hash trees (bao outboards) of shared files, cached by path, size
//! and mtime: in memory up to [`MEMORY_BYTES`], and the large ones also on
//! disk in the agent's data directory, so a restarted sharer does not hash
//! a 50 GB file again before serving it.

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::CreateOutboard;
use bao_tree::{BaoTree, BlockSize};
use bytes::Bytes;
use punch_protocol::peer::{BAO_BLOCK_LOG, MAX_FILES};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;
use tracing::debug;

/// The chunk group size every verified stream uses.
pub const BLOCK: BlockSize = BlockSize::from_chunk_log(BAO_BLOCK_LOG);

/// Most outboard bytes kept in memory (the trees of 16 GiB of files).
pub const MEMORY_BYTES: usize = 64 << 20;
/// Outboards at least this large (files of 256 MiB and more) are also
/// kept on disk.
pub const DISK_MIN: usize = 1 << 20;
/// Most outboard files kept on disk; the oldest go first.
pub const DISK_FILES: usize = 256;

/// A file's hash tree: its root (the BLAKE3 of the whole file) and the
/// parent hashes in pre-order.
#[derive(Clone, Debug)]
pub struct Tree {
    /// The file's size when hashed.
    pub size: u64,
    /// The BLAKE3 of the whole file.
    pub root: blake3::Hash,
    /// 64 bytes for every chunk group but one.
    pub outboard: Bytes,
}

impl Tree {
    /// Hashes `path` (blocking).
    pub fn create(path: &Path) -> std::io::Result<Tree> {
        let f = std::fs::File::open(path)?;
        let size = f.metadata()?.len();
        let ob = PreOrderOutboard::<Vec<u8>>::create_sized(
            std::io::BufReader::with_capacity(1 << 20, f),
            size,
            BLOCK,
        )?;
        Ok(Tree {
            size,
            root: ob.root,
            outboard: Bytes::from(ob.data),
        })
    }

    /// The bao tree geometry of the file.
    pub fn tree(&self) -> BaoTree {
        BaoTree::new(self.size, BLOCK)
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    mtime: SystemTime,
    root: blake3::Hash,
    /// Dropped first when memory runs short; the root stays.
    outboard: Option<Bytes>,
}

/// The cache: roots of every file hashed, outboards within a byte budget.
#[derive(Debug, Default)]
pub struct Cache {
    entries: Mutex<(HashMap<PathBuf, Entry>, usize)>,
    disk: Option<PathBuf>,
}

impl Cache {
    /// A cache that also keeps large outboards under `disk`.
    pub fn new(disk: Option<PathBuf>) -> Cache {
        Cache {
            entries: Mutex::default(),
            disk,
        }
    }

    /// The cached root of `path`, when its size and mtime are unchanged.
    pub fn root(&self, path: &Path, size: u64, mtime: SystemTime) -> Option<blake3::Hash> {
        let g = self.entries.lock().expect("not poisoned");
        match g.0.get(path) {
            Some(e) if e.size == size && e.mtime == mtime => Some(e.root),
            _ => None,
        }
    }

    /// The tree of `path` (blocking): from memory, from disk, or hashed
    /// now and remembered.
    pub fn tree(&self, path: &Path) -> std::io::Result<Tree> {
        let meta = std::fs::metadata(path)?;
        let (size, mtime) = (meta.len(), meta.modified()?);
        {
            let g = self.entries.lock().expect("not poisoned");
            if let Some(Entry {
                outboard: Some(ob),
                root,
                ..
            }) = g.0.get(path).filter(|e| e.size == size && e.mtime == mtime)
            {
                return Ok(Tree {
                    size,
                    root: *root,
                    outboard: ob.clone(),
                });
            }
        }
        let tree = match self.load(path, size, mtime) {
            Some(t) => t,
            None => {
                let t = Tree::create(path)?;
                if t.size != size {
                    return Err(std::io::Error::other("the file changed while hashed"));
                }
                self.store(path, size, mtime, &t);
                t
            }
        };
        self.remember(path, size, mtime, &tree);
        Ok(tree)
    }

    fn remember(&self, path: &Path, size: u64, mtime: SystemTime, t: &Tree) {
        let mut g = self.entries.lock().expect("not poisoned");
        let (map, bytes) = &mut *g;
        // Bounded: files that come and go would otherwise pile up.
        if map.len() >= 2 * MAX_FILES && !map.contains_key(path) {
            map.clear();
            *bytes = 0;
        }
        if let Some(old) = map.remove(path) {
            *bytes -= old.outboard.map_or(0, |o| o.len());
        }
        let len = t.outboard.len();
        let keep = len <= MEMORY_BYTES;
        if keep && *bytes + len > MEMORY_BYTES {
            // Forget other outboards (their roots stay) until this one fits.
            for e in map.values_mut() {
                if *bytes + len <= MEMORY_BYTES {
                    break;
                }
                if let Some(o) = e.outboard.take() {
                    *bytes -= o.len();
                }
            }
        }
        if keep {
            *bytes += len;
        }
        map.insert(
            path.to_path_buf(),
            Entry {
                size,
                mtime,
                root: t.root,
                outboard: keep.then(|| t.outboard.clone()),
            },
        );
    }

    fn disk_path(&self, path: &Path) -> Option<PathBuf> {
        let dir = self.disk.as_ref()?;
        let key = blake3::hash(path.as_os_str().as_encoded_bytes());
        Some(dir.join(format!("{}.obao", &key.to_hex()[..32])))
    }

    /// An outboard kept on disk for this very size and mtime.
    fn load(&self, path: &Path, size: u64, mtime: SystemTime) -> Option<Tree> {
        let p = self.disk_path(path)?;
        let mut f = std::fs::File::open(&p).ok()?;
        let mut head = [0u8; HEAD];
        f.read_exact(&mut head).ok()?;
        if head[..8] != *MAGIC || head[8..8 + STAMP] != stamp(size, mtime) {
            return None;
        }
        let want = BaoTree::new(size, BLOCK).outboard_size();
        if f.metadata().ok()?.len() != HEAD as u64 + want {
            return None;
        }
        let mut outboard = Vec::with_capacity(want as usize);
        f.read_to_end(&mut outboard).ok()?;
        let root = blake3::Hash::from_bytes(head[8 + STAMP..].try_into().ok()?);
        debug!(path = %path.display(), "outboard read from disk");
        Some(Tree {
            size,
            root,
            outboard: Bytes::from(outboard),
        })
    }

    /// Keeps a large outboard on disk; a failure only costs a rehash later.
    fn store(&self, path: &Path, size: u64, mtime: SystemTime, t: &Tree) {
        if t.outboard.len() < DISK_MIN {
            return;
        }
        let (Some(dir), Some(p)) = (self.disk.as_ref(), self.disk_path(path)) else {
            return;
        };
        let r = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            prune(dir)?;
            let tmp = p.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&stamp(size, mtime))?;
            f.write_all(t.root.as_bytes())?;
            f.write_all(&t.outboard)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)
        })();
        if let Err(e) = r {
            debug!(dir = %dir.display(), "outboard not kept on disk: {e}");
        }
    }
}

const MAGIC: &[u8; 8] = b"punchob1";
/// Magic, size and mtime stamp, root.
const HEAD: usize = 8 + STAMP + 32;
const STAMP: usize = 20;

/// Size and mtime, as the disk cache stores them.
fn stamp(size: u64, mtime: SystemTime) -> [u8; STAMP] {
    let since = mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = [0u8; STAMP];
    out[..8].copy_from_slice(&size.to_le_bytes());
    out[8..16].copy_from_slice(&since.as_secs().to_le_bytes());
    out[16..].copy_from_slice(&since.subsec_nanos().to_le_bytes());
    out
}

/// Removes the oldest outboards beyond [`DISK_FILES`] - 1.
fn prune(dir: &Path) -> std::io::Result<()> {
    let mut files: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let e = e.ok()?;
            let p = e.path();
            (p.extension()? == "obao").then_some(())?;
            Some((e.metadata().ok()?.modified().ok()?, p))
        })
        .collect();
    if files.len() < DISK_FILES {
        return Ok(());
    }
    files.sort();
    for (_, p) in &files[..files.len() + 1 - DISK_FILES] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_outboards_survive_a_restart_and_a_changed_file_is_hashed_again() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("big");
        // 256 MiB is too slow for a unit test: lower the bar by writing a
        // file whose outboard is small and checking the disk path directly.
        std::fs::write(&file, vec![7u8; 3 << 20]).unwrap();
        let cache = Cache::new(Some(d.path().join("ob")));
        let t = cache.tree(&file).unwrap();
        assert_eq!(t.root, blake3::hash(&vec![7u8; 3 << 20]));
        assert_eq!(t.outboard.len() as u64, t.tree().outboard_size());
        let meta = std::fs::metadata(&file).unwrap();
        let mtime = meta.modified().unwrap();
        // Below DISK_MIN nothing is written; store it by hand the way a
        // large one would be, then read it back in a fresh cache.
        assert!(cache.load(&file, meta.len(), mtime).is_none());
        let big = Tree {
            outboard: Bytes::from(vec![1u8; DISK_MIN]),
            ..t.clone()
        };
        // A fake tree of the wrong length is refused on load.
        cache.store(&file, meta.len(), mtime, &big);
        assert!(Cache::new(Some(d.path().join("ob")))
            .load(&file, meta.len(), mtime)
            .is_none());
        // The real outboard, stored, loads in a new cache.
        let real = Cache::new(Some(d.path().join("ob")));
        let p = real.disk_path(&file).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend(stamp(meta.len(), mtime));
        bytes.extend(t.root.as_bytes());
        bytes.extend(t.outboard.iter());
        std::fs::write(&p, bytes).unwrap();
        let back = real.load(&file, meta.len(), mtime).unwrap();
        assert_eq!(back.root, t.root);
        assert_eq!(back.outboard, t.outboard);
        // Another mtime: not used.
        assert!(real
            .load(&file, meta.len(), mtime + std::time::Duration::from_secs(1))
            .is_none());
        assert!(real.root(&file, meta.len(), mtime).is_none());
        real.tree(&file).unwrap();
        assert_eq!(real.root(&file, meta.len(), mtime), Some(t.root));
    }

    #[test]
    fn memory_holds_outboards_within_its_budget() {
        let cache = Cache::new(None);
        let t = |n: usize| Tree {
            size: 0,
            root: blake3::hash(&n.to_le_bytes()),
            outboard: Bytes::from(vec![0u8; n]),
        };
        let now = SystemTime::now();
        for i in 0..5 {
            cache.remember(Path::new(&format!("/f{i}")), 0, now, &t(MEMORY_BYTES / 3));
        }
        let g = cache.entries.lock().unwrap();
        assert!(g.1 <= MEMORY_BYTES, "{}", g.1);
        assert_eq!(g.0.len(), 5, "roots stay");
        let kept = g.0.values().filter(|e| e.outboard.is_some()).count();
        assert_eq!(kept, 3);
        assert_eq!(
            g.1,
            g.0.values()
                .filter_map(|e| e.outboard.as_ref())
                .map(|o| o.len())
                .sum::<usize>()
        );
    }
}
