//! Runs one packet end to end: parse, decide, carry out the effects, build the Ack. The only
//! place that sequences store and staging I/O.

use std::sync::Arc;

use http::{HeaderValue, Request, StatusCode, request::Parts};
use http_body::Body;
use tracing::Instrument;

use crate::body::{BodyError, copy_fragment, drain};
use crate::config::{CommitPoint, ValidConfig};
use crate::destination::{self, Destination, DestinationError};
use crate::lock::{KeyedGuard, KeyedLock};
use crate::protocol::{
    Ack, CreateSession, ErrorContext, Fragment, Hresult, Packet, PacketType, SessionHeader, headers,
};
use crate::session::machine::{
    self, CancelDecision, CloseDecision, FragmentDecision, Limits, Refusal, Write,
};
use crate::session::{Owner, Phase, SessionId, SessionRecord, now_ms};
use crate::staging::{DynStaging, StagingError};
use crate::store::{DynStore, StoreError};

/// State shared by every clone of the layer and its services.
pub(crate) struct Shared {
    pub(crate) config: ValidConfig,
    pub(crate) store: Box<dyn DynStore>,
    pub(crate) staging: Box<dyn DynStaging>,
    /// One request at a time per session, even when a client retries on a new connection
    /// while its old request is still running.
    pub(crate) locks: KeyedLock<SessionId>,
    /// Makes "count open sessions, then create" atomic within this process.
    pub(crate) create_lock: tokio::sync::Mutex<()>,
}

/// Everything that can stop a packet, each mapped to its Ack by its own type.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("the server's session limit is reached")]
    TooManySessions,
}

