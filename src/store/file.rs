use std::collections::HashSet;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::index::Index;
use super::local_leases::LocalLeases;
use super::{SessionStore, StoreError};
use crate::keyed_lock::KeyedLock;
use crate::session::{Owner, SessionId, SessionRecord};
use crate::staging::{LastWrite, StagingError};

/// Keeps one JSON file per session in a directory, so open sessions survive a restart.
///
/// A new record goes to a temporary file that is renamed over the record's file. An update
/// that fits in one page (4 KiB of JSON, padded with spaces) overwrites the file in place with
/// one positional write instead, on Linux and without fsync; either way a crash of the process,
/// even a SIGKILL in the middle of a write, leaves either the old or the new record, never a
/// torn one. Reads are served from an index built when the store is opened and kept in step
/// with every write, so a Fragment costs one small file write and no read.
///
/// By default records are not fsynced: the rename, and the one-page write, are atomic in the
/// page cache, which is what a process crash needs, and the handler never lets a record's
/// offset run ahead of the staged data it finds. [`FileStore::with_fsync`] adds an fsync of the
/// file and its directory per write, for power-loss durability, and always renames.
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

    /// Writes `record` to its file. `replace` says the file exists (an update), so that it
    /// may be overwritten in place.
    async fn write(&self, record: &SessionRecord, replace: bool) -> Result<(), StoreError> {
        let write = self.record_write(record, replace)?;
        blocking(write).await?;
        self.wrote(record.id);
        Ok(())
    }

    /// The blocking work of writing `record` to its file.
    fn record_write(
        &self,
        record: &SessionRecord,
        replace: bool,
    ) -> Result<impl FnOnce() -> io::Result<()> + Send + 'static, StoreError> {
        let mut json = serde_json::to_vec(record).map_err(StoreError::backend)?;
        let path = self.path(record.id);
        let fsync = self.fsync;
        Ok(move || {
            if replace && !fsync && overwrite_in_place(&path, &mut json)? {
                return Ok(());
            }
            write_atomically(&path, &json, fsync)
        })
    }

    /// Notes that the record of `id` was written.
    fn wrote(&self, id: SessionId) {
        if !self.fsync {
            self.unsynced().insert(id);
        }
    }

    /// [`update`](SessionStore::update), with `before` run first in the same blocking call:
    /// the layer's fast path for a fragment staged in a local part, whose last write goes
    /// there ([`LocalPart::take_last_write`](crate::staging::LocalPart::take_last_write)).
    ///
    /// The record is written only after `before` succeeded; if it fails, its error is
    /// returned and the record is left as it was. If the compare-and-set fails, `before` still
    /// runs (on its own) and the update's error is returned inside `Ok`, as if the two had run
    /// one after the other.
    ///
    /// The store's `update` metric counts this call, `before`'s time included.
    pub(crate) async fn update_after(
        &self,
        expected: u64,
        record: &SessionRecord,
        before: LastWrite,
    ) -> Result<Result<(), StoreError>, StagingError> {
        let start = std::time::Instant::now();
        let updated = self.update_after_untimed(expected, record, before).await;
        if let Ok(updated) = &updated {
            crate::metrics::store_call("update", updated, start.elapsed());
        }
        updated
    }

    async fn update_after_untimed(
        &self,
        expected: u64,
        record: &SessionRecord,
        before: LastWrite,
    ) -> Result<Result<(), StoreError>, StagingError> {
        let _guard = self.inner.locks.lock(record.id).await;
        let checked = self.index().check_update(expected, record);
        let write = match checked.and_then(|()| self.record_write(record, true)) {
            Ok(write) => write,
            Err(error) => {
                crate::fs::blocking(before).await?;
                return Ok(Err(error));
            }
        };
        let written = crate::fs::blocking(move || {
            before()?;
            Ok::<_, StagingError>(write())
        })
        .await?;
        if let Err(error) = written {
            return Ok(Err(StoreError::backend(error)));
        }
        self.wrote(record.id);
        self.index().put(record.clone());
        Ok(Ok(()))
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
        if let Err(error) = self.write(record, false).await {
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
        self.write(record, true).await?;
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

    async fn list_ended(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.index().ended())
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
            crate::fs::sync_dir(&dir)
        })
        .await
    }
}

