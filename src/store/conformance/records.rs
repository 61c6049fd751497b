//! The checks one task runs against a store: what a record keeps, creates, destination
//! claims, compare-and-set, removal, counts, listings and leases.

use std::time::Duration;

use super::{assert_ok, fresh_record, idle_ids, ids, lease, load, now_ms, release};
use crate::session::{
    DeferredState, DeferredStatus, Event, EventKind, Outcome, Owner, Phase, SessionId,
    SessionRecord, StoredReply,
};
use crate::store::{SessionStore, StoreError};

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

/// An open session holds its destination; committing, closing, cancelling or removing it
/// releases it; sessions that do not claim (upload-reply) never conflict, not even with a
/// session that holds their destination.
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
    // Only a record that holds its destination is refused for it.
    let mut reply = fresh_record("app");
    reply.destination = claiming.destination.clone();
    reply.claims_destination = false;
    assert_ok(
        store.create(&reply).await,
        "create of a session that does not claim, while another holds its destination",
    );
    replies.push(reply.id);
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

/// The two calls of a packet on a shared store: [`lease_and_load`] grants the lease as
/// `acquire_lease` does and then reads the record, and [`update_and_release`] is the
/// compare-and-set of `update` after which the holder's lease is gone.
///
/// [`lease_and_load`]: SessionStore::lease_and_load
/// [`update_and_release`]: SessionStore::update_and_release
pub async fn leased_updates(store: &impl SessionStore) {
    use crate::store::Leased;
    let long = Duration::from_secs(60);
    let record = fresh_record("leased.bin");
    assert_ok(store.create(&record).await, "create");
    let id = record.id;
    let take = |holder: &'static str| async move {
        store
            .lease_and_load(id, holder, long)
            .await
            .unwrap_or_else(|e| panic!("lease_and_load: {e:?}"))
    };

    let Leased::Granted(Some(loaded)) = take("node-a").await else {
        panic!("lease_and_load of a free lease grants it and loads the record");
    };
    assert_eq!(loaded.revision, 0, "the record as stored");
    assert!(
        matches!(take("node-b").await, Leased::Busy),
        "a held lease is refused to another holder"
    );
    assert!(
        !lease(store, id, "node-b", long).await,
        "lease_and_load's lease excludes acquire_lease too"
    );
    assert!(
        matches!(take("node-a").await, Leased::Granted(Some(_))),
        "the holder may renew its lease with lease_and_load"
    );

    let mut next = loaded.clone();
    next.revision = 1;
    next.received = 10;
    assert!(
        matches!(
            store.update_and_release(5, &next, "node-a").await,
            Err(StoreError::Conflict)
        ),
        "update_and_release with a stale revision is a conflict"
    );
    assert_eq!(
        load(store, id).await.revision,
        0,
        "a conflict changes nothing"
    );
    // After an error the lease may or may not be held: the layer releases it itself.
    release(store, id, "node-a").await;
    assert!(
        matches!(take("node-a").await, Leased::Granted(Some(_))),
        "lease taken again"
    );
    assert_ok(
        store.update_and_release(0, &next, "node-a").await,
        "update_and_release under the lease",
    );
    let Leased::Granted(Some(seen)) = take("node-b").await else {
        panic!("after update_and_release the lease is free for another holder");
    };
    assert_eq!(
        (seen.revision, seen.received),
        (1, 10),
        "the next holder loads the update"
    );

    // The release is the holder's: an update by a holder whose lease lapsed and was taken
    // over leaves the new holder's lease alone (the compare-and-set still decides the record).
    let mut late = seen.clone();
    late.revision = 2;
    late.received = 20;
    assert_ok(
        store.update_and_release(1, &late, "node-a").await,
        "update_and_release by a holder that lost its lease",
    );
    assert!(
        matches!(take("node-c").await, Leased::Busy),
        "another holder's update_and_release leaves the lease alone"
    );
    release(store, id, "node-b").await;

    let mut gone = late.clone();
    gone.id = SessionId::new();
    assert!(
        matches!(
            store.update_and_release(2, &gone, "node-a").await,
            Err(StoreError::NotFound)
        ),
        "update_and_release of a record that is not stored"
    );
    let ghost = SessionId::new();
    assert!(
        matches!(
            store.lease_and_load(ghost, "node-a", long).await,
            Ok(Leased::Granted(None))
        ),
        "lease_and_load of an id without a record grants the lease and loads nothing"
    );
    release(store, ghost, "node-a").await;
    store.remove(id).await.ok();
}
