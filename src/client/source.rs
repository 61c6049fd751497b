//! What is uploaded: a file, bytes in memory, or a stream of known length.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;

use super::Error;
use super::progress::Tracker;

/// Bytes per body frame, and per read from a file.
const CHUNK: u64 = 256 * 1024;
/// File chunks read ahead of the socket.
const READ_AHEAD: usize = 4;

/// The bytes of an upload: a file, bytes in memory, or a stream whose length is known up
/// front (BITS states the total size in every fragment).
///
/// A file or bytes can be re-read from any offset, which the protocol needs whenever the
/// server reports fewer bytes than were sent (an interrupted fragment, a lost session). A
/// stream keeps only the current fragment: it survives retries and 413s, but a server that
/// asks for earlier bytes, or loses the session after the first fragment, ends the upload with
/// [`Error::NotRewindable`].
pub struct UploadSource {
    kind: Kind,
    name: Option<String>,
}

enum Kind {
    File {
        path: PathBuf,
        file: Arc<std::fs::File>,
        len: u64,
        modified: Option<SystemTime>,
    },
    Bytes(Bytes),
    Reader {
        reader: Pin<Box<dyn AsyncRead + Send>>,
        len: u64,
        /// Bytes `[window_start, window_start + window.len())`, the current fragment.
        window: Bytes,
        window_start: u64,
    },
}

impl std::fmt::Debug for UploadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("UploadSource");
        match &self.kind {
            Kind::File { path, len, .. } => d.field("file", path).field("len", len),
            Kind::Bytes(b) => d.field("bytes", &b.len()),
            Kind::Reader { len, .. } => d.field("reader", len),
        };
        d.field("name", &self.name).finish()
    }
}

impl UploadSource {
    /// A file. Its size and modification time are taken now; if either changes during the
    /// upload, the upload fails with [`Error::LocalFileChanged`], as a BITS job does.
    pub async fn file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let opened = path.clone();
        let source_error = |e| Error::Source {
            path: Some(path.clone()),
            source: e,
        };
        let (file, len, modified) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&opened)?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file",
                ));
            }
            Ok((file, meta.len(), meta.modified().ok()))
        })
        .await
        .map_err(|e| source_error(io::Error::other(e)))?
        .map_err(source_error)?;
        let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        Ok(Self {
            kind: Kind::File {
                path,
                file: Arc::new(file),
                len,
                modified,
            },
            name,
        })
    }

    /// Bytes in memory.
    pub fn bytes(bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Bytes(bytes.into()),
            name: None,
        }
    }

    /// A stream of exactly `len` bytes. See the type's docs for what a stream cannot do.
    pub fn reader(reader: impl AsyncRead + Send + 'static, len: u64) -> Self {
        Self {
            kind: Kind::Reader {
                reader: Box::pin(reader),
                len,
                window: Bytes::new(),
                window_start: 0,
            },
            name: None,
        }
    }

    /// Sets the name sent as `Content-Name` (informational; servers never use it as a path).
    /// A file's own name is the default.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The total size.
    pub fn len(&self) -> u64 {
        match &self.kind {
            Kind::File { len, .. } | Kind::Reader { len, .. } => *len,
            Kind::Bytes(b) => b.len() as u64,
        }
    }

    /// Whether the upload is of an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `Content-Name` value: the name if it is one Windows would send (plain ASCII, no
    /// path characters, at most 260 characters).
    pub(crate) fn content_name(&self) -> Option<http::HeaderValue> {
        let name = self.name.as_deref()?;
        let allowed = !name.is_empty()
            && name.len() <= 260
            && name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            && !name.contains(['\\', '/', ':', '*', '?', '"', '<', '>', '|']);
        allowed
            .then(|| http::HeaderValue::from_str(name).ok())
            .flatten()
    }

    /// The bytes `[offset, offset + len)`, ready to be sent (perhaps several times).
    pub(crate) async fn fragment(&mut self, offset: u64, len: u64) -> Result<FragmentData, Error> {
        match &mut self.kind {
            Kind::Bytes(bytes) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX);
                if end > bytes.len() || start > end {
                    return Err(out_of_range(None));
                }
                Ok(FragmentData::Bytes(bytes.slice(start..end)))
            }
            Kind::File {
                path,
                file,
                len: total,
                modified,
            } => {
                let handle = Arc::clone(file);
                let meta = tokio::task::spawn_blocking(move || handle.metadata())
                    .await
                    .map_err(io::Error::other)
                    .and_then(|m| m)
                    .map_err(|e| Error::Source {
                        path: Some(path.clone()),
                        source: e,
                    })?;
                if meta.len() != *total || meta.modified().ok() != *modified {
                    return Err(Error::LocalFileChanged { path: path.clone() });
                }
                if offset.saturating_add(len) > *total {
                    return Err(out_of_range(Some(path.clone())));
                }
                Ok(FragmentData::File {
                    file: Arc::clone(file),
                    offset,
                    len,
                })
            }
            Kind::Reader {
                reader,
                len: total,
                window,
                window_start,
            } => {
                if offset.saturating_add(len) > *total {
                    return Err(out_of_range(None));
                }
                if offset < *window_start {
                    return Err(Error::NotRewindable {
                        offset,
                        position: *window_start,
                    });
                }
                let window_end = *window_start + window.len() as u64;
                if offset <= window_end {
                    let skip = usize::try_from(offset - *window_start).unwrap_or(usize::MAX);
                    *window = window.slice(skip.min(window.len())..);
                } else {
                    // The server has more than we read (a resumed session): skip ahead.
                    let gap = offset - window_end;
                    let copied =
                        tokio::io::copy(&mut reader.as_mut().take(gap), &mut tokio::io::sink())
                            .await
                            .map_err(|e| Error::Source {
                                path: None,
                                source: e,
                            })?;
                    if copied != gap {
                        return Err(short_stream());
                    }
                    *window = Bytes::new();
                }
                *window_start = offset;
                let want = usize::try_from(len).map_err(|_| out_of_range(None))?;
                if window.len() < want {
                    let mut buf = BytesMut::with_capacity(want);
                    buf.extend_from_slice(window);
                    while buf.len() < want {
                        let n = reader.read_buf(&mut buf).await.map_err(|e| Error::Source {
                            path: None,
                            source: e,
                        })?;
                        if n == 0 {
                            return Err(short_stream());
                        }
                    }
                    *window = buf.freeze();
                }
                Ok(FragmentData::Bytes(window.slice(..want)))
            }
        }
    }
}

