//! A BITS upload server on a local folder.
//!
//! ```text
//! cargo run --release --example server -- [--config FILE] [--listen 127.0.0.1:8080] [--root ./uploads]
//!     [--max-upload-size BYTES] [--session-timeout SECS] [--allow-overwrites] [--sync-data]
//!     [--notify-url URL --notify-type reference|value] [--public-origin http://HOST:PORT]
//!     [--host-id ID --host-id-fallback-timeout SECS]
//!     [--commit-on last-fragment|close] [--store file|memory|sqlite:PATH|postgres://..|redis://..]
//!     [--staging local|s3://BUCKET[/PREFIX] [--s3-endpoint URL]] [--admin-token TOKEN]
//! ```
//!
//! Operations: `GET /metrics` is Prometheus text (every `bits_*` metric, histograms with the
//! crate's suggested buckets), `GET /livez` and `GET /readyz` the probes (503 while draining).
//! With `--admin-token TOKEN`, `/admin` is the live status page and `/admin/sessions`, `/admin/sweep`
//! and the rest of `axum_bits::admin::router` answer requests carrying
//! `Authorization: Bearer TOKEN`, and 401 any other; without the flag nothing is served there.
//!
//! A `BITS_POST` to `http://HOST/a/b.bin` uploads to `ROOT/a/b.bin` (the folder `a` must
//! exist, as with IIS). It listens on 127.0.0.1:8080; use `--listen 0.0.0.0:8080` to accept
//! other machines. Sessions persist under `ROOT/.bits/` (never reachable as an upload
//! destination), so a restarted server resumes them. On Ctrl-C or SIGTERM it shuts down in
//! order (new sessions get a transient 503, uploads in flight get 10 s, the session store is
//! flushed); nothing is deleted, so clients resume after the next start. Logging follows
//! `RUST_LOG`.
//!
//! `--notify-url` takes an absolute `http://` URL, or a relative one (`/notify`) together with
//! `--public-origin`, the origin clients reach the server at, which the URL resolves against;
//! a relative URL without it is refused at start-up. `--public-origin` also fixes the host of
//! reply URLs (default: each request's `Host`).
//!
//! `--config FILE` reads a TOML file with a `[server]` table (`listen`, `store`) and a `[bits]`
//! table ([`axum_bits::Settings`]: every builder option); `examples/server.toml` lists every
//! key with its default. Flags given on the command line override the file
//! (`--allow-overwrites=false` turns off what the file turned on).
//!
//! The SQLite, PostgreSQL and Redis stores need the crate feature of the same name, e.g.
//! `cargo run --release --features postgres --example server -- --store postgres://..`; a farm
//! of such servers is described in the crate docs (`axum_bits::store`, "Running a farm").
//!
//! `--staging s3://BUCKET/PREFIX` (crate feature `s3`) stages the parts in an S3-compatible
//! bucket and publishes finished files there: `BITS_POST /a/b.bin` lands at the key
//! `PREFIX/a/b.bin`. Credentials and region come from `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`; `--s3-endpoint` names an S3-compatible service
//! (path-style requests), without it the bucket is on AWS. The root folder then holds only
//! the local session records (unless `--store` says otherwise) and upload-reply copies.
//! With `--store postgres://..` or `redis://..`, servers on several machines that share only
//! the store and the bucket form a farm:
//!
//! ```text
//! cargo run --release --features s3,postgres --example server -- --listen 0.0.0.0:8080 \
//!     --store postgres://bits@db/bits --staging s3://uploads/inbox --s3-endpoint http://s3:9000
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use axum::Router;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum_bits::completion::NotificationType;
use axum_bits::settings::NotificationSettings;
use axum_bits::store::MemoryStore;
use axum_bits::{BitsLayer, BitsLayerBuilder, CommitPoint, Settings};
use clap::{Parser, ValueEnum};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;

