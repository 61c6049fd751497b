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
//! ## Guarantees
//!
//! * Every packet gets an Ack; every client-caused failure is an error Ack with the status,
//!   `BITS-Error-Code` and `BITS-Error-Context` the protocol prescribes.
//! * An acknowledged byte is in the part file, and a restarted process finds it.
//! * A destination file is absent or complete: files are committed by an atomic rename, and
//!   an existing file is never replaced unless overwrites are allowed.
//! * No request names anything outside the upload root (see [`destination`]).
//!
//! ## Shutdown, disabling, recovery
//!
//! [`BitsLayer::handle`] gives a [`BitsHandle`]: [`BitsHandle::shutdown`] stops taking new
//! sessions, lets fragments in flight finish (or stops them at a frame boundary with their
//! offset recorded) and closes the store, deleting nothing; [`BitsHandle::disable_uploads`]
//! answers every packet with 501 and deletes the prefix's sessions, as IIS does when uploads
//! are turned off; [`Sweeper::run`] starts with a recovery scan ([`RecoveryReport`]). [`serve`] is an
//! accept loop with the header read timeout `axum::serve` lacks.
//!
//! ## Upload-reply
//!
//! With a [`completion::CompletionHandler`] or an IIS-style [`Notification`], finished uploads
//! are handed to the application before the final Ack, and its reply is served at the Ack's
//! `BITS-Reply-URL`; see [`completion`]. [`CompletionPolicy`] decides what a busy destination
//! or application answers, and [`hooks`] lets the application veto sessions and hear about
//! them.
//!
//! ## Feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | `serve` (default) | [`serve`]: an HTTP/1.1 accept loop with a header read timeout, a connection cap and graceful shutdown |
//! | `sqlite` | `store::SqliteStore`, and `sqlx` re-exported |
//! | `postgres` | `store::PostgresStore`, and `sqlx` re-exported |
//! | `redis` | `store::RedisStore`, and `redis` re-exported |
//! | `conformance` | `store::conformance`: the suite every [`SessionStore`](store::SessionStore) must pass |
//! | `client` | `client::BitsClient`: an async BITS upload client (HTTPS with rustls), and `reqwest` re-exported |
//! | `settings` | `Settings`: every builder option from a TOML file, with humane durations (`"14d"`) and sizes (`"4GiB"`) |
//!
//! The memory and file stores and local staging are always compiled. A farm of nodes shares a
//! PostgreSQL or Redis store and the upload root; see the README's "Running a farm".

#![warn(clippy::unwrap_used)]

mod body;
#[cfg(feature = "client")]
pub mod client;
pub mod completion;
mod config;
mod deferred;
pub mod destination;
mod download;

mod fs;
mod future;
mod handle;
mod handler;
pub mod hooks;
mod keyed_lock;
mod layer;
mod lifecycle;
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
pub use serve::{Serve, serve};
pub use service::BitsService;
pub use session::{Owner, PeerAddr, SessionId};
#[cfg(feature = "settings")]
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
pub use ::redis;
/// The HTTP client the [`BitsClient`](client::BitsClient) uses, re-exported so that your
/// versions agree (for [`BitsClientBuilder::http_client`](client::BitsClientBuilder::http_client)).
#[cfg(feature = "client")]
pub use ::reqwest;
/// The SQL toolkit the [`SqliteStore`](store::SqliteStore) and
/// [`PostgresStore`](store::PostgresStore) use, re-exported so that your versions agree (and
/// so that you can enable its TLS features for a remote PostgreSQL).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sqlx;
