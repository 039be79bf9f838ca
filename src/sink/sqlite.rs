//! SQLite, the embedded default: multi-row prepared INSERTs inside one `BEGIN IMMEDIATE`
//! transaction. SQLite has a single writer, so loads are serialized in-process by a mutex (other
//! processes wait on SQLite's own lock, up to the busy timeout, then retry on a later tick).
//! Values are checked against the column types here, since SQLite itself would store any value.

use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::insert::{self, Insert};
use super::protocol::{Dialect, FileSink, Ledger};
use super::{FileRef, Lineage, SinkOptions, db_error, open_rows, plan_load, quote_ident};
use crate::config::Config;
use crate::error::{FileErrorKind, LoadError, Stage};
use crate::reader::FileReader;
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::{ColumnType, Value};

/// The ledger's SQL in SQLite.
const DIALECT: Dialect = Dialect {
    numbered: false,
    now: "CURRENT_TIMESTAMP",
    attempts: "attempts",
    // BEGIN IMMEDIATE takes the (single) write lock: nothing changes the row until commit.
    lock_row: "",
    begin: Some("BEGIN IMMEDIATE"),
    upsert_returning: true,
    insert_ignore: ("INSERT INTO", " ON CONFLICT (file_id) DO NOTHING"),
    text: "TEXT",
};

/// SQLite's limit on bound parameters per statement (since 3.32).
const MAX_PARAMS: usize = 32766;
/// Rows per INSERT statement at most.
const MAX_ROWS_PER_INSERT: usize = 256;

pub struct SqliteSink {
    pool: SqlitePool,
    options: SinkOptions,
    ledger: Ledger<Sqlite>,
    /// Why: SQLite allows one writer at a time; queueing here is cheaper than busy retries.
    /// Holding it is a load's claim.
    write_lock: Arc<Mutex<()>>,
}

