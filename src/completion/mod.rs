//! What happens when the last byte of an upload arrives: upload-reply processing (an
//! in-process [`CompletionHandler`] or an HTTP [`Notification`] to a server application, as IIS
//! does) and the [`CompletionPolicy`] for destinations and applications that are busy.
//!
//! BITS has two job types. An *upload* job just delivers a file. An *upload-reply* job
//! (`Start-BitsTransfer -TransferType UploadReply`, `bitsadmin /create /upload-reply`) delivers
//! a file to a server application and downloads the application's answer. IIS does this by
//! POSTing to a notification URL; axum-bits does that too
//! ([`BitsLayerBuilder::notification`](crate::BitsLayerBuilder::notification)), and also
//! offers an in-process handler
//! ([`BitsLayerBuilder::upload_reply_handler`](crate::BitsLayerBuilder::upload_reply_handler))
//! so that an axum app needs no HTTP hop.
//!
//! Without either, a finished upload is committed to its destination (a plain upload job); to
//! be told about it, use
//! [`BitsLayerBuilder::on_upload_committed`](crate::BitsLayerBuilder::on_upload_committed),
//! which keeps the file where the client sent it. With a handler, the finished upload is
//! handed to it *instead*, before the final Fragment is acknowledged; its [`Completion`]
//! becomes the reply the client downloads from `BITS-Reply-URL`, and the file reaches its
//! destination only if the completion asks for it (`BITS-Copy-File-To-Destination` in IIS
//! terms).
//!
//! ```
//! use axum_bits::BitsLayer;
//! use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply};
//!
//! # fn main() -> Result<(), axum_bits::ConfigError> {
//! # let root = tempfile::tempdir().unwrap();
//! let bits = BitsLayer::builder(root.path())
//!     .upload_reply_handler(|upload: CompletedUpload| async move {
//!         // upload.staged_path holds the bytes; .url, .size, .owner, .session_id describe it.
//!         let text = format!("received {} bytes for {}", upload.size, upload.url);
//!         Ok::<_, CompletionError>(
//!             Completion::reply(Reply::Bytes(text.into())).copy_to_destination(false),
//!         )
//!     })
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! `examples/upload_reply.rs` in the repository is a complete server that answers every
//! upload with its SHA-256. For an IIS-style application, use
//! [`Notification::by_value`] (the whole file is streamed as the POST body, the response body
//! is the reply) or [`Notification::by_reference`] (the application gets
//! `BITS-Request-DataFile-Name` and `BITS-Response-DataFile-Name` paths and writes its reply to
//! the second); the example server takes `--notify-url URL --notify-type reference|value`.
//! Notifications go only where the operator says: see
//! [where notifications go](Notification#where-notifications-go).
//!
//! # What happens, in order
//!
//! 1. When the last byte arrives, the handler runs (or the application is POSTed to, with
//!    `BITS-Original-Request-URL` and the upload URL's query appended to the notification
//!    URL) before the final Fragment is acknowledged. It runs once per session: a re-sent
//!    final fragment gets the stored answer, not a second notification. It can run again
//!    after a crash or a failure, so make it idempotent (key it by `session_id`).
//! 2. The final Fragment Ack carries `BITS-Reply-URL`: the application's
//!    `BITS-Static-Response-URL` ([`Reply::StaticUrl`]) if it gave one (the server never
//!    deletes that), or `<upload folder>/.bits/replies/{id}/reply.bin` on the host the client
//!    used (the host id in a farm, or
//!    [`public_origin`](crate::BitsLayerBuilder::public_origin)). That URL answers GET and
//!    HEAD with single-range support (206, `Content-Range`, `Accept-Ranges`, stable `ETag` and
//!    `Last-Modified`, `If-Range`) to the session's owner only, until Close-Session,
//!    Cancel-Session or expiry delete it.
//! 3. The upload reaches its destination only if the application asks for it
//!    (`BITS-Copy-File-To-Destination`, or [`Completion::copy_to_destination`]`(true)`), at
//!    the commit point; otherwise nothing is created there and the staged file is deleted with
//!    the session. Upload-reply sessions do not claim their URL, so many clients can post to
//!    one application URL at once.
//!
//! Reply URLs are built from the request's `Host` unless `public_origin` is set: the server
//! only hands them to the client that asked. Behind a reverse proxy or TLS terminator, set
//! `public_origin("https://files.example.com")` so that reply URLs are right whatever the
//! proxy forwards; otherwise the proxy must pass the client's `Host` through and should accept
//! only the host names it serves.
//!
//! # Errors from the application
//!
//! They reach the client with `BITS-Error-Context: 0x7`:
//!
//! | The application… | Final Fragment Ack | The Windows client… |
//! |---|---|---|
//! | answers status S (not 2xx, not 503) | S, `BITS-Error-Code: 0x8019xxxx` (`0x80190000 + S`) | retries 5xx (but 501, 505), 408, 409 and 3xx (but 300–305, 307); fails the job on the rest, notably 403 |
//! | does not answer within the send/receive timeouts | 408, `0x800705B4` | retries |
//! | is busy: 503, unreachable, [`CompletionError::Busy`] | per completion policy (below) | |
//! | gives a reply URL over 2,200 characters or not absolute | 400 `0x80070057` (context `0x5`) | fails the job |
//!
//! A client retries after its `MinimumRetryDelay` (10 minutes by default) by re-sending the
//! final fragment, which triggers a new attempt; the staged data is kept meanwhile.
//!
//! # When the destination or the application is busy
//!
//! [`CompletionPolicy`]
//! ([`BitsLayerBuilder::completion_policy`](crate::BitsLayerBuilder::completion_policy))
//! decides what happens when an upload is complete but cannot be finished now: the destination
//! exists and may not be overwritten (someone created it during the upload), a custom
//! `Staging` commit returns [`StagingError::Busy`](crate::staging::StagingError::Busy), or
//! the application is busy.
//!
//! | Policy | Client sees | Server keeps |
//! |---|---|---|
//! | [`Reject`](CompletionPolicy::Reject) | 403 `0x80070005` (fatal: the job stops in the error state) | staged data until Cancel-Session or expiry |
//! | [`RetryLater`](CompletionPolicy::RetryLater) (default) | 503: `0x80070050` for the destination, `0x801901F7` + context `0x7` for the application (transient: the client re-sends after its retry delay, for up to 14 days) | staged data |
//! | [`Defer(Backoff)`](CompletionPolicy::Defer) | 200: the upload is acknowledged (and Close-Session too) | the staged file, and a *deferred commit* retried in the background with exponential backoff up to [`Backoff::attempts`] |
//!
//! `Defer` applies to commits (plain uploads, and copies the application asked for); a busy
//! application is answered as `RetryLater`, because its reply must be in the Ack. Deferred
//! commits live in the session store, so they survive a restart and are shared by a farm; the
//! [`Sweeper`](crate::Sweeper) makes the attempts, so it must run.
//! [`BitsLayer::deferred`](crate::BitsLayer::deferred) lists them,
//! [`wait(id)`](crate::DeferredCompletions::wait) awaits one,
//! [`cancel(id)`](crate::DeferredCompletions::cancel) cancels one and deletes its staged
//! file. One that runs out of attempts is `Failed`; its staged file stays until the session
//! expires.

