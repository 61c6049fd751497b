//! The state every clone of the layer and its services share, and the one way to work on a
//! session outside its own packet's first steps: take its lock, load its record, change it by
//! compare-and-set, deliver its events, let it go ([`LockedSession`]).
//!
//! The handler, the sweeper, deferred commits, recovery and the [`BitsHandle`](crate::BitsHandle)
//! all work on sessions through this module; none of the others imports the handler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::admin::{EndReason, EndedSession, Recent};
use crate::completion::DynCompletion;
use crate::config::ValidConfig;
use crate::destination::{Destination, DestinationError};
use crate::hooks::DynHooks;
use crate::lifecycle::Lifecycle;
use crate::protocol::Ack;
use crate::replies::Replies;
use crate::session::{Event, EventKind, Owner, SessionId, SessionRecord, enqueue, now_ms};
use crate::session_lock::{LockError, SessionGuard, SessionLocks};
use crate::staging::{DynStaging, LastWrite, StagingError};
use crate::store::{DynStore, FileStore, StoreError};

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
    pub(crate) tombstones: TrimSchedule,
    /// Whether a [`Sweeper::run`](crate::Sweeper::run) has started, and whether its absence
    /// was already logged.
    pub(crate) sweeper_started: AtomicBool,
    pub(crate) sweeper_missing_logged: AtomicBool,
    /// The sessions this node ended lately, for the status page.
    pub(crate) recent: Recent,
}

/// Upload-reply mode: the completion handler and the storage of its replies.
pub(crate) struct ReplyMode {
    pub(crate) handler: Box<dyn DynCompletion>,
    /// `handler` or `notification`, for the metrics.
    pub(crate) kind: &'static str,
    pub(crate) replies: Replies,
}

impl Shared {
    /// Moves a reply just stored in the local reply folder to the staging, when the staging
    /// keeps replies (so that any node serves it).
    pub(crate) async fn publish_reply(
        &self,
        replies: &Replies,
        id: SessionId,
        len: u64,
    ) -> Result<(), StagingError> {
        if !self.staging.keeps_replies() {
            return Ok(());
        }
        let file = replies.open_at(id, 0).await?;
        self.staging.put_reply(id, Box::pin(file), len).await?;
        replies.remove_reply(id).await?;
        Ok(())
    }

    /// Deletes a session's reply (an earlier attempt's answer), wherever it is kept, but not
    /// the local copy of its upload.
    pub(crate) async fn remove_reply(
        &self,
        replies: &Replies,
        id: SessionId,
    ) -> Result<(), StagingError> {
        replies.remove_reply(id).await?;
        self.remove_staged_reply(id).await
    }

    /// Deletes a session's reply wherever it is kept, and the local copy of its upload.
    pub(crate) async fn remove_replies(
        &self,
        replies: &Replies,
        id: SessionId,
    ) -> Result<(), StagingError> {
        replies.remove(id).await?;
        self.remove_staged_reply(id).await
    }

    /// Deletes the reply the staging keeps, if it keeps replies.
    async fn remove_staged_reply(&self, id: SessionId) -> Result<(), StagingError> {
        if self.staging.keeps_replies() {
            self.staging.remove_reply(id).await?;
        }
        Ok(())
    }

    /// Creates the staged part of a new (or restarted) session: for its destination when its
    /// bytes will be committed there (every session but upload-reply ones), so that a staging
    /// that writes in place can.
    pub(crate) async fn create_part(&self, record: &SessionRecord) -> Result<(), StagingError> {
        if record.claims_destination {
            if let Ok(destination) =
                Destination::from_stored(&record.destination, &self.config.reserved)
            {
                return self.staging.create_for(record.id, &destination).await;
            }
        }
        self.staging.create(record.id).await
    }

    /// Notes that this node ended a session: the metrics, and the status page's recent list.
    pub(crate) fn note_ended(&self, record: &SessionRecord, reason: EndReason) {
        crate::metrics::session_ended(reason);
        self.recent.push(EndedSession::of(record, reason, now_ms()));
    }

