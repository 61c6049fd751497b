//! Where session records live: the [`SessionStore`] trait and its built-in backends.
//!
//! A store keeps [`SessionRecord`]s and must make two operations atomic, because several
//! requests (and, with shared backends, several processes) may touch one session:
//!
//! * **create-if-absent**: [`SessionStore::create`] fails if the id exists, or if another
//!   session that [holds its destination](SessionRecord::holds_destination) already uses the
//!   same destination;
//! * **compare-and-set**: [`SessionStore::update`] replaces a record only if the stored
//!   revision still equals the one the caller read. This is how the received offset advances
//!   without lost updates; a plain get/put pair would lose them.
//!
//! # Implementing a store
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use axum_bits::session::{SessionId, SessionRecord};
//! use axum_bits::store::{SessionStore, StoreError};
//!
//! #[derive(Default)]
//! struct MyStore(Mutex<HashMap<SessionId, SessionRecord>>);
//!
//! impl SessionStore for MyStore {
//!     async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
//!         let mut map = self.0.lock().unwrap();
//!         if map.contains_key(&record.id) {
//!             return Err(StoreError::AlreadyExists);
//!         }
//!         if let Some(holder) = map.values().find(|r| {
//!             r.holds_destination() && r.destination == record.destination
//!         }) {
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
//! let layer = axum_bits::BitsLayer::builder(std::env::temp_dir().join("doc-custom-store"))
//!     .store(MyStore::default())
//!     .build()
//!     .unwrap();
//! # drop(layer);
//! ```

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod file;
mod index;
mod local_leases;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::future::Future;
use std::time::Duration;

use http::StatusCode;

#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
pub use file::FileStore;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

use crate::protocol::{Ack, Hresult};
use crate::session::{Owner, SessionId, SessionRecord};

