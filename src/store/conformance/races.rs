//! The checks many tasks run at once, on one store or spread over several instances of a
//! shared one: creates, compare-and-sets and leases stay atomic.

use std::sync::Arc;
use std::time::Duration;

use super::{RACERS, assert_ok, fresh_record, lease, load, node, release};
use crate::session::SessionId;
use crate::store::{SessionStore, StoreError};

/// Many tasks create sessions at once: for one destination exactly one wins and the others
/// are told who holds it; for one id exactly one wins.
pub async fn concurrent_creates<S: SessionStore>(store: Arc<S>) {
    creates_across(&[store]).await;
}

/// [`concurrent_creates`] with the tasks spread over `nodes`.
pub(super) async fn creates_across<S: SessionStore>(nodes: &[Arc<S>]) {
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
pub(super) async fn compare_and_set_across<S: SessionStore>(nodes: &[Arc<S>]) {
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

/// Many holders ask for one lease at once: exactly one gets it.
pub async fn concurrent_leases<S: SessionStore>(store: Arc<S>) {
    leases_across(&[store]).await;
}

/// [`concurrent_leases`] with the requests spread over `nodes`.
pub(super) async fn leases_across<S: SessionStore>(nodes: &[Arc<S>]) {
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

/// Many tasks hand one session from holder to holder as packets do on a shared store: take
/// the lease and load ([`lease_and_load`](SessionStore::lease_and_load)), advance the record,
/// update and release ([`update_and_release`](SessionStore::update_and_release)). Since only
/// the holder writes and each holder loads what the previous one stored, no update ever
/// conflicts, and none is lost.
pub async fn lease_handoffs<S: SessionStore>(store: Arc<S>) {
    lease_handoffs_across(&[store]).await;
}

/// [`lease_handoffs`] with the tasks spread over `nodes`.
pub(super) async fn lease_handoffs_across<S: SessionStore>(nodes: &[Arc<S>]) {
    use crate::store::Leased;
    const ROUNDS: u64 = 10;
    let record = fresh_record("handoff.bin");
    assert_ok(nodes[0].create(&record).await, "create");
    let id = record.id;
    race(RACERS, |i| {
        let store = node(nodes, i);
        async move {
            let holder = format!("handoff-{i}");
            for _ in 0..ROUNDS {
                let current = loop {
                    match store
                        .lease_and_load(id, &holder, Duration::from_secs(60))
                        .await
                    {
                        Ok(Leased::Granted(Some(record))) => break record,
                        Ok(Leased::Granted(None)) => panic!("the record vanished under a lease"),
                        Ok(Leased::Busy) => tokio::time::sleep(Duration::from_millis(1)).await,
                        Err(e) => panic!("lease_and_load in a hand-off race: {e:?}"),
                    }
                };
                let mut next = current.clone();
                next.revision += 1;
                next.received += 1;
                if let Err(e) = store
                    .update_and_release(current.revision, &next, &holder)
                    .await
                {
                    panic!(
                        "update_and_release by the lease's holder after lease_and_load: {e:?} \
                         (a conflict means the record was read from before the lease)"
                    );
                }
            }
        }
    })
    .await;
    let last = load(node(nodes, 1).as_ref(), id).await;
    let total = RACERS as u64 * ROUNDS;
    assert_eq!(
        (last.revision, last.received),
        (total, total),
        "every hand-off's update was kept"
    );
    nodes[0].remove(id).await.ok();
}