mod notification;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

pub(crate) use notification::{MAX_URL_LEN, UrlError};
pub use notification::{Notification, NotificationType};

use crate::BoxFuture;
use crate::protocol::{Ack, ErrorContext, Hresult};
use crate::session::{Owner, SessionId};

/// An upload whose last byte has arrived, as a [`CompletionHandler`] sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CompletedUpload {
    /// The session.
    pub session_id: SessionId,
    /// The absolute URL the client uploaded to, query included (`BITS-Original-Request-URL`).
    /// Unless [`public_origin`](crate::BitsLayerBuilder::public_origin) is set, its host is
    /// what the request said (the `Host` header or an absolute-form target): the client's to
    /// choose. It describes the request; do not connect to it.
    pub url: String,
    /// The destination under the upload root, `/`-separated (where a copy would go).
    pub destination: String,
    /// Where the uploaded bytes are staged. Read it, but do not move or delete it: the server
    /// deletes it when the session ends, unless the file is copied to its destination. With a
    /// staging that has no local files (object storage) it is a local copy, deleted when the
    /// session ends (in a farm, by this node's next sweep if the session ends on another).
    pub staged_path: PathBuf,
    /// Where the server keeps this session's reply. A handler may write its reply here and
    /// answer [`Reply::File`] with this path (by-reference notifications work this way).
    pub reply_path: PathBuf,
    /// Size of the upload in bytes.
    pub size: u64,
    /// The owner, if an authentication layer supplied one.
    pub owner: Option<Owner>,
}

