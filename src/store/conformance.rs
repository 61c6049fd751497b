//! The conformance suite every [`SessionStore`] must pass (feature `conformance`).
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
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use axum_bits::session::{SessionId, SessionRecord};
//! use axum_bits::store::{conformance, SessionStore, StoreError};
//!
//! /// A third-party store: records in a map behind one mutex.
//! #[derive(Default)]
//! struct MapStore(Mutex<HashMap<SessionId, SessionRecord>>);
//!
//! impl SessionStore for MapStore {
//!     async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
//!         let mut map = self.0.lock().unwrap();
//!         if map.contains_key(&record.id) {
//!             return Err(StoreError::AlreadyExists);
//!         }
//!         let busy = map.values().find(|r| {
//!             record.holds_destination()
//!                 && r.holds_destination()
//!                 && r.destination == record.destination
//!         });
//!         if let Some(holder) = busy {
//!             return Err(StoreError::DestinationBusy { holder: holder.id });
//!         }
//!         map.insert(record.id, record.clone());
//!         Ok(())
//!     }
//!
//!     async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
//!         Ok(self.0.lock().unwrap().get(&id).cloned())
//!     }
//!
//!     async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
//!         let mut map = self.0.lock().unwrap();
//!         match map.get_mut(&record.id) {
//!             None => Err(StoreError::NotFound),
//!             Some(current) if current.revision != expected => Err(StoreError::Conflict),
//!             Some(current) => {
//!                 *current = record.clone();
//!                 Ok(())
//!             }
//!         }
//!     }
//!
//!     async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
//!         Ok(self.0.lock().unwrap().remove(&id).is_some())
//!     }
//!
//!     async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
//!         Ok(self.0.lock().unwrap().values().cloned().collect())
//!     }
//! }
//!
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

use super::{SessionStore, StoreError};
use crate::session::{
    DeferredState, DeferredStatus, Event, EventKind, Outcome, Owner, Phase, SessionId,
    SessionRecord, StoredReply,
};

/// How many tasks race in the concurrent checks.
const RACERS: usize = 16;

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
        concurrent_leases(store).await;
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
    }
}

