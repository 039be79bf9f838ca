//! PostgreSQL: rows go in through `COPY ... FROM STDIN (FORMAT csv)`, streamed batch by batch;
//! claims are row locks on the ledger taken with `SKIP LOCKED`, so replicas never wait on, or
//! load, a file another one holds.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::{
    FileRef, LoadOutcome, SinkOptions, db_error, file_columns, outcome_of_state, plan_table, quote_ident, state,
};
use crate::config::Config;
use crate::error::{FileError, LoadError, Stage};
use crate::format::{Batch, Decoded};
use crate::schema::ColumnType;

pub struct PgSink {
    pool: PgPool,
    options: SinkOptions,
}

impl PgSink {
    pub fn connect_lazy(url: &str, config: &Config, options: SinkOptions) -> anyhow::Result<PgSink> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("database.url: {}", crate::redact::scrub(&e.to_string(), &[url])))?
            .application_name("s3-sql-loader");
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.database.connect_timeout)
            .connect_lazy_with(connect);
        Ok(PgSink { pool, options })
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub async fn close(&self) {
        self.pool.close().await
    }

    pub async fn ensure_ledger(&self) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let mut tx = self.pool.begin().await?;
        // Replicas starting together would race on CREATE TABLE IF NOT EXISTS; serialize them.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("s3-sql-loader:{ledger}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {ledger} (
                file_id       text PRIMARY KEY,
                source        text NOT NULL,
                object_key    text NOT NULL,
                etag          text NOT NULL,
                state         text NOT NULL,
                target_table  text,
                row_count     bigint,
                byte_count    bigint NOT NULL,
                attempts      integer NOT NULL DEFAULT 0,
                error         text,
                claimed_by    text,
                first_seen_at timestamptz NOT NULL DEFAULT now(),
                loaded_at     timestamptz,
                updated_at    timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
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
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    pub async fn reset_failed(&self, source: &str, key: &str) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET state = 'pending', error = NULL, updated_at = now() WHERE source = $1 AND object_key = $2 AND state = 'failed'",
            self.options.ledger
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(source)
            .bind(key)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn load<F, Fut>(
        &self,
        file: FileRef<'_>,
        target: Result<String, FileError>,
        open: F,
    ) -> Result<LoadOutcome, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Decoded, LoadError>>,
    {
        let ledger = &self.options.ledger;
        let id = file.id();
        let db = |e| db_error(e, Stage::Database);

        // Committed on its own: inserting it inside the load transaction would make a second
        // replica block on the uniqueness check until the first one's load ends.
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {ledger} (file_id, source, object_key, etag, state, byte_count)
             VALUES ($1, $2, $3, $4, 'pending', $5) ON CONFLICT (file_id) DO NOTHING"
        )))
        .bind(&id)
        .bind(file.source)
        .bind(file.key)
        .bind(file.etag)
        .bind(file.size as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;

        let mut tx = self.pool.begin().await.map_err(db)?;
        let row: Option<(String, Option<i64>, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT state, row_count, error FROM {ledger} WHERE file_id = $1 FOR UPDATE SKIP LOCKED"
        )))
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some((current, rows, error)) = row else {
            return Ok(LoadOutcome::Busy);
        };
        if let Some(done) = outcome_of_state(&current, rows, error) {
            return Ok(done);
        }
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {ledger} SET attempts = attempts + 1, claimed_by = $2, updated_at = now() WHERE file_id = $1"
        )))
        .bind(&id)
        .bind(&self.options.owner)
        .execute(&mut *tx)
        .await
        .map_err(db)?;

        sqlx::query("SAVEPOINT file_rows").execute(&mut *tx).await.map_err(db)?;
        let table = target.as_ref().ok().cloned();
        match self.copy_rows(&mut tx, target, open).await {
            Ok(rows) => {
                sqlx::query("RELEASE SAVEPOINT file_rows")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {ledger} SET state = '{}', row_count = $2, target_table = $3, error = NULL,
                     loaded_at = now(), updated_at = now() WHERE file_id = $1",
                    state::LOADED
                )))
                .bind(&id)
                .bind(rows as i64)
                .bind(table)
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
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {ledger} SET state = '{}', error = $2, target_table = $3, updated_at = now() WHERE file_id = $1",
                    state::FAILED
                )))
                .bind(&id)
                .bind(serde_json::to_string(&error).unwrap_or_default())
                .bind(table)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Failed(error))
            }
            // Dropping the transaction rolls it back: nothing of the file stays.
            Err(transient) => Err(transient),
        }
    }

    /// Checks or creates the table and streams the file into it with COPY. Returns the row count.
    async fn copy_rows<F, Fut>(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        target: Result<String, FileError>,
        open: F,
    ) -> Result<u64, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Decoded, LoadError>>,
    {
        let table = target?;
        let mut decoded = open().await?;
        if decoded.header.is_empty() {
            return Ok(0); // a 0-byte file: nothing to load, nothing to create
        }
        let columns = file_columns(&decoded.header)?;
        let first = decoded.next_batch().await?;
        let existing = self.table_columns(tx, &table).await?;
        let plan = plan_table(
            &table,
            &columns,
            existing,
            self.options.create_tables,
            first.as_ref(),
            &self.options.null,
        )?;
        if let Some(types) = &plan.create {
            self.create_table(&table, &columns, types).await?;
        }
        let column_list = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        let statement = format!(
            "COPY {} ({column_list}) FROM STDIN WITH (FORMAT csv)",
            quote_ident(&table)
        );
        let mut copy = tx.copy_in_raw(&statement).await.map_err(|e| copy_error(e, &columns))?;
        let mut buffer = Vec::with_capacity(1 << 20);
        let mut batch = first;
        let sent: Result<(), LoadError> = async {
            while let Some(b) = batch {
                buffer.clear();
                encode_csv(&b, &self.options.null, &mut buffer);
                copy.send(buffer.as_slice())
                    .await
                    .map_err(|e| copy_error(e, &columns))?;
                batch = decoded.next_batch().await?;
            }
            Ok(())
        }
        .await;
        match sent {
            Ok(()) => copy.finish().await.map_err(|e| copy_error(e, &columns)),
            Err(e) => {
                // Abort ends COPY with an error: the server discards what it received.
                let _ = copy.abort(e.to_string()).await;
                Err(e)
            }
        }
    }

    async fn table_columns(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
    ) -> Result<Option<Vec<(String, ColumnType)>>, LoadError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(rows.into_iter().map(|(name, ty)| (name, type_of(&ty))).collect()))
    }

    /// Creates the table in its own short transaction, serialized by an advisory lock so that
    /// replicas creating the same table at once do not collide.
    async fn create_table(&self, table: &str, columns: &[String], types: &[ColumnType]) -> Result<(), LoadError> {
        let db = |e| db_error(e, Stage::Database);
        let definition = columns
            .iter()
            .zip(types)
            .map(|(c, t)| format!("{} {}", quote_ident(c), sql_type(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("s3-sql-loader:table:{table}"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} ({definition})",
            quote_ident(table)
        )))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(db.table = %table, "created table");
        Ok(())
    }
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "bigint",
        ColumnType::Float => "double precision",
        ColumnType::Boolean => "boolean",
        ColumnType::Date => "date",
        ColumnType::Timestamp => "timestamp",
        ColumnType::TimestampTz => "timestamptz",
        ColumnType::Text => "text",
    }
}

