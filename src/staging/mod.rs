//! Where the bytes of open sessions wait, and how a finished file reaches its destination:
//! the [`Staging`] trait and [`LocalStaging`].
//!
//! Session records live in the [`SessionStore`](crate::store::SessionStore); the bytes live
//! here. [`LocalStaging`], the default, keeps a part file per session in `ROOT/.bits/parts`,
//! on the destinations' filesystem, and commits with an fsync, an atomic no-clobber link (or a
//! rename when overwrites are allowed) and an fsync of the folder. The part, not the record,
//! is the truth about what arrived: a staging's [`open`](Staging::open) (or its first write)
//! refuses to write past what the part holds with [`StagingError::PartShort`], and the
//! session resumes from there. Give another staging to the layer with
//! [`BitsLayerBuilder::staging`](crate::BitsLayerBuilder::staging).

#[cfg(any(test, feature = "conformance"))]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
pub(crate) mod dir;
mod local;
#[cfg(feature = "s3")]
#[cfg_attr(docsrs, doc(cfg(feature = "s3")))]
mod s3;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use http::StatusCode;

pub(crate) use local::LocalPart;
pub use local::LocalStaging;
#[cfg(feature = "s3")]
#[cfg_attr(docsrs, doc(cfg(feature = "s3")))]
pub use s3::{MIN_PART_SIZE, S3ConfigError, S3Part, S3Staging, S3StagingBuilder};

use crate::BoxFuture;
use crate::destination::Destination;
use crate::protocol::{Ack, Hresult};
use crate::session::SessionId;

