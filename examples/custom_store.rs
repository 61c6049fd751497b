//! A session store of your own: here, records in a `BTreeMap` with an index of the
//! destinations open sessions hold, and every change written to a log line. It proves itself
//! with the crate's conformance suite before it serves.
//!
//! ```text
//! cargo run --features conformance --example custom_store            # check, then serve on 127.0.0.1:8080
//! cargo run --features conformance --example custom_store -- --check # run the suite only
//! ```
//!
//! The same pattern fits any backend: keep create-if-absent and compare-and-set atomic (a
//! transaction, a conditional write, a script), answer `count_open` and `list_idle` from an
//! index if you have one, and, if several processes share the store, implement
//! `is_shared`/`acquire_lease`/`release_lease` (the suite then checks those too).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum_bits::BitsLayer;
use axum_bits::session::{Owner, SessionId, SessionRecord};
use axum_bits::store::{SessionStore, StoreError, conformance};

/// Records by id, plus which session holds each destination.
#[derive(Debug, Default)]
struct TreeStore {
    inner: Mutex<Tree>,
}

#[derive(Debug, Default)]
struct Tree {
    records: BTreeMap<SessionId, SessionRecord>,
    holders: HashMap<String, SessionId>,
}

impl Tree {
    /// Stores `record`, moving its destination claim with it.
    fn put(&mut self, record: &SessionRecord) {
        if let Some(old) = self.records.insert(record.id, record.clone()) {
            self.release(&old);
        }
        if record.holds_destination() {
            self.holders.insert(record.destination.clone(), record.id);
        }
    }

    fn release(&mut self, old: &SessionRecord) {
        if self.holders.get(&old.destination) == Some(&old.id) {
            self.holders.remove(&old.destination);
        }
    }

    /// Who else holds `record`'s destination, if `record` wants it.
    fn busy(&self, record: &SessionRecord) -> Option<SessionId> {
        let holder = *self.holders.get(&record.destination)?;
        (record.holds_destination() && holder != record.id).then_some(holder)
    }
}

impl TreeStore {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SessionStore for TreeStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let mut tree = self.tree();
        if tree.records.contains_key(&record.id) {
            return Err(StoreError::AlreadyExists);
        }
        if let Some(holder) = tree.busy(record) {
            return Err(StoreError::DestinationBusy { holder });
        }
        tree.put(record);
        tracing::debug!(session = %record.id, destination = %record.destination, "created");
        Ok(())
    }

    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.tree().records.get(&id).cloned())
    }

    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        let mut tree = self.tree();
        match tree.records.get(&record.id) {
            None => return Err(StoreError::NotFound),
            Some(current) if current.revision != expected => return Err(StoreError::Conflict),
            Some(_) => {}
        }
        if let Some(holder) = tree.busy(record) {
            return Err(StoreError::DestinationBusy { holder });
        }
        tree.put(record);
        tracing::debug!(session = %record.id, revision = record.revision, received = record.received, "updated");
        Ok(())
    }

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let mut tree = self.tree();
        let Some(old) = tree.records.remove(&id) else {
            return Ok(false);
        };
        tree.release(&old);
        tracing::debug!(session = %id, "removed");
        Ok(true)
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self.tree().records.values().cloned().collect())
    }

    // The rest have defaults that scan `list`; answering directly is cheaper.

    async fn count_open(&self) -> Result<usize, StoreError> {
        Ok(self.tree().records.values().filter(|r| r.is_open()).count())
    }

    async fn count_open_for(&self, owner: &Owner) -> Result<usize, StoreError> {
        let tree = self.tree();
        Ok(tree
            .records
            .values()
            .filter(|r| r.is_open_for(owner))
            .count())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    // Panics, naming the broken rule, if the store does not keep the contract.
    conformance::run(Arc::new(TreeStore::default())).await;
    println!("TreeStore passes the conformance suite");
    if std::env::args().any(|a| a == "--check") {
        return Ok(());
    }

    let root = std::env::temp_dir().join("axum-bits-custom-store");
    let bits = BitsLayer::builder(&root)
        .store(TreeStore::default())
        .build()?;
    tokio::spawn(bits.sweeper().run());
    let app = Router::new().layer(bits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!(
        "uploading into {} on http://{}",
        root.display(),
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}
