use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{SessionStore, StoreError};
use crate::session::{SessionId, SessionRecord};

/// Keeps records in process memory. Fast, and gone on restart: open sessions do not survive
/// it (clients then get `BG_E_SESSION_NOT_FOUND` and start over). Use [`FileStore`] or a
/// shared backend where that matters.
///
/// [`FileStore`]: super::FileStore
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<SessionId, SessionRecord>,
    /// destination → the session holding it.
    holders: HashMap<String, SessionId>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Keeps `holders` in step with a record that is being stored or removed.
    fn reindex(&mut self, old: Option<&SessionRecord>, new: Option<&SessionRecord>) {
        if let Some(old) = old.filter(|r| r.holds_destination()) {
            if self.holders.get(&old.destination) == Some(&old.id) {
                self.holders.remove(&old.destination);
            }
        }
        if let Some(new) = new.filter(|r| r.holds_destination()) {
            self.holders.insert(new.destination.clone(), new.id);
        }
    }
}

impl SessionStore for MemoryStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.records.contains_key(&record.id) {
            return Err(StoreError::AlreadyExists);
        }
        if record.holds_destination() {
            if let Some(&holder) = inner.holders.get(&record.destination) {
                return Err(StoreError::DestinationBusy { holder });
            }
        }
        inner.reindex(None, Some(record));
        inner.records.insert(record.id, record.clone());
        Ok(())
    }

    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.lock().records.get(&id).cloned())
    }

    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let old = match inner.records.get(&record.id) {
            None => return Err(StoreError::NotFound),
            Some(current) if current.revision != expected => return Err(StoreError::Conflict),
            Some(current) => current.clone(),
        };
        inner.reindex(Some(&old), Some(record));
        inner.records.insert(record.id, record.clone());
        Ok(())
    }

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let old = inner.records.remove(&id);
        inner.reindex(old.as_ref(), None);
        Ok(old.is_some())
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.lock().records.values().cloned().collect())
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        Ok(self.lock().records.values().filter(|r| r.is_open()).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contract() {
        super::super::tests::contract(&MemoryStore::new()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cas_race() {
        super::super::tests::cas_race(std::sync::Arc::new(MemoryStore::new())).await;
    }
}
