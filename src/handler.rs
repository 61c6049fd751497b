//! Runs one packet end to end: parse, decide, carry out the effects, build the Ack. The only
//! place that sequences store and staging I/O.

use std::sync::Arc;

use http::{HeaderValue, Request, StatusCode, request::Parts};
use http_body::Body;
use tracing::Instrument;

use crate::body::{BodyError, copy_fragment, drain};
use crate::completion::{
    Busy, CompletedUpload, CompletionError, CompletionPolicy, DynCompletion, Reply,
};
use crate::config::{CommitPoint, ValidConfig};
use crate::destination::{self, Destination, DestinationError};
use crate::hooks::{self, CancelReason, DynHooks, Event, EventKind, Veto};
use crate::lease::{LockError, SessionGuard, SessionLocks};
use crate::protocol::{
    Ack, CreateSession, ErrorContext, Fragment, Hresult, Packet, PacketType, ProtocolError,
    SessionHeader, headers,
};
use crate::reply::{self, Replies};
use crate::retention;
use crate::session::machine::{
    self, CancelDecision, CloseDecision, FragmentDecision, Limits, Refusal, Write,
};
use crate::session::{
    DeferredState, DeferredStatus, Outcome, Owner, Phase, SessionId, SessionRecord, now_ms,
};
use crate::shutdown::{Lifecycle, State};
use crate::staging::{DynStaging, StagingError};
use crate::store::{DynStore, StoreError};

/// State shared by every clone of the layer and its services.
pub(crate) struct Shared {
    pub(crate) config: ValidConfig,
    pub(crate) store: Arc<dyn DynStore>,
    pub(crate) staging: Box<dyn DynStaging>,
    /// One request at a time per session, even when a client retries on a new connection
    /// while its old request is still running, or sends it to another node of a farm.
    pub(crate) locks: SessionLocks,
    /// Makes "count open sessions, then reserve a place" atomic within this process.
    pub(crate) create_lock: tokio::sync::Mutex<()>,
    /// Creates admitted under `create_lock` whose records are still being written: counted
    /// with the store's open sessions, so the lock need not be held across the write.
    pub(crate) pending_creates: PendingCreates,
    /// Upload-reply mode, if a completion handler or notification is configured.
    pub(crate) reply: Option<ReplyMode>,
    /// The application's hooks, if any.
    pub(crate) hooks: Option<Box<dyn DynHooks>>,
    /// Wakes the sweeper when a deferred commit is scheduled.
    pub(crate) wakeup: tokio::sync::Notify,
    /// Bumped whenever a deferred commit changes state, for waiters.
    pub(crate) deferred_changed: tokio::sync::watch::Sender<u64>,
    /// Running, shutting down or disabled, and the requests in flight.
    pub(crate) lifecycle: Lifecycle,
    /// When to enforce the limits on what ended sessions leave behind.
    pub(crate) tombstones: crate::retention::Tombstones,
    /// Whether a [`Sweeper::run`](crate::Sweeper::run) has started, and whether its absence
    /// was already logged.
    pub(crate) sweeper_started: std::sync::atomic::AtomicBool,
    pub(crate) sweeper_missing_logged: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Logs once, loudly, that sessions are being created while no sweeper runs: without it
    /// nothing expires, start-up recovery did not run, events are not redelivered and deferred
    /// commits are never retried.
    fn warn_if_no_sweeper(&self) {
        use std::sync::atomic::Ordering;
        if self.sweeper_started.load(Ordering::Relaxed)
            || self.sweeper_missing_logged.swap(true, Ordering::Relaxed)
        {
            return;
        }
        tracing::warn!(
            "sessions are being created but no Sweeper runs: spawn BitsLayer::sweeper().run(),              or idle sessions never expire, start-up recovery does not run, hook events are not              redelivered and deferred commits are not retried"
        );
    }
}

/// Session creates admitted but not yet in the store, by owner.
#[derive(Debug, Default)]
pub(crate) struct PendingCreates {
    inner: std::sync::Mutex<(usize, std::collections::HashMap<Owner, usize>)>,
}

impl PendingCreates {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, std::collections::HashMap<Owner, usize>)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pending creates in all, and of `owner`.
    fn counts(&self, owner: Option<&Owner>) -> (usize, usize) {
        let pending = self.lock();
        let mine = owner.and_then(|o| pending.1.get(o)).copied().unwrap_or(0);
        (pending.0, mine)
    }

    /// Counts one more until the returned guard is dropped.
    fn reserve(&self, owner: Option<Owner>) -> Reservation<'_> {
        let mut pending = self.lock();
        pending.0 += 1;
        if let Some(owner) = &owner {
            *pending.1.entry(owner.clone()).or_default() += 1;
        }
        Reservation {
            pending: self,
            owner,
        }
    }
}

/// One pending create; released on drop.
struct Reservation<'a> {
    pending: &'a PendingCreates,
    owner: Option<Owner>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut pending = self.pending.lock();
        pending.0 = pending.0.saturating_sub(1);
        if let Some(owner) = &self.owner {
            if let Some(n) = pending.1.get_mut(owner) {
                *n -= 1;
                if *n == 0 {
                    pending.1.remove(owner);
                }
            }
        }
    }
}

/// Upload-reply mode: the completion handler and the storage of its replies.
pub(crate) struct ReplyMode {
    pub(crate) handler: Box<dyn DynCompletion>,
    pub(crate) replies: Replies,
}

