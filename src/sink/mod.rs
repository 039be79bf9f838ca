//! Where rows go: one file per database, and the exactly-once protocol they share
//! ([`protocol`]). Each load is ONE transaction holding the file's rows and its ledger row, so
//! a file is in the table exactly once or not at all. Redshift loads by batch instead
//! ([`redshift`]).

pub mod entries;
mod insert;
mod lease;
pub mod mysql;
mod nodelay;
mod plan;
pub mod postgres;
pub mod protocol;
pub mod redshift;
pub mod sqlite;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::{Config, Dialect};
use crate::error::{Attempt, FileError, FileErrorKind, LoadError, Stage};
use crate::format::{Batch, Decoded};
use crate::reader::FileReader;
use crate::routes::LoadSpec;
use crate::schema;

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

/// A table's columns with their types, and the limits their declarations add.
pub type TableShape = (
    Vec<(String, schema::ColumnType)>,
    std::collections::HashMap<String, schema::Limits>,
);

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
    MySql(mysql::MySqlSink),
    Sqlite(sqlite::SqliteSink),
    /// Loads by batch ([`redshift::RedshiftBatch`]), not file by file.
    Redshift(redshift::RedshiftSink),
}

/// What the sinks need from the configuration.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Quoted ledger table name.
    pub ledger: String,
    pub create_tables: bool,
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
            owner: owner_name(),
            max_attempts: config.retry.max_attempts,
            lease: config.claim.lease,
        };
        let url = config.database.url.expose_secret();
        Ok(match config.dialect().map_err(anyhow::Error::msg)? {
            Dialect::Postgres => Database::Postgres(postgres::PgSink::connect_lazy(url, config, options)?),
            Dialect::Sqlite => Database::Sqlite(sqlite::SqliteSink::connect_lazy(url, config, options)?),
            Dialect::MySql => Database::MySql(mysql::MySqlSink::connect_lazy(url, config, options)?),
            Dialect::Redshift => Database::Redshift(redshift::RedshiftSink::connect_lazy(url, config, options)?),
        })
    }

    /// Creates the ledger table when missing.
    pub async fn ensure_ledger(&self) -> Result<(), LoadError> {
        let ensured = match self {
            Database::Postgres(s) => s.ensure_ledger().await,
            Database::MySql(s) => s.ensure_ledger().await,
            Database::Redshift(s) => s.ensure_ledger().await,
            Database::Sqlite(s) => s.ensure_ledger().await,
        };
        match ensured {
            Ok(()) => Ok(()),
            Err(e @ (sqlx::Error::PoolTimedOut | sqlx::Error::Io(_))) => {
                Err(LoadError::transient(Stage::Database, self.explain(&e).await))
            }
            Err(e) => Err(db_error(e, Stage::Database)),
        }
    }

    /// Is the database reachable? If not, why (see [`Database::explain`]).
    pub async fn ping(&self) -> Result<(), String> {
        let pinged = match self {
            Database::Postgres(s) => s.ledger().ping().await,
            Database::MySql(s) => s.ledger().ping().await,
            Database::Redshift(s) => s.ping().await,
            Database::Sqlite(s) => s.ledger().ping().await,
        };
        match pinged {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(&e).await),
        }
    }

    /// The server's host and port (none for SQLite, or a PostgreSQL socket folder).
    fn endpoint(&self) -> Option<(String, u16)> {
        let (host, port) = match self {
            Database::Postgres(s) => {
                let o = s.ledger().pool.connect_options();
                (o.get_host().to_string(), o.get_port())
            }
            Database::Redshift(s) => {
                let o = s.connect_options();
                (o.get_host().to_string(), o.get_port())
            }
            Database::MySql(s) => {
                let o = s.ledger().pool.connect_options();
                (o.get_host().to_string(), o.get_port())
            }
            Database::Sqlite(_) => return None,
        };
        (!host.starts_with('/')).then_some((host, port))
    }

    /// A database error in one line an operator can act on. When the driver only says it gave
    /// up (no connection within `database.connect_timeout`) or that the network failed, a plain
    /// TCP connection to the server's host and port tells which: refused, unresolvable, silent.
    pub async fn explain(&self, e: &sqlx::Error) -> String {
        let text = db_message(e);
        if !matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) {
            return text;
        }
        match self.probe().await {
            None => text,
            Some(Ok(endpoint)) => format!("{endpoint} accepts connections, but no database session opened ({text})"),
            Some(Err(why)) => why,
        }
    }

    /// A plain TCP connection to the server's host and port: `Ok(host:port)` when it accepts,
    /// else why not (refused, unresolvable, silent for 3 s); `None` when there is no server to
    /// reach (SQLite, a socket folder).
    pub async fn probe(&self) -> Option<Result<String, String>> {
        let (host, port) = self.endpoint()?;
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        Some(
            match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
                Ok(Ok(_)) => Ok(format!("{host}:{port}")),
                Ok(Err(io)) => Err(format!("cannot connect to {host}:{port}: {io}")),
                Err(_) => Err(format!("no answer from {host}:{port} within 3s")),
            },
        )
    }

    /// Loads one file exactly once (see [`protocol`]). `spec` says into which table (or why
    /// there is none) and how; `reader` is only read when there is something to load.
    pub async fn load(
        &self,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
    ) -> Result<LoadOutcome, LoadError> {
        match self {
            Database::Postgres(s) => s.ledger().load(s, file, spec, reader).await,
            Database::MySql(s) => s.ledger().load(s, file, spec, reader).await,
            Database::Redshift(_) => Err(LoadError::transient(Stage::Database, "Redshift loads files by batch")),
            Database::Sqlite(s) => s.ledger().load(s, file, spec, reader).await,
        }
    }

    /// Whether several files can load in one transaction ([`Database::load_group`]):
    /// PostgreSQL and SQLite. MySQL/MariaDB would commit a group's work at a new column's DDL.
    pub fn loads_groups(&self) -> bool {
        matches!(self, Database::Postgres(_) | Database::Sqlite(_))
    }

    /// Loads several files in one transaction, each exactly once (see
    /// [`protocol::Ledger::load_group`]). Outcomes are in `members`' order; `None`: load that
    /// file alone (it was tried before, or this database loads no groups).
    pub async fn load_group(
        &self,
        members: &[protocol::GroupMember<'_>],
    ) -> Vec<Option<Result<LoadOutcome, LoadError>>> {
        match self {
            Database::Postgres(s) => s.ledger().load_group(s, members).await,
            Database::Sqlite(s) => s.ledger().load_group(s, members).await,
            Database::MySql(_) | Database::Redshift(_) => members.iter().map(|_| None).collect(),
        }
    }

    /// Counts an attempt that ended in a transient error and adds it to the file's history
    /// (unless another loader holds the file right now).
    pub async fn record_transient(&self, file: FileRef<'_>, stage: Stage, message: &str) -> Result<(), LoadError> {
        match self {
            Database::Postgres(s) => s.ledger().record_transient(file, stage, message).await,
            Database::MySql(s) => s.ledger().record_transient(file, stage, message).await,
            Database::Redshift(s) => s.record_transient(&file.id(), stage, message).await,
            Database::Sqlite(s) => s.ledger().record_transient(file, stage, message).await,
        }
        .map_err(|e| db_error(e, Stage::Database))
    }

    /// The ledger's rows of `source` that `filter` picks (`ledger list`, `ledger show`).
    pub async fn entries(&self, source: &str, filter: &entries::Filter) -> Result<Vec<entries::Entry>, LoadError> {
        match self {
            Database::Postgres(s) => s.ledger().entries(source, filter).await,
            Database::MySql(s) => s.ledger().entries(source, filter).await,
            Database::Redshift(s) => s.reader().entries(source, filter).await,
            Database::Sqlite(s) => s.ledger().entries(source, filter).await,
        }
        .map_err(|e| db_error(e, Stage::Database))
    }

    /// Lets the version `etag` of `key` load again from the states `from` names (for
    /// `retry-failed` and `reload`).
    pub async fn reopen(&self, source: &str, key: &str, etag: &str, from: entries::Reopen) -> Result<u64, LoadError> {
        match self {
            Database::Postgres(s) => s.ledger().reopen(source, key, etag, from).await,
            Database::MySql(s) => s.ledger().reopen(source, key, etag, from).await,
            Database::Redshift(s) => s.reopen(source, key, etag, from).await,
            Database::Sqlite(s) => s.ledger().reopen(source, key, etag, from).await,
        }
        .map_err(|e| db_error(e, Stage::Database))
    }

    /// The columns of `table` as a load would meet them, `None` when it does not exist yet
    /// (for `validate`).
    pub async fn table_shape(&self, table: &str) -> Result<Option<TableShape>, LoadError> {
        let db = |e| db_error(e, Stage::Database);
        match self {
            Database::Postgres(s) => {
                postgres::table_info(&mut *s.ledger().pool.acquire().await.map_err(db)?, table).await
            }
            Database::Redshift(s) => s.table_shape(table).await,
            Database::MySql(s) => s.table_shape(table).await,
            Database::Sqlite(s) => s.table_shape(table).await.map_err(db),
        }
    }

    /// Which of `tables` exist (in the schema the loads write to).
    pub async fn existing_tables(&self, tables: &[String]) -> Result<std::collections::HashSet<String>, LoadError> {
        let mut existing = std::collections::HashSet::new();
        for table in tables {
            let found = match self {
                Database::Postgres(s) => s.table_exists(table).await,
                Database::MySql(s) => s.table_exists(table).await,
                Database::Sqlite(s) => s.table_exists(table).await,
                Database::Redshift(_) => Ok(true), // batches create their table in their COPY's transaction
            }
            .map_err(|e| db_error(e, Stage::Database))?;
            if found {
                existing.insert(table.clone());
            }
        }
        Ok(existing)
    }

    pub async fn close(&self) {
        match self {
            Database::Postgres(s) => s.ledger().pool.close().await,
            Database::MySql(s) => s.ledger().pool.close().await,
            Database::Redshift(s) => s.close().await,
            Database::Sqlite(s) => s.ledger().pool.close().await,
        }
    }
}

