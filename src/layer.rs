//! [`BitsLayer`] and its builder.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::completion::{CompletionHandler, CompletionPolicy, DynCompletion, Notification};
use crate::config::{CommitPoint, Config, ConfigError};
use crate::deferred::DeferredCompletions;
use crate::handle::BitsHandle;
use crate::hooks::{CommittedCallback, CommittedUpload, DynHooks, HookChain, Hooks, OnCommitted};
use crate::replies::Replies;
use crate::service::BitsService;
use crate::session_lock::SessionLocks;
use crate::shared::{ReplyMode, Shared};
use crate::staging::{DynStaging, LocalStaging, Staging};
use crate::store::{DynStore, FileStore, SessionStore};
use crate::sweeper::Sweeper;

/// A tower layer that turns the service it wraps into a BITS upload server.
///
/// `BITS_POST` requests under the prefix are handled by the layer; every other request passes
/// through untouched. Cloning is cheap and every clone shares one session state, so the same
/// layer may be applied to many routes.
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use axum_bits::BitsLayer;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bits = BitsLayer::builder("./uploads")
///     .max_upload_size(10 << 30)
///     .build()?;
/// tokio::spawn(bits.sweeper().run());
/// let app = Router::new().route("/", get(|| async { "hello" })).layer(bits);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(listener, app).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BitsLayer {
    shared: Arc<Shared>,
}

impl BitsLayer {
    /// Starts a builder for uploads into `root`.
    ///
    /// Unless replaced with [`BitsLayerBuilder::staging`] and [`BitsLayerBuilder::store`],
    /// staged parts live in `root/.bits/parts` ([`LocalStaging`]) and session records in
    /// `root/.bits/sessions` ([`FileStore`]), so a restarted server resumes open sessions.
    /// The `.bits` folder can never be an upload destination.
    pub fn builder(root: impl Into<PathBuf>) -> BitsLayerBuilder {
        BitsLayerBuilder {
            root: root.into(),
            config: Config::default(),
            store: None,
            staging: None,
            completion: None,
            notification: None,
            hooks: None,
            on_committed: None,
            replies_dir: None,
        }
    }

    /// The deferred commits of this layer's sessions
    /// ([`CompletionPolicy::Defer`]): list, await and cancel them.
    pub fn deferred(&self) -> DeferredCompletions {
        DeferredCompletions {
            shared: self.shared.clone(),
        }
    }

    /// A handle for shutting the layer down, disabling its uploads at runtime and running
    /// recovery; see [`BitsHandle`].
    pub fn handle(&self) -> BitsHandle {
        BitsHandle {
            shared: self.shared.clone(),
        }
    }

    /// The expiry sweeper for this layer's sessions. Spawn [`Sweeper::run`].
    pub fn sweeper(&self) -> Sweeper {
        Sweeper {
            shared: self.shared.clone(),
        }
    }
}

impl std::fmt::Debug for BitsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsLayer")
            .field("config", &self.shared.config.config)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for BitsLayer {
    type Service = BitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BitsService::new(inner, self.shared.clone())
    }
}