impl Shared {
    /// Adds an event to the record's outbox, if anyone listens.
    pub(crate) fn queue(&self, record: &mut SessionRecord, kind: EventKind) {
        if self.hooks.is_some() {
            let event = Event::new(record, kind, now_ms());
            crate::session::enqueue(record, event);
        }
    }

    /// Delivers the record's outbox and forgets what was delivered. Failures keep the event
    /// for the sweeper to deliver again; they never fail the packet.
    pub(crate) async fn deliver(&self, record: &mut SessionRecord) {
        let Some(hooks) = &self.hooks else { return };
        if record.outbox.is_empty() {
            return;
        }
        let mut delivered = Vec::new();
        for event in &record.outbox {
            match hooks.on_event(event).await {
                Ok(()) => delivered.push(event.key.clone()),
                Err(error) => {
                    tracing::warn!(key = %event.key, %error, "event delivery failed; will retry");
                    break;
                }
            }
        }
        if delivered.is_empty() {
            return;
        }
        let forget = |r: &mut SessionRecord| r.outbox.retain(|e| !delivered.contains(&e.key));
        if let Err(error) = amend(self, record, forget).await {
            tracing::warn!(%error, "cannot record event delivery; events will repeat");
        }
    }

    /// Lets the sweeper and waiters know that a deferred commit changed.
    pub(crate) fn deferred_touched(&self) {
        self.deferred_changed
            .send_modify(|n| *n = n.wrapping_add(1));
        self.wakeup.notify_one();
    }
}

/// Everything that can stop a packet, each mapped to its Ack by its own type.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("the server's session limit is reached")]
    TooManySessions,
    #[error("the owner's session limit is reached")]
    OwnerLimit,
    #[error(transparent)]
    Vetoed(#[from] Veto),
    #[error("completion failed: {error}")]
    Application { ack: Ack, error: CompletionError },
    #[error("the destination is busy: {error}")]
    Busy { ack: Ack, error: StagingError },
    #[error("upload-reply needs a staging with local paths")]
    NoLocalPath,
}

impl Failure {
    fn ack(&self) -> Ack {
        match self {
            Self::Refused(r) => r.ack(),
            Self::Destination(e) => e.ack(),
            Self::Store(e) | Self::Lock(LockError::Store(e)) => e.ack(),
            Self::Lock(LockError::Busy) => Ack::error(
                StatusCode::SERVICE_UNAVAILABLE,
                Hresult::BUSY,
                ErrorContext::RemoteFile,
            ),
            Self::Staging(e) | Self::Body(BodyError::Staging(e)) => e.ack(),
            Self::Body(BodyError::Interrupted) => shutting_down(),
            Self::Body(BodyError::Idle(_) | BodyError::TooSlow(_)) => Ack::error(
                StatusCode::REQUEST_TIMEOUT,
                Hresult::TIMEOUT,
                ErrorContext::RemoteFile,
            ),
            // The body did not match its Content-Length: malformed, like a bad header.
            Self::Body(BodyError::TooShort { .. } | BodyError::TooLong | BodyError::Client(_)) => {
                Ack::error(
                    StatusCode::BAD_REQUEST,
                    Hresult::E_INVALIDARG,
                    ErrorContext::RemoteFile,
                )
            }
            // 503 is transient for the client: it retries later.
            Self::TooManySessions | Self::OwnerLimit => Ack::error(
                StatusCode::SERVICE_UNAVAILABLE,
                Hresult::TOO_MANY_SESSIONS,
                ErrorContext::RemoteFile,
            ),
            Self::Vetoed(veto) => veto.ack(),
            Self::Application { ack, .. } | Self::Busy { ack, .. } => ack.clone(),
            Self::NoLocalPath => Ack::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                Hresult::E_FAIL,
                ErrorContext::RemoteFile,
            ),
        }
    }

    fn log(&self) {
        let server_fault = match self {
            Self::Store(StoreError::Backend(_) | StoreError::Conflict)
            | Self::Lock(LockError::Store(_)) => true,
            Self::Lock(LockError::Busy) => {
                tracing::warn!("another node kept the session's lease for the whole wait");
                return;
            }
            Self::NoLocalPath => true,
            Self::Application { .. } | Self::Busy { .. } => {
                tracing::warn!(error = %self, source = ?std::error::Error::source(self), "upload not completed");
                return;
            }
            Self::Staging(e) | Self::Body(BodyError::Staging(e)) => e.is_server_fault(),
            _ => false,
        };
        if server_fault {
            tracing::error!(error = %self, source = ?std::error::Error::source(self), "packet failed");
        } else {
            tracing::debug!(error = %self, "packet refused");
        }
    }
}

/// Handles one `BITS_POST` request. Never fails: every outcome is an Ack.
pub(crate) async fn handle<B>(shared: Arc<Shared>, request: Request<B>) -> Ack
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<crate::BoxError>,
{
    let (parts, body) = request.into_parts();
    // A client that waits for "100 Continue" has sent no body yet; reading it would ask for
    // bytes the server is about to refuse.
    let expects_continue = parts
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let is_fragment = parts
        .headers
        .get(headers::BITS_PACKET_TYPE)
        .and_then(|v| PacketType::parse(v.as_bytes()))
        == Some(PacketType::Fragment);
    let (_in_flight, state) = shared.lifecycle.enter();
    let mut body = Some(body);
    let ack = match refusal(state) {
        Some(ack) => ack,
        None => dispatch(&shared, parts, &mut body).await,
    };
    if let Some(unread) = body.filter(|b| !expects_continue && !b.is_end_stream()) {
        linger(&shared, unread, is_fragment);
    }
    ack
}

