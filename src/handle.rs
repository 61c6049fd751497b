//! Orderly shutdown and runtime disabling of a mount: which packets are still taken, what is in
//! flight, and the [`BitsHandle`] that drives both.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::destination::strip_prefix;
use crate::lifecycle::{ShutdownReport, State};
use crate::recovery::{self, RecoveryReport};
use crate::session::{CancelReason, Event, EventKind, now_ms};
use crate::shared::{self, Shared};
use crate::store::StoreError;

/// How long requests that a shutdown or disable interrupted may take to wind up (record their
/// offset, send their Ack) before the store is closed anyway.
const WIND_UP: Duration = Duration::from_secs(5);

/// Controls a running [`BitsLayer`](crate::BitsLayer): orderly shutdown, disabling uploads at
/// runtime, and start-up recovery. Get one from
/// [`BitsLayer::handle`](crate::BitsLayer::handle); clones control the same layer.
///
/// * [`shutdown(grace)`](Self::shutdown): new Create-Session packets get 503 `0x8007045B`
///   (Windows retries later) at once, while open sessions' packets are still served; after
///   `grace`, fragments still arriving stop at their next body frame with their bytes so far
///   recorded; then the sweeper stops and the store and staging are flushed and closed.
///   Nothing is deleted, so clients resume after the next start.
/// * [`disable_uploads()`](Self::disable_uploads): IIS's "uploads disabled" for the layer's
///   prefix. Every BITS packet gets 501 `0x80070005` (fatal for the client), and every session
///   of the prefix is deleted with its staged data and reply.
///   [`enable_uploads()`](Self::enable_uploads) turns it back on.
/// * [`recover()`](Self::recover): the start-up scan [`Sweeper::run`](crate::Sweeper::run)
///   does first (see the [guarantees](crate::guarantees#nothing-leaks)).
///
/// # Running it in production
///
/// Spawn the [`Sweeper`](crate::Sweeper) (a recovery scan, then expiry; it stops at
/// shutdown), and serve with [`axum_bits::serve`](crate::serve) (feature `serve`, on by
/// default): it is `axum::serve` plus a header read timeout (default 30 s), a cap on open
/// connections (default 10,000) and a bounded graceful shutdown. Without a header timeout a
/// client that sends its headers a byte at a time holds a connection forever. Shutdown
/// composes with either loop's graceful shutdown: start it when the signal arrives, and
/// await it again once the server has stopped, to wait for the store to be closed.
///
/// ```no_run
/// # async fn signal() {}
/// # async fn run(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// use std::time::Duration;
/// use axum_bits::BitsLayer;
///
/// let bits = BitsLayer::builder("./uploads").build().expect("layer");
/// let handle = bits.handle();
/// tokio::spawn(bits.sweeper().run()); // first a recovery scan, then expiry
/// let app = axum::Router::new().layer(bits);
/// let stopping = handle.clone();
/// axum_bits::serve(listener, app) // axum::serve works too, but has no header timeout
///     .header_read_timeout(Duration::from_secs(20))
///     .run(async move {
///         signal().await;
///         // New sessions get 503 from now on; fragments in flight get 30 s to finish.
///         tokio::spawn(stopping.shutdown(Duration::from_secs(30)));
///     })
///     .await?;
/// // Every connection is closed; wait for the store to be flushed and closed.
/// let report = handle.shutdown(Duration::from_secs(30)).await;
/// println!("{report:?}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BitsHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for BitsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsHandle")
            .field("state", &self.shared.lifecycle.state())
            .field("in_flight", &self.shared.lifecycle.in_flight())
            .finish()
    }
}

/// What disabling uploads removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DisableReport {
    /// Open sessions whose staged data was deleted.
    pub sessions: usize,
    /// Records of closed or cancelled sessions that were forgotten.
    pub tombstones: usize,
}