/// The store task `i` of a race uses.
fn node<S>(nodes: &[Arc<S>], i: usize) -> Arc<S> {
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

/// Every field of a record survives create and load unchanged, and so does an update.
pub async fn round_trip(store: &impl SessionStore) {
    let mut record = fresh_record("round-trip.bin");
    record.owner = Some(Owner::new("alice@example.com"));
    record.content_name = Some("C:\\Users\\alice\\round trip ü.bin".into());
    record.request_url = format!("/{}?q=1&r=%20", record.destination);
    record.origin = Some("https://uploads.example.com:8443".into());
    record.total = Some(u64::MAX / 3);
    record.received = 12_345;
    record.created_ms = 1_700_000_000_123;
    record.updated_ms = 1_700_000_000_456;
    assert_ok(store.create(&record).await, "create");
    assert_eq!(
        store.load(record.id).await.ok().flatten().as_ref(),
        Some(&record),
        "a created record loads back unchanged"
    );

    let mut next = record.clone();
    next.revision = 1;
    next.phase = Phase::Complete;
    next.committed = true;
    next.outcome = Some(Outcome {
        reply_url: "https://uploads.example.com/reply/1".into(),
        stored_reply: Some(StoredReply {
            len: 42,
            stored_ms: 1_700_000_001_000,
        }),
        copy_to_destination: true,
    });
    next.deferred = Some(DeferredState {
        status: DeferredStatus::Failed,
        attempts: 7,
        next_attempt_ms: 1_700_000_002_000,
        last_error: Some("destination busy".into()),
    });
    crate::session::enqueue(
        &mut next,
        Event::new(
            &record,
            EventKind::Progress {
                received: 1,
                total: 2,
            },
            3,
        ),
    );
    assert_ok(store.update(0, &next).await, "update");
    assert_eq!(
        store.load(record.id).await.ok().flatten().as_ref(),
        Some(&next),
        "an updated record loads back unchanged"
    );
    assert!(
        matches!(store.load(SessionId::new()).await, Ok(None)),
        "an unknown id loads as None"
    );
    assert_ok(store.remove(record.id).await.map(|_| ()), "remove");
}

/// Create fails with `AlreadyExists` for a taken id and leaves the stored record alone.
pub async fn create_refuses_a_taken_id(store: &impl SessionStore) {
    let record = fresh_record("taken.bin");
    assert_ok(store.create(&record).await, "create");
    let mut again = fresh_record("other.bin");
    again.id = record.id;
    assert!(
        matches!(store.create(&again).await, Err(StoreError::AlreadyExists)),
        "create with a taken id fails with AlreadyExists"
    );
    assert_eq!(
        load(store, record.id).await.destination,
        record.destination,
        "a refused create leaves the stored record alone"
    );
    store.remove(record.id).await.ok();
}

/// An open session claims its destination; committing, closing, cancelling or removing it
/// releases the claim; sessions that do not claim (upload-reply) never conflict.
pub async fn destination_claims(store: &impl SessionStore) {
    let first = fresh_record("claimed.bin");
    assert_ok(store.create(&first).await, "create");
    let mut second = fresh_record("claimed.bin");
    second.destination = first.destination.clone();
    match store.create(&second).await {
        Err(StoreError::DestinationBusy { holder }) => assert_eq!(
            holder, first.id,
            "DestinationBusy names the session that holds the destination"
        ),
        other => panic!(
            "a second session for a claimed destination must get DestinationBusy, got {other:?}"
        ),
    }
    assert!(
        matches!(store.load(second.id).await, Ok(None)),
        "a refused create stores nothing"
    );

    // Each way of letting go of the destination frees it.
    type Release = fn(&mut SessionRecord);
    let releases: [(&str, Release); 4] = [
        ("committed", |r| r.committed = true),
        ("closed", |r| r.phase = Phase::Closed),
        ("cancelled", |r| r.phase = Phase::Cancelled),
        ("no longer claiming", |r| r.claims_destination = false),
    ];
    let mut holder = first;
    for (how, release) in releases {
        let mut next = holder.clone();
        release(&mut next);
        next.revision += 1;
        assert_ok(store.update(holder.revision, &next).await, how);
        let mut successor = fresh_record("claimed.bin");
        successor.destination = holder.destination.clone();
        assert_ok(
            store.create(&successor).await,
            &format!("create after the holder was {how}"),
        );
        store.remove(next.id).await.ok();
        holder = successor;
    }
    // Removing the holder frees it too.
    assert_ok(store.remove(holder.id).await.map(|_| ()), "remove");
    let mut after_remove = fresh_record("claimed.bin");
    after_remove.destination = holder.destination.clone();
    assert_ok(
        store.create(&after_remove).await,
        "create after the holder was removed",
    );

    // A deferred commit still holds the destination after its session closed.
    let mut deferred = after_remove.clone();
    deferred.revision += 1;
    deferred.phase = Phase::Closed;
    deferred.deferred = Some(DeferredState {
        status: DeferredStatus::Pending,
        attempts: 1,
        next_attempt_ms: 0,
        last_error: None,
    });
    assert_ok(
        store.update(after_remove.revision, &deferred).await,
        "update",
    );
    let mut blocked = fresh_record("claimed.bin");
    blocked.destination = deferred.destination.clone();
    assert!(
        matches!(store.create(&blocked).await, Err(StoreError::DestinationBusy { holder }) if holder == deferred.id),
        "a pending deferred commit holds its destination"
    );
    store.remove(deferred.id).await.ok();

    // Upload-reply sessions share their URL freely.
    let mut replies = Vec::new();
    let destination = fresh_record("app").destination;
    for _ in 0..3 {
        let mut r = fresh_record("app");
        r.destination = destination.clone();
        r.claims_destination = false;
        assert_ok(
            store.create(&r).await,
            "create of a session that does not claim",
        );
        replies.push(r.id);
    }
    let mut claiming = fresh_record("app");
    claiming.destination = destination;
    assert_ok(
        store.create(&claiming).await,
        "sessions that do not claim leave the destination free",
    );
    for id in replies.into_iter().chain([claiming.id]) {
        store.remove(id).await.ok();
    }
}

/// `update` is a compare-and-set on the revision.
pub async fn compare_and_set(store: &impl SessionStore) {
    let record = fresh_record("cas.bin");
    assert_ok(store.create(&record).await, "create");
    let mut next = record.clone();
    next.revision = 1;
    next.received = 100;
    assert_ok(
        store.update(0, &next).await,
        "update at the stored revision",
    );
    let mut stale = record.clone();
    stale.revision = 1;
    stale.received = 5;
    assert!(
        matches!(store.update(0, &stale).await, Err(StoreError::Conflict)),
        "update with a stale revision fails with Conflict"
    );
    assert!(
        matches!(store.update(7, &stale).await, Err(StoreError::Conflict)),
        "update with a revision from the future fails with Conflict"
    );
    assert_eq!(
        load(store, record.id).await.received,
        100,
        "a refused update changes nothing"
    );
    let ghost = fresh_record("ghost.bin");
    assert!(
        matches!(store.update(0, &ghost).await, Err(StoreError::NotFound)),
        "update of a missing record fails with NotFound"
    );
    assert!(
        matches!(store.load(ghost.id).await, Ok(None)),
        "a refused update creates nothing"
    );
    store.remove(record.id).await.ok();
}

/// `remove` deletes and says whether there was something to delete.
pub async fn remove(store: &impl SessionStore) {
    let record = fresh_record("remove.bin");
    assert_ok(store.create(&record).await, "create");
    assert!(
        matches!(store.remove(record.id).await, Ok(true)),
        "remove of a stored record returns true"
    );
    assert!(
        matches!(store.remove(record.id).await, Ok(false)),
        "remove of a missing record returns false"
    );
    assert!(
        matches!(store.load(record.id).await, Ok(None)),
        "removed means gone"
    );
    assert!(
        !ids(store).await.contains(&record.id),
        "a removed record is not listed"
    );
}

/// `count_open`, `count_open_for` and `list` agree with what was stored.
pub async fn counts(store: &impl SessionStore) {
    let open_before = store
        .count_open()
        .await
        .unwrap_or_else(|e| panic!("count_open: {e}"));
    let owner = Owner::new(format!("owner-{}", SessionId::new()));
    let mut made = Vec::new();
    for (i, phase) in [
        Phase::Receiving,
        Phase::Complete,
        Phase::Closed,
        Phase::Cancelled,
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = fresh_record(&format!("count-{i}.bin"));
        r.owner = Some(owner.clone());
        r.phase = phase;
        assert_ok(store.create(&r).await, "create");
        made.push(r.id);
    }
    let mut anonymous = fresh_record("count-anonymous.bin");
    anonymous.owner = None;
    assert_ok(store.create(&anonymous).await, "create");
    made.push(anonymous.id);

    assert_eq!(
        store.count_open().await.ok(),
        Some(open_before + 3),
        "count_open counts Receiving and Complete sessions, not tombstones"
    );
    assert_eq!(
        store.count_open_for(&owner).await.ok(),
        Some(2),
        "count_open_for counts the owner's open sessions only"
    );
    assert_eq!(
        store
            .count_open_for(&Owner::new("nobody-at-all"))
            .await
            .ok(),
        Some(0),
        "count_open_for of an unknown owner is 0"
    );
    let listed = ids(store).await;
    assert!(
        made.iter().all(|id| listed.contains(id)),
        "list returns open sessions and tombstones alike"
    );
    for id in made {
        store.remove(id).await.ok();
    }
    assert_eq!(
        store.count_open().await.ok(),
        Some(open_before),
        "removed sessions are no longer counted"
    );
}

/// `list_idle(cutoff)` returns exactly the records whose `updated_ms` is before the cutoff.
pub async fn idle_listing(store: &impl SessionStore) {
    let now = now_ms();
    let mut old = fresh_record("idle-old.bin");
    old.updated_ms = now - 3_600_000;
    let mut old_tombstone = fresh_record("idle-tombstone.bin");
    old_tombstone.updated_ms = now - 3_600_000;
    old_tombstone.phase = Phase::Closed;
    let mut at_cutoff = fresh_record("idle-edge.bin");
    at_cutoff.updated_ms = now - 60_000;
    let mut fresh = fresh_record("idle-fresh.bin");
    fresh.updated_ms = now;
    for r in [&old, &old_tombstone, &at_cutoff, &fresh] {
        assert_ok(store.create(r).await, "create");
    }
    let idle = idle_ids(store, now - 60_000).await;
    assert!(
        idle.contains(&old.id),
        "list_idle returns an idle open session"
    );
    assert!(
        idle.contains(&old_tombstone.id),
        "list_idle returns an idle tombstone"
    );
    assert!(
        !idle.contains(&at_cutoff.id),
        "list_idle excludes a record updated exactly at the cutoff"
    );
    assert!(
        !idle.contains(&fresh.id),
        "list_idle excludes a fresh record"
    );

    // An update moves a record out of the idle set.
    let mut touched = old.clone();
    touched.revision += 1;
    touched.updated_ms = now;
    assert_ok(store.update(old.revision, &touched).await, "update");
    let idle = idle_ids(store, now - 60_000).await;
    assert!(
        !idle.contains(&old.id),
        "list_idle follows updates of updated_ms"
    );
    for r in [&old, &old_tombstone, &at_cutoff, &fresh] {
        store.remove(r.id).await.ok();
    }
}

/// Many tasks create sessions at once: for one destination exactly one wins and the others
/// are told who holds it; for one id exactly one wins.
pub async fn concurrent_creates<S: SessionStore>(store: Arc<S>) {
    creates_across(&[store]).await;
}

/// [`concurrent_creates`] with the tasks spread over `nodes`.
async fn creates_across<S: SessionStore>(nodes: &[Arc<S>]) {
    let store = &nodes[0];
    let destination = fresh_record("contested.bin").destination;
    let attempts = race(RACERS, |i| {
        let store = node(nodes, i);
        let mut record = fresh_record("contested.bin");
        record.destination = destination.clone();
        async move { (record.id, store.create(&record).await) }
    })
    .await;
    let winners: Vec<SessionId> = attempts
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {RACERS} concurrent creates for one destination succeeds"
    );
    for (_, result) in &attempts {
        match result {
            Ok(()) => {}
            Err(StoreError::DestinationBusy { holder }) => assert_eq!(
                *holder, winners[0],
                "every loser of a create race is told the winner holds the destination"
            ),
            Err(e) => panic!("a loser of a create race must get DestinationBusy, got {e:?}"),
        }
    }
    store.remove(winners[0]).await.ok();

    let id = SessionId::new();
    let attempts = race(RACERS, |i| {
        let store = node(nodes, i);
        let mut record = fresh_record("same-id.bin");
        record.id = id;
        async move { (record.destination.clone(), store.create(&record).await) }
    })
    .await;
    let won: Vec<&String> = attempts
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(d, _)| d)
        .collect();
    assert_eq!(
        won.len(),
        1,
        "exactly one of {RACERS} concurrent creates of one id succeeds"
    );
    assert!(
        attempts
            .iter()
            .all(|(_, r)| matches!(r, Ok(()) | Err(StoreError::AlreadyExists))),
        "the losers of an id race get AlreadyExists"
    );
    assert_eq!(
        &load(node(nodes, 1).as_ref(), id).await.destination,
        won[0],
        "the stored record is the winner's"
    );
    store.remove(id).await.ok();
}

