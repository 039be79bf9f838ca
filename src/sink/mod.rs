//! Where rows go: one file per database. Each load is ONE transaction holding the file's rows and
//! its ledger row, so a file is in the table exactly once or not at all:
//!
//! 1. make sure the ledger row `(source, key, ETag)` exists (committed on its own);
//! 2. begin; lock that ledger row (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so a replica already
//!    loading the file is skipped, not waited for; SQLite: the single writer lock);
//! 3. `loaded` → nothing to load, only the move is left; `failed` → only the report and move;
//! 4. otherwise, under a savepoint: check or create the table, stream the rows in;
//! 5. success: mark the ledger row `loaded` and commit; a bad file: roll back to the savepoint,
//!    mark it `failed` with the error, commit; a transient error: roll everything back.
//!
//! A process that dies mid-load loses its connection, so the database rolls back the rows and
//! releases the lock; whoever lists the file next loads it.

pub mod postgres;
pub mod sqlite;

use std::future::Future;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::{Config, Dialect};
use crate::error::{Attempt, FileError, FileErrorKind, LoadError, Stage};
use crate::format::{Batch, Decoded};
use crate::schema::{self, ColumnType, TypeInference};

/// One version of one file: the ledger's identity.
#[derive(Debug, Clone, Copy)]
pub struct FileRef<'a> {
    /// The store's id (`s3://bucket/root`).
    pub source: &'a str,
    /// Key relative to `incoming/`.
    pub key: &'a str,
    pub etag: &'a str,
    pub size: u64,
}

impl FileRef<'_> {
    /// The ledger's primary key: SHA-256 of source, key and ETag (fixed width for every database).
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        for part in [self.source, self.key, self.etag] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a load attempt found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome {
    /// Rows committed now.
    Loaded { rows: u64 },
    /// Committed earlier (the move did not happen then); nothing was loaded now.
    AlreadyLoaded { rows: u64 },
    /// The file is bad; recorded as failed now. Its rows are not in the table.
    Failed(FileError),
    /// Recorded as failed earlier (the move did not happen then).
    AlreadyFailed(FileError),
    /// Another worker or replica holds the file right now.
    Busy,
}

/// The target database.
pub enum Database {
    Postgres(postgres::PgSink),
    Sqlite(sqlite::SqliteSink),
}

/// What the sinks need from the configuration.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Quoted ledger table name.
    pub ledger: String,
    pub create_tables: bool,
    /// A field equal to this loads as NULL.
    pub null: String,
    /// Written into the ledger's `claimed_by`: which process loaded the file.
    pub owner: String,
    /// A file with this many recorded attempts is failed instead of tried again.
    pub max_attempts: u32,
    /// See `claim.lease`.
    pub lease: std::time::Duration,
}

impl Database {
    /// Sets up the pool without connecting: the loader starts and reports "not ready" while the
    /// database is down, instead of failing.
    pub fn connect_lazy(config: &Config) -> anyhow::Result<Database> {
        let options = SinkOptions {
            ledger: quote_ident(&config.database.ledger_table),
            create_tables: config.database.create_tables,
            null: config.csv.null.clone(),
            owner: owner_name(),
            max_attempts: config.retry.max_attempts,
            lease: config.claim.lease,
        };
        let url = config.database.url.expose_secret();
        Ok(match config.dialect().map_err(anyhow::Error::msg)? {
            Dialect::Postgres => Database::Postgres(postgres::PgSink::connect_lazy(url, config, options)?),
            Dialect::Sqlite => Database::Sqlite(sqlite::SqliteSink::connect_lazy(url, config, options)?),
            Dialect::MySql => anyhow::bail!("database.url: MySQL/MariaDB is not supported yet"),
        })
    }

    /// Creates the ledger table when missing.
    pub async fn ensure_ledger(&self) -> Result<(), LoadError> {
        match self {
            Database::Postgres(s) => s.ensure_ledger().await,
            Database::Sqlite(s) => s.ensure_ledger().await,
        }
        .map_err(|e| db_error(e, Stage::Database))
    }