fn out_of_range(path: Option<PathBuf>) -> Error {
    Error::Source {
        path,
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            "the server asked for bytes past the end",
        ),
    }
}

fn short_stream() -> Error {
    Error::Source {
        path: None,
        source: io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the stream ended before its stated length",
        ),
    }
}

/// One fragment's bytes, re-sendable.
#[derive(Debug, Clone)]
pub(crate) enum FragmentData {
    Bytes(Bytes),
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u64,
    },
}

impl FragmentData {
    /// A request body for these bytes that reports progress as it is sent.
    pub(crate) fn body(&self, tracker: Arc<Tracker>) -> FragmentBody {
        match self {
            Self::Bytes(bytes) => FragmentBody {
                source: BodySource::Bytes(bytes.clone()),
                remaining: bytes.len() as u64,
                tracker,
            },
            Self::File { file, offset, len } => FragmentBody {
                source: BodySource::Channel(read_ahead(Arc::clone(file), *offset, *len)),
                remaining: *len,
                tracker,
            },
        }
    }
}

/// Reads `[offset, offset + len)` of `file` in a task, [`READ_AHEAD`] chunks ahead of the
/// body. Dropping the receiver stops it.
fn read_ahead(
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = CHUNK.min(end - at);
            let file = Arc::clone(&file);
            let chunk = tokio::task::spawn_blocking(move || read_exact_at(&file, at, n))
                .await
                .map_err(io::Error::other)
                .and_then(|r| r);
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
            at += n;
        }
    });
    rx
}

fn read_exact_at(file: &std::fs::File, offset: u64, len: u64) -> io::Result<Bytes> {
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = read_at(file, &mut buf[filled..], offset + filled as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file is shorter than when the upload began",
            ));
        }
        filled += n;
    }
    Ok(Bytes::from(buf))
}

#[cfg(unix)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// A fragment's request body: frames of up to [`CHUNK`] bytes, an exact size hint (so the
/// request carries `Content-Length`), progress reported per frame.
pub(crate) struct FragmentBody {
    source: BodySource,
    remaining: u64,
    tracker: Arc<Tracker>,
}

enum BodySource {
    Bytes(Bytes),
    Channel(mpsc::Receiver<io::Result<Bytes>>),
}

