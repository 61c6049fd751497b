use std::sync::{Mutex, MutexGuard, PoisonError};

use super::index::Index;
use super::local_leases::LocalLeases;
use super::{SessionStore, StoreError};
use crate::session::{Owner, SessionId, SessionRecord};

/// Keeps records in process memory. Fast, and gone on restart: open sessions do not survive
/// it (clients then get `BG_E_SESSION_NOT_FOUND` and start over). Use [`FileStore`] or a
/// shared backend where that matters.
///
/// [`FileStore`]: super::FileStore
#[derive(Debug, Default)]
pub struct MemoryStore {
    index: Mutex<Index>,
    leases: LocalLeases,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SessionStore for MemoryStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let mut index = self.index();
        index.check_create(record)?;
        index.put(record.clone());
        Ok(())
    }

    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.index().get(id).cloned())
    }

    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        let mut index = self.index();
        index.check_update(expected, record)?;
        index.put(record.clone());
        Ok(())
    }

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        Ok(self.index().remove(id).is_some())
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.index().records())
    }

    async fn list_ended(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.index().ended())
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        Ok(self.index().count_open())
    }

    async fn count_open_for(&self, owner: &Owner) -> Result<usize, StoreError> {
        Ok(self.index().count_open_for(owner))
    }

    async fn acquire_lease(
        &self,
        id: SessionId,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.leases.acquire(id, holder, ttl))
    }

    async fn release_lease(&self, id: SessionId, holder: &str) -> Result<(), StoreError> {
        self.leases.release(id, holder);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let store = std::sync::Arc::new(MemoryStore::new());
        crate::store::conformance::run(store.clone()).await;
        // Not shared, so `run` skips the leases; they keep the contract all the same.
        crate::store::conformance::leases(store.as_ref()).await;
        crate::store::conformance::concurrent_leases(store).await;
    }

    /// The cross-node races can fail: two stores that share nothing both accept a destination.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[should_panic(expected = "concurrent creates for one destination")]
    async fn races_across_stores_that_share_nothing_fail() {
        let nodes = [
            std::sync::Arc::new(MemoryStore::new()),
            std::sync::Arc::new(MemoryStore::new()),
        ];
        crate::store::conformance::races_across(&nodes).await;
    }
}