/// A BITS upload server: Windows clients upload with `bitsadmin /transfer NAME /upload URL FILE`
/// or `Start-BitsTransfer -TransferType Upload`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration: a [server] table (listen, store) and a [bits] table (every
    /// builder option; see examples/server.toml). Flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on. Default: 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Folder uploads land in (`BITS_POST /a/b.bin` → ROOT/a/b.bin). Default: ./uploads.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Largest file accepted, in bytes (IIS: BITSMaximumUploadSize). Default: unlimited.
    #[arg(long, value_name = "BYTES")]
    max_upload_size: Option<u64>,
    /// Seconds a session may be idle before it is deleted (IIS: BITSSessionTimeout).
    /// Default: 1209600 (14 days).
    #[arg(long, value_name = "SECS")]
    session_timeout: Option<u64>,
    /// Let uploads replace existing files (IIS: BITSAllowOverwrites); `=false` turns it off
    /// again over the config file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    allow_overwrites: Option<bool>,
    /// Fsync every fragment and session record before its Ack (power-loss durability);
    /// `=false` turns it off again over the config file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    sync_data: Option<bool>,
    /// Server-application notification URL (IIS: BITSServerNotificationURL): absolute
    /// http://, or relative (/notify) to --public-origin, which it then requires.
    #[arg(long, value_name = "URL", requires = "notify_type")]
    notify_url: Option<String>,
    /// How the application is notified (IIS: BITSServerNotificationType).
    #[arg(long, value_enum, requires = "notify_url")]
    notify_type: Option<NotifyType>,
    /// scheme://host[:port] clients reach this server at: reply URLs point there, and a
    /// relative --notify-url resolves against it. Default: each request's Host header.
    #[arg(long, value_name = "ORIGIN")]
    public_origin: Option<String>,
    /// Host clients must use for the rest of a session (IIS: BITSHostId).
    #[arg(long, value_name = "ID")]
    host_id: Option<String>,
    /// Seconds before a client may fall back from the host id (IIS: BITSHostIdFallbackTimeout).
    /// Needs a host id (--host-id, or host_id in the config file).
    #[arg(long, value_name = "SECS")]
    host_id_fallback_timeout: Option<u64>,
    /// When a finished upload is moved into place. Default: last-fragment.
    #[arg(long, value_enum)]
    commit_on: Option<CommitOn>,
    /// Where session records live: file (ROOT/.bits/sessions), memory, sqlite:PATH,
    /// postgres://.., redis://.. Default: file.
    #[arg(long)]
    store: Option<String>,
    /// Where the parts of open uploads are staged and finished files land: local (under
    /// ROOT), or s3://BUCKET[/PREFIX] (crate feature s3). Default: local.
    #[arg(long, value_name = "local|s3://BUCKET[/PREFIX]")]
    staging: Option<String>,
    /// The endpoint of an S3-compatible service for --staging s3://.. (path-style requests).
    /// Default: AWS.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Serves the admin API and the live status page under /admin/, to requests carrying
    /// `Authorization: Bearer TOKEN` (401 otherwise). Without it nothing is served there.
    #[arg(long, value_name = "TOKEN")]
    admin_token: Option<String>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    /// This example's own settings.
    server: ServerSection,
    /// The BITS layer's.
    bits: Settings,
}

