//! Expiry of idle sessions, as a future the application spawns (the crate runs no background loop of its own).

use std::sync::Arc;

use crate::deferred::DeferredCompletions;
use crate::retention::{self, Forgotten};
use crate::session::now_ms;
use crate::shared::Shared;
use crate::store::StoreError;

/// Deletes sessions that have seen no successful packet for the session timeout
/// (`BITSSessionTimeout`): their staged data and their record; and tombstones of ended
/// sessions past their [retention](crate::BitsLayerBuilder::tombstone_retention) or beyond
/// their limits. A file already committed to its destination stays.
///
/// Get one from [`BitsLayer::sweeper`](crate::BitsLayer::sweeper) and spawn
/// [`Sweeper::run`], or call [`Sweeper::sweep`] on a schedule of your own.
#[derive(Clone)]
pub struct Sweeper {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("interval", &self.shared.config.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct SweepReport {
    /// Open sessions that expired (their staged data was deleted).
    pub expired: usize,
    /// Tombstones of closed or cancelled sessions that were forgotten (past their retention
    /// or beyond their limits).
    pub tombstones: usize,
    /// Replies and local copies of uploads (upload-reply on object staging) left on this
    /// node by sessions that ended, possibly on another node of a farm.
    pub replies: usize,
}

impl Sweeper {
    /// Sweeps once: expires open sessions idle for the session timeout, forgets tombstones
    /// past their retention, and keeps the rest within the tombstone limits.
    pub async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let result = self.sweep_once().await;
        crate::metrics::sweep(result.as_ref());
        result
    }

    async fn sweep_once(&self) -> Result<SweepReport, StoreError> {
        let shared = &self.shared;
        let mut report = SweepReport::default();
        let cutoff = retention::sweep_cutoff(shared, now_ms());
        for candidate in shared.store.list_idle(cutoff).await? {
            if !retention::is_due(shared, &candidate, now_ms()) {
                continue;
            }
            // Look again under the lock: a packet may have made progress meanwhile.
            let Some(session) = shared.lock_session_or_skip(candidate.id).await? else {
                continue;
            };
            if !retention::is_due(shared, &session.record, now_ms()) {
                continue;
            }
            match retention::forget(shared, &session.record).await? {
                Forgotten::Expired => report.expired += 1,
                Forgotten::Tombstone => report.tombstones += 1,
                Forgotten::Kept => {}
            }
        }
        report.tombstones += retention::trim(shared).await?;
        if let Some(mode) = &shared.reply {
            let local = mode.replies.list().await.map_err(StoreError::backend)?;
            match crate::recovery::remove_orphan_replies(shared, &mode.replies, local).await {
                Ok(removed) => report.replies += removed,
                Err(error) => {
                    tracing::warn!(%error, "cannot remove the replies of ended sessions; next sweep");
                }
            }
        }
        self.redeliver().await?;
        // The gauges, counted afresh (packets keep the open count up to date in between).
        let records = shared.store.list().await?;
        crate::metrics::sessions_open(records.iter().filter(|r| r.is_open()).count());
        let (pending, failed) = crate::admin::deferred_counts(&records);
        crate::metrics::deferred(pending, failed);
        Ok(report)
    }

    /// Offers every undelivered event again (after a failed delivery or a restart).
    async fn redeliver(&self) -> Result<(), StoreError> {
        let shared = &self.shared;
        if shared.hooks.is_none() {
            return Ok(());
        }
        for candidate in shared.store.list().await? {
            if candidate.outbox.is_empty() {
                continue;
            }
            // A session with a packet in flight delivers its own events.
            if let Some(mut session) = shared.try_lock_session(candidate.id).await? {
                session.deliver().await;
            }
        }
        Ok(())
    }

    /// Runs a recovery scan ([`BitsHandle::recover`](crate::BitsHandle::recover)), then
    /// sweeps now and every `sweep_interval` and makes the attempts of deferred commits when
    /// they are due, until the layer is shut down. Errors are logged, not fatal.
    pub async fn run(self) {
        self.shared
            .sweeper_started
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let stopping = self.shared.lifecycle.stopping();
        tokio::select! {
            () = self.run_until_stopped() => {}
            () = stopping => tracing::debug!("sweeper stopped"),
        }
    }

    async fn run_until_stopped(&self) {
        if let Err(error) = crate::recovery::recover(&self.shared).await {
            tracing::error!(%error, source = ?std::error::Error::source(&error), "recovery scan failed");
        }
        let interval = self.shared.config.sweep_interval;
        let deferred = DeferredCompletions {
            shared: self.shared.clone(),
        };
        let mut next_sweep = tokio::time::Instant::now();
        loop {
            let mut wake = next_sweep;
            match deferred.run_due().await {
                Ok(Some(due)) => {
                    let wait = due
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    wake = wake.min(tokio::time::Instant::now() + wait);
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "deferred commits could not be listed"),
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = self.shared.wakeup.notified() => {}
            }
            if tokio::time::Instant::now() < next_sweep {
                continue;
            }
            next_sweep = tokio::time::Instant::now() + interval;
            match self.sweep().await {
                Ok(report) if report != SweepReport::default() => {
                    tracing::info!(
                        expired = report.expired,
                        tombstones = report.tombstones,
                        replies = report.replies,
                        "sweep done"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "session sweep failed"),
            }
        }
    }
}
