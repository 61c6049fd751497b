use std::collections::HashSet;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::index::Index;
use super::leases::LocalLeases;
use super::{SessionStore, StoreError};
use crate::lock::KeyedLock;
use crate::session::{Owner, SessionId, SessionRecord};

/// Keeps one JSON file per session in a directory, so open sessions survive a restart.
///
/// Each write goes to a temporary file that is renamed over the record, so a crash leaves
/// either the old or the new record, never a torn one. Reads are served from an index built
/// when the store is opened and kept in step with every write, so a Fragment costs one small
/// file write and no read.
///
/// By default records are not fsynced: the rename is atomic in the page cache, which is what a
/// process crash needs, and the handler never lets a record's offset run ahead of the staged
/// data it finds. [`FileStore::with_fsync`] adds an fsync of the file and its directory per
/// write, for power-loss durability.
///
/// One directory belongs to one server process at a time; to share sessions between nodes use
/// a shared backend.
#[derive(Debug, Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
    fsync: bool,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    index: Mutex<Index>,
    locks: KeyedLock<SessionId>,
    /// Records written without an fsync since the last [`SessionStore::close`].
    unsynced: Mutex<HashSet<SessionId>>,
    leases: LocalLeases,
}

impl FileStore {
    /// Opens (creating if needed) a store in `dir` and loads every record in it. Leftover
    /// temporary files from a crash are removed; unreadable records are skipped with a warning.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(StoreError::backend)?;
        let mut index = Index::default();
        for entry in std::fs::read_dir(&dir).map_err(StoreError::backend)? {
            let path = entry.map_err(StoreError::backend)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            match read_record(&path) {
                Ok(record) if SessionId::parse(stem) == Some(record.id) => index.put(record),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "record name does not match its id; skipped")
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "unreadable session record; skipped")
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                index: Mutex::new(index),
                locks: KeyedLock::default(),
                unsynced: Mutex::default(),
                leases: LocalLeases::default(),
            }),
            fsync: false,
        })
    }

    /// Fsyncs every record file and its directory after writing it (power-loss durability).
    pub fn with_fsync(self, fsync: bool) -> Self {
        Self { fsync, ..self }
    }

    /// The directory the records live in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.inner
            .index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, id: SessionId) -> PathBuf {
        self.inner.dir.join(format!("{id}.json"))
    }

    async fn write(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(StoreError::backend)?;
        let path = self.path(record.id);
        let fsync = self.fsync;
        blocking(move || write_atomically(&path, &json, fsync)).await?;
        if !fsync {
            self.unsynced().insert(record.id);
        }
        Ok(())
    }

    fn unsynced(&self) -> MutexGuard<'_, HashSet<SessionId>> {
        self.inner
            .unsynced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl SessionStore for FileStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let _guard = self.inner.locks.lock(record.id).await;
        {
            let mut index = self.index();
            index.check_create(record)?;
            // Reserve the id and destination before the write, so a concurrent create sees
            // them; undone below if the write fails.
            index.put(record.clone());
        }
        if let Err(error) = self.write(record).await {
            self.index().remove(record.id);
            return Err(error);
        }
        Ok(())
    }

    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.index().get(id).cloned())
    }

    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        let _guard = self.inner.locks.lock(record.id).await;
        self.index().check_update(expected, record)?;
        self.write(record).await?;
        self.index().put(record.clone());
        Ok(())
    }

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let _guard = self.inner.locks.lock(id).await;
        if !self.index().contains(id) {
            return Ok(false);
        }
        let path = self.path(id);
        blocking(move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await?;
        self.index().remove(id);
        Ok(true)
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.index().records())
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        Ok(self.index().count_open())
    }

    async fn count_open_for(&self, owner: &Owner) -> Result<usize, StoreError> {
        Ok(self.index().count_open_for(owner))
    }

    async fn acquire_lease(
        &self,
        id: SessionId,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.inner.leases.acquire(id, holder, ttl))
    }

    async fn release_lease(&self, id: SessionId, holder: &str) -> Result<(), StoreError> {
        self.inner.leases.release(id, holder);
        Ok(())
    }

    /// Fsyncs every record written without an fsync, and the directory.
    async fn close(&self) -> Result<(), StoreError> {
        let ids: Vec<SessionId> = self.unsynced().drain().collect();
        let paths: Vec<PathBuf> = ids.into_iter().map(|id| self.path(id)).collect();
        let dir = self.inner.dir.clone();
        blocking(move || {
            for path in paths {
                match std::fs::File::open(&path) {
                    Ok(file) => file.sync_all()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            crate::staging::sync_dir(&dir)
        })
        .await
    }
}

async fn blocking<F>(f: F) -> Result<(), StoreError>
where
    F: FnOnce() -> io::Result<()> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StoreError::backend)?
        .map_err(StoreError::backend)
}

fn read_record(path: &Path) -> io::Result<SessionRecord> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

fn write_atomically(path: &Path, contents: &[u8], fsync: bool) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = crate::staging::private_file(&tmp)?;
        file.write_all(contents)?;
        if fsync {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(error) = written {
        // Out of space, typically: leave no temporary file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(error);
    }
    if fsync {
        if let Some(dir) = path.parent() {
            crate::staging::sync_dir(dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::record;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FileStore::open(dir.path()).unwrap());
        crate::store::conformance::run(store.clone()).await;
        // Not shared, so `run` skips the leases; they keep the contract all the same.
        crate::store::conformance::leases(store.as_ref()).await;
        crate::store::conformance::concurrent_leases(store).await;
    }

    #[tokio::test]
    async fn survives_reopen_and_ignores_junk() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap().with_fsync(true);
        let mut r = record("x/y.bin");
        store.create(&r).await.unwrap();
        r.revision = 1;
        r.received = 42;
        store.update(0, &r).await.unwrap();
        std::fs::write(dir.path().join("garbage.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("half.json.tmp"), b"{").unwrap();
        drop(store);

        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.load(r.id).await.unwrap(), Some(r.clone()));
        assert!(!dir.path().join("half.json.tmp").exists());
        assert!(matches!(
            store.create(&record("x/y.bin")).await,
            Err(StoreError::DestinationBusy { .. })
        ));
        assert!(store.remove(r.id).await.unwrap());
        assert!(!dir.path().join(format!("{}.json", r.id)).exists());
    }
}
