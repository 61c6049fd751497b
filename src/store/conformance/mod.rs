//! The conformance suite every [`SessionStore`] must pass (feature `conformance`): the checks
//! of the [store contract](SessionStore#contract).
//!
//! The built-in backends run it in their tests; run it against your own store the same way.
//! [`run`] runs every check; each check is also a function of its own, so that a failure
//! names what broke. Checks panic, with a message saying which rule was broken, as test
//! assertions do.
//!
//! Give each run a store of its own (its own database schema, table prefix or key prefix):
//! the checks use fresh ids and destinations, but they also count open sessions.
//!
//! ```
//! # use std::collections::HashMap;
//! # use std::sync::Mutex;
//! # use axum_bits::session::{SessionId, SessionRecord};
//! # use axum_bits::store::{SessionStore, StoreError};
//! use std::sync::Arc;
//! use axum_bits::store::conformance;
//!
//! // `MapStore` is a store of your own, such as the one in the `store` module's docs.
//! # #[derive(Default)]
//! # struct MapStore(Mutex<HashMap<SessionId, SessionRecord>>);
//! #
//! # impl SessionStore for MapStore {
//! #     async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
//! #         let mut map = self.0.lock().unwrap();
//! #         if map.contains_key(&record.id) {
//! #             return Err(StoreError::AlreadyExists);
//! #         }
//! #         let busy = map.values().find(|r| {
//! #             record.holds_destination()
//! #                 && r.holds_destination()
//! #                 && r.destination == record.destination
//! #         });
//! #         if let Some(holder) = busy {
//! #             return Err(StoreError::DestinationBusy { holder: holder.id });
//! #         }
//! #         map.insert(record.id, record.clone());
//! #         Ok(())
//! #     }
//! #
//! #     async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
//! #         Ok(self.0.lock().unwrap().get(&id).cloned())
//! #     }
//! #
//! #     async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
//! #         let mut map = self.0.lock().unwrap();
//! #         match map.get_mut(&record.id) {
//! #             None => Err(StoreError::NotFound),
//! #             Some(current) if current.revision != expected => Err(StoreError::Conflict),
//! #             Some(current) => {
//! #                 *current = record.clone();
//! #                 Ok(())
//! #             }
//! #         }
//! #     }
//! #
//! #     async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
//! #         Ok(self.0.lock().unwrap().remove(&id).is_some())
//! #     }
//! #
//! #     async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
//! #         Ok(self.0.lock().unwrap().values().cloned().collect())
//! #     }
//! # }
//! #
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! conformance::run(Arc::new(MapStore::default())).await;
//! # }
//! ```
//!
//! A store shared by several processes ([`SessionStore::is_shared`]) must also pass the lease
//! checks, which [`run`] then includes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

mod races;
mod records;

use super::{SessionStore, StoreError};
use crate::session::{SessionId, SessionRecord};

use races::{compare_and_set_across, creates_across, lease_handoffs_across, leases_across};
pub use races::{
    concurrent_compare_and_set, concurrent_creates, concurrent_leases, lease_handoffs, race,
};
pub use records::{
    compare_and_set, counts, create_refuses_a_taken_id, destination_claims, idle_listing,
    leased_updates, leases, remove, round_trip,
};

/// How many tasks race in the concurrent checks.
pub(super) const RACERS: usize = 16;

/// Runs every check against `store`, in order; the lease checks only if the store says it is
/// [shared](SessionStore::is_shared).
pub async fn run<S: SessionStore>(store: Arc<S>) {
    round_trip(store.as_ref()).await;
    create_refuses_a_taken_id(store.as_ref()).await;
    destination_claims(store.as_ref()).await;
    compare_and_set(store.as_ref()).await;
    remove(store.as_ref()).await;
    counts(store.as_ref()).await;
    idle_listing(store.as_ref()).await;
    concurrent_creates(store.clone()).await;
    concurrent_compare_and_set(store.clone()).await;
    if store.is_shared() {
        leases(store.as_ref()).await;
        leased_updates(store.as_ref()).await;
        concurrent_leases(store.clone()).await;
        lease_handoffs(store).await;
    }
}

/// The races of [`run`] with the racing tasks spread over `nodes`: several instances of one
/// shared store (separate pools or connections to the same database), as the nodes of a farm
/// hold. Creates and compare-and-sets must be atomic across them, and, for a shared store,
/// leases exclusive across them.
///
/// # Panics
///
/// If `nodes` is empty, or a rule is broken.
pub async fn races_across<S: SessionStore>(nodes: &[Arc<S>]) {
    assert!(!nodes.is_empty(), "races_across needs at least one store");
    creates_across(nodes).await;
    compare_and_set_across(nodes).await;
    if nodes[0].is_shared() {
        leases_across(nodes).await;
        lease_handoffs_across(nodes).await;
    }
}

/// The store task `i` of a race uses.
pub(super) fn node<S>(nodes: &[Arc<S>], i: usize) -> Arc<S> {
    nodes[i % nodes.len()].clone()
}

/// A record with a fresh id and a destination no other check uses.
pub fn fresh_record(name: &str) -> SessionRecord {
    let id = SessionId::new();
    let destination = format!(
        "conformance/{}/{name}",
        SessionId::new().to_string().trim_matches(['{', '}'])
    );
    let url = format!("/{destination}");
    SessionRecord::new(id, destination, url, None, now_ms())
}

pub(super) async fn lease(
    store: &impl SessionStore,
    id: SessionId,
    holder: &str,
    ttl: Duration,
) -> bool {
    store
        .acquire_lease(id, holder, ttl)
        .await
        .unwrap_or_else(|e| panic!("acquire_lease: {e:?}"))
}

pub(super) async fn release(store: &impl SessionStore, id: SessionId, holder: &str) {
    store
        .release_lease(id, holder)
        .await
        .unwrap_or_else(|e| panic!("release_lease: {e:?}"));
}

pub(super) async fn load(store: &impl SessionStore, id: SessionId) -> SessionRecord {
    match store.load(id).await {
        Ok(Some(record)) => record,
        other => panic!("load of a stored record: {other:?}"),
    }
}

pub(super) async fn idle_ids(store: &impl SessionStore, cutoff_ms: u64) -> HashSet<SessionId> {
    store
        .list_idle(cutoff_ms)
        .await
        .unwrap_or_else(|e| panic!("list_idle: {e:?}"))
        .into_iter()
        .map(|r| r.id)
        .collect()
}

pub(super) async fn ids(store: &impl SessionStore) -> HashSet<SessionId> {
    store
        .list()
        .await
        .unwrap_or_else(|e| panic!("list: {e:?}"))
        .into_iter()
        .map(|r| r.id)
        .collect()
}

pub(super) fn assert_ok(result: Result<(), StoreError>, what: &str) {
    if let Err(error) = result {
        panic!("{what} failed: {error:?}");
    }
}

pub(super) fn now_ms() -> u64 {
    crate::session::now_ms()
}