fn type_of(data_type: &str) -> ColumnType {
    match data_type {
        "bigint" | "integer" | "smallint" => ColumnType::Integer,
        "double precision" | "real" | "numeric" => ColumnType::Float,
        "boolean" => ColumnType::Boolean,
        "date" => ColumnType::Date,
        "timestamp without time zone" => ColumnType::Timestamp,
        "timestamp with time zone" => ColumnType::TimestampTz,
        _ => ColumnType::Text,
    }
}

/// Re-encodes rows as CSV for COPY: NULL as an empty unquoted field, every value quoted (so an
/// empty string stays an empty string and nothing in a value can end the data).
pub fn encode_csv(batch: &Batch, null: &str, out: &mut Vec<u8>) {
    for record in &batch.records {
        for (i, field) in record.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if field == null {
                continue;
            }
            out.push(b'"');
            let bytes = field.as_bytes();
            if memchr_quote(bytes) {
                for &b in bytes {
                    if b == b'"' {
                        out.push(b'"');
                    }
                    out.push(b);
                }
            } else {
                out.extend_from_slice(bytes);
            }
            out.push(b'"');
        }
        out.push(b'\n');
    }
}

fn memchr_quote(bytes: &[u8]) -> bool {
    bytes.contains(&b'"')
}

/// A COPY error with the record (COPY's "line": no header is sent) and column from
/// PostgreSQL's context when it gives them.
fn copy_error(e: sqlx::Error, columns: &[String]) -> LoadError {
    let context = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
        .and_then(|pg| pg.r#where().map(str::to_string));
    match db_error(e, Stage::Database) {
        LoadError::Permanent(mut fe) => {
            if let Some(context) = context {
                fe.record = number_after(&context, "line ");
                fe.column = text_after(&context, ", column ").filter(|c| columns.contains(c));
            }
            LoadError::Permanent(fe)
        }
        transient => transient,
    }
}

fn number_after(text: &str, marker: &str) -> Option<u64> {
    let start = text.find(marker)? + marker.len();
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn text_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    Some(rest[..rest.find(':').unwrap_or(rest.len())].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_encoding_quotes_values_and_leaves_nulls_empty() {
        let mut batch = Batch::default();
        batch
            .records
            .push(csv::StringRecord::from(vec!["1", "", "a \"b\",\nc"]));
        let mut out = Vec::new();
        encode_csv(&batch, "", &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "\"1\",,\"a \"\"b\"\",\nc\"\n");
    }

    #[test]
    fn the_copy_context_gives_line_and_column() {
        let ctx = "COPY orders, line 3, column qty: \"abc\"";
        assert_eq!(number_after(ctx, "line "), Some(3));
        assert_eq!(text_after(ctx, ", column ").as_deref(), Some("qty"));
    }
}
