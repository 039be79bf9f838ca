//! MySQL and MariaDB: multi-row prepared INSERTs (upserts with ON DUPLICATE KEY UPDATE) inside
//! one transaction with the ledger row; claims are ledger row locks taken with
//! `FOR UPDATE SKIP LOCKED` (MySQL 8.0, MariaDB 10.6 and later).
//!
//! MySQL commits implicitly around DDL, so creating a table or adding columns happens on a
//! connection of its own before the rows are written (a failed file can leave a created table
//! or an added column behind, never rows). Sessions use `ANSI_QUOTES` (identifiers are
//! double-quoted, as elsewhere in the loader), strict mode and UTC.
//!
//! Leases: a loader that dies releases its claims when its connections close; a frozen loader
//! keeps them until the server drops its connection (`wait_timeout`). The takeover of expired
//! leases is PostgreSQL's only.

use std::str::FromStr;

use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Transaction};

use super::{
    FileRef, LedgerRow, Lineage, LoadOutcome, SinkOptions, append_history, db_error, file_columns, outcome_of_state,
    plan_load, quote_ident, retries_exhausted, rows_of, state,
};
use crate::config::Config;
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::format::{Mode, Stream};
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::{ColumnType, INFERENCE_SAMPLE_ROWS, Value, decimal_scale};

/// MySQL's limit on placeholders in one statement.
const MAX_PARAMS: usize = 65_535;
/// Rows per INSERT statement at most.
const MAX_ROWS_PER_INSERT: usize = 500;

pub struct MySqlSink {
    pool: MySqlPool,
    options: SinkOptions,
}