/// What a [`CompletionHandler`] answers for a completed upload.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Completion {
    /// The reply the client downloads.
    pub reply: Reply,
    /// Whether the upload is also placed at its destination (IIS:
    /// `BITS-Copy-File-To-Destination`), at the configured commit point.
    pub copy_to_destination: bool,
}

impl Completion {
    /// A completion with this reply and no copy to the destination.
    pub fn reply(reply: Reply) -> Self {
        Self {
            reply,
            copy_to_destination: false,
        }
    }

    /// Also place the upload at its destination.
    #[must_use]
    pub fn copy_to_destination(mut self, copy: bool) -> Self {
        self.copy_to_destination = copy;
        self
    }
}

/// The reply of an upload-reply session.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Reply {
    /// No reply data: the client downloads an empty reply.
    #[default]
    None,
    /// These bytes.
    Bytes(Bytes),
    /// The contents of this file. The server takes the file over: it is moved into the
    /// server's reply storage (or used in place if it is
    /// [`CompletedUpload::reply_path`]) and deleted when the session ends.
    File(PathBuf),
    /// An absolute `http` or `https` URL the application serves itself
    /// (`BITS-Static-Response-URL`); the server never deletes it.
    StaticUrl(String),
}

/// Why a [`CompletionHandler`] did not complete an upload. The session stays complete and
/// un-notified; the client re-sends the final fragment and the handler runs again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompletionError {
    /// The application cannot take the upload now (it answered 503, cannot be reached, or
    /// says "not now"). Handled by the [`CompletionPolicy`].
    #[error("the application is busy")]
    Busy(#[source] Option<crate::BoxError>),
    /// The application refused with this HTTP status. The status is relayed to the client
    /// with `BITS-Error-Code: 0x8019xxxx` (`BG_E_HTTP_ERROR_<status>`) and context `0x7`;
    /// the Windows client gives up on 4xx (except 408 and 409), 501 and 505, and retries the
    /// rest.
    #[error("the application answered {0}")]
    Status(StatusCode),
    /// The application did not answer in time: 408, context `0x7` (the client retries).
    #[error("the application did not answer in time")]
    Timeout,
    /// The application's answer is not usable, e.g. a reply URL that is not absolute or
    /// longer than 2,200 characters: 400 `E_INVALIDARG`.
    #[error("invalid answer from the application: {0}")]
    InvalidAnswer(String),
    /// Anything else: a transient 500, context `0x7`.
    #[error("the completion handler failed")]
    Failed(#[source] crate::BoxError),
}

impl CompletionError {
    /// A [`CompletionError::Failed`] wrapping `error`.
    pub fn failed(error: impl Into<crate::BoxError>) -> Self {
        Self::Failed(error.into())
    }

    /// The Ack for this error, except [`CompletionError::Busy`], whose Ack the policy decides.
    pub(crate) fn ack(&self, policy: &CompletionPolicy) -> Ack {
        match self {
            Self::Busy(_) => policy.busy_ack(Busy::Application),
            Self::Status(status) => Ack::application_error(*status, Hresult::http_error(*status)),
            Self::Timeout => Ack::application_error(StatusCode::REQUEST_TIMEOUT, Hresult::TIMEOUT),
            Self::InvalidAnswer(_) => Ack::error(StatusCode::BAD_REQUEST, Hresult::E_INVALIDARG),
            Self::Failed(_) => {
                Ack::application_error(StatusCode::INTERNAL_SERVER_ERROR, Hresult::E_FAIL)
            }
        }
    }
}

/// Whether `url` is an absolute `http` or `https` URL with a host, as a reply URL must be.
pub(crate) fn is_absolute_http_url(url: &str) -> bool {
    url.parse::<http::Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https"))
            && u.host().is_some_and(|host| !host.is_empty())
    })
}

