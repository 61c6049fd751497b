//! Deferred commits ([`CompletionPolicy::Defer`](crate::CompletionPolicy::Defer)): uploads the
//! client was told are done whose destination was busy, finished in the background.
//!
//! The state lives in the session record, so it survives a restart and is shared by every
//! node of a farm. The [`Sweeper`](crate::Sweeper) makes the attempts when they are due; this
//! handle lets the application look at them, wait for them and cancel them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::session::{
    CancelReason, DeferredStatus, EventKind, SessionId, SessionRecord, duration_ms, now_ms,
};
use crate::session_lock::LockError;
use crate::shared::Shared;
use crate::store::StoreError;

/// One deferred commit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeferredCompletion {
    /// Its id: the session's.
    pub id: SessionId,
    /// The destination under the upload root.
    pub destination: String,
    /// File size.
    pub size: u64,
    /// Where it stands.
    pub status: DeferredStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (meaningful while pending).
    pub next_attempt: SystemTime,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl DeferredCompletion {
    fn from_record(record: &SessionRecord) -> Option<Self> {
        let state = record.deferred.as_ref()?;
        Some(Self {
            id: record.id,
            destination: record.destination.clone(),
            size: record.total.unwrap_or(record.received),
            status: state.status,
            attempts: state.attempts,
            next_attempt: UNIX_EPOCH + Duration::from_millis(state.next_attempt_ms),
            last_error: state.last_error.clone(),
        })
    }
}

/// The deferred commits of one layer. Get it from
/// [`BitsLayer::deferred`](crate::BitsLayer::deferred).
#[derive(Clone)]
pub struct DeferredCompletions {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for DeferredCompletions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredCompletions")
            .finish_non_exhaustive()
    }
}

impl DeferredCompletions {
    /// Every deferred commit the store still knows, pending or finished (finished ones are
    /// forgotten with their session's tombstone).
    pub async fn list(&self) -> Result<Vec<DeferredCompletion>, StoreError> {
        let records = self.shared.store.list().await?;
        Ok(records
            .iter()
            .filter_map(DeferredCompletion::from_record)
            .collect())
    }

    /// One deferred commit, if `id` has one.
    pub async fn get(&self, id: SessionId) -> Result<Option<DeferredCompletion>, StoreError> {
        let record = self.shared.store.load(id).await?;
        Ok(record.as_ref().and_then(DeferredCompletion::from_record))
    }

    /// Waits until the deferred commit `id` is no longer pending and returns how it ended;
    /// `None` if there is no such deferred commit. Attempts are made by the
    /// [`Sweeper`](crate::Sweeper), which must be running.
    pub async fn wait(&self, id: SessionId) -> Result<Option<DeferredStatus>, StoreError> {
        let mut changes = self.shared.deferred_changed.subscribe();
        loop {
            match self.get(id).await? {
                None => return Ok(None),
                Some(d) if d.status != DeferredStatus::Pending => return Ok(Some(d.status)),
                Some(_) => {}
            }
            // Another node may finish it: look again now and then even without a signal.
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }

    /// Cancels a pending deferred commit and deletes its staged file. Returns whether there
    /// was one to cancel.
    pub async fn cancel(&self, id: SessionId) -> Result<bool, StoreError> {
        let shared = &self.shared;
        let session = shared.lock_session(id).await.map_err(|error| match error {
            // Another node is working on the session: let the caller try again.
            LockError::Busy => StoreError::Conflict,
            LockError::Store(error) => error,
        })?;
        let Some(mut session) = session else {
            return Ok(false);
        };
        if !session.record.is_deferred() {
            return Ok(false);
        }
        session
            .amend(|r| {
                if let Some(state) = r.deferred.as_mut() {
                    state.status = DeferredStatus::Cancelled;
                }
                let reason = CancelReason::DeferredCancelled;
                shared.queue(r, EventKind::Cancelled { reason });
            })
            .await?;
        if session.record.is_open() {
            // The client has not closed yet: Close-Session will clean up; nothing to commit.
        } else if let Err(error) = shared.staging.discard(id).await {
            tracing::warn!(session = %id, %error, "cannot delete the staged file of a cancelled deferred commit; it goes at expiry");
        }
        session.deliver().await;
        shared.deferred_touched();
        tracing::info!(session = %id, "deferred commit cancelled");
        Ok(true)
    }

    /// Makes every attempt that is due now. Returns when the next one is due, if any is
    /// pending. [`Sweeper::run`](crate::Sweeper::run) calls this; call it yourself only if
    /// you drive sweeps on your own schedule.
    pub async fn run_due(&self) -> Result<Option<SystemTime>, StoreError> {
        let mut next_due: Option<u64> = None;
        for candidate in self.shared.store.list().await? {
            if !candidate.is_deferred() {
                continue;
            }
            if let Some(due) = attempt(&self.shared, candidate.id).await? {
                next_due = Some(next_due.map_or(due, |n| n.min(due)));
            }
        }
        Ok(next_due.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)))
    }
}

/// Attempts the deferred commit of `id` if it is due. Returns when its next attempt is due if
/// it is still pending.
async fn attempt(shared: &Shared, id: SessionId) -> Result<Option<u64>, StoreError> {
    let Some(locked) = shared.locks.try_lock(id).await? else {
        // A packet for the session is running; come back soon.
        return Ok(Some(now_ms() + 1_000));
    };
    let Some(mut session) = shared.locked(locked).await else {
        return Ok(None);
    };
    let Some(state) = session.record.deferred.clone() else {
        return Ok(None);
    };
    if state.status != DeferredStatus::Pending {
        return Ok(None);
    }
    if state.next_attempt_ms > now_ms() {
        return Ok(Some(state.next_attempt_ms));
    }
    let backoff = match shared.config.completion_policy {
        crate::CompletionPolicy::Defer(backoff) => backoff,
        _ => crate::completion::Backoff::default(),
    };
    let result = session.commit().await;
    let attempts = state.attempts.saturating_add(1);
    let give_up = result.is_err() && attempts >= backoff.attempts;
    let due = now_ms().saturating_add(duration_ms(backoff.delay(attempts)));
    match &result {
        Ok(()) => tracing::info!(session = %id, attempts, "deferred commit done"),
        Err(error) if give_up => {
            tracing::error!(session = %id, attempts, %error, "deferred commit failed for good; the staged file stays until the session expires")
        }
        Err(error) => tracing::info!(session = %id, attempts, %error, "deferred commit still busy"),
    }
    session
        .amend(|r| {
            if let Some(d) = r.deferred.as_mut() {
                d.attempts = attempts;
                d.next_attempt_ms = due;
                d.last_error = result.as_ref().err().map(ToString::to_string);
                d.status = match (&result, give_up) {
                    (Ok(()), _) => DeferredStatus::Completed,
                    (Err(_), true) => DeferredStatus::Failed,
                    (Err(_), false) => DeferredStatus::Pending,
                };
            }
            if give_up {
                let reason = CancelReason::DeferredFailed;
                shared.queue(r, EventKind::Cancelled { reason });
            }
        })
        .await?;
    if result.is_ok() && !session.record.is_open() {
        // Closed meanwhile: nobody else will delete what is left of the part.
        if let Err(error) = shared.staging.discard(id).await {
            tracing::warn!(session = %id, %error, "cannot delete staged data after a deferred commit");
        }
    }
    session.deliver().await;
    shared.deferred_touched();
    Ok((result.is_err() && !give_up).then_some(due))
}
