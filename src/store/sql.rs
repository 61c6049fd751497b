//! What [`SqliteStore`](super::SqliteStore) and [`PostgresStore`](super::PostgresStore) share:
//! table names, the statements whose text both databases accept, and how a record maps to its
//! row. The statements that measure time (leases) differ and come from each backend.
//!
//! The code that runs the shared statements differs between the stores only in the driver's
//! types, so it is written once, as two macros each store expands in its own impl blocks:
//! [`helper_methods!`] (private helpers) and [`session_store_methods!`] (most of
//! [`SessionStore`](super::SessionStore)). Generic code over `sqlx::Database` would need a
//! trait bound for every type it binds or decodes and for every executor, longer than the code
//! itself. What differs stays in each store: connecting, leases (each database keeps time its
//! own way), how `migrate` and `remove` begin their transactions, and `close`.

use std::fmt;
use std::future::Future;

use super::StoreError;
use crate::session::{SessionId, SessionRecord};

/// Table prefix unless [`with_table_prefix`](super::SqliteStore::with_table_prefix) sets one.
pub(super) const DEFAULT_PREFIX: &str = "bits_";

/// The schema version `migrate` records in `{prefix}schema`.
const SCHEMA_VERSION: i64 = 1;

/// How often create and update look for the holder of a busy destination before giving up.
/// The holder can let go between the failed write and the look-up; then the write is retried.
pub(super) const BUSY_RETRIES: usize = 5;

/// The statements of one store, with its table names filled in.
pub(super) struct Sql {
    prefix: String,
    /// Name of the partial unique index on held destinations, as PostgreSQL reports it.
    destination_index: String,
    /// `{prefix}sessions.destination` in lower case, as SQLite reports that index.
    destination_column: String,
    /// Creates the tables and indexes if missing and records the schema version.
    pub(super) migrate: Vec<String>,
    /// `$1..$8`: a [`Row`]. Inserts nothing if the id is taken.
    pub(super) insert: String,
    /// `$1..$8`: a [`Row`]; `$9`: the expected revision.
    pub(super) update: String,
    /// `$1`: an id.
    pub(super) exists: String,
    /// `$1`: a destination; the id of the session holding it.
    pub(super) holder: String,
    /// `$1`: an id; its record.
    pub(super) load: String,
    /// Id and record of every session.
    pub(super) list: String,
    /// `$1`: a cutoff; id and record of sessions updated before it.
    pub(super) list_idle: String,
    /// Id and record of every ended session.
    pub(super) list_ended: String,
    pub(super) count_open: String,
    /// `$1`: an owner.
    pub(super) count_open_for: String,
    /// `$1`: an id.
    pub(super) remove: String,
    /// `$1`: an id.
    pub(super) remove_lease: String,
    /// Backend-specific; see [`LeaseSql::acquire`].
    pub(super) acquire_lease: String,
    /// `$1`: an id; `$2`: the holder.
    pub(super) release_lease: String,
}

/// The backend's half of the lease statements: databases keep time differently.
pub(super) struct LeaseSql {
    /// `CREATE TABLE IF NOT EXISTS` for the leases table, with columns `id` (primary key),
    /// `holder` and an expiry.
    pub(super) create: String,
    /// Takes or renews a lease in one statement; affects one row exactly when it is granted.
    pub(super) acquire: String,
}

