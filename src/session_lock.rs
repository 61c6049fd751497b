//! One packet, sweep step or recovery step at a time per session.
//!
//! Within a process a keyed mutex serializes the work. When the store is shared by several
//! processes ([`SessionStore::is_shared`](crate::store::SessionStore::is_shared)), the holder
//! of the mutex also takes a lease in the store, so that only one node at a time touches a
//! session's staged data. A lease lasts `ttl` and is renewed every third of it while held, so a
//! holder that dies (or loses the store) lets it lapse within `ttl`, and a waiter on another
//! node then takes it over. The record's compare-and-set stays the last line of defence: a
//! holder that lost its lease cannot advance the record over its successor's changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use http::StatusCode;

use crate::keyed_lock::{KeyedGuard, KeyedLock};
use crate::protocol::{Ack, Hresult};
use crate::session::{SessionId, SessionRecord};
use crate::store::{DynStore, Leased, StoreError};

/// First pause between attempts to take a lease another node holds; doubles up to
/// [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(200);
/// Longest a lease is renewed for one holder. Every request is bounded (body idle timeout,
/// store and notification timeouts), so only a stuck one gets here; letting its lease lapse
/// keeps it from wedging the session on every other node, and the record's compare-and-set
/// fences it if it ever wakes up.
const MAX_HOLD: Duration = Duration::from_secs(30 * 60);

/// The session locks of one layer.
pub(crate) struct SessionLocks {
    local: KeyedLock<SessionId>,
    store: Arc<dyn DynStore>,
    /// Whether the store is shared, so leases are needed.
    leased: bool,
    /// This process's name in lease holders.
    node: String,
    /// Makes each acquisition's holder name unique, so a late release of an earlier lease can
    /// never end a later one.
    next: AtomicU64,
    ttl: Duration,
}

/// Why a session could not be locked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    /// Another node held the session's lease for the whole wait.
    #[error("another node is working on the session")]
    Busy,
    /// The store failed while taking the lease.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LockError {
    /// The error Ack: 503 `ERROR_BUSY` (transient) while another node works on the session.
    pub(crate) fn ack(&self) -> Ack {
        match self {
            Self::Busy => Ack::error(StatusCode::SERVICE_UNAVAILABLE, Hresult::BUSY),
            Self::Store(error) => error.ack(),
        }
    }
}

impl SessionLocks {
    pub(crate) fn new(store: Arc<dyn DynStore>, node: Option<&str>, ttl: Duration) -> Self {
        let leased = store.is_shared();
        let node = format!(
            "{}:{}:{}",
            node.unwrap_or("node"),
            std::process::id(),
            SessionId::new().to_string().trim_matches(['{', '}'])
        );
        Self {
            local: KeyedLock::default(),
            store,
            leased,
            node,
            next: AtomicU64::new(0),
            ttl,
        }
    }