/// Reads and drops a body the packet did not use, after its Ack has gone out: a client that
/// sends a body with a refused fragment (or with a packet that carries none) gets its answer
/// at once, and its connection stays usable if the body then arrives at a reasonable pace (a
/// connection closed on unread bytes is reset, which can destroy the Ack before the client
/// reads it: a client that never sees a 413 never shrinks its fragments). A body that breaks
/// the pace, or is longer than any fragment may be, is dropped, and the connection with it.
/// The drain runs as a task of its own, bounded by the pace and the limit, and ends at
/// shutdown; without a tokio runtime the body is just dropped.
fn linger<B>(shared: &Arc<Shared>, body: B, is_fragment: bool)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<crate::BoxError>,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let limit = if is_fragment {
        DRAIN_LIMIT.max(shared.config.max_fragment_size)
    } else {
        NO_BODY_DRAIN_LIMIT
    };
    let pace = shared.config.pace();
    let stopped = shared.lifecycle.stopped();
    runtime.spawn(async move {
        if !drain(body, limit, pace, stopped).await {
            tracing::debug!("unused request body abandoned; the connection closes");
        }
    });
}

/// The answer to every packet in a state that takes none.
fn refusal(state: State) -> Option<Ack> {
    match state {
        State::Running | State::Draining => None,
        State::Stopped => Some(shutting_down()),
        State::Disabled => Some(uploads_disabled()),
    }
}

/// 501 + `E_ACCESSDENIED`: uploads are not enabled for the URL (IIS 6). Fatal for the client.
fn uploads_disabled() -> Ack {
    Ack::error(
        StatusCode::NOT_IMPLEMENTED,
        Hresult::E_ACCESSDENIED,
        ErrorContext::RemoteFile,
    )
}

/// 503: transient, the client comes back later.
fn shutting_down() -> Ack {
    Ack::error(
        StatusCode::SERVICE_UNAVAILABLE,
        Hresult::SHUTTING_DOWN,
        ErrorContext::RemoteFile,
    )
}

/// Bodies of refused fragments up to this size are read and dropped to keep the connection.
const DRAIN_LIMIT: u64 = 32 << 20;

/// The same for packets that carry no body by protocol (Ping, Create-, Close-, Cancel-Session):
/// Windows sends none, so anything longer is not a client worth keeping a connection for.
const NO_BODY_DRAIN_LIMIT: u64 = 64 << 10;

/// Parses the packet and runs it. Takes the body out of `body` only if it reads it.
async fn dispatch<B>(shared: &Shared, parts: Parts, body: &mut Option<B>) -> Ack
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<crate::BoxError>,
{
    let packet = match Packet::parse(&parts) {
        Ok(packet) => packet,
        Err(error) => {
            tracing::debug!(%error, uri = %parts.uri, "malformed BITS packet");
            let mut ack = error.ack();
            // Repeated headers that disagree leave open which session the client meant: name
            // none, and report no offset.
            if matches!(error, ProtocolError::ConflictingHeader(_)) {
                return ack;
            }
            let echo = parts
                .headers
                .get(headers::BITS_SESSION_ID)
                .filter(|v| v.len() <= crate::protocol::MAX_HEADER_VALUE_LEN)
                .cloned();
            if let Some(received) = offset_of_fragment(shared, &parts).await {
                ack = ack.received(received);
            }
            return ack.maybe_session_id(echo);
        }
    };
    let owner = parts.extensions.get::<Owner>().cloned();
    let span = tracing::info_span!(
        "bits",
        packet = %packet.packet_type(),
        session = tracing::field::Empty,
    );
    if let Some(id) = packet.session_id().and_then(SessionHeader::as_str) {
        span.record("session", tracing::field::display(id));
    }
    let work = async move {
        match packet {
            Packet::Ping => Ack::ok(),
            Packet::CreateSession(create) => create_session(shared, &parts, create, owner).await,
            Packet::Fragment(fragment) => {
                handle_fragment(shared, fragment, owner.as_ref(), body).await
            }
            Packet::CloseSession(id) => {
                let result = close_session(shared, &id, owner.as_ref()).await;
                finish(result).session_id(id.value().clone())
            }
            Packet::CancelSession(id) => {
                let result = cancel_session(shared, &id, owner.as_ref()).await;
                finish(result).session_id(id.value().clone())
            }
        }
    };
    work.instrument(span).await
}

/// The session's offset for a Fragment whose headers are malformed but whose session exists,
/// so that its error Ack, like every Fragment Ack, reports `BITS-Received-Content-Range`.
async fn offset_of_fragment(shared: &Shared, parts: &Parts) -> Option<u64> {
    let ty = parts.headers.get(headers::BITS_PACKET_TYPE)?;
    if PacketType::parse(ty.as_bytes()) != Some(PacketType::Fragment) {
        return None;
    }
    let id = parts.headers.get(headers::BITS_SESSION_ID)?.to_str().ok()?;
    let owner = parts.extensions.get::<Owner>();
    let record = shared.store.load(SessionId::parse(id)?).await.ok()??;
    (record.is_open() && record.is_owned_by(owner)).then_some(record.received)
}

