//! Streams one fragment body into staging, frame by frame: skips the bytes the session already
//! holds, enforces the byte count the range announced, and gives up on a body that stalls or
//! trickles.

use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use bytes::Buf;
use http::StatusCode;
use http_body::{Body, Frame};
use tokio::time::Instant;

use crate::BoxError;
use crate::protocol::{Ack, Hresult};
use crate::staging::{DynPart, StagingError};

/// Why a body did not deliver exactly the announced bytes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("no body data arrived for {0:?}")]
    Idle(Duration),
    #[error("the body arrived slower than {0} bytes a second on average")]
    TooSlow(u64),
    #[error("the server is shutting down")]
    Interrupted,
    #[error("reading the body failed (client gone?)")]
    Client(#[source] crate::BoxError),
    #[error("the body is longer than its Content-Range")]
    TooLong,
    #[error("the body ended {missing} bytes early")]
    TooShort { missing: u64 },
    #[error(transparent)]
    Staging(#[from] StagingError),
}

impl BodyError {
    /// The error Ack: 408 for a body that stalled or crawled (the client retries), 400 for a
    /// body that did not match its `Content-Range` (malformed, like a bad header), 503 when
    /// the server stopped it to shut down.
    pub(crate) fn ack(&self) -> Ack {
        match self {
            Self::Staging(error) => error.ack(),
            Self::Interrupted => crate::lifecycle::shutting_down(),
            Self::Idle(_) | Self::TooSlow(_) => {
                Ack::error(StatusCode::REQUEST_TIMEOUT, Hresult::TIMEOUT)
            }
            Self::TooShort { .. } | Self::TooLong | Self::Client(_) => {
                Ack::error(StatusCode::BAD_REQUEST, Hresult::E_INVALIDARG)
            }
        }
    }
}

/// How fast a body must arrive: no pause longer than `idle`, and on average at least
/// `min_rate` bytes a second once `grace` has passed since the body started. The average rule
/// is what stops a body fed one byte at a time just inside the idle timeout: such a body is cut
/// off at `grace` plus its bytes' allowance, whatever its declared length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    pub(crate) idle: Duration,
    pub(crate) min_rate: u64,
    pub(crate) grace: Duration,
}

/// A body's clock: when it started and how many bytes it has delivered.
struct Clock {
    pace: Pace,
    started: Instant,
    seen: u64,
}

impl Clock {
    fn start(pace: Pace) -> Self {
        Self {
            pace,
            started: Instant::now(),
            seen: 0,
        }
    }

    /// When the bytes seen so far stop covering the minimum average rate (never, with a rate
    /// of 0).
    fn rate_deadline(&self) -> Instant {
        const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        if self.pace.min_rate == 0 {
            return self.started + FAR;
        }
        let allowance_ms = self.seen.saturating_mul(1000) / self.pace.min_rate;
        let allowance = Duration::from_millis(allowance_ms).min(FAR);
        self.started + self.pace.grace.min(FAR) + allowance
    }
}

/// What waiting for a body's next frame gave.
enum Next<D> {
    Frame(Frame<D>),
    /// The body ended.
    End,
    /// No frame arrived within the idle timeout.
    Idle,
    /// The body fell below the minimum average rate.
    TooSlow,
    /// The stop signal fired first.
    Stopped,
    /// The body failed (the client went away).
    Failed(BoxError),
}

/// The body's next frame, unless the pause or the average rate allowed by `clock` runs out or
/// `stop` resolves first (checked first, so a body that never pauses still stops at a frame
/// boundary). Counts the frame's bytes on the clock.
async fn next_frame<B, S>(
    body: &mut Pin<&mut B>,
    clock: &mut Clock,
    stop: &mut Pin<&mut S>,
) -> Next<B::Data>
where
    B: Body,
    B::Error: Into<BoxError>,
    S: Future<Output = ()>,
{
    let frame = std::future::poll_fn(|cx| {
        body.as_mut()
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    });
    let idle_deadline = Instant::now() + clock.pace.idle;
    let rate_deadline = clock.rate_deadline();
    let next = tokio::select! {
        biased;
        () = stop.as_mut() => Next::Stopped,
        frame = tokio::time::timeout_at(idle_deadline.min(rate_deadline), frame) => match frame {
            Err(_) if rate_deadline <= idle_deadline => Next::TooSlow,
            Err(_) => Next::Idle,
            Ok(None) => Next::End,
            Ok(Some(Ok(frame))) => Next::Frame(frame),
            Ok(Some(Err(e))) => Next::Failed(e),
        },
    };
    if let Next::Frame(frame) = &next {
        clock.seen += frame.data_ref().map_or(0, |data| data.remaining() as u64);
    }
    next
}

/// How long a body may pause before the part is told ([`DynPart::idle`]): longer than the
/// gaps between the chunks of a client that keeps sending, shorter than those of a slow one.
const LINGER: Duration = Duration::from_millis(2);