    /// Whether a record's Create-Session was under this layer's prefix.
    pub(crate) fn is_under_prefix(&self, record: &SessionRecord) -> bool {
        crate::handle::under_prefix(&record.request_url, &self.config.prefix)
    }

    /// Adds an event to the record's outbox, if anyone listens.
    pub(crate) fn queue(&self, record: &mut SessionRecord, kind: EventKind) {
        if self.hooks.is_some() {
            let event = Event::new(record, kind, now_ms());
            enqueue(record, event);
        }
    }

    /// Lets the sweeper and waiters know that a deferred commit changed.
    pub(crate) fn deferred_touched(&self) {
        self.deferred_changed
            .send_modify(|n| *n = n.wrapping_add(1));
        self.wakeup.notify_one();
    }

    /// Logs once, loudly, that sessions are being created while no sweeper runs: without it
    /// nothing expires, start-up recovery did not run, events are not redelivered and deferred
    /// commits are never retried.
    pub(crate) fn warn_if_no_sweeper(&self) {
        if self.sweeper_started.load(Ordering::Relaxed)
            || self.sweeper_missing_logged.swap(true, Ordering::Relaxed)
        {
            return;
        }
        tracing::warn!(
            "sessions are being created but no Sweeper runs: spawn BitsLayer::sweeper().run(), \
             or idle sessions never expire, start-up recovery does not run, hook events are not \
             redelivered and deferred commits are not retried"
        );
    }

    /// Locks session `id`, waiting for the lock, and loads its record. `None`: no such session.
    pub(crate) async fn lock_session(
        &self,
        id: SessionId,
    ) -> Result<Option<LockedSession<'_>>, LockError> {
        let locked = self.locks.lock(id).await?;
        Ok(self.locked(locked).await)
    }

    /// [`lock_session`](Self::lock_session) for background work: a session another node keeps
    /// busy for the whole wait is skipped (`None`), as is one that is gone.
    pub(crate) async fn lock_session_or_skip(
        &self,
        id: SessionId,
    ) -> Result<Option<LockedSession<'_>>, StoreError> {
        match self.locks.lock_or_skip(id).await? {
            Some(locked) => Ok(self.locked(locked).await),
            None => Ok(None),
        }
    }

    /// [`lock_session`](Self::lock_session) without waiting: a session with a packet in flight
    /// is skipped (`None`), as is one that is gone.
    pub(crate) async fn try_lock_session(
        &self,
        id: SessionId,
    ) -> Result<Option<LockedSession<'_>>, StoreError> {
        match self.locks.try_lock(id).await? {
            Some(locked) => Ok(self.locked(locked).await),
            None => Ok(None),
        }
    }

    /// The session a lock and its record make; a session that is gone releases the lock.
    pub(crate) async fn locked(
        &self,
        (guard, record): (SessionGuard, Option<SessionRecord>),
    ) -> Option<LockedSession<'_>> {
        match record {
            Some(record) => Some(LockedSession {
                shared: self,
                guard,
                record,
            }),
            None => {
                guard.release().await;
                None
            }
        }
    }
}

/// A session whose lock is held, with its record as last stored. Every change goes through
/// the store by compare-and-set; [`unlock`](Self::unlock) lets it go (dropping it does too,
/// in the background).
pub(crate) struct LockedSession<'a> {
    shared: &'a Shared,
    guard: SessionGuard,
    /// The record as last stored.
    pub(crate) record: SessionRecord,
}

