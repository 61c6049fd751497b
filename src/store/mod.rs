//! Where session records live: the [`SessionStore`] trait, its built-in backends, and how a
//! farm of nodes shares them.
//!
//! A store keeps [`SessionRecord`]s (id, destination, total, received offset, phase). Several
//! requests (and, with a shared backend, several processes) may touch one session, so the
//! layer needs two operations to be atomic: create-if-absent, which also keeps one open
//! session per destination, and compare-and-set of a record's revision, because a plain
//! get/put pair loses updates. The [contract](SessionStore#contract) is stated once, on the
//! trait; the `conformance` suite (feature `conformance`) checks it.
//!
//! The bytes of open sessions are not in the store: they are in the
//! [`Staging`](crate::staging::Staging), whose part files are the truth about what arrived.
//!
//! # Built-in stores
//!
//! | Store | Feature | Survives a restart | Shared by several nodes |
//! |---|---|---|---|
//! | [`MemoryStore`] | — | no | no |
//! | [`FileStore`] (the default: one JSON file per session in `ROOT/.bits/sessions`, written atomically) | — | yes | no |
//! | `SqliteStore::open(path)` | `sqlite` | yes | processes on one host |
//! | `PostgresStore::connect(url)` | `postgres` | yes | yes |
//! | `RedisStore::connect(url)` | `redis` | with Redis persistence (AOF) | yes |
//!
//! The drivers are re-exported (`axum_bits::sqlx`, `axum_bits::redis`) so that your versions
//! agree; each backend's `migrate()` creates its tables (or loads its scripts) and is safe to
//! run from every node at once. Give a store to the layer with
//! [`BitsLayerBuilder::store`](crate::BitsLayerBuilder::store).
//!
//! # Implementing a store
//!
//! Implement the five required methods with `async fn`, keeping the
//! [contract](SessionStore#contract); `examples/custom_store.rs` in the repository is a fuller
//! example than this one:
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
//!         // Only a record that holds its destination can be refused for it.
//!         let holder = map.values().find(|r| {
//!             record.holds_destination()
//!                 && r.holds_destination()
//!                 && r.destination == record.destination
//!         });
//!         if let Some(holder) = holder {
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
//!
//! Then prove it with the `store::conformance` suite (feature `conformance`), which every built-in
//! store passes, including 16 tasks racing creates, compare-and-sets and leases:
//! `axum_bits::store::conformance::run(Arc::new(MyStore::default())).await` in a test.
//!
//! # Running a farm
//!
//! When one machine is not enough, run several nodes behind a load balancer. Three topologies
//! work.
//!
//! **Shared state: any node serves any packet.** Every node uses one shared store
//! (`PostgresStore` or `RedisStore`; `SqliteStore` for several processes on one host) and the
//! same upload root, on storage every node mounts. The load balancer needs no affinity. With
//! the example server:
//!
//! ```text
//! # on every node
//! cargo run --release --features postgres --example server -- \
//!     --listen 0.0.0.0:8080 --root /mnt/uploads --store postgres://bits@db.internal/bits
//! ```
//!
//! Every packet takes a lease on its session in the store
//! ([`SessionStore::acquire_lease`]) before it touches the session's data, and releases it
//! before its Ack, so the client's next packet, on whichever node, finds the session free.
//! While a packet runs, its node renews the lease every third of
//! [`lease_ttl`](crate::BitsLayerBuilder::lease_ttl) (10 s). A packet for a session another
//! node holds waits for it, up to twice `lease_ttl`, then gets 503 `0x800700AA` (busy; the
//! client retries). The compare-and-set of the record's revision stays the last line of
//! defence: a node that lost its lease cannot move the record over its successor's changes.
//!
//! What every node must share:
//!
//! | What | Where | Why |
//! |---|---|---|
//! | session records | the store | any node answers any packet |
//! | parts and finished files | the upload root (parts in `ROOT/.bits/parts`, on the destinations' filesystem) | any node appends to a part; the commit is a link or rename within one filesystem |
//! | replies (upload-reply) | `ROOT/.bits/replies`, or [`replies_dir`](crate::BitsLayerBuilder::replies_dir) | any node serves a reply URL |
//! | configuration | the same builder options everywhere | prefix, limits, timeouts and commit point decide answers |
//!
//! **Shared store and bucket: no shared filesystem.** With
//! [`S3Staging`](crate::staging::S3Staging) (feature `s3`) the parts of open uploads and the
//! finished files live in an S3-compatible bucket, and every node keeps a local root of its
//! own. Any node serves any packet; a fragment's bytes are in the bucket before its Ack, so a
//! node that dies is taken over by the next one the client reaches. With the example server:
//!
//! ```text
//! # on every node (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION set)
//! cargo run --release --features postgres,s3 --example server -- \
//!     --listen 0.0.0.0:8080 --root /var/lib/bits --store postgres://bits@db.internal/bits \
//!     --staging s3://uploads/inbox --s3-endpoint http://s3.internal:9000
//! ```
//!
//! | What | Where | Why |
//! |---|---|---|
//! | session records | the store | any node answers any packet |
//! | parts and finished files | the bucket, under the prefix (`PREFIX/.bits/staging/<session>/`, destinations at `PREFIX/<url path>`) | any node continues or commits an upload |
//! | a local root | each node's own disk | upload-reply copies (and the records of a `FileStore`, which a farm does not use); nothing another node needs |
//! | replies (upload-reply) | the reply folder of the node that asked the application | set [`host_id`](crate::BitsLayerBuilder::host_id) so that the client fetches the reply there |
//! | configuration | the same builder options and the same bucket, prefix and part size everywhere | every node reads the same layout |
//!
//! Set a lifecycle rule on the bucket that aborts incomplete multipart uploads after a few
//! days (see [`S3Staging`](crate::staging::S3Staging), "What a crash leaves behind").
//!
//! **Affinity: no shared storage.** Each node has its own root and its own store, and
//! [`host_id("node7.example.com")`](crate::BitsLayerBuilder::host_id) names it: the
//! Create-Session Ack carries `BITS-Host-Id` and the client sends the rest of the session to
//! that host. The header carries a host only (the client keeps the scheme and port), so every
//! node must serve the same port, and with TLS the certificate must cover every node name.
//! With [`host_id_fallback_timeout(..)`](crate::BitsLayerBuilder::host_id_fallback_timeout) a
//! client that cannot reach its node for that long goes back to the original URL, gets
//! `BG_E_SESSION_NOT_FOUND` from another node and starts the file again; without it, it never
//! falls back.
//!
//! **What a store costs.** A Fragment in the middle of an upload costs a shared store two
//! round trips when the store answers
//! [`lease_and_load`](SessionStore::lease_and_load) and
//! [`update_and_release`](SessionStore::update_and_release) in one each, as `PostgresStore`
//! and `RedisStore` do (a store that keeps the defaults costs four). With
//! [hooks](crate::BitsLayerBuilder::hooks) the Fragment's event delivery adds one, and the last
//! Fragment, Create-Session and Close-Session take a few more. `cargo bench --bench farm --features sqlite,postgres,redis`
//! measures fragments per second for every store on one node and two; `benches/README.md` in
//! the repository has the last recorded numbers. On machines of their own, nodes add CPU, and
//! the store is the shared bottleneck.
//!
//! **Failure modes.**
//! * *A node dies mid-fragment.* Its lease lapses within `lease_ttl`; the client's retry, on
//!   any node, waits for that and resumes from the last acknowledged byte. Bytes the dead node
//!   wrote beyond its last record are overwritten by the resent fragment.
//! * *A node loses the store but keeps running.* It cannot renew; once its lease lapses
//!   another node may take the session, and the lost node's record update fails its
//!   compare-and-set, so that node answers with an error and the record stays consistent. A
//!   write it had in flight lands at the file offsets the client gave it, that is, the same
//!   bytes the next holder writes.
//! * *The store is down.* Every packet gets 500 `0x80004005`, which is transient: clients
//!   retry and resume. What was acknowledged is in the store if the store is durable
//!   (PostgreSQL commits; Redis only with AOF persistence).
//! * *The shared filesystem is down or full.* 500, transient (`0x80070070` when full).
//! * *Clocks.* PostgreSQL and Redis measure leases by their own clock. Session expiry compares
//!   each node's clock with the time a packet was recorded, so keep nodes on NTP.
//! * *Limits.* [`max_sessions`](crate::BitsLayerBuilder::max_sessions) and
//!   [`max_sessions_per_owner`](crate::BitsLayerBuilder::max_sessions_per_owner) are counted,
//!   then the session is created; with N nodes creating at the same moment a limit can be
//!   overshot by up to N − 1.
//! * *Background work.* Run the [`Sweeper`](crate::Sweeper) on every node, or on one: sweeps,
//!   deferred commits and the start-up recovery take the same leases, so they never touch a
//!   session a packet is using. Hook events are delivered at least once, and after a
//!   fail-over possibly by two nodes.
//! * *Disabling uploads.* [`disable_uploads()`](crate::BitsHandle::disable_uploads) on one
//!   node answers 501 on that node and deletes the prefix's sessions from the shared store, so
//!   other nodes then answer `BG_E_SESSION_NOT_FOUND`: disable every node.

