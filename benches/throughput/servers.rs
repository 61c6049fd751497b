//! The servers, each in a child process: this program re-executed with
//! `AXUM_BITS_BENCH_SERVER=bits|baseline`. With `AXUM_BITS_BENCH_RECORDER=1` the bits server
//! of part (e) has a Prometheus recorder installed behind a switch ([`Switched`]).
//!
//! The process handling is the tests' child-server harness, `tests/common/node.rs`: the parent
//! starts a child with [`NodeCommand`] and waits for its `LISTENING <addr>` line; the [`Node`]
//! it gets back gives the child's pid (for the `/proc` readings) and SIGKILLs and reaps it when
//! stopped or dropped; the child exits by itself if its parent dies (its stdin closes).
//!
//! Of the harness's child side only [`node::exit_with_parent`] and [`node::announce`] are
//! used, not `node::run_child`: that runs the server on a two-thread tokio runtime (and, with
//! `RUST_LOG` set, installs a tracing subscriber), while these servers run on a default
//! multi-threaded runtime, one worker per core, without logging, as they always have, so that
//! the numbers stay comparable across versions and machines. The harness passes libtest
//! arguments (`<name> --exact ...`) to the child; this program ignores them, and
//! `AXUM_BITS_BENCH_SERVER` selects the server.
//!
//! A child is stopped (SIGKILL, where earlier versions closed its stdin for a graceful
//! shutdown) only after the clients have had every response and the readings have been taken,
//! so that changes nothing measured: every file is complete before its last answer (the bits
//! commit runs before the last Fragment's Ack, the baseline flushes before its 200), and
//! neither accept loop serves a connection differently for its shutdown signal.
//!
//! The bits server runs behind `axum_bits::serve` with its defaults, as the example server
//! does (since issue 18; before, `axum::serve`); the baseline, the plain axum handler it is
//! judged against, behind `axum::serve`. The difference that shows is the read buffers:
//! `serve` gives connections past the first 64 a 16 KiB one, which is what keeps (c)'s
//! thousand slow clients small.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum_bits::BitsLayer;
use http_body_util::BodyExt as _;
use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Metadata, NoopRecorder, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use tokio::io::AsyncWriteExt as _;

use crate::Error;

#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/common/node.rs"]
mod node;

pub(crate) use node::Node;
use node::NodeCommand;

/// Selects the server role in a child process.
pub(crate) const ROLE_ENV: &str = "AXUM_BITS_BENCH_SERVER";
/// The upload root of a child server.
const ROOT_ENV: &str = "AXUM_BITS_BENCH_ROOT";
/// `1`: the bits server fsyncs every fragment and record before its Ack (`sync_data(true)`).
const SYNC_DATA_ENV: &str = "AXUM_BITS_BENCH_SYNC_DATA";
/// `1`: the bits server commits without fsyncs (`sync_on_commit(false)`).
pub(crate) const NO_COMMIT_SYNC_ENV: &str = "AXUM_BITS_BENCH_NO_COMMIT_SYNC";
/// `1`: the bits server has a Prometheus recorder installed behind a switch, off at start;
/// `PUT /recorder/on` and `PUT /recorder/off` turn it on and off, `GET /metrics` renders it.
pub(crate) const RECORDER_ENV: &str = "AXUM_BITS_BENCH_RECORDER";
/// Raises the bits server's `max_sessions` and `max_sessions_per_owner` to this.
pub(crate) const MAX_SESSIONS_ENV: &str = "AXUM_BITS_BENCH_MAX_SESSIONS";
/// Asks the baseline handler to fsync the file and its folder after writing the body.
pub(crate) const FSYNC_HEADER: &str = "x-bench-fsync";

// ------------------------------------------------------------------------------------------
// Parent: starting a server.

/// Starts the `role` server (`bits` or `baseline`) on `root` in a child process, with `env`
/// added to its environment, and waits until it listens. [`Node::stop`] (or dropping it)
/// SIGKILLs and reaps it.
pub(crate) fn start(role: &str, root: &Path, env: &[(&str, &str)]) -> Result<Node, Error> {
    NodeCommand::new(role)
        .env(ROLE_ENV, role)
        .env(ROOT_ENV, root)
        .envs(env.iter().copied())
        .try_spawn()
        .map_err(|e| format!("{role} server: {e}").into())
}

// ------------------------------------------------------------------------------------------
// Child: the servers.

