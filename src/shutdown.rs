//! Orderly shutdown and runtime disabling of a mount: which packets are still taken, what is in
//! flight, and the [`BitsHandle`] that drives both.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::destination::strip_prefix;
use crate::handler::{self, Shared};
use crate::hooks::{CancelReason, Event, EventKind};
use crate::recovery::{self, RecoveryReport};
use crate::session::now_ms;
use crate::store::StoreError;

/// Where a layer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Every packet is served.
    Running,
    /// Shutting down: new sessions are refused, open sessions' packets are still served.
    Draining,
    /// Shut down: every packet is refused (transient), fragment bodies stop.
    Stopped,
    /// Uploads disabled for the mount: every packet is refused (fatal), fragment bodies stop.
    Disabled,
}

impl State {
    /// Whether fragment bodies in flight stop at their next frame.
    fn interrupts(self) -> bool {
        matches!(self, Self::Stopped | Self::Disabled)
    }
}

/// The layer's state and its requests in flight.
pub(crate) struct Lifecycle {
    state: watch::Sender<State>,
    in_flight: AtomicUsize,
    idle: Notify,
    interrupted: AtomicUsize,
    /// Set by the first shutdown; a shut-down layer cannot be enabled again.
    shut_down: AtomicBool,
    /// Serializes shutdowns and keeps the report of the one that finished.
    shutdown: tokio::sync::Mutex<Option<ShutdownReport>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            state: watch::channel(State::Running).0,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            interrupted: AtomicUsize::new(0),
            shut_down: AtomicBool::new(false),
            shutdown: tokio::sync::Mutex::new(None),
        }
    }
}

/// A request in flight; dropping it lets a waiting shutdown proceed.
pub(crate) struct InFlight<'a>(&'a Lifecycle);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    /// Registers a request and tells it the state it runs in. Registering before reading the
    /// state means a shutdown that changed the state either is seen here or waits for us.
    pub(crate) fn enter(&self) -> (InFlight<'_>, State) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        (InFlight(self), self.state())
    }

    pub(crate) fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Resolves once fragment bodies must stop (shut down or disabled).
    pub(crate) fn interrupted(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut state = self.state.subscribe();
        async move {
            // An error means the layer is gone, and so is everyone who could wait on us.
            let _ = state.wait_for(|s| s.interrupts()).await;
        }
    }

    /// Resolves once the layer is shut down (bodies of refused requests are no longer read).
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut state = self.state.subscribe();
        async move {
            let _ = state.wait_for(|s| *s == State::Stopped).await;
        }
    }

    /// Counts a fragment that was stopped by a shutdown.
    pub(crate) fn count_interrupted(&self) {
        self.interrupted.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves when the state leaves `Running` (for the sweeper).
    pub(crate) fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut state = self.state.subscribe();
        async move {
            let _ = state
                .wait_for(|s| matches!(s, State::Draining | State::Stopped))
                .await;
        }
    }

    fn set(&self, next: State) {
        self.state.send_replace(next);
    }

    /// Waits until no request is in flight, for at most `limit`. True if none is.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, idle).await.is_ok()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// How long requests that a shutdown or disable interrupted may take to wind up (record their
/// offset, send their Ack) before the store is closed anyway.
const WIND_UP: Duration = Duration::from_secs(5);

/// Controls a running [`BitsLayer`](crate::BitsLayer): orderly shutdown, disabling uploads at
/// runtime, and start-up recovery. Get one from
/// [`BitsLayer::handle`](crate::BitsLayer::handle); clones control the same layer.
///
/// Shutdown composes with axum's graceful shutdown: start it when the signal arrives, and
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
/// let app = axum::Router::new().layer(bits);
/// let stopping = handle.clone();
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async move {
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

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every request in flight finished within the grace period.
    pub drained: bool,
    /// Fragments stopped at a frame boundary when the grace period ended (what they had
    /// received is kept and their clients resume after the restart).
    pub interrupted: usize,
    /// Requests still running when the store was closed (a completion handler that did not
    /// return, a store that did not answer).
    pub abandoned: usize,
    /// The store and the staging were closed without error.
    pub closed: bool,
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
        lifecycle.shut_down.store(true, Ordering::SeqCst);
        lifecycle.state.send_if_modified(|state| {
            let running = *state == State::Running;
            if running {
                *state = State::Draining;
            }
            running
        });
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
            let Some(_guard) = shared.locks.lock_or_skip(candidate.id).await? else {
                continue;
            };
            let Some(record) = shared.store.load(candidate.id).await? else {
                continue;
            };
            if let Some(deferred) = record.deferred.as_ref().filter(|_| record.is_deferred()) {
                tracing::warn!(session = %record.id, attempts = deferred.attempts, "deferred commit abandoned: uploads disabled");
            }
            // Forget the deferred commit so that `release` deletes the staged file too.
            let mut doomed = record.clone();
            doomed.deferred = None;
            handler::release(shared, &doomed)
                .await
                .map_err(StoreError::backend)?;
            shared.store.remove(record.id).await?;
            if record.is_open() {
                report.sessions += 1;
                if let Some(hooks) = &shared.hooks {
                    let reason = CancelReason::UploadsDisabled;
                    let event = Event::new(&record, EventKind::Cancelled { reason }, now_ms());
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
        let enabled = lifecycle.state.send_if_modified(|state| {
            // Checked under the state's lock, which a shutdown takes after setting the flag.
            let disabled = *state == State::Disabled && !lifecycle.shut_down.load(Ordering::SeqCst);
            if disabled {
                *state = State::Running;
            }
            disabled
        });
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
    let mut done = shared.lifecycle.shutdown.lock().await;
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
        interrupted: lifecycle.interrupted.load(Ordering::Relaxed),
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
fn under_prefix(request_url: &str, prefix: &str) -> bool {
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

    #[tokio::test]
    async fn waits_for_requests_in_flight() {
        let lifecycle = Arc::new(Lifecycle::default());
        let (ticket, state) = lifecycle.enter();
        assert_eq!(state, State::Running);
        assert!(!lifecycle.wait_idle(Duration::from_millis(20)).await);
        let waiter = {
            let lifecycle = lifecycle.clone();
            tokio::spawn(async move { lifecycle.wait_idle(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(ticket);
        assert!(waiter.await.expect("join"));

        let stop = lifecycle.interrupted();
        lifecycle.set(State::Draining);
        let still = tokio::time::timeout(Duration::from_millis(20), lifecycle.interrupted()).await;
        assert!(still.is_err(), "draining must not interrupt fragments");
        lifecycle.set(State::Stopped);
        tokio::time::timeout(Duration::from_secs(1), stop)
            .await
            .expect("stopped interrupts");
        assert_eq!(lifecycle.enter().1, State::Stopped);
    }
}
