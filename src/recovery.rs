//! Start-up recovery: reconciles staged parts, replies and session records after a crash.
//!
//! A crash can leave three kinds of disagreement, because no step touches both the store and
//! the staging atomically: a part without a record (a session removed between deleting its
//! data and its record, or a create interrupted), a record without its part or with a shorter
//! one (a part lost, or a power loss without `sync_data`), and a commit that moved the file but
//! was not recorded. Recovery removes what nobody owns and repairs the rest, so that no record
//! ever claims bytes its part does not hold.

use std::collections::HashMap;

use crate::session::machine::needs_commit;
use crate::session::{DeferredStatus, EventKind, Phase, SessionId, SessionRecord};
use crate::shared::{LockedSession, Shared};
use crate::staging::StagingError;
use crate::store::StoreError;

/// What a recovery scan did. Every field counts sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Sessions on record.
    pub sessions: usize,
    /// Staged parts without an open session (no record, or a finished one), deleted.
    pub orphan_parts: usize,
    /// Replies without an open session, deleted.
    pub orphan_replies: usize,
    /// Open sessions whose part had vanished: an empty one was created and the session
    /// resumes from byte 0.
    pub parts_recreated: usize,
    /// Sessions whose record claimed more bytes than their part holds: rewound to the data.
    pub offsets_rewound: usize,
    /// Commits that had moved the file but were not recorded (a crash in between): recorded.
    pub commits_completed: usize,
}

impl RecoveryReport {
    /// Whether the scan changed anything.
    pub fn repaired_anything(&self) -> bool {
        *self
            != Self {
                sessions: self.sessions,
                ..Self::default()
            }
    }
}

/// Why recovery stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// The store failed.
    #[error("recovery: the session store failed")]
    Store(#[from] StoreError),
    /// The staging failed.
    #[error("recovery: the staging failed")]
    Staging(#[from] StagingError),
}

pub(crate) async fn recover(shared: &Shared) -> Result<RecoveryReport, RecoveryError> {
    let mut report = RecoveryReport::default();
    // Parts before records: a part is created after its record and deleted before it, so a
    // part listed here whose record is missing below is an orphan (or already gone).
    let parts = shared.staging.list().await?;
    let replies = match &shared.reply {
        Some(mode) => {
            let mut ids = mode.replies.list().await.map_err(StagingError::Io)?;
            if shared.staging.keeps_replies() {
                ids.extend(shared.staging.list_replies().await?);
                ids.sort();
                ids.dedup();
            }
            ids
        }
        None => Vec::new(),
    };
    let records: HashMap<SessionId, SessionRecord> = shared
        .store
        .list()
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    report.sessions = records.len();

    for id in parts {
        let Some(locked) = shared.locks.lock_or_skip(id).await? else {
            continue;
        };
        let keep = match shared.locked(locked).await {
            Some(session) => session.record.is_open() || session.record.is_deferred(),
            None => false,
        };
        if !keep {
            shared.staging.discard(id).await?;
            report.orphan_parts += 1;
        }
    }
    if let Some(mode) = &shared.reply {
        report.orphan_replies += remove_orphan_replies(shared, &mode.replies, replies).await?;
    }
    for id in records.into_keys() {
        let Some(mut session) = shared.lock_session_or_skip(id).await? else {
            continue;
        };
        repair(&mut session, &mut report).await?;
    }
    tracing::info!(
        sessions = report.sessions,
        orphan_parts = report.orphan_parts,
        orphan_replies = report.orphan_replies,
        parts_recreated = report.parts_recreated,
        offsets_rewound = report.offsets_rewound,
        commits_completed = report.commits_completed,
        "recovery scan done"
    );
    Ok(report)
}

/// Brings one session's record and part into agreement. Runs under the session's lock.
async fn repair(
    session: &mut LockedSession<'_>,
    report: &mut RecoveryReport,
) -> Result<(), RecoveryError> {
    let shared = session.shared();
    let record = &session.record;
    let reply_mode = shared.reply.is_some();
    let commit_pending = needs_commit(record, reply_mode) || record.is_deferred();
    // Which bytes the session still needs from its part.
    let needed = match record.phase {
        Phase::Receiving => record.received,
        Phase::Complete if commit_pending || (reply_mode && record.outcome.is_none()) => {
            record.total.unwrap_or(record.received)
        }
        _ => return Ok(()),
    };
    let held = shared.staging.len(record.id).await?;
    // A finished commit leaves no part (a rename) or a part that is the destination itself
    // (a link not yet unlinked).
    if commit_pending && record.phase == Phase::Complete && committed(shared, record).await? {
        let deferred = record.is_deferred();
        let total = record.total.unwrap_or(record.received);
        session
            .amend(|r| {
                r.committed = true;
                if let Some(state) = r.deferred.as_mut() {
                    state.status = DeferredStatus::Completed;
                }
                let kind = EventKind::Completed {
                    size: total,
                    committed: true,
                };
                shared.queue(r, kind);
            })
            .await?;
        if deferred {
            shared.deferred_touched();
        }
        let record = &session.record;
        tracing::info!(session = %record.id, destination = %record.destination, "an interrupted commit had finished; recorded");
        report.commits_completed += 1;
        return Ok(());
    }
    match held {
        Some(len) if len >= needed => {}
        Some(len) => {
            tracing::warn!(session = %record.id, recorded = needed, held = len, "staged data is shorter than the record; rewound");
            session.amend(|r| r.rewind(len)).await?;
            report.offsets_rewound += 1;
        }
        None => {
            tracing::warn!(session = %record.id, recorded = needed, "staged data is missing; the session restarts from byte 0");
            shared.create_part(record).await?;
            session.amend(|r| r.rewind(0)).await?;
            report.parts_recreated += 1;
        }
    }
    Ok(())
}

/// Deletes the replies, and the local copies of uploads, of the sessions among `ids` that no
/// open session with a stored answer needs (a session being served is skipped: its packet
/// holds the lock). Returns how many sessions it cleaned up after. Run at start-up and by
/// every sweep, for the local copies a farm's other nodes cannot delete.
pub(crate) async fn remove_orphan_replies(
    shared: &Shared,
    replies: &crate::replies::Replies,
    ids: Vec<SessionId>,
) -> Result<usize, RecoveryError> {
    let mut removed = 0;
    for id in ids {
        let Some(locked) = shared.locks.lock_or_skip(id).await? else {
            continue;
        };
        let keep = shared
            .locked(locked)
            .await
            .is_some_and(|s| s.record.is_open() && s.record.outcome.is_some());
        if !keep {
            shared.remove_replies(replies, id).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether the staging says the session's file already reached its destination.
async fn committed(shared: &Shared, record: &SessionRecord) -> Result<bool, RecoveryError> {
    let Ok(destination) =
        crate::destination::Destination::from_stored(&record.destination, &shared.config.reserved)
    else {
        return Ok(false);
    };
    let total = record.total.unwrap_or(record.received);
    Ok(shared
        .staging
        .committed(record.id, &destination, total)
        .await?)
}