fn finish(result: Result<Ack, Failure>) -> Ack {
    result.unwrap_or_else(|failure| {
        failure.log();
        failure.ack()
    })
}

/// Locks the session named by `header` and loads its record. Unknown ids, malformed ids and
/// sessions of another owner are all "not found".
async fn open_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<(SessionGuard, SessionRecord), Failure> {
    let id = header
        .as_str()
        .and_then(SessionId::parse)
        .ok_or(Refusal::NotFound)?;
    let guard = shared.locks.lock(id).await?;
    let loaded = shared.store.load(id).await;
    match loaded {
        // Past its keeping time but not yet swept (the sweep interval can be long): it is
        // answered as gone, and its data is deleted now.
        Ok(Some(record))
            if record.is_owned_by(owner) && retention::is_due(shared, &record, now_ms()) =>
        {
            match retention::forget(shared, &record).await {
                Ok(forgotten) => tracing::debug!(?forgotten, "packet for an expired session"),
                Err(error) => tracing::warn!(%error, "cannot forget an expired session"),
            }
            guard.release().await;
            Err(Refusal::NotFound.into())
        }
        Ok(Some(record)) if record.is_owned_by(owner) => Ok((guard, record)),
        Ok(_) => {
            guard.release().await;
            Err(Refusal::NotFound.into())
        }
        Err(error) => {
            guard.release().await;
            Err(error.into())
        }
    }
}

/// Applies `change` to a copy of `record`, stores it by compare-and-set, and adopts it. Not a
/// packet: the session timer is left alone.
pub(crate) async fn amend(
    shared: &Shared,
    record: &mut SessionRecord,
    change: impl FnOnce(&mut SessionRecord),
) -> Result<(), StoreError> {
    let mut next = record.clone();
    change(&mut next);
    next.revision = record.revision + 1;
    shared.store.update(record.revision, &next).await?;
    *record = next;
    Ok(())
}

/// [`amend`] for a successful packet: the session timer restarts.
async fn save(
    shared: &Shared,
    record: &mut SessionRecord,
    change: impl FnOnce(&mut SessionRecord),
) -> Result<(), StoreError> {
    amend(shared, record, |r| {
        change(r);
        r.updated_ms = now_ms();
    })
    .await
}

/// Records a successful packet that changed nothing else, so the session timer restarts.
async fn touch(shared: &Shared, record: &mut SessionRecord) -> Result<(), StoreError> {
    save(shared, record, |_| {}).await
}

async fn create_session(
    shared: &Shared,
    parts: &Parts,
    create: CreateSession,
    owner: Option<Owner>,
) -> Ack {
    let config = &shared.config;
    let reply_mode = shared.reply.is_some();
    match shared.lifecycle.state() {
        State::Running => {}
        State::Draining | State::Stopped => return shutting_down(),
        State::Disabled => return uploads_disabled(),
    }
    let result = async {
        let destination =
            destination::from_url_path(parts.uri.path(), &config.prefix, &config.reserved)?;
        // Upload-reply sessions hand their file to the application; many clients post to one
        // application URL, so they neither claim nor check the destination up front (a copy
        // the application asks for is checked at its commit).
        if !reply_mode {
            shared
                .staging
                .check_destination(&destination, config.allow_overwrites)
                .await?;
        }
        let id = SessionId::new();
        let request_url = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let mut record =
            SessionRecord::new(id, destination.to_string(), request_url, owner, now_ms());
        record.content_name = create.content_name;
        record.claims_destination = !reply_mode;
        record.origin = origin_of(config, parts);
        if record.owner.is_none() {
            record.peer = peer_of(parts);
        }
        if let Some(hooks) = &shared.hooks {
            hooks
                .on_create(&Event::new(&record, EventKind::Created, now_ms()))
                .await?;
        }
        {
            let _reserved = {
                let _serial = shared.create_lock.lock().await;
                let counted = record.counted_as();
                let (pending, pending_for_owner) = shared.pending_creates.counts(counted.as_ref());
                if shared.store.count_open().await? + pending >= config.max_sessions
                    && !reclaim_empty(shared).await?
                {
                    return Err(Failure::TooManySessions);
                }
                if let Some(counted) = &counted {
                    let limit = if record.owner.is_some() {
                        config.max_sessions_per_owner
                    } else {
                        config.max_sessions_per_peer
                    };
                    if shared.store.count_open_for(counted).await? + pending_for_owner >= limit {
                        return Err(Failure::OwnerLimit);
                    }
                }
                shared.pending_creates.reserve(counted)
            };
            match shared.store.create(&record).await {
                Err(StoreError::DestinationBusy { holder })
                    if take_over_abandoned(shared, holder, record.owner.as_ref()).await? =>
                {
                    shared.store.create(&record).await?;
                }
                other => other?,
            }
        }
        if let Err(error) = shared.staging.create(id).await {
            if let Err(e) = shared.store.remove(id).await {
                tracing::error!(error = %e, session = %id, "cannot remove the record of a failed Create-Session");
            }
            return Err(error.into());
        }
        tracing::Span::current().record("session", tracing::field::display(id));
        shared.warn_if_no_sweeper();
        match &record.owner {
            Some(owner) => tracing::info!(%destination, %owner, "session created"),
            None => tracing::info!(%destination, peer = ?record.peer, "session created"),
        }
        let id = HeaderValue::from_str(&id.to_string())
            .expect("a braced GUID is a valid header value");
        let mut ack = Ack::ok().session_id(id).protocol();
        if let Some(host) = &config.host_id {
            ack = ack.host_id(host.clone(), config.host_id_fallback_timeout);
        }
        Ok(ack)
    }
    .await;
    finish(result)
}