/// Processes completed uploads in-process: the Axum-native alternative to an HTTP
/// [`Notification`].
///
/// Implemented for async closures `Fn(CompletedUpload) -> impl Future<Output =
/// Result<Completion, CompletionError>>`; wrap a tower `Service` in [`CompletionService`].
///
/// The handler runs while the client waits for its final Fragment Ack, so keep it well under
/// the client's 5-minute response timeout. It must tolerate being called more than once for
/// one session (a crash after it answered, a farm fail-over): key its work by
/// [`CompletedUpload::session_id`].
pub trait CompletionHandler: Send + Sync + 'static {
    /// Processes one completed upload.
    fn complete(
        &self,
        upload: CompletedUpload,
    ) -> impl Future<Output = Result<Completion, CompletionError>> + Send;
}

impl<F, Fut> CompletionHandler for F
where
    F: Fn(CompletedUpload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Completion, CompletionError>> + Send,
{
    fn complete(
        &self,
        upload: CompletedUpload,
    ) -> impl Future<Output = Result<Completion, CompletionError>> + Send {
        self(upload)
    }
}

/// Adapts a tower [`Service`](tower_service::Service) into a [`CompletionHandler`]. The
/// service is cloned for each upload, as tower services usually are.
#[derive(Debug, Clone)]
pub struct CompletionService<S>(pub S);

impl<S> CompletionHandler for CompletionService<S>
where
    S: tower_service::Service<CompletedUpload, Response = Completion, Error = CompletionError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    async fn complete(&self, upload: CompletedUpload) -> Result<Completion, CompletionError> {
        let mut service = self.0.clone();
        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(upload).await
    }
}

/// Object-safe mirror of [`CompletionHandler`].
pub(crate) trait DynCompletion: Send + Sync {
    fn complete(
        &self,
        upload: CompletedUpload,
    ) -> BoxFuture<'_, Result<Completion, CompletionError>>;
}

impl<T: CompletionHandler> DynCompletion for T {
    fn complete(
        &self,
        upload: CompletedUpload,
    ) -> BoxFuture<'_, Result<Completion, CompletionError>> {
        Box::pin(CompletionHandler::complete(self, upload))
    }
}

/// What to do when an upload cannot be completed *now*: its destination exists and may not be
/// overwritten (someone created it during the upload), a custom [`Staging`](crate::staging::Staging)
/// commit reports [`StagingError::Busy`](crate::staging::StagingError::Busy), or the
/// application is busy ([`CompletionError::Busy`]: it answered 503 or cannot be reached).
///
/// How the Windows client reacts: a final-Fragment Ack of 5xx (other than 501 and 505), 408 or
/// 409 is transient: the job waits (`MinimumRetryDelay`, 10 minutes by default) and re-sends
/// the fragment, for up to 14 days without progress. 403 and other 4xx are fatal: the job
/// stops in the error state. A Close-Session answered 5xx is re-sent; 4xx is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CompletionPolicy {
    /// A permanent error: 403 `E_ACCESSDENIED` (context `0x5` for the destination, `0x7` for
    /// the application). The client's job fails; its staged data stays until it cancels or the
    /// session expires.
    Reject,
    /// A transient error: 503 (`0x80070050` "file exists" for the destination, `0x801901F7`
    /// and context `0x7` for the application). The client retries later; staged data is kept.
    #[default]
    RetryLater,
    /// For commits (plain uploads, and copies an application asked for): acknowledge, keep
    /// the staged file and finish in the background with bounded retries and exponential
    /// backoff; see [`DeferredCompletions`](crate::DeferredCompletions). A busy application
    /// is answered as [`CompletionPolicy::RetryLater`], because its reply must be in the Ack.
    Defer(Backoff),
}