async fn blocking<F>(f: F) -> Result<(), StoreError>
where
    F: FnOnce() -> io::Result<()> + Send + 'static,
{
    crate::fs::blocking(f).await.map_err(StoreError::backend)
}

fn read_record(path: &Path) -> io::Result<SessionRecord> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// The most an update may write in place: one page, the smallest page size Linux has.
const IN_PLACE_MAX: usize = 4096;

/// Overwrites the record file at `path` with `json` in place, if that is safe against a crash
/// of the process; `Ok(false)`, having written nothing, if not (the file is missing, or the
/// record or the file is longer than [`IN_PLACE_MAX`]), and the caller renames instead.
/// Pads `json` only when it writes it.
///
/// Why a crash cannot tear the record: `json` is padded with spaces to the file's length (JSON
/// allows trailing whitespace; the file is never truncated, which would be a second step) and
/// written by one `pwrite` at offset 0 of at most 4096 bytes, so it falls within the first page of
/// the page cache. Linux's buffered-write loops (`generic_perform_write`, `iomap_write_iter`) copy
/// a write one page at a time and check for a fatal signal only before each page; the copy into a
/// page, and the size update when the file grows, happen without one. So a SIGKILL, or any other
/// end of the process, leaves the old or the new bytes in the page cache, which is what the next
/// [`FileStore::open`] reads. (A copy into the page comes up short only if the page of our buffer
/// goes away between the kernel faulting it in and copying from it, by reclaim or NUMA balancing;
/// the loop then goes round again, past a signal check, so a SIGKILL at that instant would leave a
/// torn record. The buffer was written a moment before, so this is theory.) Nor is the write atomic
/// for another process reading the file at that moment, which may see part old and part new bytes;
/// only `open` reads the files, and one process owns the directory. Nor on disk: a power loss may
/// tear it, which is why `with_fsync(true)` never comes here.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn overwrite_in_place(path: &Path, json: &mut Vec<u8>) -> io::Result<bool> {
    use std::os::unix::fs::FileExt as _;

    if json.len() > IN_PLACE_MAX {
        return Ok(false);
    }
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if len > IN_PLACE_MAX {
        return Ok(false);
    }
    json.resize(json.len().max(len), b' ');
    file.write_all_at(json, 0)?;
    Ok(true)
}

/// Elsewhere the argument of the Linux version has not been made: always rename.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn overwrite_in_place(_path: &Path, _json: &mut Vec<u8>) -> io::Result<bool> {
    Ok(false)
}