/// Many tasks advance one record by compare-and-set at once; no update is lost and none is
/// applied twice.
pub async fn concurrent_compare_and_set<S: SessionStore>(store: Arc<S>) {
    compare_and_set_across(&[store]).await;
}

/// [`concurrent_compare_and_set`] with the tasks spread over `nodes`.
async fn compare_and_set_across<S: SessionStore>(nodes: &[Arc<S>]) {
    let store = &nodes[0];
    const ROUNDS: u64 = 25;
    let record = fresh_record("race.bin");
    assert_ok(store.create(&record).await, "create");
    let id = record.id;
    let wins = race(RACERS, |i| {
        let store = node(nodes, i);
        async move {
            let mut wins = 0u64;
            for _ in 0..ROUNDS {
                loop {
                    let mut current = load(store.as_ref(), id).await;
                    let expected = current.revision;
                    current.revision += 1;
                    current.received += 1;
                    match store.update(expected, &current).await {
                        Ok(()) => {
                            wins += 1;
                            break;
                        }
                        Err(StoreError::Conflict) => tokio::task::yield_now().await,
                        Err(e) => panic!("update in a compare-and-set race: {e:?}"),
                    }
                }
            }
            wins
        }
    })
    .await;
    let total = RACERS as u64 * ROUNDS;
    assert_eq!(
        wins.iter().sum::<u64>(),
        total,
        "every task won each round once"
    );
    let last = load(node(nodes, 1).as_ref(), id).await;
    assert_eq!(
        (last.revision, last.received),
        (total, total),
        "no compare-and-set update was lost or applied twice"
    );
    store.remove(id).await.ok();
}