impl BitsHandle {
    /// Shuts the layer down, in the order an HTTP server releases a URL:
    ///
    /// 1. at once, new Create-Session packets get 503 with `BITS-Error-Code: 0x8007045B`
    ///    (a shutdown is in progress; the client retries later), while packets of open
    ///    sessions are still served;
    /// 2. requests in flight get `grace` to finish; fragments still arriving after it stop at
    ///    their next frame, keep what they received (the offset is recorded) and are answered
    ///    503 with their `BITS-Received-Content-Range`; from then on every packet gets 503;
    /// 3. the [`Sweeper`](crate::Sweeper) stops, and the store and staging are flushed and
    ///    closed.
    ///
    /// No session is deleted: after a restart every open session resumes. The state changes
    /// when this is called, not when the future is first polled, so the future can be spawned.
    /// Calling it again (or concurrently) waits for the same shutdown and returns its report.
    pub fn shutdown(
        &self,
        grace: Duration,
    ) -> impl Future<Output = ShutdownReport> + Send + 'static {
        let shared = self.shared.clone();
        let lifecycle = &shared.lifecycle;
        lifecycle.begin_shutdown();
        async move { shut_down(&shared, grace).await }
    }

    /// Disables uploads for this layer's prefix, as IIS does when BITS uploads are turned off
    /// for a virtual directory: from now on every BITS packet under the prefix gets 501 with
    /// `BITS-Error-Code: 0x80070005` (fatal for the client), fragments in flight stop, and
    /// every session of the prefix is deleted with its staged data and reply. Files already
    /// committed stay. Other requests still pass through to the application.
    pub async fn disable_uploads(&self) -> Result<DisableReport, StoreError> {
        let shared = &self.shared;
        let lifecycle = &shared.lifecycle;
        lifecycle.set(State::Disabled);
        if !lifecycle.wait_idle(WIND_UP).await {
            tracing::warn!(
                in_flight = lifecycle.in_flight(),
                "requests still running; cleaning up anyway"
            );
        }
        let mut report = DisableReport::default();
        for candidate in shared.store.list().await? {
            if !under_prefix(&candidate.request_url, &shared.config.prefix) {
                continue;
            }
            let Some(session) = shared.lock_session_or_skip(candidate.id).await? else {
                continue;
            };
            let record = &session.record;
            if let Some(deferred) = record.deferred.as_ref().filter(|_| record.is_deferred()) {
                tracing::warn!(session = %record.id, attempts = deferred.attempts, "deferred commit abandoned: uploads disabled");
            }
            // Forget the deferred commit so that `release` deletes the staged file too.
            let mut doomed = record.clone();
            doomed.deferred = None;
            shared::release(shared, &doomed)
                .await
                .map_err(StoreError::backend)?;
            shared.store.remove(record.id).await?;
            if record.is_open() {
                report.sessions += 1;
                shared.note_ended(record, crate::admin::EndReason::Disabled);
                if let Some(hooks) = &shared.hooks {
                    let reason = CancelReason::UploadsDisabled;
                    let event = Event::new(record, EventKind::Cancelled { reason }, now_ms());
                    if let Err(error) = hooks.on_event(&event).await {
                        tracing::warn!(key = %event.key, %error, "event delivery failed; not retried (the session is gone)");
                    }
                }
            } else {
                report.tombstones += 1;
            }
        }
        tracing::info!(
            prefix = %shared.config.prefix,
            sessions = report.sessions,
            tombstones = report.tombstones,
            "BITS uploads disabled"
        );
        shared.deferred_touched();
        Ok(report)
    }

    /// Enables uploads again after [`disable_uploads`](Self::disable_uploads). Returns false
    /// (and changes nothing) if the layer was not disabled, e.g. because it is shut down.
    pub fn enable_uploads(&self) -> bool {
        let lifecycle = &self.shared.lifecycle;
        let enabled = lifecycle.enable();
        if enabled {
            tracing::info!(prefix = %self.shared.config.prefix, "BITS uploads enabled");
        }
        enabled
    }

    /// Whether BITS packets are being served (not shut down, not disabled).
    pub fn is_running(&self) -> bool {
        self.shared.lifecycle.state() == State::Running
    }

    /// Reconciles the staging with the store after a crash; see [`RecoveryReport`].
    /// [`Sweeper::run`](crate::Sweeper::run) does this once when it starts; call it yourself
    /// if you do not run the sweeper. Safe while packets are being served.
    pub async fn recover(&self) -> Result<RecoveryReport, recovery::RecoveryError> {
        recovery::recover(&self.shared).await
    }
}

async fn shut_down(shared: &Shared, grace: Duration) -> ShutdownReport {
    let mut done = shared.lifecycle.shutdown_report().await;
    if let Some(report) = *done {
        return report;
    }
    let lifecycle = &shared.lifecycle;
    tracing::info!(
        in_flight = lifecycle.in_flight(),
        ?grace,
        "BITS shutdown: refusing new sessions, draining"
    );
    let drained = lifecycle.wait_idle(grace).await;
    if lifecycle.state() != State::Disabled {
        lifecycle.set(State::Stopped);
    }
    // Fragments stop at their next frame; give them the time to record what they got.
    let settled = lifecycle.wait_idle(WIND_UP).await;
    let abandoned = if settled { 0 } else { lifecycle.in_flight() };
    shared.wakeup.notify_one();
    let mut closed = true;
    if let Err(error) = shared.staging.close().await {
        tracing::error!(%error, "closing the staging failed");
        closed = false;
    }
    if let Err(error) = shared.store.close().await {
        tracing::error!(%error, "closing the session store failed");
        closed = false;
    }
    let report = ShutdownReport {
        drained,
        interrupted: lifecycle.interrupted_count(),
        abandoned,
        closed,
    };
    tracing::info!(
        drained,
        interrupted = report.interrupted,
        abandoned,
        closed,
        "BITS shutdown complete"
    );
    *done = Some(report);
    report
}

/// Whether a stored request target (path and query) is under `prefix`.
pub(crate) fn under_prefix(request_url: &str, prefix: &str) -> bool {
    let path = request_url.split(['?', '#']).next().unwrap_or("");
    strip_prefix(path, prefix).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(under_prefix("/up/a.bin?x=1", "/up"));
        assert!(under_prefix("/a.bin", "/"));
        assert!(!under_prefix("/upload/a.bin", "/up"));
        assert!(!under_prefix("/other/a.bin?/up/x", "/up"));
    }
}