/// Retry schedule of a deferred commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay before the first retry; each further one doubles it.
    pub first: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// Attempts in all (the one in the request included) before the commit fails for good.
    pub attempts: u32,
}

impl Backoff {
    /// A schedule: first delay, longest delay, attempts in all.
    pub fn new(first: Duration, max: Duration, attempts: u32) -> Self {
        Self {
            first,
            max,
            attempts,
        }
    }

    /// The delay after attempt number `attempt` (1-based) failed.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    /// 10 seconds, doubling up to 10 minutes, 12 attempts (about an hour in all).
    fn default() -> Self {
        Self::new(Duration::from_secs(10), Duration::from_secs(600), 12)
    }
}

/// What is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    Destination,
    Application,
}

impl CompletionPolicy {
    /// The error Ack for a busy destination or application (under `Defer`, a busy application).
    pub(crate) fn busy_ack(&self, busy: Busy) -> Ack {
        let context = match busy {
            Busy::Destination => ErrorContext::RemoteFile,
            Busy::Application => ErrorContext::RemoteApplication,
        };
        match (self, busy) {
            (Self::Reject, _) => {
                Ack::error_with_context(StatusCode::FORBIDDEN, Hresult::E_ACCESSDENIED, context)
            }
            (_, Busy::Destination) => Ack::error_with_context(
                StatusCode::SERVICE_UNAVAILABLE,
                Hresult::FILE_EXISTS,
                context,
            ),
            (_, Busy::Application) => Ack::error_with_context(
                StatusCode::SERVICE_UNAVAILABLE,
                Hresult::http_error(StatusCode::SERVICE_UNAVAILABLE),
                context,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10), 5);
        let delays: Vec<_> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay(200), Duration::from_secs(10));
    }

    #[test]
    fn error_acks() {
        let p = CompletionPolicy::RetryLater;
        let ack = CompletionError::Status(StatusCode::INTERNAL_SERVER_ERROR).ack(&p);
        assert_eq!(ack.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            ack.error_code(),
            Some((Hresult(0x8019_01F4), ErrorContext::RemoteApplication))
        );
        let ack = CompletionError::Status(StatusCode::FORBIDDEN).ack(&p);
        assert_eq!(ack.error_code().map(|e| e.0), Some(Hresult(0x8019_0193)));
        let ack = CompletionError::Timeout.ack(&p);
        assert_eq!(ack.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            ack.error_code().map(|e| e.1),
            Some(ErrorContext::RemoteApplication)
        );
        let ack = CompletionError::InvalidAnswer("x".into()).ack(&p);
        assert_eq!(
            (ack.status(), ack.error_code()),
            (
                StatusCode::BAD_REQUEST,
                Some((Hresult::E_INVALIDARG, ErrorContext::RemoteFile))
            )
        );
        let ack = CompletionError::Busy(None).ack(&p);
        assert_eq!(ack.status(), StatusCode::SERVICE_UNAVAILABLE);
        let ack = CompletionError::Busy(None).ack(&CompletionPolicy::Reject);
        assert_eq!(
            ack.error_code(),
            Some((Hresult::E_ACCESSDENIED, ErrorContext::RemoteApplication))
        );
    }

    #[test]
    fn busy_destination_acks() {
        let ack = CompletionPolicy::Reject.busy_ack(Busy::Destination);
        assert_eq!(
            (ack.status(), ack.error_code()),
            (
                StatusCode::FORBIDDEN,
                Some((Hresult::E_ACCESSDENIED, ErrorContext::RemoteFile))
            )
        );
        let ack = CompletionPolicy::RetryLater.busy_ack(Busy::Destination);
        assert_eq!(
            (ack.status(), ack.error_code()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some((Hresult::FILE_EXISTS, ErrorContext::RemoteFile))
            )
        );
    }
}
