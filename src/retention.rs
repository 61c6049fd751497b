//! How long sessions and what they leave behind are kept: expiry of idle sessions (by the
//! sweeper, and by the next packet that finds one, whatever the sweep interval), and the
//! limits on tombstones, so that a client ending sessions as fast as it creates them leaves
//! a bounded amount behind on every store.

use std::collections::HashMap;

use crate::admin::EndReason;
use crate::session::machine::is_expired;
use crate::session::{Event, EventKind, Owner, SessionRecord, duration_ms, now_ms};
use crate::shared::{self, Shared};
use crate::store::StoreError;

/// The tombstone limits are enforced once every this many sessions ended by this process (and
/// by every sweep), so between two passes at most this many more tombstones exist per node.
/// Whether `record` is past its keeping time: an open session idle for the session timeout, or
/// a tombstone idle for the tombstone retention. A deferred commit still running is never due.
pub(crate) fn is_due(shared: &Shared, record: &SessionRecord, now: u64) -> bool {
    if record.is_deferred() {
        return false;
    }
    is_expired(record, now, duration_ms(keep_time(shared, record)))
}

/// How long `record` is kept after its last packet: the session timeout while it is open,
/// the tombstone retention once it ended.
pub(crate) fn keep_time(shared: &Shared, record: &SessionRecord) -> std::time::Duration {
    if record.is_open() {
        shared.config.session_timeout
    } else {
        tombstone_retention(shared)
    }
}

/// The tombstone retention, never longer than the session timeout.
fn tombstone_retention(shared: &Shared) -> std::time::Duration {
    let config = &shared.config;
    config.tombstone_retention.min(config.session_timeout)
}

/// The oldest `updated_ms` a record may have and still be kept, for the shorter of the two
/// keeping times (the tombstone retention, which is never longer than the session timeout):
/// what the sweeper lists.
pub(crate) fn sweep_cutoff(shared: &Shared, now: u64) -> u64 {
    now.saturating_sub(duration_ms(tombstone_retention(shared)))
}

/// What forgetting a due record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forgotten {
    /// An open session expired: its data and record are gone.
    Expired,
    /// A tombstone was forgotten.
    Tombstone,
    /// Kept for now (its data could not be deleted, or its expiry event not delivered).
    Kept,
}

/// Deletes a due record's data (staged part, reply) and then the record. The caller holds the
/// session's lock and has checked [`is_due`] on a freshly loaded record.
pub(crate) async fn forget(
    shared: &Shared,
    record: &SessionRecord,
) -> Result<Forgotten, StoreError> {
    if let Err(error) = shared::release(shared, record).await {
        tracing::warn!(session = %record.id, %error, "cannot delete the data of an expired session");
        return Ok(Forgotten::Kept);
    }
    if record.is_open() && !expired_event_delivered(shared, record).await {
        // Kept (its data is gone) so the event is offered again at the next sweep.
        return Ok(Forgotten::Kept);
    }
    shared.store.remove(record.id).await?;
    if record.is_open() {
        tracing::info!(session = %record.id, destination = %record.destination, "session expired");
        shared.note_ended(record, EndReason::Expired);
        Ok(Forgotten::Expired)
    } else {
        Ok(Forgotten::Tombstone)
    }
}

/// Offers the expiry event of `record` to the hooks. True if delivered (or nobody listens).
async fn expired_event_delivered(shared: &Shared, record: &SessionRecord) -> bool {
    let Some(hooks) = &shared.hooks else {
        return true;
    };
    let event = Event::new(record, EventKind::Expired, now_ms());
    match hooks.on_event(&event).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(key = %event.key, %error, "expiry event delivery failed; will retry");
            false
        }
    }
}

/// Counts the sessions this process ended, to know when to enforce the tombstone limits.
/// Notes that a session ended (became a tombstone), and every so many ends keeps the
/// tombstones within their limits. Failures are logged: they never fail the packet that
/// ended the session.
pub(crate) async fn session_ended(shared: &Shared, record: &SessionRecord, reason: EndReason) {
    shared.note_ended(record, reason);
    if !shared.tombstones.count_end() {
        return;
    }
    if let Err(error) = trim(shared).await {
        tracing::warn!(%error, "cannot trim the tombstones of ended sessions");
    }
}

/// Forgets the tombstones beyond the limits: past their retention, beyond
/// `max_tombstones_per_owner` for their owner (or peer), and beyond `max_tombstones` in
/// all, oldest first. Returns how many it forgot. One pass at a time per process.
pub(crate) async fn trim(shared: &Shared) -> Result<usize, StoreError> {
    let Some(_one_pass) = shared.tombstones.try_start() else {
        return Ok(0);
    };
    let config = &shared.config;
    let now = now_ms();
    let mut ended = shared.store.list_ended().await?;
    ended.retain(SessionRecord::is_tombstone);
    // Newest first: the ones kept are the most recent of each owner and of all.
    ended.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then(a.id.cmp(&b.id)));
    let mut per_owner: HashMap<Option<Owner>, usize> = HashMap::new();
    let mut kept = 0usize;
    let mut forgotten = 0usize;
    for record in ended {
        let mine = per_owner.entry(record.counted_as()).or_default();
        let keep = *mine < config.max_tombstones_per_owner
            && kept < config.max_tombstones
            && !is_due(shared, &record, now);
        if keep {
            *mine += 1;
            kept += 1;
            continue;
        }
        if forget_tombstone(shared, &record).await? {
            forgotten += 1;
        }
    }
    if forgotten > 0 {
        tracing::debug!(forgotten, kept, "tombstones trimmed");
    }
    Ok(forgotten)
}

/// Removes one tombstone if it still is one once locked. Its data went when it ended.
async fn forget_tombstone(shared: &Shared, candidate: &SessionRecord) -> Result<bool, StoreError> {
    let Some(session) = shared.try_lock_session(candidate.id).await? else {
        return Ok(false);
    };
    let record = &session.record;
    if !record.is_tombstone() || record.revision != candidate.revision {
        return Ok(false);
    }
    if !record.outbox.is_empty() {
        tracing::warn!(session = %record.id, events = record.outbox.len(), "tombstone forgotten with undelivered events");
    }
    shared.store.remove(record.id).await
}
