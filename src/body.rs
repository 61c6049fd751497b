//! Streams one fragment body into staging, frame by frame: skips the bytes the session already
//! holds, enforces the byte count the range announced, and gives up on a body that stalls.

use std::pin::{Pin, pin};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame};

use crate::staging::{DynPart, StagingError};

/// Why a body did not deliver exactly the announced bytes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("no body data arrived for {0:?}")]
    Idle(Duration),
    #[error("the server is shutting down")]
    Interrupted,
    #[error("reading the body failed (client gone?)")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the body is longer than its Content-Range")]
    TooLong,
    #[error("the body ended {missing} bytes early")]
    TooShort { missing: u64 },
    #[error(transparent)]
    Staging(#[from] StagingError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body's next frame; `None` when it has ended, `Err` when none arrived within `idle`.
async fn next_frame<B>(
    body: &mut Pin<&mut B>,
    idle: Duration,
) -> Result<Option<Result<Frame<B::Data>, BoxError>>, tokio::time::error::Elapsed>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let frame = std::future::poll_fn(|cx| {
        body.as_mut()
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    });
    tokio::time::timeout(idle, frame).await
}

/// Reads `skip + len` bytes from `body`, drops the first `skip` and writes the rest to `part`.
/// Stops between two frames once `stop` resolves.
///
/// Returns how many bytes were handed to `part` and whether the body was complete. The
/// bytes handed over before an error are genuine data at the right offsets, so the caller may
/// keep them once `part` is finished.
pub(crate) async fn copy_fragment<B>(
    body: B,
    mut skip: u64,
    len: u64,
    part: &mut dyn DynPart,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> (u64, Result<(), BodyError>)
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = pin!(body);
    let mut stop = pin!(stop);
    let mut written = 0u64;
    loop {
        let next = tokio::select! {
            biased;
            () = &mut stop => return (written, Err(BodyError::Interrupted)),
            next = next_frame(&mut body, idle) => next,
        };
        let frame = match next {
            Err(_) => return (written, Err(BodyError::Idle(idle))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return (written, Err(BodyError::Client(e))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let mut chunk = data.copy_to_bytes(data.remaining());
        let dropped = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
        chunk.advance(dropped);
        skip -= dropped as u64;
        if chunk.is_empty() {
            continue;
        }
        if chunk.len() as u64 > len - written {
            return (written, Err(BodyError::TooLong));
        }
        let n = chunk.len() as u64;
        if let Err(e) = part.write(chunk).await {
            // Read the rest (it is no longer than the range announced) so that the client
            // reads the error Ack instead of a connection reset.
            let rest = len - written - n;
            drain(body, rest, idle, stop).await;
            return (written, Err(e.into()));
        }
        written += n;
    }
    let missing = skip + (len - written);
    if missing > 0 {
        return (written, Err(BodyError::TooShort { missing }));
    }
    (written, Ok(()))
}

/// Reads and discards a body the server refused, so the connection stays usable and the
/// client reliably reads the Ack: closing a socket with unread request bytes makes TCP reset
/// the connection, which can destroy the response before the client reads it (and a client
/// that never sees a 413 never learns to shrink its fragments).
///
/// Gives up, leaving the connection to be closed, after `limit` bytes, an error, `idle`
/// without data, or when `stop` resolves.
pub(crate) async fn drain<B>(
    body: B,
    limit: u64,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> bool
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut stop = pin!(stop);
    let mut seen = 0u64;
    loop {
        let next = tokio::select! {
            biased;
            () = &mut stop => return false,
            next = next_frame(&mut body, idle) => next,
        };
        match next {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    seen += data.remaining() as u64;
                    if seen > limit {
                        return false;
                    }
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}