/// Runs the `role` server until the parent kills it (or dies).
pub(crate) fn serve(role: &str) -> Result<(), Error> {
    let root = PathBuf::from(std::env::var(ROOT_ENV)?);
    node::exit_with_parent();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = match role {
            "bits" => {
                let sync_data = std::env::var_os(SYNC_DATA_ENV).is_some_and(|v| v == "1");
                let no_commit_sync = std::env::var_os(NO_COMMIT_SYNC_ENV).is_some_and(|v| v == "1");
                let mut builder = BitsLayer::builder(&root)
                    .max_upload_size(1 << 40)
                    .sync_data(sync_data)
                    .sync_on_commit(!no_commit_sync);
                if let Ok(limit) = std::env::var(MAX_SESSIONS_ENV) {
                    let limit: usize = limit.parse()?;
                    builder = builder
                        .max_sessions(limit)
                        .max_sessions_per_owner(limit)
                        .max_sessions_per_peer(limit);
                }
                let mut app =
                    Router::new().route("/", get(|| async { "axum-bits benchmark server" }));
                if std::env::var_os(RECORDER_ENV).is_some_and(|v| v == "1") {
                    app = app.merge(recorder_routes()?);
                }
                app.layer(builder.build()?)
            }
            "baseline" => Router::new()
                .route("/{name}", post(baseline_upload))
                .with_state(Arc::new(root)),
            other => return Err(format!("unknown role {other:?}").into()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        node::announce(listener.local_addr()?);
        if role == "bits" {
            // As the example server: the crate's accept loop with its defaults.
            axum_bits::serve(listener, app)
                .run(std::future::pending())
                .await?;
        } else {
            axum::serve(listener, app).await?;
        }
        Ok(())
    })
}

/// Installs a Prometheus recorder as the global recorder, behind a [`Switched`] that is off,
/// and returns the routes that turn it on and off and render it.
///
/// The recorder is configured as the crate's documentation advises (its buckets for the
/// `_seconds` and `_bytes` histograms), the metrics are described, and its upkeep runs every
/// 5 s on the runtime (the interval `PrometheusBuilder::install` uses), as an application's
/// would. Must run inside the runtime.
fn recorder_routes() -> Result<Router, Error> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            axum_bits::metrics::DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_bytes".into()),
            axum_bits::metrics::SIZE_BUCKETS,
        )?
        .build_recorder();
    let handle = prometheus.handle();
    let on = Arc::new(AtomicBool::new(false));
    let switched = Switched {
        on: Arc::clone(&on),
        inner: prometheus,
    };
    metrics::set_global_recorder(switched).map_err(|e| e.to_string())?;
    axum_bits::metrics::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let switch = |to: bool| {
        let on = Arc::clone(&on);
        move || {
            on.store(to, Ordering::Release);
            std::future::ready(StatusCode::NO_CONTENT)
        }
    };
    Ok(Router::new()
        .route("/recorder/on", put(switch(true)))
        .route("/recorder/off", put(switch(false)))
        .route("/metrics", get(move || std::future::ready(handle.render()))))
}

/// A recorder that passes every metric to the Prometheus recorder while `on`, and to
/// [`NoopRecorder`] (what the facade uses when no recorder is installed) while off.
///
/// A global recorder cannot be uninstalled; this lets one server process be measured both
/// ways. The `metrics` macros ask the recorder for a handle at every record, so the switch
/// takes effect at the next record. Off, a record costs what it costs with no recorder plus
/// this call and the load of `on`. Descriptions always go to the Prometheus recorder.
struct Switched {
    on: Arc<AtomicBool>,
    inner: PrometheusRecorder,
}

impl Switched {
    fn recorder(&self) -> &dyn Recorder {
        if self.on.load(Ordering::Acquire) {
            &self.inner
        } else {
            &NoopRecorder
        }
    }
}

impl Recorder for Switched {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.recorder().register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.recorder().register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.recorder().register_histogram(key, metadata)
    }
}

/// The baseline: append the body to `root/name`, one frame at a time.
async fn baseline_upload(
    State(root): State<Arc<PathBuf>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, (StatusCode, String)> {
    let internal = |e: std::io::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    if name.starts_with('.') || name.contains(['/', '\\']) {
        return Err((StatusCode::BAD_REQUEST, "bad name".into()));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(&name))
        .await
        .map_err(internal)?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).await.map_err(internal)?;
        }
    }
    file.flush().await.map_err(internal)?;
    if headers.contains_key(FSYNC_HEADER) {
        // What a committed file needs to survive a power loss: its data, and its name.
        file.sync_all().await.map_err(internal)?;
        let folder = tokio::fs::File::open(root.as_path())
            .await
            .map_err(internal)?;
        folder.sync_all().await.map_err(internal)?;
    }
    Ok(StatusCode::OK)
}