/// `scheme://authority` the client addressed: the configured public origin, or the request's
/// own (absolute-form target, else the `Host` header, over `http`).
fn origin_of(config: &ValidConfig, parts: &Parts) -> Option<String> {
    if let Some(origin) = &config.public_origin {
        return Some(origin.clone());
    }
    let implied = if config.https { "https" } else { "http" };
    let scheme = parts.uri.scheme_str().unwrap_or(implied);
    let authority = match parts.uri.authority() {
        Some(authority) => authority.clone(),
        None => {
            let host = parts.headers.get(http::header::HOST)?.to_str().ok()?;
            host.parse::<http::uri::Authority>().ok()?
        }
    };
    // User info (`user@host`) names no host of ours; such an origin is not repeated in URLs.
    if authority.as_str().contains('@') {
        return None;
    }
    Some(format!("{scheme}://{authority}"))
}

/// The client's address, if the application put one in the request: [`PeerAddr`], or axum's
/// `ConnectInfo<SocketAddr>`. An IPv4 address mapped into IPv6 counts as the IPv4 address, and
/// an IPv6 address by its /64 prefix, since one client is usually given a whole /64.
fn peer_of(parts: &Parts) -> Option<std::net::IpAddr> {
    let ip = match parts.extensions.get::<crate::PeerAddr>() {
        Some(peer) => peer.0,
        None => connect_info(parts)?,
    };
    Some(match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    })
}

#[cfg(feature = "axum")]
fn connect_info(parts: &Parts) -> Option<std::net::IpAddr> {
    use axum::extract::ConnectInfo;
    let ConnectInfo(addr) = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()?;
    Some(addr.ip())
}

#[cfg(not(feature = "axum"))]
fn connect_info(_: &Parts) -> Option<std::net::IpAddr> {
    None
}

/// The server is full: cancels the oldest session that never received a byte and has been
/// idle for `reclaim_empty_after`, so that sessions created and left empty cannot keep
/// everyone else out for the whole session timeout. Returns whether a place was freed.
async fn reclaim_empty(shared: &Shared) -> Result<bool, Failure> {
    let idle = duration_ms(shared.config.reclaim_empty_after);
    let cutoff = now_ms().saturating_sub(idle);
    let is_empty = |r: &SessionRecord| {
        r.phase == Phase::Receiving && r.received == 0 && r.is_idle_since(cutoff)
    };
    let mut candidates = shared.store.list_idle(cutoff).await?;
    candidates.retain(is_empty);
    candidates.sort_by_key(|r| r.updated_ms);
    // A few tries: a candidate may be busy, or have moved on since it was listed.
    for candidate in candidates.iter().take(8) {
        let Some(guard) = shared.locks.try_lock(candidate.id).await? else {
            continue;
        };
        let Some(mut stale) = shared.store.load(candidate.id).await? else {
            guard.release().await;
            continue;
        };
        if !is_empty(&stale) {
            guard.release().await;
            continue;
        }
        shared.staging.discard(stale.id).await?;
        let reclaimed = amend(shared, &mut stale, |r| {
            shared.queue(
                r,
                EventKind::Cancelled {
                    reason: CancelReason::Reclaimed,
                },
            );
            r.end(Phase::Cancelled);
        })
        .await;
        if reclaimed.is_ok() {
            shared.deliver(&mut stale).await;
        }
        guard.release().await;
        reclaimed?;
        tracing::info!(session = %stale.id, "server full: reclaimed a session that never received a byte");
        shared.tombstones.ended(shared).await;
        return Ok(true);
    }
    Ok(false)
}

/// A client whose Create-Session Ack was lost retries Create-Session; its first session then
/// holds the destination and would answer 409 until it expired (days). A holder of the same
/// owner that never received a byte and has been idle for a while is such an orphan: cancel
/// it so the new session can proceed. Returns whether the destination was freed.
async fn take_over_abandoned(
    shared: &Shared,
    holder: SessionId,
    owner: Option<&Owner>,
) -> Result<bool, Failure> {
    // A holder whose lock is taken has a packet in flight: not abandoned. (Waiting for it
    // here would stall every Create-Session behind the create lock.)
    let Some(_guard) = shared.locks.try_lock(holder).await? else {
        return Ok(false);
    };
    let Some(mut stale) = shared.store.load(holder).await? else {
        return Ok(false);
    };
    let abandoned = stale.phase == Phase::Receiving
        && stale.total.is_none()
        && stale.received == 0
        && stale.owner.as_ref() == owner
        && stale.is_idle_since(now_ms().saturating_sub(duration_ms(shared.config.abandoned_after)));
    if !abandoned {
        return Ok(false);
    }
    shared.staging.discard(holder).await?;
    save(shared, &mut stale, |r| r.end(Phase::Cancelled)).await?;
    tracing::info!(%holder, "replaced a session that never received a byte");
    shared.tombstones.ended(shared).await;
    Ok(true)
}

async fn handle_fragment<B>(
    shared: &Shared,
    fragment: Fragment,
    owner: Option<&Owner>,
    body: &mut Option<B>,
) -> Ack
where
    B: Body + Send,
    B::Error: Into<crate::BoxError>,
{
    let mut received = None;
    let result = write_fragment(shared, &fragment, owner, body, &mut received).await;
    let ack = finish(result).session_id(fragment.session_id.value().clone());
    match received {
        Some(received) => ack.received(received),
        None => ack,
    }
}

