//! One upload, start to finish: the client side of the protocol's packet order (§15).

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use reqwest::Url;
use tracing::Instrument as _;

mod driver;

use super::policy::{self, RetryDelay, Verdict, judge};
use super::progress::{Callback, Progress, Tracker, UploadPhase};
use super::reply::{self, DownloadedReply, ReplyTarget};
use super::source::{FragmentData, UploadSource};
use super::{
    Answer, BitsClient, Error, FragmentRequest, is_certificate_error, transport, unexpected,
};
use crate::protocol::{FragmentRange, MIN_FRAGMENT_SIZE, PacketType, UPLOAD_PROTOCOL};
use driver::Driver;

/// An upload being configured; `.await` it (or call [`UploadBuilder::send`]) to run it.
#[must_use = "an upload does nothing until it is awaited"]
pub struct UploadBuilder {
    client: BitsClient,
    url: Result<Url, Error>,
    source: UploadSource,
    fragment_size: Option<u64>,
    reply: Option<ReplyTarget>,
    progress: Option<Callback>,
    cancel: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    resume: Option<String>,
}

impl std::fmt::Debug for UploadBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadBuilder")
            .field("url", &self.url.as_ref().map(Url::as_str))
            .field("source", &self.source)
            .field("fragment_size", &self.fragment_size)
            .field("reply", &self.reply)
            .field("resume", &self.resume)
            .finish_non_exhaustive()
    }
}

/// A finished upload.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Uploaded {
    /// The session the file went up in (the last one, if the upload started over).
    pub session_id: String,
    /// The file's size.
    pub bytes: u64,
    /// The `BITS-Reply-URL` of the final Ack, resolved, if the server sent one.
    pub reply_url: Option<Url>,
    /// The reply, if one was asked for.
    pub reply: Option<DownloadedReply>,
    /// Transient failures retried.
    pub retries: u32,
    /// Times the server lost the session and the upload started over.
    pub restarts: u32,
    /// Time from the first packet to the Close-Session Ack.
    pub elapsed: Duration,
}

impl UploadBuilder {
    pub(crate) fn new(client: BitsClient, url: Result<Url, Error>, source: UploadSource) -> Self {
        Self {
            client,
            url,
            source,
            fragment_size: None,
            reply: None,
            progress: None,
            cancel: None,
            resume: None,
        }
    }

    /// Bytes per fragment for this upload (default: the client's).
    pub fn fragment_size(mut self, bytes: u64) -> Self {
        self.fragment_size = Some(bytes.max(MIN_FRAGMENT_SIZE));
        self
    }

    /// Calls `f` after every body frame sent (up to 256 KiB) and every Ack.
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Makes this an upload-reply job: after the final fragment, download the reply from
    /// `BITS-Reply-URL` into this file (created or truncated), then close the session.
    pub fn reply_to_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.reply = Some(ReplyTarget::File(path.into()));
        self
    }

    /// Makes this an upload-reply job with the reply kept in memory, up to `limit` bytes
    /// (Windows' `GetReplyData` stops at 1 MiB).
    pub fn reply_in_memory(mut self, limit: u64) -> Self {
        self.reply = Some(ReplyTarget::Memory { limit });
        self
    }

    /// Cancels the upload when `signal` completes (Ctrl-C, a shutdown token): the server is
    /// sent Cancel-Session and the upload ends with [`Error::Cancelled`].
    pub fn cancel_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.cancel = Some(Box::pin(signal));
        self
    }

    /// Continues an existing session (its id from an earlier, interrupted run) instead of
    /// creating one. The first fragment is a single byte, whose Ack tells where the server
    /// is; a session the server no longer knows starts over.
    pub fn resume(mut self, session_id: impl Into<String>) -> Self {
        self.resume = Some(session_id.into());
        self
    }

    /// Runs the upload.
    pub async fn send(self) -> Result<Uploaded, Error> {
        let original = self.url?;
        let resume = self
            .resume
            .map(|id| HeaderValue::from_str(&id).map_err(|_| Error::InvalidSessionId(id)))
            .transpose()?;
        let config = &self.client.inner.config;
        let tracker = Arc::new(Tracker::new(self.source.len(), self.progress));
        let span = tracing::info_span!(
            "bits_upload",
            url = %original,
            bytes = self.source.len(),
            session = tracing::field::Empty,
        );
        let mut driver = Driver {
            backoff: RetryDelay::new(config.retry_initial, config.retry_max),
            fragment_size: self.fragment_size.unwrap_or(config.fragment_size),
            client: self.client.clone(),
            target: original.clone(),
            original,
            fallback: None,
            host_id_refused: false,
            unreachable_since: None,
            session: None,
            content_name: self.source.content_name(),
            source: self.source,
            acked: 0,
            high_water: 0,
            last_progress: Instant::now(),
            retries: 0,
            restarts: 0,
            reply: self.reply,
            tracker,
            span: span.clone(),
        };
        let Some(cancel) = self.cancel else {
            return driver.run(resume).instrument(span).await;
        };
        let outcome = {
            let work = driver.run(resume).instrument(span.clone());
            tokio::select! {
                outcome = work => Some(outcome),
                () = cancel => None,
            }
        };
        match outcome {
            Some(outcome) => outcome,
            None => {
                driver.cancel_remote().instrument(span).await;
                Err(Error::Cancelled)
            }
        }
    }
}

impl IntoFuture for UploadBuilder {
    type Output = Result<Uploaded, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
