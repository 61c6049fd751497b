//! [`PostgresStore`]: session records in PostgreSQL, shareable by a farm of nodes (feature
//! `postgres`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool, Postgres};

use super::sql::{self, LeaseSql, Sql};
use super::{Leased, SessionStore, StoreError};
use crate::session::{SessionId, SessionRecord};

/// Connections [`PostgresStore::connect`] keeps at most.
const MAX_CONNECTIONS: u32 = 16;

/// How long [`PostgresStore::connect`], and every operation, waits for a connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled connection idle at least this long is pinged before it is used again.
///
/// The pool pings every connection when it is given back, so one idle for less was alive a
/// moment ago. Pinging each one before each statement too (sqlx's default) adds a round trip
/// to every store call: a Fragment's two calls took about 330 µs with it and 210 µs without
/// in `benches/farm`, on one machine with the server.
const PING_AFTER_IDLE: Duration = Duration::from_secs(10);

/// Key of the transaction-scoped advisory lock that serializes [`PostgresStore::migrate`]
/// across nodes ("bitsmigr" in ASCII).
const MIGRATE_LOCK: i64 = 0x6269_7473_6d69_6772;

/// Keeps session records in PostgreSQL, shared by every node of a farm (feature `postgres`).
///
/// # What is stored where
///
/// Three tables, named with a prefix (`bits_` unless [`with_table_prefix`] says otherwise):
///
/// * `bits_sessions`: one row per session, the [`SessionRecord`] as JSON in `record`, plus
///   columns derived from it on every write (`revision`, `destination`, `holds_destination`,
///   `is_open`, `owner`, `updated_ms`) for the indexes. A partial unique index on
///   `destination` where `holds_destination` makes a second claim on a destination fail in
///   the same statement that would store it.
/// * `bits_leases`: one row per held lease: `id`, `holder`, `expires` (`timestamptz`);
///   `UNLOGGED`, since a lease needs no durability.
/// * `bits_schema`: the schema versions applied (now `1` and `2`).
/// * the function `bits_lease_and_load` (schema version 2), which takes a lease and reads the
///   record in one call.
///
/// # Sharing
///
/// Any number of nodes may use the same tables at once, so the store says it
/// [is shared](SessionStore::is_shared) and the layer leases sessions. Creates, updates
/// (compare-and-set on the revision) and leases are single statements, atomic across every
/// node. A Fragment costs two round trips: taking the lease and loading the record is one
/// call of `bits_lease_and_load` (a function, so that the record is read after the lease was
/// waited for, not from the statement's snapshot), and the update and the release of the
/// lease are one statement. After upgrading from a version without the function, run
/// [`migrate`](Self::migrate) ([`connect`](Self::connect) does). Lease expiry is measured with the database server's clock (`clock_timestamp()`), so
/// the nodes' clocks need not agree.
///
/// # Example
///
/// ```no_run
/// use axum_bits::BitsLayer;
/// use axum_bits::store::PostgresStore;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let url = "postgres://bits@db.example.com/bits";
/// let bits = BitsLayer::builder("./uploads")
///     .store(PostgresStore::connect(url).await?)
///     .build()?;
/// # drop(bits);
/// # Ok(())
/// # }
/// ```
///
/// [`with_table_prefix`]: PostgresStore::with_table_prefix
/// [`SessionRecord`]: crate::session::SessionRecord
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
}

/// The statements every SQL store has, and PostgreSQL's own.
#[derive(Debug)]
struct Statements {
    common: Sql,
    /// `$1` id, `$2` holder, `$3` ttl in milliseconds: `(granted, record)`.
    lease_and_load: String,
    /// [`Sql::update`] that also deletes holder `$10`'s lease.
    update_and_release: String,
}

impl std::ops::Deref for Statements {
    type Target = Sql;

    fn deref(&self) -> &Sql {
        &self.common
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (e.g. `postgres://user:password@host/database`) and
    /// runs [`migrate`](Self::migrate).
    ///
    /// The pool keeps up to 16 connections and waits up to 10 s for one, here and in every
    /// operation; a server that cannot be reached in that time is a [`StoreError::Backend`].
    /// A connection is pinged before use only when it has been idle for 10 s or more, not
    /// before every statement as sqlx does by default (which doubles each call's round
    /// trips); see [`pool_options`](Self::pool_options). A statement whose connection the
    /// server cut in between (a restart, a fail-over) is run again on another connection, so
    /// the client does not see the cut.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = Self::pool_options()
            .connect(url)
            .await
            .map_err(StoreError::backend)?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// The pool settings [`connect`](Self::connect) uses, for a pool built with connect
    /// options of your own (TLS, a socket, credentials from elsewhere) and given to
    /// [`from_pool`](Self::from_pool): up to 16 connections, 10 s to wait for one, and a
    /// ping only for a connection idle for 10 s or more.
    ///
    /// ```no_run
    /// use axum_bits::store::PostgresStore;
    /// use sqlx::postgres::PgConnectOptions;
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let options: PgConnectOptions = "postgres://bits@db.internal/bits".parse()?;
    /// let pool = PostgresStore::pool_options()
    ///     .connect_with(options.application_name("bits-upload"))
    ///     .await?;
    /// let store = PostgresStore::from_pool(pool);
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
    }

