//! Fragment: writes the bytes the session does not hold yet into its part, advances the
//! record, and, at the last byte, takes the upload as far as the commit point allows.

use http_body::Body;

use super::{Failure, complete, finish, open_session};
use crate::BoxError;
use crate::protocol::{Ack, Fragment};
use crate::request_body::{BodyError, copy_fragment};
use crate::session::SessionRecord;
use crate::session::machine::{self, FragmentDecision, Limits, Refusal, Write};
use crate::session::{EventKind, Owner, Phase};
use crate::shared::{LockedSession, Shared};
use crate::staging::{LocalPart, StagingError};

pub(super) async fn handle_fragment<B>(
    shared: &Shared,
    fragment: Fragment,
    owner: Option<&Owner>,
    body: &mut Option<B>,
) -> Ack
where
    B: Body + Send,
    B::Error: Into<BoxError>,
{
    let mut received = None;
    let result = write_fragment(shared, &fragment, owner, body, &mut received).await;
    let ack = finish(shared, result).session_id(fragment.session_id.value().clone());
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
    B::Error: Into<BoxError>,
{
    let mut session = open_session(shared, &fragment.session_id, owner).await?;
    let result = fragment_locked(&mut session, fragment, body, received).await;
    session.unlock().await;
    result
}

/// [`write_fragment`] with the session locked.
async fn fragment_locked<B>(
    session: &mut LockedSession<'_>,
    fragment: &Fragment,
    body: &mut Option<B>,
    received: &mut Option<u64>,
) -> Result<Ack, Failure>
where
    B: Body + Send,
    B::Error: Into<BoxError>,
{
    let config = &session.shared().config;
    *received = Some(session.record.received);

    let limits = Limits {
        max_upload_size: config.max_upload_size,
        max_fragment_size: config.max_fragment_size,
    };
    match machine::fragment(&session.record, &fragment.range, &limits) {
        FragmentDecision::Refuse(refusal) => {
            if refusal == Refusal::NotFound {
                // A session that is gone has no offset to report.
                *received = None;
            }
            return Err(refusal.into());
        }
        // A re-sent fragment is a successful packet: it resets the session timer. Unless
        // the upload is complete (and its completion is retried below), that is the packet's
        // last change.
        FragmentDecision::Duplicate => {
            crate::metrics::fragment(fragment.range.len(), fragment.range.len());
            if session.record.phase == Phase::Complete {
                session.touch().await?;
            } else {
                session.save_last(|_| {}).await?;
            }
        }
        FragmentDecision::Write(write) => {
            crate::metrics::fragment(fragment.range.len(), write.skip);
            let Some(body) = body.take() else {
                return Err(BodyError::TooShort { missing: write.len }.into());
            };
            let stored = store_fragment(session, write, body, received).await;
            session.deliver().await;
            stored?;
        }
    }
    // Also reached by a re-sent final fragment after a completion that failed (the
    // application was down, the destination appeared meanwhile): it is retried rather than
    // the upload reported as done.
    let ack = if session.record.phase == Phase::Complete {
        let finished = complete::finish_upload(session).await;
        session.deliver().await;
        finished?
    } else {
        Ack::ok()
    };
    Ok(ack)
}

/// Streams the new bytes of a fragment into the part and advances the record.
async fn store_fragment<B>(
    session: &mut LockedSession<'_>,
    write: Write,
    body: B,
    received: &mut Option<u64>,
) -> Result<(), Failure>
where
    B: Body + Send,
    B::Error: Into<BoxError>,
{
    let shared = session.shared();
    let mut part = match shared.staging.open(session.record.id, write.offset).await {
        Err(StagingError::PartShort { held }) => {
            return rewind_to_part(session, held, received).await;
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
    tracing::Span::current().record("bytes", written);
    crate::metrics::bytes_received(written);
    if matches!(copied, Err(BodyError::Interrupted)) {
        shared.lifecycle.count_interrupted();
        tracing::info!(
            written,
            "fragment stopped by shutdown; what arrived is kept"
        );
    }
    if copied.is_ok() {
        // A whole fragment in a local part, on a file store: the part's last write and the
        // record's update go to the blocking pool together, one trip per fragment, not two.
        if let (Some(local), Some(files)) = (
            part.as_any_mut().downcast_mut::<LocalPart>(),
            session.file_store(),
        ) {
            let saved = match local.take_last_write().await {
                Ok(Some(last)) => {
                    tracing::trace!("last write and record update in one blocking call");
                    session
                        .save_after(files, last, advance(shared, &write))
                        .await
                }
                Ok(None) => Ok(session.save(advance(shared, &write)).await),
                Err(e) => Err(e),
            };
            return match saved {
                Err(StagingError::PartShort { held }) => {
                    rewind_to_part(session, held, received).await
                }
                Err(e) => Err(e.into()),
                Ok(saved) => {
                    saved?;
                    advanced(session, &write, received);
                    Ok(())
                }
            };
        }
    }
    let flushed = part.finish().await;
    if let (Err(BodyError::Staging(StagingError::PartShort { held })), _)
    | (_, Err(StagingError::PartShort { held })) = (&copied, &flushed)
    {
        return rewind_to_part(session, *held, received).await;
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
                session
                    .save(|r| r.advance(write.total, write.offset + written))
                    .await?;
                *received = Some(session.record.received);
            }
            return Err(error.into());
        }
    }
    // A fragment in the middle of an upload, with no events to deliver, changes nothing
    // after this: the lease goes with the record's update (one store call on a farm).
    if write.completes() || shared.hooks.is_some() {
        session.save(advance(shared, &write)).await?;
    } else {
        session.save_last(advance(shared, &write)).await?;
    }
    advanced(session, &write, received);
    Ok(())
}

/// The record's change for a fragment whose bytes are all in the part.
fn advance<'w>(shared: &'w Shared, write: &'w Write) -> impl FnOnce(&mut SessionRecord) + 'w {
    move |r| {
        r.advance(write.total, write.end());
        let (received, total) = (r.received, write.total);
        shared.queue(r, EventKind::Progress { received, total });
    }
}

/// After the record took a fragment: what the Ack reports, and the upload's end.
fn advanced(session: &LockedSession<'_>, write: &Write, received: &mut Option<u64>) {
    *received = Some(session.record.received);
    if write.completes() {
        crate::metrics::upload_finished(write.total);
        tracing::info!(bytes = write.total, "all bytes received");
    }
}

/// The part holds fewer bytes than the record says (a power loss without fsync, or a part
/// deleted behind the server's back): the part is the ground truth, so the session resumes
/// from what it holds, and the client is told where with a 416.
async fn rewind_to_part(
    session: &mut LockedSession<'_>,
    held: u64,
    received: &mut Option<u64>,
) -> Result<(), Failure> {
    tracing::warn!(
        recorded = session.record.received,
        held,
        "staged data is shorter than the record; resuming from the data"
    );
    session.save(|r| r.rewind(held)).await?;
    *received = Some(session.record.received);
    Err(Refusal::Gap.into())
}
