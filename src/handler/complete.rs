//! Completing an upload: asking the application (upload-reply), and committing at the commit
//! point or deferring the commit when the destination is busy.

use http::HeaderValue;

use super::Failure;
use crate::completion::{CompletedUpload, CompletionPolicy, Reply};
use crate::config::CommitPoint;
use crate::protocol::Ack;
use crate::replies;
use crate::session::machine;
use crate::session::{
    DeferredState, DeferredStatus, EventKind, Outcome, SessionRecord, duration_ms, now_ms,
};
use crate::shared::{LockedSession, ReplyMode, Shared};
use crate::staging::StagingError;

/// Takes a complete session as far as the commit point allows: asks the application (once)
/// in upload-reply mode, and commits at the last fragment if that is the commit point. The Ack
/// carries the reply URL in upload-reply mode.
pub(super) async fn finish_upload(session: &mut LockedSession<'_>) -> Result<Ack, Failure> {
    let shared = session.shared();
    let reply_mode = shared.reply.is_some();
    if let (Some(mode), None) = (&shared.reply, &session.record.outcome) {
        let outcome = run_completion(shared, mode, &session.record).await?;
        let copy = outcome.copy_to_destination;
        if !copy && outcome.stored_reply.is_some_and(|reply| reply.len == 0) {
            // Neither a copy nor a reply: most likely a plain upload job sent to an upload-reply
            // mount, whose client reports success while its file is discarded.
            tracing::warn!(
                destination = %session.record.destination,
                "the upload-reply handler neither copied the upload to its destination nor \
                 replied: the file will be deleted with the session (to keep plain uploads, \
                 use on_upload_committed instead of an upload-reply handler)"
            );
        }
        session
            .save(|r| {
                r.outcome = Some(outcome);
                if !copy {
                    let size = r.received;
                    let kind = EventKind::Completed {
                        size,
                        committed: false,
                    };
                    shared.queue(r, kind);
                }
            })
            .await?;
        tracing::info!(copy, "application answered");
    }
    if machine::needs_commit(&session.record, reply_mode)
        && shared.config.commit_point == CommitPoint::LastFragment
    {
        commit_or_defer(session).await?;
    }
    let mut ack = Ack::ok();
    if let Some(outcome) = &session.record.outcome {
        let url = HeaderValue::from_str(&outcome.reply_url)
            .map_err(|_| Failure::invalid_answer("the reply URL is not a valid header value"))?;
        ack = ack.reply_url(url);
    }
    Ok(ack)
}

/// Hands a complete upload to the completion handler and stores its reply.
async fn run_completion(
    shared: &Shared,
    mode: &ReplyMode,
    record: &SessionRecord,
) -> Result<Outcome, Failure> {
    let ReplyMode {
        handler, replies, ..
    } = mode;
    // A staging without local files (object storage) gives the bytes, and the application
    // gets a local copy, deleted with the session (in a farm the session may end on another
    // node: this node's sweeper deletes it then).
    let staged_path = match shared.staging.path(record.id) {
        Some(path) => path,
        None => {
            let bytes = shared.staging.read(record.id, record.received).await?;
            replies
                .store_upload(record.id, bytes)
                .await
                .map_err(StagingError::Io)?
        }
    };
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
    shared.remove_reply(replies, record.id).await?;
    let started = std::time::Instant::now();
    let completion = handler.complete(upload).await;
    crate::metrics::completion(mode.kind, &completion, started.elapsed());
    let completion = completion.map_err(Failure::Application)?;
    let (reply_url, stored_reply) = match completion.reply {
        Reply::StaticUrl(url) => {
            if !crate::completion::is_absolute_http_url(&url) {
                return Err(Failure::invalid_answer(
                    "the static reply URL is not an absolute http(s) URL",
                ));
            }
            shared.remove_reply(replies, record.id).await?;
            (url, None)
        }
        reply => {
            let stored = replies
                .store(record.id, reply)
                .await
                .map_err(StagingError::Io)?;
            shared.publish_reply(replies, record.id, stored.len).await?;
            (reply_url_of(shared, record), Some(stored))
        }
    };
    if reply_url.len() > crate::completion::MAX_URL_LEN {
        return Err(Failure::invalid_answer(
            "the reply URL is longer than 2,200 characters",
        ));
    }
    if HeaderValue::from_str(&reply_url).is_err() {
        return Err(Failure::invalid_answer(
            "the reply URL is not a valid header value",
        ));
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
    let origin = match (
        &config.public_origin,
        &config.host_id_header,
        &record.origin,
    ) {
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
    replies::reply_url(&origin, &record.request_url, record.id)
}

/// Commits, applying the completion policy when the destination is busy.
pub(super) async fn commit_or_defer(session: &mut LockedSession<'_>) -> Result<(), Failure> {
    let error = match session.commit().await {
        Ok(()) => return Ok(()),
        Err(error) => error.into_busy()?,
    };
    let CompletionPolicy::Defer(backoff) = session.shared().config.completion_policy else {
        return Err(Failure::DestinationBusy(error));
    };
    let next = now_ms().saturating_add(duration_ms(backoff.delay(1)));
    let why = error.to_string();
    session
        .save(|r| {
            r.deferred = Some(DeferredState {
                status: DeferredStatus::Pending,
                attempts: 1,
                next_attempt_ms: next,
                last_error: Some(why),
            });
        })
        .await?;
    tracing::info!(%error, "destination busy; commit deferred");
    session.shared().deferred_touched();
    Ok(())
}