    /// Locks session `id` and loads its record (`None`: there is none), waiting for a holder
    /// in this process and, on a shared store, for up to two lease lifetimes for a holder
    /// elsewhere (a dead holder's lease lapses within one). On a shared store, taking the
    /// lease and loading are one store call.
    pub(crate) async fn lock(&self, id: SessionId) -> Result<Locked, LockError> {
        let local = self.local.lock(id).await;
        if !self.leased {
            let record = self.store.load(id).await?;
            return Ok((SessionGuard::local(local), record));
        }
        let holder = self.holder();
        let started = Instant::now();
        let deadline = started + self.ttl * 2;
        let mut pause = FIRST_POLL;
        let mut waited = false;
        loop {
            if let Leased::Granted(record) = self.lease_and_load(id, &holder).await? {
                if waited {
                    crate::metrics::lease_wait(started.elapsed());
                }
                return Ok((self.leased_guard(local, id, holder), record));
            }
            waited = true;
            let now = Instant::now();
            if now >= deadline {
                crate::metrics::lease_wait(started.elapsed());
                return Err(LockError::Busy);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// [`lock`](Self::lock) for background work (sweeps, recovery, deferred commits): a
    /// session another node kept busy for the whole wait is skipped (`None`), to be seen again
    /// at the next pass.
    pub(crate) async fn lock_or_skip(&self, id: SessionId) -> Result<Option<Locked>, StoreError> {
        match self.lock(id).await {
            Ok(guard) => Ok(Some(guard)),
            Err(LockError::Busy) => {
                tracing::debug!(session = %id, "busy on another node; skipped");
                Ok(None)
            }
            Err(LockError::Store(error)) => Err(error),
        }
    }

    /// [`lock`](Self::lock) if nobody holds the session right now, here or on another node.
    pub(crate) async fn try_lock(&self, id: SessionId) -> Result<Option<Locked>, StoreError> {
        let Some(local) = self.local.try_lock(id) else {
            return Ok(None);
        };
        if !self.leased {
            let record = self.store.load(id).await?;
            return Ok(Some((SessionGuard::local(local), record)));
        }
        let holder = self.holder();
        match self.lease_and_load(id, &holder).await? {
            Leased::Granted(record) => Ok(Some((self.leased_guard(local, id, holder), record))),
            Leased::Busy => Ok(None),
        }
    }

    /// Takes the lease and loads the record. A load that fails after the lease was granted
    /// gives the lease back, in the background.
    async fn lease_and_load(&self, id: SessionId, holder: &str) -> Result<Leased, StoreError> {
        let result = self.store.lease_and_load(id, holder, self.ttl).await;
        if result.is_err() {
            // Whether the lease was granted is unknown; a release of one not held is a no-op.
            let store = self.store.clone();
            let holder = holder.to_owned();
            tokio::spawn(async move { drop(store.release_lease(id, &holder).await) });
        }
        result
    }

    fn holder(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.node)
    }

    fn leased_guard(
        &self,
        local: KeyedGuard<SessionId>,
        id: SessionId,
        holder: String,
    ) -> SessionGuard {
        let renewal = tokio::spawn(renew(self.store.clone(), id, holder.clone(), self.ttl));
        SessionGuard {
            local: Some(local),
            lease: Some(Lease {
                store: self.store.clone(),
                id,
                holder,
                renewal,
            }),
        }
    }
}

/// A locked session and its record as loaded under the lock (`None`: there is none).
pub(crate) type Locked = (SessionGuard, Option<SessionRecord>);

/// Keeps a lease alive while its guard lives, for at most [`MAX_HOLD`].
async fn renew(store: Arc<dyn DynStore>, id: SessionId, holder: String, ttl: Duration) {
    let every = ttl / 3;
    let give_up = Instant::now() + MAX_HOLD;
    loop {
        tokio::time::sleep(every).await;
        if Instant::now() >= give_up {
            tracing::warn!(
                session = %id,
                held = ?MAX_HOLD,
                "a request has held the session for too long; its lease is left to lapse"
            );
            return;
        }
        match store.acquire_lease(id, &holder, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(session = %id, "the session's lease lapsed and another node took it");
                return;
            }
            Err(error) => {
                tracing::warn!(session = %id, %error, "cannot renew the session's lease");
            }
        }
    }
}

/// Holds a session: dropped or [released](SessionGuard::release), it lets the next waiter in.
#[must_use = "the session is unlocked when the guard is dropped"]
pub(crate) struct SessionGuard {
    local: Option<KeyedGuard<SessionId>>,
    lease: Option<Lease>,
}

struct Lease {
    store: Arc<dyn DynStore>,
    id: SessionId,
    holder: String,
    renewal: JoinHandle<()>,
}

impl Lease {
    async fn end(self) {
        self.renewal.abort();
        if let Err(error) = self.store.release_lease(self.id, &self.holder).await {
            // It lapses by itself within its ttl.
            tracing::warn!(session = %self.id, %error, "cannot release the session's lease");
        }
    }
}

impl SessionGuard {
    fn local(local: KeyedGuard<SessionId>) -> Self {
        Self {
            local: Some(local),
            lease: None,
        }
    }

    /// Stores `record` by compare-and-set as the holder's last write and, on a shared store,
    /// releases the lease in the same store call
    /// ([`update_and_release`](crate::store::SessionStore::update_and_release)). Afterwards
    /// the guard keeps only this process's lock; after an error it still holds the lease, and
    /// [`release`](Self::release) lets it go.
    pub(crate) async fn update_and_release(
        &mut self,
        store: &dyn DynStore,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        let Some(lease) = &self.lease else {
            return store.update(expected, record).await;
        };
        // A renewal must not take the lease again once it is released.
        lease.renewal.abort();
        store
            .update_and_release(expected, record, &lease.holder)
            .await?;
        self.lease = None;
        Ok(())
    }