impl SqliteSink {
    pub fn connect_lazy(url: &str, config: &Config, options: SinkOptions) -> anyhow::Result<SqliteSink> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("database.url: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk (the WAL synced) before it returns, so the move to
            // processed/ that follows can never outlive the rows after a power loss (NORMAL may
            // lose the last commits then). The cost is one fsync per file.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30));
        let path = connect.get_filename();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("database.url: cannot create {}: {e}", parent.display()))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.database.connect_timeout)
            .connect_lazy_with(connect);
        let write_lock = Arc::new(Mutex::new(()));
        let ledger = Ledger::new(pool.clone(), &options, DIALECT, Some(write_lock.clone()));
        Ok(SqliteSink {
            pool,
            options,
            ledger,
            write_lock,
        })
    }

    pub(crate) fn ledger(&self) -> &Ledger<Sqlite> {
        &self.ledger
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind(table)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// See [`super::Database::table_shape`]: columns by their affinity, no declared limits.
    pub(crate) async fn table_shape(&self, table: &str) -> Result<Option<super::TableShape>, sqlx::Error> {
        let columns: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
            .bind(table)
            .fetch_all(&self.pool)
            .await?;
        let columns: Vec<_> = columns
            .into_iter()
            .map(|(n, t)| (n.to_ascii_lowercase(), affinity(&t)))
            .collect();
        Ok((!columns.is_empty()).then(|| (columns, Default::default())))
    }

    pub async fn ensure_ledger(&self) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let _writer = self.write_lock.lock().await;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {ledger} (
                file_id       TEXT PRIMARY KEY,
                source        TEXT NOT NULL,
                object_key    TEXT NOT NULL,
                etag          TEXT NOT NULL,
                state         TEXT NOT NULL,
                target_table  TEXT,
                row_count     INTEGER,
                byte_count    INTEGER NOT NULL,
                attempts      INTEGER NOT NULL DEFAULT 0,
                error         TEXT,
                history       TEXT,
                claimed_by    TEXT,
                first_seen_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
                loaded_at     TEXT,
                updated_at    TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
            )"
        )))
        .execute(&self.pool)
        .await?;
        let index = quote_ident(
            &format!("{}_key_idx", ledger.trim_matches('"'))
                .chars()
                .take(63)
                .collect::<String>(),
        );
        sqlx::query(AssertSqlSafe(format!(
            "CREATE INDEX IF NOT EXISTS {index} ON {ledger} (source, object_key)"
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl FileSink for SqliteSink {
    type Db = Sqlite;
    type Claim = OwnedMutexGuard<()>;

    /// The single writer: a load in this process waits for the one before it (other
    /// processes wait on SQLite's own lock, up to the busy timeout).
    async fn claim(&self, _id: &str) -> Result<Option<Self::Claim>, sqlx::Error> {
        Ok(Some(self.write_lock.clone().lock_owned().await))
    }

    /// The single writer's turn covers every file of a group.
    async fn claim_also(&self, _claim: &mut Self::Claim, _id: &str) -> Result<bool, sqlx::Error> {
        Ok(true)
    }

    async fn begin<'c>(&'c self, _claim: &'c mut Self::Claim) -> Result<Transaction<'c, Sqlite>, sqlx::Error> {
        // IMMEDIATE takes the write lock now, so nothing the load read can go stale.
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn write_rows(
        &self,
        conn: &mut SqliteConnection,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<u64, LoadError> {
        let db = |e| db_error(e, Stage::Database);
        let table = spec.table.clone()?;
        let Some(mut opened) = open_rows(reader).await? else {
            return Ok(0);
        };
        let existing: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
            .bind(&table)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        // Columns whose declared type gives them NUMERIC affinity (`DECIMAL(10,2)`, `NUMBER`,
        // `STRING`, ...) but no type of the loader's: SQLite turns number-like text into a number.
        let converting: Vec<String> = existing
            .iter()
            .filter(|(_, t)| affinity(t) == ColumnType::Text && numeric_affinity(t))
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        let existing = (!existing.is_empty()).then(|| {
            existing
                .into_iter()
                .map(|(n, t)| (n.to_ascii_lowercase(), affinity(&t)))
                .collect::<Vec<_>>()
        });
        if opened.first.is_none() && existing.is_none() {
            return Ok(0); // header only: no rows, and no sample to create the table from
        }
        let plan = plan_load(
            &table,
            &opened.columns,
            &opened.decoded.types,
            existing,
            spec,
            opened.first.as_ref(),
        )?;
        *new_columns = plan.new_columns();
        // Per planned column, decided once: does SQLite turn number-like text into numbers?
        let converting: Vec<bool> = plan.columns.iter().map(|c| converting.contains(c)).collect();
        let upsert = spec.write_mode == WriteMode::Upsert;
        if let Some(types) = &plan.create {
            let keys = upsert.then_some(spec.key_columns.as_slice());
            let sql = insert::create_table(&table, &plan.columns, types, keys, |_, t| sql_type(t).into(), "");
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await.map_err(db)?;
            tracing::info!(db.table = %table, "creating table (commits with the load)");
        }
        for (column, ty) in &plan.add {
            let sql = insert::add_column(&table, column, sql_type(*ty), false);
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await.map_err(db)?;
            tracing::info!(db.table = %table, db.column = %column, "adding a column (commits with the load)");
        }
        let on_conflict = if upsert {
            let keys = insert::column_list(&spec.key_columns);
            let updates: Vec<String> = plan
                .columns
                .iter()
                .filter(|c| !spec.key_columns.contains(c))
                .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
                .collect();
            // Rows go in file order, so the file's last row for a key wins.
            match updates.is_empty() {
                true => format!(" ON CONFLICT ({keys}) DO NOTHING"),
                false => format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", updates.join(", ")),
            }
        } else {
            String::new()
        };
        let insert = Insert::new(&table, &plan.columns, on_conflict, MAX_PARAMS, MAX_ROWS_PER_INSERT);
        let lineage = spec.metadata_columns.then(|| Lineage::new(&file));
        let first = opened.first.take();
        insert
            .write_all::<Sqlite, _>(conn, first, &mut opened.decoded, |mut query, b, r| {
                for (((value, ty), column), converts) in b.row(r).zip(&plan.types).zip(&plan.columns).zip(&converting) {
                    if let Some(v) = value
                        && *converts
                        && would_become_a_number(v)
                    {
                        return Err(b
                            .error_at(
                                r,
                                column,
                                FileErrorKind::Type,
                                format!(
                                    "{v:?} would be stored as a number, not as written (the column's declared type gives it NUMERIC affinity in SQLite; declare it TEXT to keep values as written)"
                                ),
                            )
                            .into());
                    }
                    let value = ty
                        .convert(value)
                        .map_err(|m| b.error_at(r, column, FileErrorKind::Type, m))?;
                    query = bind_value(query, value);
                }
                if let Some(l) = &lineage {
                    query = query
                        .bind(l.source_key.clone())
                        .bind(l.etag.clone())
                        .bind(l.loaded_at.clone())
                        .bind(b.line(r) as i64);
                }
                Ok(query)
            })
            .await
    }

    async fn release(&self, claim: Self::Claim, _id: &str) {
        drop(claim);
    }
}

type SqliteQuery = sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_value(query: SqliteQuery, value: Value<'_>) -> SqliteQuery {
    match value {
        Value::Null => query.bind(None::<&str>),
        Value::Integer(i) => query.bind(i),
        Value::Float(f) => query.bind(f),
        Value::Boolean(b) => query.bind(b),
        Value::Text(t) => query.bind(t),
    }
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "INTEGER",
        ColumnType::Float => "REAL",
        // SQLite has no exact decimal: TEXT keeps the digits (NUMERIC affinity would not).
        ColumnType::Numeric => "DECIMAL_TEXT",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Date => "DATE",
        ColumnType::Timestamp => "TIMESTAMP",
        ColumnType::TimestampTz => "TIMESTAMPTZ",
        ColumnType::Text | ColumnType::Json => "TEXT",
    }
}

/// Whether SQLite gives a column of this declared type NUMERIC affinity (none of INT, CHAR,
/// CLOB, TEXT, BLOB, REAL, FLOA, DOUB in it, and not empty): number-like text becomes a number.
fn numeric_affinity(declared: &str) -> bool {
    let d = declared.to_ascii_uppercase();
    !d.is_empty()
        && !["INT", "CHAR", "CLOB", "TEXT", "BLOB", "REAL", "FLOA", "DOUB"]
            .iter()
            .any(|s| d.contains(s))
}

/// Text SQLite would store as a number in a NUMERIC column, unless the number prints back as
/// the same text (a plain integer): an integer or real literal, spaces around it allowed.
fn would_become_a_number(value: &str) -> bool {
    if crate::schema::is_canonical_integer(value) {
        return false;
    }
    let t = value.trim_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    !(int.is_empty() && frac.is_empty()) && digits(int) && digits(frac) && exponent_ok
}

/// The loader's type for a declared SQLite column type (SQLite's affinity rules, refined).
fn affinity(declared: &str) -> ColumnType {
    let d = declared.to_ascii_uppercase();
    if d == "DECIMAL_TEXT" {
        ColumnType::Numeric
    } else if d.contains("INT") {
        ColumnType::Integer
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        ColumnType::Float
    } else if d.contains("BOOL") {
        ColumnType::Boolean
    } else if d == "TIMESTAMPTZ" {
        ColumnType::TimestampTz
    } else if d.contains("TIMESTAMP") || d.contains("DATETIME") {
        ColumnType::Timestamp
    } else if d == "DATE" {
        ColumnType::Date
    } else {
        ColumnType::Text
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_sqlite_would_turn_into_numbers_are_spotted() {
        for number in ["1.10", "007", "+5", " 5", "1e3", ".5", "5.", "-0", "3.0"] {
            assert!(super::would_become_a_number(number), "{number}");
        }
        for kept in ["5", "-12", "08123x", "abc", "1-02-03", "", ".", "e5", "0x10", "NaN"] {
            assert!(!super::would_become_a_number(kept), "{kept}");
        }
        assert!(super::numeric_affinity("DECIMAL(10,2)") && super::numeric_affinity("STRING"));
        assert!(
            !super::numeric_affinity("TEXT") && !super::numeric_affinity("VARCHAR(5)") && !super::numeric_affinity("")
        );
    }
}