/// Leases are exclusive, renewable by their holder, released only by their holder, expire
/// after their ttl, and are independent of the record.
pub async fn leases(store: &impl SessionStore) {
    let long = Duration::from_secs(60);
    let record = fresh_record("lease.bin");
    assert_ok(store.create(&record).await, "create");
    let id = record.id;
    assert!(
        lease(store, id, "node-a", long).await,
        "a free lease is granted"
    );
    assert!(
        !lease(store, id, "node-b", long).await,
        "a held lease is refused to another holder"
    );
    assert!(
        lease(store, id, "node-a", long).await,
        "the holder may renew its lease"
    );
    let mut next = record.clone();
    next.revision = 1;
    next.received = 1;
    assert_ok(store.update(0, &next).await, "update under a lease");
    assert!(
        !lease(store, id, "node-b", long).await,
        "updating the record leaves its lease alone"
    );
    release(store, id, "node-b").await;
    assert!(
        !lease(store, id, "node-b", long).await,
        "only the holder's release ends a lease"
    );
    release(store, id, "node-a").await;
    assert!(
        lease(store, id, "node-b", long).await,
        "a released lease can be taken"
    );
    release(store, id, "node-b").await;
    release(store, id, "node-b").await;

    // Expiry: a holder that vanished loses its lease after the ttl.
    let short = Duration::from_millis(300);
    assert!(lease(store, id, "node-a", short).await, "lease granted");
    assert!(
        !lease(store, id, "node-b", long).await,
        "a lease is held until its ttl"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        lease(store, id, "node-b", long).await,
        "an expired lease can be taken over"
    );
    release(store, id, "node-a").await;
    assert!(
        !lease(store, id, "node-a", long).await,
        "the expired holder's release leaves the new holder's lease alone"
    );
    release(store, id, "node-b").await;

    // A renewal moves the expiry.
    assert!(lease(store, id, "node-a", short).await, "lease granted");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(lease(store, id, "node-a", long).await, "lease renewed");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !lease(store, id, "node-b", long).await,
        "a renewed lease outlives its first ttl"
    );
    release(store, id, "node-a").await;

    // Leases do not need a record.
    let ghost = SessionId::new();
    assert!(
        lease(store, ghost, "node-a", long).await,
        "a lease may be taken for an id without a record"
    );
    assert!(
        !lease(store, ghost, "node-b", long).await,
        "and it is exclusive too"
    );
    release(store, ghost, "node-a").await;
    store.remove(id).await.ok();
}