impl Sql {
    /// Statements for tables named `{prefix}sessions`, `{prefix}leases` and `{prefix}schema`;
    /// `leases` gets the leases table's name and writes the backend's lease statements. The
    /// prefix must have passed [`check_prefix`].
    pub(super) fn new(prefix: &str, leases: impl FnOnce(&str) -> LeaseSql) -> Self {
        let sessions = format!("{prefix}sessions");
        let lease_table = format!("{prefix}leases");
        let schema = format!("{prefix}schema");
        let destination_index = format!("{prefix}sessions_destination");
        let lease_sql = leases(&lease_table);
        let migrate = vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {sessions} (
                    id TEXT PRIMARY KEY,
                    revision BIGINT NOT NULL,
                    destination TEXT NOT NULL,
                    holds_destination BOOLEAN NOT NULL,
                    is_open BOOLEAN NOT NULL,
                    owner TEXT,
                    updated_ms BIGINT NOT NULL,
                    record TEXT NOT NULL
                )"
            ),
            // One row per destination held: this is what makes a second claim fail atomically.
            format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS {destination_index} \
                 ON {sessions} (destination) WHERE holds_destination"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {prefix}sessions_open \
                 ON {sessions} (owner) WHERE is_open"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {prefix}sessions_updated ON {sessions} (updated_ms)"
            ),
            lease_sql.create,
            format!("CREATE TABLE IF NOT EXISTS {schema} (version BIGINT PRIMARY KEY)"),
            format!(
                "INSERT INTO {schema} (version) VALUES ({SCHEMA_VERSION}) \
                 ON CONFLICT (version) DO NOTHING"
            ),
        ];
        Self {
            prefix: prefix.to_owned(),
            migrate,
            insert: format!(
                "INSERT INTO {sessions} (id, revision, destination, holds_destination, is_open, \
                 owner, updated_ms, record) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
            ),
            update: format!(
                "UPDATE {sessions} SET revision = $2, destination = $3, holds_destination = $4, \
                 is_open = $5, owner = $6, updated_ms = $7, record = $8 \
                 WHERE id = $1 AND revision = $9"
            ),
            exists: format!("SELECT 1 FROM {sessions} WHERE id = $1"),
            holder: format!(
                "SELECT id FROM {sessions} WHERE destination = $1 AND holds_destination"
            ),
            load: format!("SELECT record FROM {sessions} WHERE id = $1"),
            list: format!("SELECT id, record FROM {sessions}"),
            list_idle: format!("SELECT id, record FROM {sessions} WHERE updated_ms < $1"),
            list_ended: format!("SELECT id, record FROM {sessions} WHERE NOT is_open"),
            count_open: format!("SELECT COUNT(*) FROM {sessions} WHERE is_open"),
            count_open_for: format!("SELECT COUNT(*) FROM {sessions} WHERE is_open AND owner = $1"),
            remove: format!("DELETE FROM {sessions} WHERE id = $1"),
            remove_lease: format!("DELETE FROM {lease_table} WHERE id = $1"),
            acquire_lease: lease_sql.acquire,
            release_lease: format!("DELETE FROM {lease_table} WHERE id = $1 AND holder = $2"),
            destination_column: format!("{sessions}.destination").to_ascii_lowercase(),
            destination_index,
        }
    }

    /// Whether `error` says a write hit the partial unique index on held destinations.
    /// PostgreSQL names the index; SQLite names the table and column in its message
    /// (`UNIQUE constraint failed: bits_sessions.destination`). Identifiers are compared
    /// without case, as both databases treat them.
    pub(super) fn is_busy_destination(&self, error: &sqlx::Error) -> bool {
        let Some(error) = error.as_database_error() else {
            return false;
        };
        if !error.is_unique_violation() {
            return false;
        }
        match error.constraint() {
            Some(name) => name.eq_ignore_ascii_case(&self.destination_index),
            None => error
                .message()
                .to_ascii_lowercase()
                .contains(&self.destination_column),
        }
    }
}

impl fmt::Debug for Sql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sql")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Table names are spliced into SQL, so the prefix must be a plain identifier.
pub(super) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    let mut chars = prefix.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && prefix.len() <= 32;
    if plain {
        Ok(())
    } else {
        Err(StoreError::backend(format!(
            "invalid table prefix {prefix:?}: use 1 to 32 ASCII letters, digits or underscores, \
             not starting with a digit"
        )))
    }
}

/// A record as a row: the JSON itself plus the columns derived from it, which the indexes and
/// queries use.
pub(super) struct Row {
    pub(super) id: String,
    pub(super) revision: i64,
    pub(super) destination: String,
    pub(super) holds_destination: bool,
    pub(super) is_open: bool,
    pub(super) owner: Option<String>,
    pub(super) updated_ms: i64,
    pub(super) record: String,
}

impl Row {
    pub(super) fn new(record: &SessionRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: record.id.to_string(),
            revision: to_i64(record.revision, "revision")?,
            destination: record.destination.clone(),
            holds_destination: record.holds_destination(),
            is_open: record.is_open(),
            owner: record.counted_as().map(|o| o.as_str().to_owned()),
            updated_ms: to_i64(record.updated_ms, "updated_ms")?,
            record: serde_json::to_string(record).map_err(StoreError::backend)?,
        })
    }
}