/// The Fragment logic. `received` is kept at the session's true offset as it changes, so
/// that every Ack, error Acks included, reports it.
async fn write_fragment<B>(
    shared: &Shared,
    fragment: &Fragment,
    owner: Option<&Owner>,
    body: &mut Option<B>,
    received: &mut Option<u64>,
) -> Result<Ack, Failure>
where
    B: Body + Send,
    B::Error: Into<crate::BoxError>,
{
    let (guard, mut record) = open_session(shared, &fragment.session_id, owner).await?;
    let result = fragment_locked(shared, fragment, &mut record, body, received).await;
    guard.release().await;
    result
}

/// [`write_fragment`] with the session locked.
async fn fragment_locked<B>(
    shared: &Shared,
    fragment: &Fragment,
    record: &mut SessionRecord,
    body: &mut Option<B>,
    received: &mut Option<u64>,
) -> Result<Ack, Failure>
where
    B: Body + Send,
    B::Error: Into<crate::BoxError>,
{
    let config = &shared.config;
    *received = Some(record.received);

    let limits = Limits {
        max_upload_size: config.max_upload_size,
        max_fragment_size: config.max_fragment_size,
    };
    match machine::fragment(record, &fragment.range, &limits) {
        FragmentDecision::Refuse(refusal) => {
            if refusal == Refusal::NotFound {
                // A session that is gone has no offset to report.
                *received = None;
            }
            return Err(refusal.into());
        }
        // A re-sent fragment is a successful packet: it resets the session timer.
        FragmentDecision::Duplicate => touch(shared, record).await?,
        FragmentDecision::Write(write) => {
            let Some(body) = body.take() else {
                return Err(BodyError::TooShort { missing: write.len }.into());
            };
            let stored = store_fragment(shared, record, write, body, received).await;
            shared.deliver(record).await;
            stored?;
        }
    }
    // Also reached by a re-sent final fragment after a completion that failed (the
    // application was down, the destination appeared meanwhile): it is retried rather than
    // the upload reported as done.
    let ack = if record.phase == Phase::Complete {
        let finished = finish_upload(shared, record).await;
        shared.deliver(record).await;
        finished?
    } else {
        Ack::ok()
    };
    Ok(ack)
}

/// Takes a complete session as far as the commit point allows: asks the application (once)
/// in upload-reply mode, and commits at the last fragment if that is the commit point. The Ack
/// carries the reply URL in upload-reply mode.
async fn finish_upload(shared: &Shared, record: &mut SessionRecord) -> Result<Ack, Failure> {
    let reply_mode = shared.reply.is_some();
    if let (Some(mode), None) = (&shared.reply, &record.outcome) {
        let outcome = run_completion(shared, mode, record).await?;
        let copy = outcome.copy_to_destination;
        save(shared, record, |r| {
            r.outcome = Some(outcome);
            if !copy {
                let size = r.received;
                shared.queue(
                    r,
                    EventKind::Completed {
                        size,
                        committed: false,
                    },
                );
            }
        })
        .await?;
        tracing::info!(copy, "application answered");
    }
    if machine::needs_commit(record, reply_mode)
        && shared.config.commit_point == CommitPoint::LastFragment
    {
        commit_or_defer(shared, record).await?;
    }
    let mut ack = Ack::ok();
    if let Some(outcome) = &record.outcome {
        let url = HeaderValue::from_str(&outcome.reply_url)
            .map_err(|_| invalid_answer("the reply URL is not a valid header value"))?;
        ack = ack.reply_url(url);
    }
    Ok(ack)
}

fn invalid_answer(why: &str) -> Failure {
    let error = CompletionError::InvalidAnswer(why.to_owned());
    Failure::Application {
        ack: error.ack(&CompletionPolicy::RetryLater),
        error,
    }
}

/// Hands a complete upload to the completion handler and stores its reply.
async fn run_completion(
    shared: &Shared,
    mode: &ReplyMode,
    record: &SessionRecord,
) -> Result<Outcome, Failure> {
    let ReplyMode { handler, replies } = mode;
    // Checked when the layer was built; a custom staging could still change its mind.
    let staged_path = shared.staging.path(record.id).ok_or(Failure::NoLocalPath)?;
    let origin = record.origin.as_deref().unwrap_or("");
    let upload = CompletedUpload {
        session_id: record.id,
        url: format!("{origin}{}", record.request_url),
        destination: record.destination.clone(),
        staged_path,
        reply_path: replies.path(record.id),
        size: record.received,
        owner: record.owner.clone(),
    };
    // A reply left by an earlier, failed attempt must not pass for this attempt's answer.
    replies.remove(record.id).await.map_err(StagingError::Io)?;
    let policy = shared.config.completion_policy;
    let completion = handler
        .complete(upload)
        .await
        .map_err(|error| Failure::Application {
            ack: error.ack(&policy),
            error,
        })?;
    let (reply_url, stored_reply) = match completion.reply {
        Reply::StaticUrl(url) => {
            if !crate::completion::is_absolute_http_url(&url) {
                return Err(invalid_answer(
                    "the static reply URL is not an absolute http(s) URL",
                ));
            }
            replies.remove(record.id).await.map_err(StagingError::Io)?;
            (url, None)
        }
        reply => {
            let stored = replies
                .store(record.id, reply)
                .await
                .map_err(StagingError::Io)?;
            (reply_url_of(shared, record), Some(stored))
        }
    };
    if reply_url.len() > crate::completion::MAX_URL_LEN {
        return Err(invalid_answer(
            "the reply URL is longer than 2,200 characters",
        ));
    }
    if HeaderValue::from_str(&reply_url).is_err() {
        return Err(invalid_answer("the reply URL is not a valid header value"));
    }
    Ok(Outcome {
        reply_url,
        stored_reply,
        copy_to_destination: completion.copy_to_destination,
    })
}