/// Configures a [`BitsLayer`]: every option is a setter of [`BitsLayer::builder`], and the
/// defaults are safe. Each setter's docs say what it does; this table is the summary, with the
/// IIS setting each one mirrors.
///
/// | Setter | IIS setting it mirrors | Default |
/// |---|---|---|
/// | mounting the layer, [`prefix`](Self::prefix) | `BITSUploadEnabled` | `/` where mounted |
/// | [`max_upload_size`](Self::max_upload_size) | `BITSMaximumUploadSize` | unlimited: set it |
/// | [`session_timeout`](Self::session_timeout) | `BITSSessionTimeout` | 14 days |
/// | [`allow_overwrites`](Self::allow_overwrites) | `BITSAllowOverwrites` | `false` |
/// | [`host_id`](Self::host_id) | `BITSHostId` | unset |
/// | [`host_id_fallback_timeout`](Self::host_id_fallback_timeout) | `BITSHostIdFallbackTimeout` | unset (the client never falls back) |
/// | [`sweep_interval`](Self::sweep_interval) | `BITSCleanupCount` / `BITSCleanupUnits` | 1 hour |
/// | [`max_sessions`](Self::max_sessions) | — (the whole server) | 1024 open sessions |
/// | [`max_sessions_per_owner`](Self::max_sessions_per_owner) | `BITSNumberOfSessionsLimit` (per user) | 50 per [`Owner`](crate::Owner) |
/// | [`max_sessions_per_peer`](Self::max_sessions_per_peer) | — (anonymous sessions per client address) | 100 |
/// | [`reclaim_empty_after`](Self::reclaim_empty_after) | — | 60 s |
/// | [`tombstone_retention`](Self::tombstone_retention) | — | 24 hours |
/// | [`max_tombstones`](Self::max_tombstones) / [`max_tombstones_per_owner`](Self::max_tombstones_per_owner) | — | 8,192 / 256 |
/// | [`abandoned_after`](Self::abandoned_after) | — | 30 s |
/// | [`lease_ttl`](Self::lease_ttl) | — (farms on a shared store) | 10 s |
/// | [`sync_data`](Self::sync_data) | — | `false` |
/// | [`sync_on_commit`](Self::sync_on_commit) | — | `true` |
/// | [`max_fragment_size`](Self::max_fragment_size) | — | 16 MiB |
/// | [`body_idle_timeout`](Self::body_idle_timeout) | — | 60 s |
/// | [`min_body_rate`](Self::min_body_rate) / [`body_rate_grace`](Self::body_rate_grace) | — | 1 KiB/s / 30 s |
/// | [`commit_point`](Self::commit_point) | — (IIS commits at the last fragment, \[MC-BUP\] at Close-Session) | [`CommitPoint::LastFragment`] |
/// | [`create_directories`](Self::create_directories) | — (IIS answers 404 when the folder is missing) | `false` |
/// | [`notification`](Self::notification) | `BITSServerNotificationType` / `BITSServerNotificationURL` | none (plain uploads) |
/// | [`upload_reply_handler`](Self::upload_reply_handler) | — (in-process alternative to a notification) | none |
/// | [`on_upload_committed`](Self::on_upload_committed) | — | none |
/// | [`completion_policy`](Self::completion_policy) | — | [`CompletionPolicy::RetryLater`] |
/// | [`hooks`](Self::hooks) | — | none |
/// | [`public_origin`](Self::public_origin) | — | from each request |
/// | [`https`](Self::https) | — | `false` |
/// | [`store`](Self::store) | `BITSSessionDirectory` | [`FileStore`] in `ROOT/.bits/sessions` |
/// | [`staging`](Self::staging) | — | [`LocalStaging`] in `ROOT/.bits/parts` |
/// | [`replies_dir`](Self::replies_dir) | — | `ROOT/.bits/replies` |
///
/// With the `settings` feature, `axum_bits::Settings` reads every option but the code ones
/// (store, staging, handlers, hooks) from a TOML file, one key per setter, named alike.
///
/// # What clients are told
///
/// Errors a client can cause are answered with the status, `BITS-Error-Code` (also sent as
/// `BITS-Error`) and `BITS-Error-Context` of the protocol:
///
/// | Cause | Answer |
/// |---|---|
/// | unknown session | 500 `0x8020001F` (`BG_E_SESSION_NOT_FOUND`) |
/// | malformed packet, conflicting repeats of a header it depends on included | 400 `0x80070057` (`E_INVALIDARG`) |
/// | existing destination without overwrites | 403 `0x80070005` (`E_ACCESSDENIED`) |
/// | file over [`max_upload_size`](Self::max_upload_size) | 500 `0x80200020` (`BG_E_TOO_LARGE`) |
/// | fragment over [`max_fragment_size`](Self::max_fragment_size) | plain 413 (the client shrinks its fragments) |
/// | destination being uploaded by another session | 409 (the client retries) |
/// | session limit reached | 503 (the client retries) |
/// | disk full | 500 `0x80070070` (the client retries and resumes) |
#[must_use]
pub struct BitsLayerBuilder {
    root: PathBuf,
    config: Config,
    store: Option<Arc<dyn DynStore>>,
    staging: Option<Box<dyn DynStaging>>,
    completion: Option<Box<dyn DynCompletion>>,
    notification: Option<Notification>,
    hooks: Option<Box<dyn DynHooks>>,
    on_committed: Option<CommittedCallback>,
    replies_dir: Option<PathBuf>,
}