/// A stored record. A row that is not valid JSON is a backend error, never a panic.
pub(super) fn decode(json: &str) -> Result<SessionRecord, StoreError> {
    serde_json::from_str(json).map_err(StoreError::backend)
}

/// Decodes listed `(id, record)` rows, skipping (with a warning) any that do not decode, so
/// that one damaged row cannot stop the expiry sweeper for every other session.
pub(super) fn decode_listed(rows: Vec<(String, String)>) -> Vec<SessionRecord> {
    rows.into_iter()
        .filter_map(|(id, json)| match decode(&json) {
            Ok(record) => Some(record),
            Err(error) => {
                tracing::warn!(%id, %error, "unreadable session record; skipped");
                None
            }
        })
        .collect()
}

/// A session id read back from the database.
pub(super) fn parse_id(id: &str) -> Result<SessionId, StoreError> {
    SessionId::parse(id)
        .ok_or_else(|| StoreError::backend(format!("stored session id {id:?} is not a GUID")))
}

/// A `COUNT(*)` result.
pub(super) fn to_count(count: i64) -> Result<usize, StoreError> {
    usize::try_from(count).map_err(StoreError::backend)
}

/// A `u64` field as a `BIGINT`. Revisions and timestamps stay far below `i64::MAX`; a value
/// above it is refused rather than wrapped, which would break the ordering of `updated_ms`.
pub(super) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::backend(format!("{what} {value} does not fit in a BIGINT")))
}

/// A cutoff or a lease length as a `BIGINT`, saturating: anything above `i64::MAX` means
/// "later than every stored value" all the same.
pub(super) fn saturating_i64(value: u128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Whether `error` says the statement's connection was gone: the server ended it (SQLSTATE
/// class `57P`: shut down, terminated, crashed), a connection exception (class `08`), or the
/// socket failed.
pub(super) fn is_cut(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
        _ => false,
    }
}

/// Runs `statement`, and again while it fails because its connection turned out to be cut
/// ([`is_cut`]), at most once per connection `pool` holds, plus one.
///
/// The pools ping a connection before use only when it has been idle a while
/// (`PostgresStore::pool_options`), so a connection the server ended in between (a restart,
/// a fail-over, `pg_terminate_backend`) fails the statement that next takes it, at once, with
/// the server's goodbye; the pool drops it, and the next try takes another or opens a fresh
/// one. Without this, the client would see a transient error and wait out its retry delay
/// (ten minutes by default) for each pooled connection that was cut. Trying again is safe
/// for every statement the stores send: each is a read, an idempotent write or a
/// compare-and-set, so one that did run before its answer was lost ends like a lost race (a
/// `Conflict`, an `AlreadyExists`), never in a second change. A server that is down fails
/// the fresh connection's opening, which is not a cut, so this does not wait longer than
/// one acquire. The transactions of `migrate` and `remove` are not retried: a cut there is
/// a `Backend` error, as before.
pub(super) async fn retry_if_cut<DB: sqlx::Database, T, Fut>(
    pool: &sqlx::Pool<DB>,
    mut statement: impl FnMut() -> Fut,
) -> Result<T, sqlx::Error>
where
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = pool.size() + 1;
    loop {
        match statement().await {
            Err(error) if is_cut(&error) && tries > 1 => {
                tries -= 1;
                tracing::debug!(%error, "store connection cut; trying another");
            }
            done => return done,
        }
    }
}

/// The error for a destination whose holder kept vanishing between a failed write and the
/// look-up of the holder.
pub(super) fn holder_vanished() -> StoreError {
    StoreError::backend(format!(
        "the destination was busy, but its holder vanished {BUSY_RETRIES} times in a row"
    ))
}

