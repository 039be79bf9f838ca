//! SQLite, the embedded default: multi-row prepared INSERTs inside one `BEGIN IMMEDIATE`
//! transaction. SQLite has a single writer, so loads are serialized in-process by a mutex (other
//! processes wait on SQLite's own lock, up to the busy timeout, then retry on a later tick).
//! Values are checked against the column types here, since SQLite itself would store any value.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Sqlite, Transaction};
use tokio::sync::Mutex;

use super::{
    FileRef, LedgerRow, Lineage, LoadOutcome, SinkOptions, append_history, db_error, file_columns, outcome_of_state,
    plan_load, quote_ident, retries_exhausted, rows_of, state, widened_spec,
};
use crate::config::Config;
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::format::{Mode, Stream};
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::{ColumnType, Value};

/// SQLite's limit on bound parameters per statement (since 3.32).
const MAX_PARAMS: usize = 32766;
/// Rows per INSERT statement at most.
const MAX_ROWS_PER_INSERT: usize = 256;

pub struct SqliteSink {
    pool: SqlitePool,
    options: SinkOptions,
    /// Why: SQLite allows one writer at a time; queueing here is cheaper than busy retries.
    write_lock: Mutex<()>,
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
        Ok(SqliteSink {
            pool,
            options,
            write_lock: Mutex::new(()),
        })
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind(table)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    pub async fn close(&self) {
        self.pool.close().await
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

    pub async fn reset_failed(&self, source: &str, key: &str) -> Result<u64, sqlx::Error> {
        let _writer = self.write_lock.lock().await;
        let sql = format!(
            "UPDATE {} SET state = 'pending', error = NULL, updated_at = CURRENT_TIMESTAMP WHERE source = ? AND object_key = ? AND state = 'failed'",
            self.options.ledger
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(source)
            .bind(key)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn load<F, Fut>(&self, file: FileRef<'_>, spec: &LoadSpec, open: F) -> Result<LoadOutcome, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let ledger = &self.options.ledger;
        let id = file.id();
        let db = |e| db_error(e, Stage::Database);
        let _writer = self.write_lock.lock().await;
        // IMMEDIATE takes the write lock now, so the ledger check below cannot go stale.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT OR IGNORE INTO {ledger} (file_id, source, object_key, etag, state, byte_count)
             VALUES (?, ?, ?, ?, 'pending', ?)"
        )))
        .bind(&id)
        .bind(file.source)
        .bind(file.key)
        .bind(file.etag)
        .bind(file.size as i64)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let (current, rows, error, attempts, history): LedgerRow = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT state, row_count, error, attempts, history FROM {ledger} WHERE file_id = ?"
        )))
        .bind(&id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if let Some(done) = outcome_of_state(&current, rows, error) {
            return Ok(done);
        }
        if attempts >= i64::from(self.options.max_attempts) {
            // Its attempts are used up (the last ones may have died mid-load).
            let error = retries_exhausted(attempts, history.as_deref());
            self.mark_failed(&mut tx, &id, &error, spec.table.as_ref().ok()).await?;
            tx.commit().await.map_err(db)?;
            return Ok(LoadOutcome::Failed(error));
        }
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {ledger} SET attempts = attempts + 1, claimed_by = ?, updated_at = CURRENT_TIMESTAMP WHERE file_id = ?"
        )))
        .bind(&self.options.owner)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        // The attempt counts now, committed before the load (one writer: the lock above is
        // held throughout, so nothing changes in between): a load that kills the process
        // still counts, so a file that always does ends in failed/.
        tx.commit().await.map_err(db)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;

        sqlx::query("SAVEPOINT file_rows").execute(&mut *tx).await.map_err(db)?;
        let table = spec.table.as_ref().ok().cloned();
        let mut spec = std::borrow::Cow::Borrowed(spec);
        let inserted = loop {
            let mut new_columns = Vec::new();
            let inserted = self.insert_rows(&mut tx, file, &spec, &open, &mut new_columns).await;
            // A value that does not fit a column this load created: undo the attempt (its
            // CREATE TABLE included) and load again with that column widened.
            match inserted
                .as_ref()
                .err()
                .and_then(|e| widened_spec(e, &new_columns, &spec))
            {
                Some(wider) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    spec = std::borrow::Cow::Owned(wider);
                }
                None => break inserted,
            }
        };
        match inserted {
            Ok(rows) => {
                sqlx::query("RELEASE SAVEPOINT file_rows")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {ledger} SET state = '{}', row_count = ?, target_table = ?, error = NULL,
                     loaded_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP WHERE file_id = ?",
                    state::LOADED
                )))
                .bind(rows as i64)
                .bind(table)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Loaded { rows })
            }
            Err(LoadError::Permanent(error)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                self.mark_failed(&mut tx, &id, &error, table.as_ref()).await?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Failed(error))
            }
            Err(transient) => Err(transient),
        }
    }

    async fn mark_failed(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        id: &str,
        error: &FileError,
        table: Option<&String>,
    ) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = '{}', error = ?, target_table = ?, updated_at = CURRENT_TIMESTAMP WHERE file_id = ?",
            self.options.ledger,
            state::FAILED
        )))
        .bind(serde_json::to_string(error).unwrap_or_default())
        .bind(table)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    pub async fn record_transient(&self, file: FileRef<'_>, stage: Stage, message: &str) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let _writer = self.write_lock.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let history: Option<(Option<String>,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT history FROM {ledger} WHERE file_id = ? AND state = 'pending'"
        )))
        .bind(file.id())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((history,)) = history {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {ledger} SET history = ?, updated_at = CURRENT_TIMESTAMP WHERE file_id = ?"
            )))
            .bind(append_history(history.as_deref(), stage, message))
            .bind(file.id())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    async fn insert_rows<F, Fut>(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        file: FileRef<'_>,
        spec: &LoadSpec,
        open: &F,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<u64, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let db = |e| db_error(e, Stage::Database);
        let table = spec.table.clone()?;
        let mut decoded = rows_of(open(Mode::Rows).await?);
        if decoded.header.is_empty() {
            return Ok(0);
        }
        let file_cols = file_columns(&decoded.header)?;
        let first = decoded.next_batch().await?;
        let existing: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
            .bind(&table)
            .fetch_all(&mut **tx)
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
        if first.is_none() && existing.is_none() {
            return Ok(0); // header only: no rows, and no sample to create the table from
        }
        let plan = plan_load(&table, &file_cols, &decoded.types, existing, spec, first.as_ref())?;
        *new_columns = plan.new_columns();
        // Per planned column, decided once: does SQLite turn number-like text into numbers?
        let converting: Vec<bool> = plan.columns.iter().map(|c| converting.contains(c)).collect();
        let upsert = spec.write_mode == WriteMode::Upsert;
        let keys = spec
            .key_columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(types) = &plan.create {
            let definition = plan
                .columns
                .iter()
                .zip(types)
                .map(|(c, t)| format!("{} {}", quote_ident(c), sql_type(*t)))
                .collect::<Vec<_>>()
                .join(", ");
            let key = if upsert {
                format!(", PRIMARY KEY ({keys})")
            } else {
                String::new()
            };
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {} ({definition}{key})",
                quote_ident(&table)
            )))
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            tracing::info!(db.table = %table, "created table");
        }
        for (column, ty) in &plan.add {
            sqlx::query(AssertSqlSafe(format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote_ident(&table),
                quote_ident(column),
                sql_type(*ty)
            )))
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            tracing::info!(db.table = %table, db.column = %column, "added a column");
        }
        let width = plan.columns.len();
        let on_conflict = if upsert {
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
        let rows_per_insert = (MAX_PARAMS / width).clamp(1, MAX_ROWS_PER_INSERT);
        let insert = |rows: usize| {
            let placeholders = format!("({})", vec!["?"; width].join(", "));
            format!(
                "INSERT INTO {} ({}) VALUES {}{on_conflict}",
                quote_ident(&table),
                plan.columns
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                vec![placeholders; rows].join(", ")
            )
        };
        let lineage = spec.metadata_columns.then(|| Lineage::new(&file));
        let full_insert = insert(rows_per_insert);
        let mut total = 0u64;
        let mut batch = first;
        while let Some(b) = batch {
            let mut start = 0;
            while start < b.len() {
                let end = (start + rows_per_insert).min(b.len());
                let sql = if end - start == rows_per_insert {
                    full_insert.clone()
                } else {
                    insert(end - start)
                };
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for r in start..end {
                    for (((value, ty), column), converts) in
                        b.row(r).zip(&plan.types).zip(&plan.columns).zip(&converting)
                    {
                        if let Some(v) = value
                            && *converts
                            && would_become_a_number(v)
                        {
                            return Err(b.error_at(
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
                            .bind(l.loaded_at.clone());
                        query = query.bind(b.line(r) as i64);
                    }
                }
                query.execute(&mut **tx).await.map_err(db)?;
                total += (end - start) as u64;
                start = end;
            }
            batch = decoded.next_batch().await?;
        }
        Ok(total)
    }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_value<'q>(query: SqliteQuery<'q>, value: Value<'q>) -> SqliteQuery<'q> {
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
