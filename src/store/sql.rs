//! What [`SqliteStore`](super::SqliteStore) and [`PostgresStore`](super::PostgresStore) share:
//! table names, the statements whose text both databases accept, and how a record maps to its
//! row. The statements that measure time (leases) differ and come from each backend.
//!
//! Each store runs these statements itself: the drivers' row and argument types differ, and a
//! generic layer over them would be larger than the few lines it saves.

use std::fmt;

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
            owner: record.owner.as_ref().map(|o| o.as_str().to_owned()),
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

/// The error for a destination whose holder kept vanishing between a failed write and the
/// look-up of the holder.
pub(super) fn holder_vanished() -> StoreError {
    StoreError::backend(format!(
        "the destination was busy, but its holder vanished {BUSY_RETRIES} times in a row"
    ))
}

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