/// Expands, inside a store's inherent `impl` block, to the private methods that
/// [`session_store_methods!`] and the store's own `migrate` and `remove` call:
///
/// * `write(statement, row, expected, holder)`: runs [`Sql::insert`] (`expected` is `None`) or
///   [`Sql::update`] (`Some(revision)`), or a backend's update that also releases `holder`'s
///   lease, with `row` bound; whether it changed a row. A write
///   refused by the unique index on held destinations becomes
///   [`StoreError::DestinationBusy`] naming the holder; if the holder has let go by the time
///   it is looked up, the write is retried, up to [`BUSY_RETRIES`] times.
/// * `compare_and_set(statement, expected, record, holder)`: `write` of an update statement,
///   then `Conflict` or `NotFound` when it changed no row.
/// * `holder(destination)`: the session holding `destination`, if any.
/// * `exists(id)`: whether a session `id` is stored.
/// * `migrate_in(tx)`: runs [`Sql::migrate`] in `tx` and commits it.
/// * `remove_in(tx, id)`: deletes session `id` and its lease in `tx` and commits it; whether
///   the session was there.
///
/// The store begins the transactions of `migrate_in` and `remove_in` (and locks, if it must)
/// as its database needs.
///
/// `$db` is the store's `sqlx::Database` (`Postgres`, `Sqlite`). The store must have the
/// fields `pool: sqlx::Pool<$db>` and `sql`, which derefs to [`Sql`]; the module that expands
/// the macro must have the `sqlx` crate in scope, as every crate using it does.
///
/// ```text
/// impl PostgresStore {
///     sql::helper_methods!(Postgres);
/// }
/// ```
macro_rules! helper_methods {
    ($db:ty) => {
        async fn write(
            &self,
            statement: &str,
            row: &$crate::store::sql::Row,
            expected: Option<i64>,
            holder: Option<&str>,
        ) -> Result<bool, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            for _ in 0..sql::BUSY_RETRIES {
                // `$1..$8` of `Sql::insert` and `Sql::update`, then `$9` of `Sql::update`, then
                // the lease holder `$10` of an update that releases the lease.
                let run = move || {
                    let mut query = sqlx::query(statement)
                        .bind(&row.id)
                        .bind(row.revision)
                        .bind(&row.destination)
                        .bind(row.holds_destination)
                        .bind(row.is_open)
                        .bind(&row.owner)
                        .bind(row.updated_ms)
                        .bind(&row.record);
                    if let Some(expected) = expected {
                        query = query.bind(expected);
                    }
                    if let Some(holder) = holder {
                        query = query.bind(holder);
                    }
                    query.execute(&self.pool)
                };
                match sql::retry_if_cut(&self.pool, run).await {
                    Ok(done) => return Ok(done.rows_affected() != 0),
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

        /// Runs an update `statement` (`$9` the expected revision, `$10` a lease holder if
        /// `holder` is given) as a compare-and-set: `Conflict` if the revision differs,
        /// `NotFound` if there is no record.
        async fn compare_and_set(
            &self,
            statement: &str,
            expected: u64,
            record: &$crate::session::SessionRecord,
            holder: Option<&str>,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let row = sql::Row::new(record)?;
            let expected = sql::to_i64(expected, "expected revision")?;
            if self.write(statement, &row, Some(expected), holder).await? {
                Ok(())
            } else if self.exists(&row.id).await? {
                Err(StoreError::Conflict)
            } else {
                Err(StoreError::NotFound)
            }
        }

        async fn holder(
            &self,
            destination: &str,
        ) -> Result<Option<$crate::session::SessionId>, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let id: Option<String> = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_scalar(&self.sql.holder)
                    .bind(destination)
                    .fetch_optional(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            id.as_deref().map(sql::parse_id).transpose()
        }

        async fn exists(&self, id: &str) -> Result<bool, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let found = sql::retry_if_cut(&self.pool, move || {
                sqlx::query(&self.sql.exists)
                    .bind(id)
                    .fetch_optional(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            Ok(found.is_some())
        }

        async fn migrate_in(
            &self,
            mut tx: sqlx::Transaction<'_, $db>,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::StoreError;
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

        async fn remove_in(
            &self,
            mut tx: sqlx::Transaction<'_, $db>,
            id: $crate::session::SessionId,
        ) -> Result<bool, $crate::store::StoreError> {
            use $crate::store::StoreError;
            let id = id.to_string();
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
    };
}
pub(super) use helper_methods;

/// Expands, inside `impl SessionStore for` a store, to the methods that are the same for
/// every SQL store: `create`, `load`, `update`, `list`, `count_open`, `count_open_for`,
/// `list_idle`, `list_ended` and `release_lease`. The store writes the others (`remove`, `is_shared`,
/// `acquire_lease`, `close`) itself.
///
/// The store must have the fields `pool` (a `sqlx::Pool`) and `sql` (derefs to [`Sql`]) and
/// expand [`helper_methods!`] in its inherent `impl` block.
///
/// ```text
/// impl SessionStore for PostgresStore {
///     sql::session_store_methods!();
///
///     async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
///         let tx = self.pool.begin().await.map_err(StoreError::backend)?;
///         self.remove_in(tx, id).await
///     }
///     // ..
/// }
/// ```
macro_rules! session_store_methods {
    () => {
        async fn create(
            &self,
            record: &$crate::session::SessionRecord,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let row = sql::Row::new(record)?;
            if self.write(&self.sql.insert, &row, None, None).await? {
                Ok(())
            } else {
                Err(StoreError::AlreadyExists)
            }
        }

        async fn load(
            &self,
            id: $crate::session::SessionId,
        ) -> Result<Option<$crate::session::SessionRecord>, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let json: Option<String> = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_scalar(&self.sql.load)
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            json.as_deref().map(sql::decode).transpose()
        }

        async fn update(
            &self,
            expected: u64,
            record: &$crate::session::SessionRecord,
        ) -> Result<(), $crate::store::StoreError> {
            self.compare_and_set(&self.sql.update, expected, record, None)
                .await
        }

        async fn list(
            &self,
        ) -> Result<Vec<$crate::session::SessionRecord>, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let rows = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_as(&self.sql.list).fetch_all(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            Ok(sql::decode_listed(rows))
        }

        async fn count_open(&self) -> Result<usize, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let count = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_scalar(&self.sql.count_open).fetch_one(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            sql::to_count(count)
        }

        async fn count_open_for(
            &self,
            owner: &$crate::session::Owner,
        ) -> Result<usize, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let count = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_scalar(&self.sql.count_open_for)
                    .bind(owner.as_str())
                    .fetch_one(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            sql::to_count(count)
        }

        async fn list_idle(
            &self,
            cutoff_ms: u64,
        ) -> Result<Vec<$crate::session::SessionRecord>, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let rows = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_as(&self.sql.list_idle)
                    .bind(sql::saturating_i64(cutoff_ms.into()))
                    .fetch_all(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            Ok(sql::decode_listed(rows))
        }

        async fn list_ended(
            &self,
        ) -> Result<Vec<$crate::session::SessionRecord>, $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            let rows = sql::retry_if_cut(&self.pool, move || {
                sqlx::query_as(&self.sql.list_ended).fetch_all(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            Ok(sql::decode_listed(rows))
        }

        async fn release_lease(
            &self,
            id: $crate::session::SessionId,
            holder: &str,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::{StoreError, sql};
            sql::retry_if_cut(&self.pool, move || {
                sqlx::query(&self.sql.release_lease)
                    .bind(id.to_string())
                    .bind(holder)
                    .execute(&self.pool)
            })
            .await
            .map_err(StoreError::backend)?;
            Ok(())
        }
    };
}
pub(super) use session_store_methods;

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(table: &str) -> LeaseSql {
        LeaseSql {
            create: format!("CREATE TABLE {table} ()"),
            acquire: String::new(),
        }
    }

    #[test]
    fn prefixes() {
        for good in [DEFAULT_PREFIX, "_", "a", "T0_x", &"a".repeat(32)] {
            assert!(check_prefix(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "0a",
            "a-b",
            "a b",
            "a;",
            "bits_\"",
            "é",
            &"a".repeat(33),
        ] {
            assert!(
                matches!(check_prefix(bad), Err(StoreError::Backend(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names() {
        let sql = Sql::new("X_", leases);
        assert_eq!(sql.destination_index, "X_sessions_destination");
        assert_eq!(sql.destination_column, "x_sessions.destination");
        assert!(sql.migrate.contains(&"CREATE TABLE X_leases ()".to_owned()));
        assert_eq!(format!("{sql:?}"), r#"Sql { prefix: "X_", .. }"#);
    }
}
