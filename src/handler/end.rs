//! Close-Session and Cancel-Session: the two packets that end a session. What is left is a
//! tombstone that answers a repeat of the packet (its Ack may have been lost).

use super::complete::commit_or_defer;
use super::{Failure, open_session};
use crate::admin::EndReason;
use crate::protocol::{Ack, SessionHeader};
use crate::retention;
use crate::session::machine::{self, CancelDecision, CloseDecision};
use crate::session::{CancelReason, EventKind, Owner, Phase};
use crate::shared::{LockedSession, Shared};

pub(super) async fn close_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<Ack, Failure> {
    let mut session = open_session(shared, header, owner).await?;
    let result = close_locked(&mut session).await;
    session.deliver().await;
    session.unlock().await;
    result
}

async fn close_locked(session: &mut LockedSession<'_>) -> Result<Ack, Failure> {
    let shared = session.shared();
    let mut incomplete = false;
    match machine::close(&session.record, shared.reply.is_some()) {
        CloseDecision::Discard => {
            shared.staging.discard(session.record.id).await?;
            incomplete = true;
            tracing::warn!(
                received = session.record.received,
                total = ?session.record.total,
                "closed before every byte arrived; staged data deleted, nothing committed"
            );
        }
        CloseDecision::Commit => {
            commit_or_defer(session).await?;
            session.release().await?;
        }
        CloseDecision::Release => session.release().await?,
        CloseDecision::Repeat => {
            session.touch().await?;
            return Ok(Ack::ok());
        }
        CloseDecision::Refuse(refusal) => return Err(refusal.into()),
    }
    session
        .save(|r| {
            r.phase = Phase::Closed;
            if incomplete {
                let reason = CancelReason::ClosedIncomplete;
                shared.queue(r, EventKind::Cancelled { reason });
            }
            r.end(Phase::Closed);
        })
        .await?;
    tracing::info!("session closed");
    let reason = if incomplete {
        EndReason::ClosedIncomplete
    } else {
        EndReason::Closed
    };
    retention::session_ended(shared, &session.record, reason).await;
    Ok(Ack::ok())
}

pub(super) async fn cancel_session(
    shared: &Shared,
    header: &SessionHeader,
    owner: Option<&Owner>,
) -> Result<Ack, Failure> {
    let mut session = open_session(shared, header, owner).await?;
    let result = cancel_locked(&mut session).await;
    session.unlock().await;
    result
}

async fn cancel_locked(session: &mut LockedSession<'_>) -> Result<Ack, Failure> {
    let shared = session.shared();
    match machine::cancel(&session.record) {
        CancelDecision::Repeat => {
            session.touch().await?;
            return Ok(Ack::ok());
        }
        CancelDecision::Discard => session.release().await?,
    }
    session
        .save(|r| {
            r.phase = Phase::Cancelled;
            let reason = CancelReason::CancelSession;
            shared.queue(r, EventKind::Cancelled { reason });
            r.end(Phase::Cancelled);
        })
        .await?;
    session.deliver().await;
    tracing::info!(committed = session.record.committed, "session cancelled");
    retention::session_ended(shared, &session.record, EndReason::Cancelled).await;
    Ok(Ack::ok())
}