impl<'a> LockedSession<'a> {
    /// The layer's state, for closures that must not borrow the session.
    pub(crate) fn shared(&self) -> &'a Shared {
        self.shared
    }

    /// Lets the session go.
    pub(crate) async fn unlock(self) {
        self.guard.release().await;
    }

    /// Applies `change` to a copy of the record, stores it by compare-and-set, and adopts it.
    /// Not a packet: the session timer is left alone.
    pub(crate) async fn amend(
        &mut self,
        change: impl FnOnce(&mut SessionRecord),
    ) -> Result<(), StoreError> {
        let next = self.next(change);
        self.shared
            .store
            .update(self.record.revision, &next)
            .await?;
        self.record = next;
        Ok(())
    }

    /// [`save`](Self::save) as the packet's last change of the session: on a shared store the
    /// lease is released in the same store call. The caller then only answers the client and
    /// [unlocks](Self::unlock); nothing else may touch the session's data or record.
    pub(crate) async fn save_last(
        &mut self,
        change: impl FnOnce(&mut SessionRecord),
    ) -> Result<(), StoreError> {
        let next = self.next(|r| {
            change(r);
            r.updated_ms = now_ms();
        });
        self.guard
            .update_and_release(self.shared.store.as_ref(), self.record.revision, &next)
            .await?;
        self.record = next;
        Ok(())
    }

    /// The store, if it is a [`FileStore`] (which holds no leases): then
    /// [`save_after`](Self::save_after) writes a part's last bytes and the record in one
    /// blocking call.
    pub(crate) fn file_store(&self) -> Option<&'a FileStore> {
        self.shared.store.as_file_store()
    }

    /// [`save`](Self::save) on `files`, this session's store, with a part's last write run
    /// first in the same blocking call ([`FileStore::update_after`]): the record is written
    /// only once the bytes are in the part. A failed last write is the outer error.
    pub(crate) async fn save_after(
        &mut self,
        files: &FileStore,
        last: LastWrite,
        change: impl FnOnce(&mut SessionRecord),
    ) -> Result<Result<(), StoreError>, StagingError> {
        let next = self.next(|r| {
            change(r);
            r.updated_ms = now_ms();
        });
        let updated = files
            .update_after(self.record.revision, &next, last)
            .await?;
        if updated.is_ok() {
            self.record = next;
        }
        Ok(updated)
    }

    /// A copy of the record with `change` applied, the revision bumped and this node named.
    fn next(&self, change: impl FnOnce(&mut SessionRecord)) -> SessionRecord {
        let mut next = self.record.clone();
        change(&mut next);
        next.revision = self.record.revision + 1;
        if next.node != self.shared.config.host_id {
            next.node.clone_from(&self.shared.config.host_id);
        }
        next
    }

    /// [`amend`](Self::amend) for a successful packet: the session timer restarts.
    pub(crate) async fn save(
        &mut self,
        change: impl FnOnce(&mut SessionRecord),
    ) -> Result<(), StoreError> {
        self.amend(|r| {
            change(r);
            r.updated_ms = now_ms();
        })
        .await
    }

    /// Records a successful packet that changed nothing else, so the session timer restarts.
    pub(crate) async fn touch(&mut self) -> Result<(), StoreError> {
        self.save(|_| {}).await
    }

    /// Delivers the record's outbox and forgets what was delivered. Failures keep the event
    /// for the sweeper to deliver again; they never fail the caller.
    pub(crate) async fn deliver(&mut self) {
        let Some(hooks) = &self.shared.hooks else {
            return;
        };
        let mut delivered = Vec::new();
        for event in &self.record.outbox {
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
        if let Err(error) = self.amend(forget).await {
            tracing::warn!(%error, "cannot record event delivery; events will repeat");
        }
    }

    /// Moves a complete session's file to its destination and records that it did.
    pub(crate) async fn commit(&mut self) -> Result<(), CommitError> {
        let shared = self.shared;
        let config = &shared.config;
        let record = &self.record;
        let destination = Destination::from_stored(&record.destination, &config.reserved)?;
        let total = record.total.unwrap_or(record.received);
        let started = std::time::Instant::now();
        let committed = shared
            .staging
            .commit(record.id, &destination, total, config.allow_overwrites)
            .await;
        crate::metrics::commit(&committed, started.elapsed());
        match committed {
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
        self.save(|r| {
            r.committed = true;
            let kind = EventKind::Completed {
                size: total,
                committed: true,
            };
            shared.queue(r, kind);
        })
        .await?;
        tracing::info!(%destination, bytes = total, "upload committed");
        Ok(())
    }

    /// Deletes what a finished (or expired) session leaves behind: its reply, and its staged
    /// data unless a deferred commit still needs it.
    pub(crate) async fn release(&self) -> Result<(), StagingError> {
        release(self.shared, &self.record).await
    }
}

/// [`LockedSession::release`] for a record whose deferred state the caller overrides.
pub(crate) async fn release(shared: &Shared, record: &SessionRecord) -> Result<(), StagingError> {
    if !record.is_deferred() {
        shared.staging.discard(record.id).await?;
    }
    if let Some(mode) = &shared.reply {
        shared.remove_replies(&mode.replies, record.id).await?;
    }
    Ok(())
}

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The stored destination no longer passes the path rules.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// The staging could not move the file.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// The commit could not be recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CommitError {
    /// The staging's error if the destination is busy (it appeared meanwhile, or is locked),
    /// for the completion policy to decide; else the error itself.
    pub(crate) fn into_busy(self) -> Result<StagingError, Self> {
        match self {
            Self::Staging(error) if error.is_busy() => Ok(error),
            other => Err(other),
        }
    }

    /// The error Ack for the client.
    pub(crate) fn ack(&self) -> Ack {
        match self {
            Self::Destination(e) => e.ack(),
            Self::Staging(e) => e.ack(),
            Self::Store(e) => e.ack(),
        }
    }

    /// Whether the server, not the client, is at fault.
    pub(crate) fn is_server_fault(&self) -> bool {
        match self {
            Self::Destination(_) => false,
            Self::Staging(e) => e.is_server_fault(),
            Self::Store(e) => e.is_server_fault(),
        }
    }
}

