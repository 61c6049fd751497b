//! [`SqliteStore`]: session records in an SQLite database file (feature `sqlite`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

use super::sql::{self, LeaseSql, Sql};
use super::{SessionStore, StoreError};
use crate::session::SessionId;

/// How long a statement waits for another connection's (or process's) write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections [`SqliteStore::open`] keeps. SQLite runs one writer at a time; the others
/// serve reads, which WAL lets run beside the writer.
const MAX_CONNECTIONS: u32 = 8;

/// Keeps session records in an SQLite database (feature `sqlite`).
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
/// * `bits_leases`: one row per held lease: `id`, `holder`, `expires_ms`.
/// * `bits_schema`: the schema versions applied (now `1`).
///
/// # Sharing
///
/// Several processes on one host may use the same database file at once (WAL journal, and a
/// busy timeout of 5 s so that writers queue instead of failing), so the store says it
/// [is shared](SessionStore::is_shared) and the layer leases sessions. Creates, updates and
/// leases are single statements, atomic across every connection and process. Lease expiry is
/// measured with the host's wall clock, which all processes on one host share. SQLite does
/// not share a database between hosts (not even on a network file system): for a farm of
/// nodes, use [`PostgresStore`](super::PostgresStore).
///
/// Commits use `synchronous = NORMAL`: a crash of the process loses nothing, a power loss may
/// lose the last commits (as with [`FileStore`](super::FileStore) without fsync) but never
/// corrupts the database. [`SessionStore::close`] runs a full checkpoint, which writes every
/// commit into the database file and syncs it.
///
/// # Example
///
/// ```
/// use axum_bits::BitsLayer;
/// use axum_bits::store::SqliteStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let root = std::env::temp_dir().join("doc-sqlite-store");
/// std::fs::create_dir_all(&root)?;
/// let store = SqliteStore::open(root.join("sessions.db")).await?;
/// let layer = BitsLayer::builder(root).store(store).build()?;
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
///
/// [`with_table_prefix`]: SqliteStore::with_table_prefix
/// [`SessionRecord`]: crate::session::SessionRecord
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: Arc<Sql>,
}

impl SqliteStore {
    /// Opens the database file at `path`, creating it if missing, and runs
    /// [`migrate`](Self::migrate). The file's folder must exist.
    ///
    /// Connections use the WAL journal and wait up to 5 s for a busy database.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = connect(options).await.map_err(StoreError::backend)?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Uses `pool` as it is; call [`migrate`](Self::migrate) before use.
    ///
    /// Several connections need a busy timeout, or writers fail instead of waiting for each
    /// other. An in-memory database is private to one connection unless it uses a shared
    /// cache, as `sqlite::memory:` does:
    ///
    /// ```
    /// use axum_bits::store::{SessionStore, SqliteStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
    /// let store = SqliteStore::from_pool(pool);
    /// store.migrate().await?;
    /// assert_eq!(store.count_open().await?, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            sql: Arc::new(statements(sql::DEFAULT_PREFIX)),
        }
    }

    /// Names the tables `{prefix}sessions`, `{prefix}leases` and `{prefix}schema` (default
    /// prefix `bits_`), so that several stores can share one database.
    ///
    /// The prefix must be 1 to 32 ASCII letters, digits or underscores, not starting with a
    /// digit; anything else is a [`StoreError::Backend`]. Call [`migrate`](Self::migrate)
    /// afterwards if the tables may not exist yet.
    pub fn with_table_prefix(mut self, prefix: &str) -> Result<Self, StoreError> {
        sql::check_prefix(prefix)?;
        self.sql = Arc::new(statements(prefix));
        Ok(self)
    }

    /// Creates the tables and indexes if they are missing. Idempotent, and safe to run from
    /// several processes at once: it runs as one write transaction.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::backend)?;
        self.migrate_in(tx).await
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    // Private helpers of every SQL store: `write`, `holder`, `exists`, `migrate_in`, `remove_in`.
    sql::helper_methods!(Sqlite);
}

/// Connects a pool, retrying while the database is busy.
///
/// The first connection to a new file switches it to WAL, which needs the file to itself;
/// when several processes open a new file at the same moment, SQLite can answer the losers
/// `SQLITE_BUSY` at once instead of waiting (it would otherwise deadlock). Once the file is in
/// WAL mode, which is persistent, opening no longer contends.
async fn connect(options: SqliteConnectOptions) -> Result<SqlitePool, sqlx::Error> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        // A connection to a local file cannot be cut off: no ping before each use (sqlx's
        // default), which would cost a trip to the connection's thread per store call.
        let connected = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await;
        match connected {
            Err(error) if is_busy(&error) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            connected => return connected,
        }
    }
}

/// Whether `error` is `SQLITE_BUSY` or one of its extended codes.
fn is_busy(error: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i32 = 5;
    error
        .as_database_error()
        .and_then(|error| error.code())
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == SQLITE_BUSY)
}

fn statements(prefix: &str) -> Sql {
    Sql::new(prefix, |leases| LeaseSql {
        create: format!(
            "CREATE TABLE IF NOT EXISTS {leases} (
                id TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                expires_ms BIGINT NOT NULL
            )"
        ),
        // $1 id, $2 holder, $3 new expiry, $4 now (milliseconds since the epoch).
        acquire: format!(
            "INSERT INTO {leases} (id, holder, expires_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE \
             SET holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE {leases}.holder = excluded.holder OR {leases}.expires_ms <= $4"
        ),
    })
}

impl SessionStore for SqliteStore {
    // `create`, `load`, `update`, `list`, `count_open`, `count_open_for`, `list_idle` and
    // `release_lease`: the same for every SQL store.
    sql::session_store_methods!();

    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::backend)?;
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
        let now = sql::saturating_i64(crate::session::now_ms().into());
        let expires = now.saturating_add(sql::saturating_i64(ttl.as_millis()));
        let done = sql::retry_if_cut(&self.pool, move || {
            sqlx::query(&self.sql.acquire_lease)
                .bind(id.to_string())
                .bind(holder)
                .bind(expires)
                .bind(now)
                .execute(&self.pool)
        })
        .await
        .map_err(StoreError::backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn close(&self) -> Result<(), StoreError> {
        if self.pool.is_closed() {
            return Ok(());
        }
        // With `synchronous = NORMAL` commits are synced by checkpoints. A full one copies
        // every commit into the database file and syncs it, waiting (up to the busy timeout)
        // for other processes' readers and writers.
        let checkpoint = sqlx::query("PRAGMA wal_checkpoint(FULL)")
            .execute(&self.pool)
            .await;
        self.pool.close().await;
        checkpoint.map(drop).map_err(StoreError::backend)
    }
}