/// Many holders ask for one lease at once: exactly one gets it.
pub async fn concurrent_leases<S: SessionStore>(store: Arc<S>) {
    leases_across(&[store]).await;
}

/// [`concurrent_leases`] with the requests spread over `nodes`.
async fn leases_across<S: SessionStore>(nodes: &[Arc<S>]) {
    let id = SessionId::new();
    for round in 0..3 {
        let granted = race(RACERS, |i| {
            let store = node(nodes, i);
            async move {
                let holder = format!("racer-{i}");
                let got = lease(store.as_ref(), id, &holder, Duration::from_secs(60)).await;
                got.then_some(holder)
            }
        })
        .await;
        let holders: Vec<String> = granted.into_iter().flatten().collect();
        assert_eq!(
            holders.len(),
            1,
            "round {round}: exactly one of {RACERS} concurrent lease requests is granted"
        );
        release(node(nodes, 1).as_ref(), id, &holders[0]).await;
    }
}

/// Runs `n` tasks made by `task(i)` at once (they start together, behind a barrier) and
/// collects their outputs in order. A panic in a task is re-raised. For races of your own
/// against a backend, like the ones in this suite.
pub async fn race<T, F, Fut>(n: usize, mut task: F) -> Vec<T>
where
    T: Send + 'static,
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let start = start.clone();
            let work = task(i);
            tokio::spawn(async move {
                start.wait().await;
                work.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for handle in handles {
        match handle.await {
            Ok(value) => out.push(value),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

async fn lease(store: &impl SessionStore, id: SessionId, holder: &str, ttl: Duration) -> bool {
    store
        .acquire_lease(id, holder, ttl)
        .await
        .unwrap_or_else(|e| panic!("acquire_lease: {e:?}"))
}

async fn release(store: &impl SessionStore, id: SessionId, holder: &str) {
    store
        .release_lease(id, holder)
        .await
        .unwrap_or_else(|e| panic!("release_lease: {e:?}"));
}

async fn load(store: &impl SessionStore, id: SessionId) -> SessionRecord {
    match store.load(id).await {
        Ok(Some(record)) => record,
        other => panic!("load of a stored record: {other:?}"),
    }
}

async fn idle_ids(store: &impl SessionStore, cutoff_ms: u64) -> HashSet<SessionId> {
    store
        .list_idle(cutoff_ms)
        .await
        .unwrap_or_else(|e| panic!("list_idle: {e:?}"))
        .into_iter()
        .map(|r| r.id)
        .collect()
}

async fn ids(store: &impl SessionStore) -> HashSet<SessionId> {
    store
        .list()
        .await
        .unwrap_or_else(|e| panic!("list: {e:?}"))
        .into_iter()
        .map(|r| r.id)
        .collect()
}

fn assert_ok(result: Result<(), StoreError>, what: &str) {
    if let Err(error) = result {
        panic!("{what} failed: {error:?}");
    }
}

fn now_ms() -> u64 {
    crate::session::now_ms()
}
