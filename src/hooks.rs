//! Session events for the application: [`Hooks`] sees every session created (and may veto
//! it), its progress, its completion, its cancellation and its expiry.
//!
//! Delivery is **at least once**: an event is stored with its session (in the
//! [`SessionStore`](crate::store::SessionStore)) in the same update that records the change,
//! delivered right after, and removed once [`Hooks::on_event`] returns `Ok`. An event whose
//! delivery failed, or was cut short by a crash, is delivered again by the
//! [`Sweeper`](crate::Sweeper). Each event carries an idempotency [`Event::key`] that is the
//! same on every delivery, so a hook can drop duplicates.
//!
//! [`Hooks::on_create`] runs before a session exists and can veto it with any BITS error Ack
//! ([`Veto::forbidden`]: 403 `0x80070005`); [`Hooks::on_event`] hears progress, completion,
//! cancellation and expiry. With hooks, each fragment costs one more store update. To hear
//! only about files that reached their destination, use
//! [`BitsLayerBuilder::on_upload_committed`](crate::BitsLayerBuilder::on_upload_committed),
//! which is delivered through the same machinery and works alongside hooks.
//!
//! ```
//! use axum_bits::hooks::{Event, EventKind, HookError, Hooks, Veto};
//!
//! struct Audit;
//!
//! impl Hooks for Audit {
//!     async fn on_create(&self, event: &Event) -> Result<(), Veto> {
//!         // Only named users may upload below /private.
//!         if event.destination.starts_with("private/") && event.owner.is_none() {
//!             return Err(Veto::forbidden());
//!         }
//!         Ok(())
//!     }
//!
//!     async fn on_event(&self, event: &Event) -> Result<(), HookError> {
//!         if let EventKind::Completed { size, .. } = &event.kind {
//!             println!("{} finished: {size} bytes (key {})", event.destination, event.key);
//!         }
//!         Ok(())
//!     }
//! }
//! # let root = tempfile::tempdir().unwrap();
//! let bits = axum_bits::BitsLayer::builder(root.path()).hooks(Audit).build().unwrap();
//! # drop(bits);
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;

use crate::BoxFuture;
use crate::protocol::{Ack, Hresult};
pub use crate::session::{CancelReason, Event, EventKind};
use crate::session::{Owner, SessionId};

/// A hook refuses a new session: the client gets this error Ack (context `0x5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session vetoed: {status} {code}")]
pub struct Veto {
    status: StatusCode,
    code: Hresult,
}

impl Veto {
    /// A veto with this status and `BITS-Error-Code`. A 4xx other than 408/409 makes the
    /// Windows client fail the job; 5xx (but 501, 505) makes it retry later.
    pub fn new(status: StatusCode, code: Hresult) -> Self {
        Self { status, code }
    }

    /// 403 `E_ACCESSDENIED`: not allowed (fatal for the client).
    pub fn forbidden() -> Self {
        Self::new(StatusCode::FORBIDDEN, Hresult::E_ACCESSDENIED)
    }

    /// 503: try again later (transient for the client).
    pub fn unavailable() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, Hresult::TOO_MANY_SESSIONS)
    }

    pub(crate) fn ack(&self) -> Ack {
        Ack::error(self.status, self.code)
    }
}

/// A hook could not take an event now; it is delivered again later.
#[derive(Debug, thiserror::Error)]
#[error("event delivery failed")]
pub struct HookError(#[source] pub crate::BoxError);

impl HookError {
    /// Wraps the reason.
    pub fn new(error: impl Into<crate::BoxError>) -> Self {
        Self(error.into())
    }
}

/// The application's session hooks. Both methods have do-nothing defaults.
pub trait Hooks: Send + Sync + 'static {
    /// A session is about to be created; `Err` refuses it with the veto's Ack. Runs before the
    /// client learns the session id, so every session a client uses passed this hook (a
    /// client whose Ack was lost retries, and the hook runs again for the new session).
    fn on_create(&self, event: &Event) -> impl Future<Output = Result<(), Veto>> + Send {
        let _ = event;
        async { Ok(()) }
    }

    /// Any other event. `Err` keeps the event for another delivery.
    fn on_event(&self, event: &Event) -> impl Future<Output = Result<(), HookError>> + Send {
        let _ = event;
        async { Ok(()) }
    }
}

/// Object-safe mirror of [`Hooks`].
pub(crate) trait DynHooks: Send + Sync {
    fn on_create<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), Veto>>;
    fn on_event<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), HookError>>;
}

impl<T: Hooks> DynHooks for T {
    fn on_create<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), Veto>> {
        Box::pin(Hooks::on_create(self, event))
    }
    fn on_event<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(Hooks::on_event(self, event))
    }
}

/// A plain upload that reached its destination, as
/// [`on_upload_committed`](crate::BitsLayerBuilder::on_upload_committed) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommittedUpload {
    /// The session that uploaded it.
    pub session_id: SessionId,
    /// The destination under the upload root (`/` separated), as in [`Event::destination`].
    pub destination: String,
    /// The upload root joined with the destination: where the default
    /// [`LocalStaging`](crate::staging::LocalStaging) put the file.
    pub path: PathBuf,
    /// File size in bytes.
    pub size: u64,
    /// The owner, if an authentication layer supplied one.
    pub owner: Option<Owner>,
    /// The event's idempotency key: the same if the report is repeated.
    pub key: String,
}

/// The callback of [`on_upload_committed`](crate::BitsLayerBuilder::on_upload_committed).
pub(crate) type CommittedCallback =
    Arc<dyn Fn(CommittedUpload) -> BoxFuture<'static, ()> + Send + Sync>;

/// Hooks that report committed files to a callback.
pub(crate) struct OnCommitted {
    pub(crate) root: PathBuf,
    pub(crate) callback: CommittedCallback,
}

impl Hooks for OnCommitted {
    async fn on_event(&self, event: &Event) -> Result<(), HookError> {
        if let EventKind::Completed {
            size,
            committed: true,
        } = event.kind
        {
            let upload = CommittedUpload {
                session_id: event.session_id,
                destination: event.destination.clone(),
                path: self.root.join(&event.destination),
                size,
                owner: event.owner.clone(),
                key: event.key.clone(),
            };
            (self.callback)(upload).await;
        }
        Ok(())
    }
}

/// Several sets of hooks as one: a session is created if none vetoes it, and an event is
/// delivered once every set took it (a set that took it sees it again if a later one failed:
/// delivery is at least once, and the key tells repeats).
pub(crate) struct HookChain(pub(crate) Vec<Box<dyn DynHooks>>);

impl Hooks for HookChain {
    async fn on_create(&self, event: &Event) -> Result<(), Veto> {
        for hooks in &self.0 {
            hooks.on_create(event).await?;
        }
        Ok(())
    }

    async fn on_event(&self, event: &Event) -> Result<(), HookError> {
        for hooks in &self.0 {
            hooks.on_event(event).await?;
        }
        Ok(())
    }
}