/// How many bytes the part must have been handed since it was last told of a pause before a
/// pause is timed at all: less is not worth writing out on its own (the local part waits for
/// as much), and a body that never gets this far, such as a 64 KiB fragment's, costs no timer.
pub(crate) const IDLE_AFTER: u64 = 64 << 10;

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
    pace: Pace,
    stop: impl Future<Output = ()>,
) -> (u64, Result<(), BodyError>)
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut stop = pin!(stop);
    let mut clock = Clock::start(pace);
    let mut written = 0u64;
    // Bytes handed to `part` since it was last told of a pause.
    let mut unsignalled = 0u64;
    // One timer for the pauses, armed only when the body has nothing ready.
    let mut linger = pin!(tokio::time::sleep(LINGER));
    loop {
        let mut paused = None;
        let next = {
            let mut next = pin!(next_frame(&mut body, &mut clock, &mut stop));
            match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
                Poll::Ready(next) => next,
                // Too little to write out, or only the end of the body is still to come.
                Poll::Pending if unsignalled < IDLE_AFTER || written == len => next.await,
                Poll::Pending => {
                    linger.as_mut().reset(Instant::now() + LINGER);
                    tokio::select! {
                        biased;
                        next = next.as_mut() => next,
                        // The body paused: the part may write out what it buffers and free
                        // its memory, so that a slow client holds little while it is away.
                        () = linger.as_mut() => {
                            unsignalled = 0;
                            match part.idle().await {
                                Ok(()) => next.await,
                                Err(e) => {
                                    paused = Some(e);
                                    Next::End
                                }
                            }
                        }
                    }
                }
            }
        };
        if let Some(e) = paused {
            drain(body, len - written, pace, stop).await;
            return (written, Err(e.into()));
        }
        let frame = match next {
            Next::Frame(frame) => frame,
            Next::End => break,
            Next::Idle => return (written, Err(BodyError::Idle(pace.idle))),
            Next::TooSlow => return (written, Err(BodyError::TooSlow(pace.min_rate))),
            Next::Stopped => return (written, Err(BodyError::Interrupted)),
            Next::Failed(e) => return (written, Err(BodyError::Client(e))),
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
            drain(body, rest, pace, stop).await;
            return (written, Err(e.into()));
        }
        written += n;
        unsignalled += n;
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
/// Gives up, leaving the connection to be closed, after `limit` bytes, an error, when the
/// body breaks `pace`, or when `stop` resolves. Returns whether the body was read to its end.
pub(crate) async fn drain<B>(
    body: B,
    limit: u64,
    pace: Pace,
    stop: impl Future<Output = ()>,
) -> bool
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut stop = pin!(stop);
    let mut clock = Clock::start(pace);
    loop {
        match next_frame(&mut body, &mut clock, &mut stop).await {
            Next::End => return true,
            Next::Frame(_) if clock.seen > limit => return false,
            Next::Frame(_) => {}
            Next::Idle | Next::TooSlow | Next::Stopped | Next::Failed(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;
    use crate::BoxFuture;

    /// A part that logs what it is asked to do.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl DynPart for Log {
        fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), StagingError>> {
            self.0
                .lock()
                .unwrap()
                .push(format!("write {}", chunk.len()));
            Box::pin(async { Ok(()) })
        }
        fn finish(self: Box<Self>) -> BoxFuture<'static, Result<(), StagingError>> {
            Box::pin(async { Ok(()) })
        }
        fn idle(&mut self) -> BoxFuture<'_, Result<(), StagingError>> {
            self.0.lock().unwrap().push("idle".into());
            Box::pin(async { Ok(()) })
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    fn pace() -> Pace {
        Pace {
            idle: Duration::from_secs(5),
            min_rate: 0,
            grace: Duration::from_secs(5),
        }
    }

    /// `chunks` chunks of `len` bytes, with `gap` before each but the first.
    struct Paced {
        chunks: usize,
        len: usize,
        gap: Duration,
        sent: usize,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Body for Paced {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if self.sent == self.chunks {
                return std::task::Poll::Ready(None);
            }
            if self.sent > 0 && !self.gap.is_zero() {
                let gap = self.gap;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
                std::task::ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            self.sent += 1;
            let chunk = Bytes::from(vec![0; self.len]);
            std::task::Poll::Ready(Some(Ok(Frame::data(chunk))))
        }
    }

    fn body(chunks: usize, len: usize, gap: Duration) -> Paced {
        Paced {
            chunks,
            len,
            gap,
            sent: 0,
            sleep: None,
        }
    }

    #[tokio::test]
    async fn a_body_that_pauses_lets_the_part_write_out_each_time() {
        let log = Log::default();
        let mut part = log.clone();
        let (written, result) = copy_fragment(
            body(5, 40_000, Duration::from_millis(30)),
            0,
            200_000,
            &mut part,
            pace(),
            std::future::pending(),
        )
        .await;
        assert_eq!(written, 200_000);
        result.unwrap();
        // Told once it has been handed IDLE_AFTER since the last time, not after the last
        // chunk (only the body's end is to come).
        assert_eq!(
            *log.0.lock().unwrap(),
            [
                "write 40000",
                "write 40000",
                "idle",
                "write 40000",
                "write 40000",
                "idle",
                "write 40000"
            ],
        );
    }

    #[tokio::test]
    async fn a_body_that_keeps_coming_is_not_interrupted() {
        let log = Log::default();
        let mut part = log.clone();
        let (written, result) = copy_fragment(
            body(4, 40_000, Duration::ZERO),
            0,
            160_000,
            &mut part,
            pace(),
            std::future::pending(),
        )
        .await;
        assert_eq!(written, 160_000);
        result.unwrap();
        assert!(!log.0.lock().unwrap().contains(&"idle".to_owned()));
    }
}
