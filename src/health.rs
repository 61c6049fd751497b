//! Liveness and readiness, for load balancers and orchestrators: as an API on the
//! [`BitsHandle`](crate::BitsHandle), and as ready-made routes ([`routes`], feature `axum`)
//! at `/livez` and `/readyz`.
//!
//! * **Liveness** says the layer answers; it checks nothing else (a liveness probe that
//!   checks the database restarts every node when the database blips).
//! * **Readiness** says this node should get traffic: the session store answers, the staging
//!   takes new data and has at least [`min_free_space`](ReadinessCheck::min_free_space) free,
//!   and the layer is neither shutting down (503 while draining, so the balancer moves new
//!   clients away) nor disabled. Every check is bounded by a
//!   [timeout](ReadinessCheck::timeout): a hung store fails readiness rather than hanging it.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let root = tempfile::tempdir()?;
//! use axum_bits::BitsLayer;
//! use axum_bits::health::{self, ReadinessCheck};
//!
//! let bits = BitsLayer::builder(root.path()).build()?;
//! let handle = bits.handle();
//! let readiness = handle.readiness(&ReadinessCheck::default()).await;
//! assert!(readiness.ready, "{readiness:?}");
//! // Or mount the probes: GET /livez and GET /readyz.
//! let app: axum::Router = axum::Router::new()
//!     .merge(health::routes(handle))
//!     .layer(bits);
//! # Ok(()) }
//! ```

use std::time::Duration;

use serde::Serialize;

use crate::lifecycle::State;
use crate::session::SessionId;

/// Default bound on each readiness check.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default free space the staging must have.
const DEFAULT_MIN_FREE: u64 = 256 << 20;

/// How [`BitsHandle::readiness`](crate::BitsHandle::readiness) checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadinessCheck {
    timeout: Duration,
    min_free_space: u64,
}

impl Default for ReadinessCheck {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            min_free_space: DEFAULT_MIN_FREE,
        }
    }
}

impl ReadinessCheck {
    /// The longest each check (store, staging) may take before it counts as failed.
    /// Default: 2 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The free space, in bytes, the staging must have where parts are written (for a
    /// staging that knows it: local folders do, object stores do not). Default: 256 MiB.
    pub fn min_free_space(mut self, bytes: u64) -> Self {
        self.min_free_space = bytes;
        self
    }
}

/// The outcome of a readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Readiness {
    /// Whether every check passed.
    pub ready: bool,
    /// Each check, in order: `lifecycle`, `store`, `staging`.
    pub checks: Vec<Check>,
}

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What it found, for people.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok,
            detail: detail.into(),
        }
    }
}

impl crate::BitsHandle {
    /// Whether the layer answers: true until it is shut down. A liveness probe that checked
    /// more would restart healthy nodes when a shared dependency blips.
    pub fn is_live(&self) -> bool {
        self.shared.lifecycle.state() != State::Stopped
    }

    /// Checks whether this node should get traffic: running (not draining, stopped or
    /// disabled), the session store answering, the staging taking new data with enough free
    /// space. The store and staging are checked concurrently, each bounded by
    /// `check`'s timeout.
    pub async fn readiness(&self, check: &ReadinessCheck) -> Readiness {
        let shared = &self.shared;
        let lifecycle = match shared.lifecycle.state() {
            State::Running => Check::new("lifecycle", true, "running"),
            State::Draining => Check::new("lifecycle", false, "shutting down: draining"),
            State::Stopped => Check::new("lifecycle", false, "shut down"),
            State::Disabled => Check::new("lifecycle", false, "uploads disabled"),
        };
        let store = async {
            // A session that does not exist: any store answers it, and it changes nothing.
            match tokio::time::timeout(check.timeout, shared.store.load(SessionId::new())).await {
                Ok(Ok(_)) => Check::new("store", true, "reachable"),
                Ok(Err(error)) => Check::new("store", false, format!("failed: {error}")),
                Err(_) => Check::new(
                    "store",
                    false,
                    format!("no answer within {:?}", check.timeout),
                ),
            }
        };
        let staging = async {
            match tokio::time::timeout(check.timeout, shared.staging.check()).await {
                Ok(Ok(Some(free))) if free < check.min_free_space => Check::new(
                    "staging",
                    false,
                    format!(
                        "{free} bytes free, below the {} required",
                        check.min_free_space
                    ),
                ),
                Ok(Ok(Some(free))) => Check::new("staging", true, format!("{free} bytes free")),
                Ok(Ok(None)) => Check::new("staging", true, "writable"),
                Ok(Err(error)) => Check::new("staging", false, format!("failed: {error}")),
                Err(_) => Check::new(
                    "staging",
                    false,
                    format!("no answer within {:?}", check.timeout),
                ),
            }
        };
        let (store, staging) = tokio::join!(store, staging);
        let checks = vec![lifecycle, store, staging];
        let ready = checks.iter().all(|c| c.ok);
        if !ready {
            let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
            tracing::info!(?failed, "not ready");
        }
        Readiness { ready, checks }
    }
}

/// `GET /livez` (200 `ok` while the layer answers, 503 once it is shut down) and
/// `GET /readyz` (200 with the checks as JSON when ready, 503 with them otherwise), with the
/// default [`ReadinessCheck`]. Merge them into your router; they need no authentication and
/// reveal nothing about sessions.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub fn routes<S>(handle: crate::BitsHandle) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    routes_with(handle, ReadinessCheck::default())
}

/// [`routes`] with a readiness check of your own.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub fn routes_with<S>(handle: crate::BitsHandle, check: ReadinessCheck) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    use axum::response::IntoResponse;
    use axum::routing::get;
    use http::StatusCode;

    let live = handle.clone();
    let recent = std::sync::Arc::new(Recent::default());
    axum::Router::new()
        .route(
            "/livez",
            get(move || {
                let live = live.clone();
                async move {
                    if live.is_live() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "shut down\n")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let handle = handle.clone();
                let recent = recent.clone();
                async move {
                    let readiness = recent.get(&handle, &check).await;
                    let status = if readiness.ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let body = serde_json::to_string(&readiness).unwrap_or_default();
                    (
                        status,
                        [(http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                        .into_response()
                }
            }),
        )
}

/// How long `/readyz` reuses a check's outcome.
#[cfg(feature = "axum")]
const REUSE: Duration = Duration::from_secs(1);

/// The last readiness check of the `/readyz` route, reused for [`REUSE`]: the route needs no
/// authentication, and each check writes and deletes a probe part (two requests on object
/// storage), so a client polling it in a loop must not turn into that much staging work.
/// Concurrent probes wait for the one check in progress.
#[cfg(feature = "axum")]
#[derive(Default)]
struct Recent(tokio::sync::Mutex<Option<(std::time::Instant, Readiness)>>);

#[cfg(feature = "axum")]
impl Recent {
    async fn get(&self, handle: &crate::BitsHandle, check: &ReadinessCheck) -> Readiness {
        let mut last = self.0.lock().await;
        // The lifecycle is read afresh every time: draining must show at once.
        let running = handle.shared.lifecycle.state() == State::Running;
        if let Some((at, readiness)) = last.as_ref() {
            if running && readiness.ready && at.elapsed() < REUSE {
                return readiness.clone();
            }
        }
        let readiness = handle.readiness(check).await;
        *last = Some((std::time::Instant::now(), readiness.clone()));
        readiness
    }
}