/// A file opened as rows, its header checked and its first batch read: what planning needs.
pub(crate) struct Opened {
    pub decoded: Decoded,
    /// The header as column names.
    pub columns: Vec<String>,
    pub first: Option<Batch>,
}

/// Opens the file's rows; `None` for a 0-byte file (nothing to load, nothing to create).
pub(crate) async fn open_rows(reader: &FileReader<'_>) -> Result<Option<Opened>, LoadError> {
    let mut decoded = reader.rows().await?;
    if decoded.header.is_empty() {
        return Ok(None);
    }
    let columns = file_columns(&decoded.header)?;
    let first = decoded.next_batch().await?;
    Ok(Some(Opened {
        decoded,
        columns,
        first,
    }))
}

impl Database {
    /// The Redshift sink, which loads files by batch ([`redshift::RedshiftBatch`]) rather than
    /// one by one.
    pub fn batch_loader(&self) -> Option<&redshift::RedshiftSink> {
        match self {
            Database::Redshift(s) => Some(s),
            _ => None,
        }
    }
}

/// The ledger id of a listed object.
pub(crate) fn file_id(source: &str, obj: &crate::source::ObjectMeta) -> String {
    FileRef {
        source,
        key: &obj.key,
        etag: &obj.etag,
        size: obj.size,
    }
    .id()
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

pub use crate::schema::MAX_COLUMNS;
pub use plan::{Plan, file_columns, plan_load};
pub(crate) use plan::{check_values, widened_spec};

/// The lineage values of one file, when `metadata_columns` is on.
#[derive(Debug, Clone)]
pub struct Lineage {
    pub source_key: String,
    pub etag: String,
    pub loaded_at: String,
}

impl Lineage {
    pub fn new(file: &FileRef<'_>) -> Lineage {
        Lineage {
            source_key: format!("{}{}", crate::source::INCOMING, file.key),
            etag: file.etag.to_string(),
            loaded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
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
        _ => LoadError::transient(stage, db_message(&e)),
    }
}

/// A database error without the driver's decorations: the server's own message (not "error
/// returned from database:", nor PostgreSQL's "at line N" of its own source), or what the
/// driver says went wrong.
pub fn db_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::PoolTimedOut => "no connection to the database within database.connect_timeout".into(),
        other => {
            let text = other.to_string();
            text.strip_prefix("error communicating with database: ")
                .map_or(text.clone(), str::to_string)
        }
    }
}