    /// Is the database reachable?
    pub async fn ping(&self) -> Result<(), String> {
        match self {
            Database::Postgres(s) => s.ping().await,
            Database::Sqlite(s) => s.ping().await,
        }
        .map_err(|e| e.to_string())
    }

    /// Loads one file exactly once; see the module docs for the steps. `target` is the table
    /// (already validated) or why there is none; `open` starts decoding the object and is only
    /// called when there is something to load.
    pub async fn load<F, Fut>(
        &self,
        file: FileRef<'_>,
        target: Result<String, FileError>,
        open: F,
    ) -> Result<LoadOutcome, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Decoded, LoadError>>,
    {
        match self {
            Database::Postgres(s) => s.load(file, target, open).await,
            Database::Sqlite(s) => s.load(file, target, open).await,
        }
    }

    /// Counts an attempt that ended in a transient error and adds it to the file's history
    /// (unless another loader holds the file right now).
    pub async fn record_transient(&self, file: FileRef<'_>, stage: Stage, message: &str) -> Result<(), LoadError> {
        match self {
            Database::Postgres(s) => s.record_transient(file, stage, message).await,
            Database::Sqlite(s) => s.record_transient(file, stage, message).await,
        }
        .map_err(|e| db_error(e, Stage::Database))
    }

    /// Lets failed versions of `key` be loaded again (for `retry-failed`).
    pub async fn reset_failed(&self, source: &str, key: &str) -> Result<u64, LoadError> {
        match self {
            Database::Postgres(s) => s.reset_failed(source, key).await,
            Database::Sqlite(s) => s.reset_failed(source, key).await,
        }
        .map_err(|e| db_error(e, Stage::Database))
    }

    pub async fn close(&self) {
        match self {
            Database::Postgres(s) => s.close().await,
            Database::Sqlite(s) => s.close().await,
        }
    }
}

/// `host/pid`, for the ledger's `claimed_by`.
fn owner_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}/{}", std::process::id())
}

/// `"name"`; only ever called on names that passed [`schema::is_safe_identifier`].
pub fn quote_ident(name: &str) -> String {
    debug_assert!(schema::is_safe_identifier(name));
    format!("\"{name}\"")
}

/// The most columns a file may have (PostgreSQL's limit per table; others allow more).
pub const MAX_COLUMNS: usize = 1600;

/// The file's header as column names: each must be a safe identifier, once.
pub fn file_columns(header: &[String]) -> Result<Vec<String>, FileError> {
    if header.len() > MAX_COLUMNS {
        return Err(FileError::new(
            FileErrorKind::Schema,
            format!(
                "the header has {} columns; at most {MAX_COLUMNS} are supported",
                header.len()
            ),
        )
        .at_line(Some(1)));
    }
    let mut columns: Vec<String> = Vec::with_capacity(header.len());
    for (i, raw) in header.iter().enumerate() {
        let name = raw.trim();
        if !schema::is_safe_identifier(name) {
            return Err(FileError::new(
                FileErrorKind::UnsafeName,
                format!(
                    "header column {} {name:?} is not a safe SQL identifier (letters, digits and _, not starting with a digit, at most 63 characters)",
                    i + 1
                ),
            )
            .at_line(Some(1)));
        }
        let name = schema::normalize(name);
        if columns.contains(&name) {
            return Err(FileError::new(
                FileErrorKind::Schema,
                format!("column {name:?} appears twice in the header"),
            )
            .at_line(Some(1))
            .in_column(name));
        }
        columns.push(name);
    }
    Ok(columns)
}

/// The table's columns as the load must use them, and whether to create the table first.
pub struct TablePlan {
    /// `Some(types)` when the table must be created with these column types (file order).
    pub create: Option<Vec<ColumnType>>,
    /// The type of each file column in the table (file order).
    pub types: Vec<ColumnType>,
}

