//! Worker-id-to-key bindings on disk (`bindings.redb` in the data
//! directory), so a restarted server never frees an id for takeover.
//! redb: an embedded, crash-safe key-value store in pure Rust (no C build,
//! unlike SQLite).

use punch_protocol::signal::PublicKey;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");

/// Errors of the binding store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("binding store {path}: {source}")]
    Db { path: PathBuf, source: redb::Error },
}

/// The persistent bindings.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Path of the store in a data directory.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("bindings.redb")
    }

    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = Self::path(data_dir);
        let err = |e: redb::Error| StoreError::Db {
            path: path.clone(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        Ok(Store { db, path })
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Every binding. Entries that are not 32-byte keys (a damaged file)
    /// are skipped with a warning rather than trusted.
    pub fn load(&self) -> Result<Vec<(String, PublicKey)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(BINDINGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match <[u8; 32]>::try_from(v.value()) {
                Ok(key) => out.push((k.value().to_string(), key)),
                Err(_) => tracing::warn!(id = k.value(), "skipping a malformed stored binding"),
            }
        }
        Ok(out)
    }

    /// Records a binding.
    pub fn put(&self, id: &str, key: &PublicKey) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(BINDINGS).map_err(|e| self.err(e))?;
            t.insert(id, key.as_slice()).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Removes a binding; true when there was one.
    pub fn forget(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let had = {
            let mut t = txn.open_table(BINDINGS).map_err(|e| self.err(e))?;
            let had = t.remove(id).map_err(|e| self.err(e))?.is_some();
            had
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_survive_reopening_and_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(s.load().unwrap().is_empty());
            s.put("worker-b", &[7; 32]).unwrap();
            s.put("worker-c", &[8; 32]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let mut all = s.load().unwrap();
        all.sort();
        assert_eq!(
            all,
            vec![("worker-b".into(), [7; 32]), ("worker-c".into(), [8; 32])]
        );
        assert!(s.forget("worker-b").unwrap());
        assert!(!s.forget("worker-b").unwrap());
        assert_eq!(s.load().unwrap().len(), 1);
    }
}
