//! Expiry of idle sessions, as a future the application spawns (the crate runs no background loop of its own).

use std::sync::Arc;

use crate::handler::Shared;
use crate::session::machine::is_expired;
use crate::session::now_ms;
use crate::store::StoreError;

/// Deletes sessions (and tombstones of finished ones) that have seen no successful packet for
/// the session timeout (`BITSSessionTimeout`): their staged data and their record. A file
/// already committed to its destination stays.
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// Open sessions that expired (their staged data was deleted).
    pub expired: usize,
    /// Records of closed or cancelled sessions that were forgotten.
    pub tombstones: usize,
}

impl Sweeper {
    /// Sweeps once.
    pub async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let shared = &self.shared;
        let timeout_ms =
            u64::try_from(shared.config.session_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut report = SweepReport::default();
        for candidate in shared.store.list().await? {
            if !is_expired(&candidate, now_ms(), timeout_ms) {
                continue;
            }
            let _guard = shared.locks.lock(candidate.id).await;
            // Look again under the lock: a packet may have made progress meanwhile.
            let Some(record) = shared.store.load(candidate.id).await? else {
                continue;
            };
            if !is_expired(&record, now_ms(), timeout_ms) {
                continue;
            }
            if let Err(error) = shared.staging.discard(record.id).await {
                tracing::warn!(session = %record.id, %error, "cannot delete the staged data of an expired session");
                continue;
            }
            shared.store.remove(record.id).await?;
            if record.is_open() {
                tracing::info!(session = %record.id, destination = %record.destination, "session expired");
                report.expired += 1;
            } else {
                report.tombstones += 1;
            }
        }
        Ok(report)
    }

    /// Sweeps now and then every `sweep_interval`, forever. Errors are logged, not fatal.
    pub async fn run(self) {
        let mut interval = tokio::time::interval(self.shared.config.sweep_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match self.sweep().await {
                Ok(report) if report != SweepReport::default() => {
                    tracing::info!(
                        expired = report.expired,
                        tombstones = report.tombstones,
                        "sweep done"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "session sweep failed"),
            }
        }
    }
}