/// Matches the file's columns against the table (`existing`: name and type of each column, or
/// `None` when the table does not exist), inferring types from `sample` for a new table.
pub fn plan_table(
    table: &str,
    columns: &[String],
    existing: Option<Vec<(String, ColumnType)>>,
    create_tables: bool,
    sample: Option<&Batch>,
    null: &str,
) -> Result<TablePlan, FileError> {
    match existing {
        None if !create_tables => Err(FileError::new(
            FileErrorKind::Schema,
            format!("table {table:?} does not exist and database.create_tables is off"),
        )),
        None => {
            let mut inference = TypeInference::new(columns.len());
            for record in sample
                .iter()
                .flat_map(|b| b.records.iter())
                .take(schema::INFERENCE_SAMPLE_ROWS)
            {
                for (i, value) in record.iter().enumerate() {
                    inference.observe(i, (value != null).then_some(value));
                }
            }
            let types = inference.finish();
            Ok(TablePlan {
                create: Some(types.clone()),
                types,
            })
        }
        Some(existing) => {
            let mut types = Vec::with_capacity(columns.len());
            let mut missing = Vec::new();
            for c in columns {
                match existing.iter().find(|(name, _)| name == c) {
                    Some((_, t)) => types.push(*t),
                    None => missing.push(c.as_str()),
                }
            }
            if missing.is_empty() {
                Ok(TablePlan { create: None, types })
            } else {
                Err(FileError::new(
                    FileErrorKind::Schema,
                    format!(
                        "column(s) {} of the file are not in table {table:?}",
                        missing.join(", ")
                    ),
                )
                .at_line(Some(1))
                .in_column(missing[0]))
            }
        }
    }
}

/// Classifies a database error: transient (connection, timeouts, locks, serialization) or the
/// file's fault (data, constraint, schema errors).
pub fn db_error(e: sqlx::Error, stage: Stage) -> LoadError {
    match &e {
        sqlx::Error::Database(dbe) => {
            let code = dbe.code().map(|c| c.into_owned()).unwrap_or_default();
            match permanent_kind(&code) {
                Some(kind) => LoadError::Permanent(FileError {
                    database_message: Some(dbe.message().to_string()),
                    ..FileError::new(kind, format!("the database refused the data: {}", dbe.message()))
                }),
                None => LoadError::transient(stage, format!("database error {code}: {}", dbe.message())),
            }
        }
        _ => LoadError::transient(stage, e),
    }
}

/// SQLSTATE classes that are the data's fault. SQLite reports numeric result codes instead:
/// 1 (an SQL error such as too many columns), 19 (constraint), 20 (mismatch), 25 (range),
/// 18 (too big); its busy, locked, I/O and full-disk codes are transient.
fn permanent_kind(code: &str) -> Option<FileErrorKind> {
    match code {
        "22P02" | "22003" | "22007" | "22008" | "22P05" | "22021" | "22001" => Some(FileErrorKind::Type),
        "42703" | "42P01" | "54011" => Some(FileErrorKind::Schema),
        c if c.starts_with("22") || c.starts_with("23") || c.starts_with("42") || c.starts_with("54") => {
            Some(FileErrorKind::Database)
        }
        "1" | "19" | "20" | "25" | "18" | "275" | "531" | "787" | "1299" | "1555" | "2067" | "2579" => {
            Some(FileErrorKind::Database)
        }
        _ => None,
    }
}

/// The ledger's states.
pub mod state {
    pub const PENDING: &str = "pending";
    pub const LOADED: &str = "loaded";
    pub const FAILED: &str = "failed";
}

/// The most transient attempts kept in a file's history.
const HISTORY_LIMIT: usize = 50;