/// The `[server]` table: the flags that are not builder options.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServerSection {
    listen: Option<SocketAddr>,
    store: Option<String>,
    staging: Option<String>,
    s3_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NotifyType {
    Reference,
    Value,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CommitOn {
    LastFragment,
    Close,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,axum_bits=info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = error.source();
            while let Some(e) = source {
                eprintln!("  caused by: {e}");
                source = e.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let file = match &args.config {
        Some(path) => axum_bits::settings::from_file::<ConfigFile>(path)?,
        None => ConfigFile::default(),
    };
    let listen = args
        .listen
        .or(file.server.listen)
        .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)));
    let store = args
        .store
        .or(file.server.store)
        .unwrap_or_else(|| "file".into());
    let staging = args
        .staging
        .or(file.server.staging)
        .unwrap_or_else(|| "local".into());
    let s3_endpoint = args.s3_endpoint.or(file.server.s3_endpoint);
    let args_admin_token: Option<Arc<str>> = args.admin_token.take().map(Into::into);
    // The command line overrides the file; what neither sets keeps the builder's default.
    let mut settings = file.bits;
    if let Some(root) = args.root {
        settings.root = Some(root);
    }
    if let Some(bytes) = args.max_upload_size {
        settings.max_upload_size = Some(bytes);
    }
    if let Some(secs) = args.session_timeout {
        settings.session_timeout = Some(Duration::from_secs(secs));
    }
    if let Some(allow) = args.allow_overwrites {
        settings.allow_overwrites = Some(allow);
    }
    if let Some(on) = args.sync_data {
        settings.sync_data = Some(on);
    }
    if let Some(commit_on) = args.commit_on {
        settings.commit_point = Some(match commit_on {
            CommitOn::LastFragment => CommitPoint::LastFragment,
            CommitOn::Close => CommitPoint::CloseSession,
        });
    }
    if let Some(host) = args.host_id {
        settings.host_id = Some(host);
    }
    if let Some(secs) = args.host_id_fallback_timeout {
        settings.host_id_fallback_timeout = Some(Duration::from_secs(secs));
    }
    if let Some(origin) = args.public_origin {
        settings.public_origin = Some(origin);
    }
    if let (Some(url), Some(kind)) = (args.notify_url, args.notify_type) {
        let kind = match kind {
            NotifyType::Reference => NotificationType::ByReference,
            NotifyType::Value => NotificationType::ByValue,
        };
        // The file's timeouts and reply size stay.
        match &mut settings.notification {
            Some(notification) => {
                notification.url = url;
                notification.kind = kind;
            }
            None => settings.notification = Some(NotificationSettings::new(kind, url)),
        }
    }
    if settings.host_id_fallback_timeout.is_some() && settings.host_id.is_none() {
        return Err(
            "--host-id-fallback-timeout needs a host id: also give --host-id \
                    (or host_id in the config file)"
                .into(),
        );
    }
    let notify = settings.notification.as_ref().map(|n| n.url.clone());
    if let Some(url) = &notify {
        // The server never resolves a notification URL against a request: its Host is the
        // client's to choose.
        if !url.contains("://") && settings.public_origin.is_none() {
            return Err(format!(
                "notification URL {url} is relative: also give --public-origin \
                 http://HOST:PORT, or public_origin in the config file (where clients reach \
                 this server; the URL resolves against it), or give an absolute http:// URL"
            )
            .into());
        }
    }
    let root = settings
        .root
        .take()
        .unwrap_or_else(|| PathBuf::from("./uploads"));
    let mut builder = settings.apply(BitsLayer::builder(&root));
    builder = with_store(builder, &store).await?;
    builder = with_staging(builder, &staging, s3_endpoint)?;
    let bits = builder.build()?;
    let handle = bits.handle();
    // Prometheus text at /metrics, with buckets suited to the crate's histograms.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            axum_bits::metrics::DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_bytes".into()),
            axum_bits::metrics::SIZE_BUCKETS,
        )?
        .install_recorder()?;
    axum_bits::metrics::describe();
    // Recovers what a crash left behind, then expires idle sessions; stops at shutdown.
    tokio::spawn(bits.sweeper().run());

    let mut app = Router::new()
        .route(
            "/",
            get(|| async { "axum-bits: BITS_POST a file to any path to upload it\n" }),
        )
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        // GET /livez and /readyz (503 while draining, disabled, or when the store or the
        // staging fails).
        .merge(axum_bits::health::routes(handle.clone()));
    if let Some(token) = args_admin_token {
        let admin = axum_bits::admin::router(handle.clone()).layer(axum::middleware::from_fn(
            move |request, next| require_bearer(token.clone(), request, next),
        ));
        app = app
            .nest("/admin", admin)
            .route("/admin/", get(|| async { Redirect::permanent("/admin") }));
    }
    let app = app.layer(bits);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        root = %root.display(),
        store = %store,
        staging = %staging,
        notify = notify.as_deref().unwrap_or("none"),
        "BITS upload server ready"
    );
    let stopping = handle.clone();
    // Like axum::serve, plus a header read timeout and a connection cap (slow-loris), and
    // read buffers bounded for thousands of slow clients.
    axum_bits::serve(listener, app)
        .header_read_timeout(Duration::from_secs(20))
        .shutdown_timeout(SHUTDOWN_GRACE + Duration::from_secs(5))
        .run(async move {
            shutdown_signal().await;
            // New sessions get 503 from now on; fragments in flight get the grace period,
            // then stop at a frame boundary with what they received recorded.
            tokio::spawn(stopping.shutdown(SHUTDOWN_GRACE));
        })
        .await?;
    // Every connection is closed: wait for the session store to be flushed and closed.
    let report = handle.shutdown(SHUTDOWN_GRACE).await;
    tracing::info!(?report, "stopped");
    Ok(())
}