/// Where the client downloads a stored reply: on the public origin if configured, else on the
/// host id (in a farm without shared storage, the node that has the reply), else on the host
/// the client uploaded to.
fn reply_url_of(shared: &Shared, record: &SessionRecord) -> String {
    let config = &shared.config;
    let origin = match (&config.public_origin, &config.host_id, &record.origin) {
        (Some(origin), _, _) => origin.clone(),
        (None, Some(host), Some(origin)) => {
            let (scheme, authority) = origin.split_once("://").unwrap_or(("http", origin));
            let port = authority
                .parse::<http::uri::Authority>()
                .ok()
                .and_then(|a| a.port_u16())
                .map(|p| format!(":{p}"))
                .unwrap_or_default();
            let host = host.to_str().unwrap_or_default();
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_owned()
            };
            format!("{scheme}://{host}{port}")
        }
        (None, _, origin) => origin.clone().unwrap_or_default(),
    };
    reply::reply_url(&origin, &record.request_url, record.id)
}

/// Commits, applying the completion policy when the destination is busy.
async fn commit_or_defer(shared: &Shared, record: &mut SessionRecord) -> Result<(), Failure> {
    let error = match commit(shared, record).await {
        Err(Failure::Staging(error)) if error.is_busy() => error,
        other => return other,
    };
    let policy = shared.config.completion_policy;
    let CompletionPolicy::Defer(backoff) = policy else {
        return Err(Failure::Busy {
            ack: policy.busy_ack(Busy::Destination),
            error,
        });
    };
    let next = now_ms().saturating_add(duration_ms(backoff.delay(1)));
    let why = error.to_string();
    save(shared, record, |r| {
        r.deferred = Some(DeferredState {
            status: DeferredStatus::Pending,
            attempts: 1,
            next_attempt_ms: next,
            last_error: Some(why),
        });
    })
    .await?;
    tracing::info!(%error, "destination busy; commit deferred");
    shared.deferred_touched();
    Ok(())
}

pub(crate) fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Streams the new bytes of a fragment into the part and advances the record.
async fn store_fragment<B>(
    shared: &Shared,
    record: &mut SessionRecord,
    write: Write,
    body: B,
    received: &mut Option<u64>,
) -> Result<(), Failure>
where
    B: Body + Send,
    B::Error: Into<crate::BoxError>,
{
    let mut part = match shared.staging.open(record.id, write.offset).await {
        Err(StagingError::PartShort { held }) => {
            return rewind_to_part(shared, record, held, received).await;
        }
        opened => opened?,
    };
    let (written, copied) = copy_fragment(
        body,
        write.skip,
        write.len,
        part.as_mut(),
        shared.config.pace(),
        shared.lifecycle.interrupted(),
    )
    .await;
    if matches!(copied, Err(BodyError::Interrupted)) {
        shared.lifecycle.count_interrupted();
        tracing::info!(
            written,
            "fragment stopped by shutdown; what arrived is kept"
        );
    }
    let flushed = part.finish().await;
    if let (Err(BodyError::Staging(StagingError::PartShort { held })), _)
    | (_, Err(StagingError::PartShort { held })) = (&copied, &flushed)
    {
        return rewind_to_part(shared, record, *held, received).await;
    }
    match (copied, flushed) {
        (Ok(()), Ok(())) => {}
        (Err(BodyError::Staging(e)), _) | (Ok(()), Err(e)) => return Err(e.into()),
        // Every byte of the range arrived before the body failed (a reset after the last
        // frame): the fragment is whole, so it counts in full and may complete the file.
        (Err(error), Ok(())) if written == write.len => {
            tracing::debug!(%error, "body failed after its last byte; fragment kept");
        }
        (Err(error), flushed) => {
            // Keep the prefix that did arrive: it is genuine data at the right offsets, and the
            // client resumes from it through BITS-Received-Content-Range.
            let keep = !matches!(error, BodyError::TooLong) && flushed.is_ok() && written > 0;
            if keep {
                save(shared, record, |r| {
                    r.advance(write.total, write.offset + written)
                })
                .await?;
                *received = Some(record.received);
            }
            return Err(error.into());
        }
    }
    save(shared, record, |r| {
        r.advance(write.total, write.end());
        let (received, total) = (r.received, write.total);
        shared.queue(r, EventKind::Progress { received, total });
    })
    .await?;
    *received = Some(record.received);
    if write.completes() {
        tracing::info!(bytes = write.total, "all bytes received");
    }
    Ok(())
}

/// The part holds fewer bytes than the record says (a power loss without fsync, or a part
/// deleted behind the server's back): the part is the ground truth, so the session resumes
/// from what it holds, and the client is told where with a 416.
async fn rewind_to_part(
    shared: &Shared,
    record: &mut SessionRecord,
    held: u64,
    received: &mut Option<u64>,
) -> Result<(), Failure> {
    tracing::warn!(
        recorded = record.received,
        held,
        "staged data is shorter than the record; resuming from the data"
    );
    save(shared, record, |r| r.rewind(held)).await?;
    *received = Some(record.received);
    Err(Refusal::Gap.into())
}