/// The ledger's history (a JSON array) with one more attempt at the end.
pub(crate) fn append_history(history: Option<&str>, stage: Stage, message: &str) -> String {
    let mut attempts: Vec<Attempt> = history.and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
    attempts.push(Attempt {
        at: chrono::Utc::now(),
        stage,
        message: message.chars().take(2000).collect(),
    });
    let skip = attempts.len().saturating_sub(HISTORY_LIMIT);
    serde_json::to_string(&attempts[skip..]).unwrap_or_else(|_| "[]".into())
}

/// The error for a file that used up its attempts.
pub(crate) fn retries_exhausted(attempts: i64, history: Option<&str>) -> FileError {
    let history: Vec<Attempt> = history.and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
    let last = history
        .last()
        .map(|a| format!("; last: {}: {}", a.stage, a.message))
        .unwrap_or_default();
    FileError {
        history: Box::new(history),
        ..FileError::new(
            FileErrorKind::RetriesExhausted,
            format!("gave up after {attempts} attempts{last}"),
        )
    }
}

/// A ledger row as read at claim time: state, row count, error, attempts, history.
pub(crate) type LedgerRow = (String, Option<i64>, Option<String>, i64, Option<String>);

/// What the locked ledger row says.
pub(crate) fn outcome_of_state(state: &str, rows: Option<i64>, error: Option<String>) -> Option<LoadOutcome> {
    match state {
        state::LOADED => Some(LoadOutcome::AlreadyLoaded {
            rows: rows.unwrap_or(0).max(0) as u64,
        }),
        state::FAILED => Some(LoadOutcome::AlreadyFailed(
            error
                .and_then(|e| serde_json::from_str(&e).ok())
                .unwrap_or_else(|| FileError::new(FileErrorKind::Database, "failed earlier (no details recorded)")),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_identity_changes_with_source_key_and_etag() {
        let a = FileRef {
            source: "s3://b/",
            key: "t/a.csv",
            etag: "\"1\"",
            size: 1,
        };
        let ids = [
            a.id(),
            FileRef { source: "s3://c/", ..a }.id(),
            FileRef { key: "t/b.csv", ..a }.id(),
            FileRef { etag: "\"2\"", ..a }.id(),
        ];
        assert_eq!(ids[0].len(), 64);
        for i in 1..ids.len() {
            assert_ne!(ids[0], ids[i]);
        }
        assert_eq!(a.id(), a.id());
    }

    #[test]
    fn header_names_must_be_safe_and_unique() {
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(file_columns(&h(&["Id", " qty "])).unwrap(), ["id", "qty"]);
        let e = file_columns(&h(&["id", "drop table x;"])).unwrap_err();
        assert_eq!(e.kind, FileErrorKind::UnsafeName);
        assert!(e.message.contains("header column 2"), "{}", e.message);
        assert_eq!(file_columns(&h(&["a", "A"])).unwrap_err().kind, FileErrorKind::Schema);
    }

    #[test]
    fn columns_missing_from_an_existing_table_fail_the_file() {
        let cols = vec!["id".to_string(), "extra".to_string()];
        let existing = Some(vec![("id".to_string(), ColumnType::Integer)]);
        let e = plan_table("t", &cols, existing, true, None, "").err().unwrap();
        assert_eq!(e.kind, FileErrorKind::Schema);
        assert_eq!(e.column.as_deref(), Some("extra"));
        let e = plan_table("t", &cols, None, false, None, "").err().unwrap();
        assert!(e.message.contains("does not exist"));
    }

    #[test]
    fn data_errors_are_permanent_and_connection_errors_transient() {
        assert_eq!(permanent_kind("22P02"), Some(FileErrorKind::Type));
        assert_eq!(permanent_kind("23505"), Some(FileErrorKind::Database));
        assert_eq!(permanent_kind("42703"), Some(FileErrorKind::Schema));
        for transient in ["08006", "40001", "40P01", "57P01", "53300", "55P03", "5", "517"] {
            assert_eq!(permanent_kind(transient), None, "{transient}");
        }
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(matches!(db_error(io, Stage::Database), LoadError::Transient { .. }));
    }
}