impl std::fmt::Debug for BitsLayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsLayerBuilder")
            .field("root", &self.root)
            .field("config", &self.config)
            .field("notification", &self.notification)
            .field("replies_dir", &self.replies_dir)
            .finish_non_exhaustive()
    }
}

impl BitsLayerBuilder {
    /// Replaces the upload root given to [`BitsLayer::builder`], for a root that comes from
    /// configuration read later (such as `Settings::root`, feature `settings`). The
    /// default store, staging and reply folder are placed under the root when the layer is
    /// built, so they follow it.
    ///
    /// ```
    /// use axum_bits::BitsLayer;
    ///
    /// let builder = BitsLayer::builder("./uploads").root("/srv/uploads");
    /// assert!(format!("{builder:?}").contains("/srv/uploads"));
    /// ```
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// Only `BITS_POST` requests whose path is at or below `prefix` are handled; the rest of
    /// the path (below the prefix) names the destination under the root. Default: `/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Largest file accepted, in bytes (`BITSMaximumUploadSize`). A first Fragment announcing
    /// more is refused with 500 + `BG_E_TOO_LARGE`. Default: unlimited; set it.
    pub fn max_upload_size(mut self, bytes: u64) -> Self {
        self.config.max_upload_size = bytes;
        self
    }

    /// How long a session may go without a successful packet before the sweeper deletes it
    /// (`BITSSessionTimeout`). Default: 14 days.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.config.session_timeout = timeout;
        self
    }

    /// Whether an upload may replace an existing file (`BITSAllowOverwrites`). Checked at
    /// Create-Session and again at the commit. Default: false.
    pub fn allow_overwrites(mut self, allow: bool) -> Self {
        self.config.allow_overwrites = allow;
        self
    }

    /// Largest fragment body accepted, in bytes; larger ones get a plain 413 so that the
    /// client re-sends smaller fragments. Windows sends up to 13 MB. Default: 16 MiB;
    /// minimum 5 KiB.
    pub fn max_fragment_size(mut self, bytes: u64) -> Self {
        self.config.max_fragment_size = bytes;
        self
    }

    /// Most sessions open at once; Create-Session beyond it gets 503 (the client retries
    /// later). Default: 1024.
    pub fn max_sessions(mut self, sessions: usize) -> Self {
        self.config.max_sessions = sessions;
        self
    }

    /// Most sessions one [`Owner`](crate::Owner) may have open at once
    /// (`BITSNumberOfSessionsLimit`); Create-Session beyond it gets 503 (the client retries
    /// later). Requests without an owner are bounded by [`max_sessions`](Self::max_sessions)
    /// only. Default: 50, as IIS.
    pub fn max_sessions_per_owner(mut self, sessions: usize) -> Self {
        self.config.max_sessions_per_owner = sessions;
        self
    }

    /// How long a session that never received a byte must be idle before a new
    /// Create-Session by the same owner for the same destination may replace it. That is the
    /// client whose Create-Session Ack was lost (a dropped connection, a server restart) and
    /// who asks again; until then it gets 409 and retries. Default: 30 seconds.
    pub fn abandoned_after(mut self, idle: Duration) -> Self {
        self.config.abandoned_after = idle;
        self
    }

    /// How long a node's lease on a session lasts on a [shared](SessionStore::is_shared)
    /// store. The node holding a session renews it every third of this while it works; if the
    /// node dies, another node can take the session over after at most this long, and a
    /// packet for a session another node holds waits up to twice this before it is answered
    /// 503 (`ERROR_BUSY`, so the client retries). Ignored for a store one process owns.
    /// Default: 10 seconds.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// Power-loss durability for the default staging and store: every fragment's data is
    /// fsynced before its Ack ([`LocalStaging::sync_data`]) and every session record is
    /// fsynced when written ([`FileStore::with_fsync`]). Without it an acknowledged byte
    /// survives a crash of the process but not of the machine. Ignored for a staging or store
    /// you supply. Costs throughput: 15% with 8 MiB fragments, about 40% with 64 KiB ones, on
    /// the development machine (`benches/README.md` in the repository; see also the
    /// [guarantees](crate::guarantees#an-acknowledged-byte-survives-a-crash-of-the-process)).
    /// Default: off.
    pub fn sync_data(mut self, on: bool) -> Self {
        self.config.sync_data = on;
        self
    }

    /// Whether the default staging fsyncs a finished file and its folder when it commits it
    /// ([`LocalStaging::sync_on_commit`]), so that a committed file survives a power loss
    /// whole. Turning it off makes the final Ack of a large upload wait only for the page
    /// cache, not the disk (`benches/README.md` in the repository measures both); a commit
    /// stays atomic against a crash of the process. Ignored for a staging you supply, and
    /// `sync_data(true)` keeps it on. Default: on.
    pub fn sync_on_commit(mut self, on: bool) -> Self {
        self.config.sync_on_commit = on;
        self
    }

    /// How long a fragment body may deliver no data before the server gives up on it (the
    /// bytes that did arrive are kept). Default: 60 seconds.
    pub fn body_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.body_idle_timeout = timeout;
        self
    }

    /// The lowest average rate, in bytes a second, at which a fragment body must arrive once
    /// [`body_rate_grace`](Self::body_rate_grace) has passed since it started; a body that
    /// falls below it is cut off with 408 (the bytes that did arrive are kept, and the client
    /// resumes from them). `0` turns the rule off. Default: 1,024 bytes a second.
    ///
    /// The idle timeout alone cannot stop a client that sends one byte just inside it, holding
    /// the connection and the session's lock for days. 1 KiB/s is an eighth of what a 64 kbit/s
    /// link carries, so a real client on a slow link stays far above it, while a trickled body
    /// is cut off after the grace period plus one second per KiB it delivered.
    pub fn min_body_rate(mut self, bytes_per_second: u64) -> Self {
        self.config.min_body_rate = bytes_per_second;
        self
    }

    /// How long a body may take before [`min_body_rate`](Self::min_body_rate) applies (time for
    /// a connection to ramp up). Default: 30 seconds.
    pub fn body_rate_grace(mut self, grace: Duration) -> Self {
        self.config.body_rate_grace = grace;
        self
    }

    /// The most open sessions one peer address may hold when the request carries no
    /// [`Owner`](crate::Owner) (anonymous uploads). The peer address comes from
    /// [`PeerAddr`](crate::PeerAddr) or axum's `ConnectInfo<SocketAddr>` in the request
    /// extensions (`into_make_service_with_connect_info`; [`serve`](crate::serve) provides
    /// both); an IPv6 address counts by its /64. Without either, anonymous sessions are
    /// bounded only by [`max_sessions`](Self::max_sessions). Beyond it Create-Session gets 503 `0x80070045`
    /// (the client retries later). Behind a proxy every client has the proxy's address: insert
    /// a `PeerAddr` from the proxy's forwarding header yourself. Default: 100.
    pub fn max_sessions_per_peer(mut self, sessions: usize) -> Self {
        self.config.max_sessions_per_peer = sessions;
        self
    }

    /// When the server is full ([`max_sessions`](Self::max_sessions)), a Create-Session may
    /// reclaim the place of a session that never received a byte and has been idle this long:
    /// it is cancelled (its client, if it ever comes back, gets `BG_E_SESSION_NOT_FOUND` and
    /// starts over, losing nothing). This keeps sessions that are created and left empty from
    /// filling the server for the whole session timeout. Default: 60 seconds.
    pub fn reclaim_empty_after(mut self, idle: Duration) -> Self {
        self.config.reclaim_empty_after = idle;
        self
    }

    /// How long the tombstone of a closed or cancelled session is kept, so that a client
    /// repeating a packet whose Ack it lost gets a consistent answer (protocol reference 8.5).
    /// At most the [`session_timeout`](Self::session_timeout). Default: 24 hours.
    ///
    /// A client that lost its Close-Session Ack re-sends it after its retry delay (10 minutes
    /// by default), later if it went offline; without the tombstone it is told the session
    /// does not exist (`0x8020001F`) and starts the whole upload over, which for a file
    /// already committed without overwrites fails at Create-Session with 403. A day covers a
    /// laptop that sleeps overnight; the caps
    /// ([`max_tombstones`](Self::max_tombstones),
    /// [`max_tombstones_per_owner`](Self::max_tombstones_per_owner)) bound what a client that
    /// ends sessions as fast as it creates them can leave behind.
    pub fn tombstone_retention(mut self, retention: Duration) -> Self {
        self.config.tombstone_retention = retention;
        self
    }

    /// The most tombstones kept in all; beyond it the oldest are forgotten first. Tombstones
    /// are compact (the answers a repeat needs, not the session's details). Default: 8,192.
    pub fn max_tombstones(mut self, tombstones: usize) -> Self {
        self.config.max_tombstones = tombstones;
        self
    }

    /// The most tombstones kept per [`Owner`](crate::Owner), or per peer address for anonymous
    /// sessions; beyond it that owner's oldest are forgotten first, so one client ending
    /// sessions in a loop evicts only its own. Default: 256.
    pub fn max_tombstones_per_owner(mut self, tombstones: usize) -> Self {
        self.config.max_tombstones_per_owner = tombstones;
        self
    }

    /// The host name clients must use for the rest of a session (`BITSHostId`), sent as
    /// `BITS-Host-Id` on Create-Session. A bare host: no scheme, no port. Default: unset.
    pub fn host_id(mut self, host: impl Into<String>) -> Self {
        self.config.host_id = Some(host.into());
        self
    }

    /// After how long a client that cannot reach the host id may fall back to the original
    /// host (`BITSHostIdFallbackTimeout`), sent as `BITS-Host-Id-Fallback-Timeout` with the
    /// host id. The header counts whole seconds, so a part of a second rounds up (the client
    /// never falls back sooner than asked). Default: unset (the client never falls back).
    pub fn host_id_fallback_timeout(mut self, timeout: Duration) -> Self {
        // The header counts whole seconds: a part of one rounds up, so the client never falls
        // back sooner than asked.
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        self.config.host_id_fallback_timeout = Some(secs);
        self
    }

    /// When a finished file is moved to its destination. Default:
    /// [`CommitPoint::LastFragment`], as IIS.
    pub fn commit_point(mut self, point: CommitPoint) -> Self {
        self.config.commit_point = point;
        self
    }

    /// How often [`Sweeper::run`] looks for expired sessions. Default: hourly.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.config.sweep_interval = interval;
        self
    }

    /// Whether the default staging creates a destination's missing folders (IIS answers 404).
    /// Ignored when a staging is supplied. Default: false.
    pub fn create_directories(mut self, create: bool) -> Self {
        self.config.create_directories = create;
        self
    }

    /// Where session records live. Default: a [`FileStore`] in `root/.bits/sessions`.
    pub fn store(mut self, store: impl SessionStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Where bytes wait and how files are committed. Default: [`LocalStaging`] in `root`.
    pub fn staging(mut self, staging: impl Staging) -> Self {
        self.staging = Some(Box::new(staging));
        self
    }

    /// Makes this an **upload-reply** server with an in-process handler, for
    /// `Start-BitsTransfer -TransferType UploadReply` jobs: when the last byte of an upload
    /// arrives, `handler` gets the [`CompletedUpload`](crate::completion::CompletedUpload)
    /// before the final Fragment is acknowledged, and its reply is served at the
    /// `BITS-Reply-URL` of that Ack. Replaces a [`notification`](Self::notification).
    ///
    /// **The file does not go to its destination** unless the handler's
    /// [`Completion`](crate::completion::Completion) asks for it
    /// ([`copy_to_destination`](crate::completion::Completion::copy_to_destination), IIS's
    /// `BITS-Copy-File-To-Destination`); the staged file is deleted when the session ends. Every
    /// upload to this mount is handed over, also those of plain upload jobs (the protocol does
    /// not say which job type a client runs). To be told about finished plain uploads and keep
    /// their files, use [`on_upload_committed`](Self::on_upload_committed) instead.
    pub fn upload_reply_handler(mut self, handler: impl CompletionHandler) -> Self {
        self.completion = Some(Box::new(handler));
        self.notification = None;
        self
    }

    /// Makes this an upload-reply server that notifies an HTTP application, as IIS does
    /// (`BITSServerNotificationType` 1 or 2 and `BITSServerNotificationURL`). Replaces a
    /// [`upload_reply_handler`](Self::upload_reply_handler).
    pub fn notification(mut self, notification: Notification) -> Self {
        self.notification = Some(notification);
        self.completion = None;
        self
    }

    /// What the client is told when a destination or the application is busy at completion.
    /// Default: [`CompletionPolicy::RetryLater`].
    pub fn completion_policy(mut self, policy: CompletionPolicy) -> Self {
        self.config.completion_policy = policy;
        self
    }

    /// The application's session hooks: veto new sessions, hear about progress, completion,
    /// cancellation and expiry (at least once).
    pub fn hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks = Some(Box::new(hooks));
        self
    }

    /// Calls `callback` when a file has reached its destination: the way to be told about
    /// finished plain uploads (and about upload-reply files the application asked to have
    /// copied there). The file is committed, whole, before the callback runs. The callback
    /// runs before the packet that committed the file is acknowledged (its outcome does not
    /// change the Ack): keep it short, or spawn longer work.
    ///
    /// The report is an [`EventKind::Completed`](crate::hooks::EventKind::Completed) event
    /// delivered through the hooks machinery, so it survives a crash and may be repeated: use
    /// [`CommittedUpload::key`] to tell repeats. It works alongside [`hooks`](Self::hooks).
    ///
    /// ```
    /// use axum_bits::BitsLayer;
    /// use axum_bits::hooks::CommittedUpload;
    ///
    /// # fn main() -> Result<(), axum_bits::ConfigError> {
    /// # let root = tempfile::tempdir().unwrap();
    /// let bits = BitsLayer::builder(root.path())
    ///     .on_upload_committed(|upload: CommittedUpload| async move {
    ///         println!("{} arrived: {} bytes", upload.path.display(), upload.size);
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    ///
    /// Not to be confused with [`upload_reply_handler`](Self::upload_reply_handler), which
    /// takes finished uploads *instead of* their destination.
    pub fn on_upload_committed<F, Fut>(mut self, callback: F) -> Self
    where
        F: Fn(CommittedUpload) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.on_committed = Some(Arc::new(move |upload| Box::pin(callback(upload))));
        self
    }

    /// `scheme://host[:port]` clients reach this server at, used for reply URLs, for
    /// `BITS-Original-Request-URL`, and to resolve a relative
    /// [`Notification`] URL (which needs it to be `http://`). Default: derived from each
    /// request (`http`, or `https` with [`https`](Self::https), and the `Host` header or an
    /// absolute-form request target, or the host id for reply URLs).
    ///
    /// What a request says about its host is the client's to choose. The server never
    /// connects there (notifications go only to the URL configured here and in the
    /// [`Notification`]); it only hands it back, in `BITS-Reply-URL`, to the client that sent
    /// it. Behind a reverse proxy or a TLS terminator, set this to the public origin: the
    /// request's `Host` is then the proxy's business, not the client's, and reply URLs are
    /// right whatever the proxy forwards. Without it, the proxy must pass the client's `Host`
    /// through, and should accept only the host names it serves.
    pub fn public_origin(mut self, origin: impl Into<String>) -> Self {
        self.config.public_origin = Some(origin.into().trim_end_matches('/').to_owned());
        self
    }

    /// Whether clients reach this server over HTTPS, for the URLs the layer derives from
    /// requests when no [`public_origin`](Self::public_origin) is set. An HTTP/1.1 request
    /// carries only a path, so the layer cannot see the scheme: set this when the application
    /// terminates TLS itself, or reply URLs say `http://` and clients fetch them from a TLS
    /// port. Default: `false`.
    pub fn https(mut self, on: bool) -> Self {
        self.config.https = on;
        self
    }

    /// Where replies of upload-reply sessions are kept. Default: `root/.bits/replies`.
    pub fn replies_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.replies_dir = Some(dir.into());
        self
    }

    /// Checks the configuration, opens the default store and staging if needed, and builds the
    /// layer.
    pub fn build(self) -> Result<BitsLayer, ConfigError> {
        let config = self.config.validate()?;
        let completion = match (self.completion, self.notification) {
            (Some(handler), _) => Some((handler, "handler")),
            (None, Some(mut notification)) => {
                // Fixes where notifications go now, from configuration only.
                notification.resolve(config.public_origin.as_deref())?;
                Some((
                    Box::new(notification) as Box<dyn DynCompletion>,
                    "notification",
                ))
            }
            (None, None) => None,
        };
        let staging = match self.staging {
            Some(staging) => staging,
            None => Box::new(
                LocalStaging::new(&self.root)
                    .map_err(|source| ConfigError::Staging {
                        root: self.root.clone(),
                        source,
                    })?
                    .create_directories(config.create_directories)
                    .sync_data(config.sync_data)
                    .sync_on_commit(config.sync_on_commit || config.sync_data),
            ),
        };
        let reply = match completion {
            Some((handler, kind)) => {
                // Handlers and by-reference notifications get the staged file by path: a local
                // copy when the staging has no local files (`Staging::read`).
                let dir = self
                    .replies_dir
                    .unwrap_or_else(|| self.root.join(".bits").join("replies"));
                let replies = Replies::open(&self.root, dir.clone())
                    .map_err(|source| ConfigError::Replies { dir, source })?;
                Some(ReplyMode {
                    handler,
                    kind,
                    replies,
                })
            }
            None => None,
        };
        let store = match self.store {
            Some(store) => store,
            None => Arc::new(
                FileStore::open(self.root.join(".bits").join("sessions"))?
                    .with_fsync(config.sync_data),
            ),
        };
        let committed = self.on_committed.map(|callback| {
            Box::new(OnCommitted {
                root: self.root.clone(),
                callback,
            }) as Box<dyn DynHooks>
        });
        let hooks = match (self.hooks, committed) {
            (Some(hooks), Some(committed)) => {
                Some(Box::new(HookChain(vec![hooks, committed])) as Box<dyn DynHooks>)
            }
            (hooks, committed) => hooks.or(committed),
        };
        let locks = SessionLocks::new(store.clone(), config.host_id.as_deref(), config.lease_ttl);
        Ok(BitsLayer {
            shared: Arc::new(Shared {
                config,
                store,
                staging,
                locks,
                create_lock: Default::default(),
                pending_creates: Default::default(),
                reply,
                hooks,
                wakeup: Default::default(),
                deferred_changed: tokio::sync::watch::channel(0).0,
                lifecycle: Default::default(),
                tombstones: Default::default(),
                sweeper_started: Default::default(),
                sweeper_missing_logged: Default::default(),
                recent: Default::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder) -> Result<(), String> {
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        configure(BitsLayer::builder(root.path()))
            .build()
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn relative_notification_urls_need_a_configured_origin() {
        for url in ["/notify", "notify"] {
            let error = build(|b| b.notification(Notification::by_value(url))).unwrap_err();
            assert_eq!(
                error,
                format!(
                    "relative notification URL {url:?} needs an origin to resolve against: set \
                     public_origin to the http://host[:port] clients reach this server at, or \
                     give an absolute http:// URL"
                )
            );
            let error = build(|b| {
                b.public_origin("https://files.example.com")
                    .notification(Notification::by_reference(url))
            })
            .unwrap_err();
            assert!(error.contains("absolute http://"), "{error}");
            build(|b| {
                b.public_origin("http://files.example.com:8080")
                    .notification(Notification::by_reference(url))
            })
            .unwrap();
        }
        build(|b| b.notification(Notification::by_value("http://127.0.0.1:9000/notify"))).unwrap();
    }
}

#[cfg(test)]
mod first_hour {
    use super::*;

    #[test]
    fn a_fallback_timeout_with_a_part_of_a_second_rounds_up() {
        let seconds = |d| {
            BitsLayer::builder("unused")
                .host_id_fallback_timeout(d)
                .config
                .host_id_fallback_timeout
        };
        assert_eq!(seconds(Duration::from_millis(1500)), Some(2));
        assert_eq!(seconds(Duration::from_millis(1)), Some(1));
        assert_eq!(seconds(Duration::from_secs(60)), Some(60));
        assert_eq!(seconds(Duration::ZERO), Some(0));
    }

    #[test]
    fn an_uncreatable_root_is_named_in_the_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"not a folder").expect("file");
        let root = file.join("uploads");
        let error = BitsLayer::builder(&root)
            .build()
            .expect_err("a root under a file");
        let text = error.to_string();
        assert!(text.contains(&root.display().to_string()), "{text}");
        assert!(format!("{error:?}").contains("uploads"), "{error:?}");
    }

    #[test]
    fn owners_display_as_their_name() {
        assert_eq!(crate::Owner::new("alice").to_string(), "alice");
    }
}