impl http_body::Body for FragmentBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let chunk = match &mut this.source {
            BodySource::Bytes(bytes) => {
                let n = bytes.len().min(CHUNK as usize);
                bytes.split_to(n)
            }
            BodySource::Channel(rx) => match ready!(rx.poll_recv(cx)) {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the fragment's reader stopped early",
                    ))));
                }
            },
        };
        let n = chunk.len() as u64;
        if n == 0 || n > this.remaining {
            return Poll::Ready(Some(Err(io::Error::other("fragment body length mismatch"))));
        }
        this.remaining -= n;
        this.tracker.sent(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn tracker() -> Arc<Tracker> {
        Arc::new(Tracker::new(0, None))
    }

    async fn collect(data: &FragmentData) -> Vec<u8> {
        data.body(tracker())
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn file_fragments_read_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data = pattern(3 * CHUNK as usize + 17);
        std::fs::write(&path, &data).unwrap();
        let mut source = UploadSource::file(&path).await.unwrap();
        assert_eq!(source.len(), data.len() as u64);
        assert_eq!(source.content_name().unwrap(), "f.bin");
        for (offset, len) in [
            (0, data.len()),
            (5, 1),
            (CHUNK as usize - 1, CHUNK as usize + 2),
            (data.len(), 0),
        ] {
            let fragment = source.fragment(offset as u64, len as u64).await.unwrap();
            assert_eq!(
                collect(&fragment).await,
                &data[offset..offset + len],
                "{offset}+{len}"
            );
        }
        assert!(source.fragment(data.len() as u64, 1).await.is_err());
    }

    #[tokio::test]
    async fn a_changed_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, pattern(1000)).unwrap();
        let mut source = UploadSource::file(&path).await.unwrap();
        source.fragment(0, 10).await.unwrap();
        std::fs::write(&path, pattern(999)).unwrap();
        assert!(matches!(
            source.fragment(10, 10).await,
            Err(Error::LocalFileChanged { .. })
        ));
    }

    #[tokio::test]
    async fn a_truncated_file_fails_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, pattern(2 * CHUNK as usize)).unwrap();
        let mut source = UploadSource::file(&path).await.unwrap();
        let fragment = source.fragment(0, 2 * CHUNK).await.unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(CHUNK)
            .unwrap();
        assert!(fragment.body(tracker()).collect().await.is_err());
    }

    #[tokio::test]
    async fn streams_keep_the_current_fragment_only() {
        let data = pattern(100_000);
        let mut source = UploadSource::reader(std::io::Cursor::new(data.clone()), 100_000);
        let a = source.fragment(0, 40_000).await.unwrap();
        assert_eq!(collect(&a).await, &data[..40_000]);
        // A retry of the same fragment and a 413 shrink within it both work.
        let again = source.fragment(0, 20_000).await.unwrap();
        assert_eq!(collect(&again).await, &data[..20_000]);
        // The server took 30,000: continue from there (inside the window, then past it).
        let b = source.fragment(30_000, 40_000).await.unwrap();
        assert_eq!(collect(&b).await, &data[30_000..70_000]);
        // Going back before the window is impossible.
        assert!(matches!(
            source.fragment(10_000, 10).await,
            Err(Error::NotRewindable {
                offset: 10_000,
                position: 30_000
            })
        ));
        // Jumping ahead skips bytes (a resumed session).
        let c = source.fragment(90_000, 10_000).await.unwrap();
        assert_eq!(collect(&c).await, &data[90_000..]);
    }

    #[tokio::test]
    async fn a_short_stream_is_an_error() {
        let mut source = UploadSource::reader(std::io::Cursor::new(pattern(10)), 20);
        assert!(matches!(
            source.fragment(0, 20).await,
            Err(Error::Source { .. })
        ));
        let mut source = UploadSource::reader(std::io::Cursor::new(pattern(10)), 20);
        assert!(source.fragment(15, 5).await.is_err());
    }

    #[tokio::test]
    async fn bytes_and_body_frames() {
        let data = pattern(CHUNK as usize * 2 + 1);
        let mut source = UploadSource::bytes(data.clone()).with_name("x.bin");
        let fragment = source.fragment(0, data.len() as u64).await.unwrap();
        let tracker = tracker();
        let mut body = fragment.body(Arc::clone(&tracker));
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(data.len() as u64)
        );
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            assert!(frame.unwrap().data_ref().unwrap().len() <= CHUNK as usize);
            frames += 1;
        }
        assert_eq!(frames, 3);
        assert_eq!(tracker.snapshot().in_flight, data.len() as u64);
        assert!(source.fragment(1, data.len() as u64).await.is_err());
    }

    #[test]
    fn content_name_is_what_windows_would_send() {
        let named = |n: &str| {
            UploadSource::bytes(Bytes::new())
                .with_name(n)
                .content_name()
        };
        assert_eq!(named("report 1.bin").unwrap(), "report 1.bin");
        for bad in [
            "",
            "a/b",
            "a\\b",
            "c:x",
            "w?",
            "ünï",
            "a\nb",
            &"x".repeat(261),
        ] {
            assert!(named(bad).is_none(), "{bad:?}");
        }
        assert!(UploadSource::bytes(Bytes::new()).content_name().is_none());
    }
}