/// SQLSTATE classes that are the data's fault. SQLite reports numeric result codes instead:
/// 1 (an SQL error such as too many columns), 19 (constraint), 20 (mismatch), 25 (range),
/// 18 (too big); its busy, locked, I/O and full-disk codes are transient.
fn permanent_kind(code: &str) -> Option<FileErrorKind> {
    match code {
        // Malformed CSV as COPY reads it, and bytes that are not UTF-8: the file's encoding.
        "22P04" | "22021" => Some(FileErrorKind::Decode),
        "22P02" | "22003" | "22007" | "22008" | "22P05" | "22001" => Some(FileErrorKind::Type),
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

/// The error for a file that used up its attempts. Attempts are counted when a load starts and
/// transient outcomes are kept in the history, so attempts beyond the history ended with no
/// outcome at all: the process died while loading this file (`crashed_loader`).
pub(crate) fn retries_exhausted(attempts: i64, history: Option<&str>) -> FileError {
    let history: Vec<Attempt> = history.and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
    // (A history cut at its limit no longer tells.)
    let crashed = match history.len() < HISTORY_LIMIT {
        true => attempts.saturating_sub(history.len() as i64).max(0),
        false => 0,
    };
    let last = history
        .last()
        .map(|a| format!("; last error: {}: {}", a.stage, a.message))
        .unwrap_or_default();
    let (kind, message) = if crashed > 0 {
        (
            FileErrorKind::CrashedLoader,
            format!(
                "gave up after {attempts} attempts, {crashed} of which ended without any outcome: the loading process died (out of memory, a crash, a kill) while loading this file{last}"
            ),
        )
    } else {
        (
            FileErrorKind::RetriesExhausted,
            format!("gave up after {attempts} attempts{last}"),
        )
    };
    FileError {
        history: Box::new(history),
        ..FileError::new(kind, message)
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