    /// Releases the lease before returning, so that the client's next packet, which may go
    /// to another node, finds the session free.
    pub(crate) async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.end().await;
        }
        drop(self.local.take());
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        // Dropped without `release` (an error path, or the request was cancelled): release in
        // the background, keeping this process's waiters out until it is done.
        let local = self.local.take();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    lease.end().await;
                    drop(local);
                });
            }
            Err(_) => lease.renewal.abort(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SessionStore as S};

    /// A memory store that claims to be shared, so its (real) leases are used.
    struct Shared(MemoryStore);

    impl crate::store::SessionStore for Shared {
        async fn create(&self, r: &crate::session::SessionRecord) -> Result<(), StoreError> {
            S::create(&self.0, r).await
        }
        async fn load(
            &self,
            id: SessionId,
        ) -> Result<Option<crate::session::SessionRecord>, StoreError> {
            S::load(&self.0, id).await
        }
        async fn update(
            &self,
            expected: u64,
            r: &crate::session::SessionRecord,
        ) -> Result<(), StoreError> {
            S::update(&self.0, expected, r).await
        }
        async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
            S::remove(&self.0, id).await
        }
        async fn list(&self) -> Result<Vec<crate::session::SessionRecord>, StoreError> {
            S::list(&self.0).await
        }
        fn is_shared(&self) -> bool {
            true
        }
        async fn acquire_lease(
            &self,
            id: SessionId,
            holder: &str,
            ttl: Duration,
        ) -> Result<bool, StoreError> {
            S::acquire_lease(&self.0, id, holder, ttl).await
        }
        async fn release_lease(&self, id: SessionId, holder: &str) -> Result<(), StoreError> {
            S::release_lease(&self.0, id, holder).await
        }
    }

    fn two_nodes(ttl: Duration) -> (SessionLocks, SessionLocks) {
        let store: Arc<dyn DynStore> = Arc::new(Shared(MemoryStore::new()));
        (
            SessionLocks::new(store.clone(), Some("a"), ttl),
            SessionLocks::new(store, Some("b"), ttl),
        )
    }

    #[tokio::test]
    async fn a_lease_excludes_other_nodes_until_released() {
        let (a, b) = two_nodes(Duration::from_secs(30));
        let id = SessionId::new();
        let (held, _) = a.lock(id).await.unwrap();
        assert!(b.try_lock(id).await.unwrap().is_none());
        held.release().await;
        let taken = b.try_lock(id).await.unwrap().expect("free after release");
        assert!(a.try_lock(id).await.unwrap().is_none());
        drop(taken);
        // A dropped guard releases in the background.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(a.try_lock(id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lease_when_it_is_released() {
        let (a, b) = two_nodes(Duration::from_secs(30));
        let id = SessionId::new();
        let (held, _) = a.lock(id).await.unwrap();
        let waiter = tokio::spawn(async move {
            let started = Instant::now();
            let guard = b.lock(id).await.map(|_| ());
            (guard, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        held.release().await;
        let (got, waited) = waiter.await.unwrap();
        got.unwrap();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn the_last_update_releases_the_lease_and_the_next_holder_sees_it() {
        let (a, b) = two_nodes(Duration::from_secs(30));
        let record = crate::store::tests::record("handoff.bin");
        let id = record.id;
        a.store.create(&record).await.unwrap();
        let (mut held, loaded) = a.lock(id).await.unwrap();
        let mut next = loaded.expect("the record is loaded with the lock");
        next.revision = 1;
        next.received = 7;
        held.update_and_release(a.store.as_ref(), 0, &next)
            .await
            .unwrap();
        let (taken, seen) = b
            .try_lock(id)
            .await
            .unwrap()
            .expect("the lease went with the update");
        assert_eq!(seen.map(|r| r.received), Some(7));
        assert!(held.lease.is_none(), "the guard keeps only the local lock");
        // The first holder's unlock makes no store call that could end the second's lease.
        held.release().await;
        assert!(a.try_lock(id).await.unwrap().is_none(), "b still holds it");
        taken.release().await;
    }

    #[tokio::test]
    async fn a_live_holder_renews_and_a_dead_one_lapses() {
        let ttl = Duration::from_millis(300);
        let (a, b) = two_nodes(ttl);
        let id = SessionId::new();
        let (held, _) = a.lock(id).await.unwrap();
        tokio::time::sleep(ttl * 3).await;
        assert!(
            b.try_lock(id).await.unwrap().is_none(),
            "renewed while held"
        );
        // A holder that dies stops renewing: simulate by stopping renewal and forgetting the
        // guard without a release.
        let mut held = held;
        if let Some(lease) = held.lease.take() {
            lease.renewal.abort();
        }
        drop(held);
        let started = Instant::now();
        let (taken, _) = b.lock(id).await.expect("taken over after the ttl");
        assert!(started.elapsed() <= ttl * 2, "{:?}", started.elapsed());
        taken.release().await;
    }

    #[tokio::test]
    async fn a_holder_that_never_lets_go_makes_waiters_busy_not_hung() {
        let ttl = Duration::from_millis(200);
        let (a, b) = two_nodes(ttl);
        let id = SessionId::new();
        let _held = a.lock(id).await.unwrap();
        let started = Instant::now();
        assert!(matches!(b.lock(id).await, Err(LockError::Busy)));
        let waited = started.elapsed();
        assert!(
            waited >= ttl * 2 && waited < ttl * 2 + Duration::from_secs(1),
            "{waited:?}"
        );
    }
}