impl Failure {
    fn ack(&self) -> Ack {
        match self {
            Self::Refused(r) => r.ack(),
            Self::Destination(e) => e.ack(),
            Self::Store(e) => e.ack(),
            Self::Staging(e) | Self::Body(BodyError::Staging(e)) => e.ack(),
            Self::Body(BodyError::Idle(_)) => Ack::error(
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
            Self::TooManySessions => Ack::error(
                StatusCode::SERVICE_UNAVAILABLE,
                Hresult::TOO_MANY_SESSIONS,
                ErrorContext::RemoteFile,
            ),
        }
    }

    fn log(&self) {
        let server_fault = match self {
            Self::Store(StoreError::Backend(_) | StoreError::Conflict) => true,
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
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    // A client that waits for "100 Continue" has sent no body yet; reading it would ask for
    // bytes the server is about to refuse.
    let expects_continue = parts
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = Some(body);
    let ack = dispatch(&shared, parts, &mut body).await;
    if let Some(unread) = body.filter(|_| !expects_continue) {
        let limit = DRAIN_LIMIT.max(shared.config.max_fragment_size);
        drain(unread, limit, shared.config.body_idle_timeout).await;
    }
    ack
}

/// Bodies of refused requests up to this size are read and dropped to keep the connection.
const DRAIN_LIMIT: u64 = 32 << 20;

/// Parses the packet and runs it. Takes the body out of `body` only if it reads it.
async fn dispatch<B>(shared: &Shared, parts: Parts, body: &mut Option<B>) -> Ack
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let packet = match Packet::parse(&parts) {
        Ok(packet) => packet,
        Err(error) => {
            tracing::debug!(%error, uri = %parts.uri, "malformed BITS packet");
            let echo = parts
                .headers
                .get(headers::BITS_SESSION_ID)
                .filter(|v| v.len() <= crate::protocol::MAX_HEADER_VALUE_LEN)
                .cloned();
            let mut ack = error.ack();
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
        span.record("session", id);
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
) -> Result<(KeyedGuard<SessionId>, SessionRecord), Failure> {
    let id = header
        .as_str()
        .and_then(SessionId::parse)
        .ok_or(Refusal::NotFound)?;
    let guard = shared.locks.lock(id).await;
    let record = shared
        .store
        .load(id)
        .await?
        .filter(|r| r.is_owned_by(owner))
        .ok_or(Refusal::NotFound)?;
    Ok((guard, record))
}

/// Applies `change` to a copy of `record`, stores it by compare-and-set, and adopts it.
async fn save(
    shared: &Shared,
    record: &mut SessionRecord,
    change: impl FnOnce(&mut SessionRecord),
) -> Result<(), StoreError> {
    let mut next = record.clone();
    change(&mut next);
    next.revision = record.revision + 1;
    next.updated_ms = now_ms();
    shared.store.update(record.revision, &next).await?;
    *record = next;
    Ok(())
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
    let result = async {
        let destination =
            destination::from_url_path(parts.uri.path(), &config.prefix, &config.reserved)?;
        shared
            .staging
            .check_destination(&destination, config.allow_overwrites)
            .await?;
        let id = SessionId::new();
        let request_url = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let mut record =
            SessionRecord::new(id, destination.to_string(), request_url, owner, now_ms());
        record.content_name = create.content_name;
        {
            let _serial = shared.create_lock.lock().await;
            if shared.store.count_open().await? >= config.max_sessions {
                return Err(Failure::TooManySessions);
            }
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
        tracing::info!(%destination, owner = ?record.owner, "session created");
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

/// How long a session that never received a byte must be idle before a new Create-Session
/// for the same destination (by the same owner) may replace it.
const ABANDONED_AFTER_MS: u64 = 30_000;

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
    let Some(_guard) = shared.locks.try_lock(holder) else {
        return Ok(false);
    };
    let Some(mut stale) = shared.store.load(holder).await? else {
        return Ok(false);
    };
    let abandoned = stale.phase == Phase::Receiving
        && stale.total.is_none()
        && stale.received == 0
        && stale.owner.as_ref() == owner
        && stale.is_idle_since(now_ms().saturating_sub(ABANDONED_AFTER_MS));
    if !abandoned {
        return Ok(false);
    }
    shared.staging.discard(holder).await?;
    save(shared, &mut stale, |r| r.phase = Phase::Cancelled).await?;
    tracing::info!(%holder, "replaced a session that never received a byte");
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
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = &shared.config;
    let (_guard, mut record) = open_session(shared, &fragment.session_id, owner).await?;
    let id = record.id;
    *received = Some(record.received);

    if record.phase == Phase::Receiving {
        // The part is the ground truth: a record may never claim bytes the part does not
        // hold (after a power loss without fsync, or a part deleted behind our back).
        let held = shared.staging.len(id).await?.unwrap_or(0);
        if held < record.received {
            tracing::warn!(
                recorded = record.received,
                held,
                "staged data is shorter than the record; resuming from the data"
            );
            save(shared, &mut record, |r| r.received = held).await?;
            *received = Some(record.received);
        }
    }

    let limits = Limits {
        max_upload_size: config.max_upload_size,
        max_fragment_size: config.max_fragment_size,
    };
    match machine::fragment(&record, &fragment.range, &limits) {
        FragmentDecision::Refuse(refusal) => {
            if refusal == Refusal::NotFound {
                // A session that is gone has no offset to report.
                *received = None;
            }
            return Err(refusal.into());
        }
        // A re-sent fragment is a successful packet: it resets the session timer.
        FragmentDecision::Duplicate => touch(shared, &mut record).await?,
        FragmentDecision::Write(write) => {
            let Some(body) = body.take() else {
                return Err(BodyError::TooShort { missing: write.len }.into());
            };
            store_fragment(shared, &mut record, write, body, received).await?;
        }
    }
    // Also reached by a re-sent final fragment after a commit that failed (say, the
    // destination appeared meanwhile): the commit is retried rather than the upload
    // reported as done.
    if record.phase == Phase::Complete
        && !record.committed
        && config.commit_point == CommitPoint::LastFragment
    {
        commit(shared, &mut record).await?;
    }
    Ok(Ack::ok())
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
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut part = shared.staging.open(record.id, write.offset).await?;
    let (written, copied) = copy_fragment(
        body,
        write.skip,
        write.len,
        part.as_mut(),
        shared.config.body_idle_timeout,
    )
    .await;
    let flushed = part.finish().await;
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
    save(shared, record, |r| r.advance(write.total, write.end())).await?;
    *received = Some(record.received);
    if write.completes() {
        tracing::info!(bytes = write.total, "all bytes received");
    }
    Ok(())
}

/// Moves a complete session's file to its destination and records that it did.
async fn commit(shared: &Shared, record: &mut SessionRecord) -> Result<(), Failure> {
    let config = &shared.config;
    let destination = Destination::from_stored(&record.destination, &config.reserved)?;
    let total = record.total.unwrap_or(record.received);
    shared
        .staging
        .commit(record.id, &destination, total, config.allow_overwrites)
        .await?;
    save(shared, record, |r| r.committed = true).await?;
    tracing::info!(%destination, bytes = total, "upload committed");
    Ok(())
}

async fn close_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<Ack, Failure> {
    let (_guard, mut record) = open_session(shared, header, owner).await?;
    match machine::close(&record) {
        CloseDecision::Discard => {
            shared.staging.discard(record.id).await?;
            tracing::warn!(
                received = record.received,
                total = ?record.total,
                "closed before every byte arrived; staged data deleted, nothing committed"
            );
        }
        CloseDecision::Commit => commit(shared, &mut record).await?,
        CloseDecision::Release => shared.staging.discard(record.id).await?,
        CloseDecision::Repeat => {
            touch(shared, &mut record).await?;
            return Ok(Ack::ok());
        }
        CloseDecision::Refuse(refusal) => return Err(refusal.into()),
    }
    save(shared, &mut record, |r| r.phase = Phase::Closed).await?;
    tracing::info!("session closed");
    Ok(Ack::ok())
}

async fn cancel_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<Ack, Failure> {
    let (_guard, mut record) = open_session(shared, header, owner).await?;
    match machine::cancel(&record) {
        CancelDecision::Repeat => {
            touch(shared, &mut record).await?;
            return Ok(Ack::ok());
        }
        CancelDecision::Discard => shared.staging.discard(record.id).await?,
    }
    save(shared, &mut record, |r| r.phase = Phase::Cancelled).await?;
    tracing::info!(committed = record.committed, "session cancelled");
    Ok(Ack::ok())
}
