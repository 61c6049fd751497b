//! [`RedisStore`]: session records in Redis, shared by a farm of nodes.
//!
//! The module's documentation is on [`RedisStore`], where it is rendered.

mod records;
mod scripts;

use std::fmt;
use std::time::Duration;

use redis::ScriptInvocation;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Leased, SessionStore, StoreError};
use crate::session::{Owner, SessionId, SessionRecord};
use records::{Error, Footprint, Keys, Write, busy_error, decode, member, unexpected};
use scripts::SCRIPTS;

/// The version of the key layout, kept in `{prefix}:schema`.
const SCHEMA_VERSION: &str = "1";

const DEFAULT_PREFIX: &str = "bits";
const MAX_PREFIX_LEN: usize = 64;

/// How long [`RedisStore::connect`] waits for a TCP connection.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a command may wait for its reply before it fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many records `list` fetches per round trip.
const FETCH_BATCH: usize = 256;

/// How often update and remove retry after finding that the stored record occupies other
/// index keys than they passed. A record's destination and owner never change in practice,
/// so one retry is the most that should ever be needed.
const MAX_ATTEMPTS: usize = 4;

/// The longest lease Redis is asked to keep (a hundred years); longer ttls are clamped, since
/// `PX` refuses expiry times that overflow.
const MAX_LEASE_MS: u128 = 100 * 365 * 24 * 3600 * 1000;

/// Keeps session records in Redis, where every node of a farm sees them (feature `redis`).
///
/// Cloning is cheap: clones share one connection.
///
/// # Key layout
///
/// Every key of a store starts with its key prefix (default `bits`) in braces, a Redis hash
/// tag, so that all of them live in one hash slot, as Redis Cluster requires of the keys of
/// one script. Session ids appear as upper-case GUIDs without braces.
///
/// | key | type | holds |
/// |---|---|---|
/// | `{bits}:s:<id>` | hash | the record: `json` (the [`SessionRecord`] as JSON), `rev` (its revision), and the index fields it was written with: `dest` (destination), `holds` (`1` if it [holds its destination](SessionRecord::holds_destination), else `0`), `open` (`1`/`0`), `owner` (`=` and the owner's name, or empty) |
/// | `{bits}:d:<destination>` | string | the id of the session holding the destination, present only while one does |
/// | `{bits}:updated` | sorted set | every id, scored by `updated_ms`: [`list`](SessionStore::list) and [`list_idle`](SessionStore::list_idle) read it |
/// | `{bits}:open` | set | the ids of open sessions ([`count_open`](SessionStore::count_open)) |
/// | `{bits}:o:<owner>` | set | the ids of the owner's open sessions ([`count_open_for`](SessionStore::count_open_for)) |
/// | `{bits}:l:<id>` | string | the lease holder, expiring (`PX`) after the lease's ttl; independent of the record, so removing the record leaves it to expire |
/// | `{bits}:schema` | string | the version of this layout, written by [`RedisStore::migrate`] |
///
/// # Atomicity
///
/// Every change that touches more than one key (create, update, remove) is one Lua script, and
/// Redis runs a script without interleaving other commands, so the checks (id taken,
/// destination held, revision) and the writes to the record and its indexes are one step for
/// every node that shares the server. Each script makes all its checks before its first write,
/// so a refusal changes nothing. The scripts keep the indexes in step with the index fields
/// stored next to each record, never with a copy the caller read, so a stale caller cannot
/// corrupt them. Leases are taken and released by scripts too, and expire by the server's
/// clock, so the nodes' clocks need not agree. A Fragment costs two round trips: one script
/// takes the lease and reads the record ([`SessionStore::lease_and_load`]), another updates
/// the record and releases the lease ([`SessionStore::update_and_release`]).
///
/// A command that times out may still have been carried out: the caller then gets an error,
/// and its next update of that record a [`StoreError::Conflict`].
///
/// # Persistence
///
/// Open sessions survive a Redis restart only if their records do. Run the server with the
/// append-only file on (`appendonly yes`) and `appendfsync everysec` (at most about a second
/// of writes lost on a crash of the machine) or `appendfsync always` (none). With RDB snapshots
/// alone every write since the last snapshot is lost on a crash; with no persistence every
/// record is. A client whose session record is gone is told `BG_E_SESSION_NOT_FOUND` and
/// starts its upload over. A record that lost only its last few updates is harmless: it names
/// an earlier offset, and the client re-sends the bytes from there. Also make sure the server
/// never evicts these keys (`maxmemory-policy noeviction`, or a `volatile-*` policy: only
/// lease keys have an expiry).
///
/// # Sharing
///
/// A Redis server is meant to be shared: [`is_shared`](SessionStore::is_shared) is `true`, so
/// the layer guards each session with a lease in Redis and any node may serve any packet of a
/// session, provided the nodes also share the staged data. Give each deployment its own
/// [key prefix](RedisStore::with_key_prefix) if several use one server.
///
/// # Example
///
/// ```no_run
/// use axum_bits::BitsLayer;
/// use axum_bits::store::RedisStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/").await?;
/// let bits = BitsLayer::builder("/srv/uploads").store(store).build()?;
/// # drop(bits);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    manager: ConnectionManager,
    keys: Keys,
}

