//! [`PostgresStore`]: session records in PostgreSQL, shareable by a farm of nodes (feature
//! `postgres`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use super::sql::{self, LeaseSql, Row, Sql};
use super::{SessionStore, StoreError};
use crate::session::{Owner, SessionId, SessionRecord};

/// Connections [`PostgresStore::connect`] keeps at most.
const MAX_CONNECTIONS: u32 = 16;

/// How long [`PostgresStore::connect`], and every operation, waits for a connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

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
/// * `bits_leases`: one row per held lease: `id`, `holder`, `expires` (`timestamptz`).
/// * `bits_schema`: the schema versions applied (now `1`).
///
/// # Sharing
///
/// Any number of nodes may use the same tables at once, so the store says it
/// [is shared](SessionStore::is_shared) and the layer leases sessions. Creates, updates
/// (compare-and-set on the revision) and leases are single statements, atomic across every
/// node. Lease expiry is measured with the database server's clock (`clock_timestamp()`), so
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
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Sql>,
}

impl PostgresStore {
    /// Connects to the database at `url` (e.g. `postgres://user:password@host/database`) and
    /// runs [`migrate`](Self::migrate).
    ///
    /// The pool keeps up to 16 connections and waits up to 10 s for one, here and in every
    /// operation; a server that cannot be reached in that time is a [`StoreError::Backend`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await
            .map_err(StoreError::backend)?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Uses `pool` as it is; call [`migrate`](Self::migrate) before use.
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
        for statement in &self.sql.migrate {
            // Not `raw_sql`: its future cannot be spawned (sqlx issue 3150).
            sqlx::query(statement)
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
        }
        tx.commit().await.map_err(StoreError::backend)
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The session holding `destination`, if any.
    async fn holder(&self, destination: &str) -> Result<Option<SessionId>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(&self.sql.holder)
            .bind(destination)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        id.as_deref().map(sql::parse_id).transpose()
    }

    async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        let found = sqlx::query(&self.sql.exists)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(found.is_some())
    }
}

fn statements(prefix: &str) -> Sql {
    Sql::new(prefix, |leases| LeaseSql {
        create: format!(
            "CREATE TABLE IF NOT EXISTS {leases} (
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
    })
}

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Binds `$1..$8` of [`Sql::insert`] and [`Sql::update`].
fn bind_row<'q>(query: Query<'q>, row: &'q Row) -> Query<'q> {
    query
        .bind(&row.id)
        .bind(row.revision)
        .bind(&row.destination)
        .bind(row.holds_destination)
        .bind(row.is_open)
        .bind(&row.owner)
        .bind(row.updated_ms)
        .bind(&row.record)
}

impl SessionStore for PostgresStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let row = Row::new(record)?;
        for _ in 0..sql::BUSY_RETRIES {
            match bind_row(sqlx::query(&self.sql.insert), &row)
                .execute(&self.pool)
                .await
            {
                Ok(done) if done.rows_affected() == 0 => return Err(StoreError::AlreadyExists),
                Ok(_) => return Ok(()),
                Err(error) if self.sql.is_busy_destination(&error) => {
                    if let Some(holder) = self.holder(&row.destination).await? {
                        return Err(StoreError::DestinationBusy { holder });
                    }
                }
                Err(error) => return Err(StoreError::backend(error)),
            }
        }
        Err(sql::holder_vanished())
    }

    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let json: Option<String> = sqlx::query_scalar(&self.sql.load)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        json.as_deref().map(sql::decode).transpose()
    }

    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        let row = Row::new(record)?;
        let expected = sql::to_i64(expected, "expected revision")?;
        for _ in 0..sql::BUSY_RETRIES {
            match bind_row(sqlx::query(&self.sql.update), &row)
                .bind(expected)
                .execute(&self.pool)
                .await
            {
                Ok(done) if done.rows_affected() == 0 => {
                    return Err(if self.exists(&row.id).await? {
                        StoreError::Conflict
                    } else {
                        StoreError::NotFound
                    });
                }
                Ok(_) => return Ok(()),
                Err(error) if self.sql.is_busy_destination(&error) => {
                    if let Some(holder) = self.holder(&row.destination).await? {
                        return Err(StoreError::DestinationBusy { holder });
                    }
                }
                Err(error) => return Err(StoreError::backend(error)),
            }
        }
        Err(sql::holder_vanished())
    }

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let id = id.to_string();
        let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
        let removed = sqlx::query(&self.sql.remove)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::backend)?;
        sqlx::query(&self.sql.remove_lease)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::backend)?;
        tx.commit().await.map_err(StoreError::backend)?;
        Ok(removed.rows_affected() > 0)
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query_as(&self.sql.list)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(sql::decode_listed(rows))
    }

    async fn count_open(&self) -> Result<usize, StoreError> {
        let count = sqlx::query_scalar(&self.sql.count_open)
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        sql::to_count(count)
    }

    async fn count_open_for(&self, owner: &Owner) -> Result<usize, StoreError> {
        let count = sqlx::query_scalar(&self.sql.count_open_for)
            .bind(owner.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        sql::to_count(count)
    }

    async fn list_idle(&self, cutoff_ms: u64) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query_as(&self.sql.list_idle)
            .bind(sql::saturating_i64(cutoff_ms.into()))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(sql::decode_listed(rows))
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
        let done = sqlx::query(&self.sql.acquire_lease)
            .bind(id.to_string())
            .bind(holder)
            .bind(sql::saturating_i64(ttl.as_millis()))
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, id: SessionId, holder: &str) -> Result<(), StoreError> {
        sqlx::query(&self.sql.release_lease)
            .bind(id.to_string())
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every commit is already durable on the server; this only ends the connections.
        self.pool.close().await;
        Ok(())
    }
}