impl MySqlSink {
    pub fn connect_lazy(url: &str, config: &Config, options: SinkOptions) -> anyhow::Result<MySqlSink> {
        let connect = MySqlConnectOptions::from_str(&url.replacen("mariadb://", "mysql://", 1))
            .map_err(|e| anyhow::anyhow!("database.url: {}", crate::redact::scrub(&e.to_string(), &[url])))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.database.connect_timeout)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query(
                        "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',ANSI_QUOTES,STRICT_ALL_TABLES'), time_zone = '+00:00'",
                    )
                    .execute(&mut *conn)
                    .await?;
                    // See super::nodelay. The server sees our address as HOST:PORT.
                    let ports: Option<(Option<String>, i64)> = sqlx::query_as(
                        "SELECT CAST(HOST AS CHAR), CAST(@@port AS SIGNED) FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    let client = ports.as_ref().and_then(|(host, _)| host.as_deref()?.rsplit_once(':')?.1.parse::<u16>().ok());
                    if let (Some(client), Some((_, server))) = (client, ports) {
                        super::nodelay::set_nodelay(client, server as u16);
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(connect);
        Ok(MySqlSink { pool, options })
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        )
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
        // IF NOT EXISTS is atomic enough here: MySQL DDL takes its own metadata lock.
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {ledger} (
                file_id       CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
                source        VARCHAR(1024) NOT NULL,
                object_key    VARCHAR(1024) NOT NULL,
                etag          VARCHAR(255) NOT NULL,
                state         VARCHAR(16) NOT NULL,
                target_table  VARCHAR(64),
                row_count     BIGINT,
                byte_count    BIGINT NOT NULL,
                attempts      INT NOT NULL DEFAULT 0,
                error         LONGTEXT,
                history       LONGTEXT,
                claimed_by    VARCHAR(255),
                first_seen_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                loaded_at     DATETIME(6),
                updated_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                KEY source_key (source(191), object_key(191))
            ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn reset_failed(&self, source: &str, key: &str) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET state = 'pending', error = NULL, updated_at = CURRENT_TIMESTAMP(6) WHERE source = ? AND object_key = ? AND state = 'failed'",
            self.options.ledger
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(source)
            .bind(key)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn record_transient(&self, file: FileRef<'_>, stage: Stage, message: &str) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let mut tx = self.pool.begin().await?;
        let history: Option<(Option<String>,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT history FROM {ledger} WHERE file_id = ? AND state = 'pending' FOR UPDATE SKIP LOCKED"
        )))
        .bind(file.id())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((history,)) = history {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {ledger} SET attempts = attempts + 1, history = ?, updated_at = CURRENT_TIMESTAMP(6) WHERE file_id = ?"
            )))
            .bind(append_history(history.as_deref(), stage, message))
            .bind(file.id())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    pub async fn load<F, Fut>(&self, file: FileRef<'_>, spec: &LoadSpec, open: F) -> Result<LoadOutcome, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let ledger = &self.options.ledger;
        let id = file.id();
        let db = |e| db_error(e, Stage::Database);
        // Only when absent: an INSERT meeting the row while another load holds it would wait.
        let known: Option<(i64,)> = sqlx::query_as(AssertSqlSafe(format!("SELECT 1 FROM {ledger} WHERE file_id = ?")))
            .bind(&id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        if known.is_none() {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT IGNORE INTO {ledger} (file_id, source, object_key, etag, state, byte_count) VALUES (?, ?, ?, ?, 'pending', ?)"
            )))
            .bind(&id)
            .bind(file.source)
            .bind(file.key)
            .bind(file.etag)
            .bind(file.size as i64)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        let row: Option<LedgerRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT state, row_count, error, CAST(attempts AS SIGNED), history FROM {ledger} WHERE file_id = ? FOR UPDATE SKIP LOCKED"
        )))
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some((current, rows, error, attempts, history)) = row else {
            return Ok(LoadOutcome::Busy);
        };
        if let Some(done) = outcome_of_state(&current, rows, error) {
            return Ok(done);
        }
        if attempts >= i64::from(self.options.max_attempts) {
            let error = retries_exhausted(attempts, history.as_deref());
            self.mark_failed(&mut tx, &id, &error, spec.table.as_ref().ok()).await?;
            tx.commit().await.map_err(db)?;
            return Ok(LoadOutcome::Failed(error));
        }
        sqlx::query("SAVEPOINT file_rows").execute(&mut *tx).await.map_err(db)?;
        let table = spec.table.as_ref().ok().cloned();
        match self.insert_rows(&mut tx, file, spec, open).await {
            Ok(rows) => {
                sqlx::query("RELEASE SAVEPOINT file_rows")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {ledger} SET state = '{}', row_count = ?, target_table = ?, error = NULL,
                     attempts = attempts + 1, claimed_by = ?, loaded_at = CURRENT_TIMESTAMP(6),
                     updated_at = CURRENT_TIMESTAMP(6) WHERE file_id = ?",
                    state::LOADED
                )))
                .bind(rows as i64)
                .bind(table)
                .bind(&self.options.owner)
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
            // Dropping the transaction rolls it back: nothing of the file stays.
            Err(transient) => Err(transient),
        }
    }

    async fn mark_failed(
        &self,
        tx: &mut Transaction<'static, MySql>,
        id: &str,
        error: &FileError,
        table: Option<&String>,
    ) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = '{}', error = ?, target_table = ?, attempts = attempts + 1, claimed_by = ?,
             updated_at = CURRENT_TIMESTAMP(6) WHERE file_id = ?",
            self.options.ledger,
            state::FAILED
        )))
        .bind(serde_json::to_string(error).unwrap_or_default())
        .bind(table)
        .bind(&self.options.owner)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    /// The table's columns, read on a connection of its own: in MySQL a transaction that looked
    /// at a table holds a metadata lock on it, which the DDL below would wait for.
    /// With the precision and scale of each DECIMAL column.
    async fn table_columns(
        &self,
        table: &str,
    ) -> Result<(Option<Vec<(String, ColumnType)>>, DecimalScales), LoadError> {
        let rows: Vec<(String, String, Option<u64>, Option<u64>)> = sqlx::query_as(
            "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(NUMERIC_PRECISION AS UNSIGNED),
                    CAST(NUMERIC_SCALE AS UNSIGNED)
             FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        let mut scales = DecimalScales::new();
        let columns = rows
            .into_iter()
            .map(|(n, t, precision, scale)| {
                let (name, ty) = (n.to_ascii_lowercase(), type_of(&t));
                if let (ColumnType::Numeric, Some(p), Some(s)) = (ty, precision, scale) {
                    scales.insert(name.clone(), (p as usize, s as usize));
                }
                (name, ty)
            })
            .collect::<Vec<_>>();
        Ok(((!columns.is_empty()).then_some(columns), scales))
    }

    async fn insert_rows<F, Fut>(
        &self,
        tx: &mut Transaction<'static, MySql>,
        file: FileRef<'_>,
        spec: &LoadSpec,
        open: F,
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
        let (existing, mut scales) = self.table_columns(&table).await?;
        if first.is_none() && existing.is_none() {
            return Ok(0); // header only: no rows, and no sample to create the table from
        }
        let plan = plan_load(&table, &file_cols, &decoded.types, existing, spec, first.as_ref())?;
        // MySQL stores every value of a DECIMAL at its column's scale (`2.5` in DECIMAL(65,2)
        // reads `2.50`) and rounds what has more digits. A new decimal column is DECIMAL only
        // when the sample's values share one scale (at most 30); otherwise text keeps each
        // value's own digits.
        let created = plan.create.iter().flat_map(|types| plan.columns.iter().zip(types));
        for (column, ty) in created.chain(plan.add.iter().map(|(c, t)| (c, t))) {
            if *ty == ColumnType::Numeric {
                let i = plan.columns.iter().position(|c| c == column).unwrap_or(0);
                // The rows inference looked at, and no more.
                let mut sample_scales = first
                    .iter()
                    .flat_map(|b| (0..b.len().min(INFERENCE_SAMPLE_ROWS)).filter_map(move |r| b.get(r, i)))
                    .map(decimal_scale);
                let Some(scale) = sample_scales.next() else {
                    continue; // no value to take a scale from (a declared type): text keeps any
                };
                if sample_scales.all(|s| s == scale) && scale <= 30 {
                    scales.insert(column.clone(), (65, scale));
                }
            }
        }
        let column_type = |c: &String, t: ColumnType| match (t, scales.get(c)) {
            (ColumnType::Numeric, Some((p, s))) => format!("DECIMAL({p},{s})"),
            (ColumnType::Numeric, None) => sql_type(ColumnType::Text, spec.key_columns.contains(c)).to_string(),
            _ => sql_type(t, spec.key_columns.contains(c)).to_string(),
        };
        let upsert = spec.write_mode == WriteMode::Upsert;
        if let Some(types) = &plan.create {
            let definition = plan
                .columns
                .iter()
                .zip(types)
                .map(|(c, t)| format!("{} {}", quote_ident(c), column_type(c, *t)))
                .collect::<Vec<_>>()
                .join(", ");
            let key = match upsert {
                true => format!(
                    ", PRIMARY KEY ({})",
                    spec.key_columns
                        .iter()
                        .map(|c| quote_ident(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                false => String::new(),
            };
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {} ({definition}{key}) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
                quote_ident(&table)
            )))
            .execute(&self.pool)
            .await
            .map_err(db)?;
            tracing::info!(db.table = %table, "created table");
        }
        for (column, ty) in &plan.add {
            sqlx::query(AssertSqlSafe(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
                quote_ident(&table),
                quote_ident(column),
                column_type(column, *ty)
            )))
            .execute(&self.pool)
            .await
            .map_err(db)?;
            tracing::info!(db.table = %table, db.column = %column, "added a column");
        }
        // Another load may have created the table or added a column first (IF NOT EXISTS then
        // did nothing): write with the types the table has, not the ones this load planned.
        let plan = if plan.create.is_some() || !plan.add.is_empty() {
            let (existing, actual) = self.table_columns(&table).await?;
            scales = actual;
            plan_load(&table, &file_cols, &decoded.types, existing, spec, first.as_ref())?
        } else {
            plan
        };
        let width = plan.columns.len();
        let on_duplicate = if upsert {
            let updates: Vec<String> = plan
                .columns
                .iter()
                .filter(|c| !spec.key_columns.contains(c))
                .map(|c| format!("{0} = VALUES({0})", quote_ident(c)))
                .collect();
            let first_key = quote_ident(&spec.key_columns[0]);
            // Rows go in file order, so the file's last row for a key wins.
            match updates.is_empty() {
                true => format!(" ON DUPLICATE KEY UPDATE {first_key} = {first_key}"),
                false => format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", ")),
            }
        } else {
            String::new()
        };
        let rows_per_insert = (MAX_PARAMS / width).clamp(1, MAX_ROWS_PER_INSERT);
        let insert = |rows: usize| {
            let placeholders = format!("({})", vec!["?"; width].join(", "));
            format!(
                "INSERT INTO {} ({}) VALUES {}{on_duplicate}",
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
        let lineage_time = lineage.as_ref().map(|l| utc_datetime(&l.loaded_at).unwrap_or_default());
        let full_insert = insert(rows_per_insert);
        let limits: Vec<Option<(usize, usize)>> = plan.columns.iter().map(|c| scales.get(c).copied()).collect();
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
                    for (((value, ty), column), limit) in b.row(r).zip(&plan.types).zip(&plan.columns).zip(&limits) {
                        let type_error = |m: String| b.error_at(r, column, FileErrorKind::Type, m);
                        // A DATETIME column also takes timestamps with an offset, in UTC (a
                        // table created for them has DATETIME(6) columns, read back as such).
                        let ty = match (ty, value) {
                            (ColumnType::Timestamp, Some(v)) if ColumnType::TimestampTz.accepts(v) => {
                                &ColumnType::TimestampTz
                            }
                            _ => ty,
                        };
                        let value = ty.convert(value).map_err(type_error)?;
                        if let (Value::Text(t), Some((precision, scale))) = (value, limit) {
                            check_decimal(t, *precision, *scale).map_err(type_error)?;
                        }
                        query = match (value, ty) {
                            (Value::Text(t), ColumnType::TimestampTz) => query.bind(
                                utc_datetime(t).ok_or_else(|| type_error(format!("{t:?} is not a valid timestamp")))?,
                            ),
                            (Value::Null, _) => query.bind(None::<&str>),
                            (Value::Integer(i), _) => query.bind(i),
                            (Value::Float(f), _) => query.bind(f),
                            (Value::Boolean(v), _) => query.bind(v),
                            (Value::Text(t), _) => query.bind(t),
                        };
                    }
                    if let (Some(l), Some(at)) = (&lineage, &lineage_time) {
                        query = query.bind(l.source_key.clone()).bind(l.etag.clone()).bind(at.clone());
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

/// Per DECIMAL column: its precision and scale.
type DecimalScales = std::collections::HashMap<String, (usize, usize)>;

/// A decimal (bound as text, so no binary floating point) must fit its column's precision and
/// scale: MySQL would round extra fractional digits without an error.
fn check_decimal(value: &str, precision: usize, scale: usize) -> Result<(), String> {
    let digits = value
        .trim_start_matches('-')
        .split_once('.')
        .map_or(value.trim_start_matches('-'), |(i, _)| i);
    if decimal_scale(value) > scale || digits.trim_start_matches('0').len() > precision.saturating_sub(scale) {
        return Err(format!(
            "{value:?} does not fit the column's DECIMAL({precision},{scale}) without rounding"
        ));
    }
    Ok(())
}

/// An RFC 3339 timestamp as MySQL's DATETIME text, in UTC (sessions run in UTC).
fn utc_datetime(value: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(value).ok().map(|t| {
        t.with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string()
    })
}

fn sql_type(t: ColumnType, key: bool) -> &'static str {
    match t {
        ColumnType::Integer => "BIGINT",
        ColumnType::Float => "DOUBLE",
        ColumnType::Numeric => "DECIMAL(65,30)",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Date => "DATE",
        ColumnType::Timestamp | ColumnType::TimestampTz => "DATETIME(6)",
        // A key must have a bounded length in MySQL, and compare byte for byte: the default
        // collation would take `abc` and `ABC` (or `a` and `a `) for one key and merge them.
        ColumnType::Text if key => "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        ColumnType::Text => "LONGTEXT",
        ColumnType::Json => "JSON",
    }
}

fn type_of(data_type: &str) -> ColumnType {
    match data_type.to_ascii_lowercase().as_str() {
        "bigint" | "int" | "integer" | "mediumint" | "smallint" => ColumnType::Integer,
        "tinyint" => ColumnType::Boolean,
        "double" | "float" | "real" => ColumnType::Float,
        "decimal" | "numeric" => ColumnType::Numeric,
        "date" => ColumnType::Date,
        "datetime" | "timestamp" => ColumnType::Timestamp,
        "json" => ColumnType::Json,
        _ => ColumnType::Text,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn offsets_become_utc_datetimes() {
        assert_eq!(
            super::utc_datetime("2026-11-01T10:00:00+02:00").as_deref(),
            Some("2026-11-01 08:00:00.000000")
        );
        assert_eq!(super::utc_datetime("yesterday"), None);
    }

    #[test]
    fn decimals_that_mysql_would_round_are_refused() {
        assert!(super::check_decimal("129.90", 65, 2).is_ok());
        assert!(super::check_decimal("-129.9", 65, 2).is_ok());
        assert!(super::check_decimal("129.901", 65, 2).is_err());
        assert!(super::check_decimal("12345", 6, 2).is_err());
        assert!(super::check_decimal("1234", 6, 2).is_ok());
    }
}