/// Moves a complete session's file to its destination and records that it did.
pub(crate) async fn commit(shared: &Shared, record: &mut SessionRecord) -> Result<(), Failure> {
    let config = &shared.config;
    let destination = Destination::from_stored(&record.destination, &config.reserved)?;
    let total = record.total.unwrap_or(record.received);
    match shared
        .staging
        .commit(record.id, &destination, total, config.allow_overwrites)
        .await
    {
        // A crash between the move and its record leaves a record that still wants to
        // commit; the staging can tell that the file already got there.
        Err(StagingError::PartMissing | StagingError::DestinationExists)
            if shared
                .staging
                .committed(record.id, &destination, total)
                .await? =>
        {
            tracing::info!(%destination, "the file had already been committed");
        }
        other => other?,
    }
    save(shared, record, |r| {
        r.committed = true;
        shared.queue(
            r,
            EventKind::Completed {
                size: total,
                committed: true,
            },
        );
    })
    .await?;
    tracing::info!(%destination, bytes = total, "upload committed");
    Ok(())
}

async fn close_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<Ack, Failure> {
    let (guard, mut record) = open_session(shared, header, owner).await?;
    let result = close_locked(shared, &mut record).await;
    shared.deliver(&mut record).await;
    guard.release().await;
    result
}

async fn close_locked(shared: &Shared, record: &mut SessionRecord) -> Result<Ack, Failure> {
    let mut incomplete = false;
    match machine::close(record, shared.reply.is_some()) {
        CloseDecision::Discard => {
            shared.staging.discard(record.id).await?;
            incomplete = true;
            tracing::warn!(
                received = record.received,
                total = ?record.total,
                "closed before every byte arrived; staged data deleted, nothing committed"
            );
        }
        CloseDecision::Commit => {
            commit_or_defer(shared, record).await?;
            release(shared, record).await?;
        }
        CloseDecision::Release => release(shared, record).await?,
        CloseDecision::Repeat => {
            touch(shared, record).await?;
            return Ok(Ack::ok());
        }
        CloseDecision::Refuse(refusal) => return Err(refusal.into()),
    }
    save(shared, record, |r| {
        r.phase = Phase::Closed;
        if incomplete {
            let reason = CancelReason::ClosedIncomplete;
            shared.queue(r, EventKind::Cancelled { reason });
        }
        r.end(Phase::Closed);
    })
    .await?;
    tracing::info!("session closed");
    shared.tombstones.ended(shared).await;
    Ok(Ack::ok())
}

/// Deletes what a finished (or expired) session leaves behind: its reply, and its staged
/// data unless a deferred commit still needs it.
pub(crate) async fn release(shared: &Shared, record: &SessionRecord) -> Result<(), StagingError> {
    if !record.is_deferred() {
        shared.staging.discard(record.id).await?;
    }
    if let Some(mode) = &shared.reply {
        mode.replies.remove(record.id).await?;
    }
    Ok(())
}

async fn cancel_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<Ack, Failure> {
    let (guard, mut record) = open_session(shared, header, owner).await?;
    let result = cancel_locked(shared, &mut record).await;
    guard.release().await;
    result
}

async fn cancel_locked(shared: &Shared, record: &mut SessionRecord) -> Result<Ack, Failure> {
    match machine::cancel(record) {
        CancelDecision::Repeat => {
            touch(shared, record).await?;
            return Ok(Ack::ok());
        }
        CancelDecision::Discard => release(shared, record).await?,
    }
    save(shared, record, |r| {
        r.phase = Phase::Cancelled;
        let reason = CancelReason::CancelSession;
        shared.queue(r, EventKind::Cancelled { reason });
        r.end(Phase::Cancelled);
    })
    .await?;
    shared.deliver(record).await;
    tracing::info!(committed = record.committed, "session cancelled");
    shared.tombstones.ended(shared).await;
    Ok(Ack::ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(target: &str, host: Option<&str>) -> Parts {
        let mut request = http::Request::builder().uri(target);
        if let Some(host) = host {
            request = request.header(http::header::HOST, host);
        }
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_origin_comes_from_the_configuration_or_the_request_and_never_carries_user_info() {
        let config = crate::config::Config::default().validate().expect("config");
        let origin = |target, host| origin_of(&config, &parts(target, host));
        assert_eq!(
            origin("/a.bin", Some("bits.example:8080")).as_deref(),
            Some("http://bits.example:8080")
        );
        assert_eq!(
            origin("http://other.example/a.bin", Some("bits.example")).as_deref(),
            Some("http://other.example")
        );
        assert_eq!(origin("/a.bin", None), None);
        assert_eq!(origin("/a.bin", Some("app@127.0.0.1:9")), None);
        assert_eq!(
            origin("http://app@127.0.0.1:9/a.bin", Some("bits.example")),
            None
        );
        let config = crate::config::Config {
            public_origin: Some("https://public.example".into()),
            ..crate::config::Config::default()
        }
        .validate()
        .expect("config");
        assert_eq!(
            origin_of(&config, &parts("/a.bin", Some("app@127.0.0.1:9"))).as_deref(),
            Some("https://public.example")
        );
    }
}