/// Keeps one part file per open session and commits it to its destination.
///
/// Contract:
/// * a part is written only at offsets the handler chooses (the session's `received`), so
///   its length may exceed `received` after a crash but never holds gaps below it;
/// * [`Staging::commit`] is atomic: afterwards the destination holds exactly `total` bytes of
///   the part, or is untouched; without `overwrite` an existing destination is never replaced;
/// * [`Staging::discard`] is idempotent and never touches a destination;
/// * nothing is ever created, replaced or removed outside the upload root: a destination's
///   folders are plain names below the root (the [`Destination`] guarantees that much), but
///   a folder on the way may be a symbolic link, or be swapped for one at any moment by
///   someone else with access to the tree. A filesystem staging must then refuse with
///   [`StagingError::Forbidden`] rather than follow it, atomically with each operation, not
///   by a check beforehand. [`LocalStaging`] resolves every operation beneath a handle of the
///   root without following links (see its docs).
pub trait Staging: Send + Sync + 'static {
    /// The writer [`Staging::open`] returns.
    type Part: PartWriter;

    /// Checks, before a session is created, that `destination` may be uploaded: its folder
    /// exists, it is not a directory, and it does not exist unless `overwrite`.
    fn check_destination(
        &self,
        destination: &Destination,
        overwrite: bool,
    ) -> impl Future<Output = Result<(), StagingError>> + Send;

    /// Creates the (empty) part for a new session.
    fn create(&self, id: SessionId) -> impl Future<Output = Result<(), StagingError>> + Send;

    /// Creates the (empty) part for a new session whose bytes will be committed to
    /// `destination` (the layer calls this rather than [`create`](Staging::create) for every
    /// session but upload-reply ones, whose bytes go to the application). A staging that can
    /// write in place uses it: [`S3Staging`] makes the multipart upload at the destination's
    /// key, so that the commit completes it there instead of copying. The commit of such a
    /// part still gets its destination, the same one. The default is
    /// [`create`](Staging::create).
    fn create_for(
        &self,
        id: SessionId,
        destination: &Destination,
    ) -> impl Future<Output = Result<(), StagingError>> + Send {
        let _ = destination;
        self.create(id)
    }

    /// The part's current length, or `None` if it does not exist.
    fn len(&self, id: SessionId) -> impl Future<Output = Result<Option<u64>, StagingError>> + Send;

    /// Opens the part for writing at `offset`, creating it if it does not exist.
    ///
    /// The part is the ground truth of what a session holds: it must hold at least `offset`
    /// bytes. If it holds fewer (data lost to a power loss without fsync, or a part deleted
    /// behind the server's back), this call, or the writer's first [`PartWriter::write`] or
    /// its [`PartWriter::finish`], fails with [`StagingError::PartShort`] naming the length
    /// found (0 for a missing part), and the session is rewound to it. An implementation may
    /// defer its I/O, and so the check, to the first write.
    fn open(
        &self,
        id: SessionId,
        offset: u64,
    ) -> impl Future<Output = Result<Self::Part, StagingError>> + Send;

    /// Moves the first `total` bytes of the part to `destination`, atomically.
    fn commit(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
        overwrite: bool,
    ) -> impl Future<Output = Result<(), StagingError>> + Send;

    /// Deletes the part if it exists.
    fn discard(&self, id: SessionId) -> impl Future<Output = Result<(), StagingError>> + Send;

    /// Ids of every part present (for recovery scans).
    fn list(&self) -> impl Future<Output = Result<Vec<SessionId>, StagingError>> + Send;

    /// Whether the part of `id` has already been committed to `destination` with `total`
    /// bytes: a commit interrupted (by a crash) after the file reached its destination but
    /// before the session record said so. Asked by start-up recovery and by a commit that
    /// finds its part missing; a staging that can tell finishes such a commit (e.g. removes
    /// what is left of the part) and answers `true`. The default answers `false`.
    fn committed(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
    ) -> impl Future<Output = Result<bool, StagingError>> + Send {
        let _ = (id, destination, total);
        async { Ok(false) }
    }

    /// Makes the data of every part durable; called once, at the end of
    /// [`BitsHandle::shutdown`](crate::BitsHandle::shutdown). The default does nothing.
    fn close(&self) -> impl Future<Output = Result<(), StagingError>> + Send {
        async { Ok(()) }
    }

    /// Reads the first `total` bytes of a complete part, for an upload-reply application
    /// when the part has no [local path](Staging::path): the layer copies them into a local
    /// file that the application gets, and deletes it with the session. The default reads the
    /// file at [`Staging::path`], and fails with [`StagingError::PartMissing`] without one.
    fn read(
        &self,
        id: SessionId,
        total: u64,
    ) -> impl Future<Output = Result<PartReader, StagingError>> + Send {
        let path = self.path(id);
        async move {
            use tokio::io::AsyncReadExt;
            let path = path.ok_or(StagingError::PartMissing)?;
            let file = tokio::fs::File::open(path).await?;
            Ok(Box::pin(file.take(total)) as PartReader)
        }
    }

    /// The part's path in the local filesystem, if it has one. Upload-reply uses it: the
    /// completion handler and by-reference notifications get the staged file by path (without
    /// one, a local copy made by [`Staging::read`]). The default says there is none.
    fn path(&self, id: SessionId) -> Option<PathBuf> {
        let _ = id;
        None
    }

    /// Checks that the staging takes new data, for readiness probes
    /// ([`BitsHandle::readiness`](crate::BitsHandle::readiness)): `Ok(Some(bytes))` with the
    /// space free where parts are written, if the staging knows it. The default creates and
    /// discards the part of a session that does not exist, and knows no free space.
    fn check(&self) -> impl Future<Output = Result<Option<u64>, StagingError>> + Send {
        async {
            let probe = SessionId::new();
            self.create(probe).await?;
            self.discard(probe).await?;
            Ok(None)
        }
    }

    /// Whether this staging keeps the replies of upload-reply sessions, so that every node of
    /// a farm serves a reply URL (the `*_reply` methods below), rather than the layer's local
    /// reply folder. The default says no, and the other reply methods are never called.
    fn keeps_replies(&self) -> bool {
        false
    }

    /// Stores `len` bytes from `reply` as the reply of session `id`, replacing any earlier
    /// one; after `Ok` any node reads it with [`get_reply`](Staging::get_reply).
    fn put_reply(
        &self,
        id: SessionId,
        reply: PartReader,
        len: u64,
    ) -> impl Future<Output = Result<(), StagingError>> + Send {
        let _ = (id, reply, len);
        async { Err(StagingError::Io(io::ErrorKind::Unsupported.into())) }
    }

    /// `len` bytes of the reply of session `id`, from its byte `offset`.
    fn get_reply(
        &self,
        id: SessionId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<PartReader, StagingError>> + Send {
        let _ = (id, offset, len);
        async { Err(StagingError::Io(io::ErrorKind::Unsupported.into())) }
    }

    /// Deletes the reply of session `id` if there is one (idempotent).
    fn remove_reply(&self, id: SessionId) -> impl Future<Output = Result<(), StagingError>> + Send {
        let _ = id;
        async { Ok(()) }
    }

    /// Ids of every session with a stored reply (for recovery scans).
    fn list_replies(&self) -> impl Future<Output = Result<Vec<SessionId>, StagingError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// The bytes of a part, as [`Staging::read`] gives them.
pub type PartReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

/// Writes consecutive bytes into a part, from the offset it was opened at.
pub trait PartWriter: Send + 'static {
    /// Appends `chunk`. May buffer; bytes are only guaranteed to be in the part after
    /// [`PartWriter::finish`].
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), StagingError>> + Send;

    /// Writes out everything buffered. After `Ok`, every byte passed to `write` is in the part
    /// and would be found there by a restarted process.
    fn finish(self) -> impl Future<Output = Result<(), StagingError>> + Send;

    /// The request body has paused (no data for a moment): a chance to write out what is
    /// buffered and give back the buffer's memory, so that a slow client does not keep a
    /// buffer filled. Called only once the writer was handed 64 KiB or more since the last
    /// call (or since it was opened), and never after the fragment's last byte. Nothing is
    /// promised about durability until [`finish`](Self::finish).
    /// The default does nothing (a writer that must buffer, such as one that uploads parts of
    /// a minimum size, keeps its buffer).
    fn idle(&mut self) -> impl Future<Output = Result<(), StagingError>> + Send {
        async { Ok(()) }
    }
}