/// Lets through only requests with `Authorization: Bearer TOKEN`; 401 otherwise.
async fn require_bearer(
    token: Arc<str>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let given = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    (
        http::StatusCode::UNAUTHORIZED,
        [(
            http::header::WWW_AUTHENTICATE,
            "Bearer realm=\"axum-bits admin\"",
        )],
        "admin token required\n",
    )
        .into_response()
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Applies `--store`. The shared stores need the crate feature of the same name; a farm of
/// nodes shares a PostgreSQL or Redis store and the upload root (see "Running a farm" in the
/// `axum_bits::store` docs).
async fn with_store(
    builder: BitsLayerBuilder,
    spec: &str,
) -> Result<BitsLayerBuilder, Box<dyn std::error::Error>> {
    if spec == "file" {
        Ok(builder)
    } else if spec == "memory" {
        Ok(builder.store(MemoryStore::new()))
    } else if let Some(path) = spec.strip_prefix("sqlite:") {
        #[cfg(feature = "sqlite")]
        return Ok(builder.store(axum_bits::store::SqliteStore::open(path).await?));
        #[cfg(not(feature = "sqlite"))]
        return {
            let _ = path;
            Err(missing_feature("--store", spec, "sqlite"))
        };
    } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(builder.store(axum_bits::store::PostgresStore::connect(spec).await?));
        #[cfg(not(feature = "postgres"))]
        return Err(missing_feature("--store", spec, "postgres"));
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        return Ok(builder.store(axum_bits::store::RedisStore::connect(spec).await?));
        #[cfg(not(feature = "redis"))]
        return Err(missing_feature("--store", spec, "redis"));
    } else {
        Err(format!(
            "--store {spec}: expected file, memory, sqlite:PATH, postgres://.. or redis://.."
        )
        .into())
    }
}

/// Applies `--staging` (and `--s3-endpoint`).
fn with_staging(
    builder: BitsLayerBuilder,
    spec: &str,
    endpoint: Option<String>,
) -> Result<BitsLayerBuilder, Box<dyn std::error::Error>> {
    if spec == "local" {
        if endpoint.is_some() {
            return Err("--s3-endpoint needs --staging s3://BUCKET[/PREFIX]".into());
        }
        return Ok(builder);
    }
    let Some(location) = spec.strip_prefix("s3://") else {
        return Err(format!("--staging {spec}: expected local or s3://BUCKET[/PREFIX]").into());
    };
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    if bucket.is_empty() {
        return Err(format!("--staging {spec}: no bucket").into());
    }
    #[cfg(feature = "s3")]
    {
        let mut s3 = axum_bits::staging::S3Staging::builder()
            .bucket(bucket)
            .prefix(prefix);
        if let Some(url) = endpoint {
            s3 = s3.endpoint(url).path_style(true);
        }
        Ok(builder.staging(s3.build()?))
    }
    #[cfg(not(feature = "s3"))]
    {
        let _ = (builder, prefix, endpoint);
        Err(missing_feature("--staging", spec, "s3"))
    }
}

/// The error for a `--store` or `--staging` whose crate feature this build lacks.
#[cfg(not(all(
    feature = "sqlite",
    feature = "postgres",
    feature = "redis",
    feature = "s3"
)))]
fn missing_feature(flag: &str, spec: &str, feature: &str) -> Box<dyn std::error::Error> {
    format!(
        "{flag} {spec}: this build has no {feature} support; rebuild with `--features {feature}`"
    )
    .into()
}

/// How long uploads in flight may take to finish once a shutdown signal arrives.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
