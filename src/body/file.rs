//! A streaming HTTP body that reads a bounded number of bytes from a file.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::fs::File;
use tokio::io::{AsyncRead, ReadBuf};

/// Largest chunk handed out by a single [`FileBody`] frame.
const CHUNK_SIZE: usize = 256 * 1024;

/// An HTTP body streaming exactly `len` bytes from a file, starting at the
/// file's current position.
///
/// The data is read in chunks of at most 256 KiB; the file is never buffered
/// whole. If the file ends before `len` bytes were read, the body yields an
/// [`io::ErrorKind::UnexpectedEof`] error.
pub(crate) struct FileBody {
    /// The file (or any reader) being streamed, positioned by the caller.
    file: Pin<Box<dyn AsyncRead + Send>>,
    /// Bytes still to be sent.
    remaining: u64,
    /// Scratch buffer the next chunk is read into.
    buf: BytesMut,
}

impl std::fmt::Debug for FileBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBody")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl FileBody {
    /// Creates a body streaming `len` bytes from `file`'s current position.
    pub(crate) fn new(file: File, len: u64) -> Self {
        Self::from_reader(Box::pin(file), len)
    }

    /// Creates a body streaming `len` bytes from `reader` (e.g. an object in a bucket).
    pub(crate) fn from_reader(reader: Pin<Box<dyn AsyncRead + Send>>, len: u64) -> Self {
        Self {
            file: reader,
            remaining: len,
            buf: BytesMut::new(),
        }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let chunk = usize::try_from(this.remaining).map_or(CHUNK_SIZE, |r| r.min(CHUNK_SIZE));
        // The buffer is kept between polls so that a pending read resumes
        // with the same storage; it is zero-filled to stay free of `unsafe`.
        if this.buf.len() != chunk {
            this.buf.clear();
            this.buf.resize(chunk, 0);
        }
        let mut read_buf = ReadBuf::new(&mut this.buf[..]);
        if let Err(err) = ready!(this.file.as_mut().poll_read(cx, &mut read_buf)) {
            this.remaining = 0;
            return Poll::Ready(Some(Err(err)));
        }
        let filled = read_buf.filled().len();
        if filled == 0 {
            let missing = this.remaining;
            this.remaining = 0;
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ended {missing} bytes before the announced length"),
            ))));
        }
        let data = this.buf.split_to(filled).freeze();
        this.buf.clear();
        // `filled <= chunk <= remaining`, so this never underflows.
        this.remaining -= data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
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
    use super::*;

    use std::io::SeekFrom;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::AsyncSeekExt;

    /// Distinguishes the temporary files of concurrently running tests.
    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A temporary file removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        /// Writes `contents` to a fresh temporary file.
        fn with(contents: &[u8]) -> Self {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("file-body-test-{}-{n}.bin", std::process::id()));
            std::fs::write(&path, contents).expect("write temp file");
            Self(path)
        }

        /// Opens the file for reading.
        async fn open(&self) -> File {
            File::open(&self.0).await.expect("open temp file")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Deterministic test data of `len` bytes.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Collects the body frame by frame, checking the chunk size bound and the
    /// size hint along the way.
    async fn collect(mut body: FileBody) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame?.into_data().expect("data frame");
            assert!(!data.is_empty() && data.len() <= CHUNK_SIZE);
            out.extend_from_slice(&data);
            assert_eq!(body.size_hint().exact(), Some(body.remaining));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn streams_whole_file() {
        let data = pattern(3 * CHUNK_SIZE + 17);
        let tmp = TempFile::with(&data);
        let body = FileBody::new(tmp.open().await, data.len() as u64);
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        assert!(!body.is_end_stream());
        assert_eq!(collect(body).await.expect("body"), data);
    }

    #[tokio::test]
    async fn stops_at_len() {
        let data = pattern(CHUNK_SIZE + 1000);
        let tmp = TempFile::with(&data);
        let len = CHUNK_SIZE + 10;
        let body = FileBody::new(tmp.open().await, len as u64);
        assert_eq!(collect(body).await.expect("body"), data[..len]);
    }

    #[tokio::test]
    async fn starts_at_seeked_position() {
        let data = pattern(10_000);
        let tmp = TempFile::with(&data);
        let mut file = tmp.open().await;
        file.seek(SeekFrom::Start(1234)).await.expect("seek");
        let body = FileBody::new(file, 5000);
        assert_eq!(collect(body).await.expect("body"), data[1234..6234]);
    }

    #[tokio::test]
    async fn early_eof_is_an_error() {
        let data = pattern(100);
        let tmp = TempFile::with(&data);
        let mut body = FileBody::new(tmp.open().await, 150);
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data frame"), data);
        let err = body.frame().await.expect("frame").expect_err("short file");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn zero_length_is_empty() {
        let tmp = TempFile::with(b"ignored");
        let mut body = FileBody::new(tmp.open().await, 0);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
    }
}