/// A staging operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StagingError {
    /// The destination exists and overwrites are not allowed.
    #[error("the destination exists and may not be overwritten")]
    DestinationExists,
    /// The destination is a directory.
    #[error("the destination is a directory")]
    IsDirectory,
    /// A folder on the way to the destination does not exist.
    #[error("the destination's folder does not exist")]
    ParentMissing,
    /// The path to the destination goes through a symbolic link or a file (found when it was
    /// checked, or when it was resolved for the commit), or a link stands where the staging
    /// keeps its own files.
    #[error("the destination path is not allowed")]
    Forbidden,
    /// The destination cannot take the file now; try again later. A custom commit may return
    /// it ("not now"); the [`CompletionPolicy`](crate::CompletionPolicy) decides what the
    /// client is told.
    #[error("the destination is busy")]
    Busy(#[source] Option<crate::BoxError>),
    /// The session's part is gone.
    #[error("the session's staged data is missing")]
    PartMissing,
    /// The part holds fewer bytes than the offset a write was to start at; the session
    /// resumes from `held`.
    #[error("the staged data holds {held} bytes, fewer than the session recorded")]
    PartShort {
        /// Bytes in the part.
        held: u64,
    },
    /// The part is shorter than the file it should commit.
    #[error("the staged data holds {len} bytes, fewer than the {total} expected")]
    Incomplete {
        /// Bytes in the part.
        len: u64,
        /// Bytes expected.
        total: u64,
    },
    /// An I/O error.
    #[error("staging I/O failed")]
    Io(#[from] io::Error),
}

impl StagingError {
    /// The Ack for this error: 403 for an existing destination or a forbidden path (including
    /// an I/O error that is a refused symbolic link, `ELOOP`), 400 for a directory, 404 for a missing folder, 416 (resend from the reported offset) for a short
    /// part, 500 with the disk-full HRESULT when out of space, and a transient 500 otherwise.
    pub fn ack(&self) -> Ack {
        let (status, code) = match self {
            Self::DestinationExists | Self::Forbidden => {
                (StatusCode::FORBIDDEN, Hresult::E_ACCESSDENIED)
            }
            // A symbolic link where the server's own files are (a part, a reply): refused
            // like one on the way to a destination.
            Self::Io(e) if dir::is_refused_link(e) => {
                (StatusCode::FORBIDDEN, Hresult::E_ACCESSDENIED)
            }
            Self::IsDirectory => (StatusCode::BAD_REQUEST, Hresult::E_INVALIDARG),
            // Like a gap: the client resends from the offset the Ack reports.
            Self::PartShort { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, Hresult::S_OK),
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, Hresult::FILE_EXISTS),
            Self::ParentMissing => (StatusCode::NOT_FOUND, Hresult::PATH_NOT_FOUND),
            Self::Io(e) if crate::fs::is_disk_full(e) => {
                (StatusCode::INTERNAL_SERVER_ERROR, Hresult::DISK_FULL)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, Hresult::E_FAIL),
        };
        Ack::error(status, code)
    }

    /// Whether the commit may succeed later: the destination exists (and someone may remove
    /// it) or the staging said it is busy.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::DestinationExists | Self::Busy(_))
    }

    /// Whether the server, not the client, is at fault (worth an error log line).
    pub fn is_server_fault(&self) -> bool {
        matches!(
            self,
            Self::Io(_) | Self::PartMissing | Self::PartShort { .. } | Self::Incomplete { .. }
        )
    }
}