/// When to trim the tombstones of ended sessions: after every [`TRIM_EVERY`] ends, one trim
/// at a time ([`retention`](crate::retention) does the trimming).
#[derive(Debug, Default)]
pub(crate) struct TrimSchedule {
    ended: AtomicUsize,
    trimming: tokio::sync::Mutex<()>,
}

/// Sessions ended between two trims.
const TRIM_EVERY: usize = 64;

impl TrimSchedule {
    /// Counts an ended session; `true` when a trim is due.
    pub(crate) fn count_end(&self) -> bool {
        if self.ended.fetch_add(1, Ordering::Relaxed) + 1 < TRIM_EVERY {
            return false;
        }
        self.ended.store(0, Ordering::Relaxed);
        true
    }

    /// The right to trim, unless a trim is running.
    pub(crate) fn try_start(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.trimming.try_lock().ok()
    }
}

/// Session creates admitted but not yet in the store, by owner.
#[derive(Debug, Default)]
pub(crate) struct PendingCreates {
    inner: Mutex<(usize, HashMap<Owner, usize>)>,
}

impl PendingCreates {
    fn lock(&self) -> MutexGuard<'_, (usize, HashMap<Owner, usize>)> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pending creates in all, and of `owner`.
    pub(crate) fn counts(&self, owner: Option<&Owner>) -> (usize, usize) {
        let pending = self.lock();
        let mine = owner.and_then(|o| pending.1.get(o)).copied().unwrap_or(0);
        (pending.0, mine)
    }

    /// Counts one more until the returned guard is dropped.
    pub(crate) fn reserve(&self, owner: Option<Owner>) -> Reservation<'_> {
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
pub(crate) struct Reservation<'a> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_creates_count_per_owner_until_released() {
        let pending = PendingCreates::default();
        let alice = Owner::new("alice");
        let a = pending.reserve(Some(alice.clone()));
        let anonymous = pending.reserve(None);
        assert_eq!(pending.counts(Some(&alice)), (2, 1));
        assert_eq!(pending.counts(None), (2, 0));
        drop(a);
        assert_eq!(pending.counts(Some(&alice)), (1, 0));
        drop(anonymous);
        assert_eq!(pending.counts(None), (0, 0));
        assert!(pending.lock().1.is_empty(), "released owners are forgotten");
    }

    #[test]
    fn a_trim_is_due_every_so_many_ends_and_runs_once_at_a_time() {
        let schedule = TrimSchedule::default();
        let due = (0..TRIM_EVERY * 2).filter(|_| schedule.count_end()).count();
        assert_eq!(due, 2);
        let running = schedule.try_start().expect("no trim runs");
        assert!(schedule.try_start().is_none());
        drop(running);
        assert!(schedule.try_start().is_some());
    }
}