impl RedisStore {
    /// Connects to the server at `url` (`redis://[user:password@]host[:port][/db]`), checks
    /// that it answers, and runs [`migrate`](Self::migrate) for the default key prefix.
    ///
    /// The connection reconnects by itself after failures. A connection attempt gives up
    /// after 3 seconds and a command after 5, so an unreachable server yields errors, never a
    /// hang. For other settings build a [`ConnectionManager`] and use
    /// [`from_manager`](Self::from_manager).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::backend)?;
        // The retry delays start at a second and are jittered; one retry keeps a dead server
        // from stalling a caller for long.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECTION_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(1)
            .set_factor(2)
            .set_max_delay(1_000);
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::backend)?;
        let store = Self::from_manager(manager);
        let _: String = redis::cmd("PING")
            .query_async(&mut store.connection())
            .await
            .map_err(StoreError::backend)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Wraps an existing connection manager, with the default key prefix. Call
    /// [`migrate`](Self::migrate) before using the store.
    ///
    /// The manager's own timeouts apply; set a response timeout on it
    /// ([`ConnectionManagerConfig::set_response_timeout`]) so that a dead server yields
    /// errors rather than waits.
    pub fn from_manager(manager: ConnectionManager) -> Self {
        Self {
            manager,
            keys: Keys::new(DEFAULT_PREFIX),
        }
    }

    /// Puts every key of this store under `prefix` instead of `bits`, so that several
    /// deployments can share one server. The prefix must be non-empty, at most 64 bytes and
    /// free of `{` and `}` (it becomes the keys' hash tag).
    ///
    /// [`connect`](Self::connect) migrated the default prefix only: call
    /// [`migrate`](Self::migrate) again after changing it.
    pub fn with_key_prefix(mut self, prefix: &str) -> Result<Self, StoreError> {
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || prefix.contains(['{', '}']) {
            return Err(StoreError::backend(Error::Prefix(prefix.to_owned())));
        }
        self.keys = Keys::new(prefix);
        Ok(self)
    }

    /// The setup step: loads the scripts into the server's script cache and records the
    /// version of the key layout under the key prefix, or checks it if it is there already.
    ///
    /// Idempotent, and safe to run from several nodes at once. Fails if the prefix holds
    /// data of another layout version.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.connection();
        for script in SCRIPTS.all() {
            script
                .load_async(&mut conn)
                .await
                .map_err(StoreError::backend)?;
        }
        let found: String = SCRIPTS
            .schema
            .key(self.keys.schema())
            .arg(SCHEMA_VERSION)
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::backend)?;
        if found != SCHEMA_VERSION {
            return Err(StoreError::backend(Error::Schema(found)));
        }
        Ok(())
    }

    /// `update`, and with `release` the release of that holder's lease in the same script.
    async fn update_releasing(
        &self,
        expected: u64,
        record: &SessionRecord,
        release: Option<&str>,
    ) -> Result<(), StoreError> {
        let write = Write::new(record)?;
        let script = match release {
            Some(_) => &SCRIPTS.update_and_release,
            None => &SCRIPTS.update,
        };
        let expected = expected.to_string();
        let session = self.keys.session(record.id);
        // Guess that the stored record occupies the index keys this one will; the script
        // says where it really is if not.
        let mut old = Footprint {
            held: Some(record.destination.clone()),
            counted: record.counted_as().map(|o| o.as_str().to_owned()),
        };
        for _ in 0..MAX_ATTEMPTS {
            let mut invocation = script.prepare_invoke();
            self.write_keys(&mut invocation, &session, record);
            self.footprint_keys(&mut invocation, &session, &old);
            write.args(&mut invocation);
            invocation.arg(&expected);
            old.args(&mut invocation);
            if let Some(holder) = release {
                invocation.key(self.keys.lease(record.id)).arg(holder);
            }
            match self.reply(&invocation).await?.as_slice() {
                [ok] if ok == "ok" => return Ok(()),
                [missing] if missing == "missing" => return Err(StoreError::NotFound),
                [conflict] if conflict == "conflict" => return Err(StoreError::Conflict),
                [busy, holder] if busy == "busy" => return Err(busy_error(holder)),
                [moved, held, counted] if moved == "moved" => {
                    old = Footprint::decode(held, counted);
                }
                other => return Err(unexpected(other)),
            }
        }
        Err(StoreError::backend(Error::Moving))
    }

    fn connection(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// Runs a script that answers with a status word and its details.
    async fn reply(&self, invocation: &ScriptInvocation<'_>) -> Result<Vec<String>, StoreError> {
        invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)
    }

    /// KEYS 1 to 5 of the create and update scripts: where `record` goes.
    fn write_keys(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        session: &str,
        record: &SessionRecord,
    ) {
        let owner = match &record.counted_as() {
            Some(owner) => self.keys.owner(owner.as_str()),
            None => session.to_owned(),
        };
        invocation
            .key(session)
            .key(self.keys.updated())
            .key(self.keys.open())
            .key(self.keys.destination(&record.destination))
            .key(owner);
    }

    /// The destination key and owner set a stored record occupies; a slot the record does not
    /// use gets the session key, which the script never touches through that slot.
    fn footprint_keys(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        session: &str,
        footprint: &Footprint,
    ) {
        let destination = footprint
            .held
            .as_deref()
            .map_or_else(|| session.to_owned(), |d| self.keys.destination(d));
        let owner = footprint
            .counted
            .as_deref()
            .map_or_else(|| session.to_owned(), |o| self.keys.owner(o));
        invocation.key(destination).key(owner);
    }

    /// The records of `ids`, fetched a batch per round trip; ids whose record vanished
    /// meanwhile are skipped, and so are records that cannot be decoded (with a warning), so
    /// that one corrupt record does not stop every expiry sweep.
    async fn fetch(&self, ids: Vec<String>) -> Result<Vec<SessionRecord>, StoreError> {
        let mut conn = self.connection();
        let mut records = Vec::with_capacity(ids.len());
        for batch in ids.chunks(FETCH_BATCH) {
            let mut pipe = redis::pipe();
            let mut keys = Vec::with_capacity(batch.len());
            for member in batch {
                let id = SessionId::parse(member)
                    .ok_or_else(|| StoreError::backend(Error::Member(member.clone())))?;
                let key = self.keys.session(id);
                pipe.cmd("HGET").arg(&key).arg("json");
                keys.push((id, key));
            }
            let found: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(StoreError::backend)?;
            for ((id, key), json) in keys.into_iter().zip(found) {
                let Some(json) = json else { continue };
                match decode(id, &key, &json) {
                    Ok(record) => records.push(record),
                    Err(error) => {
                        tracing::warn!(%key, %error, "skipping a session record that cannot be decoded");
                    }
                }
            }
        }
        Ok(records)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

impl SessionStore for RedisStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let write = Write::new(record)?;
        let mut invocation = SCRIPTS.create.prepare_invoke();
        self.write_keys(&mut invocation, &self.keys.session(record.id), record);
        write.args(&mut invocation);
        match self.reply(&invocation).await?.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            [exists] if exists == "exists" => Err(StoreError::AlreadyExists),
            [busy, holder] if busy == "busy" => Err(busy_error(holder)),
            other => Err(unexpected(other)),
        }
    }

    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let key = self.keys.session(id);
        let json: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&key)
            .arg("json")
            .query_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)?;
        json.map(|json| decode(id, &key, &json)).transpose()
    }

    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        self.update_releasing(expected, record, None).await
    }

    async fn lease_and_load(
        &self,
        id: SessionId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Leased, StoreError> {
        let ttl_ms = ttl.as_millis().clamp(1, MAX_LEASE_MS);
        let key = self.keys.session(id);
        let reply: Vec<redis::Value> = SCRIPTS
            .lease_and_load
            .key(self.keys.lease(id))
            .key(&key)
            .arg(holder)
            .arg(ttl_ms.to_string())
            .invoke_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)?;
        match reply.as_slice() {
            [redis::Value::Int(0)] => Ok(Leased::Busy),
            [redis::Value::Int(1)] => Ok(Leased::Granted(None)),
            [redis::Value::Int(1), redis::Value::BulkString(json)] => {
                Ok(Leased::Granted(Some(decode(id, &key, json)?)))
            }
            other => Err(unexpected(&[format!("{other:?}")])),
        }
    }

    async fn update_and_release(
        &self,
        expected: u64,
        record: &SessionRecord,
        holder: &str,
    ) -> Result<(), StoreError> {
        self.update_releasing(expected, record, Some(holder)).await
    }

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let member = member(id);
        let session = self.keys.session(id);
        // The caller does not say which index keys the record occupies: the first attempt
        // assumes none, and the script names them if there are any.
        let mut old = Footprint::default();
        for _ in 0..MAX_ATTEMPTS {
            let mut invocation = SCRIPTS.remove.prepare_invoke();
            invocation
                .key(&session)
                .key(self.keys.updated())
                .key(self.keys.open());
            self.footprint_keys(&mut invocation, &session, &old);
            invocation.arg(&member);
            old.args(&mut invocation);
            match self.reply(&invocation).await?.as_slice() {
                [ok] if ok == "ok" => return Ok(true),
                [missing] if missing == "missing" => return Ok(false),
                [moved, held, counted] if moved == "moved" => {
                    old = Footprint::decode(held, counted);
                }
                other => return Err(unexpected(other)),
            }
        }
        Err(StoreError::backend(Error::Moving))
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.updated())
            .arg(0)
            .arg(-1)
            .query_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)?;
        self.fetch(ids).await
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        redis::cmd("SCARD")
            .arg(self.keys.open())
            .query_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)
    }

    async fn count_open_for(&self, owner: &Owner) -> Result<usize, StoreError> {
        redis::cmd("SCARD")
            .arg(self.keys.owner(owner.as_str()))
            .query_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)
    }

    async fn list_idle(&self, cutoff_ms: u64) -> Result<Vec<SessionRecord>, StoreError> {
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.updated())
            .arg("-inf")
            .arg(format!("({cutoff_ms}"))
            .query_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)?;
        let mut records = self.fetch(ids).await?;
        // Scores are doubles; the records' own times are exact.
        records.retain(|r| r.is_idle_since(cutoff_ms));
        Ok(records)
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
        // `PX` needs at least a millisecond.
        let ttl_ms = ttl.as_millis().clamp(1, MAX_LEASE_MS);
        let granted: i64 = SCRIPTS
            .acquire
            .key(self.keys.lease(id))
            .arg(holder)
            .arg(ttl_ms.to_string())
            .invoke_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)?;
        Ok(granted == 1)
    }

    async fn release_lease(&self, id: SessionId, holder: &str) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .release
            .key(self.keys.lease(id))
            .arg(holder)
            .invoke_async(&mut self.connection())
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }
}
