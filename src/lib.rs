//! # axum-bits
//!
//! A BITS upload server as a tower layer. BITS (Background Intelligent Transfer Service) is
//! the transfer service built into Windows: `bitsadmin /transfer job /upload URL FILE` and
//! `Start-BitsTransfer -TransferType Upload` send a file in resumable fragments with the
//! `BITS_POST` method. Add [`BitsLayer`] to an axum `Router` (or any tower stack) and those
//! uploads land, complete and atomically, in a folder of your choice; every other request
//! reaches your app untouched.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use axum_bits::BitsLayer;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let bits = BitsLayer::builder("./uploads")
//!         .max_upload_size(4 << 30)
//!         .build()?;
//!     // Expired sessions are deleted by a future you spawn; the crate runs no background loop of its own.
//!     tokio::spawn(bits.sweeper().run());
//!
//!     let app = Router::new()
//!         .route("/", get(|| async { "BITS uploads welcome" }))
//!         .layer(bits);
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     axum::serve(listener, app).await?;
//!     Ok(())
//! }
//! ```
//!
//! ## How it fits together
//!
//! A request flows one way: [`BitsService`] picks out `BITS_POST` (and the GETs of reply URLs;
//! everything else reaches your app); [`protocol`] parses the packet (pure); the session state
//! machine decides what it does (pure); the handler carries that out on the locked session,
//! against a [`store::SessionStore`] (session records) and a [`staging::Staging`] (part files
//! and the final commit); a [`protocol::Ack`] is the answer. Work outside packets (the
//! [`Sweeper`], [`DeferredCompletions`], start-up recovery, the [`BitsHandle`]) takes the same
//! per-session lock and changes records the same way, by compare-and-set.
//!
//! ## Mounting
//!
//! Apply the layer with `Router::layer` (or around the whole router): axum answers unknown
//! methods with 405 before a route handler runs, so the layer must see `BITS_POST` first. It
//! does not matter whether a route exists for the upload path. A layer applied inside a
//! router that is then `nest`ed only sees that router's own routes (axum flattens nested
//! routers); apply it to the outer router, or mount the inner one with `nest_service`. With a
//! [`prefix`](BitsLayerBuilder::prefix), the part of the path below the prefix names the
//! destination: `/upload/a/b.bin` → `ROOT/a/b.bin` (the folder `a` must exist, as with IIS,
//! unless [`create_directories`](BitsLayerBuilder::create_directories) is on). Do not put
//! request-decompression, response-compression or redirect layers in front of BITS routes.
//!
//! Every option is a [`BitsLayerBuilder`] setter; its docs have the summary table with the
//! IIS setting each one mirrors, and what clients are told when they cause an error.
//!
//! ## Authentication
//!
//! Run your authentication middleware *outside* the BITS layer and insert an [`Owner`] into
//! the request extensions. A session then belongs to whoever created it; packets from anyone
//! else get the same answer as for a session that does not exist. The Windows client sends
//! credentials only when challenged, and only those the job was given: answer a `BITS_POST`
//! (Ping included) that has none, or wrong ones, with `401` and a `WWW-Authenticate` it can
//! answer, such as `Basic realm="..."`, without reading the body; on Windows, give the job its
//! credentials (`bitsadmin /setcredentials JOB SERVER BASIC USER PASSWORD`, or
//! `Start-BitsTransfer -Authentication Basic -Credential ...`). `examples/basic_auth.rs` in
//! the repository does this for HTTP Basic with a small user table, leaves the app's other
//! routes to their own rules, and says how to serve it over TLS, which Basic needs (behind a
//! TLS-terminating proxy, set [`public_origin`](BitsLayerBuilder::public_origin) to the public
//! `https://` origin); `tests/auth.rs` runs it against the crate's client. NTLM and Negotiate
//! authenticate a connection rather than a request, so a middleware for them keeps its state
//! per connection (protocol reference, section 13.3).
//!
//! ## Being told about finished uploads
//!
//! [`BitsLayerBuilder::on_upload_committed`] calls you once a file has reached its destination
//! (at least once, across restarts); the file stays where the client sent it. An
//! *upload-reply* server instead takes finished uploads *in place of* their destination:
//! [`BitsLayerBuilder::upload_reply_handler`] (in process) or
//! [`BitsLayerBuilder::notification`] (an HTTP application, as IIS does) gets the staged file,
//! and its reply is served at the final Ack's `BITS-Reply-URL`; see [`completion`].
//! [`CompletionPolicy`] decides what a busy destination or application answers, and [`hooks`]
//! lets the application veto sessions and hear about their progress, cancellation and expiry.
//!
//! ## Running it in production
//!
//! [`BitsLayer::handle`] gives a [`BitsHandle`]: [`BitsHandle::shutdown`] stops taking new
//! sessions, lets fragments in flight finish (or stops them at a frame boundary with their
//! offset recorded) and closes the store, deleting nothing; [`BitsHandle::disable_uploads`]
//! answers every packet with 501 and deletes the prefix's sessions, as IIS does when uploads
//! are turned off; [`Sweeper::run`] starts with a recovery scan ([`RecoveryReport`]). [`serve`]
//! is an accept loop with the header read timeout `axum::serve` lacks. The [`BitsHandle`] docs
//! show them together.
//!
//! For operators: [`metrics`] (through the `metrics` facade), one `tracing` span per packet,
//! [`health`] probes (`/livez`, `/readyz`), and the [`admin`] API and status page (list,
//! inspect and cancel sessions, sweep now), which the application mounts behind its own
//! authentication.
//!
//! Session records live in a [`store`] (a [`FileStore`](store::FileStore) under the root by
//! default, or SQLite, PostgreSQL, Redis, or your own), the bytes in a [`staging`]. A farm of
//! nodes shares a PostgreSQL or Redis store and the upload root: see
//! [running a farm](store#running-a-farm). What the crate promises, test by test, is in
//! [`guarantees`].
//!
//! ## Feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | `serve` (default) | [`serve`]: an HTTP/1.1 accept loop with a header read timeout, a connection cap, bounded read buffers and graceful shutdown |
//! | `axum` (default) | the client's address from axum's `ConnectInfo<SocketAddr>`, for the per-peer limits on anonymous sessions, and [`serve`] providing it; [`admin::router`] and [`health::routes`] |
//! | `metrics` (default) | [`metrics`]: packets, sessions, bytes, commits, store latency and sweeps through the `metrics` facade; the application installs the exporter |
//! | `sqlite` | `store::SqliteStore`, and `sqlx` re-exported |
//! | `postgres` | `store::PostgresStore`, and `sqlx` re-exported |
//! | `redis` | `store::RedisStore`, and `redis` re-exported |
//! | `conformance` | `store::conformance`: the suite every [`SessionStore`](store::SessionStore) must pass |
//! | `client` | `client::BitsClient`: an async BITS upload client (HTTPS with rustls), and `reqwest` re-exported |
//! | `settings` | `Settings`: every builder option from a TOML file, with humane durations (`"14d"`) and sizes (`"4GiB"`) |
//!
//! The memory and file stores and local staging are always compiled. On docs.rs, items that
//! need a feature say which.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(clippy::unwrap_used)]