/// Object-safe mirror of [`Staging`].
pub(crate) trait DynStaging: Send + Sync {
    fn check_destination<'a>(
        &'a self,
        destination: &'a Destination,
        overwrite: bool,
    ) -> BoxFuture<'a, Result<(), StagingError>>;
    fn create(&self, id: SessionId) -> BoxFuture<'_, Result<(), StagingError>>;
    fn create_for<'a>(
        &'a self,
        id: SessionId,
        destination: &'a Destination,
    ) -> BoxFuture<'a, Result<(), StagingError>>;
    fn len(&self, id: SessionId) -> BoxFuture<'_, Result<Option<u64>, StagingError>>;
    fn open(
        &self,
        id: SessionId,
        offset: u64,
    ) -> BoxFuture<'_, Result<Box<dyn DynPart>, StagingError>>;
    fn commit<'a>(
        &'a self,
        id: SessionId,
        destination: &'a Destination,
        total: u64,
        overwrite: bool,
    ) -> BoxFuture<'a, Result<(), StagingError>>;
    fn discard(&self, id: SessionId) -> BoxFuture<'_, Result<(), StagingError>>;
    fn list(&self) -> BoxFuture<'_, Result<Vec<SessionId>, StagingError>>;
    fn committed<'a>(
        &'a self,
        id: SessionId,
        destination: &'a Destination,
        total: u64,
    ) -> BoxFuture<'a, Result<bool, StagingError>>;
    fn close(&self) -> BoxFuture<'_, Result<(), StagingError>>;
    fn read(&self, id: SessionId, total: u64) -> BoxFuture<'_, Result<PartReader, StagingError>>;
    fn path(&self, id: SessionId) -> Option<PathBuf>;
    fn keeps_replies(&self) -> bool;
    fn check(&self) -> BoxFuture<'_, Result<Option<u64>, StagingError>>;
    fn put_reply(
        &self,
        id: SessionId,
        reply: PartReader,
        len: u64,
    ) -> BoxFuture<'_, Result<(), StagingError>>;
    fn get_reply(
        &self,
        id: SessionId,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<PartReader, StagingError>>;
    fn remove_reply(&self, id: SessionId) -> BoxFuture<'_, Result<(), StagingError>>;
    fn list_replies(&self) -> BoxFuture<'_, Result<Vec<SessionId>, StagingError>>;
}

pub(crate) trait DynPart: Send {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), StagingError>>;
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<(), StagingError>>;
    fn idle(&mut self) -> BoxFuture<'_, Result<(), StagingError>>;
    /// The part as its own type, for the layer's fast path of [`LocalPart`]s
    /// ([`LocalPart::take_last_write`]).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// A part's last write, taken out to run on a blocking thread with other work after it (see
/// [`LocalPart::take_last_write`]). After `Ok`, the part is as [`PartWriter::finish`] leaves
/// it.
pub(crate) type LastWrite = Box<dyn FnOnce() -> Result<(), StagingError> + Send>;