#[cfg(any(test, feature = "conformance"))]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
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
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisStore;
pub use file::FileStore;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteStore;

use crate::protocol::{Ack, Hresult};
use crate::session::{Owner, SessionId, SessionRecord};

/// Keeps session records; the [module docs](self) list the built-in stores and show one
/// implemented.
///
/// Methods are written as `fn .. -> impl Future + Send`; implement them with `async fn`.
///
/// # Contract
///
/// This is the one statement of what a store must do; the `store::conformance` suite
/// (feature `conformance`) checks every rule, and every built-in store passes it.
///
/// * **[`create`](Self::create) is create-if-absent, in one atomic step with the insert.** It
///   fails with [`StoreError::AlreadyExists`] if a record with the id is stored. If the new
///   record [holds its destination](SessionRecord::holds_destination), it fails with
///   [`StoreError::DestinationBusy`] naming the holder when another stored record that holds
///   its destination has the same `destination`. A record that does not hold its destination
///   (an upload-reply session, [`claims_destination`](SessionRecord::claims_destination)
///   `false`: its URL names an application, not a file) is never refused for its
///   destination, whoever holds it, and never keeps another record from it.
/// * **A record holds its destination** while it claims it, its file is not committed, and it
///   is open or has a pending deferred commit. Committing, closing or cancelling the session
///   (without a pending deferred commit), no longer claiming, or removing the record frees
///   the destination for the next `create`.
/// * **[`update`](Self::update)`(expected, record)` is a compare-and-set**: it replaces the
///   record only if the stored `revision` equals `expected`, otherwise
///   [`StoreError::Conflict`] ([`StoreError::NotFound`] if there is none). This is how the
///   received offset advances without lost updates.
/// * [`remove`](Self::remove), [`load`](Self::load) and [`list`](Self::list) are plain;
///   [`count_open`](Self::count_open), [`count_open_for`](Self::count_open_for),
///   [`list_idle`](Self::list_idle) and [`list_ended`](Self::list_ended) have defaults built
///   on `list` (answer them from an index if you have one).
/// * **A store that several processes share says so** ([`is_shared`](Self::is_shared)) and
///   implements [`acquire_lease`](Self::acquire_lease) and
///   [`release_lease`](Self::release_lease): a lease is exclusive, renewable by its holder,
///   and lapses after its ttl. Creates, compare-and-sets and leases are then atomic across
///   every process (`store::conformance::races_across` checks that with several instances).
/// * **Each packet of a shared store's session costs two calls**:
///   [`lease_and_load`](Self::lease_and_load) at its start and, for a Fragment in the middle
///   of an upload, [`update_and_release`](Self::update_and_release) at its end. Their
///   defaults call the four methods above one after another; a store that can should answer
///   each in one round trip, keeping the rules above: `lease_and_load` reads the record only
///   once the lease is granted, so it sees every update made under earlier leases, and
///   `update_and_release` is the same compare-and-set as `update`, after which the lease is
///   gone if the update succeeded. Handing a session from holder to holder this way never
///   meets a conflict (`store::conformance::lease_handoffs` checks that, and
///   `races_across` across instances).
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new record: create-if-absent, refusing a taken id
    /// ([`StoreError::AlreadyExists`]) and, for a record that holds its destination, a
    /// destination another record holds ([`StoreError::DestinationBusy`]); see the
    /// [contract](Self#contract).
    fn create(&self, record: &SessionRecord)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The record for `id`, if any.
    fn load(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Replaces the record with `record.id` if its stored revision equals `expected`
    /// (compare-and-set); otherwise [`StoreError::Conflict`], or [`StoreError::NotFound`] if
    /// there is none. The caller bumps `record.revision`. The layer never makes a record hold
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

    /// Takes or renews the lease on session `id` for `holder`, as
    /// [`acquire_lease`](Self::acquire_lease) does, and if it is granted, loads the record.
    ///
    /// The record must be read after the lease was granted, so that it holds every update
    /// made under earlier leases (in a database: not from a snapshot taken before the lease
    /// was waited for). The default calls `acquire_lease`, then [`load`](Self::load): two
    /// round trips, where a shared store should need one.
    fn lease_and_load(
        &self,
        id: SessionId,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Leased, StoreError>> + Send {
        async move {
            if !self.acquire_lease(id, holder, ttl).await? {
                return Ok(Leased::Busy);
            }
            Ok(Leased::Granted(self.load(id).await?))
        }
    }

    /// [`update`](Self::update)`(expected, record)` and, if it succeeds,
    /// [`release_lease`](Self::release_lease)`(record.id, holder)`: the last write of a packet.
    ///
    /// `Ok` means the record was replaced and `holder`'s lease is gone (if it still held one).
    /// An error is the update's (`Conflict`, `NotFound`, `DestinationBusy` or `Backend`), and
    /// the lease may still be held: the layer then releases it with `release_lease`. The
    /// default makes the two calls, two round trips, where a shared store should need one; a
    /// failed release there is logged and left to lapse, as the update has happened.
    fn update_and_release(
        &self,
        expected: u64,
        record: &SessionRecord,
        holder: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move {
            self.update(expected, record).await?;
            if let Err(error) = self.release_lease(record.id, holder).await {
                tracing::warn!(session = %record.id, %error, "cannot release the session's lease");
            }
            Ok(())
        }
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
    fn lease_and_load(
        &self,
        id: SessionId,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Leased, StoreError>> + Send {
        S::lease_and_load(self, id, holder, ttl)
    }
    fn update_and_release(
        &self,
        expected: u64,
        record: &SessionRecord,
        holder: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::update_and_release(self, expected, record, holder)
    }
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::close(self)
    }
}

/// What [`SessionStore::lease_and_load`] found.
// Returned once per packet and taken apart at once: boxing the record would only cost an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Leased {
    /// The lease is the caller's now, and this is the record as stored after it was granted
    /// (`None`: there is no record for the id).
    Granted(Option<SessionRecord>),
    /// Another holder's lease has not expired; nothing was loaded.
    Busy,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `create` with an id that exists.
    #[error("a session with this id already exists")]
    AlreadyExists,
    /// `create` of a record that holds its destination, for a destination another record
    /// holds.
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
    fn lease_and_load<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Leased, StoreError>>;
    fn update_and_release<'a>(
        &'a self,
        expected: u64,
        record: &'a SessionRecord,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The store as its own type, for the layer's fast path of a [`FileStore`]
    /// ([`FileStore::update_after`]).
    fn as_any(&self) -> &dyn std::any::Any;
}

impl dyn DynStore {
    /// The store, if it is a [`FileStore`].
    pub(crate) fn as_file_store(&self) -> Option<&FileStore> {
        self.as_any().downcast_ref()
    }
}

pub(crate) use crate::BoxFuture;

impl<T: SessionStore> DynStore for T {
    fn create<'a>(&'a self, record: &'a SessionRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed("create", SessionStore::create(self, record)))
    }
    fn load(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        Box::pin(timed("load", SessionStore::load(self, id)))
    }
    fn update<'a>(
        &'a self,
        expected: u64,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed(
            "update",
            SessionStore::update(self, expected, record),
        ))
    }
    fn remove(&self, id: SessionId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(timed("remove", SessionStore::remove(self, id)))
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(timed("list", SessionStore::list(self)))
    }
    fn count_open(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(timed("count_open", SessionStore::count_open(self)))
    }
    fn count_open_for<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(timed(
            "count_open_for",
            SessionStore::count_open_for(self, owner),
        ))
    }
    fn list_idle(&self, cutoff_ms: u64) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(timed("list_idle", SessionStore::list_idle(self, cutoff_ms)))
    }
    fn list_ended(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(timed("list_ended", SessionStore::list_ended(self)))
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
        Box::pin(timed(
            "acquire_lease",
            SessionStore::acquire_lease(self, id, holder, ttl),
        ))
    }
    fn release_lease<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed(
            "release_lease",
            SessionStore::release_lease(self, id, holder),
        ))
    }
    fn lease_and_load<'a>(
        &'a self,
        id: SessionId,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Leased, StoreError>> {
        Box::pin(timed(
            "lease_and_load",
            SessionStore::lease_and_load(self, id, holder, ttl),
        ))
    }
    fn update_and_release<'a>(
        &'a self,
        expected: u64,
        record: &'a SessionRecord,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed(
            "update_and_release",
            SessionStore::update_and_release(self, expected, record, holder),
        ))
    }
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(SessionStore::close(self))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Times a store call, for `bits_store_operation_duration_seconds`.
use crate::metrics::store as timed;

#[cfg(test)]
pub(crate) mod tests {
    use crate::session::{SessionId, SessionRecord};

    pub(crate) fn record(dest: &str) -> SessionRecord {
        SessionRecord::new(SessionId::new(), dest.into(), format!("/{dest}"), None, 1)
    }
}