pub mod admin;
mod body;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod completion;
mod config;
mod deferred;
pub mod destination;
mod download;
pub mod guarantees;

mod fs;
mod future;
mod handle;
mod handler;
pub mod health;
pub mod hooks;
mod keyed_lock;
mod layer;
mod lifecycle;
pub mod metrics;
pub mod protocol;
mod recovery;
mod replies;
mod request_body;
mod retention;
#[cfg(feature = "serve")]
mod serve;
mod service;
pub mod session;
mod session_lock;
#[cfg(feature = "settings")]
#[cfg_attr(docsrs, doc(cfg(feature = "settings")))]
pub mod settings;
mod shared;
pub mod staging;
pub mod store;
mod sweeper;

pub use body::ResponseBody;
pub use completion::{CompletionPolicy, Notification};
pub use config::{CommitPoint, ConfigError};
pub use deferred::{DeferredCompletion, DeferredCompletions};
pub use future::ResponseFuture;
pub use handle::{BitsHandle, DisableReport};
pub use layer::{BitsLayer, BitsLayerBuilder};
pub use lifecycle::ShutdownReport;
pub use recovery::{RecoveryError, RecoveryReport};
#[cfg(feature = "serve")]
#[cfg_attr(docsrs, doc(cfg(feature = "serve")))]
pub use serve::{Serve, serve};
pub use service::BitsService;
pub use session::{Owner, PeerAddr, SessionId};
#[cfg(feature = "settings")]
#[cfg_attr(docsrs, doc(cfg(feature = "settings")))]
pub use settings::{Settings, SettingsError};
pub use sweeper::{SweepReport, Sweeper};

/// A type-erased error, as tower and axum use it: what a store backend, a hook or the
/// application's completion handler may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future, for the object-safe forms of the crate's async traits.
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The Redis client the [`RedisStore`](store::RedisStore) uses, re-exported so that your
/// versions agree.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use ::redis;
/// The HTTP client the [`BitsClient`](client::BitsClient) uses, re-exported so that your
/// versions agree (for [`BitsClientBuilder::http_client`](client::BitsClientBuilder::http_client)).
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use ::reqwest;
/// The SQL toolkit the [`SqliteStore`](store::SqliteStore) and
/// [`PostgresStore`](store::PostgresStore) use, re-exported so that your versions agree (and
/// so that you can enable its TLS features for a remote PostgreSQL).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub use sqlx;

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