impl<P: PartWriter> DynPart for P {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(PartWriter::write(self, chunk))
    }
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<(), StagingError>> {
        Box::pin(PartWriter::finish(*self))
    }
    fn idle(&mut self) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(PartWriter::idle(self))
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl<T: Staging> DynStaging for T {
    fn check_destination<'a>(
        &'a self,
        destination: &'a Destination,
        overwrite: bool,
    ) -> BoxFuture<'a, Result<(), StagingError>> {
        Box::pin(Staging::check_destination(self, destination, overwrite))
    }
    fn create(&self, id: SessionId) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(Staging::create(self, id))
    }
    fn create_for<'a>(
        &'a self,
        id: SessionId,
        destination: &'a Destination,
    ) -> BoxFuture<'a, Result<(), StagingError>> {
        Box::pin(Staging::create_for(self, id, destination))
    }
    fn len(&self, id: SessionId) -> BoxFuture<'_, Result<Option<u64>, StagingError>> {
        Box::pin(Staging::len(self, id))
    }
    fn open(
        &self,
        id: SessionId,
        offset: u64,
    ) -> BoxFuture<'_, Result<Box<dyn DynPart>, StagingError>> {
        Box::pin(async move {
            let part = Staging::open(self, id, offset).await?;
            Ok(Box::new(part) as Box<dyn DynPart>)
        })
    }
    fn commit<'a>(
        &'a self,
        id: SessionId,
        destination: &'a Destination,
        total: u64,
        overwrite: bool,
    ) -> BoxFuture<'a, Result<(), StagingError>> {
        Box::pin(Staging::commit(self, id, destination, total, overwrite))
    }
    fn discard(&self, id: SessionId) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(Staging::discard(self, id))
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<SessionId>, StagingError>> {
        Box::pin(Staging::list(self))
    }
    fn committed<'a>(
        &'a self,
        id: SessionId,
        destination: &'a Destination,
        total: u64,
    ) -> BoxFuture<'a, Result<bool, StagingError>> {
        Box::pin(Staging::committed(self, id, destination, total))
    }
    fn close(&self) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(Staging::close(self))
    }
    fn read(&self, id: SessionId, total: u64) -> BoxFuture<'_, Result<PartReader, StagingError>> {
        Box::pin(Staging::read(self, id, total))
    }
    fn path(&self, id: SessionId) -> Option<PathBuf> {
        Staging::path(self, id)
    }
    fn keeps_replies(&self) -> bool {
        Staging::keeps_replies(self)
    }
    fn check(&self) -> BoxFuture<'_, Result<Option<u64>, StagingError>> {
        Box::pin(Staging::check(self))
    }
    fn put_reply(
        &self,
        id: SessionId,
        reply: PartReader,
        len: u64,
    ) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(Staging::put_reply(self, id, reply, len))
    }
    fn get_reply(
        &self,
        id: SessionId,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<PartReader, StagingError>> {
        Box::pin(Staging::get_reply(self, id, offset, len))
    }
    fn remove_reply(&self, id: SessionId) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(Staging::remove_reply(self, id))
    }
    fn list_replies(&self) -> BoxFuture<'_, Result<Vec<SessionId>, StagingError>> {
        Box::pin(Staging::list_replies(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_detection() {
        let full = io::Error::from_raw_os_error(if cfg!(unix) { 28 } else { 112 });
        assert_eq!(
            StagingError::Io(full).ack().error_code().map(|e| e.0),
            Some(Hresult::DISK_FULL)
        );
        assert_eq!(
            StagingError::ParentMissing.ack().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            StagingError::DestinationExists.ack().status(),
            StatusCode::FORBIDDEN
        );
    }

    /// A symbolic link refused by a reply or part operation answers like a forbidden path.
    #[cfg(unix)]
    #[test]
    fn a_refused_link_is_access_denied() {
        let refused = StagingError::Io(rustix::io::Errno::LOOP.into()).ack();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            refused.error_code().map(|e| e.0),
            Some(Hresult::E_ACCESSDENIED)
        );
        assert_eq!(
            StagingError::Forbidden.ack().error_code().map(|e| e.0),
            Some(Hresult::E_ACCESSDENIED)
        );
    }
}