/// Keeps session records. See the [module docs](self) for the atomicity contract.
///
/// Methods are written as `fn .. -> impl Future + Send`; implement them with `async fn`.
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new record.
    ///
    /// Fails with [`StoreError::AlreadyExists`] if the id is taken and with
    /// [`StoreError::DestinationBusy`] if another record that holds its destination has the
    /// same `destination`. Both checks and the insert are one atomic step.
    fn create(&self, record: &SessionRecord)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The record for `id`, if any.
    fn load(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Replaces the record with `record.id` if its stored revision equals `expected`
    /// (compare-and-set); otherwise [`StoreError::Conflict`], or [`StoreError::NotFound`] if
    /// there is none. The caller bumps `record.revision`. The layer never makes a record claim
    /// a destination it did not hold before; a store may refuse such an update with
    /// [`StoreError::DestinationBusy`] if another session holds it.
    fn update(
        &self,
        expected: u64,
        record: &SessionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the record; `Ok(false)` if there was none.
    fn remove(&self, id: SessionId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every record, open sessions and tombstones alike (used by the expiry sweeper).
    fn list(&self) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send;

    /// How many sessions are open. The default counts [`SessionStore::list`]; backends with
    /// an index should answer directly.
    fn count_open(&self) -> impl Future<Output = Result<usize, StoreError>> + Send {
        async move { Ok(self.list().await?.iter().filter(|r| r.is_open()).count()) }
    }

    /// How many sessions of `owner` are open. The default counts [`SessionStore::list`].
    fn count_open_for(
        &self,
        owner: &Owner,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        async move {
            let records = self.list().await?;
            Ok(records.iter().filter(|r| r.is_open_for(owner)).count())
        }
    }

    /// Records whose last successful packet is older than `cutoff_ms` (their `updated_ms` is
    /// less than it), open sessions and tombstones alike: the candidates for expiry. The
    /// default filters [`SessionStore::list`]; backends with an index should query it.
    fn list_idle(
        &self,
        cutoff_ms: u64,
    ) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send {
        async move {
            let mut records = self.list().await?;
            records.retain(|r| r.is_idle_since(cutoff_ms));
            Ok(records)
        }
    }

    /// Records of ended sessions (closed or cancelled: the tombstones, and any whose deferred
    /// commit still runs). The layer reads them to keep the tombstones within their limits
    /// ([`max_tombstones`](crate::BitsLayerBuilder::max_tombstones)), forgetting the oldest
    /// with [`remove`](SessionStore::remove). The default filters [`SessionStore::list`];
    /// backends with an index should query it.
    fn list_ended(&self) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send {
        async move {
            let mut records = self.list().await?;
            records.retain(|r| !r.is_open());
            Ok(records)
        }
    }

    /// Whether other processes may use the same records at the same time (a database or a
    /// Redis server that a farm of nodes shares). If so, the layer guards every packet, sweep
    /// and recovery step of a session with a lease ([`SessionStore::acquire_lease`]), so that
    /// only one node at a time touches a session's staged data. The default is `false`: one
    /// process owns the store, and an in-process lock is enough.
    fn is_shared(&self) -> bool {
        false
    }

    /// Takes, or renews, the lease on session `id` for `holder`, for `ttl` from now.
    ///
    /// Returns `true` if `holder` holds the lease afterwards: there was none, it had expired,
    /// or `holder` already held it (then its expiry moves to `ttl` from now). Returns `false`
    /// if another holder's lease has not expired. Checking and taking are one atomic step
    /// across every process that shares the store. The lease is independent of the record:
    /// one may be taken for an id that has no record, and updates of the record leave it
    /// alone. Backends with a clock of their own (a database server) should measure expiry
    /// by it, so that nodes' clocks need not agree.
    ///
    /// A store whose [`is_shared`](SessionStore::is_shared) is `true` must implement this;
    /// the default grants every lease, which is right only for a store one process owns.
    fn acquire_lease(
        &self,
        id: SessionId,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (id, holder, ttl);
        async { Ok(true) }
    }

    /// Ends `holder`'s lease on `id`, if `holder` still holds it; a lease that expired and was
    /// taken by another holder is left alone. The default does nothing.
    fn release_lease(
        &self,
        id: SessionId,
        holder: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (id, holder);
        async { Ok(()) }
    }

    /// Makes every write so far durable and releases the backend's resources. Called once,
    /// at the end of [`BitsHandle::shutdown`](crate::BitsHandle::shutdown); the store may
    /// refuse operations afterwards. The default does nothing.
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}

/// A shared store is a store: the layer can use one `Arc` while the application keeps another
/// (to look at records, or to give two layers one store).
impl<S: SessionStore> SessionStore for std::sync::Arc<S> {
    fn create(
        &self,
        record: &SessionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::create(self, record)
    }
    fn load(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send {
        S::load(self, id)
    }
    fn update(
        &self,
        expected: u64,
        record: &SessionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::update(self, expected, record)
    }
    fn remove(&self, id: SessionId) -> impl Future<Output = Result<bool, StoreError>> + Send {
        S::remove(self, id)
    }
    fn list(&self) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send {
        S::list(self)
    }
    fn count_open(&self) -> impl Future<Output = Result<usize, StoreError>> + Send {
        S::count_open(self)
    }
    fn count_open_for(
        &self,
        owner: &Owner,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        S::count_open_for(self, owner)
    }
    fn list_idle(
        &self,
        cutoff_ms: u64,
    ) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send {
        S::list_idle(self, cutoff_ms)
    }
    fn list_ended(&self) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send {
        S::list_ended(self)
    }
    fn is_shared(&self) -> bool {
        S::is_shared(self)
    }
    fn acquire_lease(
        &self,
        id: SessionId,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        S::acquire_lease(self, id, holder, ttl)
    }
    fn release_lease(
        &self,
        id: SessionId,
        holder: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::release_lease(self, id, holder)
    }
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::close(self)
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `create` with an id that exists.
    #[error("a session with this id already exists")]
    AlreadyExists,
    /// `create` for a destination another open session is uploading.
    #[error("the destination is being uploaded by session {holder}")]
    DestinationBusy {
        /// The session holding the destination.
        holder: SessionId,
    },
    /// `update` lost a race: the record changed since it was read.
    #[error("the session record changed concurrently")]
    Conflict,
    /// `update` of a record that does not exist.
    #[error("no such session record")]
    NotFound,
    /// The backend failed (I/O, connection, serialization).
    #[error("session store backend failed")]
    Backend(#[source] crate::BoxError),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(error: impl Into<crate::BoxError>) -> Self {
        Self::Backend(error.into())
    }

    /// The Ack for this error: 409 for a busy destination (transient), 500 +
    /// `BG_E_SESSION_NOT_FOUND` for a vanished record, and a transient 500 otherwise (disk
    /// full gets its own HRESULT).
    pub fn ack(&self) -> Ack {
        let (status, code) = match self {
            Self::DestinationBusy { .. } => (StatusCode::CONFLICT, Hresult::SHARING_VIOLATION),
            Self::NotFound => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Hresult::BG_E_SESSION_NOT_FOUND,
            ),
            Self::Backend(e) if crate::fs::is_disk_full(e.as_ref()) => {
                (StatusCode::INTERNAL_SERVER_ERROR, Hresult::DISK_FULL)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, Hresult::E_FAIL),
        };
        Ack::error(status, code)
    }

    /// Whether the store, not the client, is at fault (worth an error log).
    pub(crate) fn is_server_fault(&self) -> bool {
        matches!(self, Self::Backend(_) | Self::Conflict)
    }
}

/// Object-safe mirror of [`SessionStore`], so the layer can hold any store behind one type.
pub(crate) trait DynStore: Send + Sync {
    fn create<'a>(&'a self, record: &'a SessionRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    fn load(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;
    fn update<'a>(
        &'a self,
        expected: u64,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn remove(&self, id: SessionId) -> BoxFuture<'_, Result<bool, StoreError>>;
    fn list(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;
    fn count_open(&self) -> BoxFuture<'_, Result<usize, StoreError>>;
    fn count_open_for<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<usize, StoreError>>;
    fn list_idle(&self, cutoff_ms: u64) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;
    fn list_ended(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;
    fn is_shared(&self) -> bool;
    fn acquire_lease<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn release_lease<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

pub(crate) use crate::BoxFuture;

impl<T: SessionStore> DynStore for T {
    fn create<'a>(&'a self, record: &'a SessionRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(SessionStore::create(self, record))
    }
    fn load(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        Box::pin(SessionStore::load(self, id))
    }
    fn update<'a>(
        &'a self,
        expected: u64,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(SessionStore::update(self, expected, record))
    }
    fn remove(&self, id: SessionId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(SessionStore::remove(self, id))
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(SessionStore::list(self))
    }
    fn count_open(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(SessionStore::count_open(self))
    }
    fn count_open_for<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(SessionStore::count_open_for(self, owner))
    }
    fn list_idle(&self, cutoff_ms: u64) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(SessionStore::list_idle(self, cutoff_ms))
    }
    fn list_ended(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(SessionStore::list_ended(self))
    }
    fn is_shared(&self) -> bool {
        SessionStore::is_shared(self)
    }
    fn acquire_lease<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(SessionStore::acquire_lease(self, id, holder, ttl))
    }
    fn release_lease<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(SessionStore::release_lease(self, id, holder))
    }
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(SessionStore::close(self))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::session::{SessionId, SessionRecord};

    pub(crate) fn record(dest: &str) -> SessionRecord {
        SessionRecord::new(SessionId::new(), dest.into(), format!("/{dest}"), None, 1)
    }
}
