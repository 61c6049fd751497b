//! Where a layer is in its life (running, draining, stopped, disabled) and the requests in
//! flight: what packets are still taken, and what a shutdown or disable waits for.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::sync::{Notify, watch};

use crate::protocol::{Ack, Hresult};

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

/// 501 + `E_ACCESSDENIED`: uploads are not enabled for the URL (IIS 6). Fatal for the client.
pub(crate) fn uploads_disabled() -> Ack {
    Ack::error(StatusCode::NOT_IMPLEMENTED, Hresult::E_ACCESSDENIED)
}

/// 503 + `ERROR_SHUTDOWN_IN_PROGRESS`: transient, the client comes back later.
pub(crate) fn shutting_down() -> Ack {
    Ack::error(StatusCode::SERVICE_UNAVAILABLE, Hresult::SHUTTING_DOWN)
}

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
    /// The answer to every packet in a state that takes none.
    pub(crate) fn refusal(self) -> Option<Ack> {
        match self {
            Self::Running | Self::Draining => None,
            Self::Stopped => Some(shutting_down()),
            Self::Disabled => Some(uploads_disabled()),
        }
    }

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

    /// Starts a shutdown: a running layer drains; a disabled one stays disabled, and can no
    /// longer be enabled.
    pub(crate) fn begin_shutdown(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        self.state.send_if_modified(|state| {
            let running = *state == State::Running;
            if running {
                *state = State::Draining;
            }
            running
        });
    }

    /// Takes packets again after a disable, unless a shutdown began. Returns whether it did.
    pub(crate) fn enable(&self) -> bool {
        self.state.send_if_modified(|state| {
            // Checked under the state's lock, which a shutdown takes after setting the flag.
            let disabled = *state == State::Disabled && !self.shut_down.load(Ordering::SeqCst);
            if disabled {
                *state = State::Running;
            }
            disabled
        })
    }

    /// The report of the shutdown, once one ran; held while a shutdown runs, so that
    /// concurrent shutdowns run once.
    pub(crate) async fn shutdown_report(
        &self,
    ) -> tokio::sync::MutexGuard<'_, Option<ShutdownReport>> {
        self.shutdown.lock().await
    }

    /// Fragments a shutdown or disable stopped.
    pub(crate) fn interrupted_count(&self) -> usize {
        self.interrupted.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, next: State) {
        self.state.send_replace(next);
    }

    /// Waits until no request is in flight, for at most `limit`. True if none is.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
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

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

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