    /// Uses `pool` as it is; call [`migrate`](Self::migrate) before use.
    ///
    /// sqlx's pools ping a connection before every use unless told otherwise, one more round
    /// trip per store call; [`pool_options`](Self::pool_options) pings only connections idle
    /// for 10 s.
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            sql: Arc::new(statements(sql::DEFAULT_PREFIX)),
        }
    }

    /// Names the tables `{prefix}sessions`, `{prefix}leases` and `{prefix}schema` (default
    /// prefix `bits_`), so that several stores can share one database.
    ///
    /// The prefix must be 1 to 32 ASCII letters, digits or underscores, not starting with a
    /// digit; anything else is a [`StoreError::Backend`]. PostgreSQL folds it to lower case.
    /// Call [`migrate`](Self::migrate) afterwards if the tables may not exist yet.
    ///
    /// [`connect`](Self::connect) migrates the default tables; to use only prefixed ones,
    /// build the pool yourself:
    ///
    /// ```no_run
    /// use axum_bits::store::PostgresStore;
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://bits@db.example.com/bits").await?;
    /// let store = PostgresStore::from_pool(pool).with_table_prefix("uploads_")?;
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_table_prefix(mut self, prefix: &str) -> Result<Self, StoreError> {
        sql::check_prefix(prefix)?;
        self.sql = Arc::new(statements(prefix));
        Ok(self)
    }

    /// Creates the tables and indexes if they are missing. Idempotent, and safe to run from
    /// several nodes starting at once: it runs as one transaction under an advisory lock
    /// (concurrent `CREATE TABLE IF NOT EXISTS` can otherwise fail).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::backend)?;
        self.migrate_in(tx).await
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    // Private helpers of every SQL store: `write`, `holder`, `exists`, `migrate_in`, `remove_in`.
    sql::helper_methods!(Postgres);
}

fn statements(prefix: &str) -> Statements {
    let mut common = Sql::new(prefix, |leases| LeaseSql {
        // Unlogged: leases live seconds and need no durability, so taking and releasing one
        // (twice per packet) writes no WAL and waits for no fsync. A crash of the server
        // empties the table, which only frees leases early; the records' compare-and-set
        // still fences their holders.
        create: format!(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {leases} (
                id TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                expires TIMESTAMPTZ NOT NULL
            )"
        ),
        // $1 id, $2 holder, $3 ttl in milliseconds. The server's clock decides.
        acquire: format!(
            "INSERT INTO {leases} (id, holder, expires) \
             VALUES ($1, $2, clock_timestamp() + $3 * INTERVAL '1 millisecond') \
             ON CONFLICT (id) DO UPDATE \
             SET holder = excluded.holder, expires = excluded.expires \
             WHERE {leases}.holder = excluded.holder OR {leases}.expires <= clock_timestamp()"
        ),
    });
    let sessions = format!("{prefix}sessions");
    let leases = format!("{prefix}leases");
    let function = format!("{prefix}lease_and_load");
    // Each statement of a PL/pgSQL function takes a fresh snapshot, so the record is read as
    // committed once the lease is granted, even when granting it waited for the previous
    // holder's last update. (One statement with a CTE would read a snapshot from before.)
    common.migrate.push(format!(
        "CREATE OR REPLACE FUNCTION {function}(p_id TEXT, p_holder TEXT, p_ttl_ms BIGINT)          RETURNS TABLE (o_granted BOOLEAN, o_record TEXT) LANGUAGE plpgsql VOLATILE AS $fn$          BEGIN            {acquire};            IF NOT FOUND THEN              RETURN QUERY SELECT FALSE, NULL::TEXT;            ELSE              RETURN QUERY SELECT TRUE, (SELECT s.record FROM {sessions} s WHERE s.id = p_id);            END IF;          END $fn$",
        acquire = common
            .acquire_lease
            .replace("$1", "p_id")
            .replace("$2", "p_holder")
            .replace("$3", "p_ttl_ms"),
    ));
    common.migrate.push(format!(
        "INSERT INTO {prefix}schema (version) VALUES (2) ON CONFLICT (version) DO NOTHING"
    ));
    // A data-modifying CTE runs whether or not the update matches: the lease goes either
    // way, which the contract allows after an error.
    let update_and_release = format!(
        "WITH released AS (DELETE FROM {leases} WHERE id = $1 AND holder = $10) {}",
        common.update
    );
    Statements {
        lease_and_load: format!("SELECT o_granted, o_record FROM {function}($1, $2, $3)"),
        update_and_release,
        common,
    }
}

impl SessionStore for PostgresStore {
    // `create`, `load`, `update`, `list`, `count_open`, `count_open_for`, `list_idle` and
    // `release_lease`: the same for every SQL store.
    sql::session_store_methods!();

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let tx = self.pool.begin().await.map_err(StoreError::backend)?;
        self.remove_in(tx, id).await
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
        let done = sql::retry_if_cut(&self.pool, move || {
            sqlx::query(&self.sql.acquire_lease)
                .bind(id.to_string())
                .bind(holder)
                .bind(sql::saturating_i64(ttl.as_millis()))
                .execute(&self.pool)
        })
        .await
        .map_err(StoreError::backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn lease_and_load(
        &self,
        id: SessionId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Leased, StoreError> {
        let (granted, json): (bool, Option<String>) = sql::retry_if_cut(&self.pool, move || {
            sqlx::query_as(&self.sql.lease_and_load)
                .bind(id.to_string())
                .bind(holder)
                .bind(sql::saturating_i64(ttl.as_millis()))
                .fetch_one(&self.pool)
        })
        .await
        .map_err(StoreError::backend)?;
        if !granted {
            return Ok(Leased::Busy);
        }
        Ok(Leased::Granted(
            json.as_deref().map(sql::decode).transpose()?,
        ))
    }

    async fn update_and_release(
        &self,
        expected: u64,
        record: &SessionRecord,
        holder: &str,
    ) -> Result<(), StoreError> {
        let statement = &self.sql.update_and_release;
        self.compare_and_set(statement, expected, record, Some(holder))
            .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every commit is already durable on the server; this only ends the connections.
        self.pool.close().await;
        Ok(())
    }
}
