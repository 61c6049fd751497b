use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::dir::{Dir, Entry, Kind, Open, is_refused_link, session_files};
use super::{LastWrite, PartWriter, Staging, StagingError};
use crate::destination::Destination;
use crate::session::SessionId;

/// Part files in a folder on the destination's filesystem, committed by rename.
///
/// Each open session has `<staging dir>/<session id>.part`. Fragments are written at the
/// session's offset through a small write buffer (never the whole fragment) on the blocking
/// thread pool, overlapping disk writes with network reads; a large part is flushed to disk
/// in the background as it grows, so the commit's fsync is short. A commit truncates the part to
/// the file's size, fsyncs it, moves it into place and fsyncs the destination's folder:
/// without overwrites by a hard link (which fails if the destination exists, so a file that
/// appeared meanwhile is never replaced), the folder's fsync, then the unlink of the part; with
/// overwrites by a rename.
///
/// # Symbolic links
///
/// No operation follows a symbolic link inside the upload tree. The root and the staging
/// folder are opened once, by [`LocalStaging::new`] (the root as given, even if it is itself a
/// link: that is the operator's choice; a staging folder inside the root beneath it, without
/// following links); a destination's folder is opened beneath the root's handle without
/// following any link (on Linux `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`,
/// elsewhere on Unix one `O_NOFOLLOW` folder at a time; with
/// [`create_directories`](LocalStaging::create_directories) missing folders are created the
/// same way, one at a time). The check, the link or rename, the folder's fsync and the
/// recovery checks are all relative to that one handle, so a folder swapped for a link to
/// somewhere else at any moment cannot lead a file outside the root: it is refused with
/// [`StagingError::Forbidden`] (403 `E_ACCESSDENIED`). A symbolic link at the destination
/// itself is an existing file: refused without overwrites, replaced (never written through)
/// with them. On Windows the checks are by path and not atomic with the operation.
///
/// Because the rename must not cross filesystems, [`LocalStaging::new`] refuses a staging
/// folder on a different device from the upload root.
#[derive(Debug, Clone)]
pub struct LocalStaging {
    inner: Arc<Inner>,
    writeback: Arc<Writeback>,
    budget: Arc<Budget>,
}

#[derive(Debug, Clone)]
struct Inner {
    root: PathBuf,
    parts: PathBuf,
    /// The root, opened once.
    root_dir: Arc<Dir>,
    /// The staging folder, opened once.
    parts_dir: Arc<Dir>,
    create_directories: bool,
    sync_data: bool,
    sync_on_commit: bool,
    buffer_size: usize,
}

/// Write buffer per fragment in flight; two of them alternate. A body that pauses has its
/// buffer written out and freed once it holds [`IDLE_WRITE_MIN`] ([`PartWriter::idle`]), so
/// only fragments whose data keeps coming hold buffers this large, and all of them together
/// hold at most [`DEFAULT_MAX_BUFFERED`].
const DEFAULT_BUFFER: usize = 256 * 1024;

/// A paused body's part writes out what it holds once it holds this much; less waits for
/// more data (or the end of the fragment), so that a slow client costs few small writes.
const IDLE_WRITE_MIN: usize = crate::request_body::IDLE_AFTER as usize;

/// What the write buffers of all parts in flight may hold together, by default.
const DEFAULT_MAX_BUFFERED: usize = 16 << 20;

/// The bytes of write buffers the parts of one staging may still take. Past it a part writes
/// each chunk as it came, without copying it (more, smaller writes, but no more memory).
#[derive(Debug)]
struct Budget {
    left: AtomicIsize,
}

impl Budget {
    fn new(bytes: usize) -> Self {
        Self {
            left: isize::try_from(bytes).unwrap_or(isize::MAX).into(),
        }
    }

    /// Takes `bytes` if that many are left.
    fn take(&self, bytes: usize) -> bool {
        let Ok(bytes) = isize::try_from(bytes) else {
            return false;
        };
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= bytes).then_some(left - bytes)
            })
            .is_ok()
    }

    /// Takes `bytes` whether or not they are left (an allocator that rounded up).
    fn charge(&self, bytes: usize) {
        self.left.fetch_sub(
            isize::try_from(bytes).unwrap_or(isize::MAX),
            Ordering::AcqRel,
        );
    }

    fn give(&self, bytes: usize) {
        self.left.fetch_add(
            isize::try_from(bytes).unwrap_or(isize::MAX),
            Ordering::AcqRel,
        );
    }
}

/// Unsynced bytes of one part after which its writeback to disk starts in the background.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Starts flushing a large part to disk while it is still being uploaded, so that the fsync
/// of the commit (which the final Ack waits for) has only the tail left to write. At most one
/// flush per part runs at a time; each is a short blocking task that ends by itself.
#[derive(Debug, Default)]
struct Writeback {
    parts: std::sync::Mutex<std::collections::HashMap<SessionId, Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    unsynced: u64,
    flush: Option<JoinHandle<()>>,
}

impl Writeback {
    fn wrote(&self, id: SessionId, bytes: u64, file: &Arc<std::fs::File>) {
        let mut parts = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pending = parts.entry(id).or_default();
        pending.unsynced += bytes;
        if pending.unsynced >= WRITEBACK_EVERY
            && pending.flush.as_ref().is_none_or(JoinHandle::is_finished)
        {
            pending.unsynced = 0;
            let file = file.clone();
            // An error here resurfaces in the commit's own fsync, which is what decides.
            pending.flush = Some(tokio::task::spawn_blocking(move || drop(file.sync_data())));
        }
    }

    /// Stops tracking a part; returns its running flush, if any.
    fn forget(&self, id: SessionId) -> Option<JoinHandle<()>> {
        let mut parts = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        parts.remove(&id).and_then(|p| p.flush)
    }
}