fn write_atomically(path: &Path, contents: &[u8], fsync: bool) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = crate::fs::private_file(&tmp)?;
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
            crate::fs::sync_dir(dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

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

    /// The record in `store`'s file for `id`, as a reopened store would read it.
    fn on_disk(store: &FileStore, id: SessionId) -> SessionRecord {
        read_record(&store.path(id)).unwrap()
    }

    #[tokio::test]
    async fn update_after_writes_the_record_only_after_the_work_before_it_succeeded() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut r = record("after/write.bin");
        store.create(&r).await.unwrap();
        let old = r.clone();

        // The work before sees the old record on disk: the new one is written after it.
        let (check, id) = (store.clone(), r.id);
        let saw = std::sync::Arc::new(Mutex::new(None));
        let seen = saw.clone();
        r.revision = 1;
        r.received = 4096;
        store
            .update_after(
                0,
                &r,
                Box::new(move || {
                    *seen.lock().unwrap() = Some(on_disk(&check, id));
                    Ok(())
                }),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(saw.lock().unwrap().take(), Some(old));
        assert_eq!(on_disk(&store, r.id), r);
        assert_eq!(store.load(r.id).await.unwrap(), Some(r.clone()));
        assert!(store.unsynced().contains(&r.id), "left for close to fsync");

        // It fails: its error comes back and the record stays, on disk and in the index.
        let mut next = r.clone();
        next.revision = 2;
        next.received = 8192;
        let failed = store
            .update_after(1, &next, Box::new(|| Err(StagingError::Forbidden)))
            .await;
        assert!(matches!(failed, Err(StagingError::Forbidden)), "{failed:?}");
        assert_eq!(on_disk(&store, r.id), r);
        assert_eq!(store.load(r.id).await.unwrap(), Some(r.clone()));

        // A stale revision: the work still runs, and the update's conflict comes back.
        let ran = std::sync::Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let conflict = store
            .update_after(
                0,
                &next,
                Box::new(move || {
                    flag.store(true, Ordering::SeqCst);
                    Ok(())
                }),
            )
            .await
            .unwrap();
        assert!(
            matches!(conflict, Err(StoreError::Conflict)),
            "{conflict:?}"
        );
        assert!(ran.load(Ordering::SeqCst), "the work before ran");
        assert_eq!(on_disk(&store, r.id), r);
    }

    /// Bumps the revision and updates, returning the length of the record's JSON.
    async fn bump(store: &FileStore, r: &mut SessionRecord) -> u64 {
        r.revision += 1;
        r.received += 65536;
        store.update(r.revision - 1, r).await.unwrap();
        serde_json::to_vec(&*r).unwrap().len() as u64
    }

    #[cfg(unix)]
    fn ino(path: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
    }

    #[tokio::test]
    async fn updates_in_place_shrink_and_grow() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut r = record("in/place.bin");
        store.create(&r).await.unwrap();
        let path = store.path(r.id);
        let mut longest = std::fs::metadata(&path).unwrap().len();
        #[cfg(target_os = "linux")]
        let inode = ino(&path);

        // Grow, shrink, grow further, shrink: each step reads back after a reopen.
        for owner in [Some(600), None, Some(1500), Some(10), None] {
            r.owner = owner.map(|n| Owner::new("o".repeat(n)));
            longest = longest.max(bump(&store, &mut r).await);
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes.len() as u64 >= longest, "the file never shrinks");
            assert_eq!(
                serde_json::from_slice::<SessionRecord>(&bytes).unwrap(),
                r,
                "the file holds the latest record"
            );
            #[cfg(target_os = "linux")]
            {
                assert_eq!(ino(&path), inode, "written in place");
                assert_eq!(
                    bytes.len() as u64,
                    longest,
                    "padded, not grown, when shorter"
                );
                if owner.is_none() {
                    assert!(bytes.ends_with(b"    "), "padded with spaces");
                }
            }
            assert!(store.unsynced().contains(&r.id), "left for close to fsync");

            // The directory listing reads records that carry trailing spaces.
            let reopened = FileStore::open(dir.path()).unwrap();
            assert_eq!(reopened.load(r.id).await.unwrap(), Some(r.clone()));
        }

        store.close().await.unwrap();
        assert!(store.unsynced().is_empty());
        assert!(store.remove(r.id).await.unwrap());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn records_over_a_page_are_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut r = record("big/record.bin");
        store.create(&r).await.unwrap();
        let path = store.path(r.id);

        r.owner = Some(Owner::new("b".repeat(2 * IN_PLACE_MAX)));
        #[cfg(unix)]
        let before = ino(&path);
        let len = bump(&store, &mut r).await;
        assert!(len > IN_PLACE_MAX as u64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len,
            "written whole"
        );
        #[cfg(unix)]
        assert_ne!(ino(&path), before, "renamed, not written in place");
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load(r.id).await.unwrap(), Some(r.clone()));

        // Back under a page: the long file is replaced, not padded past a page.
        r.owner = None;
        let len = bump(&store, &mut r).await;
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        // And the next update is in place again.
        #[cfg(unix)]
        let before = ino(&path);
        bump(&store, &mut r).await;
        #[cfg(target_os = "linux")]
        assert_eq!(ino(&path), before);
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load(r.id).await.unwrap(), Some(r.clone()));
        assert!(!dir.path().join(format!("{}.json.tmp", r.id)).exists());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn fsync_always_renames() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap().with_fsync(true);
        let mut r = record("synced/record.bin");
        store.create(&r).await.unwrap();
        let path = store.path(r.id);
        for _ in 0..3 {
            let before = ino(&path);
            let len = bump(&store, &mut r).await;
            assert_ne!(ino(&path), before, "a new file renamed over the record");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "no padding");
        }
        assert!(store.unsynced().is_empty(), "nothing left unsynced");
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load(r.id).await.unwrap(), Some(r.clone()));
    }
}
