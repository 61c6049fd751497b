//! Runs one packet end to end: parse, decide, carry out the effects, build the Ack. The only
//! place that sequences a packet's store and staging I/O; one module per packet, and
//! [`failure`] for what stops one.

mod complete;
mod create;
mod end;
mod failure;
mod fragment;

use std::sync::Arc;
use std::time::Instant;

use http::{Request, request::Parts};
use http_body::Body;
use tracing::Instrument;

use crate::protocol::{Ack, Packet, PacketType, ProtocolError, SessionHeader, headers};
use crate::request_body::drain;
use crate::retention;
use crate::session::machine::Refusal;
use crate::session::{Owner, SessionId, now_ms};
use crate::shared::{LockedSession, Shared};

use failure::Failure;

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
    let started = Instant::now();
    let packet_type = parts
        .headers
        .get(headers::BITS_PACKET_TYPE)
        .and_then(|v| PacketType::parse(v.as_bytes()));
    let is_fragment = packet_type == Some(PacketType::Fragment);
    let span = packet_span(&parts, packet_type);
    let (_in_flight, state) = shared.lifecycle.enter();
    let mut body = Some(body);
    let ack = match state.refusal() {
        Some(ack) => ack,
        None => {
            dispatch(&shared, parts, &mut body)
                .instrument(span.clone())
                .await
        }
    };
    record_outcome(&span, &ack);
    crate::metrics::packet(packet_type, &ack, started.elapsed());
    if let Some(unread) = body.filter(|b| !expects_continue && !b.is_end_stream()) {
        linger(&shared, unread, is_fragment);
    }
    ack
}

/// The span of one packet: its type, and, as they become known, its session (the braced
/// upper-case form `BITS-Session-Id` uses), owner and destination; its outcome (HTTP status,
/// `BITS-Error-Code`, bytes written) is recorded when it ends.
fn packet_span(parts: &Parts, packet_type: Option<PacketType>) -> tracing::Span {
    let span = tracing::info_span!(
        "bits",
        packet = crate::metrics::packet_label(packet_type),
        session = tracing::field::Empty,
        owner = tracing::field::Empty,
        destination = tracing::field::Empty,
        status = tracing::field::Empty,
        hresult = tracing::field::Empty,
        bytes = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    if let Some(owner) = parts.extensions.get::<Owner>() {
        span.record("owner", tracing::field::display(owner));
    }
    let id = parts
        .headers
        .get(headers::BITS_SESSION_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(SessionId::parse);
    if let Some(id) = id {
        span.record("session", tracing::field::display(id));
    }
    span
}

/// Records a packet's outcome on its span.
fn record_outcome(span: &tracing::Span, ack: &Ack) {
    span.record("status", ack.status().as_u16());
    if let Some((code, _)) = ack.error_code() {
        span.record("hresult", tracing::field::display(code));
    }
    if ack.status().is_server_error() && ack.status() != http::StatusCode::SERVICE_UNAVAILABLE {
        span.record("otel.status_code", "ERROR");
    }
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
    let work = async move {
        match packet {
            Packet::Ping => Ack::ok(),
            Packet::CreateSession(create) => {
                create::create_session(shared, &parts, create, owner).await
            }
            Packet::Fragment(fragment) => {
                fragment::handle_fragment(shared, fragment, owner.as_ref(), body).await
            }
            Packet::CloseSession(id) => {
                let result = end::close_session(shared, &id, owner.as_ref()).await;
                finish(shared, result).session_id(id.value().clone())
            }
            Packet::CancelSession(id) => {
                let result = end::cancel_session(shared, &id, owner.as_ref()).await;
                finish(shared, result).session_id(id.value().clone())
            }
        }
    };
    work.await
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

/// The Ack for a packet's outcome; a failure is logged and answered with its own Ack.
fn finish(shared: &Shared, result: Result<Ack, Failure>) -> Ack {
    result.unwrap_or_else(|failure| {
        failure.log();
        failure.ack(&shared.config.completion_policy)
    })
}

/// Locks the session named by `header` and loads its record. Unknown ids, malformed ids and
/// sessions of another owner are all "not found".
async fn open_session<'a>(
    shared: &'a Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<LockedSession<'a>, Failure> {
    let id = header
        .as_str()
        .and_then(SessionId::parse)
        .ok_or(Refusal::NotFound)?;
    let Some(session) = shared.lock_session(id).await? else {
        return Err(Refusal::NotFound.into());
    };
    if !session.record.is_owned_by(owner) {
        session.unlock().await;
        return Err(Refusal::NotFound.into());
    }
    tracing::Span::current().record(
        "destination",
        tracing::field::display(&session.record.destination),
    );
    // Past its keeping time but not yet swept (the sweep interval can be long): it is
    // answered as gone, and its data is deleted now.
    if retention::is_due(shared, &session.record, now_ms()) {
        match retention::forget(shared, &session.record).await {
            Ok(forgotten) => tracing::debug!(?forgotten, "packet for an expired session"),
            Err(error) => tracing::warn!(%error, "cannot forget an expired session"),
        }
        session.unlock().await;
        return Err(Refusal::NotFound.into());
    }
    Ok(session)
}