impl LocalStaging {
    /// Staging under `root/.bits/parts`, committing into `root`. Creates both folders.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let parts = root.join(".bits").join("parts");
        Self::with_staging_dir(root, parts)
    }

    /// Staging in `parts`, committing into `root`. Both must be on the same filesystem.
    ///
    /// Both folders are created if missing and opened here, once: `root` as given (following
    /// links), `parts`, if it is below `root`, beneath the root's handle without following
    /// any link (a link on the way is an error).
    pub fn with_staging_dir(
        root: impl Into<PathBuf>,
        parts: impl Into<PathBuf>,
    ) -> io::Result<Self> {
        let (root, parts) = (root.into(), parts.into());
        let root_dir = Dir::create_and_open(&root)?;
        let parts_dir = root_dir.open_folder(&root, &parts)?;
        if root_dir.device()? != parts_dir.device()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "staging folder {} is not on the same filesystem as the upload root {}",
                    parts.display(),
                    root.display()
                ),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                parts,
                root_dir: Arc::new(root_dir),
                parts_dir: Arc::new(parts_dir),
                create_directories: false,
                sync_data: false,
                sync_on_commit: true,
                buffer_size: DEFAULT_BUFFER,
            }),
            writeback: Arc::default(),
            budget: Arc::new(Budget::new(DEFAULT_MAX_BUFFERED)),
        })
    }

    /// How many bytes the write buffers of all fragments in flight may hold together (default
    /// 16 MiB). Each fragment buffers up to 512 KiB while its data keeps coming, so that the
    /// disk sees large writes; a fragment whose body pauses writes out and frees its buffer
    /// once it holds 64 KiB. Once the buffers hold this much, further data is written as it arrives, without a
    /// copy: many fast uploads at once then cost more, smaller writes instead of memory.
    pub fn max_buffered(self, bytes: usize) -> Self {
        Self {
            budget: Arc::new(Budget::new(bytes)),
            ..self
        }
    }

    /// Creates missing folders of a destination at commit time instead of refusing the upload
    /// with 404 (IIS refuses). Default: off.
    pub fn create_directories(self, on: bool) -> Self {
        self.map(|inner| inner.create_directories = on)
    }

    /// Fsyncs part data after every fragment, before its Ack (power-loss durability; costs
    /// one fsync per fragment). Default: off, which survives process crashes.
    pub fn sync_data(self, on: bool) -> Self {
        self.map(|inner| inner.sync_data = on)
    }

    /// Whether a commit fsyncs the file before moving it into place and the folder after
    /// (default: on). With it, a committed file survives a power loss whole; without it, a
    /// commit is a plain link or rename (still atomic against a crash of the process) and
    /// large uploads no longer wait for the disk: the final Ack comes as soon as the last
    /// fragment is in the page cache. Turn it off when the destination is a scratch area or
    /// the application copies the file elsewhere anyway.
    pub fn sync_on_commit(self, on: bool) -> Self {
        self.map(|inner| inner.sync_on_commit = on)
    }

    /// The upload root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The folder part files live in.
    pub fn staging_dir(&self) -> &Path {
        &self.inner.parts
    }

    fn map(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
            writeback: self.writeback,
            budget: self.budget,
        }
    }

    fn part(&self, id: SessionId) -> PathBuf {
        self.inner.parts.join(part_name(id))
    }
}

/// The part file's name in the staging folder.
fn part_name(id: SessionId) -> String {
    format!("{id}.part")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StagingError> + Send + 'static,
) -> Result<T, StagingError> {
    crate::fs::blocking(f).await
}

/// An I/O error on a part: a symbolic link in its place is refused.
fn part_error(e: io::Error) -> StagingError {
    if is_refused_link(&e) {
        StagingError::Forbidden
    } else {
        StagingError::Io(e)
    }
}

/// The destination's folder, opened beneath the root without following a link (created,
/// one folder at a time, if `create`), and the file's name in it.
fn folder_of<'d>(
    root: &Dir,
    destination: &'d Destination,
    create: bool,
) -> Result<(Dir, &'d str), StagingError> {
    let mut names: Vec<&str> = destination.as_str().split('/').collect();
    let name = names.pop().ok_or(StagingError::Forbidden)?;
    Ok((root.walk(&names, create)?, name))
}

/// Whether `name` in `folder` may become the destination: not a folder, and absent unless
/// `overwrite` (a symbolic link counts as a file, to be replaced).
fn check_target(folder: &Dir, name: &str, overwrite: bool) -> Result<(), StagingError> {
    match folder.stat(name)? {
        Some(Entry {
            kind: Kind::Dir, ..
        }) => Err(StagingError::IsDirectory),
        Some(_) if !overwrite => Err(StagingError::DestinationExists),
        _ => Ok(()),
    }
}

/// A failed link or rename to `name` in `folder`.
fn target_error(e: io::Error, folder: &Dir, name: &str) -> StagingError {
    match folder.stat(name) {
        Ok(Some(Entry {
            kind: Kind::Dir, ..
        })) => StagingError::IsDirectory,
        _ if e.kind() == io::ErrorKind::AlreadyExists => StagingError::DestinationExists,
        _ => StagingError::Io(e),
    }
}

