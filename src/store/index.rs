//! The in-memory index both built-in stores keep: records by id, plus which open session holds
//! each destination, so that create can refuse a busy destination without a scan.

use std::collections::HashMap;

use super::StoreError;
use crate::session::{Owner, SessionId, SessionRecord};

#[derive(Debug, Default)]
pub(crate) struct Index {
    records: HashMap<SessionId, SessionRecord>,
    /// destination → the session holding it.
    holders: HashMap<String, SessionId>,
}

impl Index {
    /// Whether `record` may be created: new id, destination not held by another session.
    pub(crate) fn check_create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        if self.records.contains_key(&record.id) {
            return Err(StoreError::AlreadyExists);
        }
        match self.holders.get(&record.destination) {
            Some(&holder) if record.holds_destination() => {
                Err(StoreError::DestinationBusy { holder })
            }
            _ => Ok(()),
        }
    }

    /// Whether `record` may replace the stored one (compare-and-set on the revision).
    pub(crate) fn check_update(
        &self,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        match self.records.get(&record.id) {
            None => Err(StoreError::NotFound),
            Some(current) if current.revision != expected => Err(StoreError::Conflict),
            Some(_) => Ok(()),
        }
    }

    pub(crate) fn get(&self, id: SessionId) -> Option<&SessionRecord> {
        self.records.get(&id)
    }

    pub(crate) fn contains(&self, id: SessionId) -> bool {
        self.records.contains_key(&id)
    }

    /// Inserts or replaces a record, keeping the destination index in step.
    pub(crate) fn put(&mut self, record: SessionRecord) {
        let old = self.records.remove(&record.id);
        self.release(old.as_ref());
        if record.holds_destination() {
            self.holders.insert(record.destination.clone(), record.id);
        }
        self.records.insert(record.id, record);
    }

    pub(crate) fn remove(&mut self, id: SessionId) -> Option<SessionRecord> {
        let old = self.records.remove(&id);
        self.release(old.as_ref());
        old
    }

    pub(crate) fn records(&self) -> Vec<SessionRecord> {
        self.records.values().cloned().collect()
    }

    pub(crate) fn ended(&self) -> Vec<SessionRecord> {
        self.records
            .values()
            .filter(|r| !r.is_open())
            .cloned()
            .collect()
    }

    pub(crate) fn count_open(&self) -> usize {
        self.records.values().filter(|r| r.is_open()).count()
    }

    pub(crate) fn count_open_for(&self, owner: &Owner) -> usize {
        self.records
            .values()
            .filter(|r| r.is_open_for(owner))
            .count()
    }

    fn release(&mut self, old: Option<&SessionRecord>) {
        if let Some(old) = old.filter(|r| r.holds_destination()) {
            if self.holders.get(&old.destination) == Some(&old.id) {
                self.holders.remove(&old.destination);
            }
        }
    }
}