impl Inner {
    /// The commit proper, on the blocking pool.
    fn commit(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        let part = part_name(id);
        let file = match self.parts_dir.open_file(&part, Open::Write) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StagingError::PartMissing);
            }
            Err(e) => return Err(part_error(e)),
        };
        let len = file.metadata()?.len();
        if len < total {
            return Err(StagingError::Incomplete { len, total });
        }
        if len > total {
            // Bytes past the end can only be the tail of an interrupted write.
            file.set_len(total)?;
        }
        // Parts are private while staged; a finished file gets ordinary permissions.
        #[cfg(unix)]
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        if self.sync_on_commit {
            file.sync_all()?;
        }
        drop(file);

        // From here on, everything is relative to this one handle of the folder.
        let (folder, name) = folder_of(&self.root_dir, destination, self.create_directories)?;
        check_target(&folder, name, overwrite)?;
        let linked = if overwrite {
            self.parts_dir
                .rename(&part, &folder, name, true)
                .map_err(|e| target_error(e, &folder, name))?;
            false
        } else {
            match self.parts_dir.link(&part, &folder, name) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(StagingError::DestinationExists);
                }
                // Filesystems without hard links: a rename that keeps an existing file
                // where the system can, the check above otherwise.
                Err(_) => {
                    self.parts_dir
                        .rename(&part, &folder, name, false)
                        .map_err(|e| target_error(e, &folder, name))?;
                    false
                }
            }
        };
        if self.sync_on_commit {
            folder.sync()?;
        }
        // The part's name goes only once the new one is on disk: a power loss in between
        // leaves both (recovery finishes the commit), never neither.
        if linked {
            self.parts_dir.remove_file(&part)?;
        }
        Ok(())
    }

    /// [`Staging::committed`], on the blocking pool.
    fn committed(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
    ) -> Result<bool, StagingError> {
        let Ok((folder, name)) = folder_of(&self.root_dir, destination, false) else {
            return Ok(false);
        };
        let target = match folder.stat(name)? {
            Some(entry) if entry.kind == Kind::File && entry.len == total => entry,
            _ => return Ok(false),
        };
        let part = part_name(id);
        match self.parts_dir.stat(&part)? {
            // The commit renamed the part, or linked it and removed it: only a commit makes a
            // complete session's part vanish.
            None => Ok(true),
            // Linked but not yet unlinked: the destination is the part itself.
            Some(entry) if entry.same_file(&target) => {
                self.parts_dir.remove_file(&part)?;
                self.parts_dir.sync()?;
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }
}

impl Staging for LocalStaging {
    type Part = LocalPart;

    async fn check_destination(
        &self,
        destination: &Destination,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        let inner = self.inner.clone();
        let destination = destination.clone();
        blocking(move || {
            let (folder, name) = match folder_of(&inner.root_dir, &destination, false) {
                Err(StagingError::ParentMissing) if inner.create_directories => return Ok(()),
                other => other?,
            };
            check_target(&folder, name, overwrite)
        })
        .await
    }

    async fn create(&self, id: SessionId) -> Result<(), StagingError> {
        let parts = self.inner.parts_dir.clone();
        blocking(move || {
            parts
                .open_file(&part_name(id), Open::Truncate)
                .map(drop)
                .map_err(part_error)
        })
        .await
    }

    async fn len(&self, id: SessionId) -> Result<Option<u64>, StagingError> {
        let parts = self.inner.parts_dir.clone();
        blocking(move || match parts.stat(&part_name(id))? {
            Some(entry) if entry.kind == Kind::File => Ok(Some(entry.len)),
            // A link or a folder where the part should be: never followed.
            Some(_) => Err(StagingError::Forbidden),
            None => Ok(None),
        })
        .await
    }

    async fn open(&self, id: SessionId, offset: u64) -> Result<LocalPart, StagingError> {
        // No I/O yet: the first flush opens the file and checks its length in the same trip
        // to the blocking pool as its write, so a small fragment costs one trip.
        Ok(LocalPart {
            id,
            parts: self.inner.parts_dir.clone(),
            file: None,
            written: 0,
            writeback: self.inner.sync_on_commit.then(|| self.writeback.clone()),
            offset,
            // Grown as data arrives: a small fragment never costs the whole buffer.
            buffer: Vec::new(),
            spare: None,
            budget: self.budget.clone(),
            reserved: 0,
            thrifty: false,
            capacity: self.inner.buffer_size,
            in_flight: None,
            sync_data: self.inner.sync_data,
        })
    }

    async fn commit(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        if let Some(flush) = self.writeback.forget(id) {
            let _ = flush.await;
        }
        let inner = self.inner.clone();
        let destination = destination.clone();
        blocking(move || inner.commit(id, &destination, total, overwrite)).await
    }

    async fn discard(&self, id: SessionId) -> Result<(), StagingError> {
        self.writeback.forget(id);
        let parts = self.inner.parts_dir.clone();
        blocking(move || match parts.remove_file(&part_name(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        })
        .await
    }

    fn path(&self, id: SessionId) -> Option<PathBuf> {
        Some(self.part(id))
    }

    async fn check(&self) -> Result<Option<u64>, StagingError> {
        let probe = SessionId::new();
        self.create(probe).await?;
        self.discard(probe).await?;
        free_space(&self.inner.parts).await
    }

    async fn committed(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
    ) -> Result<bool, StagingError> {
        let inner = self.inner.clone();
        let destination = destination.clone();
        blocking(move || inner.committed(id, &destination, total)).await
    }

    async fn close(&self) -> Result<(), StagingError> {
        let parts = self.inner.parts_dir.clone();
        blocking(move || {
            for id in session_files(&parts, ".part")? {
                match parts.open_file(&part_name(id), Open::Read) {
                    Ok(file) => file.sync_data()?,
                    // Committed or discarded meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(part_error(e)),
                }
            }
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<SessionId>, StagingError> {
        let parts = self.inner.parts_dir.clone();
        blocking(move || Ok(session_files(&parts, ".part")?)).await
    }
}

/// Writes a fragment's new bytes into a part file: fills a buffer, hands it to the blocking
/// pool, and fills a second one while the first is written. The file is opened by the first
/// write, which also checks that it holds the bytes below the offset.
#[derive(Debug)]
pub struct LocalPart {
    id: SessionId,
    /// The staging folder's handle.
    parts: Arc<Dir>,
    /// Open once the first flush has finished.
    file: Option<Arc<std::fs::File>>,
    /// Bytes handed to the file by this writer.
    written: u64,
    /// Early writeback, when commits fsync (otherwise nothing waits for the disk).
    writeback: Option<Arc<Writeback>>,
    offset: u64,
    buffer: Vec<u8>,
    spare: Option<Vec<u8>>,
    /// Where the buffers' bytes are counted, and how many of them these buffers hold.
    budget: Arc<Budget>,
    reserved: usize,
    /// Set once the body paused: a written buffer is freed rather than kept as the spare.
    thrifty: bool,
    capacity: usize,
    in_flight: Option<Flush>,
    sync_data: bool,
}

/// A write in flight; gives back the file and the emptied buffer, if it wrote one.
type Flush = JoinHandle<Result<(Arc<std::fs::File>, Option<Vec<u8>>), StagingError>>;

/// What a write sends: a buffer, to be reused, or a chunk as it came.
enum Payload {
    Buffer(Vec<u8>),
    Chunk(Bytes),
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        match self {
            Self::Buffer(buffer) => buffer,
            Self::Chunk(chunk) => chunk,
        }
    }
}

impl Payload {
    fn into_buffer(self) -> Option<Vec<u8>> {
        match self {
            Self::Buffer(buffer) => Some(buffer),
            Self::Chunk(_) => None,
        }
    }
}

impl Drop for LocalPart {
    fn drop(&mut self) {
        self.budget.give(self.reserved);
    }
}

impl LocalPart {
    async fn wait(&mut self) -> Result<(), StagingError> {
        if let Some(task) = self.in_flight.take() {
            let (file, buffer) = task.await.map_err(io::Error::other)??;
            if let Some(mut buffer) = buffer {
                if self.thrifty {
                    self.release(buffer.capacity());
                } else {
                    buffer.clear();
                    self.spare = Some(buffer);
                }
            }
            self.file = Some(file);
        }
        Ok(())
    }

    /// Gives back a freed buffer's bytes to the budget.
    fn release(&mut self, bytes: usize) {
        let bytes = bytes.min(self.reserved);
        self.reserved -= bytes;
        self.budget.give(bytes);
    }

    /// Grows the buffer to hold `needed` bytes, if the budget allows.
    fn grow(&mut self, needed: usize) -> bool {
        // Double up to the buffer size, no further.
        let grown = needed.next_power_of_two().clamp(needed, self.capacity);
        let before = self.buffer.capacity();
        let asked = grown.saturating_sub(before);
        if !self.budget.take(asked) {
            return false;
        }
        self.buffer.reserve_exact(grown - self.buffer.len());
        let got = self.buffer.capacity() - before;
        if got > asked {
            self.budget.charge(got - asked);
        } else {
            self.budget.give(asked - got);
        }
        self.reserved += got;
        true
    }

    /// Writes `chunk` as it is, after what is in flight.
    async fn write_through(&mut self, chunk: Bytes) -> Result<(), StagingError> {
        self.wait().await?;
        self.start_write(Payload::Chunk(chunk));
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StagingError> {
        self.wait().await?;
        if self.buffer.is_empty() {
            return Ok(());
        }
        let next = self.spare.take().unwrap_or_default();
        let data = std::mem::replace(&mut self.buffer, next);
        self.start_write(Payload::Buffer(data));
        Ok(())
    }

    /// Starts writing `data` at the offset, on the blocking pool; nothing may be in flight.
    /// The first write opens the file and checks that it holds the bytes below the offset.
    fn start_write(&mut self, data: Payload) {
        let (file, parts, offset, id) =
            (self.file.clone(), self.parts.clone(), self.offset, self.id);
        let len = data.as_ref().len() as u64;
        self.offset += len;
        self.written += len;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let file = match file {
                Some(file) => file,
                None => Arc::new(open_at(&parts, id, offset)?),
            };
            write_all_at(&file, data.as_ref(), offset)?;
            Ok((file, data.into_buffer()))
        }));
    }
}

impl LocalPart {
    /// Does all of [`finish`](PartWriter::finish) that need not block: waits for the write in
    /// flight, and returns what is left for a blocking thread (the buffered bytes and, with
    /// `sync_data`, the fsync), or `None` if nothing is. Whoever runs it may run work of its
    /// own after it in the same blocking call (the layer writes the session's record there:
    /// one trip to the blocking pool per fragment, not two); once it returned `Ok`, the part
    /// is as `finish` leaves it. This part then holds nothing, and its `finish` does nothing.
    pub(crate) async fn take_last_write(&mut self) -> Result<Option<LastWrite>, StagingError> {
        self.wait().await?;
        let buffer = std::mem::take(&mut self.buffer);
        let file = self.file.take();
        if buffer.is_empty() {
            // Nothing was written: nothing to make durable.
            let Some(opened) = &file else {
                return Ok(None);
            };
            if !self.sync_data {
                if let Some(writeback) = &self.writeback {
                    writeback.wrote(self.id, self.written, opened);
                }
                return Ok(None);
            }
        }
        let (parts, id, offset, sync_data) =
            (self.parts.clone(), self.id, self.offset, self.sync_data);
        let len = buffer.len() as u64;
        self.offset += len;
        self.written += len;
        let (written, writeback) = (self.written, self.writeback.clone());
        // The buffer's bytes stay counted in the budget until the part is dropped.
        Ok(Some(Box::new(move || {
            let file = match file {
                Some(file) => file,
                None => Arc::new(open_at(&parts, id, offset)?),
            };
            if !buffer.is_empty() {
                write_all_at(&file, &buffer, offset)?;
            }
            if sync_data {
                file.sync_data()?;
            } else if let Some(writeback) = writeback {
                writeback.wrote(id, written, &file);
            }
            Ok(())
        })))
    }
}

/// Opens (or creates) the part for writing at `offset`; fails with
/// [`StagingError::PartShort`] if it holds fewer bytes than that.
fn open_at(parts: &Dir, id: SessionId, offset: u64) -> Result<std::fs::File, StagingError> {
    let file = parts
        .open_file(&part_name(id), Open::Create)
        .map_err(part_error)?;
    let held = file.metadata()?.len();
    if held < offset {
        return Err(StagingError::PartShort { held });
    }
    Ok(file)
}

impl PartWriter for LocalPart {
    async fn write(&mut self, mut chunk: Bytes) -> Result<(), StagingError> {
        while !chunk.is_empty() {
            let room = self.capacity - self.buffer.len();
            let take = room.min(chunk.len());
            let needed = self.buffer.len() + take;
            if self.buffer.capacity() < needed && !self.grow(needed) {
                // The buffers of all parts hold their share: what is buffered goes first,
                // then the chunk as it came.
                self.flush().await?;
                return self.write_through(chunk).await;
            }
            self.buffer.extend_from_slice(&chunk.split_to(take));
            if self.buffer.len() >= self.capacity {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<(), StagingError> {
        match self.take_last_write().await? {
            Some(last) => blocking(last).await,
            None => Ok(()),
        }
    }

    /// Once 64 KiB or more are buffered, writes them out and frees both buffers (the write
    /// runs on while the body is read again): a slow client then holds at most about that
    /// much here, in few writes.
    async fn idle(&mut self) -> Result<(), StagingError> {
        if self.buffer.len() < IDLE_WRITE_MIN {
            return Ok(());
        }
        // The write goes on while the body is read again; the buffers are freed, not kept.
        if let Some(spare) = self.spare.take() {
            self.release(spare.capacity());
        }
        self.thrifty = true;
        self.flush().await?;
        Ok(())
    }
}

#[cfg(unix)]
fn write_all_at(file: &std::fs::File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

#[cfg(windows)]
fn write_all_at(file: &std::fs::File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, data, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Bytes free for an unprivileged writer on the filesystem of `dir`.
#[cfg(unix)]
async fn free_space(dir: &std::path::Path) -> Result<Option<u64>, StagingError> {
    let dir = dir.to_owned();
    let stat = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&dir))
        .await
        .map_err(|e| StagingError::Io(std::io::Error::other(e)))?
        .map_err(|e| StagingError::Io(e.into()))?;
    Ok(Some(stat.f_bavail.saturating_mul(stat.f_frsize)))
}

#[cfg(not(unix))]
async fn free_space(_: &std::path::Path) -> Result<Option<u64>, StagingError> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_staging_conformance_suite() {
        use crate::staging::conformance::{self, LocalDestinations};
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        conformance::run(
            std::sync::Arc::new(staging),
            &LocalDestinations::new(root.path()),
        )
        .await;
    }
    use crate::destination::from_url_path;

    fn dest(path: &str) -> Destination {
        from_url_path(path, "/", &[".bits".into()]).unwrap()
    }

    async fn write_part(staging: &LocalStaging, id: SessionId, offset: u64, data: &[u8]) {
        let mut part = staging.open(id, offset).await.unwrap();
        for chunk in data.chunks(1000) {
            part.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        part.finish().await.unwrap();
    }

    #[tokio::test]
    async fn write_commit_no_clobber() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        let id = SessionId::new();
        staging.create(id).await.unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7) as u8).collect();
        write_part(&staging, id, 0, &data[..300_000]).await;
        write_part(&staging, id, 300_000, &data[300_000..]).await;
        assert_eq!(staging.len(id).await.unwrap(), Some(700_000));
        assert_eq!(staging.list().await.unwrap(), vec![id]);

        let d = dest("/out.bin");
        staging.check_destination(&d, false).await.unwrap();
        staging.commit(id, &d, 700_000, false).await.unwrap();
        assert_eq!(std::fs::read(root.path().join("out.bin")).unwrap(), data);
        assert_eq!(staging.len(id).await.unwrap(), None);
        assert!(matches!(
            staging.check_destination(&d, false).await,
            Err(StagingError::DestinationExists)
        ));

        let other = SessionId::new();
        write_part(&staging, other, 0, b"new").await;
        assert!(matches!(
            staging.commit(other, &d, 3, false).await,
            Err(StagingError::DestinationExists)
        ));
        assert_eq!(std::fs::read(root.path().join("out.bin")).unwrap(), data);
        staging.commit(other, &d, 3, true).await.unwrap();
        assert_eq!(std::fs::read(root.path().join("out.bin")).unwrap(), b"new");
    }

    #[tokio::test]
    async fn an_idle_part_writes_out_its_buffer_and_frees_it() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        let left = || staging.budget.left.load(Ordering::Acquire);
        let id = SessionId::new();
        let mut part = staging.open(id, 0).await.unwrap();
        // Less than IDLE_WRITE_MIN waits for more.
        part.write(Bytes::from(vec![3; 20_000])).await.unwrap();
        part.idle().await.unwrap();
        assert_eq!(
            part.buffer.len(),
            20_000,
            "a small pause keeps a small buffer"
        );
        part.write(Bytes::from(vec![3; 80_000])).await.unwrap();
        let held = part.buffer.capacity();
        assert!(held >= 100_000);
        part.idle().await.unwrap();
        assert_eq!(
            part.buffer.capacity(),
            0,
            "idle hands the buffer to the write"
        );
        assert!(part.spare.is_none());
        part.wait().await.unwrap();
        assert_eq!(
            std::fs::read(staging.part(id)).unwrap(),
            vec![3; 100_000],
            "idle wrote the buffer out before finish"
        );
        assert!(
            part.spare.is_none(),
            "and the written buffer is freed, not kept"
        );
        assert_eq!(
            left(),
            DEFAULT_MAX_BUFFERED as isize,
            "its bytes are back in the budget"
        );
        part.write(Bytes::from_static(b"tail")).await.unwrap();
        part.finish().await.unwrap();
        let on_disk = std::fs::read(staging.part(id)).unwrap();
        assert_eq!(on_disk.len(), 100_004);
        assert_eq!(&on_disk[100_000..], b"tail");
        assert_eq!(left(), DEFAULT_MAX_BUFFERED as isize);
    }

    #[tokio::test]
    async fn the_last_write_taken_out_of_a_part_writes_when_run_and_finishes_it() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        let id = SessionId::new();

        // Nothing written: nothing to run, and no file.
        let mut part = staging.open(id, 0).await.unwrap();
        assert!(part.take_last_write().await.unwrap().is_none());
        part.finish().await.unwrap();
        assert!(!staging.part(id).exists());

        // Buffered bytes are written by the job, not before, and finish has nothing left.
        let mut part = staging.open(id, 0).await.unwrap();
        part.write(Bytes::from_static(b"hello ")).await.unwrap();
        let last = part.take_last_write().await.unwrap().expect("a last write");
        assert!(
            !staging.part(id).exists(),
            "nothing is written before the job runs"
        );
        last().unwrap();
        assert_eq!(std::fs::read(staging.part(id)).unwrap(), b"hello ");
        part.finish().await.unwrap();
        assert_eq!(std::fs::read(staging.part(id)).unwrap(), b"hello ");

        // After a write in flight, the job writes the rest behind it.
        let mut part = staging.open(id, 6).await.unwrap();
        part.write(Bytes::from(vec![b'w'; 300_000])).await.unwrap();
        part.write(Bytes::from_static(b"!")).await.unwrap();
        let last = part.take_last_write().await.unwrap().expect("a last write");
        tokio::task::spawn_blocking(last).await.unwrap().unwrap();
        let held = std::fs::read(staging.part(id)).unwrap();
        assert_eq!(held.len(), 300_007);
        assert_eq!(
            (&held[..6], held[6], &held[300_006..]),
            (&b"hello "[..], b'w', &b"!"[..])
        );
        drop(part);

        // A part shorter than the offset: the job refuses it with its length.
        let mut part = staging.open(id, 400_000).await.unwrap();
        part.write(Bytes::from_static(b"gap")).await.unwrap();
        let last = part.take_last_write().await.unwrap().expect("a last write");
        assert!(matches!(
            last(),
            Err(StagingError::PartShort { held: 300_007 })
        ));
        drop(part);
        assert_eq!(
            staging.budget.left.load(Ordering::Acquire),
            DEFAULT_MAX_BUFFERED as isize,
            "every buffer's bytes are back in the budget"
        );
    }

    #[tokio::test]
    async fn the_buffers_of_all_parts_stay_within_the_budget() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path())
            .unwrap()
            .max_buffered(300 << 10);
        let left = || staging.budget.left.load(Ordering::Acquire);
        let (a, b) = (SessionId::new(), SessionId::new());
        let mut first = staging.open(a, 0).await.unwrap();
        first.write(Bytes::from(vec![1; 200 << 10])).await.unwrap();
        assert_eq!(first.buffer.len(), 200 << 10, "buffered within the budget");
        assert_eq!(left(), (300 - 256) << 10, "its buffer is counted");
        let mut second = staging.open(b, 0).await.unwrap();
        second.write(Bytes::from(vec![2; 64 << 10])).await.unwrap();
        assert_eq!(
            second.buffer.capacity(),
            0,
            "past the budget a chunk is written as it came"
        );
        second.write(Bytes::from(vec![3; 1000])).await.unwrap();
        second.finish().await.unwrap();
        first.finish().await.unwrap();
        assert_eq!(left(), 300 << 10, "finished parts give their buffers back");
        let mut expected = vec![2; 64 << 10];
        expected.extend([3; 1000]);
        assert_eq!(std::fs::read(staging.part(b)).unwrap(), expected);
        assert_eq!(std::fs::read(staging.part(a)).unwrap(), vec![1; 200 << 10]);
        // A part dropped unfinished gives its buffer back too.
        let mut dropped = staging.open(a, 200 << 10).await.unwrap();
        dropped.write(Bytes::from(vec![4; 10_000])).await.unwrap();
        assert!(left() < 300 << 10);
        drop(dropped);
        assert_eq!(left(), 300 << 10);
    }

    #[tokio::test]
    async fn a_part_shorter_than_the_offset_is_refused_with_its_length() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        let id = SessionId::new();
        // A small write fails at `finish`, which is when it reaches the file.
        async fn short_by(staging: &LocalStaging, id: SessionId, offset: u64) -> Option<u64> {
            let mut part = staging.open(id, offset).await.unwrap();
            part.write(Bytes::from_static(b"late")).await.unwrap();
            match part.finish().await {
                Err(StagingError::PartShort { held }) => Some(held),
                _ => None,
            }
        }
        // A missing part holds nothing: writing at 0 creates it, writing further on is short.
        assert_eq!(short_by(&staging, id, 10).await, Some(0));
        assert_eq!(staging.len(id).await.unwrap(), Some(0));
        write_part(&staging, id, 0, &[7; 5000]).await;
        // Short by one byte: refused, and nothing is written.
        assert_eq!(short_by(&staging, id, 5001).await, Some(5000));
        assert_eq!(staging.len(id).await.unwrap(), Some(5000));
        // The check also stops a large write at its first buffer.
        let mut part = staging.open(id, 6000).await.unwrap();
        let big = Bytes::from(vec![1; 3 * DEFAULT_BUFFER]);
        assert!(matches!(
            part.write(big).await,
            Err(StagingError::PartShort { held: 5000 })
        ));
        // Exactly at the end and inside are fine (a resent tail overwrites).
        write_part(&staging, id, 5000, b"end").await;
        write_part(&staging, id, 10, b"mid").await;
        let on_disk = std::fs::read(staging.part(id)).unwrap();
        assert_eq!(on_disk.len(), 5003);
        assert_eq!(&on_disk[10..13], b"mid");
        assert_eq!(&on_disk[5000..], b"end");
        // Opening alone neither creates nor checks anything.
        let other = SessionId::new();
        drop(staging.open(other, 99).await.unwrap());
        assert_eq!(staging.len(other).await.unwrap(), None);
    }

    #[tokio::test]
    async fn commit_without_fsync_is_still_a_no_clobber_move() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path())
            .unwrap()
            .sync_on_commit(false);
        let id = SessionId::new();
        staging.create(id).await.unwrap();
        // Large enough that the early writeback would have started if it were on.
        let data: Vec<u8> = (0..(WRITEBACK_EVERY as usize + 4096))
            .map(|i| (i % 251) as u8)
            .collect();
        write_part(&staging, id, 0, &data).await;
        assert!(staging.writeback.forget(id).is_none(), "no early writeback");
        let d = dest("/fast.bin");
        staging
            .commit(id, &d, data.len() as u64, false)
            .await
            .unwrap();
        assert_eq!(std::fs::read(root.path().join("fast.bin")).unwrap(), data);
        assert_eq!(staging.len(id).await.unwrap(), None);

        let other = SessionId::new();
        write_part(&staging, other, 0, b"x").await;
        assert!(matches!(
            staging.commit(other, &d, 1, false).await,
            Err(StagingError::DestinationExists)
        ));
    }

    #[tokio::test]
    async fn commit_truncates_stray_tail_and_refuses_short_parts() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        let id = SessionId::new();
        write_part(&staging, id, 0, b"hello world").await;
        assert!(matches!(
            staging.commit(id, &dest("/a"), 20, false).await,
            Err(StagingError::Incomplete { len: 11, total: 20 })
        ));
        staging.commit(id, &dest("/a"), 5, false).await.unwrap();
        assert_eq!(std::fs::read(root.path().join("a")).unwrap(), b"hello");
        assert!(matches!(
            staging.commit(id, &dest("/b"), 5, false).await,
            Err(StagingError::PartMissing)
        ));
        staging.discard(id).await.unwrap();
    }

    #[tokio::test]
    async fn destination_checks() {
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();
        assert!(matches!(
            staging.check_destination(&dest("/dir"), true).await,
            Err(StagingError::IsDirectory)
        ));
        assert!(matches!(
            staging.check_destination(&dest("/missing/x"), false).await,
            Err(StagingError::ParentMissing)
        ));
        assert!(matches!(
            staging.check_destination(&dest("/file/x"), false).await,
            Err(StagingError::Forbidden)
        ));
        staging
            .check_destination(&dest("/dir/x"), false)
            .await
            .unwrap();
        staging
            .check_destination(&dest("/file"), true)
            .await
            .unwrap();

        let creating = staging.clone().create_directories(true);
        creating
            .check_destination(&dest("/new/deep/x"), false)
            .await
            .unwrap();
        let id = SessionId::new();
        write_part(&creating, id, 0, b"abc").await;
        creating
            .commit(id, &dest("/new/deep/x"), 3, false)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(root.path().join("new/deep/x")).unwrap(),
            b"abc"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_are_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        assert!(matches!(
            staging.check_destination(&dest("/escape/x"), true).await,
            Err(StagingError::Forbidden)
        ));
        let id = SessionId::new();
        write_part(&staging, id, 0, b"abc").await;
        assert!(matches!(
            staging.commit(id, &dest("/escape/x"), 3, true).await,
            Err(StagingError::Forbidden)
        ));
        assert!(!outside.path().join("x").exists());
    }

    /// A root with a real folder `a`, `a/b` a link to a folder outside, and that folder.
    #[cfg(unix)]
    fn linked_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("x"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/b")).unwrap();
        (tmp, root, outside)
    }

    #[cfg(unix)]
    fn untouched(outside: &Path) {
        let names: Vec<_> = std::fs::read_dir(outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["x"]);
        assert_eq!(std::fs::read(outside.join("x")).unwrap(), b"outside");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_linked_intermediate_folder_is_refused_at_check_and_at_commit() {
        let (_tmp, root, outside) = linked_tree();
        let staging = LocalStaging::new(&root).unwrap();
        for overwrite in [false, true] {
            assert!(matches!(
                staging.check_destination(&dest("/a/b/x"), overwrite).await,
                Err(StagingError::Forbidden)
            ));
            let id = SessionId::new();
            write_part(&staging, id, 0, b"abc").await;
            assert!(matches!(
                staging.commit(id, &dest("/a/b/x"), 3, overwrite).await,
                Err(StagingError::Forbidden)
            ));
            assert!(matches!(
                staging.commit(id, &dest("/a/b/new"), 3, overwrite).await,
                Err(StagingError::Forbidden)
            ));
            // The part stays, for a later attempt or the discard.
            assert_eq!(staging.len(id).await.unwrap(), Some(3));
            staging.discard(id).await.unwrap();
        }
        untouched(&outside);
        assert_eq!(
            StagingError::Forbidden.ack().error_code().map(|e| e.0),
            Some(crate::protocol::Hresult::E_ACCESSDENIED)
        );
    }

    /// `a/d` is a real folder at the check and a link out of the root at the commit.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_folder_swapped_for_a_link_after_the_check_is_refused_at_commit() {
        let (_tmp, root, outside) = linked_tree();
        std::fs::create_dir(root.join("a/d")).unwrap();
        std::fs::write(root.join("a/d/x"), b"inside").unwrap();
        for (staging, overwrite) in [
            (LocalStaging::new(&root).unwrap(), true),
            (LocalStaging::new(&root).unwrap(), false),
            (
                LocalStaging::new(&root).unwrap().create_directories(true),
                false,
            ),
        ] {
            let name = if overwrite { "/a/d/x" } else { "/a/d/y" };
            staging
                .check_destination(&dest(name), overwrite)
                .await
                .unwrap();
            let id = SessionId::new();
            write_part(&staging, id, 0, b"abc").await;
            std::fs::rename(root.join("a/d"), root.join("a/real")).unwrap();
            std::os::unix::fs::symlink(&outside, root.join("a/d")).unwrap();
            assert!(matches!(
                staging.commit(id, &dest(name), 3, overwrite).await,
                Err(StagingError::Forbidden)
            ));
            // Recovery's question does not follow the link either.
            assert!(!staging.committed(id, &dest("/a/d/x"), 7).await.unwrap());
            std::fs::remove_file(root.join("a/d")).unwrap();
            std::fs::rename(root.join("a/real"), root.join("a/d")).unwrap();
            staging.discard(id).await.unwrap();
        }
        assert_eq!(std::fs::read(root.join("a/d/x")).unwrap(), b"inside");
        untouched(&outside);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_link_at_the_destination_is_replaced_not_followed() {
        let (_tmp, root, outside) = linked_tree();
        let staging = LocalStaging::new(&root).unwrap();
        let link = root.join("a/link.bin");
        std::os::unix::fs::symlink(outside.join("x"), &link).unwrap();
        let d = dest("/a/link.bin");
        // Without overwrites a link is an existing file.
        assert!(matches!(
            staging.check_destination(&d, false).await,
            Err(StagingError::DestinationExists)
        ));
        let id = SessionId::new();
        write_part(&staging, id, 0, b"replacement").await;
        assert!(matches!(
            staging.commit(id, &d, 11, false).await,
            Err(StagingError::DestinationExists)
        ));
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        // With them the link itself is replaced.
        staging.check_destination(&d, true).await.unwrap();
        staging.commit(id, &d, 11, true).await.unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read(&link).unwrap(), b"replacement");
        untouched(&outside);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn create_directories_never_creates_through_a_link() {
        let (_tmp, root, outside) = linked_tree();
        let staging = LocalStaging::new(&root).unwrap().create_directories(true);
        let d = dest("/a/b/new/deep/x");
        assert!(matches!(
            staging.check_destination(&d, false).await,
            Err(StagingError::Forbidden)
        ));
        let id = SessionId::new();
        write_part(&staging, id, 0, b"abc").await;
        assert!(matches!(
            staging.commit(id, &d, 3, false).await,
            Err(StagingError::Forbidden)
        ));
        untouched(&outside);
        // Below a real folder, the missing ones are created.
        staging
            .commit(id, &dest("/a/c/deep/x"), 3, false)
            .await
            .unwrap();
        assert_eq!(std::fs::read(root.join("a/c/deep/x")).unwrap(), b"abc");
    }

    /// Part files are opened beneath the staging folder's handle, never through a link.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_link_in_place_of_a_part_is_refused() {
        let (_tmp, root, outside) = linked_tree();
        let staging = LocalStaging::new(&root).unwrap();
        let id = SessionId::new();
        std::os::unix::fs::symlink(outside.join("x"), staging.part(id)).unwrap();
        let mut part = staging.open(id, 0).await.unwrap();
        part.write(Bytes::from_static(b"through")).await.unwrap();
        assert!(matches!(part.finish().await, Err(StagingError::Forbidden)));
        assert!(matches!(
            staging.create(id).await,
            Err(StagingError::Forbidden)
        ));
        assert!(matches!(
            staging.len(id).await,
            Err(StagingError::Forbidden)
        ));
        assert!(matches!(
            staging.commit(id, &dest("/a/y"), 7, true).await,
            Err(StagingError::Forbidden)
        ));
        staging.discard(id).await.unwrap();
        assert!(std::fs::symlink_metadata(staging.part(id)).is_err());
        untouched(&outside);
    }

    /// The staging folder inside the root is resolved beneath it: a link there is refused at
    /// start-up.
    #[cfg(unix)]
    #[test]
    fn a_linked_staging_folder_is_refused() {
        let (_tmp, root, outside) = linked_tree();
        std::os::unix::fs::symlink(&outside, root.join(".bits")).unwrap();
        let error = LocalStaging::new(&root).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        untouched(&outside);
        // A root that is itself a link is the operator's choice.
        let linked_root = root.join("a/b");
        let staging = LocalStaging::new(&linked_root).unwrap();
        assert_eq!(staging.root(), linked_root);
        assert!(outside.join(".bits/parts").is_dir());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let staging = LocalStaging::new(root.path()).unwrap();
        let id = SessionId::new();
        staging.create(id).await.unwrap();
        let mode = std::fs::metadata(staging.part(id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
